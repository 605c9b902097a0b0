"""Three coroutines taking turns on one thread.

Each ``count()`` prints "One", sleeps for a second and prints "Two".  Because
``asyncio.sleep`` hands control back to the event loop, the three sleeps overlap:
all three "One"s come out at once, all three "Two"s a second later, and the whole
program takes about one second rather than three.
"""

import asyncio
import time


async def count() -> None:
    print("One")
    await asyncio.sleep(1)
    print("Two")


async def main() -> None:
    await asyncio.gather(count(), count(), count())


if __name__ == "__main__":
    start = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - start
    print(f"countasync.py executed in {elapsed:0.2f} seconds.")
