"""A real library on the loop under test: the ``websockets`` library (asyncio implementation).

Every test starts a ``websockets.asyncio.server`` server and talks to it with
``websockets.asyncio.client`` on the ``loop`` fixture's loop, so each scenario runs on the
stdlib loop and on ferroloop: plain TCP, TLS and a Unix socket; thousands of ordered
messages, a multi-MiB message sent in fragments and compressed with permessage-deflate,
ping/pong, close codes and reasons, a refused connection, a rejected handshake, a
broadcast, a server shutdown closing its clients, back-pressure from a client that stops
reading and a client that vanishes.  The loop fixture fails a test whose loop exception
handler was called, and pytest turns warnings (unclosed transports) into errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
import zlib
from http import HTTPStatus

import pytest
from netutil import MiB, assert_bytes_equal, pattern, run
from websockets.asyncio.client import connect, unix_connect  # a test dependency (pyproject.toml)
from websockets.asyncio.server import ServerConnection, broadcast, serve, unix_serve
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

HOST = "127.0.0.1"
BIG = 4 * MiB + 4_321  # not a multiple of any fragment size used below


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def serving(handler, **kwargs):
    """Serve *handler* on 127.0.0.1 port 0; yield ``(server, port)``."""
    async with serve(handler, HOST, 0, **kwargs) as server:
        port = server.sockets[0].getsockname()[1]
        yield server, port


def client(uri: str, **kwargs):
    """``connect`` without the system proxy configuration (the tests talk to 127.0.0.1)."""
    return connect(uri, proxy=None, **kwargs)


async def echo(ws) -> None:
    """Send every message back, keeping its type (text stays ``str``, binary ``bytes``)."""
    async for message in ws:
        await ws.send(message)


def message(i: int) -> str | bytes:
    """Message *i* of the ordered exchanges: text and binary alternate, sizes vary."""
    if i % 2:
        return pattern((i * 37) % 3_000, i)
    return f"message {i}: " + "ü€" * (i % 40)


async def exchange(ws, messages) -> list:
    """Send *messages* from one task while receiving as many replies in this one."""

    async def send_all():
        for item in messages:
            await ws.send(item)

    sender = asyncio.create_task(send_all())
    try:
        got = [await ws.recv() for _ in messages]
    finally:
        await sender
    return got


def assert_same_messages(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for i, (received, sent) in enumerate(zip(got, expected, strict=True)):
        assert type(received) is type(sent), i
        assert received == sent, i


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(params=[pytest.param(False, id="plain"), pytest.param(True, id="tls")])
def security(request, tls_contexts):
    """``(scheme, server kwargs, client kwargs)`` for a plain or a TLS connection."""
    if not request.param:
        return "ws", {}, {}
    server_context, client_context = tls_contexts
    return "wss", {"ssl": server_context}, {"ssl": client_context}


# --------------------------------------------------------------------------- ordered messages


def test_ten_thousand_text_and_binary_messages_echo_in_order(loop):
    count = 10_000
    expected = [message(i) for i in range(count)]
    server_close_codes = []

    async def recording_echo(ws):
        await echo(ws)
        server_close_codes.append(ws.close_code)

    async def main():
        async with serving(recording_echo) as (_, port):
            async with client(f"ws://{HOST}:{port}") as ws:
                got = await exchange(ws, expected)
            assert ws.close_code == 1000
        return got

    got = run(loop, main(), timeout=60)
    assert_same_messages(got, expected)
    assert server_close_codes == [1000]


def test_messages_from_several_clients_stay_on_their_own_connection(loop):
    clients, per_client = 8, 250

    async def main():
        async with serving(echo) as (server, port):

            async def one(c: int):
                sent = [f"client {c} #{i}" if i % 3 else pattern(i, c) for i in range(per_client)]
                async with client(f"ws://{HOST}:{port}") as ws:
                    got = await exchange(ws, sent)
                return sent, got

            results = await asyncio.gather(*(one(c) for c in range(clients)))
        for sent, got in results:
            assert_same_messages(got, sent)

    run(loop, main(), timeout=60)


# --------------------------------------------------------------------------- large messages


def test_large_fragmented_messages_are_reassembled_and_deflated(loop):
    binary = pattern(BIG, 7)
    # Compressible text: permessage-deflate shrinks it on the wire.
    text = "".join(f"line {i:07d} of a long and repetitive text\n" for i in range(BIG // 40))
    wire = {"server_rx": 0}
    server_extensions = []

    async def big_echo(ws):
        server_extensions.append([ext.name for ext in ws.protocol.extensions])
        async for item in ws:
            # Send it back fragmented: 64 KiB frames of one message.
            step = 64 * 1024
            await ws.send(item[i : i + step] for i in range(0, len(item), step))

    class Counting(ServerConnection):
        def data_received(self, data: bytes) -> None:
            wire["server_rx"] += len(data)
            super().data_received(data)

    async def main():
        async with serving(big_echo, max_size=2 * BIG, create_connection=Counting) as (_, port):
            async with client(f"ws://{HOST}:{port}", max_size=2 * BIG) as ws:
                negotiated = ws.response.headers["Sec-WebSocket-Extensions"]
                assert negotiated.startswith("permessage-deflate"), negotiated
                # The client sends them fragmented too (an iterable of frames).
                step = 100_003
                await ws.send(binary[i : i + step] for i in range(0, len(binary), step))
                got_binary = await asyncio.wait_for(ws.recv(), 30)
                before = wire["server_rx"]
                await ws.send(text)
                got_text = await asyncio.wait_for(ws.recv(), 30)
                text_wire_bytes = wire["server_rx"] - before
        return got_binary, got_text, text_wire_bytes

    got_binary, got_text, text_wire_bytes = run(loop, main(), timeout=60)
    assert server_extensions == [["permessage-deflate"]]
    assert isinstance(got_binary, bytes)
    assert_bytes_equal(got_binary, binary)
    assert isinstance(got_text, str)
    assert got_text == text
    # Compressed: far fewer bytes on the wire than the text's length.
    assert 0 < text_wire_bytes < len(text.encode()) // 4, text_wire_bytes
    assert len(zlib.compress(text.encode())) < len(text) // 4  # (the text is compressible)


def test_message_over_max_size_closes_the_connection_with_1009(loop):
    async def main():
        async with serving(echo, max_size=64 * 1024) as (_, port):
            async with client(f"ws://{HOST}:{port}") as ws:
                await ws.send(b"x" * 1024)
                assert await ws.recv() == b"x" * 1024
                await ws.send(pattern(256 * 1024))  # random: deflate does not shrink it
                with pytest.raises(ConnectionClosedError) as info:
                    await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd.code == 1009  # message too big
        assert ws.close_code == 1009

    run(loop, main())


# --------------------------------------------------------------------------- ping / pong


def test_ping_is_answered_with_a_pong_and_measures_latency(loop):
    async def main():
        async with serving(echo) as (_, port):
            async with client(f"ws://{HOST}:{port}", ping_interval=None) as ws:
                latencies = []
                for i in range(20):
                    started = time.monotonic()
                    pong = await ws.ping(f"ping {i}")
                    latency = await asyncio.wait_for(pong, 5)
                    elapsed = time.monotonic() - started
                    assert 0 <= latency <= elapsed + 0.01, (latency, elapsed)
                    latencies.append(latency)
                # Messages still flow in order around the pings.
                await ws.send("after the pings")
                assert await ws.recv() == "after the pings"
        assert len(latencies) == 20
        assert max(latencies) < 1.0, latencies
        assert ws.latency == latencies[-1]

    run(loop, main())


def test_keepalive_pings_run_on_their_own_and_update_latency(loop):
    async def main():
        async with serving(echo) as (_, port):
            async with client(f"ws://{HOST}:{port}", ping_interval=0.05) as ws:
                assert ws.latency == 0
                async with asyncio.timeout(5):
                    while ws.latency == 0:
                        await asyncio.sleep(0.02)
                await ws.send("still open")
                assert await ws.recv() == "still open"
        assert 0 < ws.latency < 1

    run(loop, main())


# --------------------------------------------------------------------------- close codes


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        pytest.param(1001, "server going away", ConnectionClosedOK, id="1001"),
        pytest.param(4000, "application says: über", ConnectionClosedError, id="4000"),
    ],
)
def test_server_close_code_and_reason_reach_the_client(loop, code, reason, error):
    server_saw = []

    async def closing(ws):
        assert await ws.recv() == "hello"
        await ws.close(code, reason)
        server_saw.append((ws.close_code, ws.close_reason))

    async def main():
        async with serving(closing) as (_, port):
            async with client(f"ws://{HOST}:{port}") as ws:
                await ws.send("hello")
                with pytest.raises(error) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                await asyncio.wait_for(ws.wait_closed(), 5)
        return info.value, ws

    exc, ws = run(loop, main())
    assert exc.rcvd.code == code
    assert exc.rcvd.reason == reason
    assert exc.sent.code == code  # the client echoed the close frame
    assert ws.close_code == code
    assert ws.close_reason == reason
    assert server_saw == [(code, reason)]


def test_client_close_code_and_reason_reach_the_server(loop):
    server_saw = []

    async def waiting(ws):
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
        server_saw.append((info.value.rcvd.code, info.value.rcvd.reason))

    async def main():
        async with serving(waiting) as (_, port):
            ws = await client(f"ws://{HOST}:{port}")
            await ws.close(4321, "client done")
            assert ws.close_code == 4321
            async with asyncio.timeout(5):
                while not server_saw:
                    await asyncio.sleep(0.01)

    run(loop, main())
    assert server_saw == [(4321, "client done")]


def test_server_shutdown_closes_open_connections_with_1001(loop, security):
    scheme, server_kwargs, client_kwargs = security

    async def main():
        handlers_done = []

        async def holding(ws):
            try:
                await ws.wait_closed()
            finally:
                handlers_done.append(ws.close_code)

        server = await serve(holding, HOST, 0, **server_kwargs)
        port = server.sockets[0].getsockname()[1]
        clients = [await client(f"{scheme}://{HOST}:{port}", **client_kwargs) for _ in range(5)]
        for ws in clients:
            await ws.send("ping")  # (the handler never reads: queued, not an error)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        for ws in clients:
            with pytest.raises(ConnectionClosedOK) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1001
        assert handlers_done == [1001] * 5
        assert not server.is_serving()

    run(loop, main())


def test_connecting_to_a_closed_port_raises_connection_refused(loop):
    async def main():
        port = free_port()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await client(f"ws://{HOST}:{port}", open_timeout=5)
        assert time.monotonic() - started < 5

    run(loop, main())


# --------------------------------------------------------------------------- broadcast


def test_broadcast_reaches_every_connected_client(loop):
    count = 20

    async def main():
        connected = []
        all_connected = asyncio.Event()

        async def registering(ws):
            connected.append(ws)
            if len(connected) == count:
                all_connected.set()
            await ws.wait_closed()

        async with serving(registering) as (_, port):
            clients = [await client(f"ws://{HOST}:{port}") for _ in range(count)]
            try:
                await asyncio.wait_for(all_connected.wait(), 10)
                for i in range(50):
                    broadcast(connected, f"news {i}")
                broadcast(connected, b"\x00binary\xff")
                for ws in clients:
                    got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(51)]
                    assert got == [f"news {i}" for i in range(50)] + [b"\x00binary\xff"]
            finally:
                for ws in clients:
                    await ws.close()

    run(loop, main())


# --------------------------------------------------------------------------- TLS


def test_wss_verifies_the_server_and_echoes_messages(loop, tls_contexts):
    server_context, client_context = tls_contexts
    expected = [message(i) for i in range(500)] + [pattern(MiB + 3, 11)]

    async def main():
        async with serving(echo, ssl=server_context, max_size=2 * MiB) as (_, port):
            async with client(f"wss://{HOST}:{port}", ssl=client_context, max_size=2 * MiB) as ws:
                ssl_object = ws.transport.get_extra_info("ssl_object")
                assert ssl_object is not None
                assert ssl_object.version().startswith("TLSv1.")
                peercert = ws.transport.get_extra_info("peercert")
                assert peercert["subject"] == ((("commonName", "localhost"),),)
                got = await exchange(ws, expected)
        return got

    got = run(loop, main(), timeout=30)
    assert_same_messages(got, expected)


def test_wss_client_rejects_an_untrusted_certificate(loop, tls_contexts):
    server_context, _ = tls_contexts
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded: trusts nothing

    async def main():
        async with serving(echo, ssl=server_context) as (_, port):
            with pytest.raises(ssl.SSLCertVerificationError):
                await client(f"wss://{HOST}:{port}", ssl=untrusting, open_timeout=5)

    # The server logs the failed handshake; that is not a loop error.
    run(loop, main())


# --------------------------------------------------------------------------- Unix socket


@pytest.fixture
def unix_path(tmp_path):
    path = os.path.join(tmp_path, "ws.sock")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")
    return path


def test_unix_socket_server_and_client_exchange_messages(loop, unix_path):
    expected = [message(i) for i in range(1000)]
    server_socknames = []

    async def recording_echo(ws):
        server_socknames.append(ws.transport.get_extra_info("sockname"))
        await echo(ws)

    async def main():
        async with unix_serve(recording_echo, unix_path):
            assert os.path.exists(unix_path)
            async with unix_connect(unix_path, uri="ws://localhost/chat") as ws:
                assert ws.request.path == "/chat"
                got = await exchange(ws, expected)
            assert ws.close_code == 1000

        return got

    got = run(loop, main(), timeout=30)
    assert_same_messages(got, expected)
    assert server_socknames == [unix_path]


# --------------------------------------------------------------------------- flow control


def test_a_client_that_stops_reading_blocks_the_servers_sends_until_it_reads_again(loop, security):
    scheme, server_kwargs, client_kwargs = security
    count, size = 400, 64 * 1024
    progress = {"sent": 0}

    async def flood(ws):
        for i in range(count):
            await ws.send(pattern(size, i))
            progress["sent"] += 1
        await ws.wait_closed()

    async def main():
        async with serving(flood, compression=None, **server_kwargs) as (_, port):
            uri = f"{scheme}://{HOST}:{port}"
            async with client(uri, compression=None, **client_kwargs) as ws:
                # Not reading: the client's queue fills, it stops reading the socket,
                # the socket buffers fill and the server's send() waits for drain.
                await asyncio.sleep(0.3)
                stalled_at = progress["sent"]
                await asyncio.sleep(0.2)
                assert progress["sent"] == stalled_at, "the server kept sending"
                assert stalled_at < count
                got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(count)]
        return stalled_at, got

    stalled_at, got = run(loop, main(), timeout=60)
    assert progress["sent"] == count
    for i, item in enumerate(got):
        assert item == pattern(size, i), i


def test_a_client_that_vanishes_leaves_the_server_with_1006(loop, security):
    scheme, server_kwargs, client_kwargs = security
    server_saw = []

    async def reading(ws):
        try:
            async for _ in ws:
                pass
        except ConnectionClosedError as exc:
            server_saw.append((exc.rcvd, exc.sent, ws.close_code))

    async def main():
        async with serving(reading, **server_kwargs) as (_, port):
            ws = await client(f"{scheme}://{HOST}:{port}", **client_kwargs)
            await ws.send("about to vanish")
            ws.transport.abort()  # no close frame: the TCP connection just ends
            async with asyncio.timeout(5):
                while not server_saw:
                    await asyncio.sleep(0.01)
            await ws.wait_closed()

    run(loop, main())
    assert server_saw == [(None, None, 1006)]


# --------------------------------------------------------------------------- handshake


def test_process_request_can_reject_the_handshake_with_an_http_response(loop):
    def check_token(connection, request):
        if request.headers.get("Authorization") != "Bearer good":
            return connection.respond(HTTPStatus.FORBIDDEN, "bad token\n")
        return None

    async def main():
        async with serving(echo, process_request=check_token) as (_, port):
            with pytest.raises(InvalidStatus) as info:
                await client(f"ws://{HOST}:{port}", additional_headers={"Authorization": "x"})
            assert info.value.response.status_code == 403
            assert info.value.response.body == b"bad token\n"
            headers = {"Authorization": "Bearer good"}
            async with client(f"ws://{HOST}:{port}", additional_headers=headers) as ws:
                await ws.send("let in")
                assert await ws.recv() == "let in"

    run(loop, main())
