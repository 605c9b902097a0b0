"""A real library on the loop under test: AnyIO on its asyncio backend.

Most tests run AnyIO code on the ``loop`` fixture's loop with ``run_until_complete`` (AnyIO
finds the running asyncio loop itself); the ``anyio.run`` tests hand AnyIO's own runner
the ``loop_factory`` fixture.  Either way each scenario runs on the stdlib loop and on
ferroloop: task groups and cancel scopes, memory object streams, TCP/Unix/TLS streams, UDP,
subprocesses, worker threads, signals, timing and the synchronisation primitives.  The
loop fixture fails a test whose loop exception handler was called, and pytest turns
warnings (unclosed streams, sockets and transports) into errors.

AnyIO's own pytest plugin (``anyio_backend``, ``@pytest.mark.anyio``) is not used: the two
loops are the params of our fixtures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import anyio  # a test dependency (pyproject.toml): missing, the module fails to import
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSAttribute, TLSListener
from netutil import MiB, assert_bytes_equal, pattern, run

HOST = "127.0.0.1"
PAYLOAD = 4 * MiB + 4_321  # not a multiple of any chunk size used below


# --------------------------------------------------------------------------- helpers


async def send_in_chunks(stream, data: bytes, step: int = 65_521) -> None:
    for start in range(0, len(data), step):
        await stream.send(data[start : start + step])


async def receive_exactly(stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got.extend(await stream.receive())
    return bytes(got)


async def echo_handler(stream) -> None:
    """Send back everything received until the peer closes or half-closes."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except anyio.BrokenResourceError:
            pass


