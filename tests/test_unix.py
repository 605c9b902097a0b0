"""Unix stream sockets: create_unix_connection / create_unix_server and the Unix streams.

Every test runs on the stdlib loop and on ferroloop (the ``loop`` fixture).  Socket files
live in a short directory under the system temp dir (pytest's ``tmp_path`` can exceed the
108-byte AF_UNIX path limit).  Helpers are in ``netutil.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import shutil
import socket
import stat
import sys
import tempfile
import uuid

import pytest
from netutil import (
    ECHO_SIZES,
    Accepting,
    EchoServer,
    KiB,
    MiB,
    Recorder,
    Session,
    UnixEndpoint,
    assert_bytes_equal,
    buffered_echo,
    collapse,
    lifecycle,
    pattern,
    protocol_echo,
    recv_until_eof,
    run,
    streams_echo,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="fl-unix-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir):
    return os.path.join(sock_dir, "server.sock")


@pytest.fixture
def unix(sock_path):
    return UnixEndpoint(sock_path)


def is_socket_file(path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


async def one_round_trip(net, address, message: bytes) -> bytes:
    """Connect to an EchoServer at *address*, send *message* and EOF, return the echo."""
    transport, client = await net.connect(Recorder, address)
    transport.write(message)
    transport.write_eof()
    exc = await client.lost
    assert exc is None
    return bytes(client.data)


# --------------------------------------------------------------------------- echo


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_unix_protocol_echo_returns_every_byte_in_order(loop, unix, size):
    payload = pattern(size)
    client, srv, client_exc, server_exc = run(loop, protocol_echo(unix, payload), timeout=30)
    assert_bytes_equal(client.data, payload)
    assert_bytes_equal(srv.data, payload)
    assert (client_exc, server_exc) == (None, None)
    assert lifecycle(client.events) == ["made", "data", "eof", "lost"]
    assert lifecycle(srv.events) == ["made", "data", "eof", "lost"]


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_unix_buffered_protocol_echo_returns_every_byte_in_order(loop, unix, size):
    payload = pattern(size)
    client, srv, client_exc, server_exc = run(loop, buffered_echo(unix, payload), timeout=30)
    assert client.overflow == 0
    assert_bytes_equal(client.data, payload)
    assert srv.total == size
    assert (client_exc, server_exc) == (None, None)
    assert client.events[0] == "made"
    assert client.events[-2:] == ["eof", "lost"]


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_unix_streams_echo_returns_every_byte_in_order(loop, unix, size):
    payload = pattern(size)
    received, handled, at_eof = run(loop, streams_echo(unix, payload), timeout=30)
    assert_bytes_equal(received, payload)
    assert handled == size
    assert at_eof


def test_two_hundred_concurrent_unix_connections_each_complete_a_round_trip(loop, unix):
    n = 200

    async def main():
        async with Session(unix) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted, backlog=n + 10)
            address = unix.address(server)
            messages = [b"%d:" % i + pattern(10 + i, offset=i) for i in range(n)]
            replies = await asyncio.gather(*(one_round_trip(net, address, m) for m in messages))
            for _ in range(n):
                await (await accepted.next()).lost
        return messages, replies

    messages, replies = run(loop, main(), timeout=30)
    assert replies == messages


# --------------------------------------------------------------------------- transports


def test_unix_transports_are_transport_instances_that_can_write_eof(loop, unix):
    async def main():
        async with Session(unix) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, unix.address(server))
            srv = await accepted.next()
            return [
                (
                    isinstance(tr, asyncio.Transport),
                    tr.can_write_eof(),
                    tr.get_protocol() is protocol,
                    tr.get_write_buffer_limits(),
                )
                for tr, protocol in ((transport, client), (srv.transport, srv))
            ]

    expected = (True, True, True, (16 * KiB, 64 * KiB))
    assert run(loop, main()) == [expected, expected]


def test_unix_peername_and_sockname(loop, unix, sock_path):
    async def main():
        async with Session(unix) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, _ = await net.connect(Recorder, sock_path)
            srv = await accepted.next()
            out = {"server address": unix.address(server)}
            for side, tr in (("client", transport), ("server", srv.transport)):
                sock = tr.get_extra_info("socket")
                out[side] = (
                    tr.get_extra_info("peername"),
                    tr.get_extra_info("sockname"),
                    sock.family,
                    sock.type,
                    stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode),
                )
            return out

    out = run(loop, main())
    assert out["server address"] == sock_path
    # The client socket is unnamed: its own name and the server side's peer name are ''.
    assert out["client"] == (sock_path, "", socket.AF_UNIX, socket.SOCK_STREAM, True)
    assert out["server"] == ("", sock_path, socket.AF_UNIX, socket.SOCK_STREAM, True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract namespace is Linux")
def test_abstract_namespace_path_needs_no_file(loop, sock_dir):
    path = f"\0ferroloop-test-{os.getpid()}-{uuid.uuid4().hex}"
    ep = UnixEndpoint(path)

    async def main():
        async with Session(ep) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, path)
            srv = await accepted.next()
            names = (
                ep.address(server),
                transport.get_extra_info("peername"),
                srv.transport.get_extra_info("sockname"),
            )
            transport.write(b"abstract")
            transport.write_eof()
            await client.lost
            await srv.lost
        return names, bytes(client.data)

    names, echoed = run(loop, main())
    # Python reports abstract addresses as bytes, leading NUL included.
    assert names == (path.encode(), path.encode(), path.encode())
    assert echoed == b"abstract"
    assert os.listdir(sock_dir) == []  # nothing was created on the file system


@pytest.mark.parametrize("name", ["path", "abstract", "named-client"])
def test_unix_extra_info_first_asked_after_close_is_the_constructor_time_info(loop, sock_dir, name):
    """Nothing asked while connected: once both transports are closed, their names are
    still the ones of construction time (str paths, '' for an unnamed client, bytes for
    abstract names), in the stdlib's key order."""
    if name == "abstract" and not sys.platform.startswith("linux"):
        pytest.skip("abstract namespace is Linux")
    if name == "abstract":
        path = f"\0ferroloop-test-{os.getpid()}-{uuid.uuid4().hex}"
        expected_server = path.encode()
    else:
        path = os.path.join(sock_dir, "server.sock")
        expected_server = path
    ep = UnixEndpoint(path)

    async def main():
        loop = asyncio.get_running_loop()
        async with Session(ep) as net:
            accepted = Accepting()
            await net.serve(accepted)
            if name == "named-client":
                client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client_sock.bind(os.path.join(sock_dir, "client.sock"))
                client_sock.connect(path)
                client_sock.setblocking(False)
                transport, client = await loop.create_unix_connection(Recorder, sock=client_sock)
            else:
                transport, client = await net.connect(Recorder, path)
            srv = await accepted.next()
            transport.close()
            await client.lost
            await srv.lost
            return [
                (list(tr._extra), tr.get_extra_info("peername"), tr.get_extra_info("sockname"))
                for tr in (transport, srv.transport)
            ]

    client_name = os.path.join(sock_dir, "client.sock") if name == "named-client" else ""
    assert run(loop, main()) == [
        (["socket", "sockname", "peername"], expected_server, client_name),
        (["peername", "socket", "sockname"], client_name, expected_server),
    ]


