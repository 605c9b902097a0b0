"""run_forever / run_until_complete / stop / close, tasks, exception handling, debug mode,
async generators, executors, asyncio.run and asyncio.Runner."""

import asyncio
import concurrent.futures
import contextvars
import gc
import logging
import os
import re
import sys
import threading
import time

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)

var = contextvars.ContextVar("run_var", default="default")


async def noop():
    return None


# --------------------------------------------------------------------------- run / stop


def test_loop_fixture_provides_the_implementation_under_test(impl, loop):
    if impl == "ferroloop":
        import ferroloop

        assert isinstance(loop, ferroloop.Loop)
    else:
        assert isinstance(loop, asyncio.BaseEventLoop)
        assert type(loop).__module__.startswith("asyncio.")
    assert isinstance(loop, asyncio.AbstractEventLoop)


def test_run_until_complete_returns_coroutine_result(loop):
    async def main():
        await asyncio.sleep(0)
        return 42

    assert loop.run_until_complete(main()) == 42


def test_run_until_complete_raises_coroutine_exception(loop):
    async def main():
        await asyncio.sleep(0)
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        loop.run_until_complete(main())


def test_run_until_complete_accepts_a_future(loop):
    fut = loop.create_future()
    loop.call_later(0.001, fut.set_result, "value")
    assert loop.run_until_complete(fut) == "value"


def test_run_until_complete_on_future_of_another_loop_raises_value_error(loop, loop_factory):
    other = loop_factory()
    fut = other.create_future()
    with pytest.raises(ValueError):
        loop.run_until_complete(fut)
    assert not loop.is_running()


