"""Helpers shared by the stream networking tests (test_tcp.py, test_unix.py).

Everything here uses only the public asyncio API, so that the same scenario judges the
stdlib loop and ferroloop.  The main pieces:

* ``pattern(n)`` -- a deterministic pseudo-random payload; ``assert_bytes_equal`` compares
  payloads of any size and reports the first differing offset (never a 100 MiB diff).
* ``run(loop, coro, timeout)`` -- ``run_until_complete`` under an ``asyncio.timeout`` guard,
  so a missing wake-up fails the test instead of hanging it.
* ``Recorder`` / ``BufferedRecorder`` -- protocols that record every callback in order
  (``events``), the bytes received, and resolve futures ``made`` / ``eof`` / ``lost``.
* ``Accepting`` -- a server protocol factory that hands out the accepted protocols.
* ``TcpEndpoint`` / ``UnixEndpoint`` -- how to listen and connect for one address family,
  and ``Session``, which owns the servers, transports and sockets of one scenario and
  closes whatever is still open on exit (so a failing test does not leak ResourceWarnings
  into the next one).
* ``protocol_echo`` / ``buffered_echo`` / ``streams_echo`` -- the echo round trips the
  TCP and Unix tests both run.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct

import pytest

KiB = 1024
MiB = 1024 * KiB

ECHO_SIZES = [
    pytest.param(1, id="1B"),
    pytest.param(KiB, id="1KiB"),
    pytest.param(MiB, id="1MiB"),
    pytest.param(100 * MiB, id="100MiB"),
]

# A prime period: lost, duplicated or reordered chunks (whose sizes are powers of two or
# socket-buffer sized) can never line up with it, so content mismatches are always caught.
PATTERN_PERIOD = 1_048_573


@functools.cache
def _pattern_block() -> bytes:
    return random.Random(0xF3770).randbytes(PATTERN_PERIOD)


def pattern(n: int, offset: int = 0) -> bytes:
    """*n* bytes of a fixed pseudo-random stream, starting at *offset*."""
    block = _pattern_block()
    start = offset % PATTERN_PERIOD
    reps = (start + n) // PATTERN_PERIOD + 1
    return (block * reps)[start : start + n]


async def pattern_chunks(size: int, step: int = 65_521):
    """``pattern(size)`` as an async iterator of *step*-byte chunks (a streamed body),
    yielding to the loop between chunks; the odd default size crosses every read boundary.
    """
    offset = 0
    while offset < size:
        n = min(step, size - offset)
        yield pattern(n, offset)
        offset += n
        await asyncio.sleep(0)


def assert_bytes_equal(got, expected) -> None:
    """Byte-for-byte comparison with a short report (first differing offset)."""
    got = bytes(got)
    expected = bytes(expected)
    if got == expected:
        return
    limit = min(len(got), len(expected))
    step = 64 * KiB
    first = limit
    for start in range(0, limit, step):
        if got[start : start + step] != expected[start : start + step]:
            first = next(i for i in range(start, min(start + step, limit)) if got[i] != expected[i])
            break
    pytest.fail(
        f"payload mismatch: got {len(got)} bytes, expected {len(expected)}; first difference "
        f"at offset {first}: got {got[first : first + 16]!r}, "
        f"expected {expected[first : first + 16]!r}",
        pytrace=False,
    )


def run(loop, coro, timeout: float = 10.0):
    """``loop.run_until_complete(coro)``, failing with TimeoutError after *timeout* s."""

    async def guarded():
        async with asyncio.timeout(timeout):
            return await coro

    return loop.run_until_complete(guarded())


def collapse(events: list[str]) -> list[str]:
    """Merge runs of the same event: ``made data data eof lost`` -> ``made data eof lost``."""
    out: list[str] = []
    for event in events:
        if not out or out[-1] != event:
            out.append(event)
    return out


def lifecycle(events: list[str]) -> list[str]:
    """``collapse`` without the flow-control events (pause/resume writing)."""
    return collapse([e for e in events if e not in ("pause", "resume")])


def _settle(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


class Recorder(asyncio.Protocol):
    """Records every callback, in order, in ``events``; collects the bytes received.

    ``eof_result`` is what ``eof_received`` returns.  ``pauses`` / ``resumes`` hold the
    transport's write buffer size at each ``pause_writing`` / ``resume_writing`` call.
    """

    def __init__(self, eof_result=None):
        loop = asyncio.get_running_loop()
        self.events: list[str] = []
        self.data = bytearray()
        self.chunk_types: set[type] = set()
        self.transport = None
        self.eof_result = eof_result
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.pauses: list[int] = []
        self.resumes: list[int] = []
        self.resumed = loop.create_future()

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        _settle(self.made, transport)

    def data_received(self, data):
        self.events.append("data")
        self.chunk_types.add(type(data))
        self.data += data

    def eof_received(self):
        self.events.append("eof")
        _settle(self.eof, None)
        return self.eof_result

    def connection_lost(self, exc):
        self.events.append("lost")
        _settle(self.lost, exc)

    def pause_writing(self):
        self.events.append("pause")
        self.pauses.append(self.transport.get_write_buffer_size())

    def resume_writing(self):
        self.events.append("resume")
        self.resumes.append(self.transport.get_write_buffer_size())
        _settle(self.resumed, None)


class EchoServer(Recorder):
    """Writes back everything it receives; closes (after flushing) on EOF."""

    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)


class BufferedRecorder(asyncio.BufferedProtocol):
    """BufferedProtocol that reads straight into a preallocated buffer.

    *expected* sizes the buffer (so a 100 MiB payload is received without copies); bytes
    beyond it go to a scratch buffer and are counted in ``overflow``.  With ``echo=True``
    every chunk is written back.
    """

    def __init__(self, expected: int = 256 * KiB, echo: bool = False, eof_result=None):
        loop = asyncio.get_running_loop()
        self.events: list[str] = []
        self.buffer = bytearray(max(expected, 1))
        self.view = memoryview(self.buffer)
        self.nbytes = 0
        self.total = 0
        self.overflow = 0
        self._scratch = bytearray(64 * KiB)
        self.echo = echo
        self.eof_result = eof_result
        self.transport = None
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self._in_scratch = False

    @property
    def data(self) -> bytes:
        return bytes(self.view[: self.nbytes])

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        _settle(self.made, transport)

    def get_buffer(self, sizehint):
        self.events.append("get_buffer")
        if self.echo:
            self.nbytes = 0  # an echo server reuses its buffer for every chunk
        if self.nbytes < len(self.buffer):
            self._in_scratch = False
            return self.view[self.nbytes :]
        self._in_scratch = True
        return self._scratch

    def buffer_updated(self, nbytes):
        self.events.append("buffer_updated")
        self.total += nbytes
        if self._in_scratch:
            self.overflow += nbytes
            return
        if self.echo:
            self.transport.write(bytes(self.view[:nbytes]))
        self.nbytes += nbytes

    def eof_received(self):
        self.events.append("eof")
        _settle(self.eof, None)
        return self.eof_result

    def connection_lost(self, exc):
        self.events.append("lost")
        _settle(self.lost, exc)


class Accepting:
    """Server protocol factory: ``cls(**kwargs)`` per connection; ``await next()``."""

    def __init__(self, cls=Recorder, **kwargs):
        self.cls = cls
        self.kwargs = kwargs
        self.protocols: list = []
        self._taken = 0

    def __call__(self):
        protocol = self.cls(**self.kwargs)
        self.protocols.append(protocol)
        return protocol

    async def next(self):
        """The next accepted protocol, once its connection_made has run."""
        index = self._taken
        self._taken += 1
        while len(self.protocols) <= index:
            await asyncio.sleep(0.001)
        protocol = self.protocols[index]
        await protocol.made
        return protocol


# --------------------------------------------------------------------------- endpoints


class TcpEndpoint:
    family = socket.AF_INET

    def __init__(self, host: str = "127.0.0.1", family=socket.AF_INET):
        self.host = host
        self.family = family

    async def create_server(self, factory, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, self.host, 0, **kwargs)

    @staticmethod
    def address(server):
        return server.sockets[0].getsockname()

    async def create_connection(self, factory, address, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.create_connection(factory, address[0], address[1], **kwargs)

    async def start_server(self, callback, **kwargs):
        return await asyncio.start_server(callback, self.host, 0, **kwargs)

    async def open_connection(self, address, **kwargs):
        return await asyncio.open_connection(address[0], address[1], **kwargs)

    def raw_listener(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        sock.listen(8)
        return sock


class UnixEndpoint:
    family = socket.AF_UNIX

    def __init__(self, path):
        self.path = path

    async def create_server(self, factory, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.create_unix_server(factory, self.path, **kwargs)

    @staticmethod
    def address(server):
        return server.sockets[0].getsockname()

    async def create_connection(self, factory, address, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.create_unix_connection(factory, address, **kwargs)

    async def start_server(self, callback, **kwargs):
        return await asyncio.start_unix_server(callback, self.path, **kwargs)

    async def open_connection(self, address, **kwargs):
        return await asyncio.open_unix_connection(address, **kwargs)

    def raw_listener(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(8)
        return sock


class Session:
    """Owns the servers, protocols, stream writers and raw sockets of one scenario.

    ``async with Session(endpoint) as net:`` -- on exit, every transport that is not
    closing is aborted, servers are closed and awaited, raw sockets are closed, and the
    loop runs a few iterations so that the pending connection_lost calls happen.
    """

    def __init__(self, endpoint):
        self.ep = endpoint
        self.servers: list = []
        self.protocols: list = []
        self.writers: list = []
        self.socks: list[socket.socket] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        for protocol in self.protocols:
            transport = getattr(protocol, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        for writer in self.writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        for sock in self.socks:
            sock.close()
        for _ in range(3):
            await asyncio.sleep(0)

    def track(self, factory):
        def tracked():
            protocol = factory()
            self.protocols.append(protocol)
            return protocol

        return tracked

    async def serve(self, factory, **kwargs):
        server = await self.ep.create_server(self.track(factory), **kwargs)
        self.servers.append(server)
        return server

    async def connect(self, factory, address, **kwargs):
        transport, protocol = await self.ep.create_connection(
            self.track(factory), address, **kwargs
        )
        return transport, protocol

    async def start_server(self, callback, **kwargs):
        server = await self.ep.start_server(callback, **kwargs)
        self.servers.append(server)
        return server

    async def open_connection(self, address, **kwargs):
        reader, writer = await self.ep.open_connection(address, **kwargs)
        self.writers.append(writer)
        return reader, writer

    def raw_listener(self) -> socket.socket:
        sock = self.ep.raw_listener()
        self.socks.append(sock)
        return sock

    async def connect_raw_peer(self, factory=Recorder):
        """A transport connected to a plain socket that only reads when told to.

        Returns ``(transport, protocol, peer)``; *peer* is the accepted, non-blocking
        socket (read it with ``loop.sock_recv`` or ``recv_until_eof``).
        """
        listener = self.raw_listener()
        transport, protocol = await self.connect(factory, listener.getsockname())
        peer, _ = listener.accept()  # already in the accept queue: does not block
        peer.setblocking(False)
        self.socks.append(peer)
        return transport, protocol, peer


class Keeper(asyncio.Protocol):
    """Keeps every third chunk, a memoryview of the next, drops the one after (which the
    loop may then refill); checks each chunk's hash against a fresh copy's as it comes."""

    def __init__(self):
        self.kept, self.views, self.hashes_agree = [], [], []

    def data_received(self, data):
        which = len(self.hashes_agree) % 3
        self.hashes_agree.append(hash(data) == hash(bytes(bytearray(data))))
        if which == 0:
            self.kept.append(data)
        elif which == 1:
            self.views.append(memoryview(data))

    def assert_intact(self, messages: list[bytes]) -> None:
        """*messages* arrived one per call, kept ones unchanged, every hash fresh."""
        assert len(self.hashes_agree) == len(messages)  # one read per message
        assert all(self.hashes_agree)
        assert self.kept == messages[0::3]
        assert [bytes(v) for v in self.views] == messages[1::3]


async def recv_until_eof(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read *sock* with ``loop.sock_recv`` until EOF (or until *limit* bytes arrived)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while limit is None or len(got) < limit:
        chunk = await loop.sock_recv(sock, 1 * MiB)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def reset(sock: socket.socket) -> None:
    """Close *sock* so that the peer gets a RST (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fill_until_buffered(transport, chunk: bytes, limit: int = 256 * MiB) -> bytes:
    """Write *chunk* until the transport buffers data (the peer does not read).

    Returns everything written.  Runs without yielding to the loop.
    """
    written = bytearray()
    while transport.get_write_buffer_size() == 0:
        transport.write(chunk)
        written += chunk
        assert len(written) < limit, "the kernel never stopped accepting data"
    return bytes(written)


# --------------------------------------------------------------------------- echo scenarios


async def protocol_echo(endpoint, payload: bytes):
    """Recorder client -> EchoServer; write, write_eof, wait for both sides to close."""
    async with Session(endpoint) as net:
        accepted = Accepting(EchoServer)
        server = await net.serve(accepted)
        transport, client = await net.connect(Recorder, endpoint.address(server))
        transport.write(payload)
        transport.write_eof()
        client_exc = await client.lost
        srv = await accepted.next()
        server_exc = await srv.lost
    return client, srv, client_exc, server_exc


async def buffered_echo(endpoint, payload: bytes):
    """BufferedRecorder client -> BufferedRecorder(echo=True) server."""
    async with Session(endpoint) as net:
        accepted = Accepting(BufferedRecorder, echo=True)
        server = await net.serve(accepted)
        transport, client = await net.connect(
            lambda: BufferedRecorder(expected=len(payload)), endpoint.address(server)
        )
        transport.write(payload)
        transport.write_eof()
        client_exc = await client.lost
        srv = await accepted.next()
        server_exc = await srv.lost
    return client, srv, client_exc, server_exc


async def streams_echo(endpoint, payload: bytes):
    """open_connection client -> start_server echo handler; returns (received, handled)."""
    loop = asyncio.get_running_loop()
    handled = loop.create_future()

    async def handle(reader, writer):
        total = 0
        try:
            while chunk := await reader.read(256 * KiB):
                total += len(chunk)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()
            _settle(handled, total)

    async with Session(endpoint) as net:
        server = await net.start_server(handle)
        reader, writer = await net.open_connection(endpoint.address(server))

        async def send():
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await reader.read()
        await sender
        at_eof = reader.at_eof()
        writer.close()
        await writer.wait_closed()
        handled_bytes = await handled
    return received, handled_bytes, at_eof
