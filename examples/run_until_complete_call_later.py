"""Timers keep firing while a coroutine is waiting.

Two ``call_later`` callbacks are scheduled before the loop even runs.  Then
``run_until_complete(main())`` runs the loop until ``main`` finishes.  ``main``
sleeps for 1.5 seconds, and while it sleeps the loop is free to run the
callbacks, due at 0.5 s and 1.0 s.  ``run_until_complete`` returns ``main``'s
result.
"""

import asyncio
import time


def reminder(name: str, start: float) -> None:
    print(f"callback {name!r} fired after {time.perf_counter() - start:0.2f} seconds.")


async def main(start: float) -> int:
    print("main: going to sleep for 1.5 seconds")
    await asyncio.sleep(1.5)
    print(f"main: woke up after {time.perf_counter() - start:0.2f} seconds.")
    return 42


if __name__ == "__main__":
    loop = asyncio.new_event_loop()
    try:
        start = time.perf_counter()
        loop.call_later(0.5, reminder, "first", start)
        loop.call_later(1.0, reminder, "second", start)
        result = loop.run_until_complete(main(start))
        print(f"run_until_complete returned {result}")
    finally:
        loop.close()