def test_create_unix_server_removes_a_stale_socket_file(loop, unix, sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(sock_path)  # closed without unlinking: a stale socket file remains
    assert is_socket_file(sock_path)

    async def main():
        async with Session(unix) as net:
            await net.serve(Accepting(EchoServer))
            return await one_round_trip(net, sock_path, b"fresh server")

    assert run(loop, main()) == b"fresh server"


def test_create_unix_server_replaces_the_file_of_a_live_server(loop, unix, sock_path):
    """The stdlib removes any socket file at the path, even one a server still listens on."""

    async def main():
        async with Session(unix) as net:
            first = Accepting(EchoServer)
            second = Accepting(EchoServer)
            await net.serve(first)
            await net.serve(second)  # no EADDRINUSE: the first server's file is unlinked
            echoed = await one_round_trip(net, sock_path, b"who answers?")
            return echoed, len(first.protocols), len(second.protocols)

    assert run(loop, main()) == (b"who answers?", 0, 1)


def test_create_unix_server_on_a_regular_file_raises_eaddrinuse(loop, unix, sock_path):
    with open(sock_path, "wb") as f:
        f.write(b"not a socket")

    async def main():
        with pytest.raises(OSError) as info:
            await loop.create_unix_server(asyncio.Protocol, sock_path)
        return info.value

    exc = run(loop, main())
    assert exc.errno == errno.EADDRINUSE
    with open(sock_path, "rb") as f:
        assert f.read() == b"not a socket"  # left alone


def test_unix_paths_may_be_path_objects(loop, sock_path):
    path = pathlib.Path(sock_path)
    ep = UnixEndpoint(path)

    async def main():
        async with Session(ep) as net:
            server = await net.serve(Accepting(EchoServer))
            reader, writer = await asyncio.open_unix_connection(path)
            net.writers.append(writer)
            writer.write(b"streams")
            writer.write_eof()
            streamed = await reader.read()
            writer.close()
            await writer.wait_closed()
            return ep.address(server), await one_round_trip(net, path, b"path"), streamed

    assert run(loop, main()) == (sock_path, b"path", b"streams")


@pytest.mark.parametrize(
    "file_state, exc_type",
    [("socket file, nobody listening", ConnectionRefusedError), ("missing", FileNotFoundError)],
    ids=["refused", "missing"],
)
def test_unix_connection_errors(loop, sock_path, file_state, exc_type):
    made = []

    async def main():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            if file_state != "missing":
                bound.bind(sock_path)  # bound, not listening
            with pytest.raises(exc_type) as info:
                await loop.create_unix_connection(lambda: made.append(1), sock_path)
            with pytest.raises(exc_type):
                await asyncio.open_unix_connection(sock_path)
        return info.value

    exc = run(loop, main())
    assert exc.errno == (errno.ECONNREFUSED if exc_type is ConnectionRefusedError else errno.ENOENT)
    assert made == []


def test_create_unix_server_and_connection_take_existing_sockets(loop, sock_path):
    async def main():
        async with Session(UnixEndpoint(sock_path)) as net:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            net.socks.append(listener)
            listener.bind(sock_path)
            accepted = Accepting(EchoServer)
            server = await loop.create_unix_server(net.track(accepted), sock=listener)
            net.servers.append(server)
            client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            net.socks.append(client_sock)
            client_sock.connect(sock_path)
            transport, client = await loop.create_unix_connection(Recorder, sock=client_sock)
            transport.write(b"via sock=")
            transport.write_eof()
            await client.lost
            await (await accepted.next()).lost
            return bytes(client.data), client_sock.fileno()

    assert run(loop, main()) == (b"via sock=", -1)


def test_create_unix_server_rejects_a_non_unix_socket(loop):
    async def main():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_sock:
            with pytest.raises(ValueError, match="A UNIX Domain Stream Socket was expected"):
                await loop.create_unix_server(asyncio.Protocol, sock=tcp_sock)
            with pytest.raises(ValueError, match="A UNIX Domain Stream Socket was expected"):
                await loop.create_unix_connection(asyncio.Protocol, sock=tcp_sock)

    run(loop, main())


def test_unix_server_close_and_the_socket_file(loop, unix, sock_path):
    async def main():
        async with Session(unix) as net:
            server = await net.serve(Accepting())
            exists_while_serving = is_socket_file(sock_path)
            server.close()
            await server.wait_closed()
            return exists_while_serving, is_socket_file(sock_path)

    exists_while_serving, exists_after_close = run(loop, main())
    assert exists_while_serving
    # 3.13 added cleanup_socket=True (the default): close() unlinks the file.
    assert exists_after_close == (sys.version_info < (3, 13))


# --------------------------------------------------------------------------- half-close, close


def test_unix_eof_received_returning_true_keeps_transport_open_for_writing_back(loop, unix):
    async def main():
        async with Session(unix) as net:
            accepted = Accepting(Recorder, eof_result=True)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, unix.address(server))
            transport.write(b"request")
            transport.write_eof()
            srv = await accepted.next()
            await srv.eof
            await asyncio.sleep(0.02)
            still_open = not srv.transport.is_closing()
            srv.transport.write(b"reply after EOF")
            srv.transport.close()
            return still_open, client, srv, await client.lost, await srv.lost

    still_open, client, srv, client_exc, server_exc = run(loop, main())
    assert still_open
    assert bytes(srv.data) == b"request"
    assert bytes(client.data) == b"reply after EOF"
    assert (client_exc, server_exc) == (None, None)
    assert collapse(client.events) == ["made", "data", "eof", "lost"]
    assert collapse(srv.events) == ["made", "data", "eof", "lost"]