def test_run_until_complete_raises_if_loop_stopped_before_future_done(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed."):
        loop.run_until_complete(fut)
    fut.cancel()


def test_run_forever_runs_until_stop(loop):
    out = []
    loop.call_later(0.01, loop.stop)
    loop.call_later(0.005, out.append, "timer")
    t0 = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - t0 >= 0.01
    assert out == ["timer"]
    assert not loop.is_running()


def test_stop_before_run_forever_runs_one_iteration_and_returns(loop):
    out = []

    def first():
        out.append("first")
        loop.call_soon(out.append, "second")

    loop.call_soon(first)
    loop.call_later(10, out.append, "far timer")
    loop.stop()
    t0 = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - t0 < 1.0
    assert out == ["first"]
    # The stop request was consumed: the next stop()+run_forever() runs one more iteration.
    loop.stop()
    loop.run_forever()
    assert out == ["first", "second"]


def test_loop_can_be_run_again_after_stop(loop):
    for i in range(3):
        assert loop.run_until_complete(asyncio.sleep(0, result=i)) == i
        loop.call_soon(loop.stop)
        loop.run_forever()


def test_is_running_is_true_only_while_running(loop):
    seen = []
    assert loop.is_running() is False
    loop.call_soon(lambda: seen.append(loop.is_running()))
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [True]
    assert loop.is_running() is False


def test_get_running_loop_inside_returns_the_loop(loop):
    async def main():
        return asyncio.get_running_loop(), asyncio.get_event_loop()

    running, current = loop.run_until_complete(main())
    assert running is loop
    assert current is loop
    seen = []
    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    loop.stop()
    loop.run_forever()
    assert seen == [loop]
    with pytest.raises(RuntimeError, match="no running event loop"):
        asyncio.get_running_loop()


def test_run_forever_while_running_raises(loop, impl):
    if impl == "asyncio" and sys.version_info[:3] == (3, 13, 0):
        # 3.13.0's run_forever() cleans up after a setup that raised, marking the outer
        # loop as not running: the nested run_until_complete() then runs it (3.13.1 fix).
        pytest.skip("3.13.0's stdlib loop runs re-entrantly after this error")
    errors = []

    def nested():
        for method in (loop.run_forever, lambda: loop.run_until_complete(fut)):
            try:
                method()
            except RuntimeError as exc:
                errors.append(str(exc))
        loop.stop()

    fut = loop.create_future()
    loop.call_soon(nested)
    loop.run_forever()
    fut.cancel()
    assert errors == ["This event loop is already running"] * 2
    assert not loop.is_running()


def test_cannot_run_a_loop_while_another_loop_is_running(loop, loop_factory):
    other = loop_factory()
    errors = []

    def nested():
        coro = noop()
        try:
            other.run_until_complete(coro)
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            coro.close()
        try:
            other.run_forever()
        except RuntimeError as exc:
            errors.append(str(exc))
        loop.stop()

    loop.call_soon(nested)
    loop.run_forever()
    assert errors == ["Cannot run the event loop while another loop is running"] * 2
    assert not other.is_running()


@pytest.mark.parametrize("direction", ["stdlib-outer", "ferroloop-outer"])
def test_cannot_run_loops_of_both_implementations_nested(direction, ferroloop_module):
    """The running-loop check is shared with asyncio, whichever implementation is outer."""
    if direction == "stdlib-outer":
        outer, inner = asyncio.new_event_loop(), ferroloop_module.new_event_loop()
    else:
        outer, inner = ferroloop_module.new_event_loop(), asyncio.new_event_loop()
    errors = []

    def nested():
        coro = noop()
        try:
            inner.run_until_complete(coro)
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            coro.close()
        outer.stop()

    try:
        outer.call_soon(nested)
        outer.run_forever()
    finally:
        outer.close()
        inner.close()
    assert errors == ["Cannot run the event loop while another loop is running"]


def test_close_marks_loop_closed_and_is_idempotent(loop):
    assert loop.is_closed() is False
    loop.close()
    assert loop.is_closed() is True
    loop.close()
    assert loop.is_closed() is True


def test_closed_loop_refuses_to_run_or_schedule(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_forever()
    coro = noop()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_until_complete(coro)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.create_task(coro)
    coro.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_soon(print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_in_executor(None, print)


def test_close_while_running_raises(loop):
    errors = []

    def try_close():
        try:
            loop.close()
        except RuntimeError as exc:
            errors.append(str(exc))
        loop.stop()

    loop.call_soon(try_close)
    loop.run_forever()
    assert errors == ["Cannot close a running event loop"]
    assert not loop.is_closed()


def test_close_discards_pending_callbacks(loop):
    out = []
    loop.call_soon(out.append, "soon")
    loop.call_later(0, out.append, "later")
    loop.close()
    assert out == []


# --------------------------------------------------------------------------- futures / tasks


def test_create_future_is_bound_to_the_loop_and_pending(loop):
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    assert not fut.done()
    loop.call_soon(fut.set_result, 7)
    assert loop.run_until_complete(fut) == 7


def test_create_task_runs_coroutine_and_sets_name(loop):
    async def work():
        return asyncio.current_task()

    task = loop.create_task(work(), name="my-task")
    assert isinstance(task, asyncio.Task)
    assert task.get_name() == "my-task"
    assert task.get_loop() is loop
    assert task in asyncio.all_tasks(loop)
    assert loop.run_until_complete(task) is task


def test_create_task_default_name_is_task_n(loop):
    task = loop.create_task(noop())
    assert re.fullmatch(r"Task-\d+", task.get_name())
    loop.run_until_complete(task)


def test_create_task_context_runs_coroutine_in_that_context(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "task-ctx")

    async def work():
        seen = var.get()
        var.set("changed-in-task")
        return seen

    task = loop.create_task(work(), context=ctx)
    assert loop.run_until_complete(task) == "task-ctx"
    assert ctx[var] == "changed-in-task"
    assert var.get() == "default"


def test_task_factory_get_set_and_receives_loop_and_coro(loop):
    calls = []

    def factory(the_loop, coro, **kwargs):
        calls.append((the_loop, kwargs))
        return asyncio.Task(coro, loop=the_loop, **kwargs)

    assert loop.get_task_factory() is None
    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory

    task = loop.create_task(noop(), name="named")
    # factory(loop, coro) when no context is given, and the name set afterwards -- except
    # on 3.13.3 and from 3.14 on, which hand the factory the name (gh-128307).
    gets_name = sys.version_info >= (3, 14) or sys.version_info[:3] == (3, 13, 3)
    assert calls == [(loop, {"name": "named"} if gets_name else {})]
    assert task.get_name() == "named"
    loop.run_until_complete(task)

    ctx = contextvars.copy_context()
    ctx.run(var.set, "factory-ctx")

    async def read_var():
        return var.get()

    task2 = loop.create_task(read_var(), context=ctx)
    assert calls[1] == (loop, {"context": ctx})
    assert loop.run_until_complete(task2) == "factory-ctx"

    # Coroutines wrapped by run_until_complete go through the factory too.
    loop.run_until_complete(noop())
    assert len(calls) == 3

    loop.set_task_factory(None)
    assert loop.get_task_factory() is None
    loop.run_until_complete(loop.create_task(noop()))
    assert len(calls) == 3


def test_set_task_factory_rejects_non_callable(loop):
    with pytest.raises(TypeError):
        loop.set_task_factory(42)


# --------------------------------------------------------------------------- exception handler


def test_new_loop_has_no_custom_exception_handler(loop_factory):
    fresh = loop_factory()
    assert fresh.get_exception_handler() is None


def test_set_and_get_exception_handler(loop):
    def handler(lp, ctx):
        pass

    loop.set_exception_handler(handler)
    assert loop.get_exception_handler() is handler
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None
    with pytest.raises(TypeError):
        loop.set_exception_handler("not callable")


def test_call_exception_handler_calls_custom_handler_with_loop_and_context(loop):
    calls = []
    loop.set_exception_handler(lambda lp, ctx: calls.append((lp, ctx)))
    context = {"message": "custom", "extra": 1}
    loop.call_exception_handler(context)
    assert len(calls) == 1
    assert calls[0][0] is loop
    assert calls[0][1]["message"] == "custom"
    assert calls[0][1]["extra"] == 1


def test_default_exception_handler_logs_at_error_level(loop, caplog):
    """It logs through the "asyncio" logger."""
    exc = RuntimeError("the-exception")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"message": "the-message", "exception": exc})
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.ERROR
    assert "the-message" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is exc


def test_call_exception_handler_without_custom_handler_uses_default(loop, caplog):
    loop.set_exception_handler(None)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_exception_handler({"message": "routed-to-default"})
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(messages) == 1
    assert "routed-to-default" in messages[0]


def test_default_exception_handler_without_message_uses_generic_text(loop, caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"exception": ValueError("x")})
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    assert "Unhandled exception in event loop" in records[0].getMessage()


