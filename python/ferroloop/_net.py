"""Stream connections and servers: ``create_connection``, ``create_server`` and friends.

``NetMixin`` sits in front of the Rust ``LoopCore`` in ``ferroloop.Loop``'s bases. Everything
here runs once per connection or once per server: resolving and connecting, binding and
listening, accepting, wrapping in TLS. The bytes themselves flow through the socket
transport the core builds with ``loop._make_socket_transport(sock, protocol, waiter, *,
extra, server)``, which owns the socket from then on (it closes it when the connection is
lost), schedules ``protocol.connection_made``, starts reading and then settles ``waiter``.

TLS is ferroloop's native ``SSLProtocol`` (``src/tls.rs``, the stdlib's
``asyncio.sslproto.SSLProtocol`` in Rust, driving the same ``ssl.SSLContext`` objects) between
the socket transport and the application protocol, as in the stdlib loop; the application
sees ``ssl_protocol._get_app_transport()``, an ``asyncio.Transport``.

The semantics, error messages included, are asyncio's (``base_events``,
``selector_events``, ``unix_events``) of Python 3.11, plus the API the later versions added:
``all_errors`` (3.12), ``keep_alive`` and ``cleanup_socket`` (3.13, defaulting to the
running version's behaviour), and the ``Server`` of 3.13 (see ``_server.py``).
"""

from __future__ import annotations

import collections.abc
import errno
import itertools
import os
import socket
import stat
import sys
import weakref
from asyncio import base_events, constants, exceptions, staggered, tasks, transports, trsock
from asyncio.log import logger

from ._ferroloop import SSLProtocol
from ._server import Server
from ._sock import _check_ssl_socket, _HAS_IPv6

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    ssl = None

__all__ = ["NetMixin"]

# accept() failures that mean "out of a resource", not "this connection failed": the
# listening socket stays readable, so accepting again at once would spin.
_ACCEPT_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Listening Unix sockets whose file create_unix_server(cleanup_socket=True) removes when
# the server stops, with the file's inode at bind time (only that very file is removed).
_unix_socket_inodes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# cleanup_socket's default: the running stdlib's. Before 3.13 the file stays, and code
# written for those versions removes it itself (and would fail if it were gone).
_CLEANUP_UNIX_SOCKET = sys.version_info >= (3, 13)


def _set_reuseport(sock):
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        ) from None


def _interleave_addrinfos(addrinfos, first_address_family_count=1):
    """Reorder ``addrinfos`` to alternate between address families (RFC 8305).

    The first family keeps its first ``first_address_family_count`` entries in front.
    """
    by_family = {}
    for info in addrinfos:
        by_family.setdefault(info[0], []).append(info)
    groups = list(by_family.values())
    lead = max(first_address_family_count - 1, 0)
    head = groups[0][:lead]
    del groups[0][:lead]
    rest = itertools.chain.from_iterable(itertools.zip_longest(*groups))
    return head + [info for info in rest if info is not None]


def _is_socket_file(path):
    """Whether the Unix socket address ``path`` (str or bytes) names a file.

    Not an abstract-namespace address (leading NUL) nor an unbound socket's ("").
    """
    return bool(path) and path[0] not in (0, "\x00")


def _bind_error(exc, address):
    """``exc`` from bind(), with the address in its message (asyncio's wording)."""
    reason = exc.strerror.lower() if exc.strerror else str(exc).lower()
    return OSError(exc.errno, f"error while attempting to bind on address {address!r}: {reason}")


class _SendfileFallbackProtocol(base_events._SendfileFallbackProtocol):
    """asyncio's sendfile fallback protocol, for any flow-controlled transport.

    The stdlib's insists on a ``transports._FlowControlMixin`` instance; ferroloop's TLS
    transport has the same flow-control surface (``_protocol_paused``, ``_loop``,
    ``pause_reading``/``resume_reading``, ``set_protocol``) without deriving from it.
    """

    def __init__(self, transp):
        if isinstance(transp, transports._FlowControlMixin) or hasattr(transp, "_protocol_paused"):
            self._transport = transp
            self._proto = transp.get_protocol()
            self._should_resume_reading = transp.is_reading()
            self._should_resume_writing = transp._protocol_paused
            transp.pause_reading()
            transp.set_protocol(self)
            if self._should_resume_writing:
                self._write_ready_fut = self._transport._loop.create_future()
            else:
                self._write_ready_fut = None
        else:
            super().__init__(transp)


