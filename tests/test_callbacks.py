"""call_soon / call_soon_threadsafe / Handle behaviour."""

import asyncio
import contextvars
import gc
import sys
import threading
import time

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)

var = contextvars.ContextVar("var", default="default")


def run_once(loop):
    """Run exactly one loop iteration (stop() before run_forever())."""
    loop.stop()
    loop.run_forever()


def test_call_soon_runs_callbacks_in_fifo_order(loop):
    out = []
    for i in range(100):
        loop.call_soon(out.append, i)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert out == list(range(100))


def test_call_soon_passes_positional_args(loop):
    got = []

    def callback(*args):
        got.append(args)

    loop.call_soon(callback)
    loop.call_soon(callback, 1)
    loop.call_soon(callback, "a", None, 3.5)
    run_once(loop)
    assert got == [(), (1,), ("a", None, 3.5)]


def test_call_soon_returns_handle_with_cancel_and_cancelled(loop):
    out = []
    handle = loop.call_soon(out.append, 1)
    assert handle.cancelled() is False
    assert handle.cancel() is None
    assert handle.cancelled() is True
    handle.cancel()  # idempotent
    assert handle.cancelled() is True
    run_once(loop)
    assert out == []


def test_cancelled_handle_is_skipped_but_others_in_same_batch_run(loop):
    out = []
    loop.call_soon(out.append, "a")
    handle_b = loop.call_soon(out.append, "b")
    loop.call_soon(out.append, "c")
    handle_b.cancel()
    run_once(loop)
    assert out == ["a", "c"]


def test_callback_can_cancel_a_later_callback_of_the_same_iteration(loop):
    out = []
    later = None

    def first():
        out.append("first")
        later.cancel()

    loop.call_soon(first)
    later = loop.call_soon(out.append, "later")
    run_once(loop)
    assert out == ["first"]
    assert later.cancelled()