async def echo_round_trip(stream, data: bytes) -> bytes:
    """Send *data* from one task while reading the echo in this one."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(send_in_chunks, stream, data)
        got = await receive_exactly(stream, len(data))
    return got


@pytest.fixture
def unix_path(tmp_path):
    path = os.path.join(tmp_path, "anyio.sock")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")
    return path


# --------------------------------------------------------------------------- anyio.run


def test_anyio_run_drives_a_loop_made_by_the_loop_factory(loop_factory):
    created = []

    def factory():
        new = loop_factory()
        created.append(new)
        return new

    async def main(n: int):
        running = asyncio.get_running_loop()
        results = []

        async def child(i: int):
            await anyio.sleep(0.01 * (n - i))
            results.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(child, i)
        in_thread = await anyio.to_thread.run_sync(lambda: threading.get_ident())
        return running, results, in_thread

    running, results, in_thread = anyio.run(
        main, 5, backend="asyncio", backend_options={"loop_factory": factory}
    )
    assert len(created) == 1
    assert running is created[0]
    assert type(running).__module__.split(".")[0] == loop_factory.impl
    assert running.is_closed()  # the runner closes its loop
    assert results == [4, 3, 2, 1, 0]
    assert in_thread != threading.get_ident()


def test_anyio_run_serves_tcp_and_runs_a_subprocess(loop_factory):
    data = pattern(MiB + 17, 3)

    async def main():
        async with await anyio.create_tcp_listener(local_host=HOST) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, echo_handler)
                async with await anyio.connect_tcp(HOST, port) as stream:
                    got = await echo_round_trip(stream, data)
                tg.cancel_scope.cancel()
        done = await anyio.run_process([sys.executable, "-c", "print('child', 6 * 7)"])
        return got, done.stdout

    got, stdout = anyio.run(main, backend="asyncio", backend_options={"loop_factory": loop_factory})
    assert_bytes_equal(got, data)
    assert stdout.split() == [b"child", b"42"]


# --------------------------------------------------------------------------- task groups


def test_task_group_waits_for_every_child_and_start_returns_the_started_value(loop):
    async def main():
        finished = []

        async def child(i: int):
            await anyio.sleep(0.005 * (10 - i))
            finished.append(i)

        async def server(*, task_status=anyio.TASK_STATUS_IGNORED):
            await anyio.sleep(0.01)
            task_status.started("ready on 1234")
            await anyio.sleep(0.02)
            finished.append("server")

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(child, i, name=f"child-{i}")
            started = await tg.start(server)
            assert started == "ready on 1234"
            assert "server" not in finished
        return finished

    finished = run(loop, main())
    assert sorted(finished, key=str) == sorted([*range(10), "server"], key=str)
    assert finished.index(9) < finished.index(0)  # shorter sleeps finished first


def test_failing_child_cancels_its_siblings_and_raises_an_exception_group(loop):
    async def main():
        cancelled = []

        async def sibling(i: int):
            try:
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                cancelled.append(i)
                raise

        async def failing():
            await anyio.sleep(0.05)
            raise ValueError("child failed")

        started = time.monotonic()
        with pytest.raises(ExceptionGroup) as info:
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(sibling, i)
                tg.start_soon(failing)
        elapsed = time.monotonic() - started
        return info.value, sorted(cancelled), elapsed

    group, cancelled, elapsed = run(loop, main())
    assert [type(exc) for exc in group.exceptions] == [ValueError]
    assert str(group.exceptions[0]) == "child failed"
    assert cancelled == [0, 1, 2, 3, 4]
    assert elapsed < 5


def test_cancelled_exception_class_is_asyncio_cancelled_error(loop):
    async def main():
        return anyio.get_cancelled_exc_class()

    assert run(loop, main()) is asyncio.CancelledError


# --------------------------------------------------------------------------- cancel scopes


def test_fail_after_raises_timeout_error_at_its_deadline(loop):
    async def main():
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.1):
                await anyio.sleep(30)
        elapsed = time.monotonic() - started
        # A deadline that is not reached leaves the body alone.
        with anyio.fail_after(5) as scope:
            await anyio.sleep(0.01)
        assert not scope.cancelled_caught
        return elapsed

    elapsed = run(loop, main())
    assert 0.09 <= elapsed < 2, elapsed


def test_move_on_after_cancels_the_body_and_reports_cancelled_caught(loop):
    async def main():
        reached = []
        started = time.monotonic()
        with anyio.move_on_after(0.1) as scope:
            assert scope.deadline == pytest.approx(anyio.current_time() + 0.1, abs=0.05)
            await anyio.sleep(30)
            reached.append("after the sleep")
        elapsed = time.monotonic() - started
        with anyio.move_on_after(5) as quick:
            await anyio.sleep(0)
        return scope, quick, reached, elapsed

    scope, quick, reached, elapsed = run(loop, main())
    assert scope.cancelled_caught
    assert scope.cancel_called
    assert reached == []
    assert 0.09 <= elapsed < 2, elapsed
    assert not quick.cancelled_caught
    assert not quick.cancel_called


def test_shielded_scope_finishes_its_work_despite_an_outer_cancel(loop):
    async def main():
        steps = []
        started = time.monotonic()
        with anyio.move_on_after(0.05) as outer:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.2)  # the outer deadline passes meanwhile
                steps.append("shielded work done")
            steps.append("after the shield")  # no checkpoint yet: still runs
            await anyio.sleep(30)  # the first checkpoint outside the shield is cancelled
            steps.append("never")
        return steps, outer.cancelled_caught, time.monotonic() - started

    steps, caught, elapsed = run(loop, main())
    assert steps == ["shielded work done", "after the shield"]
    assert caught
    assert 0.19 <= elapsed < 2, elapsed


def test_cancelling_a_scope_from_another_task(loop):
    async def main():
        scope_ready = anyio.Event()
        holder = {}
        outcome = []

        async def worker():
            with anyio.CancelScope() as scope:
                holder["scope"] = scope
                scope_ready.set()
                await anyio.sleep(30)
                outcome.append("slept")
            outcome.append(("cancelled_caught", scope.cancelled_caught))
            await anyio.sleep(0)  # only that scope was cancelled: the task goes on
            outcome.append("continued")

        async def canceller():
            await scope_ready.wait()
            await anyio.sleep(0.02)
            holder["scope"].cancel()

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            tg.start_soon(canceller)
        return outcome, time.monotonic() - started

    outcome, elapsed = run(loop, main())
    assert outcome == [("cancelled_caught", True), "continued"]
    assert elapsed < 5


def test_cancelling_the_task_group_scope_cancels_every_child(loop):
    async def main():
        cancelled = []

        async def child(i: int):
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(i)
                raise

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(child, i)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        return sorted(cancelled), tg.cancel_scope.cancelled_caught

    cancelled, caught = run(loop, main())
    assert cancelled == list(range(20))
    assert caught


# --------------------------------------------------------------------------- memory streams


def test_memory_object_stream_delivers_every_item_once_to_cloned_receivers(loop):
    count = 3000

    async def main():
        send, receive = anyio.create_memory_object_stream[int](max_buffer_size=10)
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}

        async def producer(sender, start: int):
            async with sender:
                for i in range(start, count, 2):
                    await sender.send(i)

        async def consumer(receiver, k: int):
            async with receiver:
                async for item in receiver:
                    got[k].append(item)
                    if item % 97 == 0:
                        await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            async with send, receive:
                tg.start_soon(producer, send.clone(), 0)
                tg.start_soon(producer, send.clone(), 1)
                for k in range(3):
                    tg.start_soon(consumer, receive.clone(), k)
        return got

    got = run(loop, main())
    everything = sorted(got[0] + got[1] + got[2])
    assert everything == list(range(count))
    assert all(got.values()), {k: len(v) for k, v in got.items()}
    for items in got.values():  # each producer's items arrive in its own order
        evens = [i for i in items if i % 2 == 0]
        odds = [i for i in items if i % 2 == 1]
        assert evens == sorted(evens) and odds == sorted(odds)


def test_memory_object_stream_end_of_stream_would_block_and_broken_resource(loop):
    async def main():
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=1)
        with send, receive:
            send.send_nowait("one")
            with pytest.raises(anyio.WouldBlock):
                send.send_nowait("two")  # the buffer (1) is full
            assert receive.receive_nowait() == "one"
            with pytest.raises(anyio.WouldBlock):
                receive.receive_nowait()
            with anyio.move_on_after(0.05) as scope:
                await receive.receive()
            assert scope.cancelled_caught
            await send.send("last")
            send.close()
            assert await receive.receive() == "last"
            with pytest.raises(anyio.EndOfStream):
                await receive.receive()

        send, receive = anyio.create_memory_object_stream[str]()
        with send:
            receive.close()
            with pytest.raises(anyio.BrokenResourceError):
                await send.send("nobody listens")

    run(loop, main())


# --------------------------------------------------------------------------- TCP


def test_tcp_streams_echo_several_mib_byte_for_byte(loop):
    data = pattern(PAYLOAD, 1)

    async def main():
        peers = []

        async def handler(stream):
            peers.append(stream.extra(SocketAttribute.remote_address))
            await echo_handler(stream)

        async with await anyio.create_tcp_listener(local_host=HOST) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                async with await anyio.connect_tcp(HOST, port) as stream:
                    assert stream.extra(SocketAttribute.remote_address) == (HOST, port)
                    local = stream.extra(SocketAttribute.local_address)
                    got = await echo_round_trip(stream, data)
                    # Half-close: the server sees the end and closes its side too.
                    await stream.send_eof()
                    with pytest.raises(anyio.EndOfStream):
                        await stream.receive()
                tg.cancel_scope.cancel()
        assert peers == [local]
        return got

    got = run(loop, main(), timeout=60)
    assert_bytes_equal(got, data)


def test_tcp_many_concurrent_connections_each_get_their_own_echo(loop):
    clients = 50

    async def main():
        async with await anyio.create_tcp_listener(local_host=HOST) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, echo_handler)
                results = {}

                async def one(c: int):
                    data = pattern(10_000 + c * 997, c)
                    async with await anyio.connect_tcp(HOST, port) as stream:
                        results[c] = (await echo_round_trip(stream, data)) == data

                async with anyio.create_task_group() as clients_tg:
                    for c in range(clients):
                        clients_tg.start_soon(one, c)
                tg.cancel_scope.cancel()
        return results

    results = run(loop, main(), timeout=60)
    assert results == {c: True for c in range(clients)}


def test_connect_tcp_to_a_closed_port_fails_with_connection_refused(loop):
    async def main():
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        with pytest.raises(OSError) as info:
            await anyio.connect_tcp(HOST, port)
        return info.value

    exc = run(loop, main())
    # AnyIO tries every address, then raises one OSError caused by the attempts' errors.
    assert str(exc) == "All connection attempts failed"
    assert type(exc.__cause__) is ConnectionRefusedError, repr(exc.__cause__)


def test_getaddrinfo_and_getnameinfo_go_through_the_loop(loop):
    async def main():
        infos = await anyio.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
        numeric = await anyio.getaddrinfo("127.0.0.1", "http", type=socket.SOCK_STREAM)
        name = await anyio.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST)
        return infos, numeric, name

    infos, numeric, name = run(loop, main())
    assert infos == socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
    assert numeric[0][4] == ("127.0.0.1", 80)
    assert name == socket.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST)


def test_buffered_receive_stream_reads_lines_over_tcp(loop):
    lines = [f"line {i}: {'x' * (i % 300)}".encode() for i in range(500)]

    async def main():
        async def writer(stream):
            async with stream:
                await stream.send(b"".join(line + b"\r\n" for line in lines))

        async with await anyio.create_tcp_listener(local_host=HOST) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, writer)
                async with await anyio.connect_tcp(HOST, port) as stream:
                    buffered = BufferedByteReceiveStream(stream)
                    got = [await buffered.receive_until(b"\r\n", 1024) for _ in lines]
                    with pytest.raises(anyio.IncompleteRead):
                        await buffered.receive_exactly(1)
                tg.cancel_scope.cancel()
        return got

    assert run(loop, main()) == lines


# --------------------------------------------------------------------------- Unix sockets


def test_unix_streams_echo_several_mib_byte_for_byte(loop, unix_path):
    data = pattern(PAYLOAD, 2)

    async def main():
        async with await anyio.create_unix_listener(unix_path) as listener:
            assert listener.extra(SocketAttribute.local_address) == unix_path
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, echo_handler)
                async with await anyio.connect_unix(unix_path) as stream:
                    assert stream.extra(SocketAttribute.remote_address) == unix_path
                    got = await echo_round_trip(stream, data)
                    await stream.send_eof()
                    with pytest.raises(anyio.EndOfStream):
                        await stream.receive()
                tg.cancel_scope.cancel()
        return got

    got = run(loop, main(), timeout=60)
    assert_bytes_equal(got, data)


def test_unix_stream_passes_file_descriptors(loop, unix_path, tmp_path):
    note = tmp_path / "note.txt"
    note.write_bytes(b"read through a passed descriptor")

    async def main():
        received = []

        async def handler(stream):
            async with stream:
                message, fds = await stream.receive_fds(1024, 2)
                for fd in fds:
                    with os.fdopen(fd, "rb") as f:
                        received.append(f.read())
                await stream.send(message.upper())

        async with await anyio.create_unix_listener(unix_path) as listener:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                async with await anyio.connect_unix(unix_path) as stream:
                    with open(note, "rb") as a, open(note, "rb") as b:
                        await stream.send_fds(b"two files", [a, b])
                    reply = await stream.receive()
                tg.cancel_scope.cancel()
        return received, reply

    received, reply = run(loop, main())
    assert reply == b"TWO FILES"
    assert received == [b"read through a passed descriptor"] * 2


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_closing_a_stream_wakes_its_pending_receiver_with_closed_resource_error(
    loop, kind, unix_path
):
    # AnyIO's Unix stream closes its socket and then removes the socket's reader: the
    # loop must find the reader of a closed socket (and forget it, for the next fd user).
    async def main():
        listener = await (
            anyio.create_unix_listener(unix_path)
            if kind == "unix"
            else anyio.create_tcp_listener(local_host=HOST)
        )
        outcome = []

        async def idle(stream):
            async with stream:
                await anyio.sleep_forever()

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, idle)
            for _ in range(3):  # the fd numbers get reused by the next connection
                if kind == "unix":
                    stream = await anyio.connect_unix(unix_path)
                else:
                    port = listener.extra(SocketAttribute.local_port)
                    stream = await anyio.connect_tcp(HOST, port)

                async def receiver(stream=stream):
                    try:
                        await stream.receive()
                    except anyio.ClosedResourceError:
                        outcome.append("closed")

                tg.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                await stream.aclose()
                await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        return outcome

    assert run(loop, main()) == ["closed"] * 3


def test_peer_reset_makes_receive_and_send_raise_broken_resource_error(loop):
    async def main():
        async def resetting(stream):
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # SO_LINGER 0: the close sends a reset

        async with await anyio.create_tcp_listener(local_host=HOST) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, resetting)
                async with await anyio.connect_tcp(HOST, port) as stream:
                    with pytest.raises(anyio.BrokenResourceError) as on_receive:
                        with anyio.fail_after(5):
                            await stream.receive()
                    with pytest.raises(anyio.BrokenResourceError) as on_send:
                        await stream.send(b"into the void")
                tg.cancel_scope.cancel()
        return on_receive.value, on_send.value

    on_receive, on_send = run(loop, main())
    assert type(on_receive.__cause__) is ConnectionResetError
    assert type(on_send.__cause__) is ConnectionResetError


def test_wait_readable_wait_writable_and_notify_closing(loop, sockpair):
    a, b = sockpair

    async def main():
        got = []
        async with anyio.create_task_group() as tg:

            async def reader():
                await anyio.wait_readable(a)
                got.append(a.recv(100))

            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            b.send(b"ready")
        with anyio.fail_after(5):
            await anyio.wait_writable(a)

        async with anyio.create_task_group() as tg:

            async def closed_while_waiting():
                with pytest.raises(anyio.ClosedResourceError):
                    await anyio.wait_readable(a)
                got.append("closed")

            tg.start_soon(closed_while_waiting)
            await anyio.wait_all_tasks_blocked()
            anyio.notify_closing(a)
        return got

    assert run(loop, main()) == [b"ready", "closed"]


# --------------------------------------------------------------------------- TLS


def test_tls_streams_verify_the_server_and_echo_several_mib(loop, tls_contexts):
    server_context, client_context = tls_contexts
    data = pattern(2 * MiB + 99, 4)

    async def main():
        server_side = []

        async def handler(stream):
            server_side.append(stream.extra(TLSAttribute.tls_version))
            async with stream:
                await send_in_chunks(stream, await receive_exactly(stream, len(data)))
                # The client closes first (close_notify), then this side.
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()

        tcp = await anyio.create_tcp_listener(local_host=HOST)
        port = tcp.extra(SocketAttribute.local_port)
        async with TLSListener(tcp, server_context) as listener:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                stream = await anyio.connect_tcp(HOST, port, tls=True, ssl_context=client_context)
                async with stream:
                    assert stream.extra(TLSAttribute.tls_version).startswith("TLSv1.")
                    peer = stream.extra(TLSAttribute.peer_certificate)
                    assert peer["subject"] == ((("commonName", "localhost"),),)
                    await send_in_chunks(stream, data)
                    got = await receive_exactly(stream, len(data))
                async with asyncio.timeout(5):
                    while len(server_side) < 1:
                        await anyio.sleep(0.01)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        return got, server_side

    got, server_side = run(loop, main(), timeout=60)
    assert_bytes_equal(got, data)
    assert len(server_side) == 1 and server_side[0].startswith("TLSv1.")


def test_tls_client_rejects_a_certificate_it_does_not_trust(loop, tls_contexts, caplog):
    server_context, _ = tls_contexts
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded: trusts nothing

    async def main():
        async def handler(stream):
            async with stream:
                await stream.send(b"never sent")

        tcp = await anyio.create_tcp_listener(local_host=HOST)
        port = tcp.extra(SocketAttribute.local_port)
        async with TLSListener(tcp, server_context) as listener:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                with pytest.raises(ssl.SSLCertVerificationError):
                    await anyio.connect_tcp(HOST, port, tls=True, ssl_context=untrusting)
                await anyio.sleep(0.05)  # let the server see the failed handshake
                tg.cancel_scope.cancel()

    run(loop, main())


# --------------------------------------------------------------------------- UDP


def test_udp_sockets_exchange_datagrams_with_their_addresses(loop):
    count = 200

    async def main():
        async with await anyio.create_udp_socket(local_host=HOST) as server:
            server_port = server.extra(SocketAttribute.local_port)

            async def serve():
                async for data, address in server:
                    await server.sendto(data[::-1], *address)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                async with await anyio.create_connected_udp_socket(HOST, server_port) as client:
                    assert client.extra(SocketAttribute.remote_address) == (HOST, server_port)
                    replies = []
                    for i in range(count):
                        datagram = pattern(1 + (i * 131) % 8000, i)
                        await client.send(datagram)
                        with anyio.fail_after(5):
                            replies.append((await client.receive()) == datagram[::-1])
                # An unconnected socket gets the sender's address with every datagram.
                async with await anyio.create_udp_socket(local_host=HOST) as other:
                    other_port = other.extra(SocketAttribute.local_port)
                    await other.sendto(b"hello", HOST, server_port)
                    with anyio.fail_after(5):
                        data, address = await other.receive()
                tg.cancel_scope.cancel()
        return replies, data, address, other_port, server_port

    replies, data, address, other_port, server_port = run(loop, main())
    assert replies == [True] * count
    assert data == b"olleh"
    assert address == (HOST, server_port)
    assert other_port != server_port


def test_unix_datagram_sockets_exchange_packets_and_close_wakes_the_receiver(loop, tmp_path):
    server_path = str(tmp_path / "server.dgram")
    client_path = str(tmp_path / "client.dgram")
    if len(os.fsencode(server_path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")

    async def main():
        replies = []
        async with await anyio.create_unix_datagram_socket(local_path=server_path) as server:

            async def serve():
                async for data, address in server:
                    await server.sendto(data.upper(), address)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                async with await anyio.create_connected_unix_datagram_socket(
                    server_path, local_path=client_path
                ) as client:
                    for i in range(100):
                        await client.send(f"packet {i}".encode())
                        with anyio.fail_after(5):
                            replies.append(await client.receive())
                tg.cancel_scope.cancel()

        # Closing a datagram socket wakes the task waiting to receive on it.
        outcome = []
        lonely = await anyio.create_unix_datagram_socket()
        async with anyio.create_task_group() as tg:

            async def receiver():
                with pytest.raises(anyio.ClosedResourceError):
                    await lonely.receive()
                outcome.append("closed")

            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            await lonely.aclose()
        return replies, outcome

    replies, outcome = run(loop, main())
    assert replies == [f"PACKET {i}".encode() for i in range(100)]
    assert outcome == ["closed"]


def test_ipv6_tcp_and_udp_report_their_addresses(loop):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def main():
        async with await anyio.create_udp_socket(local_host="::1") as server:
            port = server.extra(SocketAttribute.local_port)
            async with await anyio.create_connected_udp_socket("::1", port) as client:
                await client.send(b"over udp6")
                with anyio.fail_after(5):
                    data, address = await server.receive()
                await server.sendto(data[::-1], *address)
                with anyio.fail_after(5):
                    reply = await client.receive()
                udp = (address, client.extra(SocketAttribute.local_address), reply)

        async def tell_peer(stream):
            async with stream:
                await stream.send(repr(stream.extra(SocketAttribute.remote_address)).encode())

        async with await anyio.create_tcp_listener(local_host="::1") as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, tell_peer)
                async with await anyio.connect_tcp("::1", port) as stream:
                    told = await stream.receive()
                    local = stream.extra(SocketAttribute.local_address)
                    remote = stream.extra(SocketAttribute.remote_address)
                tg.cancel_scope.cancel()
        return udp, (told, local, remote, port)

    (address, client_local, reply), (told, local, remote, port) = run(loop, main())
    assert address == client_local
    assert address[0] == "::1"
    assert reply == b"6pdu revo"
    assert told == repr(local).encode()
    assert remote == ("::1", port)


# --------------------------------------------------------------------------- subprocesses


def test_run_process_captures_output_and_feeds_input(loop):
    code = "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data[::-1]); "
    code += "sys.stderr.write('err:' + str(len(data)))"
    data = pattern(300_000, 5)

    async def main():
        return await anyio.run_process([sys.executable, "-c", code], input=data)

    done = run(loop, main(), timeout=30)
    assert done.returncode == 0
    assert_bytes_equal(done.stdout, data[::-1])
    assert done.stderr == b"err:300000"


def test_run_process_non_zero_exit_raises_called_process_error(loop):
    code = "import sys; print('partial'); sys.stderr.write('bad things'); sys.exit(3)"

    async def main():
        with pytest.raises(subprocess.CalledProcessError) as info:
            await anyio.run_process([sys.executable, "-c", code])
        unchecked = await anyio.run_process([sys.executable, "-c", code], check=False)
        return info.value, unchecked

    exc, unchecked = run(loop, main(), timeout=30)
    assert exc.returncode == 3
    assert exc.stdout.strip() == b"partial"
    assert exc.stderr == b"bad things"
    assert unchecked.returncode == 3


def test_open_process_streams_stdin_to_stdout(loop):
    # The child upper-cases line by line, flushing each: a real pipe conversation.
    code = (
        "import sys\n"
        "for line in sys.stdin.buffer:\n"
        "    sys.stdout.buffer.write(line.upper())\n"
        "    sys.stdout.buffer.flush()\n"
        "sys.exit(7)\n"
    )
    lines = [f"line {i} {'abc' * (i % 50)}\n".encode() for i in range(2000)]

    async def main():
        async with await anyio.open_process([sys.executable, "-c", code]) as process:
            # One question and its answer, then the rest streamed.
            await process.stdin.send(b"first\n")
            assert await process.stdout.receive() == b"FIRST\n"
            got = bytearray()
            expected = b"".join(lines).upper()

            async def feed():
                for line in lines:
                    await process.stdin.send(line)
                await process.stdin.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                async for chunk in process.stdout:
                    got.extend(chunk)
            returncode = await process.wait()
            assert process.returncode == 7
        return bytes(got), expected, returncode

    got, expected, returncode = run(loop, main(), timeout=60)
    assert_bytes_equal(got, expected)
    assert returncode == 7


def test_run_process_reads_outputs_larger_than_the_pipe_buffer(loop):
    # Several MiB on stdout and stderr at once: both pipes must be drained together.
    code = (
        "import sys\n"
        "for i in range(64):\n"
        "    sys.stdout.buffer.write(bytes([i]) * 65536)\n"
        "    sys.stderr.buffer.write(bytes([255 - i]) * 16384)\n"
    )

    async def main():
        return await anyio.run_process([sys.executable, "-c", code])

    done = run(loop, main(), timeout=60)
    assert_bytes_equal(done.stdout, b"".join(bytes([i]) * 65536 for i in range(64)))
    assert_bytes_equal(done.stderr, b"".join(bytes([255 - i]) * 16384 for i in range(64)))


def test_open_process_terminate_and_kill_report_the_signal(loop):
    async def main():
        codes = []
        for stop in ("terminate", "kill"):
            process = await anyio.open_process(
                [sys.executable, "-c", "import time; time.sleep(60)"]
            )
            async with process:
                getattr(process, stop)()
                with anyio.fail_after(10):
                    codes.append(await process.wait())
        return codes

    assert run(loop, main(), timeout=30) == [-signal.SIGTERM, -signal.SIGKILL]


# --------------------------------------------------------------------------- threads


def test_to_thread_runs_in_a_worker_thread_and_propagates_results_and_errors(loop):
    def work(x: int) -> tuple[int, int]:
        time.sleep(0.01)
        return x * 2, threading.get_ident()

    def broken():
        raise KeyError("from the thread")

    async def main():
        results = await asyncio.gather(*(anyio.to_thread.run_sync(work, i) for i in range(10)))
        with pytest.raises(KeyError, match="from the thread"):
            await anyio.to_thread.run_sync(broken)
        return results

    results = run(loop, main())
    assert [value for value, _ in results] == [i * 2 for i in range(10)]
    assert threading.get_ident() not in {ident for _, ident in results}


def test_capacity_limiter_bounds_worker_threads(loop):
    active = 0
    peak = 0
    lock = threading.Lock()

    def work():
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1

    async def main():
        limiter = anyio.CapacityLimiter(2)
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(lambda: anyio.to_thread.run_sync(work, limiter=limiter))
        return limiter.borrowed_tokens

    assert run(loop, main(), timeout=30) == 0
    assert peak == 2


def test_from_thread_calls_back_into_the_event_loop(loop):
    async def main():
        loop_thread = threading.get_ident()
        event = anyio.Event()
        calls = []

        async def async_in_loop(x: int) -> int:
            calls.append(("async", threading.get_ident()))
            await anyio.sleep(0.01)
            return x + 1

        def sync_in_loop(x: int) -> int:
            calls.append(("sync", threading.get_ident()))
            event.set()
            return x * 10

        def in_worker() -> tuple[int, int]:
            a = anyio.from_thread.run(async_in_loop, 41)
            b = anyio.from_thread.run_sync(sync_in_loop, 5)
            return a, b

        results = await anyio.to_thread.run_sync(in_worker)
        assert event.is_set()
        return results, calls, loop_thread

    results, calls, loop_thread = run(loop, main())
    assert results == (42, 50)
    assert calls == [("async", loop_thread), ("sync", loop_thread)]


def test_blocking_portal_runs_coroutines_from_a_foreign_thread(loop):
    async def main():
        async with anyio.from_thread.BlockingPortal() as portal:

            async def add(a: int, b: int) -> int:
                await anyio.sleep(0.001)
                return a + b

            def foreign() -> list[int]:
                return [portal.call(add, i, i) for i in range(50)]

            thread_results = []
            thread = threading.Thread(target=lambda: thread_results.append(foreign()))
            thread.start()
            async with asyncio.timeout(10):
                while thread.is_alive():
                    await anyio.sleep(0.01)
            thread.join()
        return thread_results

    assert run(loop, main()) == [[i * 2 for i in range(50)]]


def test_blocking_portal_thread_runs_its_own_loop_from_the_loop_factory(loop_factory):
    # start_blocking_portal runs anyio.run in a new thread: a second loop, on that thread.
    made = []

    def factory():
        made.append(loop_factory())
        return made[-1]

    async def where(x: int):
        await anyio.sleep(0.001)
        return asyncio.get_running_loop(), threading.get_ident(), x * 3

    with anyio.from_thread.start_blocking_portal(
        "asyncio", backend_options={"loop_factory": factory}
    ) as portal:
        results = [portal.call(where, i) for i in range(20)]
        future = portal.start_task_soon(where, 100)
        assert future.result(timeout=10)[2] == 300
    assert len(made) == 1
    assert {id(running) for running, _, _ in results} == {id(made[0])}
    assert {ident for _, ident, _ in results} != {threading.get_ident()}
    assert [x for _, _, x in results] == [i * 3 for i in range(20)]
    assert made[0].is_closed()


def test_to_thread_abandon_on_cancel_returns_at_once(loop):
    release = threading.Event()
    finished = []

    def blocking():
        release.wait(10)
        finished.append(True)

    async def main():
        started = time.monotonic()
        with anyio.move_on_after(0.05) as scope:
            await anyio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        return scope.cancelled_caught, time.monotonic() - started

    try:
        caught, elapsed = run(loop, main())
    finally:
        release.set()
    assert caught
    assert elapsed < 2
    # The abandoned thread still runs to its end (the loop fixture's executor shutdown
    # does not wait for AnyIO's own worker threads).
    deadline = time.monotonic() + 5
    while not finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert finished == [True]


# --------------------------------------------------------------------------- signals


def test_open_signal_receiver_yields_delivered_signals(loop):
    async def main():
        got = []
        with anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
            with anyio.fail_after(5):
                async for signum in signals:
                    got.append(signum)
                    if len(got) == 2:
                        break
        return got

    assert sorted(run(loop, main())) == sorted([signal.SIGUSR1, signal.SIGUSR2])


# --------------------------------------------------------------------------- timing


def test_sleep_and_sleep_until_wait_as_long_as_asked(loop):
    async def main():
        measured = []
        for delay in (0.05, 0.1, 0.2):
            started = time.monotonic()
            await anyio.sleep(delay)
            measured.append((delay, time.monotonic() - started))
        target = anyio.current_time() + 0.1
        await anyio.sleep_until(target)
        late = anyio.current_time() - target
        return measured, late, anyio.current_time(), asyncio.get_running_loop().time()

    measured, late, anyio_now, loop_now = run(loop, main())
    for delay, elapsed in measured:
        assert delay - 0.005 <= elapsed < delay + 0.5, (delay, elapsed)
    assert 0 <= late < 0.5
    assert abs(anyio_now - loop_now) < 0.1  # AnyIO's clock is the loop's


def test_many_concurrent_sleeps_wake_in_deadline_order(loop):
    async def main():
        woke = []
        go = anyio.Event()
        base = 0.0

        async def sleeper(i: int):
            await go.wait()
            await anyio.sleep_until(base + (i % 10) * 0.01)
            woke.append(i % 10)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(sleeper, i, name=f"sleeper-{i}")
            await anyio.wait_all_tasks_blocked()
            # Deadlines fixed once every task is ready, so that start-up time (which is
            # long in debug mode) cannot reorder them.
            base = anyio.current_time() + 0.2
            go.set()
        return woke

    woke = run(loop, main())
    assert len(woke) == 200
    assert woke == sorted(woke)


# --------------------------------------------------------------------------- synchronisation


def test_event_wakes_every_waiter(loop):
    async def main():
        event = anyio.Event()
        woken = []

        async def waiter(i: int):
            await event.wait()
            woken.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            assert event.statistics().tasks_waiting == 10
            event.set()
        assert event.is_set()
        await event.wait()  # already set: returns at once
        return sorted(woken)

    assert run(loop, main()) == list(range(10))


def test_lock_gives_mutual_exclusion_in_fifo_order(loop):
    async def main():
        lock = anyio.Lock()
        inside = 0
        peak = 0
        order = []

        async def critical(i: int):
            nonlocal inside, peak
            async with lock:
                inside += 1
                peak = max(peak, inside)
                order.append(i)
                await anyio.sleep(0.001)
                inside -= 1

        async with anyio.create_task_group() as tg:
            async with lock:
                for i in range(20):
                    tg.start_soon(critical, i)
                    await anyio.wait_all_tasks_blocked()  # queue them in order
                assert lock.statistics().tasks_waiting == 20
        return peak, order

    peak, order = run(loop, main())
    assert peak == 1
    assert order == list(range(20))


def test_semaphore_bounds_concurrency(loop):
    async def main():
        semaphore = anyio.Semaphore(3)
        inside = 0
        peak = 0
        done = 0

        async def worker():
            nonlocal inside, peak, done
            async with semaphore:
                inside += 1
                peak = max(peak, inside)
                await anyio.sleep(0.01)
                inside -= 1
                done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(worker)
        return peak, done, semaphore.value

    assert run(loop, main()) == (3, 30, 3)


def test_capacity_limiter_tokens_and_total_tokens_change(loop):
    async def main():
        limiter = anyio.CapacityLimiter(2)
        inside = 0
        peak = []
        # Holders wait on the gate, not on a timer: wait_all_tasks_blocked() sleeps
        # 0.1 s whenever a task is runnable, and a timed hold could end in that sleep.
        gate = anyio.Event()

        async def worker(i: int):
            nonlocal inside
            async with limiter:
                inside += 1
                peak.append(inside)
                await gate.wait()
                inside -= 1

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(worker, i)
            await anyio.wait_all_tasks_blocked()
            assert limiter.borrowed_tokens == 2
            assert limiter.available_tokens == 0
            limiter.total_tokens = 4  # raising the limit admits more waiters at once
            await anyio.wait_all_tasks_blocked()
            assert limiter.borrowed_tokens == 4
            gate.set()
        return max(peak), limiter.borrowed_tokens

    assert run(loop, main()) == (4, 0)


def test_condition_notifies_waiters(loop):
    async def main():
        condition = anyio.Condition()
        items = []
        consumed = []

        async def consumer():
            async with condition:
                while not items:
                    await condition.wait()
                consumed.append(items.pop(0))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(consumer)
            await anyio.wait_all_tasks_blocked()
            for i in range(5):
                async with condition:
                    items.append(i)
                    condition.notify()
                await anyio.wait_all_tasks_blocked()
        return consumed

    assert run(loop, main()) == [0, 1, 2, 3, 4]
