"""Servers and connection set-up: the Server object, create_server/create_connection and
their Unix, accepted-socket, TLS and sendfile siblings.

Every test runs on the stdlib loop and on ferroloop (the ``loop`` fixture).  Data transfer
itself (echo, flow control, resets) is tested in test_tcp.py and test_unix.py; here it is
what happens around it: argument checking, address resolution and binding, the accept
loop, and the Server's bookkeeping of its connections.

Where ferroloop follows a newer stdlib than the running one (``close_clients``,
``keep_alive``, ``all_errors``, ``cleanup_socket``, 3.12's ``wait_closed``), the
``[asyncio]`` case runs only on the Python versions whose stdlib has the feature.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import os
import re
import socket
import ssl
import sys
import traceback
import warnings
from asyncio import constants

import pytest
from netutil import Accepting, Recorder, Session, TcpEndpoint, fill_until_buffered, run

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"


def stdlib_since(impl, version, feature):
    """Skip the [asyncio] case on Pythons whose stdlib loop lacks ``feature``."""
    if impl == "asyncio" and sys.version_info < version:
        dotted = ".".join(map(str, version))
        pytest.skip(f"the stdlib loop has {feature} from Python {dotted} on")


def refused_port():
    """A loopback port nothing listens on (bound, then closed at once)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def fake_getaddrinfo(loop, infos):
    """Make ``loop.getaddrinfo`` answer ``infos`` (``(family, sockaddr)`` pairs) for any name."""

    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):
        return [(af, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sa) for af, sa in infos]

    loop.getaddrinfo = getaddrinfo


