"""The low-level loop API: ``call_soon``, ``run_forever`` and ``stop``.

No coroutines here, just plain callbacks.  ``call_soon`` queues a callback for
the loop's next iteration; queued callbacks run one at a time, in the order
they were queued.  ``run_forever`` keeps the loop going until a callback calls
``loop.stop()``.

The first callback blocks for a second with ``time.sleep`` to show what
"one at a time" means: ``hello`` is queued right behind it, so it has to wait,
and the loop can do nothing else meanwhile.  (Never block like this in real
code; it is here only to make the queueing visible.)
"""

import asyncio
import time


def slow_callback(start: float) -> None:
    print("slow_callback: blocking the loop for a second...")
    time.sleep(1.0)
    print("slow_callback: done")


def hello(loop: asyncio.AbstractEventLoop, start: float) -> None:
    print("Hello World")
    print(f"hello ran after {time.perf_counter() - start:0.2f} seconds.")
    loop.stop()


def main() -> None:
    loop = asyncio.new_event_loop()
    try:
        start = time.perf_counter()
        loop.call_soon(slow_callback, start)
        loop.call_soon(hello, loop, start)
        print("callbacks scheduled; running the loop")
        loop.run_forever()  # returns once hello() has called loop.stop()
        print("run_forever returned")
    finally:
        loop.close()


if __name__ == "__main__":
    main()