def test_failing_custom_handler_falls_back_to_default_handler(loop, caplog):
    def broken(lp, ctx):
        raise ValueError("handler is broken")

    loop.set_exception_handler(broken)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_exception_handler({"message": "original"})
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    assert "Unhandled error in exception handler" in records[0].getMessage()
    assert isinstance(records[0].exc_info[1], ValueError)


def test_unretrieved_task_exception_reaches_exception_handler(loop, expect_loop_errors):
    async def fail():
        raise OSError("never retrieved")

    task = loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0.001))
    assert task.done()
    del task
    gc.collect()
    assert len(expect_loop_errors) == 1
    assert isinstance(expect_loop_errors[0]["exception"], OSError)


# --------------------------------------------------------------------------- debug mode


def test_debug_mode_defaults_to_env_and_can_be_toggled(loop):
    env_debug = bool(
        sys.flags.dev_mode
        or (not sys.flags.ignore_environment and os.environ.get("PYTHONASYNCIODEBUG"))
    )
    assert loop.get_debug() is env_debug
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_set_debug_takes_any_truth_value(loop):
    # aiohttp's own tests call set_debug(0) and set_debug(1).
    loop.set_debug(1)
    assert loop.get_debug()
    loop.run_until_complete(asyncio.sleep(0))
    loop.set_debug(0)
    assert not loop.get_debug()
    loop.run_until_complete(asyncio.sleep(0))


def slow_callback_for_debug_test():
    time.sleep(0.06)


def fast_callback_for_debug_test():
    pass


def test_debug_mode_warns_about_slow_callbacks(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.03
    assert loop.slow_callback_duration == 0.03
    loop.call_soon(slow_callback_for_debug_test)
    loop.call_soon(fast_callback_for_debug_test)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.stop()
        loop.run_forever()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncio" and r.levelno == logging.WARNING
    ]
    slow = [m for m in warnings if "slow_callback_for_debug_test" in m]
    assert len(slow) == 1
    assert re.search(r"Executing .* took \d+\.\d{3} seconds", slow[0])
    assert not any("fast_callback_for_debug_test" in m for m in warnings)


def test_slow_callbacks_are_not_reported_outside_debug_mode(loop, caplog):
    loop.set_debug(False)
    loop.slow_callback_duration = 0.01
    loop.call_soon(slow_callback_for_debug_test)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.stop()
        loop.run_forever()
    assert not [r for r in caplog.records if r.name == "asyncio"]


# --------------------------------------------------------------------------- async generators


def test_asyncgen_hooks_installed_while_running_and_restored_after(loop):
    before = sys.get_asyncgen_hooks()
    seen = []
    loop.call_soon(lambda: seen.append(sys.get_asyncgen_hooks()))
    loop.stop()
    loop.run_forever()
    assert seen[0].firstiter is not None
    assert seen[0].finalizer is not None
    assert sys.get_asyncgen_hooks() == before


def test_shutdown_asyncgens_runs_finally_of_unexhausted_generator(loop):
    log = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)
            log.append("finally")

    gen = agen()

    async def main():
        return await gen.__anext__()

    assert loop.run_until_complete(main()) == 1
    assert log == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert log == ["finally"]