def test_unix_eof_received_returning_none_closes_transport(loop, unix):
    async def main():
        async with Session(unix) as net:
            accepted = Accepting(Recorder)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, unix.address(server))
            transport.write(b"ping")
            transport.write_eof()
            srv = await accepted.next()
            return client, srv, await srv.lost, await client.lost

    client, srv, server_exc, client_exc = run(loop, main())
    assert (server_exc, client_exc) == (None, None)
    assert srv.events == ["made", "data", "eof", "lost"]
    assert client.events == ["made", "eof", "lost"]


def test_unix_close_flushes_buffered_data_then_calls_connection_lost_none(loop, unix):
    payload = pattern(8 * MiB)

    async def main():
        async with Session(unix) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(payload)
            buffered = transport.get_write_buffer_size()
            transport.close()
            await asyncio.sleep(0.05)
            events_before_reading = list(client.events)
            received = await recv_until_eof(peer)
            return buffered, events_before_reading, received, await client.lost

    buffered, events_before_reading, received, exc = run(loop, main())
    assert buffered > 0, "precondition: the kernel did not take 8 MiB at once"
    assert "lost" not in events_before_reading
    assert_bytes_equal(received, payload)
    assert exc is None


def test_unix_pause_writing_past_high_water_and_resume_writing_at_low_water(loop, unix):
    # high is larger than what one flush moves into the kernel, so the buffer drains in
    # several steps and resume_writing() must wait for the one that reaches low.
    high, low, chunk = 1 * MiB, 256 * KiB, 64 * KiB
    source = pattern(32 * MiB)

    async def main():
        async with Session(unix) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.set_write_buffer_limits(high=high, low=low)
            written = 0
            while not client.pauses:
                assert written + chunk <= len(source), "pause_writing() was never called"
                transport.write(source[written : written + chunk])
                written += chunk
            await asyncio.sleep(0.05)
            paused_events = list(client.events)
            received = bytearray()
            while len(received) < written:
                chunk_in = await loop.sock_recv(peer, min(32 * KiB, written - len(received)))
                assert chunk_in, "premature EOF"
                received += chunk_in
            await client.resumed
            return written, paused_events, received, list(client.events), client

    written, paused_events, received, events, client = run(loop, main())
    assert paused_events == ["made", "pause"]
    assert high < client.pauses[0] <= high + chunk
    assert len(client.resumes) == 1 and client.resumes[0] <= low
    assert events == ["made", "pause", "resume"]
    assert_bytes_equal(received, source[:written])


def test_unix_peer_closing_with_unread_data_gives_connection_reset_error(loop, unix):
    async def main():
        async with Session(unix) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(b"never read")
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            peer.close()  # AF_UNIX: closing with unread data resets the connection
            return await client.lost, client.events

    exc, events = run(loop, main())
    assert isinstance(exc, ConnectionResetError)
    assert exc.errno == errno.ECONNRESET
    assert events == ["made", "lost"]


def test_unix_protocol_callbacks_run_in_order_exactly_once(loop, unix):
    async def main():
        async with Session(unix) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, unix.address(server))
            made_before_return = list(client.events)
            for part in (b"one ", b"two ", b"three"):
                transport.write(part)
                await asyncio.sleep(0.005)
            transport.write_eof()
            await client.lost
            srv = await accepted.next()
            await srv.lost
            await asyncio.sleep(0.02)
            return made_before_return, client, srv

    made_before_return, client, srv = run(loop, main())
    assert made_before_return == ["made"]
    for protocol in (client, srv):
        assert collapse(protocol.events) == ["made", "data", "eof", "lost"]
        for event in ("made", "eof", "lost"):
            assert protocol.events.count(event) == 1
        assert protocol.chunk_types == {bytes}
        assert bytes(protocol.data) == b"one two three"
