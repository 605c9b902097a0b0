"""Low-level socket coroutines (``loop.sock_*``), sendfile and the resolver entry points.

``SockMixin`` sits in front of the Rust ``LoopCore`` in ``ferroloop.Loop``'s bases and builds
asyncio 3.11's selector-loop semantics on the core's level-triggered ``_add_reader`` /
``_add_writer``: try the syscall right away, and only when it would block arm a reader or
writer that retries it until a future completes. The future's completion, including its
cancellation, disarms the reader or writer again.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import socket
from asyncio import constants, exceptions
from asyncio.log import logger

from ._ferroloop import resolve_in_pool

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    ssl = None

__all__ = ["SockMixin"]

_HAS_IPv6 = hasattr(socket, "AF_INET6")
# A failed syscall that only means "not yet": keep waiting for readiness.
_RETRY = (BlockingIOError, InterruptedError)


def _check_ssl_socket(sock):
    # An SSLSocket's recv/send speak TLS records and may need to read in order to write,
    # which readiness-driven raw I/O cannot honour.
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def _is_ip_literal(host):
    """Whether ``host`` is None or a numeric IPv4/IPv6 address (IPv6 may carry a zone id)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return False
    elif not isinstance(host, str):
        return False
    # ValueError: an embedded NUL or a lone surrogate; the resolver reports those itself.
    try:
        socket.inet_pton(socket.AF_INET, host)
        return True
    except (OSError, ValueError):
        pass
    if not _HAS_IPv6:
        return False
    addr, _, _zone = host.partition("%")
    try:
        socket.inet_pton(socket.AF_INET6, addr)
    except (OSError, ValueError):
        return False
    return True


