"""The per-callback fast paths behave as the stdlib's methods do.

ferroloop parses ``call_soon``/``call_soon_threadsafe``/``call_later``/``call_at`` arguments
itself, stores zero or one positional argument without a tuple, keeps implicitly captured
contexts out of the cyclic GC until they are exposed, reuses spent handles while the loop
runs, and (before Python 3.12) puts a bound ``call_soon`` on a running loop instance. These
tests pin the visible behaviour of all of that, on both loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref

import pytest

pytestmark = pytest.mark.timeout(30)

var = contextvars.ContextVar("var", default="default")


def run_once(loop):
    loop.stop()
    loop.run_forever()


# -- argument parsing -----------------------------------------------------------------------


def test_callback_can_be_passed_by_keyword(loop):
    got = []
    loop.call_soon(callback=lambda: got.append("soon"))
    loop.call_soon_threadsafe(callback=lambda: got.append("threadsafe"))
    loop.call_later(delay=0, callback=lambda: got.append("later"))
    loop.call_at(when=loop.time(), callback=lambda: got.append("at"))
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(got) == ["at", "later", "soon", "threadsafe"]


@pytest.mark.parametrize("nargs", [0, 1, 2, 5])
def test_positional_args_reach_the_callback_with_and_without_context(loop, nargs):
    got = []
    args = tuple(range(nargs))
    ctx = contextvars.copy_context()
    loop.call_soon(lambda *a: got.append(("soon", a)), *args)
    loop.call_soon(lambda *a: got.append(("soon-ctx", a)), *args, context=ctx)
    loop.call_soon_threadsafe(lambda *a: got.append(("threadsafe", a)), *args, context=None)
    loop.call_later(0, lambda *a: got.append(("later", a)), *args, context=ctx)
    loop.call_at(loop.time(), lambda *a: got.append(("at", a)), *args)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(got) == sorted(
        [("soon", args), ("soon-ctx", args), ("threadsafe", args), ("later", args), ("at", args)]
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda loop: loop.call_soon(),
        lambda loop: loop.call_soon(print, foo=1),
        lambda loop: loop.call_soon(print, callback=print),
        lambda loop: loop.call_soon(context=None),
        lambda loop: loop.call_soon_threadsafe(),
        lambda loop: loop.call_later(0),
        lambda loop: loop.call_later(),
        lambda loop: loop.call_later(0, print, delay=1),
        lambda loop: loop.call_later(0, print, bogus=1),
        lambda loop: loop.call_at(),
        lambda loop: loop.call_at(callback=print),
    ],
)
def test_bad_arguments_raise_type_error(loop, call):
    with pytest.raises(TypeError):
        call(loop)
    run_once(loop)


def test_non_interned_context_keyword_is_accepted(loop):
    name = "".join(["con", "text"])  # a str equal to "context", not the interned one
    ctx = contextvars.Context()
    ctx.run(var.set, "explicit")
    seen = []
    loop.call_soon(lambda: seen.append(var.get()), **{name: ctx})
    run_once(loop)
    assert seen == ["explicit"]


def test_handle_args_and_callback_are_visible(loop):
    h0 = loop.call_soon(print)
    h1 = loop.call_soon(print, "x")
    h3 = loop.call_soon(print, 1, 2, 3)
    assert (h0._callback, h0._args) == (print, ())
    assert (h1._callback, h1._args) == (print, ("x",))
    assert (h3._callback, h3._args) == (print, (1, 2, 3))
    for h in (h0, h1, h3):
        h.cancel()
    run_once(loop)


# -- contexts -------------------------------------------------------------------------------


def test_each_callback_gets_a_private_copy_even_with_reused_handles(loop):
    seen = []

    def set_and_read(i):
        seen.append(var.get())
        var.set(f"changed-{i}")

    var.set("outer")
    try:
        for i in range(300):
            loop.call_soon(set_and_read, i)
        run_once(loop)
        # The second round runs on handles the first one left behind.
        for i in range(300):
            loop.call_soon(set_and_read, i)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        var.set("default")
    assert seen == ["outer"] * 600


def test_exposed_implicit_context_can_still_be_collected_in_a_cycle(impl, loop):
    handle = loop.call_soon(print)
    if impl == "asyncio" and sys.version_info < (3, 12):
        handle.cancel()
        pytest.skip("Handle.get_context() was added to the stdlib in Python 3.12")
    ctx = handle.get_context()
    assert gc.is_tracked(ctx)

    class Holder:
        pass

    holder = Holder()
    holder.ctx = ctx
    ctx.run(var.set, holder)  # ctx -> holder -> ctx
    ref = weakref.ref(holder)
    handle.cancel()
    del holder, ctx, handle
    run_once(loop)
    gc.collect()
    assert ref() is None


def test_queued_callbacks_keep_their_context_values_alive_until_run(loop):
    class Value:
        pass

    value = Value()
    ref = weakref.ref(value)
    var.set(value)
    try:
        loop.call_soon(lambda: None)
    finally:
        var.set("default")
    del value
    gc.collect()
    assert ref() is not None  # held by the queued callback's context copy
    run_once(loop)
    gc.collect()
    assert ref() is None


def test_handle_scheduled_from_an_empty_context_runs_in_the_context_it_reports(loop):
    def schedule():
        return loop.call_soon(var.set, "inside")

    # Asked for before it runs.
    h1 = contextvars.Context().run(schedule)
    ctx1 = h1._context
    assert h1._context is ctx1
    assert len(ctx1) == 0
    # Not asked for before it runs, but the handle is kept.
    h2 = contextvars.Context().run(schedule)
    run_once(loop)
    assert ctx1.get(var) == "inside"
    assert h2._context is h2._context
    assert h2._context.get(var) == "inside"
    assert var.get() != "inside"  # the scheduling context is untouched


def test_callbacks_scheduled_from_an_empty_context_do_not_share_one(loop):
    seen = []

    def read_then_set(i):
        seen.append(var.get())
        var.set(i)

    def schedule():
        for i in range(3):
            loop.call_soon(read_then_set, i)

    contextvars.Context().run(schedule)
    run_once(loop)
    assert seen == ["default"] * 3


# -- handle reuse ---------------------------------------------------------------------------


def test_handle_kept_by_the_caller_is_not_reused(loop):
    out = []
    kept = [loop.call_soon(out.append, i) for i in range(10)]
    run_once(loop)
    # New callbacks must not come back on the handles still referenced above.
    fresh = [loop.call_soon(out.append, i) for i in range(10, 20)]
    assert not {id(h) for h in kept} & {id(h) for h in fresh}
    run_once(loop)
    assert out == list(range(20))
    for h in kept:
        assert h.cancelled() is False
        assert "append" not in repr(h) or h._callback is not None


def test_raising_callback_handle_is_reported_with_its_callback(loop):
    reports = []

    def boom():
        raise ValueError("boom")

    loop.set_exception_handler(
        lambda _loop, context: reports.append((context["message"], repr(context["handle"])))
    )
    loop.call_soon(boom)
    loop.call_soon(boom)
    run_once(loop)
    assert len(reports) == 2
    for message, handle_repr in reports:
        assert "boom" in message
        assert "boom" in handle_repr


def test_tasks_keep_working_across_many_runs(loop):
    async def hop(n):
        for _ in range(n):
            await asyncio.sleep(0)
        return n

    async def main():
        return await asyncio.gather(*[hop(20) for _ in range(50)])

    for _ in range(3):
        assert loop.run_until_complete(main()) == [20] * 50


# -- the bound call_soon on a running loop ----------------------------------------------------


def test_call_soon_attribute_is_only_pinned_while_running(impl, loop):
    seen = []

    def probe():
        seen.append("call_soon" in vars(loop))
        loop.stop()

    loop.call_soon(probe)
    loop.run_forever()
    assert "call_soon" not in vars(loop)
    pinned = impl == "ferroloop" and sys.version_info < (3, 12)
    assert seen == [pinned]


def test_user_replacement_of_call_soon_is_left_alone(loop):
    calls = []
    original = loop.call_soon

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    loop.call_soon = spy
    try:
        loop.run_until_complete(asyncio.sleep(0))
        assert loop.call_soon is spy
        assert calls  # the task's steps went through the replacement
    finally:
        del loop.call_soon
