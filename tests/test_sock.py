"""loop.sock_recv / sock_recv_into / sock_sendall: the stdlib's coroutine protocol and
readiness rules, whichever way the loop implements them (ferroloop: native waiters)."""

import asyncio
import gc
import socket
import struct
import weakref

import pytest

pytestmark = pytest.mark.timeout(30)


def test_sock_calls_are_coroutines_that_create_task_accepts(loop, sockpair):
    a, b = sockpair

    async def main():
        call = loop.sock_recv(a, 10)
        assert asyncio.iscoroutine(call)
        task = asyncio.ensure_future(call)
        b.send(b"x")
        return await task

    assert loop.run_until_complete(main()) == b"x"


def test_sock_recv_does_not_read_before_it_is_awaited(loop, sockpair):
    a, b = sockpair
    b.send(b"first")

    async def main():
        call = loop.sock_recv(a, 100)
        # Nothing consumed yet: a plain recv still sees the data.
        assert a.recv(100) == b"first"
        b.send(b"second")
        return await call

    assert loop.run_until_complete(main()) == b"second"


def test_unawaited_sock_call_consumes_nothing_and_is_collected(loop, sockpair):
    a, b = sockpair
    b.send(b"data")
    call = loop.sock_recv(a, 100)
    call.close()
    ref = weakref.ref(call)
    del call
    gc.collect()
    assert ref() is None
    assert a.recv(100) == b"data"


