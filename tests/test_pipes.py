"""connect_read_pipe / connect_write_pipe over os.pipe() (and socketpairs).

Every test runs on the stdlib loop and on ferroloop (the ``loop`` fixture), which fails the
test if the loop's exception handler is called.  Pipe ends are wrapped in unbuffered file
objects; the transports own (and close) them once connected.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest
from netutil import Keeper

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB


def payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def run(loop, coro, timeout: float = 10.0):
    """run_until_complete with a deadline, so a missing wake-up fails instead of hanging."""

    async def guarded():
        async with asyncio.timeout(timeout):
            return await coro

    return loop.run_until_complete(guarded())


def assert_same_bytes(got, expected) -> None:
    got, expected = bytes(got), bytes(expected)
    if got == expected:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    pytest.fail(f"{len(got)} bytes received, {len(expected)} expected; first difference at {first}")


def collapse(events):
    """Events with runs of 'data' folded into one."""
    out = []
    for ev in events:
        if ev == "data" and out and out[-1] == "data":
            continue
        out.append(ev)
    return out


class Recorder(asyncio.Protocol):
    """Records every callback in order, the bytes received, and when the connection ends."""

    def __init__(self, loop):
        self.events = []
        self.data = bytearray()
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.paused = loop.create_future()
        self.resumed = loop.create_future()
        self._wanted = 0
        self._enough = None
        self._loop = loop

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data):
        self.events.append("data")
        self.data += data
        if self._enough is not None and len(self.data) >= self._wanted:
            if not self._enough.done():
                self._enough.set_result(None)

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self):
        self.events.append("pause_writing")
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self):
        self.events.append("resume_writing")
        if not self.resumed.done():
            self.resumed.set_result(None)

    async def received(self, n):
        """Wait until at least *n* bytes arrived."""
        if len(self.data) < n:
            self._wanted = n
            self._enough = self._loop.create_future()
            await self._enough


def pipe_files():
    rfd, wfd = os.pipe()
    return open(rfd, "rb", buffering=0), open(wfd, "wb", buffering=0)


async def connected_pair(loop):
    """(read transport, read protocol, write transport, write protocol) over one pipe."""
    rpipe, wpipe = pipe_files()
    rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), rpipe)
    wtr, wproto = await loop.connect_write_pipe(lambda: Recorder(loop), wpipe)
    return rtr, rproto, wtr, wproto


def test_chunks_a_pipe_protocol_keeps_stay_as_they_arrived_and_new_ones_hash_afresh(loop):
    """As over TCP: equal-sized writes read one at a time, some kept, some dropped."""
    messages = [bytes([i]) * KiB for i in range(30)]

    async def main():
        rpipe, wpipe = pipe_files()
        rtr, protocol = await loop.connect_read_pipe(Keeper, rpipe)
        with wpipe:
            for i, message in enumerate(messages):
                wpipe.write(message)
                while len(protocol.hashes_agree) <= i:
                    await asyncio.sleep(0.001)
        rtr.close()
        return protocol

    protocol = run(loop, main())
    protocol.assert_intact(messages)


@pytest.mark.parametrize("size", [1, 64 * KiB + 1, 4 * MiB], ids=["1B", "64KiB+1", "4MiB"])
def test_pipe_round_trip_delivers_bytes_in_order_then_eof_then_connection_lost(loop, size):
    data = payload(size)

    async def main():
        rtr, rproto, wtr, wproto = await connected_pair(loop)
        assert rproto.made.done() and wproto.made.done()
        wtr.write(data)
        wtr.close()  # flushes first
        assert await wproto.lost is None
        assert await rproto.lost is None
        return rproto, wproto

    rproto, wproto = run(loop, main())
    assert_same_bytes(rproto.data, data)
    assert collapse(rproto.events) == ["made", "data", "eof", "lost"]
    assert wproto.events[0] == "made" and wproto.events[-1] == "lost"


def test_connect_returns_transports_with_pipe_extra_info_and_owns_the_pipe(loop):
    rpipe, wpipe = pipe_files()

    async def main():
        rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), rpipe)
        wtr, wproto = await loop.connect_write_pipe(lambda: Recorder(loop), wpipe)
        assert isinstance(rtr, asyncio.ReadTransport)
        assert isinstance(wtr, asyncio.WriteTransport)
        assert rtr.get_extra_info("pipe") is rpipe
        assert wtr.get_extra_info("pipe") is wpipe
        assert rtr.get_extra_info("nothing", "default") == "default"
        assert rtr.get_protocol() is rproto and wtr.get_protocol() is wproto
        assert rtr.is_reading() and not rtr.is_closing() and not wtr.is_closing()
        assert wtr.can_write_eof()
        assert os.get_blocking(rpipe.fileno()) is False
        assert os.get_blocking(wpipe.fileno()) is False
        wtr.close()
        await wproto.lost
        await rproto.lost

    run(loop, main())
    # Losing the connection closed the pipe objects.
    assert rpipe.closed and wpipe.closed


@pytest.mark.parametrize("which", ["read", "write"])
def test_connect_cancelled_while_connecting_closes_the_transport_and_the_pipe(loop, which):
    rpipe, wpipe = pipe_files()
    ours, other = (rpipe, wpipe) if which == "read" else (wpipe, rpipe)
    protocols = []

    def factory():
        protocols.append(Recorder(loop))
        return protocols[-1]

    async def main():
        connect = loop.connect_read_pipe if which == "read" else loop.connect_write_pipe
        task = asyncio.ensure_future(connect(factory, ours))
        await asyncio.sleep(0)  # the transport exists; the task waits for it to connect
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await protocols[0].lost

    try:
        assert run(loop, main()) is None
    finally:
        other.close()
    assert ours.closed


def test_read_pipe_close_loses_connection_without_eof_and_closes_the_pipe(loop):
    rpipe, wpipe = pipe_files()

    async def main():
        rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), rpipe)
        rtr.close()
        assert rtr.is_closing()
        assert not rtr.is_reading()
        assert await rproto.lost is None
        return rproto

    try:
        rproto = run(loop, main())
    finally:
        wpipe.close()
    assert rproto.events == ["made", "lost"]
    assert rpipe.closed


def test_read_pipe_sees_eof_when_the_writer_closes_its_end(loop):
    rpipe, wpipe = pipe_files()

    async def main():
        rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), rpipe)
        wpipe.write(b"last words")
        wpipe.close()
        assert await rproto.lost is None
        return rproto

    rproto = run(loop, main())
    assert rproto.data == b"last words"
    assert collapse(rproto.events) == ["made", "data", "eof", "lost"]


def test_pause_reading_holds_data_back_until_resume_reading(loop):
    rpipe, wpipe = pipe_files()

    async def main():
        rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), rpipe)
        rtr.pause_reading()
        assert not rtr.is_reading()
        wpipe.write(b"held back")
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert rproto.data == b""
        rtr.resume_reading()
        assert rtr.is_reading()
        await rproto.received(len(b"held back"))
        assert rproto.data == b"held back"
        rtr.close()
        await rproto.lost

    try:
        run(loop, main())
    finally:
        wpipe.close()


def test_write_flow_control_pauses_a_writer_whose_reader_does_not_read(loop):
    rfd, wfd = os.pipe()
    wpipe = open(wfd, "wb", buffering=0)
    data = payload(2 * MiB)

    async def main():
        wtr, wproto = await loop.connect_write_pipe(lambda: Recorder(loop), wpipe)
        wtr.set_write_buffer_limits(high=64 * KiB, low=16 * KiB)
        assert wtr.get_write_buffer_limits() == (16 * KiB, 64 * KiB)
        wtr.write(data)
        # A pipe holds far less than 2 MiB: the rest is buffered and the protocol paused.
        assert wproto.paused.done()
        assert wtr.get_write_buffer_size() > 64 * KiB
        for _ in range(3):
            await asyncio.sleep(0.01)
        assert not wproto.resumed.done()
        assert wtr.get_write_buffer_size() > 64 * KiB
        # Now someone reads: the buffer drains and the protocol resumes.
        rtr, rproto = await loop.connect_read_pipe(
            lambda: Recorder(loop), open(rfd, "rb", buffering=0)
        )
        await wproto.resumed
        await rproto.received(len(data))
        assert wtr.get_write_buffer_size() == 0
        wtr.close()
        await wproto.lost
        assert await rproto.lost is None
        return rproto, wproto

    rproto, wproto = run(loop, main())
    assert_same_bytes(rproto.data, data)
    assert wproto.events == ["made", "pause_writing", "resume_writing", "lost"]


def test_write_eof_flushes_then_closes_so_the_reader_sees_eof(loop):
    data = payload(MiB)

    async def main():
        rtr, rproto, wtr, wproto = await connected_pair(loop)
        wtr.write(data)
        assert wtr.get_write_buffer_size() > 0
        wtr.write_eof()
        assert wtr.is_closing()
        # Writes after write_eof are dropped, not raised.
        wtr.write(b"ignored")
        assert await wproto.lost is None
        assert await rproto.lost is None
        return rproto

    rproto = run(loop, main())
    assert_same_bytes(rproto.data, data)


def test_writelines_writes_every_buffer_in_order(loop):
    parts = [b"alpha ", bytearray(b"beta "), memoryview(b"gamma")]

    async def main():
        rtr, rproto, wtr, wproto = await connected_pair(loop)
        wtr.writelines(parts)
        wtr.close()
        await rproto.lost
        return rproto

    assert run(loop, main()).data == b"alpha beta gamma"


def test_write_pipe_abort_drops_buffered_data_and_loses_connection(loop):
    data = payload(4 * MiB)

    async def main():
        rtr, rproto, wtr, wproto = await connected_pair(loop)
        wtr.write(data)
        assert wtr.get_write_buffer_size() > 0
        wtr.abort()
        assert wtr.is_closing()
        assert await wproto.lost is None
        assert await rproto.lost is None
        return rproto

    rproto = run(loop, main())
    assert 0 < len(rproto.data) < len(data)
    assert_same_bytes(rproto.data, data[: len(rproto.data)])


def test_write_pipe_detects_reader_gone_with_nothing_buffered(loop):
    rfd, wfd = os.pipe()

    async def main():
        wtr, wproto = await loop.connect_write_pipe(
            lambda: Recorder(loop), open(wfd, "wb", buffering=0)
        )
        os.close(rfd)
        # No write needed: the transport watches the pipe and notices the reader left.
        assert await wproto.lost is None
        assert wtr.is_closing()

    run(loop, main())


def test_write_pipe_reader_gone_with_data_buffered_loses_connection_with_broken_pipe(loop):
    rfd, wfd = os.pipe()

    async def main():
        wtr, wproto = await loop.connect_write_pipe(
            lambda: Recorder(loop), open(wfd, "wb", buffering=0)
        )
        wtr.write(payload(MiB))
        assert wtr.get_write_buffer_size() > 0
        os.close(rfd)
        exc = await wproto.lost
        assert isinstance(exc, BrokenPipeError)
        assert wtr.get_write_buffer_size() == 0

    run(loop, main())


def test_write_to_a_pipe_whose_reader_is_gone_loses_connection_without_error_report(
    loop, expect_loop_errors
):
    rfd, wfd = os.pipe()

    async def main():
        wtr, wproto = await loop.connect_write_pipe(
            lambda: Recorder(loop), open(wfd, "wb", buffering=0)
        )
        os.close(rfd)
        wtr.write(b"x")  # before the loop noticed the reader left: EPIPE at once
        return await wproto.lost

    assert isinstance(run(loop, main()), BrokenPipeError)
    assert [ctx.get("message") for ctx in expect_loop_errors] == []


def test_write_pipe_over_a_socketpair_detects_the_peer_closing(loop):
    ours, theirs = socket.socketpair()

    async def main():
        wtr, wproto = await loop.connect_write_pipe(lambda: Recorder(loop), ours)
        wtr.write(b"to the socket")
        await asyncio.sleep(0.01)
        assert theirs.recv(100) == b"to the socket"
        theirs.close()
        assert await wproto.lost is None

    run(loop, main())
    assert ours.fileno() == -1  # closed by the transport


def test_streams_read_lines_from_a_pipe(loop):
    rpipe, wpipe = pipe_files()

    async def main():
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rpipe)
        wpipe.write(b"one\ntwo\nthree")
        wpipe.close()
        return [line async for line in reader]

    assert run(loop, main()) == [b"one\n", b"two\n", b"three"]


@pytest.mark.parametrize("which", ["read", "write"])
def test_connect_pipe_rejects_a_regular_file(loop, tmp_path, which):
    path = tmp_path / "regular"
    path.write_bytes(b"")

    async def main():
        with open(path, "rb" if which == "read" else "wb", buffering=0) as f:
            connect = loop.connect_read_pipe if which == "read" else loop.connect_write_pipe
            with pytest.raises(ValueError) as info:
                await connect(lambda: Recorder(loop), f)
            return str(info.value)

    message = run(loop, main())
    if which == "read":
        assert message == "Pipe transport is for pipes/sockets only."
    else:
        assert message == "Pipe transport is only for pipes, sockets and character devices"


def test_connect_read_pipe_on_a_pty_reads_what_the_other_side_writes(loop):
    master, slave = os.openpty()
    master_file = open(master, "rb", buffering=0)

    async def main():
        rtr, rproto = await loop.connect_read_pipe(lambda: Recorder(loop), master_file)
        os.write(slave, b"through the terminal\n")
        await rproto.received(len(b"through the terminal"))
        rtr.close()
        await rproto.lost
        return rproto

    try:
        rproto = run(loop, main())
    finally:
        os.close(slave)
    assert rproto.data.startswith(b"through the terminal")
