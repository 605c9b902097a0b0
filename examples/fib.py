"""Recursive Fibonacci where every call fans out with ``gather``.

``fib(n)`` pauses briefly (standing in for some I/O) and then computes
``fib(n - 1)`` and ``fib(n - 2)`` *concurrently* with ``asyncio.gather``.  The
calls form a tree with hundreds of nodes, but the pauses on each level overlap,
so the total time is the depth of the tree times one pause, not the number of
calls times one pause.  ``main`` gathers ``fib(0)`` to ``fib(N)`` the same way.
"""

import asyncio
import time

N = 12
PAUSE = 0.1  # seconds each call waits before doing its work

calls = 0


async def fib(n: int) -> int:
    global calls
    calls += 1
    await asyncio.sleep(PAUSE)
    if n < 2:
        return n
    a, b = await asyncio.gather(fib(n - 1), fib(n - 2))
    return a + b


async def main() -> None:
    results = await asyncio.gather(*(fib(n) for n in range(N + 1)))
    for n, value in enumerate(results):
        print(f"fib({n}) = {value}")
    print(f"{calls} calls to fib()")


if __name__ == "__main__":
    start = time.perf_counter()
    asyncio.run(main())
    print(f"fib.py executed in {time.perf_counter() - start:0.2f} seconds.")