def test_context_kwarg_runs_callback_inside_that_context(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in-ctx")
    seen = []

    def callback():
        seen.append(var.get())
        var.set("changed-by-callback")

    token = var.set("caller")
    try:
        loop.call_soon(callback, context=ctx)
        run_once(loop)
        assert seen == ["in-ctx"]
        # The callback ran in *that* Context object, not in a copy of it.
        assert ctx[var] == "changed-by-callback"
        assert var.get() == "caller"
    finally:
        var.reset(token)


def test_without_context_kwarg_callback_sees_copy_of_context_at_scheduling_time(loop):
    seen = []

    def callback():
        seen.append(var.get())
        var.set("changed-by-callback")

    token = var.set("at-schedule-time")
    try:
        loop.call_soon(callback)
        var.set("after-scheduling")
        run_once(loop)
        assert seen == ["at-schedule-time"]
        # The callback's var.set() went into a copy, not the caller's context.
        assert var.get() == "after-scheduling"
    finally:
        var.reset(token)


def test_each_callback_without_context_gets_its_own_copy(loop):
    seen = []

    def setter():
        var.set("set-by-setter")

    def reader():
        seen.append(var.get())

    before = var.get()
    loop.call_soon(setter)
    loop.call_soon(reader)
    run_once(loop)
    assert seen == [before]
    assert var.get() == before


def test_call_later_and_call_at_accept_context_kwarg(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "timer-ctx")
    seen = []
    loop.call_later(0.001, lambda: seen.append(("later", var.get())), context=ctx)
    loop.call_at(loop.time() + 0.002, lambda: seen.append(("at", var.get())), context=ctx)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert seen == [("later", "timer-ctx"), ("at", "timer-ctx")]


def test_handle_get_context_returns_the_context_passed(impl, loop):
    handle = loop.call_soon(print)
    if not hasattr(handle, "get_context") and impl == "asyncio" and sys.version_info < (3, 12):
        handle.cancel()
        pytest.skip("Handle.get_context() was added to the stdlib in Python 3.12")
    ctx = contextvars.copy_context()
    handle2 = loop.call_soon(print, context=ctx)
    timer = loop.call_later(10, print, context=ctx)
    assert handle2.get_context() is ctx
    assert timer.get_context() is ctx
    assert isinstance(handle.get_context(), contextvars.Context)
    for h in (handle, handle2, timer):
        h.cancel()


def my_distinctive_callback():
    pass


def test_handle_repr_contains_callback_name(loop):
    handle = loop.call_soon(my_distinctive_callback)
    timer = loop.call_later(10, my_distinctive_callback)
    assert "my_distinctive_callback" in repr(handle)
    assert "my_distinctive_callback" in repr(timer)
    handle.cancel()
    timer.cancel()
    assert "cancelled" in repr(handle)
    assert "cancelled" in repr(timer)


def test_callbacks_scheduled_during_an_iteration_wait_for_the_next_one(loop):
    """loop.call_soon(a); a stops the loop and schedules b: b does not run before return.

    The stdlib runs every callback that was ready when the iteration began (so c,
    queued before the iteration, still runs after a called stop()), but nothing that
    was scheduled during it; b runs on the next run.
    """
    out = []

    def a():
        out.append("a")
        loop.stop()
        loop.call_soon(b)

    def b():
        out.append("b")

    loop.call_soon(a)
    loop.call_soon(out.append, "c")
    loop.run_forever()
    assert out == ["a", "c"]
    assert not loop.is_running()
    run_once(loop)
    assert out == ["a", "c", "b"]


def test_self_rescheduling_callback_does_not_starve_timers(loop):
    spins = 0

    def spin():
        nonlocal spins
        spins += 1
        loop.call_soon(spin)

    loop.call_soon(spin)
    loop.call_later(0.01, loop.stop)
    watchdog = loop.call_later(2, loop.stop)
    t0 = time.monotonic()
    loop.run_forever()
    elapsed = time.monotonic() - t0
    watchdog.cancel()
    assert elapsed < 1.0
    assert spins > 1


def test_non_callable_raises_type_error_in_debug_mode(loop):
    loop.set_debug(True)
    with pytest.raises(TypeError):
        loop.call_soon(1)
    with pytest.raises(TypeError):
        loop.call_later(0, "not callable")
    with pytest.raises(TypeError):
        loop.call_at(loop.time(), None)
    with pytest.raises(TypeError):
        loop.call_soon_threadsafe(42)


@pytest.mark.ferroloop_only(
    "the stdlib checks callability only in debug mode; ferroloop raises TypeError always"
)
def test_non_callable_raises_type_error_without_debug_mode(loop):
    assert not loop.get_debug()
    with pytest.raises(TypeError):
        loop.call_soon(1)
    with pytest.raises(TypeError):
        loop.call_later(0, "not callable")
    with pytest.raises(TypeError):
        loop.call_at(loop.time(), None)
    with pytest.raises(TypeError):
        loop.call_soon_threadsafe(42)


def test_coroutine_function_as_callback_raises_type_error_in_debug_mode(loop):
    async def coro_fn():
        pass

    loop.set_debug(True)
    with pytest.raises(TypeError):
        loop.call_soon(coro_fn)


def test_raising_callback_goes_to_exception_handler_and_loop_continues(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append((lp, ctx)))
    error = ZeroDivisionError("boom")
    out = []

    def bad():
        raise error

    handle = loop.call_soon(bad)
    loop.call_soon(out.append, "after")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert out == ["after"]
    assert len(contexts) == 1
    called_loop, ctx = contexts[0]
    assert called_loop is loop
    assert isinstance(ctx["message"], str) and ctx["message"]
    assert ctx["exception"] is error
    assert ctx["handle"] is handle


def test_raising_callback_with_default_handler_logs_and_loop_continues(loop, caplog):
    loop.set_exception_handler(None)
    out = []

    def bad():
        raise ValueError("callback failure 1234")

    loop.call_soon(bad)
    loop.call_soon(out.append, "after")
    with caplog.at_level("ERROR", logger="asyncio"):
        run_once(loop)
    assert out == ["after"]
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert str(records[0].exc_info[1]) == "callback failure 1234"


def test_call_soon_threadsafe_wakes_loop_sleeping_in_long_timer(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "threadsafe-ctx")
    got = {}
    sent_at = []

    def callback(*args):
        got["args"] = args
        got["var"] = var.get()
        got["at"] = time.monotonic()
        loop.stop()

    def worker():
        time.sleep(0.1)  # let the loop block in its poll
        sent_at.append(time.monotonic())
        loop.call_soon_threadsafe(callback, 1, "two", context=ctx)

    thread = threading.Thread(target=worker)
    loop.call_soon(thread.start)
    watchdog = loop.call_later(5, loop.stop)  # the long timer the loop sleeps in
    try:
        loop.run_forever()
    finally:
        thread.join()
        watchdog.cancel()
    assert got, "callback did not run before the 5 s timer"
    assert got["args"] == (1, "two")
    assert got["var"] == "threadsafe-ctx"
    assert got["at"] - sent_at[0] < 0.5


def test_call_soon_threadsafe_from_many_threads_runs_every_callback(loop):
    n_threads, per_thread = 4, 500
    seen = []
    total = n_threads * per_thread

    def callback(tag):
        seen.append(tag)
        if len(seen) == total:
            loop.stop()

    def worker(t):
        for i in range(per_thread):
            loop.call_soon_threadsafe(callback, (t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    watchdog = loop.call_later(5, loop.stop)
    try:
        loop.run_forever()
    finally:
        for th in threads:
            th.join()
        watchdog.cancel()
    assert len(seen) == total
    # Per-thread FIFO order is kept.
    for t in range(n_threads):
        assert [i for (tt, i) in seen if tt == t] == list(range(per_thread))


def test_call_soon_on_closed_loop_raises_runtime_error(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_soon(print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_soon_threadsafe(print)


def test_timer_callback_exception_reports_the_timer_handle(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    error = LookupError("from timer")

    def bad():
        raise error

    timer = loop.call_later(0.001, bad)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert len(contexts) == 1
    assert contexts[0]["exception"] is error
    assert contexts[0]["handle"] is timer


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_system_exit_and_keyboard_interrupt_from_callback_propagate(loop, exc_type):
    out = []

    def bad():
        raise exc_type()

    loop.call_soon(bad)
    loop.call_soon(out.append, "queued after")
    with pytest.raises(exc_type):
        loop.run_forever()
    assert not loop.is_running()
    assert out == []
    # The loop is usable again and the queued callback was kept.
    run_once(loop)
    assert out == ["queued after"]


class CustomBaseException(BaseException):
    pass


def test_other_base_exceptions_from_callback_go_to_exception_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    out = []

    def bad():
        raise CustomBaseException("not Exception")

    loop.call_soon(bad)
    loop.call_soon(out.append, "after")
    run_once(loop)
    assert out == ["after"]
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], CustomBaseException)


def test_debug_mode_rejects_call_soon_from_another_thread(loop):
    loop.set_debug(True)
    errors = []

    def worker():
        for method in (loop.call_soon, lambda cb: loop.call_later(0, cb)):
            try:
                method(print)
            except RuntimeError as exc:
                errors.append(str(exc))
        loop.call_soon_threadsafe(loop.stop)

    thread = threading.Thread(target=worker)
    loop.call_soon(thread.start)
    watchdog = loop.call_later(5, loop.stop)
    try:
        loop.run_forever()
    finally:
        thread.join()
        watchdog.cancel()
    assert len(errors) == 2
    assert all("Non-thread-safe operation" in e for e in errors)


@pytest.mark.parametrize("failing", ["callback", "task"])
def test_exception_handler_sees_the_failing_code_s_context_variables_from_3_12(
    loop, failing, expect_loop_errors
):
    name = contextvars.ContextVar("name", default="unset")
    seen = []
    loop.set_exception_handler(lambda lp, ctx: seen.append(name.get()))

    def callback():
        name.set("set by the callback")
        raise ZeroDivisionError

    async def task():
        name.set("set by the task")
        raise ZeroDivisionError

    async def main():
        if failing == "callback":
            loop.call_soon(callback)
        else:
            loop.create_task(task())  # never awaited: reported when collected
        for _ in range(3):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    gc.collect()
    # 3.12 runs a custom handler in the context of the task or handle (gh-96704).
    expected = f"set by the {failing}" if sys.version_info >= (3, 12) else "unset"
    assert seen == [expected]
