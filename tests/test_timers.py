"""loop.time(), call_later / call_at and TimerHandle behaviour."""

import asyncio
import math
import random
import sys
import time
from unittest import mock

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)


def test_loop_time_is_the_monotonic_clock(loop):
    for _ in range(100):
        before = time.monotonic()
        now = loop.time()
        after = time.monotonic()
        assert before <= now <= after


def test_call_later_never_fires_early(loop):
    rng = random.Random(1234)
    fired = []

    def callback(handle_box):
        fired.append((loop.time(), time.monotonic(), handle_box[0].when()))

    for _ in range(200):
        box = []
        box.append(loop.call_later(rng.uniform(0, 0.03), callback, box))
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert len(fired) == 200
    for loop_now, mono_now, deadline in fired:
        assert loop_now >= deadline
        assert mono_now >= deadline


def test_call_at_never_fires_early(loop):
    rng = random.Random(4321)
    fired = []
    base = loop.time()
    deadlines = [base + rng.uniform(0, 0.03) for _ in range(200)]
    for when in deadlines:
        loop.call_at(when, lambda w=when: fired.append((loop.time(), w)))
    loop.call_at(base + 0.05, loop.stop)
    loop.run_forever()
    assert len(fired) == 200
    for now, when in fired:
        assert now >= when


def test_timers_fire_in_deadline_order(loop):
    out = []
    base = loop.time() + 0.005
    offsets = [0.009, 0.001, 0.005, 0.003, 0.007, 0.0, 0.002]
    for off in offsets:
        loop.call_at(base + off, out.append, off)
    loop.call_at(base + 0.02, loop.stop)
    loop.run_forever()
    assert out == sorted(offsets)


def test_equal_deadlines_all_run_in_the_same_iteration(loop):
    out = []
    when = loop.time() + 0.005
    for i in range(20):
        loop.call_at(when, out.append, i)
    # Scheduled *after* the equal-deadline timers, at the same instant: by the time the
    # batch runs, stop() is honoured only after the whole ready batch.
    loop.call_at(when, loop.stop)
    loop.run_forever()
    assert sorted(out) == list(range(20))


@pytest.mark.ferroloop_only(
    "the stdlib's heap leaves the order of equal deadlines undefined (documented); "
    "ferroloop runs them FIFO"
)
def test_equal_deadlines_run_in_fifo_order(loop):
    out = []
    when = loop.time() + 0.005
    for i in range(50):
        loop.call_at(when, out.append, i)
    loop.call_at(when + 0.01, loop.stop)
    loop.run_forever()
    assert out == list(range(50))


def test_timer_handle_when_returns_the_deadline(loop):
    when = loop.time() + 12.5
    timer = loop.call_at(when, print)
    assert timer.when() == when
    before = loop.time()
    later = loop.call_later(3.0, print)
    after = loop.time()
    assert before + 3.0 <= later.when() <= after + 3.0
    timer.cancel()
    later.cancel()


def test_call_at_with_an_int_deadline_reads_back_the_int(loop):
    # aiohttp schedules at ceil()ed int deadlines and checks the handle's _when.
    when = math.ceil(loop.time()) + 3600
    timer = loop.call_at(when, print)
    assert timer.when() == when and type(timer.when()) is int
    assert type(timer._when) is int
    as_float = loop.call_at(float(when), print)
    assert type(as_float.when()) is float
    later = loop.call_later(3600, print)
    assert type(later.when()) is float
    for handle in (timer, as_float, later):
        handle.cancel()


def test_a_patched_loop_time_moves_the_timers(loop):
    # Virtual-clock test helpers (and aiohttp's tests) patch loop.time on the instance.
    fired = []

    async def main():
        now = loop.time()
        with mock.patch.object(loop, "time") as clock:
            clock.return_value = now
            loop.call_at(now + 1000, fired.append, "at")
            loop.call_later(1000, fired.append, "later")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert fired == []
            clock.return_value = now + 1000
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert fired == ["at", "later"]
        assert "time" not in vars(loop)
        # The real clock is back: a short timer fires on its own.
        await asyncio.wait_for(asyncio.sleep(0.01), 5)
        loop.call_later(0.01, fired.append, "real")
        await asyncio.sleep(0.05)
        assert fired == ["at", "later", "real"]

    loop.run_until_complete(main())


