"""Echo and HTTP servers for the network workloads, on an event loop chosen by name.

``run.py`` starts one server process per (workload, loop, repetition)::

    python benchmarks/servers.py KIND LOOP ADDR [--path DIR]

KIND is how the echo is written, with ordinary asyncio code that runs unchanged on every loop:

- ``protocol``: ``loop.create_server`` / ``create_unix_server`` with an ``asyncio.Protocol``
  whose ``data_received`` writes the bytes back (``transport.write``);
- ``streams``: ``asyncio.start_server`` / ``start_unix_server`` (the stdlib's streams,
  unmodified, bound before the loop's module is imported, since rsloop replaces
  ``asyncio.start_server`` on import): ``await reader.read(65536)``, ``writer.write``,
  ``await writer.drain()``;
- ``sock``: a listening socket and ``loop.sock_accept``, then per connection a task doing
  ``await loop.sock_recv(conn, 65536)`` and ``await loop.sock_sendall(conn, data)``;
- ``http``: ``loop.create_server`` with an ``asyncio.Protocol`` that feeds what it receives
  to an ``httptools.HttpRequestParser`` and answers every complete request, from
  ``on_message_complete``, with the same small fixed ``200 OK`` (``HTTP_RESPONSE``; the
  Rust ceiling ``loadgen http-server`` sends the same bytes). Responses are written as the
  requests complete, so pipelined requests are answered in order; the connection stays open
  unless the request asks to close it (``should_keep_alive``). httptools is imported only
  for this kind.

ADDR is ``tcp:HOST:PORT`` (port 0: any free port) or ``unix:/path``. With ``--tls-cert CERT
--tls-key KEY`` the ``protocol`` and ``streams`` servers speak TLS (``ssl=`` an
``ssl.SSLContext(PROTOCOL_TLS_SERVER)`` with that certificate, the stdlib's defaults
otherwise). LOOP is one of ``workloads.LOOPS`` (asyncio, uvloop, rloop, rsloop, ferroloop),
created the same way as for the in-process workloads.

Before anything else the process allocates and frees one 1 MiB block (``bytearray(1 << 20)``,
then ``del``), the same for every loop, so glibc's dynamic mmap threshold is in its steady
state, and raises its soft RLIMIT_NOFILE to the hard limit (``mem_idle_*`` holds thousands of
connections; a limit that is too low shows up as an error cell). Once it accepts
connections it prints ``LISTENING tcp:HOST:PORT`` (the real port) or ``LISTENING unix:/path``
on stdout, then serves until it is killed. A failure before that prints ``ERROR <reason>``
and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import ssl
import sys
import traceback
from typing import Any

from workloads import ALLOC_WARMUP_BYTES, LOOPS, _import_loop

# The stdlib's stream servers, bound before any loop module is imported: importing rsloop
# replaces asyncio.start_server and asyncio.open_connection with rsloop's own.
STDLIB_START_SERVER = asyncio.streams.start_server
STDLIB_START_UNIX_SERVER = asyncio.streams.start_unix_server

KINDS = ("protocol", "streams", "sock", "http")
READ_SIZE = 65536
BACKLOG = 1024

# The HTTP server's answer to every request; `loadgen http-server` sends the same bytes.
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 13\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"Hello, World!"
)
HTTP_RESPONSE_CLOSE = HTTP_RESPONSE.replace(b"keep-alive", b"close")
HTTP_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class EchoProtocol(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining, parsed by httptools (C, llhttp).

    Each complete request gets ``HTTP_RESPONSE`` from ``on_message_complete``, which the
    parser calls in request order inside ``feed_data``: pipelined requests are answered in
    order, one ``transport.write`` each, as a plain asyncio server would.
    """

    transport: asyncio.Transport

    def __init__(self) -> None:
        import httptools  # only the http kind needs it

        self.errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.errors:
            self.transport.write(HTTP_BAD_REQUEST)
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        if self.parser.should_keep_alive():
            self.transport.write(HTTP_RESPONSE)
        else:
            self.transport.write(HTTP_RESPONSE_CLOSE)
            self.transport.close()


