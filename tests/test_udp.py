"""loop.create_datagram_endpoint and the datagram transport, on both loops."""

import asyncio
import gc
import os
import socket
import struct
import sys
import tempfile

import pytest
from netutil import Keeper

pytestmark = pytest.mark.timeout(30)

HAS_UNIX = hasattr(socket, "AF_UNIX")


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback")
needs_unix = pytest.mark.skipif(not HAS_UNIX, reason="no AF_UNIX")


class Recorder(asyncio.DatagramProtocol):
    """Records every protocol callback; queues datagrams and errors for awaiting."""

    def __init__(self):
        self.events = []
        self.transport = None
        self.datagrams = asyncio.Queue()
        self.errors = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def datagram_received(self, data, addr):
        self.events.append("data")
        self.datagrams.put_nowait((data, addr))

    def error_received(self, exc):
        self.events.append("error")
        self.errors.put_nowait(exc)

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self):
        self.events.append("pause")

    def resume_writing(self):
        self.events.append("resume")


def run(loop, coro, timeout=10.0):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


async def next_datagram(proto, timeout=5.0):
    return await asyncio.wait_for(proto.datagrams.get(), timeout)


async def nothing_arrives(proto, wait=0.05):
    await asyncio.sleep(wait)
    return proto.datagrams.empty()


@pytest.fixture
def short_dir():
    """A directory with a path short enough for AF_UNIX socket names."""
    with tempfile.TemporaryDirectory(prefix="fl-udp-", dir="/tmp") as d:
        yield d


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- round trips


