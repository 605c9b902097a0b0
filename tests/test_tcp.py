"""TCP stream transports: create_connection / create_server, protocols and streams.

Every test runs on the stdlib loop and on ferroloop (the ``loop`` fixture).  The helpers
(payload pattern, recording protocols, the ``Session`` that closes everything, the echo
scenarios) live in ``netutil.py``.  Each scenario runs under a timeout, so a missing
wake-up fails the test instead of hanging it.
"""

from __future__ import annotations

import array
import asyncio
import contextvars
import errno
import os
import platform
import resource
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
from netutil import (
    ECHO_SIZES,
    Accepting,
    BufferedRecorder,
    EchoServer,
    Keeper,
    KiB,
    MiB,
    Recorder,
    Session,
    TcpEndpoint,
    assert_bytes_equal,
    buffered_echo,
    collapse,
    fill_until_buffered,
    lifecycle,
    pattern,
    protocol_echo,
    recv_until_eof,
    reset,
    run,
    streams_echo,
)

pytestmark = pytest.mark.timeout(60)

DEFAULT_LIMITS = (16 * KiB, 64 * KiB)  # (low, high), as get_write_buffer_limits() returns


@pytest.fixture
def tcp():
    return TcpEndpoint()


async def wait_for_bytes(protocol, n: int) -> None:
    """Wait until *protocol* (a Recorder) has received at least *n* bytes."""
    while len(protocol.data) < n:
        await asyncio.sleep(0.001)


async def wait_until_flushed(transport) -> None:
    while transport.get_write_buffer_size():
        await asyncio.sleep(0.001)


async def recv_exactly(sock, n: int) -> bytes:
    """Read exactly *n* more bytes from *sock* (fails on a premature EOF)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def refused_address():
    """A bound, not listening TCP socket: connecting to its address is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# --------------------------------------------------------------------------- echo


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_protocol_echo_returns_every_byte_in_order(loop, tcp, size):
    payload = pattern(size)
    client, srv, client_exc, server_exc = run(loop, protocol_echo(tcp, payload), timeout=30)
    assert_bytes_equal(client.data, payload)
    assert_bytes_equal(srv.data, payload)
    assert client_exc is None
    assert server_exc is None
    assert lifecycle(client.events) == ["made", "data", "eof", "lost"]
    assert lifecycle(srv.events) == ["made", "data", "eof", "lost"]


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_buffered_protocol_echo_returns_every_byte_in_order(loop, tcp, size):
    payload = pattern(size)
    client, srv, client_exc, server_exc = run(loop, buffered_echo(tcp, payload), timeout=30)
    assert client.overflow == 0
    assert_bytes_equal(client.data, payload)
    assert srv.total == size
    assert client_exc is None
    assert server_exc is None
    assert client.events[0] == "made"
    assert client.events[-2:] == ["eof", "lost"]


@pytest.mark.parametrize("size", ECHO_SIZES)
def test_streams_echo_returns_every_byte_in_order(loop, tcp, size):
    payload = pattern(size)
    received, handled, at_eof = run(loop, streams_echo(tcp, payload), timeout=30)
    assert_bytes_equal(received, payload)
    assert handled == size
    assert at_eof


class SizeRecorder(Recorder):
    """A Recorder that also keeps the size of every ``data_received`` chunk."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def data_received(self, data):
        self.sizes.append(len(data))
        super().data_received(data)


class SizeRecordingStreamReaderProtocol(asyncio.StreamReaderProtocol):
    """The stdlib's streams protocol, keeping the size of every chunk it is handed."""

    def __init__(self):
        self.reader = asyncio.StreamReader(limit=16 * MiB)
        super().__init__(self.reader)
        self.sizes: list[int] = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport  # for the Session to close it
        super().connection_made(transport)

    def data_received(self, data):
        self.sizes.append(len(data))
        super().data_received(data)


async def chunk_sizes_of_a_mib(net, factory):
    """The sizes of the chunks a MiB arrives in when it waits in the kernel first."""
    loop = asyncio.get_running_loop()
    payload = pattern(1 * MiB)
    transport, protocol, peer = await net.connect_raw_peer(factory)
    transport.pause_reading()
    sending = asyncio.ensure_future(loop.sock_sendall(peer, payload))
    await asyncio.sleep(0.05)  # let the kernel queue more than one read's worth
    transport.resume_reading()
    await sending
    while sum(protocol.sizes) < len(payload):
        await asyncio.sleep(0.001)
    return protocol.sizes


@pytest.mark.parametrize("factory", [SizeRecorder, SizeRecordingStreamReaderProtocol])
def test_one_read_hands_a_protocol_up_to_256_kib_as_the_stdlib_does(loop, tcp, factory):
    """The stdlib's max_size: a MiB waiting in the kernel comes in chunks of at most
    256 KiB and at least one that big, to the stdlib's streams as to any protocol."""

    async def main():
        async with Session(tcp) as net:
            return await chunk_sizes_of_a_mib(net, factory)

    sizes = run(loop, main())
    assert sum(sizes) == 1 * MiB
    assert max(sizes) == 256 * KiB


# Small, mid-sized and big, in an order that crosses every size the transport chooses
# its next read's buffer by (the size of the read before): 4 KiB, 64 KiB, 120 KiB, and a
# big read after a big one.
MIXED_READ_SIZES = (
    *(1 * KiB, 5 * KiB, 10 * KiB, 70 * KiB, 8 * KiB, 1, 50 * KiB),
    *(200 * KiB, 100 * KiB, 6 * KiB),
)


@pytest.mark.parametrize("factory", [SizeRecorder, SizeRecordingStreamReaderProtocol])
def test_reads_of_every_size_in_turn_arrive_whole_and_in_order_then_eof(loop, tcp, factory):
    """Messages of mixed sizes sent one at a time, each arriving as its own read(s), then
    EOF right after a mid-sized read: every byte in order, and the EOF seen."""

    async def main():
        async with Session(tcp) as net:
            transport, protocol, peer = await net.connect_raw_peer(factory)
            loop = asyncio.get_running_loop()
            payload = pattern(sum(MIXED_READ_SIZES))
            sent = 0
            for size in MIXED_READ_SIZES:
                await loop.sock_sendall(peer, payload[sent : sent + size])
                sent += size
                while sum(protocol.sizes) < sent:
                    await asyncio.sleep(0.001)
            peer.shutdown(socket.SHUT_WR)
            if isinstance(protocol, SizeRecorder):
                await protocol.eof
                received = bytes(protocol.data)
            else:
                received = await protocol.reader.read(-1)
                assert protocol.reader.at_eof()
            return payload, received

    payload, received = run(loop, main())
    assert_bytes_equal(received, payload)


