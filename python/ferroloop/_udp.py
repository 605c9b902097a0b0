"""``loop.create_datagram_endpoint``: per-endpoint set-up of UDP and Unix datagram sockets.

Resolving, creating, binding and connecting the socket happen once per endpoint and stay in
Python, with the stdlib's (3.11+) semantics and messages; every datagram afterwards is the
native transport's business (``LoopCore._make_datagram_transport``).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from asyncio.log import logger

# How create_datagram_endpoint(sock=) names the socket it wanted (3.13 took "datagram").
_SOCK_KIND = "datagram socket" if sys.version_info >= (3, 13) else "UDP Socket"

__all__ = ["DatagramMixin"]


def _set_reuseport(sock):
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        ) from None


def _remove_stale_unix_socket(path):
    # A socket file left by a previous run would make bind() fail with EADDRINUSE.
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        # The directory may only allow creating the socket, not inspecting it.
        logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)


class DatagramMixin:
    """``create_datagram_endpoint`` for ``ferroloop.Loop``.

    Relies on the loop for ``_ensure_resolved``, ``sock_connect``, ``create_future``,
    ``_make_datagram_transport`` and ``_debug``.
    """

    __slots__ = ()

    async def create_datagram_endpoint(
        self,
        protocol_factory,
        local_addr=None,
        remote_addr=None,
        *,
        family=0,
        proto=0,
        flags=0,
        reuse_port=None,
        allow_broadcast=None,
        sock=None,
    ):
        """Create a datagram endpoint; returns ``(transport, protocol)``.

        ``reuse_address`` is not accepted, as in the stdlib since 3.11 (SO_REUSEADDR lets
        another process steal a UDP port).
        """
        if sock is not None:
            if sock.type != socket.SOCK_DGRAM:
                raise ValueError(f"A {_SOCK_KIND} was expected, got {sock!r}")
            if (
                local_addr
                or remote_addr
                or family
                or proto
                or flags
                or reuse_port
                or allow_broadcast
            ):
                opts = {
                    "local_addr": local_addr,
                    "remote_addr": remote_addr,
                    "family": family,
                    "proto": proto,
                    "flags": flags,
                    "reuse_port": reuse_port,
                    "allow_broadcast": allow_broadcast,
                }
                problems = ", ".join(f"{k}={v}" for k, v in opts.items() if v)
                raise ValueError(
                    f"socket modifier keyword arguments can not be used "
                    f"when sock is specified. ({problems})"
                )
            sock.setblocking(False)
            r_addr = None
        else:
            addr_pairs_info = await self._datagram_addr_pairs(
                local_addr, remote_addr, family, proto, flags
            )
            sock, r_addr = await self._datagram_socket(
                addr_pairs_info, local_addr, remote_addr, reuse_port, allow_broadcast
            )

        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_datagram_transport(sock, protocol, r_addr, waiter)
        if self._debug:
            if local_addr:
                logger.info(
                    "Datagram endpoint local_addr=%r remote_addr=%r created: (%r, %r)",
                    local_addr,
                    remote_addr,
                    transport,
                    protocol,
                )
            else:
                logger.debug(
                    "Datagram endpoint remote_addr=%r created: (%r, %r)",
                    remote_addr,
                    transport,
                    protocol,
                )
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def _datagram_addr_pairs(self, local_addr, remote_addr, family, proto, flags):
        """``[((family, proto), (local_address, remote_address)), ...]`` to try in order."""
        if not (local_addr or remote_addr):
            if family == 0:
                raise ValueError("unexpected address family")
            return [((family, proto), (None, None))]
        if hasattr(socket, "AF_UNIX") and family == socket.AF_UNIX:
            for addr in (local_addr, remote_addr):
                if addr is not None and not isinstance(addr, str):
                    raise TypeError("string is expected")
            if local_addr and local_addr[0] not in (0, "\x00"):
                _remove_stale_unix_socket(local_addr)
            return [((family, proto), (local_addr, remote_addr))]

        # Group the resolved addresses by (family, proto), keeping getaddrinfo's order.
        addr_infos = {}
        for idx, addr in ((0, local_addr), (1, remote_addr)):
            if addr is None:
                continue
            if not (isinstance(addr, tuple) and len(addr) == 2):
                raise TypeError("2-tuple is expected")
            infos = await self._ensure_resolved(
                addr, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags, loop=self
            )
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            for fam, _, pro, _, address in infos:
                addr_infos.setdefault((fam, pro), [None, None])[idx] = address

        # Only pairs with an address for each side that was asked for.
        pairs = [
            (key, pair)
            for key, pair in addr_infos.items()
            if not ((local_addr and pair[0] is None) or (remote_addr and pair[1] is None))
        ]
        if not pairs:
            raise ValueError("can not get address information")
        return pairs

    async def _datagram_socket(
        self, addr_pairs_info, local_addr, remote_addr, reuse_port, allow_broadcast
    ):
        """The first socket that could be set up, and its remote address (or None)."""
        exceptions = []
        for (family, proto), (local_address, remote_address) in addr_pairs_info:
            sock = None
            r_addr = None
            try:
                sock = socket.socket(family=family, type=socket.SOCK_DGRAM, proto=proto)
                if reuse_port:
                    _set_reuseport(sock)
                if allow_broadcast:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setblocking(False)
                if local_addr:
                    sock.bind(local_address)
                if remote_addr:
                    # A broadcast endpoint stays unconnected: replies come from other hosts.
                    if not allow_broadcast:
                        await self.sock_connect(sock, remote_address)
                    r_addr = remote_address
            except OSError as exc:
                if sock is not None:
                    sock.close()
                exceptions.append(exc)
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
            else:
                return sock, r_addr
        raise exceptions[0]
