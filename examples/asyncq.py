"""Producers and consumers sharing an ``asyncio.Queue``.

Each producer makes a few items, pausing for a random number of "ticks" before
each one, and puts them on the queue.  Consumers take items off the queue,
"process" each for a moment and mark it done with ``task_done()``.

``main`` starts everything, waits for the producers to finish, then waits with
``q.join()`` until every item put on the queue has been marked done.  The
consumers are still waiting for more work at that point, so ``main`` cancels
them.

Usage: ``python asyncq.py [-p NPROD] [-c NCON]``

The output is the same on every run.  The random generator is seeded; time is
divided into ticks and producer ``p`` of ``NPROD`` only wakes up ``p / NPROD`` of
the way into a tick, so no two producers ever wake at the same moment (with up
to about ten producers, the gaps stay comfortably wide); and a consumer's
processing always ends well before the next producer can wake, so which
consumer takes which item never depends on timing noise.
"""

import argparse
import asyncio
import random
import time

SEED = 444
TICK = 0.25  # seconds


async def sleep_until(deadline: float) -> None:
    """Sleep until the loop's clock reads ``deadline`` (no drift from repeated sleeps)."""
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))


async def produce(p: int, nprod: int, q: asyncio.Queue[str], start: float) -> None:
    name = f"Producer {p}"
    nitems = random.randint(2, 5)
    print(f"{name} will make {nitems} items.")
    ticks = 0
    for _ in range(nitems):
        pause = random.randint(1, 2)
        ticks += pause
        print(f"{name} working for {pause} tick(s).")
        await sleep_until(start + (ticks + p / nprod) * TICK)
        item = f"{p}:{random.randbytes(3).hex()}"
        await q.put(item)
        print(f"{name} added <{item}> to the queue.")


async def consume(c: int, nprod: int, q: asyncio.Queue[str]) -> None:
    while True:
        item = await q.get()
        # At most 40% of the time until the next producer can wake up.
        busy = random.randint(1, 4) / 10 * TICK / nprod
        print(f"Consumer {c} got <{item}>, processing it for {busy * 1000:.0f} ms.")
        await asyncio.sleep(busy)
        q.task_done()


async def main(nprod: int, ncon: int) -> None:
    q: asyncio.Queue[str] = asyncio.Queue()
    start = asyncio.get_running_loop().time()
    producers = [asyncio.create_task(produce(p, nprod, q, start)) for p in range(nprod)]
    consumers = [asyncio.create_task(consume(c, nprod, q)) for c in range(ncon)]
    await asyncio.gather(*producers)
    print("All producers are done; waiting for the queue to drain.")
    await q.join()  # every item has been taken *and* marked done
    print("Queue drained; cancelling the consumers.")
    for consumer in consumers:
        consumer.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--nprod", type=int, default=5, help="number of producers")
    parser.add_argument("-c", "--ncon", type=int, default=10, help="number of consumers")
    ns = parser.parse_args()
    random.seed(SEED)
    start = time.perf_counter()
    asyncio.run(main(ns.nprod, ns.ncon))
    print(f"Program completed in {time.perf_counter() - start:0.2f} seconds.")
