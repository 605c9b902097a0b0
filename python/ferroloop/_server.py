"""``ferroloop`` servers: what ``loop.create_server``/``create_unix_server`` return.

A ``Server`` owns its listening sockets and counts the live connections accepted through
it: each socket transport the loop creates for an accepted connection calls
``server._attach(transport)`` when it is built and ``server._detach(transport)`` after its
``connection_lost``. The accept loop itself is the loop's (``NetMixin._start_serving``);
the server only starts and stops it.

Semantics are those of ``asyncio.Server`` as of Python 3.13 on every supported version:
``close_clients``/``abort_clients``, and ``wait_closed`` waits until the server is closed
*and* its last connection is gone, in either order (3.11's returned at once for a closed
server, even with connections still open).
"""

from __future__ import annotations

import sys
from asyncio import events, exceptions, tasks, trsock

from ._ferroloop import ClientSet

__all__ = ["Server"]


class Server(events.AbstractServer):
    """A listening server: its sockets, its accepted connections and its waiters."""

    def __init__(
        self,
        loop,
        sockets,
        protocol_factory,
        ssl_context,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout=None,
    ):
        self._loop = loop
        # None once closed: the "closed" flag everything else tests.
        self._sockets = sockets
        # The stdlib's WeakSet, natively: members held without a reference, so that a
        # transport dropped without being closed still gets its "unclosed transport"
        # ResourceWarning instead of being kept alive here, and with no weak reference
        # object per connection (about 130 bytes each).
        self._clients = ClientSet()
        self._anonymous = 0
        # Futures of wait_closed() callers; None once they have been woken (closed and no
        # connection left), after which wait_closed() returns at once.
        self._waiters = []
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._ssl_context = ssl_context
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._serving = False
        self._serving_forever_fut = None

    def __repr__(self):
        return f"<{type(self).__name__} sockets={self.sockets!r}>"

    # -- connections (called by the transports) -------------------------------------------

    def _attach(self, transport=None):
        assert self._sockets is not None
        if transport is None:
            # 3.12's signature (a bare count), which its own tests still call.
            self._anonymous += 1
        else:
            self._clients.add(transport)

    def _detach(self, transport=None):
        if transport is None:
            self._anonymous -= 1
        else:
            self._clients.discard(transport)
        if not self._has_clients() and self._sockets is None:
            self._wakeup()

    def _has_clients(self):
        return bool(self._clients) or self._anonymous > 0

    def _wakeup(self):
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- serving ----------------------------------------------------------------------------

    def _start_serving(self):
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop._start_serving(
                self._protocol_factory,
                sock,
                self._ssl_context,
                self,
                self._backlog,
                self._ssl_handshake_timeout,
                self._ssl_shutdown_timeout,
            )

    def get_loop(self):
        return self._loop

    def is_serving(self):
        return self._serving

    @property
    def sockets(self):
        """The listening sockets, as ``asyncio.trsock.TransportSocket``; () once closed."""
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(sock) for sock in self._sockets)

    def close(self):
        """Stop listening and close the listening sockets; connections stay open."""
        sockets = self._sockets
        if sockets is None:
            return
        self._sockets = None
        for sock in sockets:
            self._loop._stop_serving(sock)
        self._serving = False
        fut = self._serving_forever_fut
        if fut is not None and not fut.done():
            fut.cancel()
            self._serving_forever_fut = None
        if not self._has_clients():
            self._wakeup()

    def close_clients(self):
        """Close every connection accepted through this server."""
        for transport in self._clients.copy():
            transport.close()

    def abort_clients(self):
        """Abort every connection accepted through this server."""
        for transport in self._clients.copy():
            transport.abort()

    async def start_serving(self):
        self._start_serving()
        # One loop iteration, so that connections arriving from now on are accepted.
        await tasks.sleep(0)

    async def serve_forever(self):
        """Accept connections until cancelled; cancelling closes the server."""
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except exceptions.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self):
        """Wait until the server is closed and every connection it accepted is gone.

        Before 3.12.1 the stdlib returned at once from a closed server, connections or
        not; code written against that would hang here, so the running version decides.
        """
        if self._waiters is None:
            return
        if self._sockets is None and sys.version_info < (3, 12, 1):
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter
