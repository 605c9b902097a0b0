"""add_signal_handler / remove_signal_handler and Ctrl-C (SIGINT) handling."""

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)

# --------------------------------------------------------------------------- in-process


def test_signal_handler_runs_via_the_loop_with_args(loop):
    got = []

    def handler(*args):
        got.append((args, loop.is_running()))
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, handler, "a", 1)
    try:
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        watchdog = loop.call_later(5, loop.stop)
        loop.run_forever()
        watchdog.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert got == [(("a", 1), True)]


def test_signal_handler_wakes_a_loop_blocked_in_a_long_timer(loop):
    got = []

    def handler():
        got.append(time.monotonic())
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, handler)
    sent = []

    def send_later():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGUSR1)

    try:
        # The kill happens inside a timer callback; the loop then sleeps in a 5 s timer.
        loop.call_later(0.05, send_later)
        watchdog = loop.call_later(5, loop.stop)
        loop.run_forever()
        watchdog.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert got, "signal handler did not run"
    assert got[0] - sent[0] < 0.5


def test_add_signal_handler_replaces_previous_handler(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "first")
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "second")
    try:
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(0.05, loop.stop)
        loop.run_forever()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert calls == ["second"]


def test_remove_signal_handler_returns_true_then_false_and_restores_default(loop):
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    loop.add_signal_handler(signal.SIGUSR1, print)
    assert signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_remove_signal_handler_never_added_returns_false(loop):
    assert loop.remove_signal_handler(signal.SIGUSR2) is False


def test_close_removes_signal_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR2, print)
    loop.close()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


@pytest.mark.parametrize("sig", [0, -1, 1000], ids=["zero", "negative", "too-large"])
def test_invalid_signal_number_raises_value_error(loop, sig):
    with pytest.raises(ValueError):
        loop.add_signal_handler(sig, print)
    with pytest.raises(ValueError):
        loop.remove_signal_handler(sig)


def test_uncatchable_signal_raises_runtime_error(loop):
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGKILL, print)
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGSTOP, print)


def test_non_int_signal_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.add_signal_handler("SIGUSR1", print)


def test_coroutine_function_as_signal_handler_raises_type_error(loop):
    async def handler():
        pass

    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR1, handler)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_add_signal_handler_on_closed_loop_raises_runtime_error(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_signal_handler(signal.SIGUSR1, print)


# --------------------------------------------------------------------------- Ctrl-C in a child


@pytest.fixture
def spawn(loop_factory_code):
    """spawn(body): run *body* in a child python after the loop factory code."""
    procs = []

    def start(body):
        code = loop_factory_code + textwrap.dedent(body)
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # A shell's background job inherits SIGINT ignored, and Python then installs
            # no KeyboardInterrupt handler: give the child Ctrl-C's usual disposition.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def read_line(proc, timeout=10.0):
    """Read one stdout line from *proc*, failing (not hanging) after *timeout*."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"child printed nothing within {timeout} s; stderr:\n{err.decode()}")
    return proc.stdout.readline().decode().strip()


def interrupt_and_wait(proc, settle=0.2, limit=2.0):
    """Send SIGINT; return (seconds until exit, stdout rest, stderr)."""
    time.sleep(settle)  # let the child block in its poll
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=limit + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child did not exit within {limit + 5} s of SIGINT; stderr:\n{err.decode()}")
    return time.monotonic() - t0, out.decode(), err.decode()


def test_ctrl_c_interrupts_runner_sleeping_in_long_sleep(spawn):
    proc = spawn(
        """
        import asyncio

        async def main():
            print("ready", flush=True)
            await asyncio.sleep(60)

        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(main())
        """,
    )
    assert read_line(proc) == "ready"
    elapsed, _, err = interrupt_and_wait(proc)
    assert elapsed < 2.0
    assert "KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT, err


def test_ctrl_c_interrupts_run_forever_with_nothing_scheduled(spawn):
    proc = spawn(
        """
        loop = new_loop()
        loop.call_soon(lambda: print("ready", flush=True))
        try:
            loop.run_forever()
        finally:
            print("running after interrupt:", loop.is_running(), flush=True)
            loop.close()
        """,
    )
    assert read_line(proc) == "ready"
    elapsed, out, err = interrupt_and_wait(proc)
    assert elapsed < 2.0
    assert "KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT, err
    assert out.strip() == "running after interrupt: False"


def test_callback_queued_before_ctrl_c_runs_when_loop_is_resumed(spawn):
    """KeyboardInterrupt escapes run_forever() from the callback it hit; callbacks already
    queued are kept, and run when the loop is resumed (the stdlib behaviour)."""
    proc = spawn(
        """
        import time

        loop = new_loop()

        def queued():
            print("queued callback ran", flush=True)

        def long_callback():
            loop.call_soon(queued)
            print("ready", flush=True)
            time.sleep(30)
            print("sleep was not interrupted", flush=True)

        loop.call_soon(long_callback)
        try:
            loop.run_forever()
        except KeyboardInterrupt:
            print("interrupted; running:", loop.is_running(), flush=True)
        loop.call_soon(loop.stop)
        loop.run_forever()
        loop.close()
        print("done", flush=True)
        """,
    )
    assert read_line(proc) == "ready"
    elapsed, out, err = interrupt_and_wait(proc)
    assert elapsed < 2.0
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "interrupted; running: False",
        "queued callback ran",
        "done",
    ]