async def connect_raw(net, address):
    """A plain non-blocking TCP socket connected to ``address``, closed with ``net``."""
    sock = socket.socket()
    net.socks.append(sock)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def serve(net, factory=asyncio.Protocol, host=HOST, port=0, **kwargs):
    """``loop.create_server`` whose server and accepted transports ``net`` cleans up."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(net.track(factory), host, port, **kwargs)
    net.servers.append(server)
    return server


def address_of(server):
    return server.sockets[0].getsockname()


# --------------------------------------------------------------------------- Server object


def test_server_sockets_are_transport_sockets_of_its_listeners(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            (sock,) = server.sockets
            assert isinstance(sock, asyncio.trsock.TransportSocket)
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert sock.getsockname()[0] == HOST
            assert repr(server) == f"<Server sockets={server.sockets!r}>"
            assert server.get_loop() is loop

    run(loop, main())


def test_server_close_closes_listeners_and_stops_serving(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            address = address_of(server)
            assert server.is_serving()
            server.close()
            assert not server.is_serving()
            assert server.sockets == ()
            server.close()  # idempotent
            with pytest.raises(ConnectionRefusedError):
                await connect_raw(net, address)

    run(loop, main())


def test_server_created_without_start_serving_refuses_until_started(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted, start_serving=False)
            assert not server.is_serving()
            with pytest.raises(ConnectionRefusedError):  # bound, not listening yet
                await connect_raw(net, address_of(server))
            await server.start_serving()
            await server.start_serving()  # idempotent
            assert server.is_serving()
            client = await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            assert protocol.transport.get_extra_info("peername") == client.getsockname()

    run(loop, main())


def test_closing_the_server_leaves_accepted_connections_open(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            client = await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            server.close()
            await loop.sock_sendall(client, b"still here")
            while protocol.data != b"still here":
                await asyncio.sleep(0.001)
            assert not protocol.transport.is_closing()

    run(loop, main())


def test_wait_closed_on_an_open_server_waits_for_close(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            waiter = asyncio.ensure_future(server.wait_closed())
            await asyncio.sleep(0.01)
            assert not waiter.done()
            server.close()
            await waiter
            await server.wait_closed()  # returns at once from now on

    run(loop, main())


@pytest.mark.skipif(
    sys.version_info < (3, 12, 1), reason="wait_closed() waits for connections from 3.12.1"
)
def test_wait_closed_after_close_waits_for_the_last_connection(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            server.close()
            waiter = asyncio.ensure_future(server.wait_closed())
            await asyncio.sleep(0.01)
            assert not waiter.done()
            protocol.transport.close()
            await waiter

    run(loop, main())


@pytest.mark.skipif(
    sys.version_info >= (3, 12, 1), reason="wait_closed() waits for connections from 3.12.1"
)
def test_wait_closed_after_close_returns_at_once_before_3_12_1(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            server.close()
            await asyncio.wait_for(server.wait_closed(), 1)
            protocol.transport.close()

    run(loop, main())


def test_server_as_async_context_manager_closes_on_exit(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            async with server as entered:
                assert entered is server
                assert server.is_serving()
            assert server.sockets == ()

    run(loop, main())


def test_serve_forever_serves_until_cancelled_then_closes_the_server(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net, start_serving=False)
            task = asyncio.ensure_future(server.serve_forever())
            await asyncio.sleep(0)
            assert server.is_serving()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not server.is_serving()
            assert server.sockets == ()
            with pytest.raises(RuntimeError, match="is closed$"):
                await server.serve_forever()

    run(loop, main())


def test_serve_forever_twice_raises_and_close_ends_the_first(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            task = asyncio.ensure_future(server.serve_forever())
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="is already being awaited on serve_forever"):
                await server.serve_forever()
            server.close()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(loop, main())


def test_close_clients_closes_connections_after_flushing(loop, impl):
    stdlib_since(impl, (3, 13), "Server.close_clients()")

    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            client = await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            sent = fill_until_buffered(protocol.transport, b"x" * 65536)
            server.close_clients()
            assert protocol.transport.is_closing()
            await asyncio.sleep(0.01)
            assert not protocol.lost.done()  # still flushing to a peer that does not read
            received = 0
            while chunk := await loop.sock_recv(client, 1 << 20):
                received += len(chunk)
            assert received == len(sent)
            assert await protocol.lost is None

    run(loop, main())


def test_abort_clients_drops_connections_without_flushing(loop, impl):
    stdlib_since(impl, (3, 13), "Server.abort_clients()")

    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            await connect_raw(net, address_of(server))
            protocol = await accepted.next()
            fill_until_buffered(protocol.transport, b"x" * 65536)
            server.close()
            waiter = asyncio.ensure_future(server.wait_closed())
            server.abort_clients()
            assert await protocol.lost is None
            await waiter

    run(loop, main())


def test_close_clients_reaches_the_connections_still_open_and_no_other(loop, impl):
    stdlib_since(impl, (3, 13), "Server.close_clients()")

    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted)
            clients = [await connect_raw(net, address_of(server)) for _ in range(3)]
            protocols = [await accepted.next() for _ in clients]
            clients[0].close()  # the first connection ends on its own
            assert await protocols[0].lost is None
            server.close_clients()
            assert all(p.transport.is_closing() for p in protocols[1:])
            for protocol in protocols[1:]:
                assert await protocol.lost is None
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)

    run(loop, main())


@pytest.mark.ferroloop_only("ferroloop's own connection set")
def test_a_servers_connection_set_takes_only_socket_transports(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        try:
            with pytest.raises(TypeError, match="socket transports"):
                server._clients.add(object())
            assert len(server._clients) == 0
        finally:
            server.close()

    run(loop, main())


@pytest.mark.ferroloop_only("ferroloop's own connection set")
def test_a_transport_freed_while_in_a_connection_set_leaves_it(loop):
    from ferroloop._ferroloop import ClientSet

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net)
            clients = ClientSet()
            transport, protocol = await loop.create_connection(Recorder, *address_of(server))
            clients.add(transport)
            assert transport in clients and clients.copy() == [transport]
            transport.abort()
            await protocol.lost
            del transport, protocol
            gc.collect()
            return clients

    clients = run(loop, main())
    assert len(clients) == 0
    assert clients.copy() == []


# --------------------------------------------------------------------------- accept loop


class FlakyListener(socket.socket):
    """A TCP socket bound to loopback whose next ``failures`` accept() calls fail."""

    def __init__(self, error, failures=1):
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.error = error
        self.failures = failures
        self.bind((HOST, 0))

    def accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, os.strerror(self.error))
        return super().accept()


def test_accept_out_of_file_descriptors_reports_and_retries_later(
    loop, expect_loop_errors, monkeypatch
):
    monkeypatch.setattr(constants, "ACCEPT_RETRY_DELAY", 0.05)

    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = FlakyListener(errno.EMFILE)
            accepted = Accepting()
            server = await serve(net, accepted, host=None, port=None, sock=listener)
            await connect_raw(net, listener.getsockname())
            await accepted.next()
            await asyncio.sleep(0.1)  # past the retry, which watches the listener again
            assert server.is_serving()
            await connect_raw(net, listener.getsockname())
            await accepted.next()
        (context,) = expect_loop_errors
        assert context["message"] == "socket.accept() out of system resource"
        assert context["exception"].errno == errno.EMFILE
        assert isinstance(context["socket"], asyncio.trsock.TransportSocket)

    run(loop, main())


@pytest.mark.ferroloop_only("the stdlib loop reports a lasting shortage once per backlog slot")
def test_lasting_accept_resource_shortage_is_reported_once_per_retry(
    loop, expect_loop_errors, monkeypatch
):
    monkeypatch.setattr(constants, "ACCEPT_RETRY_DELAY", 0.05)

    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = FlakyListener(errno.EMFILE, failures=10**9)
            accepted = Accepting()
            await serve(net, accepted, host=None, port=None, sock=listener, backlog=100)
            await connect_raw(net, listener.getsockname())
            await asyncio.sleep(0.12)  # the first attempt and two retries
            assert 2 <= len(expect_loop_errors) <= 4
            listener.failures = 0
            await accepted.next()  # accepted by the next retry

    run(loop, main())


@pytest.mark.ferroloop_only("the stdlib loop re-arms the closed listener and logs the error")
def test_server_closed_while_accepting_is_paused_stays_closed(
    loop, expect_loop_errors, monkeypatch
):
    monkeypatch.setattr(constants, "ACCEPT_RETRY_DELAY", 0.02)

    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = FlakyListener(errno.ENFILE)
            server = await serve(net, host=None, port=None, sock=listener)
            await connect_raw(net, listener.getsockname())
            while not expect_loop_errors:
                await asyncio.sleep(0.001)
            server.close()
            await asyncio.sleep(0.1)  # well past the retry
        assert [c["message"] for c in expect_loop_errors] == [
            "socket.accept() out of system resource"
        ]

    run(loop, main())


def test_accept_error_other_than_resources_goes_to_the_exception_handler(loop, expect_loop_errors):
    async def main():
        async with Session(TcpEndpoint()) as net:
            listener = FlakyListener(errno.EPERM)
            accepted = Accepting()
            await serve(net, accepted, host=None, port=None, sock=listener)
            await connect_raw(net, listener.getsockname())
            await accepted.next()  # still readable: the next attempt accepts it
        (context,) = expect_loop_errors
        assert isinstance(context["exception"], PermissionError)

    run(loop, main())


def test_accepts_every_pending_connection_with_its_peername(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            server = await serve(net, accepted, backlog=4)
            clients = [await connect_raw(net, address_of(server)) for _ in range(10)]
            protocols = [await accepted.next() for _ in clients]
            peers = {p.transport.get_extra_info("peername") for p in protocols}
            assert peers == {c.getsockname() for c in clients}

    run(loop, main())


def _failing_factory():
    raise RuntimeError("no protocol for you")


def test_protocol_factory_error_is_reported_only_in_debug_mode(loop, expect_loop_errors):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net, _failing_factory)
            for debug in (False, True):
                loop.set_debug(debug)
                await connect_raw(net, address_of(server))
                await asyncio.sleep(0.05)
            loop.set_debug(False)

    with warnings.catch_warnings():
        # The stdlib loop leaks the accepted sockets (see the next test); in debug mode
        # the reported exception's traceback (held by the log capture too) keeps one
        # alive: clearing the frames releases it here rather than in a later test.
        warnings.simplefilter("ignore", ResourceWarning)
        run(loop, main())
        reports = [(c["message"], str(c["exception"])) for c in expect_loop_errors]
        for context in expect_loop_errors:
            traceback.clear_frames(context["exception"].__traceback__)
        gc.collect()
    assert reports == [
        ("Error on transport creation for incoming connection", "no protocol for you")
    ]


@pytest.mark.ferroloop_only("the stdlib loop leaves the accepted socket to the GC")
@pytest.mark.parametrize("debug", [False, True], ids=["release", "debug"])
def test_protocol_factory_error_closes_the_accepted_connection(loop, debug, expect_loop_errors):
    async def main():
        async with Session(TcpEndpoint()) as net:
            loop.set_debug(debug)
            server = await serve(net, _failing_factory)
            client = await connect_raw(net, address_of(server))
            assert await loop.sock_recv(client, 10) == b""

    run(loop, main())


# --------------------------------------------------------------------------- create_server


def test_create_server_argument_errors(loop):
    async def main():
        create = loop.create_server
        with pytest.raises(TypeError, match="^ssl argument must be an SSLContext or None$"):
            await create(asyncio.Protocol, HOST, 0, ssl=True)
        with pytest.raises(ValueError, match="^ssl_handshake_timeout is only meaningful with ssl$"):
            await create(asyncio.Protocol, HOST, 0, ssl_handshake_timeout=1)
        with pytest.raises(ValueError, match="^ssl_shutdown_timeout is only meaningful with ssl$"):
            await create(asyncio.Protocol, HOST, 0, ssl_shutdown_timeout=1)
        with pytest.raises(ValueError, match="^Neither host/port nor sock were specified$"):
            await create(asyncio.Protocol)
        with socket.socket() as sock:
            with pytest.raises(
                ValueError, match="^host/port and sock can not be specified at the same time$"
            ):
                await create(asyncio.Protocol, HOST, 0, sock=sock)
        with socket.socket(type=socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError, match="^A Stream Socket was expected, got <socket"):
                await create(asyncio.Protocol, sock=sock)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with context.wrap_socket(socket.socket(), server_side=True) as sock:
            with pytest.raises(TypeError, match="^Socket cannot be of type SSLSocket$"):
                await create(asyncio.Protocol, sock=sock)

    run(loop, main())


def test_create_server_binds_each_distinct_address_once(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net, host=[HOST, HOST, "127.0.0.2"])
            names = sorted(sock.getsockname()[0] for sock in server.sockets)
            assert names == [HOST, "127.0.0.2"]

    run(loop, main())


def test_create_server_empty_host_means_every_interface(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net, host="", family=socket.AF_INET)
            assert [sock.getsockname()[0] for sock in server.sockets] == ["0.0.0.0"]

    run(loop, main())


def test_create_server_bind_error_names_the_address(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            port = address_of(await serve(net))[1]
            with pytest.raises(OSError) as info:
                await serve(net, port=port)
            assert info.value.errno == errno.EADDRINUSE
            assert info.value.strerror.startswith(
                f"error while attempting to bind on address {(HOST, port)!r}: "
            )
            assert info.value.strerror.endswith("address already in use")

    run(loop, main())


def test_create_server_failure_closes_the_sockets_it_bound(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            with socket.socket() as blocker:
                blocker.bind(("127.0.0.2", 0))
                blocker.listen()
                port = blocker.getsockname()[1]
                with pytest.raises(OSError, match="address already in use"):
                    await serve(net, host=[HOST, "127.0.0.2"], port=port)
            # Nothing of the failed server holds HOST:port (the probe has no SO_REUSEADDR).
            with socket.socket() as probe:
                probe.bind((HOST, port))

    run(loop, main())


def test_create_server_reuse_port_lets_two_servers_share_a_port(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            port = address_of(await serve(net, reuse_port=True))[1]
            second = await serve(net, port=port, reuse_port=True)
            assert address_of(second) == (HOST, port)

    run(loop, main())


@pytest.mark.parametrize("reuse_address", [None, True, False])
def test_create_server_reuse_address_defaults_to_on(loop, reuse_address):
    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await serve(net, reuse_address=reuse_address)
            value = server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(value) == (reuse_address is not False)

    run(loop, main())


def test_create_server_keep_alive_sets_so_keepalive(loop, impl):
    stdlib_since(impl, (3, 13), "create_server(keep_alive=)")

    async def main():
        async with Session(TcpEndpoint()) as net:
            plain = await serve(net)
            kept = await serve(net, keep_alive=True)
            assert not plain.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert kept.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)

    run(loop, main())


def test_create_server_ipv6_listener_is_ipv6_only(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            try:
                server = await serve(net, host="::1")
            except OSError as exc:
                pytest.skip(f"no IPv6 loopback: {exc}")
            (sock,) = server.sockets
            assert sock.family == socket.AF_INET6
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)

    run(loop, main())


def test_create_server_on_a_given_socket_owns_it(loop):
    async def main():
        sock = socket.socket()
        sock.bind((HOST, 0))
        server = await loop.create_server(asyncio.Protocol, sock=sock)
        assert sock.gettimeout() == 0  # made non-blocking
        assert address_of(server) == sock.getsockname()
        server.close()
        assert sock.fileno() == -1

    run(loop, main())


def test_create_server_with_nothing_resolved_raises(loop):
    fake_getaddrinfo(loop, [])

    async def main():
        with pytest.raises(
            OSError, match=r"^getaddrinfo\('example\.invalid'\) returned empty list$"
        ):
            await loop.create_server(asyncio.Protocol, "example.invalid", 80)

    run(loop, main())


# --------------------------------------------------------------------------- create_connection


def test_create_connection_argument_errors(loop):
    context = ssl.create_default_context()

    async def main():
        connect = loop.create_connection
        with pytest.raises(ValueError, match="^server_hostname is only meaningful with ssl$"):
            await connect(asyncio.Protocol, HOST, 1, server_hostname="x")
        with pytest.raises(
            ValueError, match="^You must set server_hostname when using ssl without a host$"
        ):
            await connect(asyncio.Protocol, port=1, ssl=context)
        with pytest.raises(ValueError, match="^ssl_handshake_timeout is only meaningful with ssl$"):
            await connect(asyncio.Protocol, HOST, 1, ssl_handshake_timeout=1)
        with pytest.raises(ValueError, match="^ssl_shutdown_timeout is only meaningful with ssl$"):
            await connect(asyncio.Protocol, HOST, 1, ssl_shutdown_timeout=1)
        with pytest.raises(
            ValueError, match="^host and port was not specified and no sock specified$"
        ):
            await connect(asyncio.Protocol)
        with socket.socket() as sock:
            with pytest.raises(
                ValueError, match="^host/port and sock can not be specified at the same time$"
            ):
                await connect(asyncio.Protocol, HOST, 1, sock=sock)
        with socket.socket(type=socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError, match="^A Stream Socket was expected, got <socket"):
                await connect(asyncio.Protocol, sock=sock)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with server_context.wrap_socket(socket.socket(), server_side=True) as sock:
            with pytest.raises(TypeError, match="^Socket cannot be of type SSLSocket$"):
                await connect(asyncio.Protocol, sock=sock)

    run(loop, main())


@pytest.mark.parametrize("delay", [None, 0.01], ids=["in-turn", "happy-eyeballs"])
def test_create_connection_tries_every_resolved_address(loop, delay):
    async def main():
        async with Session(TcpEndpoint()) as net:
            accepted = Accepting()
            live = address_of(await serve(net, accepted))
            dead = (HOST, refused_port())
            fake_getaddrinfo(loop, [(socket.AF_INET, dead), (socket.AF_INET, live)])
            transport, _ = await net.connect(
                Recorder, ("example.invalid", 80), happy_eyeballs_delay=delay
            )
            assert transport.get_extra_info("peername") == live
            await accepted.next()

    run(loop, main())


def test_create_connection_combines_different_errors(loop):
    dead = [(HOST, refused_port()), (HOST, refused_port())]
    fake_getaddrinfo(loop, [(socket.AF_INET, sa) for sa in dead])

    async def main():
        with pytest.raises(OSError) as info:
            await loop.create_connection(asyncio.Protocol, "example.invalid", 80)
        assert type(info.value) is OSError
        message = str(info.value)
        assert message.startswith("Multiple exceptions: ")
        assert all(str(sa) in message for sa in dead)

    run(loop, main())


def test_create_connection_raises_the_error_itself_when_all_are_alike(loop):
    dead = (HOST, refused_port())
    fake_getaddrinfo(loop, [(socket.AF_INET, dead), (socket.AF_INET, dead)])

    async def main():
        with pytest.raises(
            ConnectionRefusedError, match=re.escape(f"Connect call failed {dead!r}")
        ):
            await loop.create_connection(asyncio.Protocol, "example.invalid", 80)

    run(loop, main())


def test_create_connection_all_errors_raises_an_exception_group(loop, impl):
    stdlib_since(impl, (3, 12), "create_connection(all_errors=)")
    fake_getaddrinfo(loop, [(socket.AF_INET, (HOST, refused_port())) for _ in range(2)])

    async def main():
        with pytest.raises(ExceptionGroup, match="^create_connection failed") as info:
            await loop.create_connection(asyncio.Protocol, "example.invalid", 80, all_errors=True)
        assert [type(e) for e in info.value.exceptions] == [ConnectionRefusedError] * 2

    run(loop, main())


@pytest.mark.parametrize(
    ("interleave", "order"),
    [(None, "6a 6b 4a 4b"), (1, "6a 4a 6b 4b"), (2, "6a 6b 4a 4b")],
    ids=["none", "one", "two"],
)
def test_create_connection_interleave_alternates_families(loop, interleave, order):
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 sockets")
    addresses = {
        "6a": (socket.AF_INET6, ("::1", 1, 0, 0)),
        "6b": (socket.AF_INET6, ("::1", 2, 0, 0)),
        "4a": (socket.AF_INET, (HOST, 3)),
        "4b": (socket.AF_INET, (HOST, 4)),
    }
    fake_getaddrinfo(loop, list(addresses.values()))
    tried = []

    async def sock_connect(sock, address):
        tried.append(next(name for name, (_, sa) in addresses.items() if sa == address))
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"refused {address}")

    loop.sock_connect = sock_connect

    async def main():
        with pytest.raises(OSError, match="^Multiple exceptions: "):
            await loop.create_connection(
                asyncio.Protocol, "example.invalid", 80, interleave=interleave
            )

    run(loop, main())
    assert tried == order.split()


def test_create_connection_local_addr_of_another_family_is_an_error(loop):
    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):
        if host == "local.invalid":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (HOST, refused_port()))]

    loop.getaddrinfo = getaddrinfo

    async def main():
        with pytest.raises(OSError, match="^no matching local address with family=.*AF_INET.*"):
            await loop.create_connection(
                asyncio.Protocol, "remote.invalid", 80, local_addr=("local.invalid", 0)
            )

    run(loop, main())


def test_create_connection_with_nothing_resolved_raises(loop):
    fake_getaddrinfo(loop, [])

    async def main():
        with pytest.raises(OSError, match=r"^getaddrinfo\(\) returned empty list$"):
            await loop.create_connection(asyncio.Protocol, "example.invalid", 80)

    run(loop, main())


def test_connect_accepted_socket_argument_errors(loop):
    async def main():
        with socket.socket(type=socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError, match="^A Stream Socket was expected, got <socket"):
                await loop.connect_accepted_socket(asyncio.Protocol, sock)
        with socket.socket() as sock:
            with pytest.raises(
                ValueError, match="^ssl_shutdown_timeout is only meaningful with ssl$"
            ):
                await loop.connect_accepted_socket(asyncio.Protocol, sock, ssl_shutdown_timeout=1)

    run(loop, main())


# --------------------------------------------------------------------------- Unix sockets


@pytest.fixture
def unix_path(tmp_path):
    path = os.path.join(tmp_path, "s")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")
    return path


def test_create_unix_server_replaces_a_stale_socket_file(loop, unix_path):
    async def main():
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(unix_path)  # the file stays behind, as after a crashed server
        server = await loop.create_unix_server(asyncio.Protocol, unix_path, start_serving=False)
        try:
            assert server.sockets[0].getsockname() == unix_path
        finally:
            server.close()

    run(loop, main())


def test_create_unix_server_refuses_to_replace_a_regular_file(loop, unix_path):
    with open(unix_path, "w") as f:
        f.write("not a socket")

    async def main():
        with pytest.raises(OSError) as info:
            await loop.create_unix_server(asyncio.Protocol, unix_path)
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.strerror == f"Address {unix_path!r} is already in use"

    run(loop, main())
    with open(unix_path) as f:
        assert f.read() == "not a socket"


@pytest.mark.parametrize("cleanup", [True, False])
def test_create_unix_server_cleanup_socket_removes_the_file_on_close(
    loop, impl, unix_path, cleanup
):
    stdlib_since(impl, (3, 13), "create_unix_server(cleanup_socket=)")

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, unix_path, cleanup_socket=cleanup)
        assert os.path.exists(unix_path)
        server.close()
        await server.wait_closed()
        assert os.path.exists(unix_path) is not cleanup

    run(loop, main())


def test_unix_server_close_leaves_a_newer_servers_socket_file(loop, impl, unix_path):
    stdlib_since(impl, (3, 13), "create_unix_server(cleanup_socket=)")

    async def main():
        old = await loop.create_unix_server(asyncio.Protocol, unix_path, cleanup_socket=True)
        # Binding the same path removes the old server's file (any socket file goes).
        new = await loop.create_unix_server(asyncio.Protocol, unix_path, cleanup_socket=True)
        old.close()
        assert os.path.exists(unix_path)
        new.close()
        assert not os.path.exists(unix_path)

    run(loop, main())


def test_create_unix_server_argument_errors(loop, unix_path):
    async def main():
        create = loop.create_unix_server
        with pytest.raises(TypeError, match="^ssl argument must be an SSLContext or None$"):
            await create(asyncio.Protocol, unix_path, ssl=True)
        with pytest.raises(ValueError, match="^ssl_handshake_timeout is only meaningful with ssl$"):
            await create(asyncio.Protocol, unix_path, ssl_handshake_timeout=1)
        with pytest.raises(ValueError, match="^path was not specified, and no sock specified$"):
            await create(asyncio.Protocol)
        with socket.socket(socket.AF_UNIX) as sock:
            with pytest.raises(
                ValueError, match="^path and sock can not be specified at the same time$"
            ):
                await create(asyncio.Protocol, unix_path, sock=sock)
        with socket.socket() as sock:
            with pytest.raises(
                ValueError, match="^A UNIX Domain Stream Socket was expected, got <socket"
            ):
                await create(asyncio.Protocol, sock=sock)

    run(loop, main())
    assert not os.path.exists(unix_path)


def test_create_unix_connection_argument_errors(loop, unix_path):
    context = ssl.create_default_context()

    async def main():
        connect = loop.create_unix_connection
        with pytest.raises(ValueError, match="^you have to pass server_hostname when using ssl$"):
            await connect(asyncio.Protocol, unix_path, ssl=context)
        with pytest.raises(ValueError, match="^server_hostname is only meaningful with ssl$"):
            await connect(asyncio.Protocol, unix_path, server_hostname="x")
        with pytest.raises(ValueError, match="^ssl_shutdown_timeout is only meaningful with ssl$"):
            await connect(asyncio.Protocol, unix_path, ssl_shutdown_timeout=1)
        with pytest.raises(ValueError, match="^no path and sock were specified$"):
            await connect(asyncio.Protocol)
        with socket.socket(socket.AF_UNIX) as sock:
            with pytest.raises(
                ValueError, match="^path and sock can not be specified at the same time$"
            ):
                await connect(asyncio.Protocol, unix_path, sock=sock)
        with socket.socket() as sock:
            with pytest.raises(
                ValueError, match="^A UNIX Domain Stream Socket was expected, got <socket"
            ):
                await connect(asyncio.Protocol, sock=sock)
        with pytest.raises(FileNotFoundError):
            await connect(asyncio.Protocol, unix_path)

    run(loop, main())


# --------------------------------------------------------------------------- sendfile


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1024)
    return path


async def transport_to_raw_peer(net):
    """``(transport, peer)``: a client transport and the plain socket it is connected to."""
    transport, _, peer = await net.connect_raw_peer(Recorder)
    return transport, peer


async def recv_exactly(sock, n):
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("source", ["file", "bytesio"], ids=["native", "fallback"])
def test_sendfile_sends_the_range_between_writes_and_moves_the_file(loop, data_path, source):
    content = data_path.read_bytes()

    async def main(file):
        async with Session(TcpEndpoint()) as net:
            transport, peer = await transport_to_raw_peer(net)
            transport.write(b"<")
            sent = await loop.sendfile(transport, file, 1000, 100_000)
            transport.write(b">")
            assert sent == 100_000
            assert file.tell() == 101_000
            got = await recv_exactly(peer, 100_002)
            assert got == b"<" + content[1000:101_000] + b">"

    if source == "file":
        with open(data_path, "rb") as file:
            run(loop, main(file))
    else:
        run(loop, main(io.BytesIO(content)))


def test_sendfile_without_fallback_raises_for_a_file_without_fileno(loop):
    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, _ = await transport_to_raw_peer(net)
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await loop.sendfile(transport, io.BytesIO(b"abc"), fallback=False)

    run(loop, main())


def test_sendfile_refuses_a_closing_transport(loop, data_path):
    async def main(file):
        async with Session(TcpEndpoint()) as net:
            transport, _ = await transport_to_raw_peer(net)
            transport.close()
            with pytest.raises(RuntimeError, match="^Transport is closing$"):
                await loop.sendfile(transport, file)
            assert file.tell() == 0

    with open(data_path, "rb") as file:
        run(loop, main(file))


# --------------------------------------------------------------------------- TLS


async def echo_one_line(reader, writer):
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def test_tls_server_and_client_verify_and_exchange_data(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await net.start_server(echo_one_line, ssl=server_context)
            port = address_of(server)[1]
            reader, writer = await net.open_connection(("localhost", port), ssl=client_context)
            assert writer.get_extra_info("ssl_object").server_hostname == "localhost"
            subject = writer.get_extra_info("peercert")["subject"]
            assert subject == ((("commonName", "localhost"),),)
            writer.write(b"over tls\n")
            assert await reader.read() == b"over tls\n"
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_tls_client_rejects_an_unverified_server_certificate(
    loop, tls_contexts, expect_loop_errors
):
    server_context, _ = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await net.start_server(echo_one_line, ssl=server_context)
            with pytest.raises(ssl.SSLCertVerificationError):
                await net.open_connection(address_of(server), ssl=ssl.create_default_context())

    run(loop, main())
    # The server side's failed handshake is reported in debug mode only.
    expected = (
        {"Error on transport creation for incoming connection"} if loop.get_debug() else set()
    )
    assert {context["message"] for context in expect_loop_errors} <= expected


def test_start_tls_upgrades_plain_connections_on_both_sides(loop, tls_contexts):
    server_context, client_context = tls_contexts

    async def handle(reader, writer):
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"go\n")
        await writer.drain()
        await writer.start_tls(server_context)
        await echo_one_line(reader, writer)

    async def main():
        async with Session(TcpEndpoint()) as net:
            server = await net.start_server(handle)
            reader, writer = await net.open_connection(address_of(server))
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"go\n"
            assert writer.get_extra_info("ssl_object") is None
            await writer.start_tls(client_context, server_hostname="localhost")
            assert writer.get_extra_info("ssl_object") is not None
            writer.write(b"secret\n")
            assert await reader.read() == b"secret\n"
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_start_tls_argument_errors(loop, tls_contexts):
    _, client_context = tls_contexts

    async def main():
        async with Session(TcpEndpoint()) as net:
            transport, _ = await transport_to_raw_peer(net)
            protocol = transport.get_protocol()
            with pytest.raises(
                TypeError, match="^sslcontext is expected to be an instance of ssl.SSLContext"
            ):
                await loop.start_tls(transport, protocol, object())
            with pytest.raises(TypeError, match=r"is not supported by start_tls\(\)$"):
                await loop.start_tls(asyncio.Transport(), protocol, client_context)

    run(loop, main())
