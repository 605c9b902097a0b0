"""Chaining coroutines: the result of one step feeds the next.

For each argument ``n``, ``chain(n)`` awaits ``part1(n)`` and passes its result
on to ``part2(n, ...)``.  Each part sleeps for a random time of up to a second.
Within one chain the steps run strictly one after the other, but the chains
for different ``n`` run concurrently under ``gather``, so the whole program
takes about as long as the slowest chain.

Usage: ``python chained.py [n ...]`` (default: 1 2 3).  The random generator
is seeded, and the seed is chosen so that, for the default arguments, no two
sleeps end at the same moment, which keeps the output identical on every run.
"""

import asyncio
import random
import sys
import time

SEED = 10


async def part1(n: int) -> str:
    tenths = random.randint(1, 10)
    print(f"part1({n}) sleeping for {tenths / 10} seconds.")
    await asyncio.sleep(tenths / 10)
    result = f"result{n}-1"
    print(f"Returning part1({n}) == {result}.")
    return result


async def part2(n: int, arg: str) -> str:
    tenths = random.randint(1, 10)
    print(f"part2({n}, {arg!r}) sleeping for {tenths / 10} seconds.")
    await asyncio.sleep(tenths / 10)
    result = f"result{n}-2 derived from {arg}"
    print(f"Returning part2({n}, {arg!r}) == {result}.")
    return result


async def chain(n: int) -> None:
    start = time.perf_counter()
    p1 = await part1(n)
    p2 = await part2(n, p1)
    end = time.perf_counter() - start
    print(f"-->Chained result{n} => {p2} (took {end:0.2f} seconds).")


async def main(*args: int) -> None:
    await asyncio.gather(*(chain(n) for n in args))


if __name__ == "__main__":
    random.seed(SEED)
    args = [int(arg) for arg in sys.argv[1:]] or [1, 2, 3]
    start = time.perf_counter()
    asyncio.run(main(*args))
    print(f"Program finished in {time.perf_counter() - start:0.2f} seconds.")
