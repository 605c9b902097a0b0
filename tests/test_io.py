"""add_reader / add_writer and the loop.sock_* methods."""

import asyncio
import errno
import os
import socket

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tcp_pair():
    """A connected, non-blocking TCP loopback pair (client, server_side)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    server.setblocking(False)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def udp_pair():
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        yield a, b
    finally:
        a.close()
        b.close()


def run_with_watchdog(loop, seconds=5.0):
    """run_forever(), but give up after *seconds* so a missing wake-up fails, not hangs."""
    fired = []
    watchdog = loop.call_later(seconds, lambda: (fired.append(True), loop.stop()))
    loop.run_forever()
    watchdog.cancel()
    assert not fired, f"loop was not stopped within {seconds} s"


# --------------------------------------------------------------------------- add_reader / writer


def test_add_reader_by_fd_calls_callback_with_args(loop, sockpair):
    r, w = sockpair
    got = []

    def on_readable(*args):
        got.append((args, r.recv(100)))
        loop.remove_reader(r.fileno())
        loop.stop()

    loop.add_reader(r.fileno(), on_readable, "x", 2)
    w.send(b"hello")
    run_with_watchdog(loop)
    assert got == [(("x", 2), b"hello")]


def test_add_reader_by_object_with_fileno(loop, sockpair):
    r, w = sockpair
    got = []

    def on_readable():
        got.append(r.recv(100))
        loop.stop()

    loop.add_reader(r, on_readable)
    loop.call_later(0.01, w.send, b"later")
    run_with_watchdog(loop)
    # Registered by object, removable by the same fd number.
    assert loop.remove_reader(r.fileno()) is True
    assert got == [b"later"]


def test_reader_that_does_not_drain_is_called_again_next_iteration(loop, sockpair):
    """Level-triggered: data left in the socket keeps the reader firing."""
    r, w = sockpair
    calls = 0

    def on_readable():
        nonlocal calls
        calls += 1
        if calls == 5:
            assert r.recv(100) == b"x"
            loop.remove_reader(r)
            loop.stop()

    w.send(b"x")
    loop.add_reader(r, on_readable)
    run_with_watchdog(loop)
    assert calls == 5


def test_reader_is_called_on_peer_close(loop, sockpair):
    r, w = sockpair
    got = []

    def on_readable():
        got.append(r.recv(100))
        loop.remove_reader(r)
        loop.stop()

    loop.add_reader(r, on_readable)
    loop.call_soon(w.close)
    run_with_watchdog(loop)
    assert got == [b""]


def test_add_reader_replaces_previous_reader(loop, sockpair):
    r, w = sockpair
    calls = []

    def first():
        calls.append("first")

    def second():
        calls.append("second")
        r.recv(100)
        loop.remove_reader(r)
        loop.stop()

    loop.add_reader(r, first)
    loop.add_reader(r, second)
    w.send(b"x")
    run_with_watchdog(loop)
    assert calls == ["second"]


def test_add_writer_calls_callback_when_writable(loop, sockpair):
    _, w = sockpair
    got = []

    def on_writable(tag):
        got.append(tag)
        loop.remove_writer(w)
        loop.stop()

    loop.add_writer(w.fileno(), on_writable, "w")
    run_with_watchdog(loop)
    assert got == ["w"]


def test_writer_fires_only_once_the_full_socket_buffer_drains(loop, sockpair):
    r, w = sockpair
    filled = 0
    for chunk in (65536, 1):
        try:
            while True:
                filled += w.send(b"\0" * chunk)
        except BlockingIOError:
            pass
    events = []

    def on_writable():
        events.append("writable")
        loop.remove_writer(w)
        loop.stop()

    def drain():
        remaining = filled
        while remaining:
            remaining -= len(r.recv(remaining))
        events.append("drained")

    loop.add_writer(w, on_writable)
    loop.call_later(0.02, drain)
    run_with_watchdog(loop)
    assert events == ["drained", "writable"]


def test_removing_the_reader_keeps_the_writer_on_the_same_fd(loop, sockpair):
    r, w = sockpair
    events = []

    def on_readable():
        events.append("read")
        assert loop.remove_reader(r) is True  # data is left unread on purpose

    def on_writable():
        events.append("write")
        if events.count("write") == 3:
            loop.stop()

    w.send(b"x")
    loop.add_reader(r, on_readable)
    loop.add_writer(r, on_writable)
    run_with_watchdog(loop)
    assert events.count("read") == 1
    assert events.count("write") == 3
    assert loop.remove_writer(r) is True
    assert loop.remove_reader(r) is False


def test_remove_reader_and_writer_return_whether_something_was_removed(loop, sockpair):
    r, w = sockpair
    assert loop.remove_reader(r) is False
    assert loop.remove_writer(w) is False
    loop.add_reader(r, print)
    loop.add_writer(w, print)
    assert loop.remove_reader(r) is True
    assert loop.remove_reader(r) is False
    assert loop.remove_writer(w.fileno()) is True
    assert loop.remove_writer(w.fileno()) is False


@pytest.mark.parametrize("direction", ["reader", "writer"])
def test_remove_reader_and_writer_find_a_socket_closed_after_registering(loop, direction):
    # AnyIO's Unix streams close their socket, then remove its reader from a future's
    # done callback: the selectors find a closed socket (fileno() == -1) by identity.
    add = getattr(loop, f"add_{direction}")
    remove = getattr(loop, f"remove_{direction}")
    a, b = socket.socketpair()
    with b:
        add(a, print)
        a.close()
        assert a.fileno() == -1
        assert remove(a) is True
        # Gone: the registration is forgotten, as the selector's key is.
        with pytest.raises(ValueError):
            remove(a)


def test_adding_the_same_callback_kind_to_a_socket_closed_after_registering_replaces_it(
    loop,
):
    # The selectors find the closed socket by identity and only swap the callback (no
    # syscall); a change of interest reaches the kernel, which refuses the closed fd.
    a, b = socket.socketpair()
    with b:
        loop.add_reader(a, print, 1)
        a.close()
        assert loop.add_reader(a, print, 2) is None
        with pytest.raises(OSError) as raised:
            loop.add_writer(a, print, 3)
        assert raised.value.errno == errno.EBADF


def test_remove_reader_of_a_closed_socket_never_registered_raises_value_error(loop):
    a, b = socket.socketpair()
    b.close()
    a.close()
    with pytest.raises(ValueError):
        loop.remove_reader(a)
    with pytest.raises(ValueError):
        loop.remove_writer(a)


def test_fd_of_a_closed_and_removed_socket_serves_a_new_transport(loop):
    # After remove_reader(closed socket), nothing of the old registration is left to
    # clash with a transport on a new socket that gets the same fd number.
    old, old_peer = socket.socketpair()
    old_peer.close()
    fd = old.fileno()
    loop.add_reader(old, print)
    old.close()
    assert loop.remove_reader(old) is True

    reused, b = socket.socketpair()
    if b.fileno() == fd:
        reused, b = b, reused
    if reused.fileno() != fd:  # move the new socket to the old fd number
        os.dup2(reused.fileno(), fd, inheritable=False)
        reused.close()
        reused = socket.socket(fileno=fd)

    async def main():
        reader, writer = await asyncio.open_connection(sock=reused)
        try:
            b.sendall(b"over the reused fd")
            async with asyncio.timeout(5):
                return await reader.readexactly(len(b"over the reused fd"))
        finally:
            writer.close()
            await writer.wait_closed()

    with b:
        assert loop.run_until_complete(main()) == b"over the reused fd"


def test_removed_reader_is_not_called(loop, sockpair):
    r, w = sockpair
    calls = []
    loop.add_reader(r, calls.append, "called")
    w.send(b"x")
    loop.remove_reader(r)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert calls == []


def test_reader_callback_exception_goes_to_handler_and_loop_continues(loop, sockpair):
    r, w = sockpair
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    out = []

    def bad_reader():
        r.recv(100)
        loop.remove_reader(r)
        raise ValueError("reader failed")

    loop.add_reader(r, bad_reader)
    w.send(b"x")
    loop.call_later(0.02, out.append, "timer after")
    loop.call_later(0.03, loop.stop)
    loop.run_forever()
    assert out == ["timer after"]
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError)


def test_add_reader_with_closed_fd_raises_os_error(loop):
    r, w = socket.socketpair()
    fd = os.dup(r.fileno())
    r.close()
    w.close()
    os.close(fd)
    with pytest.raises(OSError):
        loop.add_reader(fd, print)
    with pytest.raises(OSError):
        loop.add_writer(fd, print)
    assert loop.remove_reader(fd) is False
    assert loop.remove_writer(fd) is False


def test_negative_fd_raises_value_error(loop):
    with pytest.raises(ValueError, match="Invalid file descriptor: -1"):
        loop.add_reader(-1, print)
    with pytest.raises(ValueError, match="Invalid file descriptor: -1"):
        loop.add_writer(-1, print)
    with pytest.raises(ValueError):
        loop.remove_reader(-1)
    with pytest.raises(ValueError):
        loop.remove_writer(-1)


@pytest.mark.parametrize("bad", [object(), "3", 1.5], ids=["object", "str", "float"])
def test_object_without_fileno_raises_value_error(loop, bad):
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.add_reader(bad, print)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.add_writer(bad, print)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.remove_reader(bad)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.remove_writer(bad)


def test_add_reader_on_closed_loop_raises_runtime_error(loop, sockpair):
    r, _ = sockpair
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_reader(r, print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_writer(r, print)


# --------------------------------------------------------------------------- sock_*


def test_sock_recv_waits_for_data(loop, sockpair):
    a, b = sockpair

    async def main():
        loop.call_later(0.01, b.send, b"payload")
        return await loop.sock_recv(a, 100)

    assert loop.run_until_complete(main()) == b"payload"


def test_sock_recv_returns_empty_bytes_on_eof(loop, sockpair):
    a, b = sockpair
    b.close()
    assert loop.run_until_complete(loop.sock_recv(a, 100)) == b""


def test_sock_recv_into_fills_buffer(loop, sockpair):
    a, b = sockpair
    buf = bytearray(16)

    async def main():
        loop.call_later(0.01, b.send, b"abcdef")
        return await loop.sock_recv_into(a, buf)

    n = loop.run_until_complete(main())
    assert n == 6
    assert buf[:n] == b"abcdef"


def test_sock_recv_can_be_cancelled(loop, sockpair):
    a, b = sockpair

    async def main():
        task = loop.create_task(loop.sock_recv(a, 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The socket is usable afterwards.
        b.send(b"after")
        return await loop.sock_recv(a, 10)

    assert loop.run_until_complete(main()) == b"after"


def test_sock_sendto_and_sock_recvfrom(loop, udp_pair):
    a, b = udp_pair

    async def main():
        recv = loop.create_task(loop.sock_recvfrom(b, 1000))
        await asyncio.sleep(0.01)
        sent = await loop.sock_sendto(a, b"datagram", b.getsockname())
        return sent, await recv

    sent, (data, addr) = loop.run_until_complete(main())
    assert sent == len(b"datagram")
    assert data == b"datagram"
    assert addr == a.getsockname()


def test_sock_recvfrom_into(loop, udp_pair):
    a, b = udp_pair
    buf = bytearray(64)

    async def main():
        recv = loop.create_task(loop.sock_recvfrom_into(b, buf))
        await asyncio.sleep(0.01)
        await loop.sock_sendto(a, b"into-me", b.getsockname())
        return await recv

    nbytes, addr = loop.run_until_complete(main())
    assert nbytes == 7
    assert buf[:nbytes] == b"into-me"
    assert addr == a.getsockname()


def test_sock_recvfrom_into_respects_nbytes(loop, udp_pair):
    a, b = udp_pair
    buf = bytearray(64)
    a.sendto(b"0123456789", b.getsockname())
    nbytes, addr = loop.run_until_complete(loop.sock_recvfrom_into(b, buf, 4))
    assert nbytes == 4
    assert buf[:4] == b"0123"
    assert addr == a.getsockname()


def test_sock_sendall_large_payload_arrives_intact(loop, tcp_pair):
    client, server = tcp_pair
    payload = os.urandom(4 * 1024 * 1024)

    async def reader():
        chunks = []
        total = 0
        while total < len(payload):
            chunk = await loop.sock_recv(server, 256 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    async def main():
        read_task = loop.create_task(reader())
        assert await loop.sock_sendall(client, payload) is None
        return await read_task

    received = loop.run_until_complete(main())
    assert len(received) == len(payload)
    assert received == payload


def test_sock_sendall_accepts_memoryview_and_bytearray(loop, sockpair):
    a, b = sockpair

    async def main():
        await loop.sock_sendall(a, memoryview(b"mem"))
        await loop.sock_sendall(a, bytearray(b"arr"))
        data = b""
        while len(data) < 6:
            data += await loop.sock_recv(b, 10)
        return data

    assert loop.run_until_complete(main()) == b"memarr"


def test_sock_connect_and_sock_accept_over_tcp_loopback(loop, listener):
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    conn = None
    try:

        async def main():
            accept = loop.create_task(loop.sock_accept(listener))
            await loop.sock_connect(client, listener.getsockname())
            return await accept

        conn, addr = loop.run_until_complete(main())
        assert addr == client.getsockname()
        assert client.getpeername() == listener.getsockname()
        # The accepted socket is non-blocking, ready for the other sock_* methods.
        assert conn.gettimeout() == 0

        async def roundtrip():
            await loop.sock_sendall(client, b"ping")
            data = await loop.sock_recv(conn, 10)
            await loop.sock_sendall(conn, data.upper())
            return await loop.sock_recv(client, 10)

        assert loop.run_until_complete(roundtrip()) == b"PING"
    finally:
        client.close()
        if conn is not None:
            conn.close()


def test_sock_accept_can_be_cancelled_and_accept_again(loop, listener):
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    accepted = []

    async def main():
        first = loop.create_task(loop.sock_accept(listener))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = loop.create_task(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        conn, _ = await second
        accepted.append(conn)

    try:
        loop.run_until_complete(main())
        assert len(accepted) == 1
    finally:
        client.close()
        for conn in accepted:
            conn.close()


def test_sock_connect_to_refused_port_raises_connection_refused(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        addr = probe.getsockname()  # nothing listens here once closed
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    try:
        with pytest.raises(ConnectionRefusedError):
            loop.run_until_complete(loop.sock_connect(client, addr))
    finally:
        client.close()


def test_sock_sendfile_sends_whole_file(loop, tcp_pair, tmp_path):
    client, server = tcp_pair
    data = os.urandom(1024 * 1024 + 123)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)

    async def reader(expected):
        buf = bytearray()
        while len(buf) < expected:
            chunk = await loop.sock_recv(server, 256 * 1024)
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    async def main(f):
        read_task = loop.create_task(reader(len(data)))
        sent = await loop.sock_sendfile(client, f)
        return sent, await read_task

    with open(path, "rb") as f:
        sent, received = loop.run_until_complete(main(f))
        assert f.tell() == len(data)
    assert sent == len(data)
    assert received == data


def test_sock_sendfile_with_offset_and_count(loop, tcp_pair, tmp_path):
    client, server = tcp_pair
    data = bytes(range(256)) * 64
    path = tmp_path / "payload.bin"
    path.write_bytes(data)

    async def main(f):
        sent = await loop.sock_sendfile(client, f, offset=100, count=1000)
        buf = bytearray()
        while len(buf) < 1000:
            buf += await loop.sock_recv(server, 4096)
        return sent, bytes(buf)

    with open(path, "rb") as f:
        sent, received = loop.run_until_complete(main(f))
        assert f.tell() == 1100
    assert sent == 1000
    assert received == data[100:1100]


def test_sock_sendfile_rejects_datagram_socket(loop, udp_pair, tmp_path):
    a, _ = udp_pair
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        with pytest.raises(ValueError):
            loop.run_until_complete(loop.sock_sendfile(a, f))


SOCK_METHOD_CALLS = {
    "sock_recv": lambda loop, s: loop.sock_recv(s, 1),
    "sock_recv_into": lambda loop, s: loop.sock_recv_into(s, bytearray(1)),
    "sock_recvfrom": lambda loop, s: loop.sock_recvfrom(s, 1),
    "sock_recvfrom_into": lambda loop, s: loop.sock_recvfrom_into(s, bytearray(1)),
    "sock_sendall": lambda loop, s: loop.sock_sendall(s, b"x"),
    "sock_sendto": lambda loop, s: loop.sock_sendto(s, b"x", ("127.0.0.1", 9)),
    "sock_connect": lambda loop, s: loop.sock_connect(s, ("127.0.0.1", 9)),
    "sock_accept": lambda loop, s: loop.sock_accept(s),
}


@pytest.mark.parametrize("method", sorted(SOCK_METHOD_CALLS))
def test_blocking_socket_raises_value_error_in_debug_mode(loop, method):
    """The stdlib checks for a blocking socket in debug mode only; pin that."""
    loop.set_debug(True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert sock.gettimeout() is None
        with pytest.raises(ValueError, match="the socket must be non-blocking"):
            loop.run_until_complete(SOCK_METHOD_CALLS[method](loop, sock))
    finally:
        sock.close()


def test_blocking_socket_to_sock_sendfile_raises_value_error_in_debug_mode(loop, tmp_path):
    loop.set_debug(True)
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with open(path, "rb") as f:
            with pytest.raises(ValueError, match="the socket must be non-blocking"):
                loop.run_until_complete(loop.sock_sendfile(sock, f))
    finally:
        sock.close()