def test_chunks_a_protocol_keeps_stay_as_they_arrived_and_dropped_ones_hash_afresh(loop, tcp):
    """Equal-sized messages, one read each: the chunks kept (as bytes or through a view)
    still hold what was sent once later ones arrive, and each new chunk hashes as its
    own contents, not as a chunk dropped before it."""
    messages = [bytes([i]) * KiB for i in range(30)]

    async def main():
        async with Session(tcp) as net:
            transport, protocol, peer = await net.connect_raw_peer(Keeper)
            for i, message in enumerate(messages):
                await asyncio.get_running_loop().sock_sendall(peer, message)
                while len(protocol.hashes_agree) <= i:
                    await asyncio.sleep(0.001)
            return protocol

    protocol = run(loop, main())
    protocol.assert_intact(messages)


def test_a_reset_after_a_mid_sized_read_is_a_connection_reset(loop, tcp):
    """The read after a mid-sized one fails with ECONNRESET: connection_lost gets it."""

    async def main():
        async with Session(tcp) as net:
            transport, protocol, peer = await net.connect_raw_peer(SizeRecorder)
            await asyncio.get_running_loop().sock_sendall(peer, pattern(10 * KiB))
            while sum(protocol.sizes) < 10 * KiB:
                await asyncio.sleep(0.001)
            reset(peer)
            net.socks.remove(peer)
            return await protocol.lost, protocol.events

    exc, events = run(loop, main())
    assert isinstance(exc, ConnectionResetError)
    assert lifecycle(events) == ["made", "data", "lost"]


def test_a_reset_after_a_big_streams_read_reaches_the_reader_after_the_data(loop, tcp):
    """A streams transport reads straight into a new block after a big read; when that
    read fails with ECONNRESET the reader still hands out the data, then the reset."""

    async def main():
        async with Session(tcp) as net:
            transport, protocol, peer = await net.connect_raw_peer(
                SizeRecordingStreamReaderProtocol
            )
            transport.pause_reading()  # the whole message waits, to arrive in one read
            await asyncio.get_running_loop().sock_sendall(peer, pattern(100 * KiB))
            await asyncio.sleep(0.05)
            transport.resume_reading()
            data = await protocol.reader.readexactly(100 * KiB)
            reset(peer)
            net.socks.remove(peer)
            with pytest.raises(ConnectionResetError):
                await protocol.reader.read(-1)
            return data, protocol.sizes

    data, sizes = run(loop, main())
    assert_bytes_equal(data, pattern(100 * KiB))
    assert max(sizes) >= 64 * KiB


