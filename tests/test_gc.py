"""Handles never keep garbage alive.

ferroloop keeps its handles out of the cyclic garbage collector (outside debug mode) and
relies on a handle dropping its callback once it can no longer run. These tests pin that
the common cycles through a handle are still collected, on both loops.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest


class Holder:
    """Keeps the handle of its own callback, a common pattern (`self._h = call_soon(...)`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        if delay is None:
            self.handle = loop.call_soon(self.callback)
        else:
            self.handle = loop.call_later(delay, self.callback)
        self.ran = False

    def callback(self) -> None:
        self.ran = True


def run_once(loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon(loop.stop)
    loop.run_forever()


def assert_collected(ref: weakref.ref) -> None:
    gc.collect()
    assert ref() is None, "the object was kept alive through its handle"


def test_object_holding_its_run_handle_is_collected(loop):
    holder = Holder(loop, None)
    run_once(loop)
    assert holder.ran
    ref = weakref.ref(holder)
    del holder
    assert_collected(ref)


def test_object_holding_its_fired_timer_is_collected(loop):
    holder = Holder(loop, 0.0)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert holder.ran
    ref = weakref.ref(holder)
    del holder
    assert_collected(ref)


def test_object_holding_its_cancelled_timer_is_collected(loop):
    holder = Holder(loop, 3600)
    holder.handle.cancel()
    run_once(loop)
    ref = weakref.ref(holder)
    del holder
    assert_collected(ref)


def test_pending_callbacks_are_released_when_the_loop_closes(loop_factory):
    loop = loop_factory()
    holders = [Holder(loop, None), Holder(loop, 3600)]
    refs = [weakref.ref(h) for h in holders]
    del holders
    loop.close()
    for ref in refs:
        assert_collected(ref)


def test_task_sleeping_on_a_timer_is_collected_after_completion(loop):
    async def sleeper():
        await asyncio.sleep(0.001)
        return 1

    task = loop.create_task(sleeper())
    assert loop.run_until_complete(task) == 1
    ref = weakref.ref(task)
    del task
    assert_collected(ref)


async def make_a_future_and_a_task() -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.call_soon(fut.set_result, None)
    await fut
    await loop.create_task(asyncio.sleep(0))


def test_a_closed_loop_that_made_futures_and_tasks_is_freed_without_the_collector(loop):
    other = type(loop)()
    other.run_until_complete(make_a_future_and_a_task())
    other.close()
    ref = weakref.ref(other)
    gc.disable()
    try:
        del other
        assert ref() is None, "a closed loop was kept alive by a reference cycle"
    finally:
        gc.enable()


def test_an_unclosed_loop_that_made_futures_and_tasks_is_collected(loop):
    other = type(loop)()
    other.run_until_complete(make_a_future_and_a_task())
    ref = weakref.ref(other)
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del other
        gc.collect()
    assert ref() is None
