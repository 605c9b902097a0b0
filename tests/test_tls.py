"""TLS transports: what an application sees of ``create_server(ssl=)``,
``create_connection(ssl=)`` and ``start_tls``.

Every test runs on the stdlib loop (its ``asyncio.sslproto``) and on ferroloop (its native
TLS protocol, ``src/tls.rs``), with the same expectations: data integrity in both
directions, flow control reaching the application protocol, the TLS shutdown on
``close()``, ``abort()``, the handshake timeout, a peer that does not speak TLS,
``start_tls`` upgrades, ``BufferedProtocol`` application protocols and ``get_extra_info``.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
import weakref

import pytest
from netutil import (
    Accepting,
    BufferedRecorder,
    EchoServer,
    MiB,
    Recorder,
    Session,
    TcpEndpoint,
    assert_bytes_equal,
    pattern,
    run,
)

pytestmark = pytest.mark.timeout(60)

KiB = 1024


async def tls_pair(net, server_context, client_context, server_cls=Recorder, client_cls=Recorder):
    """A TLS connection over TCP: ``(client transport, client protocol, server protocol)``."""
    accepting = Accepting(server_cls)
    server = await net.serve(accepting, ssl=server_context)
    transport, client = await net.connect(
        client_cls, net.ep.address(server), ssl=client_context, server_hostname="localhost"
    )
    peer = await accepting.next()
    net.protocols.append(peer)
    return transport, client, peer


async def wait_for_bytes(protocol, n):
    while len(protocol.data) < n:
        await asyncio.sleep(0.001)


def test_tls_transport_is_an_asyncio_transport(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, peer = await tls_pair(net, server_context, client_context)
            for t in (transport, peer.transport):
                assert isinstance(t, asyncio.Transport)
                assert isinstance(t, asyncio.BaseTransport)
            assert transport.is_reading()
            transport.pause_reading()
            assert not transport.is_reading()
            transport.resume_reading()
            assert transport.is_reading()
            assert transport.can_write_eof() is False
            with pytest.raises(NotImplementedError):
                transport.write_eof()
            with pytest.raises(TypeError, match="expecting a bytes-like instance, got str"):
                transport.write("text")
            transport.set_write_buffer_limits(high=4 * KiB)
            assert transport.get_write_buffer_limits() == (KiB, 4 * KiB)
            with pytest.raises(ValueError, match=r"high \(1\) must be >= low \(2\)"):
                transport.set_write_buffer_limits(high=1, low=2)
            assert transport.get_write_buffer_size() == 0
            assert transport.get_protocol() is client
            assert not transport.is_closing()
            transport.close()
            assert transport.is_closing()

    run(loop, main())


def test_get_extra_info_keys(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, _, peer = await tls_pair(net, server_context, client_context)
            sslobj = transport.get_extra_info("ssl_object")
            assert isinstance(sslobj, ssl.SSLObject)
            assert sslobj.server_hostname == "localhost"
            assert not sslobj.server_side
            assert transport.get_extra_info("sslcontext") is client_context
            assert peer.transport.get_extra_info("sslcontext") is server_context
            assert transport.get_extra_info("peercert")["subject"] == (
                (("commonName", "localhost"),),
            )
            assert peer.transport.get_extra_info("peercert") is None  # no client certificate
            cipher = transport.get_extra_info("cipher")
            assert cipher == sslobj.cipher() and len(cipher) == 3
            assert transport.get_extra_info("compression") == sslobj.compression()
            # The rest comes from the socket transport underneath.
            sock = transport.get_extra_info("socket")
            assert sock.family == socket.AF_INET
            assert transport.get_extra_info("peername") == peer.transport.get_extra_info("sockname")
            assert transport.get_extra_info("sockname") == sock.getsockname()
            assert transport.get_extra_info("no such key") is None
            assert transport.get_extra_info("no such key", 42) == 42

    run(loop, main())


@pytest.mark.parametrize("size", [1, 16 * KiB + 1, 4 * MiB], ids=["1B", "16KiB+1", "4MiB"])
def test_payloads_echo_byte_for_byte(loop, tls_contexts, size):
    server_context, client_context = tls_contexts
    payload = pattern(size)

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(
                net, server_context, client_context, server_cls=EchoServer
            )
            # Uneven writes: records and reads never line up with them.
            view = memoryview(payload)
            step = 7 * KiB + 3
            for i in range(0, size, step):
                transport.write(view[i : i + step])
            await wait_for_bytes(client, size)
            assert_bytes_equal(client.data, payload)
            assert_bytes_equal(server.data, payload)
            transport.close()
            await client.lost

    run(loop, main(), timeout=30)


def test_writelines_and_many_small_writes(loop, tls_contexts):
    server_context, client_context = tls_contexts
    payload = pattern(300 * KiB)

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            chunks = [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
            transport.writelines(chunks[: len(chunks) // 2])
            for c in chunks[len(chunks) // 2 :]:
                transport.write(bytearray(c))
            await wait_for_bytes(server, len(payload))
            assert_bytes_equal(server.data, payload)
            # And back, in one write larger than any record.
            server.transport.write(payload)
            await wait_for_bytes(client, len(payload))
            assert_bytes_equal(client.data, payload)

    run(loop, main())


def test_buffered_protocol_application(loop, tls_contexts):
    server_context, client_context = tls_contexts
    payload = pattern(2 * MiB)

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(
                net,
                server_context,
                client_context,
                server_cls=lambda: BufferedRecorder(expected=len(payload)),
                client_cls=lambda: BufferedRecorder(expected=len(payload)),
            )
            transport.write(payload)
            while server.nbytes < len(payload):
                await asyncio.sleep(0.001)
            assert_bytes_equal(server.data, payload)
            assert server.overflow == 0
            server.transport.write(payload[::-1])
            while client.nbytes < len(payload):
                await asyncio.sleep(0.001)
            assert_bytes_equal(client.data, payload[::-1])
            assert {"made", "get_buffer", "buffer_updated"} == set(server.events)
            transport.close()
            await server.eof
            await client.lost
            await server.lost
            assert server.events[-1] == "lost" and "eof" in server.events

    run(loop, main())


def test_flow_control_pauses_and_resumes_the_writer(loop, tls_contexts):
    server_context, client_context = tls_contexts
    chunk = pattern(64 * KiB)

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            server.transport.pause_reading()
            transport.set_write_buffer_limits(high=256 * KiB)
            written = 0
            while not client.pauses and written < 256 * MiB:
                transport.write(chunk)
                written += len(chunk)
                if written % (4 * MiB) == 0:
                    await asyncio.sleep(0)
            assert client.pauses, "pause_writing was never called"
            assert client.pauses[0] >= 256 * KiB
            assert transport.get_write_buffer_size() >= 256 * KiB
            assert transport._protocol_paused if hasattr(transport, "_protocol_paused") else True
            assert not client.resumes
            server.transport.resume_reading()
            await client.resumed
            assert client.resumes[0] <= 64 * KiB
            await wait_for_bytes(server, written)
            assert len(server.data) == written
            expected = chunk * (written // len(chunk))
            assert_bytes_equal(server.data, expected)
            assert client.events[:2] == ["made", "pause"]

    run(loop, main(), timeout=50)


def test_pause_reading_holds_data_back(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            server.transport.pause_reading()
            transport.write(b"held back")
            await asyncio.sleep(0.1)
            assert server.data == b""
            server.transport.resume_reading()
            await wait_for_bytes(server, 9)
            assert server.data == b"held back"

    run(loop, main())


def test_close_is_a_tls_shutdown_the_peer_sees_as_eof(loop, tls_contexts):
    server_context, client_context = tls_contexts
    payload = pattern(1 * MiB)

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            transport.write(payload)
            transport.close()  # buffered data is flushed before close_notify
            assert transport.is_closing()
            await server.eof
            assert_bytes_equal(server.data, payload)
            assert await client.lost is None
            assert await server.lost is None
            # The peer's own close_notify ends the shutdown: eof_received on this side too.
            assert client.events == ["made", "eof", "lost"]
            assert server.events[0] == "made" and server.events[-2:] == ["eof", "lost"]
            # Writes after close are dropped silently.
            transport.write(b"late")

    run(loop, main())


def test_close_seen_by_a_plain_ssl_socket_peer(loop, tls_contexts):
    """The peer is a blocking ``ssl`` socket: close() sends close_notify, then FIN."""
    server_context, client_context = tls_contexts
    listener = socket.create_server(("127.0.0.1", 0))
    seen = {}

    def peer():
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:  # a clean TLS EOF (close_notify), no SSLEOFError
                    break
                data += chunk
            seen["data"] = data
            try:
                tls.unwrap()
                seen["unwrapped"] = True
            except (OSError, ssl.SSLError) as exc:  # the peer may already be gone
                seen["unwrapped"] = exc

    thread = threading.Thread(target=peer)
    thread.start()

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client = await net.connect(
                Recorder,
                listener.getsockname(),
                ssl=client_context,
                server_hostname="localhost",
            )
            transport.write(b"goodbye")
            transport.close()
            assert await client.lost is None

    try:
        run(loop, main())
    finally:
        thread.join(10)
        listener.close()
    assert seen["data"] == b"goodbye"


def test_abort_drops_the_connection_at_once(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            transport.write(b"x" * 1000)
            transport.abort()
            assert transport.is_closing()
            assert await client.lost is None
            await server.lost  # None or a reset, as the kernel reports it
            assert "made" in client.events and client.events[-1] == "lost"
            transport.abort()  # twice is harmless

    run(loop, main())


def test_peer_closing_first_delivers_eof_then_lost(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            server.transport.write(b"last words")
            server.transport.close()
            await client.eof
            assert client.data == b"last words"
            assert await client.lost is None
            assert client.events == ["made", "data", "eof", "lost"]

    run(loop, main())


def test_closing_twice_forgets_the_tls_state_so_a_protocol_keeping_its_transport_frees_it(
    loop, tls_contexts, tls_files
):
    server_context, _ = tls_contexts
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(tls_files[0])
    context_ref = weakref.ref(client_context)

    async def main(client_context):
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            server.transport.close()
            await client.lost
            # The application protocol keeps its transport (as most do); the first close()
            # came from the peer's shutdown, this one detaches the transport from the TLS
            # state, as the stdlib's does.
            client.kept = transport
            assert transport.is_closing()
            transport.close()
            return client

    client = run(loop, main(client_context))
    del client_context
    gc.disable()  # freed by reference counting, not by a collection
    try:
        assert context_ref() is None
        assert client.kept.is_closing()
    finally:
        gc.enable()


def test_handshake_timeout(loop, tls_contexts):
    _, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = net.raw_listener()  # accepts (in the kernel), never answers
            with pytest.raises(ConnectionAbortedError) as info:
                await net.connect(
                    Recorder,
                    listener.getsockname(),
                    ssl=client_context,
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.2,
                )
            assert str(info.value) == (
                "SSL handshake is taking longer than 0.2 seconds: aborting the connection"
            )
            assert net.protocols[0].events == []  # the app protocol never saw a connection

    run(loop, main())


def test_bad_handshake_timeouts_are_rejected(loop, tls_contexts):
    _, client_context = tls_contexts

    async def main():
        for kw, name in [
            ({"ssl_handshake_timeout": 0}, "ssl_handshake_timeout"),
            ({"ssl_shutdown_timeout": -1}, "ssl_shutdown_timeout"),
        ]:
            sock_a, sock_b = socket.socketpair()
            with sock_a, sock_b:
                with pytest.raises(ValueError, match=f"{name} should be a positive number"):
                    await loop.create_connection(
                        Recorder, sock=sock_a, ssl=client_context, server_hostname="x", **kw
                    )

    run(loop, main())


def test_client_handshake_with_a_peer_that_sends_garbage(loop, tls_contexts):
    _, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = net.raw_listener()
            listener.setblocking(False)

            async def garbage():
                peer, _ = await loop.sock_accept(listener)
                net.socks.append(peer)
                await loop.sock_sendall(peer, b"HTTP/1.1 400 Bad Request\r\n\r\n" * 10)

            task = asyncio.ensure_future(garbage())
            with pytest.raises(ssl.SSLError):
                await net.connect(
                    Recorder,
                    listener.getsockname(),
                    ssl=client_context,
                    server_hostname="localhost",
                )
            await task
            assert net.protocols[0].events == []

    run(loop, main())


def test_server_drops_a_client_that_sends_garbage(loop, tls_contexts):
    server_context, _ = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            accepting = Accepting()
            server = await net.serve(accepting, ssl=server_context)
            sock = socket.create_connection(net.ep.address(server))
            net.socks.append(sock)
            sock.setblocking(False)
            await loop.sock_sendall(sock, b"\x16\x03\x01\x00\x05hello, this is not TLS" * 20)
            # The server fails the handshake and closes: EOF or a reset, never a hang.
            try:
                while await loop.sock_recv(sock, 65536):
                    pass
            except ConnectionResetError:
                pass
            assert accepting.protocols == [] or accepting.protocols[0].events == []

    run(loop, main())


def test_handshake_failure_reported_to_the_client(loop, tls_contexts):
    server_context, _ = tls_contexts
    untrusting = ssl.create_default_context()  # does not trust the test certificate

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await net.serve(Recorder, ssl=server_context)
            with pytest.raises(ssl.SSLCertVerificationError):
                await net.connect(
                    Recorder, net.ep.address(server), ssl=untrusting, server_hostname="localhost"
                )

    run(loop, main())


def test_start_tls_upgrades_a_plain_connection(loop, tls_contexts):
    server_context, client_context = tls_contexts

    class Upgrading(Recorder):
        def data_received(self, data):
            super().data_received(data)
            if data == b"STARTTLS":
                self.transport.write(b"OK")
                self.upgrade = asyncio.ensure_future(
                    loop.start_tls(self.transport, self, server_context, server_side=True)
                )

    async def main():
        async with Session(TcpEndpoint()) as net:
            accepting = Accepting(Upgrading)
            server = await net.serve(accepting)
            transport, client = await net.connect(Recorder, net.ep.address(server))
            peer = await accepting.next()
            transport.write(b"STARTTLS")
            await wait_for_bytes(client, 2)
            assert client.data == b"OK"
            assert transport.get_extra_info("ssl_object") is None
            tls_transport = await loop.start_tls(
                transport, client, client_context, server_hostname="localhost"
            )
            server_tls = await peer.upgrade
            assert isinstance(tls_transport, asyncio.Transport)
            assert tls_transport.get_protocol() is client
            assert tls_transport.get_extra_info("ssl_object") is not None
            assert server_tls.get_extra_info("ssl_object").server_side
            assert tls_transport.get_extra_info("peercert")["subject"] == (
                (("commonName", "localhost"),),
            )
            tls_transport.write(b"secret" * 10000)
            await wait_for_bytes(peer, 8 + 60000)
            assert peer.data == b"STARTTLS" + b"secret" * 10000
            server_tls.write(b"reply")
            await wait_for_bytes(client, 7)
            assert client.data == b"OKreply"
            # connection_made is not called again by start_tls.
            assert client.events.count("made") == 1
            tls_transport.close()
            assert await client.lost is None
            await peer.eof

    run(loop, main())


def test_start_tls_on_a_transport_closed_just_before_returns_none(loop, tls_contexts):
    # The connection is lost while start_tls waits: the stdlib returns the TLS
    # protocol's app transport as it is after the wait, None (aiohttp relies on it).
    _, client_context = tls_contexts

    async def main():
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            transport, _ = await loop.create_connection(asyncio.Protocol, *listener.getsockname())
        transport.close()
        upgraded = await loop.start_tls(
            transport, asyncio.Protocol(), client_context, server_hostname="localhost"
        )
        assert upgraded is None

    run(loop, main())


def test_start_tls_over_tls(loop, tls_contexts):
    """TLS inside TLS: start_tls on a TLS transport."""
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(net, server_context, client_context)
            up_server = asyncio.ensure_future(
                loop.start_tls(server.transport, server, server_context, server_side=True)
            )
            inner = await loop.start_tls(
                transport, client, client_context, server_hostname="localhost"
            )
            inner_server = await up_server
            inner.write(pattern(200 * KiB))
            await wait_for_bytes(server, 200 * KiB)
            assert_bytes_equal(server.data, pattern(200 * KiB))
            inner_server.write(b"inner")
            await wait_for_bytes(client, 5)
            assert client.data == b"inner"
            inner.close()
            await client.lost

    run(loop, main())


def test_streams_over_tls(loop, tls_contexts):
    server_context, client_context = tls_contexts
    payload = pattern(3 * MiB)

    async def handle(reader, writer):
        data = await reader.readexactly(len(payload))
        writer.write(data)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await net.start_server(handle, ssl=server_context)
            reader, writer = await net.open_connection(
                net.ep.address(server), ssl=client_context, server_hostname="localhost"
            )
            writer.write(payload)
            await writer.drain()
            assert_bytes_equal(await reader.read(), payload)
            writer.close()
            await writer.wait_closed()

    run(loop, main(), timeout=30)


def test_connection_lost_reports_an_exception_from_data_received(
    loop, tls_contexts, expect_loop_errors
):
    server_context, client_context = tls_contexts

    class Failing(Recorder):
        def data_received(self, data):
            super().data_received(data)
            raise RuntimeError("boom")

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, client, server = await tls_pair(
                net, server_context, client_context, server_cls=Failing
            )
            transport.write(b"trigger")
            exc = await server.lost
            assert isinstance(exc, RuntimeError) and str(exc) == "boom"
            await client.lost

    run(loop, main())
    messages = [c["message"] for c in expect_loop_errors]
    assert "Fatal error on SSL protocol" in messages
