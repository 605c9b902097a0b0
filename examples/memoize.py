"""A memoising decorator for coroutine functions.

``@async_memoize`` keeps one entry per argument tuple.  The entry is the *task*
computing the result, stored as soon as the first call starts, so:

* a later call with the same arguments gets the finished result at once;
* calls that arrive while the result is still being computed do not start a
  second computation, they all wait on the same task;
* a failed computation is forgotten, so the next call tries again;
* a caller that gives up (is cancelled) does not cancel the shared task for
  everyone else, because each caller waits through ``asyncio.shield``.

The demonstration uses ``slow_square``, which takes ``|x| / 10`` seconds and
fails for negative numbers.
"""

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def async_memoize(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    cache: dict[tuple[Any, ...], asyncio.Task[T]] = {}

    def forget_failures(args: tuple[Any, ...], task: asyncio.Task[T]) -> None:
        if task.cancelled() or task.exception() is not None:
            if cache.get(args) is task:
                del cache[args]

    @functools.wraps(func)
    async def wrapper(*args: Any) -> T:
        task = cache.get(args)
        if task is None:
            task = asyncio.ensure_future(func(*args))
            task.add_done_callback(functools.partial(forget_failures, args))
            cache[args] = task
        return await asyncio.shield(task)

    return wrapper


computations = 0


@async_memoize
async def slow_square(x: int) -> int:
    global computations
    computations += 1
    print(f"  computing slow_square({x}) (takes {abs(x) / 10} seconds)")
    await asyncio.sleep(abs(x) / 10)
    if x < 0:
        raise ValueError("negative numbers are not supported")
    return x * x


async def timed_round(title: str, *xs: int) -> None:
    print(f"{title}: slow_square of {list(xs)}")
    start = time.perf_counter()
    results = await asyncio.gather(*(slow_square(x) for x in xs), return_exceptions=True)
    for x, result in zip(xs, results, strict=True):
        print(f"  slow_square({x}) -> {result!r}")
    print(f"  round took {time.perf_counter() - start:0.2f} seconds.")


async def main() -> None:
    # Three concurrent callers of slow_square(3) share one computation.
    await timed_round("round 1", 3, 3, 4, 3)
    # 3 and 4 come from the cache; only 5 is computed.
    await timed_round("round 2", 4, 3, 5)
    # A caller that times out does not spoil the computation for the others.
    print("round 3: one caller of slow_square(6) gives up after 0.2 seconds")
    impatient = asyncio.create_task(asyncio.wait_for(slow_square(6), timeout=0.2))
    patient = asyncio.create_task(slow_square(6))
    try:
        await impatient
    except TimeoutError:
        print("  the impatient caller timed out")
    print(f"  the patient caller got {await patient!r}")
    # Failures are not cached: both rounds compute slow_square(-2).
    await timed_round("round 4", -2)
    await timed_round("round 5", -2, 6)
    print(f"{computations} computations in total")


if __name__ == "__main__":
    start = time.perf_counter()
    asyncio.run(main())
    print(f"memoize.py executed in {time.perf_counter() - start:0.2f} seconds.")