def _ipaddr_info(host, port, family, type, proto, flowinfo=0, scopeid=0):
    """The getaddrinfo() entry for an already numeric ``host``, or None if it must be resolved.

    Lets ``sock_connect(("127.0.0.1", 80))`` skip the executor round trip.
    """
    if host is None or proto not in (0, socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    if type == socket.SOCK_STREAM:
        proto = socket.IPPROTO_TCP
    elif type == socket.SOCK_DGRAM:
        proto = socket.IPPROTO_UDP
    else:
        return None

    if port is None or port == b"" or port == "":
        port = 0
    else:
        try:
            port = int(port)
        except (TypeError, ValueError):
            return None  # a service name such as "http" needs the real resolver

    if family == socket.AF_UNSPEC:
        families = (socket.AF_INET, socket.AF_INET6) if _HAS_IPv6 else (socket.AF_INET,)
    else:
        families = (family,)

    if isinstance(host, bytes):
        host = host.decode("idna")
    if "%" in host:
        return None  # inet_pton() rejects IPv6 zone ids ("fe80::1%eth0"); let getaddrinfo do it

    for af in families:
        try:
            socket.inet_pton(af, host)
        except OSError:
            continue
        if _HAS_IPv6 and af == socket.AF_INET6:
            return af, type, proto, "", (host, port, flowinfo, scopeid)
        return af, type, proto, "", (host, port)
    return None


class SockMixin:
    """``sock_*``, ``sock_sendfile``, ``getaddrinfo`` and ``getnameinfo`` for ``ferroloop.Loop``.

    Relies on the loop for ``_add_reader``/``_add_writer`` (returning the handle),
    ``remove_reader``/``remove_writer``, ``create_future``, ``run_in_executor``, ``_debug``,
    ``time`` and ``slow_callback_duration``.
    """

    __slots__ = ()

    def _check_sock(self, sock):
        _check_ssl_socket(sock)
        # A blocking socket would stall the whole loop; like asyncio, only debug mode checks.
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    # -- waiting for readiness --------------------------------------------------------------

    def _sock_wait(self, fd, writer, callback, *args):
        """Arm ``callback(fut, *args)`` on ``fd`` and return ``fut``.

        The callback stays armed (level-triggered) until ``fut`` completes; completing or
        cancelling ``fut`` disarms it.
        """
        fut = self.create_future()
        self._ensure_fd_no_transport(fd)
        if writer:
            handle = self._add_writer(fd, callback, fut, *args)
            done = self._sock_write_done
        else:
            handle = self._add_reader(fd, callback, fut, *args)
            done = self._sock_read_done
        fut.add_done_callback(functools.partial(done, fd, handle=handle))
        return fut

    def _sock_read_done(self, fd, fut, handle=None):
        # A cancelled handle means a later add_reader() on this fd replaced ours (or it was
        # already removed): don't take the newer reader down with us.
        if handle is None or not handle.cancelled():
            self.remove_reader(fd)

    def _sock_write_done(self, fd, fut, handle=None):
        if handle is None or not handle.cancelled():
            self.remove_writer(fd)

    def _sock_call_cb(self, fut, sock, method, *args):
        """Readiness callback: retry ``sock.<method>(*args)`` and settle ``fut`` with it."""
        if fut.done():
            # Cancelled (or settled) while this callback was already queued.
            return
        try:
            # Looked up on every attempt, not bound up front: the socket object may be a
            # wrapper or mock whose methods change between attempts.
            result = getattr(sock, method)(*args)
        except _RETRY:
            return  # spurious wakeup: stay armed
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        finally:
            fut = None  # break the exception -> traceback -> frame -> fut cycle

    # -- receiving --------------------------------------------------------------------------

    async def _sock_read(self, sock, method, *args):
        # Try at once; wait for readability only if the socket has nothing yet.
        self._check_sock(sock)
        try:
            return getattr(sock, method)(*args)
        except _RETRY:
            pass
        return await self._sock_wait(sock.fileno(), False, self._sock_call_cb, sock, method, *args)

    # sock_recv, sock_recv_into, sock_recvfrom, sock_recvfrom_into, sock_sendall and
    # sock_sendto are the core's (native waiters, see src/sock.rs); it falls back to these
    # for anything but a plain socket.socket outside debug mode.

    async def _sock_recv_py(self, sock, n):
        """Receive up to ``n`` bytes from ``sock``; b"" at end of stream."""
        return await self._sock_read(sock, "recv", n)

    async def _sock_recv_into_py(self, sock, buf):
        """Receive into the writable buffer ``buf``; returns the number of bytes written."""
        return await self._sock_read(sock, "recv_into", buf)

    async def _sock_recvfrom_py(self, sock, bufsize):
        """Receive a datagram of up to ``bufsize`` bytes; returns ``(data, address)``."""
        return await self._sock_read(sock, "recvfrom", bufsize)

    async def _sock_recvfrom_into_py(self, sock, buf, nbytes=0):
        """Receive a datagram into ``buf``; returns ``(nbytes, address)``."""
        return await self._sock_read(sock, "recvfrom_into", buf, nbytes or len(buf))

    # -- sending ----------------------------------------------------------------------------

    async def _sock_sendall_py(self, sock, data):
        """Send all of ``data`` to the connected ``sock``.

        On error there is no telling how much of ``data`` the peer got.
        """
        self._check_sock(sock)
        try:
            sent = sock.send(data)
        except _RETRY:
            sent = 0
        view = memoryview(data)
        # Compare in bytes: send() counts bytes, len() of e.g. an array('i') counts items.
        if sent == view.nbytes:
            return
        # One mutable cell shared with the callback: where the unsent rest starts.
        pos = [sent]
        return await self._sock_wait(
            sock.fileno(), True, self._sock_sendall, sock, view.cast("B"), pos
        )

    def _sock_sendall(self, fut, sock, view, pos):
        if fut.done():
            return
        start = pos[0]
        try:
            # Slicing a memoryview is zero-copy, so a big payload is never re-copied.
            sent = sock.send(view[start:])
        except _RETRY:
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut = None  # break the exception -> traceback -> frame -> fut cycle
            return
        start += sent
        if start == len(view):
            fut.set_result(None)
        else:
            pos[0] = start

    async def _sock_sendto_py(self, sock, data, address):
        """Send the datagram ``data`` to ``address``; returns the number of bytes sent."""
        self._check_sock(sock)
        try:
            return sock.sendto(data, address)
        except _RETRY:
            pass
        return await self._sock_wait(
            sock.fileno(), True, self._sock_call_cb, sock, "sendto", data, 0, address
        )

    # -- connecting and accepting -----------------------------------------------------------

    async def _ensure_resolved(
        self, address, *, family=0, type=socket.SOCK_STREAM, proto=0, flags=0, loop=None
    ):
        """getaddrinfo() results for ``address``; numeric hosts don't touch the resolver.

        ``loop`` is accepted for call compatibility with asyncio's helper.
        """
        host, port = address[:2]
        info = _ipaddr_info(host, port, family, type, proto, *address[2:])
        if info is not None:
            return [info]
        if loop is None:
            loop = self
        return await loop.getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )

    async def sock_connect(self, sock, address):
        """Connect ``sock`` to ``address``, resolving a host name for IP sockets."""
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (_HAS_IPv6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            address = resolved[0][4]

        try:
            sock.connect(address)
        except _RETRY:
            # EINPROGRESS, or EINTR, after which the kernel carries on connecting in the
            # background: either way writability reports the outcome.
            pass
        else:
            return
        fut = self._sock_wait(sock.fileno(), True, self._sock_connect_cb, sock, address)
        try:
            return await fut
        finally:
            fut = None  # a failed connect's traceback would otherwise keep fut alive

    def _sock_connect_cb(self, fut, sock, address):
        if fut.done():
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                # OSError(errno, ...) picks the matching subclass (ConnectionRefusedError...).
                raise OSError(err, f"Connect call failed {address}")
        except _RETRY:
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)
        finally:
            fut = None

    async def sock_accept(self, sock):
        """Accept a connection on the listening ``sock``; returns ``(conn, address)``.

        ``conn`` comes back non-blocking.
        """
        self._check_sock(sock)
        try:
            conn, address = sock.accept()
            conn.setblocking(False)
        except _RETRY:
            pass
        else:
            return conn, address
        return await self._sock_wait(sock.fileno(), False, self._sock_accept_cb, sock)

    def _sock_accept_cb(self, fut, sock):
        # Unlike asyncio 3.11's _sock_accept this bails out on a done future, so a callback
        # queued just before cancellation can't accept (and drop) a connection.
        if fut.done():
            return
        try:
            conn, address = sock.accept()
            conn.setblocking(False)
        except _RETRY:
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result((conn, address))
        finally:
            fut = None

    # -- sendfile ---------------------------------------------------------------------------

    async def sock_sendfile(self, sock, file, offset=0, count=None, *, fallback=True):
        """Send ``file`` (from ``offset``, at most ``count`` bytes) over the stream ``sock``.

        Uses zero-copy ``os.sendfile`` when it can; otherwise, unless ``fallback`` is false,
        reads the file and sends the chunks. Returns the number of bytes sent.
        """
        # asyncio checks these two in the opposite order from the other sock_* methods.
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        _check_ssl_socket(sock)
        self._check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sock_sendfile_native(sock, file, offset, count)
        except exceptions.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sock_sendfile_fallback(sock, file, offset, count)

    def _check_sendfile_params(self, sock, file, offset, count):
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        if count is not None:
            if not isinstance(count, int):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        if not isinstance(offset, int):
            raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
        if offset < 0:
            raise ValueError(f"offset must be a non-negative integer (got {offset!r})")

    async def _sock_sendfile_native(self, sock, file, offset, count):
        if not hasattr(os, "sendfile"):
            raise exceptions.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation) as err:
            raise exceptions.SendfileNotAvailableError("not a regular file") from err
        try:
            fsize = os.fstat(fileno).st_size
        except OSError as err:
            raise exceptions.SendfileNotAvailableError("not a regular file") from err
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # empty file
        fut = self.create_future()
        self._sock_sendfile_native_impl(fut, None, sock, fileno, offset, count, blocksize, 0)
        return await fut

    def _sock_sendfile_native_impl(
        self, fut, registered_fd, sock, fileno, offset, count, blocksize, total_sent
    ):
        """One ``os.sendfile`` step; ``registered_fd`` is set when run as the writer callback.

        ``offset`` is the file offset of the next byte to send. ``os.sendfile`` with an
        explicit offset leaves the file position alone, so each step that ends the transfer
        seeks the file past the sent bytes, as a plain read-and-send would.
        """
        fd = sock.fileno()

        def finish(result=None, exc=None):
            if registered_fd is not None:
                self.remove_writer(registered_fd)
            self._sock_sendfile_update_filepos(fileno, offset, total_sent)
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        if fut.cancelled():
            # The cancellation callback may not have run yet: disarm here too.
            if registered_fd is not None:
                self.remove_writer(registered_fd)
            self._sock_sendfile_update_filepos(fileno, offset, total_sent)
            return
        if count:
            blocksize = count - total_sent
            if blocksize <= 0:
                finish(total_sent)
                return

        try:
            sent = os.sendfile(fd, fileno, offset, blocksize)
        except _RETRY:
            if registered_fd is None:
                self._sock_add_cancellation_callback(fut, sock)
                self._sock_sendfile_arm(fut, fd, sock, fileno, offset, count, blocksize, total_sent)
            # Otherwise our writer is still armed with unchanged arguments: the level-triggered
            # reactor calls us again on the next writability.
        except OSError as exc:
            if (
                registered_fd is not None
                and exc.errno == errno.ENOTCONN
                and type(exc) is not ConnectionError
            ):
                # The peer went away mid-transfer. ENOTCONN maps to no ConnectionError
                # subclass, so normalise it like asyncio does (argument order is asyncio's).
                new_exc = ConnectionError("socket is not connected", errno.ENOTCONN)
                new_exc.__cause__ = exc
                exc = new_exc
            if total_sent == 0:
                # Nothing went out, so the caller can still fall back to read-and-send;
                # typically the file isn't one sendfile(2) can map.
                finish(exc=exceptions.SendfileNotAvailableError("os.sendfile call failed"))
            else:
                finish(exc=exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            finish(exc=exc)
        else:
            if sent == 0:
                finish(total_sent)  # end of file
                return
            offset += sent
            total_sent += sent
            if registered_fd is None:
                self._sock_add_cancellation_callback(fut, sock)
            # Re-arming an armed fd replaces (and cancels) the current handle: the new one
            # carries the new offsets, and the fd never leaves the reactor in between.
            self._sock_sendfile_arm(fut, fd, sock, fileno, offset, count, blocksize, total_sent)
        finally:
            fut = None

    def _sock_sendfile_arm(self, fut, fd, sock, fileno, offset, count, blocksize, total_sent):
        self._ensure_fd_no_transport(fd)
        self._add_writer(
            fd,
            self._sock_sendfile_native_impl,
            fut,
            fd,
            sock,
            fileno,
            offset,
            count,
            blocksize,
            total_sent,
        )

    def _sock_sendfile_update_filepos(self, fileno, offset, total_sent):
        if total_sent > 0:
            os.lseek(fileno, offset, os.SEEK_SET)

    def _sock_add_cancellation_callback(self, fut, sock):
        # Normal completion disarms from inside the writer callback; only cancellation needs
        # this. The socket may be closed by then (fileno() == -1): nothing left to disarm.
        def on_done(fut):
            if fut.cancelled():
                fd = sock.fileno()
                if fd != -1:
                    self.remove_writer(fd)

        fut.add_done_callback(on_done)

    async def _sock_sendfile_fallback(self, sock, file, offset, count):
        if offset:
            file.seek(offset)
        bufsize = constants.SENDFILE_FALLBACK_READBUFFER_SIZE
        if count:
            bufsize = min(count, bufsize)
        buf = bytearray(bufsize)
        total_sent = 0
        try:
            while True:
                chunk = bufsize
                if count:
                    chunk = min(count - total_sent, bufsize)
                    if chunk <= 0:
                        break
                view = memoryview(buf)[:chunk]
                # File reads may block (disk, NFS): keep them off the loop thread.
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    break  # end of file
                await self.sock_sendall(sock, view[:read])
                total_sent += read
            return total_sent
        finally:
            # Leave the file position just past what was sent, even on error or cancellation.
            if total_sent > 0 and hasattr(file, "seek"):
                file.seek(offset + total_sent)

    # -- name resolution --------------------------------------------------------------------

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        """``socket.getaddrinfo``'s result, computed off the loop thread.

        Numeric hosts (and None) are answered right here: with ``AI_NUMERICHOST`` the C
        call cannot touch the network. Everything else goes to the native resolver pool.
        """
        if not self._debug:
            return await self._getaddrinfo(host, port, family, type, proto, flags)
        # Logs like asyncio's debug mode does.
        parts = [f"{host}:{port!r}"]
        for name, value in (("family", family), ("type", type), ("proto", proto), ("flags", flags)):
            if value:
                parts.append(f"{name}={value!r}")
        msg = ", ".join(parts)
        logger.debug("Get address info %s", msg)

        t0 = self.time()
        addrinfo = await self._getaddrinfo(host, port, family, type, proto, flags)
        dt = self.time() - t0

        msg = f"Getting address info {msg} took {dt * 1e3:.3f}ms: {addrinfo!r}"
        if dt >= self.slow_callback_duration:
            logger.info(msg)
        else:
            logger.debug(msg)
        return addrinfo

    async def _getaddrinfo(self, host, port, family, type, proto, flags):
        self._check_closed()
        if _is_ip_literal(host):
            try:
                return socket.getaddrinfo(
                    host, port, family, type, proto, flags | socket.AI_NUMERICHOST
                )
            except socket.gaierror as exc:
                # E.g. an unknown zone id ("fe80::1%nosuch"): let the real resolver decide.
                if exc.errno != socket.EAI_NONAME:
                    raise
        fut = self.create_future()
        resolve_in_pool(self, fut, socket.getaddrinfo, (host, port, family, type, proto, flags))
        try:
            return await fut
        finally:
            fut = None  # break the exception -> traceback -> frame -> fut cycle

    async def getnameinfo(self, sockaddr, flags=0):
        """``socket.getnameinfo(sockaddr, flags)``, computed off the loop thread."""
        self._check_closed()
        fut = self.create_future()
        resolve_in_pool(self, fut, socket.getnameinfo, (sockaddr, flags))
        try:
            return await fut
        finally:
            fut = None  # break the exception -> traceback -> frame -> fut cycle