def test_cancelled_sock_recv_leaves_the_data_for_the_next_call(loop, sockpair):
    a, b = sockpair

    async def main():
        task = loop.create_task(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        # Data arrives and the task is cancelled in the same iteration.
        b.send(b"kept")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await loop.sock_recv(a, 100)

    assert loop.run_until_complete(main()) == b"kept"


def test_sock_recv_wakes_for_data_on_every_call(loop, sockpair):
    a, b = sockpair

    async def main():
        got = []
        for i in range(50):
            loop.call_soon(b.send, b"%d" % i)
            got.append(await loop.sock_recv(a, 100))
        return got

    assert loop.run_until_complete(main()) == [b"%d" % i for i in range(50)]


def test_concurrent_recv_and_sendall_on_one_socket(loop, sockpair):
    a, b = sockpair
    payload = bytes(range(256)) * 8192  # 2 MiB: sendall has to wait for the peer

    async def main():
        async def drain_b():
            got = bytearray()
            while len(got) < len(payload):
                got += await loop.sock_recv(b, 1 << 16)
            await loop.sock_sendall(b, b"done")
            return bytes(got)

        reply = loop.create_task(loop.sock_recv(a, 100))
        peer = loop.create_task(drain_b())
        await loop.sock_sendall(a, payload)
        assert await reply == b"done"
        return await peer

    assert loop.run_until_complete(main()) == payload


def test_fd_reused_by_a_new_socket_is_watched_again(loop):
    # A finished sock_recv may leave its fd registered with the kernel; a new socket
    # that gets the same fd number must still be woken.
    async def main():
        for _ in range(20):
            a, b = socket.socketpair()
            a.setblocking(False)
            with a, b:
                loop.call_soon(b.send, b"ping")
                assert await loop.sock_recv(a, 10) == b"ping"
        return True

    assert loop.run_until_complete(main())


def test_add_reader_after_sock_recv_on_the_same_fd(loop, sockpair):
    a, b = sockpair

    async def main():
        loop.call_soon(b.send, b"one")
        assert await loop.sock_recv(a, 10) == b"one"
        got = loop.create_future()
        loop.add_reader(a, lambda: got.set_result(a.recv(10)))
        b.send(b"two")
        try:
            return await got
        finally:
            assert loop.remove_reader(a)

    assert loop.run_until_complete(main()) == b"two"


def test_sock_recv_after_remove_reader_of_a_callback(loop, sockpair):
    a, b = sockpair

    async def main():
        loop.add_reader(a, lambda: None)
        assert loop.remove_reader(a)
        loop.call_soon(b.send, b"x")
        return await loop.sock_recv(a, 10)

    assert loop.run_until_complete(main()) == b"x"


def test_pending_sock_recv_occupies_the_reader_slot(loop, sockpair):
    a, b = sockpair

    async def main():
        task = loop.create_task(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        # As in the stdlib, the call's reader is the fd's reader.
        assert loop.remove_reader(a)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not loop.remove_reader(a)

    loop.run_until_complete(main())


@pytest.mark.parametrize(
    "make_call, error",
    [
        (lambda loop, s: loop.sock_recv(s, -1), ValueError),
        (lambda loop, s: loop.sock_recv(s, 1.5), TypeError),
        (lambda loop, s: loop.sock_recv_into(s, b"read-only"), TypeError),
        (lambda loop, s: loop.sock_sendall(s, "text"), TypeError),
    ],
    ids=["negative-n", "float-n", "readonly-buffer", "str-data"],
)
def test_bad_arguments_raise_when_awaited_like_the_socket_method(loop, sockpair, make_call, error):
    a, _ = sockpair
    call = make_call(loop, a)  # no error yet: the stdlib's coroutine checks on first step
    with pytest.raises(error):
        loop.run_until_complete(call)


def test_sock_recv_on_a_closed_socket_raises_bad_file_descriptor(loop, sockpair):
    a, _ = sockpair
    a.close()
    with pytest.raises(OSError) as info:
        loop.run_until_complete(loop.sock_recv(a, 10))
    assert info.value.errno == 9


def test_sock_recv_on_a_reset_connection_raises_connection_reset(loop):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        client.setblocking(False)

        async def main():
            task = loop.create_task(loop.sock_recv(client, 10))
            await asyncio.sleep(0.01)
            # SO_LINGER 0: close sends a RST.
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server.close()
            return await task

        with pytest.raises(ConnectionResetError):
            loop.run_until_complete(main())


def test_sock_sendall_to_a_closed_peer_raises_broken_pipe(loop, sockpair):
    a, b = sockpair
    b.close()
    with pytest.raises(BrokenPipeError):
        loop.run_until_complete(loop.sock_sendall(a, b"x" * 100))


def test_sock_recv_on_a_closed_loop_raises_when_it_must_wait(loop_factory, sockpair):
    a, _ = sockpair
    other = loop_factory()
    call = other.sock_recv(a, 10)
    other.close()
    # The first step has nothing to read and would have to wait on a closed loop.
    with pytest.raises(RuntimeError, match="closed"):
        call.send(None)


def test_sock_recv_large_n_reads_what_is_there(loop, sockpair):
    a, b = sockpair
    b.send(b"z" * 1000)
    assert loop.run_until_complete(loop.sock_recv(a, 1 << 20)) == b"z" * 1000


def test_task_waiting_in_sock_recv_shows_the_call_in_its_repr(loop, sockpair):
    a, b = sockpair

    async def main():
        task = loop.create_task(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        text = repr(task)
        b.send(b"x")
        await task
        return text

    assert "sock_recv" in loop.run_until_complete(main())


def test_sock_subclass_with_own_recv_is_called(loop, sockpair):
    a, b = sockpair

    class Counting(socket.socket):
        calls = 0

        def recv(self, n):
            Counting.calls += 1
            return super().recv(n)

    wrapped = Counting(fileno=a.detach())
    with wrapped:
        b.send(b"hi")
        assert loop.run_until_complete(loop.sock_recv(wrapped, 10)) == b"hi"
    assert Counting.calls == 1


# --------------------------------------------------------------------------- datagrams


@pytest.fixture
def udp6_or_unix_pair(request, tmp_path):
    """Two bound, non-blocking datagram sockets of the family under test."""
    family = request.param
    if family == "unix":
        a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.bind(str(tmp_path / "a"))
        b.bind(str(tmp_path / "b"))
    else:
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        a = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            a.bind(("::1", 0))
            b.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
    for s in (a, b):
        s.setblocking(False)
    with a, b:
        yield a, b


@pytest.mark.parametrize("udp6_or_unix_pair", ["inet6", "unix"], indirect=True)
def test_sock_recvfrom_reports_the_sender_as_the_socket_module_does(loop, udp6_or_unix_pair):
    a, b = udp6_or_unix_pair

    async def main():
        recv = loop.create_task(loop.sock_recvfrom(b, 100))
        await asyncio.sleep(0)
        assert await loop.sock_sendto(a, b"hello", b.getsockname()) == 5
        return await recv

    data, addr = loop.run_until_complete(main())
    assert data == b"hello"
    assert addr == a.getsockname()


def test_sock_sendto_resolves_a_host_name_through_the_socket(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            b.bind(("127.0.0.1", 0))
            a.setblocking(False)
            b.setblocking(False)
            port = b.getsockname()[1]
            sent = loop.run_until_complete(loop.sock_sendto(a, b"by-name", ("localhost", port)))
            assert sent == 7
            assert loop.run_until_complete(loop.sock_recvfrom(b, 100))[0] == b"by-name"


def test_sock_sendto_with_a_bad_address_raises_like_the_socket(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.setblocking(False)
        with pytest.raises(TypeError, match="must be tuple"):
            loop.run_until_complete(loop.sock_sendto(a, b"x", "not-a-tuple"))


def test_sock_recvfrom_into_rejects_nbytes_beyond_the_buffer(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.setblocking(False)
        with pytest.raises(ValueError, match="greater than the length"):
            loop.run_until_complete(loop.sock_recvfrom_into(a, bytearray(4), 10))


def test_many_datagrams_each_wake_their_own_recvfrom(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            for s in (a, b):
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)

            async def main():
                got = []
                for i in range(200):
                    loop.call_soon(a.sendto, b"%d" % i, b.getsockname())
                    data, addr = await loop.sock_recvfrom(b, 100)
                    assert addr == a.getsockname()
                    got.append(data)
                return got

            assert loop.run_until_complete(main()) == [b"%d" % i for i in range(200)]