def test_ipv4_round_trip_delivers_data_and_sender_addresses(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct, cp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        server_addr = st.get_extra_info("sockname")
        client_addr = ct.get_extra_info("sockname")
        ct.sendto(b"ping", server_addr)
        data, addr = await next_datagram(sp)
        assert (data, addr) == (b"ping", client_addr)
        st.sendto(b"pong", addr)
        assert await next_datagram(cp) == (b"pong", server_addr)
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


@needs_ipv6
def test_ipv6_round_trip_addresses_are_4_tuples(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("::1", 0))
        ct, cp = await loop.create_datagram_endpoint(Recorder, local_addr=("::1", 0))
        server_addr = st.get_extra_info("sockname")
        client_addr = ct.get_extra_info("sockname")
        assert len(server_addr) == 4
        ct.sendto(b"ping6", server_addr[:2])
        data, addr = await next_datagram(sp)
        assert (data, addr) == (b"ping6", client_addr)
        assert addr[0] == "::1" and addr[2:] == (0, 0)
        # Replying to the received 4-tuple as is.
        st.sendto(b"pong6", addr)
        assert await next_datagram(cp) == (b"pong6", server_addr)
        st.close()
        ct.close()
        await sp.lost

    run(loop, main())


@needs_unix
def test_unix_datagram_round_trip_with_path_addresses(loop, short_dir):
    server_path = os.path.join(short_dir, "server")
    client_path = os.path.join(short_dir, "client")

    async def main():
        st, sp = await loop.create_datagram_endpoint(
            Recorder, local_addr=server_path, family=socket.AF_UNIX
        )
        ct, cp = await loop.create_datagram_endpoint(
            Recorder, local_addr=client_path, remote_addr=server_path, family=socket.AF_UNIX
        )
        assert ct.get_extra_info("peername") == server_path
        ct.sendto(b"over unix")
        assert await next_datagram(sp) == (b"over unix", client_path)
        st.sendto(b"reply", client_path)
        assert await next_datagram(cp) == (b"reply", server_path)
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


@needs_unix
def test_unix_datagram_from_abstract_name_has_bytes_address(loop, short_dir):
    server_path = os.path.join(short_dir, "server")
    name = b"\0ferroloop-test-" + str(os.getpid()).encode()

    async def main():
        st, sp = await loop.create_datagram_endpoint(
            Recorder, local_addr=server_path, family=socket.AF_UNIX
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.bind(name)
            sender.sendto(b"abstract", server_path)
            assert await next_datagram(sp) == (b"abstract", name)
            # And back to the abstract name, given as bytes.
            st.sendto(b"back", name)
            await asyncio.sleep(0.01)
            assert sender.recvfrom(100) == (b"back", server_path)
        st.close()
        await sp.lost

    run(loop, main())


@needs_unix
def test_unix_datagram_from_unbound_sender_has_address_none(loop, short_dir):
    server_path = os.path.join(short_dir, "server")

    async def main():
        st, sp = await loop.create_datagram_endpoint(
            Recorder, local_addr=server_path, family=socket.AF_UNIX
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"anonymous", server_path)
            assert await next_datagram(sp) == (b"anonymous", None)
        st.close()
        await sp.lost

    run(loop, main())


@needs_unix
def test_unix_local_addr_replaces_a_stale_socket_file(loop, short_dir):
    path = os.path.join(short_dir, "stale")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    leftover.bind(path)
    leftover.close()  # the file stays behind
    assert os.path.exists(path)

    async def main():
        st, sp = await loop.create_datagram_endpoint(
            Recorder, local_addr=path, family=socket.AF_UNIX
        )
        assert st.get_extra_info("sockname") == path
        st.close()
        await sp.lost

    run(loop, main())


def test_many_datagrams_arrive_in_order(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        addr = st.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(200):
                sender.sendto(b"%d" % i, addr)
                if i % 50 == 49:
                    await asyncio.sleep(0)
            got = [(await next_datagram(sp))[0] for _ in range(200)]
        assert got == [b"%d" % i for i in range(200)]
        st.close()
        await sp.lost

    run(loop, main())


class DatagramKeeper(asyncio.DatagramProtocol):
    """netutil's Keeper, fed datagrams."""

    def __init__(self):
        self.keeper = Keeper()

    def datagram_received(self, data, addr):
        self.keeper.data_received(data)


def test_datagrams_a_protocol_keeps_stay_as_they_arrived_and_new_ones_hash_afresh(loop):
    """As over TCP: equal-sized datagrams one at a time, some kept, some dropped."""
    messages = [bytes([i]) * 1024 for i in range(30)]

    async def main():
        st, sp = await loop.create_datagram_endpoint(DatagramKeeper, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i, message in enumerate(messages):
                sender.sendto(message, st.get_extra_info("sockname"))
                while len(sp.keeper.hashes_agree) <= i:
                    await asyncio.sleep(0.001)
        st.close()
        return sp.keeper

    keeper = run(loop, main())
    keeper.assert_intact(messages)


def test_largest_udp_datagram_arrives_intact(loop):
    payload = bytes(range(256)) * 255 + b"end"  # 65283 bytes, under the IPv4 limit

    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct, cp = await loop.create_datagram_endpoint(
            Recorder, remote_addr=st.get_extra_info("sockname")
        )
        ct.sendto(payload)
        data, _ = await next_datagram(sp)
        assert data == payload
        st.close()
        ct.close()
        await sp.lost

    run(loop, main())


@pytest.mark.skipif(not hasattr(socket, "AF_NETLINK"), reason="no AF_NETLINK")
def test_other_families_send_and_receive_through_the_socket_object(loop):
    """Netlink addresses are (pid, groups): converted by the socket module itself."""
    rtm_getlink, nlm_f_request, nlm_f_dump = 18, 0x1, 0x300
    request = struct.pack("=LHHLLBxxx", 20, rtm_getlink, nlm_f_request | nlm_f_dump, 1, 0, 0)

    async def main():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
        sock.bind((0, 0))
        tr, pr = await loop.create_datagram_endpoint(Recorder, sock=sock)
        tr.sendto(request, (0, 0))  # to the kernel
        data, addr = await next_datagram(pr)
        assert addr == (0, 0)
        length, _type, _flags, seq = struct.unpack_from("=LHHL", data)
        assert seq == 1 and length <= len(data)
        tr.close()
        await pr.lost

    run(loop, main())


# --------------------------------------------------------------------------- set-up and order


def test_connection_made_runs_before_create_datagram_endpoint_returns(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        assert pr.events == ["made"]
        assert pr.transport is tr
        assert tr.get_protocol() is pr
        tr.close()
        await pr.lost
        assert pr.events == ["made", "lost"]

    run(loop, main())


def test_transport_is_an_asyncio_transport(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        assert isinstance(tr, asyncio.Transport)
        assert isinstance(tr, asyncio.BaseTransport)
        tr.close()
        await pr.lost

    run(loop, main())


@pytest.mark.ferroloop_only("the 3.11 stdlib class derives from Transport only")
def test_transport_is_also_an_asyncio_datagram_transport(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        assert isinstance(tr, asyncio.DatagramTransport)
        tr.close()
        await pr.lost

    run(loop, main())


def test_extra_info_has_socket_sockname_and_peername(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        server_addr = st.get_extra_info("sockname")
        ct, cp = await loop.create_datagram_endpoint(Recorder, remote_addr=server_addr)
        assert st.get_extra_info("peername") is None
        assert ct.get_extra_info("peername") == server_addr
        sock = ct.get_extra_info("socket")
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM
        assert sock.getsockname() == ct.get_extra_info("sockname")
        assert ct.get_extra_info("nonexistent", "default") == "default"
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


def test_set_protocol_redirects_datagrams_to_the_new_protocol(loop):
    async def main():
        st, first = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        second = Recorder()
        st.set_protocol(second)
        assert st.get_protocol() is second
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"to second", st.get_extra_info("sockname"))
            data, _ = await next_datagram(second)
        assert data == b"to second"
        assert first.datagrams.empty()
        st.close()
        assert await second.lost is None
        assert not first.lost.done()

    run(loop, main())


def test_repr_shows_fd_and_polling_state_like_the_stdlib(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        fd = tr.get_extra_info("socket").fileno()
        name, rest = repr(tr)[1:].split(" ", 1)
        assert name == type(tr).__name__
        assert rest == f"fd={fd} read=polling write=<idle, bufsize=0>>"
        tr.close()
        assert repr(tr).split(" ", 1)[1] == f"closing fd={fd} read=idle write=<idle, bufsize=0>>"
        await pr.lost
        assert repr(tr).split(" ", 1)[1] == f"closed fd={fd}>"

    run(loop, main())


# --------------------------------------------------------------------------- connected endpoints


def test_connected_endpoint_sendto_without_addr_goes_to_remote_addr(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        server_addr = st.get_extra_info("sockname")
        ct, cp = await loop.create_datagram_endpoint(Recorder, remote_addr=server_addr)
        ct.sendto(b"implicit")
        ct.sendto(b"explicit", server_addr)  # its own remote address is accepted
        assert (await next_datagram(sp))[0] == b"implicit"
        assert (await next_datagram(sp))[0] == b"explicit"
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


def test_connected_endpoint_rejects_another_address_with_stdlib_message(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        server_addr = st.get_extra_info("sockname")
        ct, cp = await loop.create_datagram_endpoint(Recorder, remote_addr=server_addr)
        other = ("127.0.0.1", server_addr[1] + 1 if server_addr[1] < 65535 else 1)
        with pytest.raises(ValueError) as info:
            ct.sendto(b"x", other)
        assert str(info.value) == f"Invalid address: must be None or {server_addr}"
        assert await nothing_arrives(sp)
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


def test_connected_endpoint_to_closed_port_reports_connection_refused_to_error_received(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(
            Recorder, remote_addr=("127.0.0.1", closed_udp_port())
        )
        tr.sendto(b"anyone there?")
        exc = await asyncio.wait_for(pr.errors.get(), 5)
        assert isinstance(exc, ConnectionRefusedError)
        # Not fatal: the endpoint stays open and usable.
        assert not tr.is_closing()
        assert not pr.lost.done()
        tr.close()
        assert await pr.lost is None

    run(loop, main())


def test_send_error_goes_to_error_received_and_keeps_the_endpoint_open(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        # Broadcasting without SO_BROADCAST fails at once with EACCES.
        tr.sendto(b"to everyone", ("255.255.255.255", 9))
        exc = await asyncio.wait_for(pr.errors.get(), 5)
        assert isinstance(exc, PermissionError)
        assert not tr.is_closing()
        tr.close()
        await pr.lost

    run(loop, main())


# --------------------------------------------------------------------------- sendto arguments


@pytest.mark.parametrize("bad", ["text", 42, [1, 2], None])
def test_sendto_rejects_non_bytes_like_data_with_stdlib_message(loop, bad):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        with pytest.raises(TypeError) as info:
            tr.sendto(bad, ("127.0.0.1", 9))
        assert str(info.value) == (
            f"data argument must be a bytes-like object, not {type(bad).__name__!r}"
        )
        tr.close()
        await pr.lost

    run(loop, main())


def test_sendto_accepts_bytearray_and_memoryview(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        addr = st.get_extra_info("sockname")
        ct, cp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct.sendto(bytearray(b"array"), addr)
        ct.sendto(memoryview(b"xxview")[2:], addr)
        assert (await next_datagram(sp))[0] == b"array"
        assert (await next_datagram(sp))[0] == b"view"
        st.close()
        ct.close()
        await sp.lost

    run(loop, main())


def test_sendto_host_name_address_is_resolved_like_socket_sendto(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        port = st.get_extra_info("sockname")[1]
        ct, cp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct.sendto(b"by name", ("localhost", port))
        assert (await next_datagram(sp))[0] == b"by name"
        st.close()
        ct.close()
        await sp.lost

    run(loop, main())


def test_sendto_malformed_address_is_a_fatal_error(loop, expect_loop_errors):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        tr.sendto(b"x", "not an address")  # the socket module raises TypeError
        exc = await pr.lost
        assert isinstance(exc, TypeError)
        assert tr.is_closing()
        return tr, pr

    tr, pr = run(loop, main())
    [ctx] = expect_loop_errors
    assert ctx["message"] == "Fatal write error on datagram transport"
    assert isinstance(ctx["exception"], TypeError)
    assert ctx["transport"] is tr
    assert ctx["protocol"] is pr


def test_empty_datagram_is_accepted_and_sent_from_python_3_13(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct, cp = await loop.create_datagram_endpoint(
            Recorder, remote_addr=st.get_extra_info("sockname")
        )
        ct.sendto(b"")
        ct.sendto(b"after")
        data = (await next_datagram(sp))[0]
        if sys.version_info >= (3, 13):
            assert data == b""
            data = (await next_datagram(sp))[0]
        # Before 3.13 empty datagrams are dropped silently (gh-113812).
        assert data == b"after"
        st.close()
        ct.close()
        await sp.lost

    run(loop, main())


# --------------------------------------------------------------------------- flow control


def test_write_buffer_limits_default_and_set_like_flow_control_mixin(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        assert tr.get_write_buffer_limits() == (16384, 65536)
        assert tr.get_write_buffer_size() == 0
        tr.set_write_buffer_limits(high=100)
        assert tr.get_write_buffer_limits() == (25, 100)
        tr.set_write_buffer_limits(low=10)
        assert tr.get_write_buffer_limits() == (10, 40)
        tr.set_write_buffer_limits(high=8, low=8)
        assert tr.get_write_buffer_limits() == (8, 8)
        with pytest.raises(ValueError, match=r"high \(1\) must be >= low \(2\) must be >= 0"):
            tr.set_write_buffer_limits(high=1, low=2)
        tr.set_write_buffer_limits()
        assert tr.get_write_buffer_limits() == (16384, 65536)
        tr.close()
        await pr.lost

    run(loop, main())


class UnixSink:
    """A Unix datagram socket nobody reads yet: its queue fills, so sends would block."""

    def __init__(self, loop, path):
        self.loop = loop
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.received = []

    def drain_continuously(self):
        self.loop.add_reader(self.sock, self._drain)

    def _drain(self):
        try:
            while True:
                self.received.append(self.sock.recv(65536))
        except BlockingIOError:
            pass

    def close(self):
        self.loop.remove_reader(self.sock)
        self.sock.close()


def fill_until_buffered(tr, size=1000, limit=100_000):
    """sendto() numbered datagrams until the transport starts buffering; returns how many."""
    for i in range(limit):
        tr.sendto(b"%08d" % i + b"\0" * (size - 8))
        if tr.get_write_buffer_size():
            return i + 1
    raise AssertionError("the socket never filled up")


@pytest.fixture
def sink(loop, short_dir):
    s = UnixSink(loop, os.path.join(short_dir, "sink"))
    yield s
    s.close()


@needs_unix
def test_buffered_datagrams_count_payload_bytes_and_drive_pause_and_resume_writing(
    loop, sink, impl
):
    if impl == "asyncio" and sys.version_info[:3] == (3, 13, 0):
        pytest.skip("3.13.0's stdlib adds a header per buffered datagram but never removes it")
    # 3.13 counts 8 header bytes per buffered datagram beside its payload.
    per_datagram = 1000 + (8 if sys.version_info >= (3, 13) else 0)

    async def main():
        tr, pr = await loop.create_datagram_endpoint(
            Recorder, remote_addr=sink.path, family=socket.AF_UNIX
        )
        sent = fill_until_buffered(tr)
        for i in range(sent, sent + 5):
            tr.sendto(b"%08d" % i + b"\0" * 992)
        assert tr.get_write_buffer_size() == 6 * per_datagram
        assert "pause" not in pr.events
        tr.set_write_buffer_limits(high=4000)  # low becomes 1000
        assert pr.events[-1] == "pause"
        sink.drain_continuously()
        while tr.get_write_buffer_size():
            await asyncio.sleep(0.001)
        assert pr.events[-1] == "resume"
        total = sent + 5
        while len(sink.received) < total:
            await asyncio.sleep(0.001)
        assert [d[:8] for d in sink.received] == [b"%08d" % i for i in range(total)]
        tr.close()
        assert await pr.lost is None

    run(loop, main())


@needs_unix
def test_close_flushes_buffered_datagrams_then_calls_connection_lost(loop, sink):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(
            Recorder, remote_addr=sink.path, family=socket.AF_UNIX
        )
        sent = fill_until_buffered(tr)
        tr.close()
        assert tr.is_closing()
        await asyncio.sleep(0.02)
        assert not pr.lost.done()  # waits for the buffer
        sink.drain_continuously()
        assert await pr.lost is None
        while len(sink.received) < sent:
            await asyncio.sleep(0.001)
        assert len(sink.received) == sent

    run(loop, main())


@needs_unix
def test_abort_discards_buffered_datagrams_and_calls_connection_lost_none(loop, sink):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(
            Recorder, remote_addr=sink.path, family=socket.AF_UNIX
        )
        sent = fill_until_buffered(tr)
        tr.abort()
        assert tr.is_closing()
        assert await pr.lost is None
        sink.drain_continuously()
        await asyncio.sleep(0.05)
        # Everything but the buffered datagram went out before the abort.
        assert len(sink.received) == sent - 1

    run(loop, main())


# --------------------------------------------------------------------------- closing


def test_close_calls_connection_lost_none_once(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        assert not tr.is_closing()
        tr.close()
        tr.close()
        assert tr.is_closing()
        assert await pr.lost is None
        await asyncio.sleep(0.01)
        assert pr.events == ["made", "lost"]
        assert tr.get_protocol() is None
        assert tr.get_extra_info("socket").fileno() == -1

    run(loop, main())


def test_abort_calls_connection_lost_none(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        tr.abort()
        assert tr.is_closing()
        assert await pr.lost is None
        assert pr.events == ["made", "lost"]

    run(loop, main())


def test_closed_endpoint_stops_delivering_datagrams(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        addr = tr.get_extra_info("sockname")
        tr.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"too late", addr)
        await pr.lost
        assert await nothing_arrives(pr)

    run(loop, main())


def test_sendto_on_closed_connected_endpoint_is_dropped_silently(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct, cp = await loop.create_datagram_endpoint(
            Recorder, remote_addr=st.get_extra_info("sockname")
        )
        ct.close()
        assert ct.sendto(b"while closing") is None
        await cp.lost
        for _ in range(10):  # past the stdlib's warning threshold too
            assert ct.sendto(b"after close") is None
        assert await nothing_arrives(sp)
        assert cp.errors.empty()
        st.close()
        await sp.lost

    run(loop, main())


@pytest.mark.ferroloop_only("the stdlib fails on its released socket (AttributeError)")
def test_sendto_on_closed_unconnected_endpoint_is_dropped_silently(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct, cp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        ct.close()
        await cp.lost
        assert ct.sendto(b"after close", st.get_extra_info("sockname")) is None
        assert await nothing_arrives(sp)
        st.close()
        await sp.lost

    run(loop, main())


def test_unclosed_transport_warns_and_closes_its_socket(loop_factory):
    loop = loop_factory()
    tr, pr = loop.run_until_complete(
        loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    )
    sock = tr.get_extra_info("socket")
    loop.close()
    with pytest.warns(ResourceWarning, match="unclosed transport"):
        del tr, pr
        gc.collect()
    assert sock.fileno() == -1


# --------------------------------------------------------------------------- reading


def test_pause_reading_holds_datagrams_until_resume_reading(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        tr.pause_reading()
        assert not tr.is_reading()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"held", tr.get_extra_info("sockname"))
            assert await nothing_arrives(pr)
            tr.resume_reading()
            assert tr.is_reading()
            assert (await next_datagram(pr))[0] == b"held"
        tr.close()
        assert not tr.is_reading()
        await pr.lost

    run(loop, main())


def test_exception_in_datagram_received_is_reported_and_endpoint_keeps_reading(
    loop, expect_loop_errors
):
    class Failing(Recorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if data == b"boom":
                raise ZeroDivisionError("from the protocol")

    async def main():
        tr, pr = await loop.create_datagram_endpoint(Failing, local_addr=("127.0.0.1", 0))
        addr = tr.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"boom", addr)
            assert (await next_datagram(pr))[0] == b"boom"
            sender.sendto(b"still here", addr)
            assert (await next_datagram(pr))[0] == b"still here"
        assert not tr.is_closing()
        tr.close()
        await pr.lost

    run(loop, main())
    [ctx] = expect_loop_errors
    assert ctx["message"].startswith("Exception in callback ")
    assert ctx["message"].endswith("._read_ready()")
    assert isinstance(ctx["exception"], ZeroDivisionError)


# --------------------------------------------------------------------------- endpoint options


def test_sock_argument_uses_the_given_socket(loop):
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        tr, pr = await loop.create_datagram_endpoint(Recorder, sock=sock)
        assert sock.gettimeout() == 0  # made non-blocking
        assert tr.get_extra_info("sockname") == sock.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"via sock", sock.getsockname())
            assert (await next_datagram(pr))[0] == b"via sock"
        tr.close()
        await pr.lost
        assert sock.fileno() == -1

    run(loop, main())


def test_sock_argument_must_be_a_datagram_socket(loop):
    wanted = "datagram socket" if sys.version_info >= (3, 13) else "UDP Socket"

    async def main():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            with pytest.raises(ValueError, match=f"A {wanted} was expected, got "):
                await loop.create_datagram_endpoint(Recorder, sock=sock)

    run(loop, main())


def test_sock_argument_with_socket_options_lists_them_in_value_error(loop):
    async def main():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError) as info:
                await loop.create_datagram_endpoint(
                    Recorder, sock=sock, local_addr=("127.0.0.1", 0), reuse_port=True
                )
        assert str(info.value) == (
            "socket modifier keyword arguments can not be used when sock is specified. "
            "(local_addr=('127.0.0.1', 0), reuse_port=True)"
        )

    run(loop, main())


def test_allow_broadcast_sets_so_broadcast_and_leaves_socket_unconnected(loop):
    async def main():
        st, sp = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        server_addr = st.get_extra_info("sockname")
        ct, cp = await loop.create_datagram_endpoint(
            Recorder, remote_addr=server_addr, allow_broadcast=True
        )
        sock = ct.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) != 0
        assert ct.get_extra_info("peername") is None
        ct.sendto(b"to remote_addr")  # still goes to remote_addr
        assert (await next_datagram(sp))[0] == b"to remote_addr"
        with pytest.raises(ValueError, match="Invalid address: must be None or "):
            ct.sendto(b"x", ("127.0.0.2", 9))
        st.close()
        ct.close()
        await sp.lost
        await cp.lost

    run(loop, main())


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
def test_reuse_port_lets_two_endpoints_bind_the_same_port(loop):
    async def main():
        t1, p1 = await loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0), reuse_port=True
        )
        addr = t1.get_extra_info("sockname")
        assert t1.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        t2, p2 = await loop.create_datagram_endpoint(Recorder, local_addr=addr, reuse_port=True)
        assert t2.get_extra_info("sockname") == addr
        t1.close()
        t2.close()
        await p1.lost
        await p2.lost

    run(loop, main())


def test_without_reuse_port_binding_a_used_port_raises_os_error(loop):
    async def main():
        t1, p1 = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        with pytest.raises(OSError):
            await loop.create_datagram_endpoint(Recorder, local_addr=t1.get_extra_info("sockname"))
        t1.close()
        await p1.lost

    run(loop, main())


def test_reuse_address_is_not_a_parameter_any_more(loop):
    async def main():
        with pytest.raises(TypeError, match="reuse_address"):
            await loop.create_datagram_endpoint(
                Recorder, local_addr=("127.0.0.1", 0), reuse_address=True
            )

    run(loop, main())


def test_no_address_and_no_family_raises_value_error(loop):
    async def main():
        with pytest.raises(ValueError, match="^unexpected address family$"):
            await loop.create_datagram_endpoint(Recorder)

    run(loop, main())


def test_family_alone_creates_an_unbound_endpoint(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, family=socket.AF_INET)
        assert tr.get_extra_info("sockname") == ("0.0.0.0", 0)
        tr.close()
        await pr.lost

    run(loop, main())


@needs_unix
def test_unix_family_requires_str_addresses(loop):
    async def main():
        with pytest.raises(TypeError, match="^string is expected$"):
            await loop.create_datagram_endpoint(
                Recorder, local_addr=b"/tmp/x", family=socket.AF_UNIX
            )

    run(loop, main())


@pytest.mark.parametrize("addr", ["127.0.0.1", ("127.0.0.1",), ("127.0.0.1", 0, 0)])
def test_inet_addresses_must_be_2_tuples(loop, addr):
    async def main():
        with pytest.raises(TypeError, match="^2-tuple is expected$"):
            await loop.create_datagram_endpoint(Recorder, local_addr=addr)

    run(loop, main())


def test_addresses_of_different_families_raise_value_error(loop):
    async def main():
        with pytest.raises(ValueError, match="^can not get address information$"):
            await loop.create_datagram_endpoint(
                Recorder,
                local_addr=("127.0.0.1", 0),
                remote_addr=("::1", 9),
            )

    run(loop, main())


def test_protocol_factory_is_not_called_when_set_up_fails(loop):
    calls = []

    def factory():
        calls.append(1)
        return Recorder()

    async def main():
        with pytest.raises(OSError):
            await loop.create_datagram_endpoint(factory, local_addr=("192.0.2.1", 0))

    run(loop, main())
    assert calls == []


def test_add_reader_on_a_live_transports_socket_raises_runtime_error(loop):
    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        fd = tr.get_extra_info("socket").fileno()
        with pytest.raises(RuntimeError, match=f"^File descriptor {fd} is used by transport "):
            loop.add_reader(fd, lambda: None)
        tr.close()
        await pr.lost

    run(loop, main())


def test_debug_mode_logs_the_created_endpoint(loop, caplog):
    loop.set_debug(True)

    async def main():
        tr, pr = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        tr.close()
        await pr.lost
        return tr, pr

    with caplog.at_level("DEBUG", logger="asyncio"):
        tr, pr = run(loop, main())
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert message == (
        f"Datagram endpoint local_addr=('127.0.0.1', 0) remote_addr=None created: ({tr!r}, {pr!r})"
    )