class NetMixin:
    """Streams for ``ferroloop.Loop``: TCP and Unix connections and servers, TLS, sendfile.

    Relies on the loop for ``_make_socket_transport``, ``_set_fd_owner``, ``add_reader``/
    ``remove_reader``, ``sock_connect``, ``sock_sendfile``, ``_ensure_resolved``,
    ``getaddrinfo``, ``create_future``, ``create_task``, ``call_soon``, ``call_later``,
    ``call_exception_handler``, ``run_in_executor`` and ``_debug``.
    """

    __slots__ = ()

    # -- transports -------------------------------------------------------------------------

    def _make_ssl_transport(
        self,
        rawsock,
        protocol,
        sslcontext,
        waiter=None,
        *,
        server_side=False,
        server_hostname=None,
        extra=None,
        server=None,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
        call_connection_made=True,
    ):
        """A TLS transport over ``rawsock``: the native SSLProtocol on a socket transport."""
        ssl_protocol = SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=call_connection_made,
        )
        app_transport = ssl_protocol._get_app_transport()
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return app_transport

    async def _create_connection_transport(
        self,
        sock,
        protocol_factory,
        ssl,
        server_hostname,
        server_side=False,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        sock.setblocking(False)
        protocol = protocol_factory()
        waiter = self.create_future()
        if ssl:
            sslcontext = None if isinstance(ssl, bool) else ssl
            transport = self._make_ssl_transport(
                sock,
                protocol,
                sslcontext,
                waiter,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        else:
            transport = self._make_socket_transport(sock, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    # -- connecting -------------------------------------------------------------------------

    async def _connect_sock(self, exceptions, addr_info, local_addr_infos=None):
        """Create, bind (to a local address of the same family) and connect one socket.

        Every OSError met on the way is appended to a list of this attempt's own, itself
        appended to ``exceptions``, so that the caller can report them all.
        """
        my_exceptions = []
        exceptions.append(my_exceptions)
        family, type_, proto, _, address = addr_info
        sock = None
        try:
            sock = socket.socket(family=family, type=type_, proto=proto)
            sock.setblocking(False)
            if local_addr_infos is not None:
                for lfamily, _, _, _, laddr in local_addr_infos:
                    if lfamily != family:
                        continue
                    try:
                        sock.bind(laddr)
                        break
                    except OSError as exc:
                        my_exceptions.append(_bind_error(exc, laddr))
                else:
                    if my_exceptions:
                        raise my_exceptions.pop()
                    raise OSError(f"no matching local address with {family=} found")
            await self.sock_connect(sock, address)
            return sock
        except OSError as exc:
            my_exceptions.append(exc)
            if sock is not None:
                sock.close()
            raise
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        finally:
            exceptions = my_exceptions = None  # no traceback -> frame -> list cycles

    async def create_connection(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        ssl=None,
        family=0,
        proto=0,
        flags=0,
        sock=None,
        local_addr=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        happy_eyeballs_delay=None,
        interleave=None,
        all_errors=False,
    ):
        """Open a stream connection to ``host``:``port`` (or over ``sock``).

        Every address ``host`` resolves to is tried in turn, or raced with
        ``happy_eyeballs_delay`` between starts. Returns ``(transport, protocol)``.
        """
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl:
            # The host name is what the certificate is checked against; without a host
            # the caller must say (server_hostname="" skips the check).
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if sock is not None:
            _check_ssl_socket(sock)
        if happy_eyeballs_delay is not None and interleave is None:
            interleave = 1  # happy eyeballs alternates families by default

        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            infos = await self._ensure_resolved(
                (host, port),
                family=family,
                type=socket.SOCK_STREAM,
                proto=proto,
                flags=flags,
                loop=self,
            )
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            laddr_infos = None
            if local_addr is not None:
                laddr_infos = await self._ensure_resolved(
                    local_addr,
                    family=family,
                    type=socket.SOCK_STREAM,
                    proto=proto,
                    flags=flags,
                    loop=self,
                )
                if not laddr_infos:
                    raise OSError("getaddrinfo() returned empty list")
            if interleave:
                infos = _interleave_addrinfos(infos, interleave)

            exceptions = []
            if happy_eyeballs_delay is None:
                for addrinfo in infos:
                    try:
                        sock = await self._connect_sock(exceptions, addrinfo, laddr_infos)
                        break
                    except OSError:
                        continue
            else:
                # Default arguments rather than functools.partial: the attempts must not
                # keep ``exceptions`` alive after the race.
                attempts = (
                    lambda addrinfo=addrinfo: self._connect_sock(exceptions, addrinfo, laddr_infos)
                    for addrinfo in infos
                )
                race = staggered.staggered_race(attempts, happy_eyeballs_delay, loop=self)
                sock = (await race)[0]  # not unpacked: the rest holds the exceptions

            if sock is None:
                exceptions = [exc for attempt in exceptions for exc in attempt]
                try:
                    if all_errors:
                        raise ExceptionGroup("create_connection failed", exceptions)
                    if len(exceptions) == 1:
                        raise exceptions[0]
                    if exceptions:
                        model = str(exceptions[0])
                        if all(str(exc) == model for exc in exceptions):
                            raise exceptions[0]
                        raise OSError(
                            "Multiple exceptions: {}".format(", ".join(str(e) for e in exceptions))
                        )
                    # No attempt recorded an OSError (a raced one may end otherwise).
                    raise TimeoutError("create_connection failed")
                finally:
                    exceptions = None
        else:
            if sock is None:
                raise ValueError("host and port was not specified and no sock specified")
            if sock.type != socket.SOCK_STREAM:
                # Any stream socket will do, AF_UNIX included (as in asyncio).
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")

        transport, protocol = await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        if self._debug:
            sock = transport.get_extra_info("socket")
            logger.debug("%r connected to %s:%r: (%r, %r)", sock, host, port, transport, protocol)
        return transport, protocol

    async def connect_accepted_socket(
        self,
        protocol_factory,
        sock,
        *,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Wrap an already accepted connection ``sock`` in a transport (server side)."""
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        _check_ssl_socket(sock)
        transport, protocol = await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            "",
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        if self._debug:
            sock = transport.get_extra_info("socket")
            logger.debug("%r handled: (%r, %r)", sock, transport, protocol)
        return transport, protocol

    async def create_unix_connection(
        self,
        protocol_factory,
        path=None,
        *,
        ssl=None,
        sock=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Open a stream connection to the Unix socket ``path`` (or over ``sock``)."""
        assert server_hostname is None or isinstance(server_hostname, str)
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)

        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    # -- servers ----------------------------------------------------------------------------

    async def _create_server_getaddrinfo(self, host, port, family, flags):
        infos = await self._ensure_resolved(
            (host, port), family=family, type=socket.SOCK_STREAM, flags=flags, loop=self
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    async def create_server(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        family=socket.AF_UNSPEC,
        flags=socket.AI_PASSIVE,
        sock=None,
        backlog=100,
        ssl=None,
        reuse_address=None,
        reuse_port=None,
        keep_alive=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
    ):
        """A TCP server on ``host`` (a name, or a sequence of them) and ``port``, or on ``sock``.

        Every address the hosts resolve to gets one listening socket (each bound once).
        """
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and ssl is None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and ssl is None:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if sock is not None:
            _check_ssl_socket(sock)

        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = os.name == "posix"
            if host == "":
                hosts = [None]
            elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
                hosts = [host]
            else:
                hosts = host
            resolved = await tasks.gather(
                *[
                    self._create_server_getaddrinfo(h, port, family=family, flags=flags)
                    for h in hosts
                ]
            )
            # Each distinct address once, in the order the resolver gave them.
            infos = dict.fromkeys(itertools.chain.from_iterable(resolved))

            sockets = []
            completed = False
            try:
                for af, socktype, proto, _canonname, sa in infos:
                    try:
                        sock = socket.socket(af, socktype, proto)
                    except OSError:
                        # A family/type/protocol combination this host cannot do.
                        if self._debug:
                            logger.warning(
                                "create_server() failed to create socket.socket(%r, %r, %r)",
                                af,
                                socktype,
                                proto,
                                exc_info=True,
                            )
                        continue
                    sockets.append(sock)
                    if reuse_address:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
                    if reuse_port:
                        _set_reuseport(sock)
                    if keep_alive:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
                    if _HAS_IPv6 and af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                        # One socket per family: no IPv4-mapped addresses on the IPv6 one
                        # (Linux's default), or binding both families would conflict.
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                    try:
                        sock.bind(sa)
                    except OSError as err:
                        raise _bind_error(err, sa) from None
                completed = True
            finally:
                if not completed:
                    for sock in sockets:
                        sock.close()
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            sockets = [sock]

        for sock in sockets:
            sock.setblocking(False)
        server = Server(
            self,
            sockets,
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        if start_serving:
            server._start_serving()
            # One loop iteration, so that connections arriving from now on are accepted.
            await tasks.sleep(0)
        if self._debug:
            logger.info("%r is serving", server)
        return server

    async def create_unix_server(
        self,
        protocol_factory,
        path=None,
        *,
        sock=None,
        backlog=100,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
        cleanup_socket=_CLEANUP_UNIX_SOCKET,
    ):
        """A server on the Unix socket ``path`` (or on ``sock``).

        A stale socket file at ``path`` is removed before binding; with ``cleanup_socket``
        (3.13's parameter, accepted on every version, defaulting to what the running
        Python's loop does) the file is removed again when the server closes, if it is
        still the one this server bound.
        """
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if _is_socket_file(path):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    # The directory may let us create a socket but not look at it.
                    logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    msg = f"Address {path!r} is already in use"
                    raise OSError(errno.EADDRINUSE, msg) from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")

        sock.setblocking(False)
        server = Server(
            self,
            [sock],
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        if cleanup_socket:
            bound = sock.getsockname()
            if _is_socket_file(bound):
                try:
                    _unix_socket_inodes[sock] = os.stat(bound).st_ino
                except FileNotFoundError:
                    pass
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        return server

    def _start_serving(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
    ):
        """Accept connections on the listening ``sock`` whenever it is readable."""
        self.add_reader(
            sock.fileno(),
            self._accept_connection,
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )

    def _stop_serving(self, sock):
        """Stop accepting on a listening socket and close it (``Server.close`` calls it)."""
        inode = _unix_socket_inodes.pop(sock, None)
        path = sock.getsockname() if inode is not None else None
        self.remove_reader(sock.fileno())
        sock.close()
        if path is None:
            return
        try:
            # Remove the file only if it is still the one we bound, not a newer server's.
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)

    def _accept_connection(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
    ):
        """Reader callback of a listening socket: accept up to ``backlog`` connections."""
        # One readiness report can stand for many pending connections: take them all (up
        # to a bound, so that one busy listener cannot starve the loop).
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
                if self._debug:
                    logger.debug("%r got a new connection from %r: %r", server, addr, conn)
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing (more) to accept, or the client gave up already
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise  # the loop reports it as an exception in this callback
                # The socket stays readable while we are out of fds or memory: stop
                # watching it for a while instead of spinning.
                self.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": exc,
                        "socket": trsock.TransportSocket(sock),
                    }
                )
                self.remove_reader(sock.fileno())
                self.call_later(
                    constants.ACCEPT_RETRY_DELAY,
                    self._resume_accepting,
                    protocol_factory,
                    sock,
                    sslcontext,
                    server,
                    backlog,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
                # The stdlib loop goes on accepting here, so that a lasting shortage is
                # reported, and a retry scheduled, once per backlog slot: once is enough.
                return
            else:
                if not sslcontext:
                    # The next iteration, as the stdlib's task would run its first step.
                    self.call_soon(
                        self._accept_plain_connection, protocol_factory, conn, addr, server
                    )
                    continue
                self.create_task(
                    self._accept_connection2(
                        protocol_factory,
                        conn,
                        {"peername": addr},
                        sslcontext,
                        server,
                        ssl_handshake_timeout,
                        ssl_shutdown_timeout,
                    )
                )

    def _accept_plain_connection(self, protocol_factory, conn, addr, server):
        """Build the protocol and transport of one accepted plain (no TLS) connection.

        What the stdlib's ``_accept_connection2`` task does, without the task: it only
        awaits the transport's waiter (settled right after ``connection_made``) so that a
        cancellation in between closes the transport. A task and its coroutine frame per
        connection are most of what a burst of accepts allocates, and all of them are
        alive at once (one accept callback takes up to ``backlog`` connections): after
        the burst that memory stays with the process, in pools the long-lived objects of
        the same connections keep partly used (about 2 KB per connection of the burst).
        The callback runs in a copy of the context, one iteration after the accept, as the
        task's first step would.
        """
        if server is not None and server._sockets is None:
            conn.close()  # closed between accept() and now: refused, not served
            return
        protocol = None
        try:
            protocol = protocol_factory()
            self._make_socket_transport(conn, protocol, extra={"peername": addr}, server=server)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()  # no transport took the socket over
            self._report_accept_error(exc, protocol, None)

    def _report_accept_error(self, exc, protocol, transport):
        # Nobody to report to: the stdlib loop only reports it in debug mode.
        if not self._debug:
            return
        context = {
            "message": "Error on transport creation for incoming connection",
            "exception": exc,
        }
        if protocol is not None:
            context["protocol"] = protocol
        if transport is not None:
            context["transport"] = transport
        self.call_exception_handler(context)

    def _resume_accepting(self, protocol_factory, sock, *args):
        # The server may have been closed while accepting was paused.
        if sock.fileno() != -1:
            self._start_serving(protocol_factory, sock, *args)

    async def _accept_connection2(
        self,
        protocol_factory,
        conn,
        extra,
        sslcontext=None,
        server=None,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
    ):
        """Build the protocol and transport of one accepted connection ``conn``."""
        if server is not None and server._sockets is None:
            # Closed between accept() and now: the connection is refused, not served.
            conn.close()
            return
        protocol = None
        transport = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            if sslcontext:
                transport = self._make_ssl_transport(
                    conn,
                    protocol,
                    sslcontext,
                    waiter=waiter,
                    server_side=True,
                    extra=extra,
                    server=server,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    ssl_shutdown_timeout=ssl_shutdown_timeout,
                )
            else:
                transport = self._make_socket_transport(
                    conn, protocol, waiter=waiter, extra=extra, server=server
                )
            try:
                await waiter
            except BaseException:
                transport.close()
                raise
            # From here on the connection is the protocol's business.
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if transport is None:
                conn.close()  # no transport took the socket over
            self._report_accept_error(exc, protocol, transport)

    # -- TLS upgrade ------------------------------------------------------------------------

    async def start_tls(
        self,
        transport,
        protocol,
        sslcontext,
        *,
        server_side=False,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Upgrade ``transport`` to TLS; returns the transport ``protocol`` must use now."""
        if ssl is None:
            raise RuntimeError("Python ssl module is not available")
        if not isinstance(sslcontext, ssl.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")

        waiter = self.create_future()
        ssl_protocol = SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=False,
        )
        ssl_protocol._get_app_transport()
        # Stop reading before switching protocols, so that no data reaches the TLS
        # protocol before its connection_made().
        transport.pause_reading()
        transport.set_protocol(ssl_protocol)
        conmade_cb = self.call_soon(ssl_protocol.connection_made, transport)
        resume_cb = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            conmade_cb.cancel()
            resume_cb.cancel()
            raise
        # Read after the wait, as the stdlib does: None if the connection was lost in the
        # meantime (connection_lost() drops the app transport).
        return ssl_protocol._app_transport

    # -- sendfile ---------------------------------------------------------------------------

    async def sendfile(self, transport, file, offset=0, count=None, *, fallback=True):
        """Send ``file`` (from ``offset``, at most ``count`` bytes) over ``transport``.

        Uses zero-copy ``os.sendfile`` on plain socket transports; otherwise, unless
        ``fallback`` is false, reads the file and writes the chunks. Returns the number
        of bytes sent; the file position ends just past them, even on error.
        """
        if transport.is_closing():
            raise RuntimeError("Transport is closing")
        mode = getattr(transport, "_sendfile_compatible", constants._SendfileMode.UNSUPPORTED)
        if mode is constants._SendfileMode.UNSUPPORTED:
            raise RuntimeError(f"sendfile is not supported for transport {transport!r}")
        if mode is constants._SendfileMode.TRY_NATIVE:
            try:
                return await self._sendfile_native(transport, file, offset, count)
            except exceptions.SendfileNotAvailableError:
                if not fallback:
                    raise
        if not fallback:
            raise RuntimeError(
                f"fallback is disabled and native sendfile is not "
                f"supported for transport {transport!r}"
            )
        return await self._sendfile_fallback(transport, file, offset, count)

    async def _sendfile_native(self, transp, file, offset, count):
        # The transport lends its socket to sock_sendfile: whatever it still buffers goes
        # out first, and meanwhile it neither reads nor accepts writes (write() raises
        # while the empty waiter is set), nor claims the fd against raw socket calls.
        sock = transp._sock
        fd = sock.fileno()
        resume_reading = transp.is_reading()
        transp.pause_reading()
        # Raises (leaving the waiter alone) if another sendfile holds the transport.
        waiter = transp._make_empty_waiter()
        self._set_fd_owner(fd, None)
        try:
            await waiter
            return await self.sock_sendfile(sock, file, offset, count, fallback=False)
        finally:
            transp._reset_empty_waiter()
            if resume_reading:
                transp.resume_reading()
            # Only while the transport still has its socket: once closed, the fd number
            # may already belong to another connection.
            if transp._sock is not None:
                self._set_fd_owner(fd, transp)

    async def _sendfile_fallback(self, transp, file, offset, count):
        if offset:
            file.seek(offset)
        blocksize = min(count, 16384) if count else 16384
        buf = bytearray(blocksize)
        total_sent = 0
        drain, restore = self._sendfile_flow_control(transp)
        try:
            while True:
                if count:
                    blocksize = min(count - total_sent, blocksize)
                    if blocksize <= 0:
                        return total_sent
                view = memoryview(buf)[:blocksize]
                # File reads may block (disk, NFS): keep them off the loop thread.
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    return total_sent  # end of file
                transp.write(view[:read])
                await drain()
                total_sent += read
        finally:
            if total_sent > 0 and hasattr(file, "seek"):
                file.seek(offset + total_sent)
            await restore()

    def _sendfile_flow_control(self, transp):
        """``(drain, restore)`` coroutine functions for a read-and-write sendfile.

        Reading is paused meanwhile. A ferroloop socket transport drains through its empty
        waiter (the whole buffer each chunk); any other transport (the TLS one) through
        asyncio's own fallback protocol, as in the stdlib loop.
        """
        if getattr(transp, "_make_empty_waiter", None) is None:
            proto = _SendfileFallbackProtocol(transp)
            return proto.drain, proto.restore

        resume_reading = transp.is_reading()
        transp.pause_reading()

        async def drain():
            if transp.is_closing():
                raise ConnectionError("Connection closed by peer")
            waiter = transp._make_empty_waiter()  # outside the try: see _sendfile_native
            try:
                await waiter
            finally:
                transp._reset_empty_waiter()

        async def restore():
            if resume_reading:
                transp.resume_reading()

        return drain, restore