async def stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def sock_echo(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    try:
        while True:
            data = await loop.sock_recv(conn, READ_SIZE)
            if not data:
                break
            await loop.sock_sendall(conn, data)
    except ConnectionError:
        pass
    finally:
        conn.close()


async def sock_accept_loop(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    tasks: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(sock_echo(loop, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def parse_addr(addr: str) -> tuple[str, Any]:
    kind, _, rest = addr.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return "tcp", (host, int(port))
    if kind == "unix" and rest:
        return "unix", rest
    raise ValueError(f"bad address {addr!r}: expected tcp:HOST:PORT or unix:/path")


def listening_socket(family: str, where: Any) -> socket.socket:
    if family == "tcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    else:
        if os.path.exists(where):
            os.unlink(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(where)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def start(
    loop: asyncio.AbstractEventLoop, kind: str, addr: str, tls: ssl.SSLContext | None = None
) -> tuple[str, Any]:
    """Start serving; returns the address to print and the server object (kept alive)."""
    family, where = parse_addr(addr)
    if kind == "sock":
        if tls is not None:
            raise ValueError("the sock_* server has no TLS")
        sock = listening_socket(family, where)
        task = loop.create_task(sock_accept_loop(loop, sock))
        return shown_addr(family, sock), (sock, task)
    if kind in ("protocol", "http"):
        if kind == "http":
            import httptools  # noqa: F401  (missing: an error before LISTENING, not per connection)
        factory = HttpProtocol if kind == "http" else EchoProtocol
        if family == "tcp":
            server = await loop.create_server(
                factory, where[0], where[1], backlog=BACKLOG, reuse_address=True, ssl=tls
            )
        else:
            server = await loop.create_unix_server(factory, where, backlog=BACKLOG, ssl=tls)
    elif kind == "streams":
        if family == "tcp":
            server = await STDLIB_START_SERVER(
                stream_echo, where[0], where[1], backlog=BACKLOG, reuse_address=True, ssl=tls
            )
        else:
            server = await STDLIB_START_UNIX_SERVER(stream_echo, where, backlog=BACKLOG, ssl=tls)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return shown_addr(family, server.sockets[0]), server


def shown_addr(family: str, sock: Any) -> str:
    name = sock.getsockname()
    if family == "tcp":
        return f"tcp:{name[0]}:{name[1]}"
    return f"unix:{name}"


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the memory workloads hold thousands of
    connections, and the default soft limit (often 1,024) would make accept fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # the run's error cells will say which connection could not be accepted


def main(argv: list[str] | None = None) -> int:
    # 1. allocator steady state, the same for every loop (as in workloads.measure)
    block = bytearray(ALLOC_WARMUP_BYTES)
    del block
    raise_nofile()

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("loop", choices=LOOPS)
    parser.add_argument("addr")
    parser.add_argument("--path", action="append", default=[], help="prepend DIR to sys.path")
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    sys.path[:0] = args.path
    try:
        new_loop, _ = _import_loop(args.loop)
        # After the loop's import: rsloop tracks certificates loaded into SSL contexts.
        tls = None
        if args.tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        loop = new_loop()
        asyncio.set_event_loop(loop)
        shown, keep = loop.run_until_complete(start(loop, args.kind, args.addr, tls))
    except BaseException as exc:  # reported as data: the parent makes an error cell of it
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            where = "/".join(frames[-1].filename.split("/")[-2:])
            where = f" (raised in {frames[-1].name}, {where}:{frames[-1].lineno})"
        else:
            where = ""
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(f"ERROR {what}{where}".replace("\n", " "), flush=True)
        return 1
    print(f"LISTENING {shown}", flush=True)
    try:
        loop.run_forever()
    finally:
        del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
