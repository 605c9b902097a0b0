"""A callback that keeps rescheduling itself with ``call_later``.

``tick`` prints a line and asks the loop to call it again half a second later.
A second timer, set up front, stops the loop after 2.5 seconds.  The first tick
is at 0.1 s, so the ticks land at 0.1, 0.6, 1.1, 1.6 and 2.1 seconds, well clear
of the stop at 2.5 s; the tick due at 2.6 s never happens, because the loop is
closed by then.
"""

import asyncio
import time


def tick(loop: asyncio.AbstractEventLoop, n: int, start: float) -> None:
    print(f"tick {n} after {time.perf_counter() - start:0.2f} seconds.")
    loop.call_later(0.5, tick, loop, n + 1, start)


def stop(loop: asyncio.AbstractEventLoop, start: float) -> None:
    print(f"stopping the loop after {time.perf_counter() - start:0.2f} seconds.")
    loop.stop()


def main() -> None:
    loop = asyncio.new_event_loop()
    try:
        start = time.perf_counter()
        loop.call_later(0.1, tick, loop, 1, start)
        loop.call_later(2.5, stop, loop, start)
        loop.run_forever()
        print("run_forever returned")
    finally:
        loop.close()


if __name__ == "__main__":
    main()