STREAMS_ECHO_SERVER = """
import asyncio, sys
block = bytearray(1 << 20)  # a long-running process's allocator: glibc's mmap and trim
del block                   # thresholds grown to 1 and 2 MiB, as in the benchmarks

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

loop = new_loop()
loop.run_until_complete(main())
"""


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.ferroloop_only("the stdlib's reads depend on glibc's mmap threshold")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/stat")
def test_streams_echo_of_100_kib_messages_does_not_make_the_heap_shrink_and_regrow(
    loop, loop_factory_code
):
    """The stdlib's streams on our transport, 50 connections echoing 100 KiB messages:
    the server's heap settles. Reads copied into exact-size bytes made glibc trim the
    top of the heap and fault it back in, up to 20 page faults per message; big reads in
    a 256 KiB bytes shrunk in place, as socket.recv leaves them, bring it well under 1."""
    server = subprocess.Popen(
        [sys.executable, "-c", loop_factory_code + textwrap.dedent(STREAMS_ECHO_SERVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    size, conns, rounds = 100 * KiB, 50, 60
    payload = pattern(size)

    async def client(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            writer.write(payload)
            assert await reader.readexactly(size) == payload
        writer.close()
        await writer.wait_closed()

    async def main():
        await asyncio.gather(*(client(20) for _ in range(conns)))  # the heap's high water
        before = minor_faults(server.pid)
        await asyncio.gather(*(client(rounds) for _ in range(conns)))
        return minor_faults(server.pid) - before

    try:
        port = int(server.stdout.readline())
        faults = run(loop, main(), timeout=60)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
        server.stdout.close()
    assert faults / (conns * rounds) < 8


ALLOCATOR_SETTLED_BY_A_BIG_READ = """
import asyncio, ctypes, socket

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_alone(size):
    # glibc marks a block it serves with an mmap of its own in its size field (bit 2).
    # Freeing such a block raises the threshold to its size: each size is tried once.
    block = libc.malloc(size)
    flags = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(block)
    return bool(flags & 2)

async def big_reads():
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sizes = []

    class Reader(asyncio.Protocol):
        def data_received(self, data):
            sizes.append(len(data))

    transport, _ = await loop.connect_accepted_socket(Reader, ours)
    for _ in range(2):  # the read after a big one is the one that takes a 256 KiB block
        target = sum(sizes) + 100 * 1024
        transport.pause_reading()  # the whole message waits, to come in one read
        peer.sendall(bytes(100 * 1024))
        transport.resume_reading()
        while sum(sizes) < target:
            await asyncio.sleep(0)
    transport.close()
    peer.close()
    assert min(sizes) >= 64 * 1024, sizes

print(mapped_alone(512 * 1024))
new_loop().run_until_complete(big_reads())
print(mapped_alone(768 * 1024))
"""


GLIBC_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mmap threshold",
)


def mapped_alone_after_big_reads(loop_factory_code, **env) -> bool:
    """Whether a new process's glibc, which mapped a 512 KiB block by itself before the
    loop's big reads, still maps a 768 KiB one after them."""
    done = subprocess.run(
        [sys.executable, "-c", loop_factory_code + ALLOCATOR_SETTLED_BY_A_BIG_READ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    if before != "True":
        pytest.skip("this interpreter's start-up had already raised the threshold")
    return after == "True"


@pytest.mark.ferroloop_only("the stdlib's recv(256 KiB) maps a block per read in a new process")
@GLIBC_ONLY
def test_the_first_big_read_settles_glibcs_mmap_threshold(loop_factory_code):
    """A new process's glibc serves a 256 KiB read block with an mmap of its own (a page
    fault per 4 KiB read into, and a munmap), and a block shrunk before it is freed never
    raises that threshold. The loop's first big read settles it where a long-running
    process has it: blocks under 1 MiB come from the heap from then on."""
    assert not mapped_alone_after_big_reads(loop_factory_code)


@pytest.mark.ferroloop_only("the stdlib loop never touches the allocator's thresholds")
@GLIBC_ONLY
def test_an_mmap_threshold_the_user_fixed_stays_where_it_is(loop_factory_code):
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(256 * KiB)}
    assert mapped_alone_after_big_reads(loop_factory_code, **fixed)


def test_echo_over_ipv6_loopback(loop):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    ep = TcpEndpoint("::1", socket.AF_INET6)
    payload = pattern(64 * KiB)

    async def main():
        async with Session(ep) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted)
            address = ep.address(server)
            transport, client = await net.connect(Recorder, address)
            peername = transport.get_extra_info("peername")
            family = transport.get_extra_info("socket").family
            transport.write(payload)
            transport.write_eof()
            await client.lost
            await (await accepted.next()).lost
        return address, peername, family, client

    address, peername, family, client = run(loop, main())
    assert family == socket.AF_INET6
    assert peername == address
    assert len(peername) == 4 and peername[0] == "::1"
    assert_bytes_equal(client.data, payload)


@pytest.fixture
def enough_fds():
    """Make sure ~2,000 sockets can be open at once (raise the soft RLIMIT_NOFILE)."""
    needed = 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot open 2,000 sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousand_concurrent_connections_each_complete_a_round_trip(loop, tcp, enough_fds):
    n = 1000

    async def main():
        all_connected = asyncio.Event()
        connected = 0
        handled = 0

        async def handle(reader, writer):
            nonlocal handled
            data = await reader.read()
            writer.write(data[::-1])
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            handled += 1

        async def client(i):
            nonlocal connected
            reader, writer = await asyncio.open_connection(*address)
            try:
                connected += 1
                if connected == n:
                    all_connected.set()
                await all_connected.wait()  # all 1,000 connections are open at once
                message = b"%d:" % i + pattern(100 + i % 500, offset=i)
                writer.write(message)
                writer.write_eof()
                reply = await reader.read()
            finally:
                writer.close()
                await writer.wait_closed()
            return reply == message[::-1]

        async with Session(tcp) as net:
            server = await net.start_server(handle, backlog=n + 100)
            address = tcp.address(server)
            results = await asyncio.gather(*(client(i) for i in range(n)))
            while handled < n:
                await asyncio.sleep(0.001)
        return results

    results = run(loop, main(), timeout=45)
    assert results.count(True) == n


# --------------------------------------------------------------------------- half-close


def test_can_write_eof_is_true_for_client_and_server_transports(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, _ = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            return transport.can_write_eof(), srv.transport.can_write_eof()

    assert run(loop, main()) == (True, True)


@pytest.mark.parametrize("keep_open", [True, 1], ids=["True", "truthy"])
def test_eof_received_returning_true_keeps_transport_open_for_writing_back(loop, tcp, keep_open):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(Recorder, eof_result=keep_open)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            transport.write(b"request")
            transport.write_eof()
            srv = await accepted.next()
            await srv.eof
            await asyncio.sleep(0.02)  # a few iterations: nothing closes the transport
            open_after_eof = not srv.transport.is_closing() and "lost" not in srv.events
            srv.transport.write(b"reply to " + bytes(srv.data))
            srv.transport.write(b", sent after EOF")
            srv.transport.close()
            client_exc = await client.lost
            server_exc = await srv.lost
        return open_after_eof, client, srv, client_exc, server_exc

    open_after_eof, client, srv, client_exc, server_exc = run(loop, main())
    assert open_after_eof
    assert bytes(srv.data) == b"request"
    assert bytes(client.data) == b"reply to request, sent after EOF"
    assert (client_exc, server_exc) == (None, None)
    assert collapse(srv.events) == ["made", "data", "eof", "lost"]
    assert collapse(client.events) == ["made", "data", "eof", "lost"]


@pytest.mark.parametrize("result", [None, False], ids=["None", "False"])
def test_eof_received_returning_false_or_none_closes_transport(loop, tcp, result):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(Recorder, eof_result=result)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            transport.write(b"ping")
            transport.write_eof()
            srv = await accepted.next()
            await srv.eof
            closing_right_after_eof = srv.transport.is_closing()
            server_exc = await srv.lost
            client_exc = await client.lost
        return closing_right_after_eof, client, srv, client_exc, server_exc

    closing_right_after_eof, client, srv, client_exc, server_exc = run(loop, main())
    assert closing_right_after_eof
    assert bytes(srv.data) == b"ping"
    assert (client_exc, server_exc) == (None, None)
    assert srv.events == ["made", "data", "eof", "lost"]
    assert client.events == ["made", "eof", "lost"]


def test_write_after_write_eof_raises_runtime_error(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(b"last words")
            transport.write_eof()
            assert not transport.is_closing()
            with pytest.raises(RuntimeError, match=r"Cannot call write\(\) after write_eof\(\)"):
                transport.write(b"more")
            with pytest.raises(RuntimeError):
                transport.write(b"")  # even an empty write (the eof check comes first)
            with pytest.raises(RuntimeError, match="write_eof"):
                transport.writelines([b"more"])
            with pytest.raises(TypeError):
                transport.write("text")  # the type check comes before the eof check
            transport.write_eof()  # a second write_eof is a no-op
            received = await recv_until_eof(peer)
            # Only the write side is shut down: the transport still reads.
            await loop.sock_sendall(peer, b"answer")
            await wait_for_bytes(client, 6)
            peer.close()
            exc = await client.lost
        return received, client, exc

    received, client, exc = run(loop, main())
    assert received == b"last words"
    assert bytes(client.data) == b"answer"
    assert exc is None
    assert client.events == ["made", "data", "eof", "lost"]


def test_write_eof_shuts_down_only_after_buffered_data_is_sent(loop, tcp):
    payload = pattern(16 * MiB)

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(payload)
            buffered = transport.get_write_buffer_size()
            transport.write_eof()
            received = await recv_until_eof(peer)
            closing = transport.is_closing()
            peer.close()
            exc = await client.lost
        return buffered, received, closing, exc

    buffered, received, closing, exc = run(loop, main())
    assert buffered > 0, "precondition: the kernel did not take 16 MiB at once"
    assert_bytes_equal(received, payload)
    assert not closing
    assert exc is None


# --------------------------------------------------------------------------- write flow control


def test_default_write_buffer_limits_are_16_and_64_kib(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, _ = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            return transport.get_write_buffer_limits(), srv.transport.get_write_buffer_limits()

    assert run(loop, main()) == (DEFAULT_LIMITS, DEFAULT_LIMITS)


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        ((), {}, DEFAULT_LIMITS),
        ((), {"high": 1000}, (250, 1000)),
        ((), {"high": 1001}, (250, 1001)),
        ((), {"low": 100}, (100, 400)),
        ((), {"high": 100, "low": 100}, (100, 100)),
        ((), {"high": 100, "low": 0}, (0, 100)),
        ((), {"high": 0}, (0, 0)),
        ((2000, 30), {}, (30, 2000)),
    ],
    ids=["defaults", "high", "high-floor", "low", "equal", "low-zero", "zero", "positional"],
)
def test_set_write_buffer_limits_derives_the_missing_limit(loop, tcp, args, kwargs, expected):
    async def main():
        async with Session(tcp) as net:
            transport, _, _ = await net.connect_raw_peer()
            transport.set_write_buffer_limits(high=12345, low=123)
            transport.set_write_buffer_limits(*args, **kwargs)
            return transport.get_write_buffer_limits()

    assert run(loop, main()) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"high": 10, "low": 20},
        {"high": 0, "low": 1},
        {"high": -1},
        {"low": -1},
        {"high": 10, "low": -1},
    ],
    ids=["low-above-high", "zero-high", "negative-high", "negative-low", "negative-low-2"],
)
def test_set_write_buffer_limits_rejects_bad_limits_and_keeps_the_old_ones(loop, tcp, kwargs):
    async def main():
        async with Session(tcp) as net:
            transport, _, _ = await net.connect_raw_peer()
            transport.set_write_buffer_limits(high=5000, low=50)
            with pytest.raises(ValueError, match=r"high \(-?\d+\) must be >= low \(-?\d+\)"):
                transport.set_write_buffer_limits(**kwargs)
            return transport.get_write_buffer_limits()

    assert run(loop, main()) == (50, 5000)


def test_pause_writing_past_high_water_and_resume_writing_at_low_water(loop, tcp):
    # A fixed, small kernel send buffer: the transport's buffer then drains in several
    # steps, and resume_writing() must wait for the step that reaches the low-water mark.
    high, low, chunk = 1 * MiB, 256 * KiB, 64 * KiB
    source = pattern(16 * MiB)

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * KiB)
            transport.set_write_buffer_limits(high=high, low=low)
            written = 0
            while not client.pauses:  # the peer reads nothing: the buffer must fill up
                assert written + chunk <= len(source), "pause_writing() was never called"
                transport.write(source[written : written + chunk])
                written += chunk
            await asyncio.sleep(0.05)  # still paused: nothing drains the buffer
            paused_events = list(client.events)
            received = bytearray()
            while not client.resumed.done():
                received += await loop.sock_recv(peer, 64 * KiB)
            received += await recv_exactly(peer, written - len(received))
            await wait_until_flushed(transport)
            events = list(client.events)
        return written, paused_events, received, client, events

    written, paused_events, received, client, events = run(loop, main())
    assert paused_events == ["made", "pause"]
    assert len(client.pauses) == 1
    assert high < client.pauses[0] <= high + chunk
    assert len(client.resumes) == 1 and client.resumes[0] <= low
    assert events == ["made", "pause", "resume"]
    assert_bytes_equal(received, source[:written])