def test_garbage_collected_asyncgen_is_finalized_by_the_loop(loop):
    log = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            log.append(asyncio.get_running_loop())

    async def main():
        gen = agen()
        await gen.__anext__()
        del gen
        gc.collect()
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert log == [loop]


# --------------------------------------------------------------------------- executors


def test_run_in_executor_runs_function_in_another_thread(loop):
    def work(a, b):
        return a + b, threading.get_ident()

    result, ident = loop.run_until_complete(loop.run_in_executor(None, work, 2, 3))
    assert result == 5
    assert ident != threading.get_ident()


def test_run_in_executor_propagates_exceptions(loop):
    def fail():
        raise ZeroDivisionError("in executor")

    with pytest.raises(ZeroDivisionError, match="in executor"):
        loop.run_until_complete(loop.run_in_executor(None, fail))


def test_run_in_executor_with_explicit_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="explicit-pool") as pool:
        name = loop.run_until_complete(
            loop.run_in_executor(pool, lambda: threading.current_thread().name)
        )
    assert name.startswith("explicit-pool")


def test_set_default_executor_is_used_by_run_in_executor(loop):
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="default-pool")
    loop.set_default_executor(pool)
    name = loop.run_until_complete(
        loop.run_in_executor(None, lambda: threading.current_thread().name)
    )
    assert name.startswith("default-pool")
    loop.run_until_complete(loop.shutdown_default_executor())
    # shutdown_default_executor shut the pool down.
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_set_default_executor_rejects_non_thread_pool(loop):
    with pytest.raises(TypeError):
        loop.set_default_executor(object())


def test_run_in_executor_after_shutdown_default_executor_raises(loop):
    loop.run_until_complete(loop.run_in_executor(None, time.sleep, 0))
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_in_executor(None, print)


def test_shutdown_default_executor_waits_for_running_jobs(loop):
    done = []

    def job():
        time.sleep(0.05)
        done.append(True)

    loop.run_in_executor(None, job)
    loop.run_until_complete(loop.shutdown_default_executor())
    assert done == [True]


def test_shutdown_default_executor_gives_up_after_the_timeout_with_a_warning(loop, impl):
    # 3.12's asyncio.run passes a timeout; the 3.11 stdlib loop takes none, and 3.12.0-1
    # awaited the executor's shutdown before applying it (fixed in 3.12.2).
    if impl == "asyncio" and sys.version_info < (3, 12, 2):
        pytest.skip("this stdlib loop has no working timeout parameter")
    release = threading.Event()
    loop.run_in_executor(None, release.wait, 5)
    try:
        with pytest.warns(RuntimeWarning, match="within 0.05 seconds"):
            loop.run_until_complete(loop.shutdown_default_executor(timeout=0.05))
    finally:
        release.set()


# --------------------------------------------------------------------------- asyncio.run / Runner


@pytest.fixture
def policy_for_impl(impl):
    """Temporarily install an event loop policy that creates loops of *impl*."""
    old = asyncio.get_event_loop_policy()
    if impl == "asyncio":
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    else:
        import ferroloop

        asyncio.set_event_loop_policy(ferroloop.EventLoopPolicy())
    try:
        yield impl
    finally:
        asyncio.set_event_loop_policy(old)


def test_top_level_run_with_debug_true_uses_policy_loop(policy_for_impl, loop_factory):
    expected_type = type(loop_factory())

    async def main():
        running = asyncio.get_running_loop()
        return type(running), running.get_debug(), running

    loop_type, debug, used = asyncio.run(main(), debug=True)
    assert loop_type is expected_type
    assert debug is True
    assert used.is_closed()


def test_runner_with_loop_factory_uses_that_loop(loop_factory):
    async def main(x):
        await asyncio.sleep(0)
        return asyncio.get_running_loop(), x

    with asyncio.Runner(loop_factory=loop_factory, debug=True) as runner:
        runner_loop = runner.get_loop()
        assert runner_loop.get_debug() is True
        assert runner.run(main(1)) == (runner_loop, 1)
        assert runner.run(main(2)) == (runner_loop, 2)
    assert runner_loop.is_closed()


def test_runner_cancels_leftover_tasks_and_finalizes_asyncgens_on_close(loop_factory):
    log = []

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.append("task cancelled")
            raise

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            log.append("agen finally")

    gen = agen()

    async def main():
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)
        return await gen.__anext__()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(main()) == 1
        assert log == []
    assert sorted(log) == ["agen finally", "task cancelled"]


def test_runner_run_propagates_exception(loop_factory):
    async def main():
        raise LookupError("from main")

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        with pytest.raises(LookupError, match="from main"):
            runner.run(main())