def test_a_subclass_s_time_drives_its_timers(loop):
    class VirtualClockLoop(type(loop)):
        virtual = 0.0

        def time(self):
            return self.virtual

    vloop = VirtualClockLoop()
    try:
        fired = []
        timer = vloop.call_later(3600, fired.append, "due")
        assert timer.when() == 3600
        vloop.call_soon(vloop.stop)
        vloop.run_forever()
        assert fired == []
        vloop.virtual = 3600.0
        vloop.call_soon(vloop.stop)
        vloop.run_forever()
        assert fired == ["due"]
    finally:
        vloop.close()


def test_a_patch_of_the_class_s_time_after_the_loop_exists_drives_its_timers(loop):
    class LaterPatched(type(loop)):
        pass

    ploop = LaterPatched()
    virtual = [0.0]
    fired = []

    async def schedule():
        return ploop.call_later(3600, fired.append, "due")

    try:
        with mock.patch.object(LaterPatched, "time", lambda self: virtual[0]):
            timer = ploop.run_until_complete(schedule())
            assert timer.when() == 3600
            ploop.call_soon(ploop.stop)
            ploop.run_forever()
            assert fired == []
            virtual[0] = 3600.0
            ploop.call_soon(ploop.stop)
            ploop.run_forever()
            assert fired == ["due"]
    finally:
        ploop.close()


def test_object_setattr_works_on_a_loop_and_a_clock_set_that_way_moves_the_timers(loop):
    # Some libraries bypass a class's __setattr__; the stdlib loop accepts that.
    object.__setattr__(loop, "tag", "set")
    assert loop.tag == "set"
    object.__delattr__(loop, "tag")
    assert not hasattr(loop, "tag")
    timers = []
    object.__setattr__(loop, "time", lambda: 1000.0)
    try:
        loop.call_soon(lambda: timers.append(loop.call_later(1, print)))
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        object.__delattr__(loop, "time")
    timers[0].cancel()
    assert timers[0].when() == 1001.0


def test_a_loop_clock_that_raises_stops_the_run_with_its_error(loop):
    def broken_clock():
        raise ZeroDivisionError("clock")

    loop.call_later(3600, print)
    loop.call_soon(loop.stop)
    with mock.patch.object(loop, "time", broken_clock):
        with pytest.raises(ZeroDivisionError, match="clock"):
            loop.run_forever()


def test_cancelled_timers_do_not_run(loop):
    out = []
    keep = loop.call_later(0.002, out.append, "keep")
    drop = loop.call_later(0.001, out.append, "drop")
    assert drop.cancel() is None
    assert drop.cancelled()
    assert not keep.cancelled()
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert out == ["keep"]


def test_timer_cancelled_by_earlier_timer_in_same_batch_does_not_run(loop):
    out = []
    when = loop.time() + 0.005
    victim = None

    def killer():
        out.append("killer")
        victim.cancel()

    loop.call_at(when - 0.001, killer)
    victim = loop.call_at(when, out.append, "victim")
    # Make both expire in the same iteration.
    loop.call_soon(time.sleep, 0.01)
    loop.call_at(when + 0.01, loop.stop)
    loop.run_forever()
    assert out == ["killer"]


def test_cancelling_most_of_10000_timers_is_fast_and_survivors_fire_in_order(loop):
    rng = random.Random(99)
    fired = []
    t0 = time.monotonic()
    handles = [loop.call_later(rng.uniform(0.001, 0.05), fired.append, i) for i in range(10_000)]
    survivors = set(rng.sample(range(10_000), 10))
    for i, h in enumerate(handles):
        if i not in survivors:
            h.cancel()
    # Far-away cancelled timers must not keep the loop busy either.
    far = [loop.call_later(1000, fired.append, "far") for _ in range(1000)]
    for h in far:
        h.cancel()
    loop.call_later(0.06, loop.stop)
    loop.run_forever()
    elapsed = time.monotonic() - t0
    expected = sorted(survivors, key=lambda i: handles[i].when())
    assert fired == expected
    assert elapsed < 1.5