def test_pause_writing_is_called_inside_write_only_once_size_exceeds_high_water(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, _ = await net.connect_raw_peer()
            transport.set_write_buffer_limits(high=64 * MiB)
            fill_until_buffered(transport, pattern(256 * KiB))
            size = transport.get_write_buffer_size()
            transport.set_write_buffer_limits(high=size + 10, low=size)
            steps = [list(client.pauses)]
            transport.write(b"x" * 10)
            steps.append((transport.get_write_buffer_size() - size, list(client.pauses)))
            transport.write(b"y")  # now one byte over the high-water mark
            steps.append((transport.get_write_buffer_size() - size, list(client.pauses)))
            transport.write(b"z" * 1000)
            steps.append((transport.get_write_buffer_size() - size, list(client.pauses)))
        return size, steps, client

    size, steps, client = run(loop, main())
    assert steps == [
        [],
        (10, []),  # equal to the high-water mark: not paused
        (11, [size + 11]),  # above it: paused at once, from inside write()
        (1011, [size + 11]),  # already paused: not called again
    ]
    assert client.resumes == []


def test_lowering_high_water_below_buffered_size_pauses_at_once(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, _ = await net.connect_raw_peer()
            transport.set_write_buffer_limits(high=64 * MiB)
            fill_until_buffered(transport, pattern(256 * KiB))
            size = transport.get_write_buffer_size()
            before = list(client.pauses)
            transport.set_write_buffer_limits(high=size - 1)
            after_lowering = list(client.pauses)
            transport.set_write_buffer_limits(high=4 * size)  # does not resume by itself
            return size, before, after_lowering, list(client.resumes)

    size, before, after_lowering, resumes = run(loop, main())
    assert before == []
    assert after_lowering == [size]
    assert resumes == []


def test_get_write_buffer_size_counts_unsent_bytes(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            fresh = transport.get_write_buffer_size()
            transport.set_write_buffer_limits(high=64 * MiB)
            written = fill_until_buffered(transport, pattern(256 * KiB))
            size = transport.get_write_buffer_size()
            transport.write(b"a" * 1000)
            transport.write(bytearray(b"b" * 24))
            grown = transport.get_write_buffer_size() - size
            received = await recv_exactly(peer, len(written) + 1024)
            await wait_until_flushed(transport)
            drained = transport.get_write_buffer_size()
        return fresh, grown, drained, received, written

    fresh, grown, drained, received, written = run(loop, main())
    assert fresh == 0
    assert grown == 1024
    assert drained == 0
    assert_bytes_equal(received, written + b"a" * 1000 + b"b" * 24)


def test_pause_reading_stops_delivery_until_resume_reading(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            states = [srv.transport.is_reading()]
            srv.transport.pause_reading()
            states.append(srv.transport.is_reading())
            transport.write(b"sent while paused")
            transport.write_eof()
            await asyncio.sleep(0.05)
            events_while_paused = list(srv.events)
            srv.transport.resume_reading()
            states.append(srv.transport.is_reading())
            server_exc = await srv.lost
            client_exc = await client.lost
        return states, events_while_paused, srv, server_exc, client_exc

    states, events_while_paused, srv, server_exc, client_exc = run(loop, main())
    assert states == [True, False, True]
    assert events_while_paused == ["made"]  # neither data nor EOF while paused
    assert bytes(srv.data) == b"sent while paused"
    assert srv.events == ["made", "data", "eof", "lost"]
    assert (server_exc, client_exc) == (None, None)


def test_pause_and_resume_reading_are_idempotent_and_no_ops_once_closing(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            srv.transport.pause_reading()
            srv.transport.pause_reading()
            states = [srv.transport.is_reading()]
            srv.transport.resume_reading()
            srv.transport.resume_reading()
            states.append(srv.transport.is_reading())
            transport.write(b"once")
            await wait_for_bytes(srv, 4)
            await asyncio.sleep(0.02)
            srv.transport.close()
            states.append(srv.transport.is_reading())
            srv.transport.resume_reading()
            states.append(srv.transport.is_reading())
            srv.transport.pause_reading()
            await srv.lost
            await client.lost
        return states, srv

    states, srv = run(loop, main())
    assert states == [False, True, False, False]
    assert bytes(srv.data) == b"once"


def test_streams_drain_waits_while_the_peer_does_not_read(loop, tcp):
    payload = pattern(16 * MiB)

    async def main():
        async with Session(tcp) as net:
            listener = net.raw_listener()
            reader, writer = await net.open_connection(listener.getsockname())
            peer, _ = listener.accept()
            peer.setblocking(False)
            net.socks.append(peer)
            writer.write(payload)
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.sleep(0.05)
            blocked = not drain.done()
            received = await recv_exactly(peer, len(payload))
            await drain
            writer.close()
            await writer.wait_closed()
        return blocked, received

    blocked, received = run(loop, main())
    assert blocked
    assert_bytes_equal(received, payload)


# --------------------------------------------------------------------------- close and abort


def test_close_flushes_buffered_data_then_calls_connection_lost_none(loop, tcp):
    payload = pattern(16 * MiB)

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(payload)
            buffered = transport.get_write_buffer_size()
            transport.close()
            closing = transport.is_closing()
            await asyncio.sleep(0.05)  # the peer reads nothing: close cannot complete
            events_before_reading = list(client.events)
            received = await recv_until_eof(peer)
            exc = await client.lost
        return buffered, closing, events_before_reading, received, exc, client

    buffered, closing, events_before_reading, received, exc, client = run(loop, main())
    assert buffered > 0, "precondition: the kernel did not take 16 MiB at once"
    assert closing
    assert "lost" not in events_before_reading
    assert_bytes_equal(received, payload)  # everything, then EOF
    assert exc is None
    assert client.events.count("lost") == 1


def test_abort_discards_buffered_data_and_calls_connection_lost_none(loop, tcp):
    payload = pattern(16 * MiB)

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(payload)
            buffered = transport.get_write_buffer_size()
            transport.abort()
            state = (
                transport.is_closing(),
                transport.get_write_buffer_size(),
                "lost" in client.events,
            )
            exc = await client.lost
            transport.write(b"after abort")  # silently dropped
            received = await recv_until_eof(peer)
        return buffered, state, exc, received

    buffered, state, exc, received = run(loop, main())
    assert buffered > 0, "precondition: the kernel did not take 16 MiB at once"
    # is_closing() at once, buffer dropped at once, connection_lost() only scheduled.
    assert state == (True, 0, False)
    assert exc is None
    assert len(received) < len(payload)
    assert_bytes_equal(received, payload[: len(received)])


@pytest.mark.parametrize("first", ["close", "abort"])
def test_close_and_abort_call_connection_lost_exactly_once(loop, tcp, first):
    async def main():
        async with Session(tcp) as net:
            transport, client, _ = await net.connect_raw_peer()
            getattr(transport, first)()
            transport.close()
            transport.abort()
            transport.close()
            exc = await client.lost
            await asyncio.sleep(0.02)
        return exc, client.events

    exc, events = run(loop, main())
    assert exc is None
    assert events == ["made", "lost"]


def test_write_after_close_or_connection_lost_is_silently_dropped(loop, tcp, impl):
    # From 3.12 the stdlib's writelines() after connection_lost raises TypeError (it skips
    # write()'s check, gh-136234): pin the intended behaviour on ferroloop only there.
    check_writelines = impl == "ferroloop" or sys.version_info < (3, 12)

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(b"before close")
            await wait_until_flushed(transport)
            transport.close()
            transport.write(b"after close")
            exc = await client.lost
            transport.write(b"after connection_lost")
            if check_writelines:
                transport.writelines([b"and", b"more"])
            received = await recv_until_eof(peer)
        return exc, received

    exc, received = run(loop, main())
    assert exc is None
    assert received == b"before close"


@pytest.mark.parametrize(
    "data, type_name",
    [
        ("text", "str"),
        (42, "int"),
        (None, "NoneType"),
        ([b"list"], "list"),
        (array.array("B", b"ab"), "array"),
    ],
    ids=["str", "int", "None", "list", "array"],
)
def test_write_of_non_bytes_raises_type_error(loop, tcp, data, type_name):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            with pytest.raises(TypeError, match=f"bytes-like object, not '{type_name}'"):
                transport.write(data)
            transport.write(b"still usable")
            transport.write_eof()
            return await recv_until_eof(peer)

    assert run(loop, main()) == b"still usable"


def test_write_accepts_bytes_bytearray_memoryview_and_writelines(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            transport.write(b"a")
            transport.write(bytearray(b"b"))
            transport.write(memoryview(b"xcx")[1:2])
            transport.write(b"")
            transport.writelines([b"d", bytearray(b"e"), memoryview(b"f")])
            transport.writelines([])
            transport.write(TaggedBytes(b"g"))
            transport.write_eof()
            return await recv_until_eof(peer)

    assert run(loop, main()) == b"abcdefg"


class TaggedBytes(bytes):
    """A bytes subclass: written through the buffer protocol, unlike exact bytes."""


# --------------------------------------------------------------------------- errors


def test_peer_reset_while_reading_gives_connection_reset_error(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            reset(peer)
            exc = await client.lost
            return exc, transport.is_closing(), client.events

    exc, closing, events = run(loop, main())
    assert isinstance(exc, ConnectionResetError)
    assert exc.errno == errno.ECONNRESET
    assert closing
    assert events == ["made", "lost"]  # no eof_received for a reset


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "reading-paused"])
def test_peer_reset_while_writing_gives_connection_reset_error(loop, tcp, reading):
    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer()
            if not reading:
                transport.pause_reading()
            transport.write(pattern(16 * MiB))
            buffered = transport.get_write_buffer_size()
            reset(peer)
            exc = await client.lost
            return buffered, exc, transport.get_write_buffer_size(), client.events

    buffered, exc, size_after, events = run(loop, main())
    assert buffered > 0, "precondition: the kernel did not take 16 MiB at once"
    assert isinstance(exc, ConnectionResetError)
    assert size_after == 0
    assert "eof" not in events
    assert events[0] == "made" and events[-1] == "lost"


def test_create_connection_to_a_closed_port_raises_connection_refused(loop):
    made = []

    async def main():
        with refused_address() as sock:
            with pytest.raises(ConnectionRefusedError) as info:
                await loop.create_connection(lambda: made.append(1), *sock.getsockname())
        return info.value

    exc = run(loop, main())
    assert exc.errno == errno.ECONNREFUSED
    assert made == []  # the protocol factory is never called


def test_open_connection_to_a_closed_port_raises_connection_refused(loop):
    async def main():
        with refused_address() as sock:
            with pytest.raises(ConnectionRefusedError) as info:
                await asyncio.open_connection(*sock.getsockname())
        return info.value

    assert run(loop, main()).errno == errno.ECONNREFUSED


def test_create_server_on_a_port_in_use_raises_eaddrinuse(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            listener = net.raw_listener()
            host, port = listener.getsockname()
            with pytest.raises(OSError) as info:
                await loop.create_server(asyncio.Protocol, host, port)
            return info.value

    assert run(loop, main()).errno == errno.EADDRINUSE


class FailsIn:
    """Protocol classes whose named callback raises; ``raised`` is the exception."""

    class DataReceived(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.raised = ZeroDivisionError("data_received failed")
            raise self.raised

    class EofReceived(Recorder):
        def eof_received(self):
            super().eof_received()
            self.raised = LookupError("eof_received failed")
            raise self.raised

    class GetBuffer(BufferedRecorder):
        def get_buffer(self, sizehint):
            self.events.append("get_buffer")
            self.raised = ValueError("get_buffer failed")
            raise self.raised

    class GetBufferEmpty(BufferedRecorder):
        raised = None

        def get_buffer(self, sizehint):
            self.events.append("get_buffer")
            return bytearray()

    class BufferUpdated(BufferedRecorder):
        def buffer_updated(self, nbytes):
            super().buffer_updated(nbytes)
            self.raised = KeyError("buffer_updated failed")
            raise self.raised


@pytest.mark.parametrize(
    "cls, message, peer_sees_clean_eof",
    [
        (FailsIn.DataReceived, "Fatal error: protocol.data_received() call failed.", True),
        (FailsIn.EofReceived, "Fatal error: protocol.eof_received() call failed.", True),
        (FailsIn.GetBuffer, "Fatal error: protocol.get_buffer() call failed.", False),
        (FailsIn.GetBufferEmpty, "Fatal error: protocol.get_buffer() call failed.", False),
        (FailsIn.BufferUpdated, "Fatal error: protocol.buffer_updated() call failed.", True),
    ],
    ids=["data_received", "eof_received", "get_buffer", "get_buffer-empty", "buffer_updated"],
)
def test_protocol_callback_error_is_reported_closes_transport_and_loop_goes_on(
    loop, tcp, expect_loop_errors, cls, message, peer_sees_clean_eof
):
    async def main():
        async with Session(tcp) as net:
            made = []

            def first_fails():  # the first connection fails, later ones echo
                protocol = (cls if not made else EchoServer)()
                made.append(protocol)
                return protocol

            accepted = Accepting(first_fails)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            transport.write(b"trigger")
            transport.write_eof()
            srv = await accepted.next()
            server_exc = await srv.lost
            client_exc = await client.lost
            closing = srv.transport.is_closing()
            # The loop and the server keep working.
            transport2, client2 = await net.connect(Recorder, tcp.address(server))
            transport2.write(b"second connection")
            transport2.write_eof()
            await client2.lost
        return srv, server_exc, client_exc, closing, client2

    srv, server_exc, client_exc, closing, client2 = run(loop, main())
    assert len(expect_loop_errors) == 1
    context = expect_loop_errors[0]
    assert context["message"] == message
    assert context["exception"] is server_exc
    assert context["transport"] is srv.transport
    assert context["protocol"] is srv
    if cls is FailsIn.GetBufferEmpty:
        assert isinstance(server_exc, RuntimeError)
    else:
        assert server_exc is srv.raised
    assert srv.events.count("lost") == 1
    assert closing
    if peer_sees_clean_eof:
        assert client_exc is None
    assert bytes(client2.data) == b"second connection"


def test_pause_writing_error_is_reported_and_transport_keeps_working(loop, tcp, expect_loop_errors):
    payload = pattern(16 * MiB)

    class FailingPause(Recorder):
        def pause_writing(self):
            super().pause_writing()
            raise RuntimeError("pause_writing failed")

    async def main():
        async with Session(tcp) as net:
            transport, client, peer = await net.connect_raw_peer(FailingPause)
            transport.write(payload)
            closing = transport.is_closing()
            received = await recv_exactly(peer, len(payload))
            await client.resumed
            transport.close()
            await client.lost
        return transport, client, closing, received

    transport, client, closing, received = run(loop, main())
    assert len(expect_loop_errors) == 1
    context = expect_loop_errors[0]
    assert context["message"] == "protocol.pause_writing() failed"
    assert str(context["exception"]) == "pause_writing failed"
    assert context["transport"] is transport
    assert context["protocol"] is client
    assert not closing
    assert_bytes_equal(received, payload)
    assert client.events == ["made", "pause", "resume", "lost"]


# --------------------------------------------------------------------------- extra info, types


def test_get_extra_info_peername_and_sockname_match_both_ends(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            address = tcp.address(server)
            transport, client = await net.connect(Recorder, address)
            srv = await accepted.next()
            names = {
                "client peername": transport.get_extra_info("peername"),
                "client sockname": transport.get_extra_info("sockname"),
                "server peername": srv.transport.get_extra_info("peername"),
                "server sockname": srv.transport.get_extra_info("sockname"),
            }
            transport.close()
            await client.lost
            await srv.lost
            after_close = transport.get_extra_info("peername")
        return address, names, after_close

    address, names, after_close = run(loop, main())
    assert address[0] == "127.0.0.1"
    assert names["client peername"] == address
    assert names["server sockname"] == address
    assert names["server peername"] == names["client sockname"]
    assert names["client sockname"][0] == "127.0.0.1"
    assert names["client sockname"][1] not in (0, address[1])
    assert after_close == address  # still answered once the connection is gone


def test_get_extra_info_socket_is_a_usable_socket_object(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, _ = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            out = []
            for tr in (transport, srv.transport):
                sock = tr.get_extra_info("socket")
                fd = sock.fileno()
                out.append(
                    {
                        "fd": fd,
                        "is socket": fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode),
                        "family": sock.family,
                        "type": sock.type,
                        "sockname": sock.getsockname() == tr.get_extra_info("sockname"),
                        "peername": sock.getpeername() == tr.get_extra_info("peername"),
                        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    }
                )
            return out

    client_sock, server_sock = run(loop, main())
    assert client_sock["fd"] != server_sock["fd"]
    for info in (client_sock, server_sock):
        assert info["is socket"]
        assert info["family"] == socket.AF_INET
        assert info["type"] == socket.SOCK_STREAM
        assert info["sockname"] and info["peername"]
        assert info["nodelay"] != 0  # TCP transports disable Nagle's algorithm


def test_get_extra_info_returns_default_for_unknown_keys(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, _, _ = await net.connect_raw_peer()
            return (
                transport.get_extra_info("no such key"),
                transport.get_extra_info("no such key", "fallback"),
                transport.get_extra_info("peername", "fallback") != "fallback",
                transport.get_extra_info("socket", None) is not None,
            )

    assert run(loop, main()) == (None, "fallback", True, True)


def ipv6_endpoint():
    """A TcpEndpoint on ::1, or a skip when this machine has no IPv6 loopback."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    return TcpEndpoint("::1", socket.AF_INET6)


async def accepted_and_peer(net, ep):
    """``(server-side transport, its protocol, the client's plain blocking socket)``."""
    accepted = Accepting()
    server = await net.serve(accepted)
    peer = socket.create_connection(ep.address(server)[:2])
    net.socks.append(peer)
    srv = await accepted.next()
    return srv.transport, srv, peer


@pytest.mark.parametrize("side", ["accepted", "connected"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_extra_info_peername_available_after_peer_closed(loop, tcp, side, family):
    """The addresses are those the socket had when the transport was made.

    Asked for the first time only after the peer reset the connection (``getpeername()``
    fails by then) and again once the transport is closed, they are still reported, and
    ``socket`` still wraps the (now closed) socket, as the stdlib's constructor-time dict
    has them.
    """
    ep = tcp if family == "ipv4" else ipv6_endpoint()

    async def main():
        async with Session(ep) as net:
            if side == "accepted":
                transport, protocol, peer = await accepted_and_peer(net, ep)
            else:
                transport, protocol, peer = await net.connect_raw_peer()
            expected = (peer.getsockname(), peer.getpeername())
            transport.pause_reading()  # the reset goes unnoticed: the fd stays open
            sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
            reset(peer)
            await asyncio.sleep(0.05)
            with sock, pytest.raises(OSError) as gone:
                sock.getpeername()
            while_open = (
                transport.get_extra_info("peername"),
                transport.get_extra_info("sockname"),
            )
            transport.close()
            await protocol.lost
            after_close = (
                transport.get_extra_info("peername"),
                transport.get_extra_info("sockname"),
                transport.get_extra_info("socket").fileno(),
            )
            return expected, gone.value.errno, while_open, after_close

    expected, errno_gone, while_open, after_close = run(loop, main())
    assert errno_gone == errno.ENOTCONN  # precondition: the kernel forgot the peer
    assert while_open == expected
    assert after_close == (*expected, -1)


@pytest.mark.parametrize("side", ["accepted", "connected"])
def test_extra_info_first_asked_after_close_is_the_constructor_time_info(loop, tcp, side):
    """Nothing asked while connected: after ``connection_lost`` the addresses, the socket
    (closed) and the dict (``_extra``, keys in the stdlib's order) are all there."""

    async def main():
        async with Session(tcp) as net:
            if side == "accepted":
                transport, protocol, peer = await accepted_and_peer(net, tcp)
            else:
                transport, protocol, peer = await net.connect_raw_peer()
            expected = (peer.getsockname(), peer.getpeername())
            peer.close()
            await protocol.lost
            extra = transport._extra
            return expected, {
                "keys": list(extra),
                "peername": transport.get_extra_info("peername"),
                "sockname": transport.get_extra_info("sockname"),
                "socket fd": transport.get_extra_info("socket").fileno(),
                "socket family": transport.get_extra_info("socket").family,
                "same dict": transport._extra is extra,
                "same objects": all(
                    transport.get_extra_info(k) is extra[k] for k in ("peername", "sockname")
                ),
            }

    expected, got = run(loop, main())
    # The server's peername comes from accept() and is the caller's key, so it is first.
    keys = (
        ["peername", "socket", "sockname"]
        if side == "accepted"
        else ["socket", "sockname", "peername"]
    )
    assert got == {
        "keys": keys,
        "peername": expected[0],
        "sockname": expected[1],
        "socket fd": -1,
        "socket family": socket.AF_INET,
        "same dict": True,
        "same objects": True,
    }


def test_extra_info_of_other_names_is_the_default_and_caller_extra_is_kept(loop, tcp):
    """Names the transport does not provide give the default (before and after the dict
    is built); ``extra`` passed to ``_make_socket_transport`` is in the dict as given."""

    async def main():
        loop = asyncio.get_running_loop()
        async with Session(tcp) as net:
            listener = net.raw_listener()
            client = socket.create_connection(listener.getsockname())
            net.socks.append(client)
            peer, _ = listener.accept()
            net.socks.append(peer)
            client.setblocking(False)
            protocol = Recorder()
            marker = object()
            transport = loop._make_socket_transport(
                client, protocol, extra={"custom": marker, "peername": "given"}
            )
            await protocol.made
            plain_transport, _, _ = await net.connect_raw_peer()
            out = (
                plain_transport.get_extra_info("sslcontext"),
                plain_transport.get_extra_info("nope", "fallback"),
                plain_transport.get_extra_info("peername") is not None,
                plain_transport.get_extra_info("nope", "fallback"),
                transport.get_extra_info("custom") is marker,
                transport.get_extra_info("peername"),
                transport.get_extra_info("sockname") == client.getsockname(),
                list(transport._extra),
            )
            transport.abort()
            await protocol.lost
            return out

    assert run(loop, main()) == (
        None,
        "fallback",
        True,
        "fallback",
        True,
        "given",
        True,
        ["custom", "peername", "socket", "sockname"],
    )


def test_assigning_extra_replaces_what_get_extra_info_answers(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            transport, _, _ = await net.connect_raw_peer()
            transport._extra = {"x": 1}
            return (
                transport.get_extra_info("x"),
                transport.get_extra_info("peername", "gone"),
                transport._extra,
            )

    assert run(loop, main()) == (1, "gone", {"x": 1})


def test_transports_are_transport_instances_and_know_their_protocol(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            srv = await accepted.next()
            knows_protocol = [
                transport.get_protocol() is client,
                srv.transport.get_protocol() is srv,
            ]
            return transport, client, srv, knows_protocol

    transport, client, srv, knows_protocol = run(loop, main())
    for tr in (transport, srv.transport):
        assert isinstance(tr, asyncio.Transport)
        assert isinstance(tr, asyncio.ReadTransport)
        assert isinstance(tr, asyncio.WriteTransport)
    assert knows_protocol == [True, True]
    assert client.transport is transport  # connection_made got the returned transport
    assert srv.transport is not transport


def test_create_connection_returns_after_connection_made(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            server = await net.serve(Accepting())
            transport, client = await net.connect(Recorder, tcp.address(server))
            return list(client.events), client.transport is transport

    assert run(loop, main()) == (["made"], True)


def test_protocol_callbacks_run_in_order_exactly_once(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            for part in (b"first ", b"second ", b"third"):
                transport.write(part)
                await asyncio.sleep(0.005)
            transport.write_eof()
            await client.lost
            srv = await accepted.next()
            await srv.lost
            await asyncio.sleep(0.02)  # room for a duplicate callback to show up
        return client, srv

    client, srv = run(loop, main())
    for protocol in (client, srv):
        assert collapse(protocol.events) == ["made", "data", "eof", "lost"]
        for event in ("made", "eof", "lost"):
            assert protocol.events.count(event) == 1
        assert protocol.chunk_types == {bytes}
        assert bytes(protocol.data) == b"first second third"


def test_buffered_protocol_callbacks_run_in_order(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(BufferedRecorder)
            server = await net.serve(accepted)
            transport, client = await net.connect(Recorder, tcp.address(server))
            for part in (b"first ", b"second ", b"third"):
                transport.write(part)
                await asyncio.sleep(0.005)
            transport.write_eof()
            srv = await accepted.next()
            await srv.lost
            await client.lost
        return srv

    srv = run(loop, main())
    assert srv.data == b"first second third"
    events = srv.events
    assert events[0] == "made"
    assert events[-2:] == ["eof", "lost"]
    middle = events[1:-2]
    assert "buffer_updated" in middle
    assert set(middle) <= {"get_buffer", "buffer_updated"}
    for i, event in enumerate(middle):  # each buffer_updated fills the buffer just handed out
        if event == "buffer_updated":
            assert i > 0 and middle[i - 1] == "get_buffer"


@pytest.mark.parametrize("new_kind", ["Protocol", "BufferedProtocol"])
def test_set_protocol_redirects_later_callbacks_to_the_new_protocol(loop, tcp, new_kind):
    async def main():
        async with Session(tcp) as net:
            server = await net.serve(Accepting(EchoServer))
            transport, old = await net.connect(Recorder, tcp.address(server))
            transport.write(b"one")
            await wait_for_bytes(old, 3)
            new = Recorder() if new_kind == "Protocol" else BufferedRecorder()
            transport.set_protocol(new)
            switched = transport.get_protocol() is new
            transport.write(b"two")
            transport.write_eof()
            exc = await new.lost
        return switched, old, new, exc

    switched, old, new, exc = run(loop, main())
    assert switched
    assert exc is None
    assert bytes(old.data) == b"one"
    assert old.events == ["made", "data"]
    assert bytes(new.data) == b"two"
    assert "made" not in new.events  # set_protocol does not call connection_made
    assert new.events[-2:] == ["eof", "lost"]


# --------------------------------------------------------------------------- servers


def test_server_with_start_serving_false_accepts_nothing_until_start_serving(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted, start_serving=False)
            address = tcp.address(server)
            serving_before = server.is_serving()
            with pytest.raises(ConnectionRefusedError):
                await loop.create_connection(asyncio.Protocol, *address)
            await server.start_serving()
            transport, client = await net.connect(Recorder, address)
            transport.write(b"hello")
            transport.write_eof()
            await client.lost
        return serving_before, server.is_serving(), bytes(client.data)

    # is_serving() is read after the Session closed the server.
    assert run(loop, main()) == (False, False, b"hello")


def test_server_close_stops_accepting_but_keeps_existing_connections(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            accepted = Accepting(EchoServer)
            server = await net.serve(accepted)
            address = tcp.address(server)
            transport, client = await net.connect(Recorder, address)
            srv = await accepted.next()
            server.close()
            state = (server.is_serving(), len(server.sockets))
            with pytest.raises(ConnectionRefusedError):
                await loop.create_connection(asyncio.Protocol, *address)
            transport.write(b"still echoed")
            transport.write_eof()
            await client.lost
            await srv.lost
            await server.wait_closed()
        return state, bytes(client.data)

    assert run(loop, main()) == ((False, 0), b"still echoed")


def test_create_server_and_create_connection_take_existing_sockets(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            listener = socket.create_server(("127.0.0.1", 0))
            net.socks.append(listener)
            listener.setblocking(False)
            listener_name = listener.getsockname()
            accepted = Accepting(EchoServer)
            server = await loop.create_server(net.track(accepted), sock=listener)
            net.servers.append(server)
            server_name = server.sockets[0].getsockname()
            client_sock = socket.create_connection(listener_name)
            net.socks.append(client_sock)
            client_sock.setblocking(False)
            transport, client = await loop.create_connection(Recorder, sock=client_sock)
            transport.write(b"via sock=")
            transport.write_eof()
            await client.lost
            await (await accepted.next()).lost
            server.close()
            await server.wait_closed()
            # Both sockets belonged to the loop, which closed them.
            return (
                server_name == listener_name,
                bytes(client.data),
                client_sock.fileno(),
                listener.fileno(),
            )

    assert run(loop, main()) == (True, b"via sock=", -1, -1)


def test_create_connection_local_addr_binds_the_client_socket(loop, tcp):
    with socket.socket() as probe:  # find a free port for the client side
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()

    async def main():
        async with Session(tcp) as net:
            accepted = Accepting()
            server = await net.serve(accepted)
            transport, _ = await net.connect(Recorder, tcp.address(server), local_addr=local)
            srv = await accepted.next()
            return transport.get_extra_info("sockname"), srv.transport.get_extra_info("peername")

    assert run(loop, main()) == (local, local)


def test_create_server_returns_a_serving_abstract_server(loop, tcp):
    async def main():
        async with Session(tcp) as net:
            server = await net.serve(Accepting())
            async with server:
                state = (
                    isinstance(server, asyncio.AbstractServer),
                    server.get_loop() is loop,
                    server.is_serving(),
                    [(s.family, s.type) for s in server.sockets],
                )
            return state, server.is_serving()

    state, serving_after_exit = run(loop, main())
    assert state == (True, True, True, [(socket.AF_INET, socket.SOCK_STREAM)])
    assert not serving_after_exit


# --------------------------------------------------------------------------- contexts

_CONN_VAR = contextvars.ContextVar("conn_var", default=None)


def test_each_connection_receives_in_its_own_context(loop):
    # The stdlib runs a connection's data_received through its own reader handle, i.e.
    # in a copy of the context current when reading started: a ContextVar one connection
    # sets is seen by its later callbacks, never by another connection's.
    seen = []

    class Tagging(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            seen.append((data, _CONN_VAR.get()))
            if _CONN_VAR.get() is None:
                _CONN_VAR.set(data)
            self.transport.write(b"k")

    async def main():
        server = await loop.create_server(Tagging, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for round_ in range(2):
            for i, (reader, writer) in enumerate(conns):
                writer.write(b"%d-%d" % (i, round_))
                assert await reader.readexactly(1) == b"k"
        for _, writer in conns:
            writer.close()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert seen == [
        (b"0-0", None),
        (b"1-0", None),
        (b"0-1", b"0-0"),
        (b"1-1", b"1-0"),
    ]
    assert _CONN_VAR.get() is None
