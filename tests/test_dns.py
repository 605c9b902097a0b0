"""``loop.getaddrinfo`` / ``loop.getnameinfo``: results identical to the ``socket`` module's.

Lookups that must block go to ferroloop's native resolver pool; these tests pin that the
answers, errors, cancellation and shutdown behave as with the stdlib's executor.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest

AI_CASES = [
    pytest.param(("127.0.0.1", 80), {}, id="ipv4-literal"),
    pytest.param(("::1", 443), {"family": socket.AF_INET6}, id="ipv6-literal"),
    pytest.param((None, 0), {"flags": socket.AI_PASSIVE}, id="passive-none"),
    pytest.param(("localhost", "http"), {}, id="name-and-service"),
    pytest.param(("127.0.0.1", 53), {"type": socket.SOCK_DGRAM}, id="type-filter"),
    pytest.param(("localhost", 80), {"proto": socket.IPPROTO_TCP}, id="proto-filter"),
    pytest.param((b"127.0.0.1", "80"), {"type": socket.SOCK_STREAM}, id="bytes-host"),
    pytest.param(("::1", 80), {"family": socket.AF_INET}, id="literal-wrong-family"),
]


def _outcome(func, *args, **kwargs):
    """The result of ``func``, or the type and args of what it raised."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        return type(exc), exc.args


async def _aoutcome(coro):
    try:
        return await coro
    except Exception as exc:
        return type(exc), exc.args


@pytest.mark.parametrize(("args", "kwargs"), AI_CASES)
def test_getaddrinfo_matches_socket(loop, args, kwargs):
    expected = _outcome(socket.getaddrinfo, *args, **kwargs)
    got = loop.run_until_complete(_aoutcome(loop.getaddrinfo(*args, **kwargs)))
    assert got == expected


def test_getaddrinfo_keeps_ipv6_zone_id(loop):
    try:
        socket.if_nametoindex("lo")
        expected = socket.getaddrinfo("fe80::1%lo", 80)
    except OSError as exc:
        pytest.skip(f"no IPv6 on 'lo': {exc}")
    got = loop.run_until_complete(loop.getaddrinfo("fe80::1%lo", 80))
    assert got == expected
    assert all(info[4][3] == socket.if_nametoindex("lo") for info in got)


def test_getaddrinfo_unknown_zone_id_matches_socket(loop):
    expected = _outcome(socket.getaddrinfo, "fe80::1%nosuchif0", 80)
    got = loop.run_until_complete(_aoutcome(loop.getaddrinfo("fe80::1%nosuchif0", 80)))
    assert got == expected


def test_getaddrinfo_unresolvable_name_raises_gaierror(loop):
    with pytest.raises(socket.gaierror):
        loop.run_until_complete(loop.getaddrinfo("no-such-host.invalid", 80))


def test_getaddrinfo_bad_argument_raises_like_socket(loop):
    expected = _outcome(socket.getaddrinfo, 12345, 80)
    got = loop.run_until_complete(_aoutcome(loop.getaddrinfo(12345, 80)))
    assert got == expected


@pytest.mark.parametrize(
    ("sockaddr", "flags"),
    [
        (("127.0.0.1", 80), 0),
        (("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
        (("::1", 443, 0, 0), socket.NI_NUMERICHOST),
        (("127.0.0.1",), 0),  # malformed: the same error as socket's
    ],
)
def test_getnameinfo_matches_socket(loop, sockaddr, flags):
    expected = _outcome(socket.getnameinfo, sockaddr, flags)
    got = loop.run_until_complete(_aoutcome(loop.getnameinfo(sockaddr, flags)))
    assert got == expected


def test_many_concurrent_lookups_complete(loop):
    expected_name = socket.getaddrinfo("localhost", 80)
    expected_literal = socket.getaddrinfo("127.0.0.1", 80)

    async def main():
        coros = [loop.getaddrinfo("localhost" if i % 2 else "127.0.0.1", 80) for i in range(200)]
        return await asyncio.wait_for(asyncio.gather(*coros), 30)

    results = loop.run_until_complete(main())
    assert len(results) == 200
    for i, res in enumerate(results):
        assert res == (expected_name if i % 2 else expected_literal)


class _Gate:
    """Replaces ``socket.getaddrinfo`` with one that waits to be released."""

    def __init__(self, monkeypatch):
        self.real = socket.getaddrinfo
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, *args, **kwargs):
        self.entered.set()
        try:
            self.release.wait(10)
            return self.real(*args, **kwargs)
        finally:
            self.returned.set()


@pytest.fixture
def gate(monkeypatch):
    g = _Gate(monkeypatch)
    try:
        yield g
    finally:
        g.release.set()  # never leave a resolver thread stuck


async def _wait_thread_event(event, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not event.is_set():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_cancelled_lookup_drops_late_result(loop, gate):
    async def main():
        task = asyncio.ensure_future(loop.getaddrinfo("localhost", 80))
        await _wait_thread_event(gate.entered)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release.set()
        await _wait_thread_event(gate.returned)
        await asyncio.sleep(0.05)  # let the late result reach the loop (and be dropped)
        return await loop.getaddrinfo("localhost", 80)

    assert loop.run_until_complete(main()) == gate.real("localhost", 80)


def test_closing_loop_with_lookup_in_flight(loop, loop_factory, gate):
    async def start():
        task = asyncio.ensure_future(loop.getaddrinfo("localhost", 80))
        await _wait_thread_event(gate.entered)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(start())
    loop.close()  # the stdlib's executor is shut down without waiting
    gate.release.set()
    assert gate.returned.wait(10)
    time.sleep(0.05)  # the result reaches the closed loop, which drops it
    # Other loops (and the resolver threads) are unaffected.
    new = loop_factory()
    expected = gate.real("localhost", 80)
    assert new.run_until_complete(new.getaddrinfo("localhost", 80)) == expected


def test_debug_mode_logs_lookups(loop, caplog):
    loop.set_debug(True)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        loop.run_until_complete(loop.getaddrinfo("localhost", 80))
        loop.run_until_complete(loop.getaddrinfo("127.0.0.1", 80))
    messages = [r.getMessage() for r in caplog.records]
    assert "Get address info localhost:80" in messages
    assert "Get address info 127.0.0.1:80" in messages
    assert any(m.startswith("Getting address info localhost:80 took ") for m in messages)


@pytest.mark.ferroloop_only("the stdlib resolves in its default executor")
def test_lookups_do_not_use_default_executor(loop):
    loop.run_until_complete(loop.getaddrinfo("localhost", "http"))
    loop.run_until_complete(loop.getnameinfo(("127.0.0.1", 80)))
    with pytest.raises(socket.gaierror):
        loop.run_until_complete(loop.getaddrinfo("no-such-host.invalid", 80))
    assert loop._default_executor is None


@pytest.mark.ferroloop_only("the stdlib resolves literals in its default executor too")
def test_literals_resolve_on_the_loop_thread(loop, monkeypatch):
    real = socket.getaddrinfo
    calls = []

    def spy(host, port, family=0, type=0, proto=0, flags=0):
        calls.append((host, flags, threading.get_ident()))
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    assert loop.run_until_complete(loop.getaddrinfo("::1", 80)) == real("::1", 80)
    assert loop.run_until_complete(loop.getaddrinfo("localhost", 80)) == real("localhost", 80)
    me = threading.get_ident()
    assert calls[0] == ("::1", socket.AI_NUMERICHOST, me)
    assert calls[1][:2] == ("localhost", 0)
    assert calls[1][2] != me