def test_sub_millisecond_timer_fires_and_not_early(loop):
    fired = []
    start = time.monotonic()
    timer = loop.call_later(0.0002, lambda: fired.append(time.monotonic()))
    watchdog = loop.call_later(1, loop.stop)
    loop.call_later(0.0002, loop.stop)
    loop.run_forever()
    watchdog.cancel()
    assert len(fired) == 1
    assert fired[0] >= timer.when()
    assert fired[0] - start >= 0.0002
    assert fired[0] - start < 0.5


def test_many_sub_millisecond_timers_fire_and_none_early(loop):
    fired = []
    for i in range(1, 50):
        delay = i * 0.00002  # 20 us .. ~1 ms
        box = []
        box.append(loop.call_later(delay, lambda b=box: fired.append((loop.time(), b[0].when()))))
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert len(fired) == 49
    assert all(now >= when for now, when in fired)


def test_sleep_for_sub_millisecond_durations_is_not_early(loop):
    async def main():
        for delay in (0.0001, 0.0003, 0.0007):
            t0 = loop.time()
            await asyncio.sleep(delay)
            assert loop.time() - t0 >= delay

    loop.run_until_complete(main())


def test_negative_delay_runs_on_next_iteration(loop):
    out = []
    loop.call_later(-5, out.append, "neg")
    loop.call_at(loop.time() - 100, out.append, "past")
    loop.stop()
    loop.run_forever()
    assert sorted(out) == ["neg", "past"]


@pytest.mark.stdlib_only("ferroloop rejects NaN deadlines (see the ferroloop-only test)")
def test_stdlib_accepts_nan_delay_and_fires_the_timer(loop):
    out = []
    timer = loop.call_later(float("nan"), out.append, "nan")
    assert math.isnan(timer.when())
    loop.call_later(0.01, loop.stop)
    if sys.version_info >= (3, 13):
        # 3.13's iteration turns the timeout into an int: the NaN breaks run_forever().
        with pytest.raises(ValueError, match="NaN"):
            loop.run_forever()
        return
    loop.run_forever()
    assert out == ["nan"]


@pytest.mark.ferroloop_only(
    "the stdlib silently accepts a NaN delay (and fires it at once); ferroloop raises ValueError"
)
def test_nan_delay_raises_value_error(loop):
    with pytest.raises(ValueError):
        loop.call_later(float("nan"), print)
    with pytest.raises(ValueError):
        loop.call_at(float("nan"), print)


def test_infinite_delay_never_fires_and_can_be_cancelled(loop):
    out = []
    timer = loop.call_later(float("inf"), out.append, "inf")
    assert timer.when() == math.inf
    loop.call_later(0.01, loop.stop)
    t0 = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - t0 < 1.0
    assert out == []
    timer.cancel()
    assert timer.cancelled()
    loop.stop()
    loop.run_forever()
    assert out == []


def test_sleep_infinity_can_be_cancelled(loop):
    async def main():
        task = loop.create_task(asyncio.sleep(math.inf))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "done"

    t0 = time.monotonic()
    assert loop.run_until_complete(main()) == "done"
    assert time.monotonic() - t0 < 1.0


def test_call_later_none_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_later(None, print)
    with pytest.raises(TypeError):
        loop.call_at(None, print)


def test_call_later_non_number_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_later("1", print)


def test_call_later_on_closed_loop_raises_runtime_error(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_later(1, print)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.call_at(1, print)


def test_timer_callback_receives_args(loop):
    got = []
    loop.call_later(0.001, lambda *a: got.append(a), 1, "x")
    loop.call_at(loop.time(), lambda *a: got.append(a), 2)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(got, key=len) == [(2,), (1, "x")]


def test_wait_for_timeout_fires_on_time(loop):
    async def main():
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 0.02)
        return loop.time() - t0

    elapsed = loop.run_until_complete(main())
    assert 0.02 <= elapsed < 1.0
