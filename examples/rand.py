"""Three tasks drawing random numbers until they get a big enough one.

``makerandom(idx, threshold)`` draws a random integer from 0 to 10.  While the
number is not above its threshold it reports "too low", sleeps and draws again.
The three tasks run concurrently, each with its own colour and indentation, so
you can watch their lines interleave; the lower the threshold, the sooner a
task tends to finish.

The output is the same on every run: the random generator is seeded, and each
task has its own pause, chosen so that no two tasks ever wake up less than 50 ms
apart.  A task sleeps until its next "beat" (a whole number of its pauses
after it started) rather than for one pause after it last woke up, so even if a
busy machine delays the program for a moment, the delays do not add up and push
one task's wake-ups past another's.
"""

import asyncio
import random
import time

SEED = 165
RESET = "\033[0m"
COLOURS = ("\033[36m", "\033[91m", "\033[35m")  # cyan, red, magenta
PAUSES = (0.25, 0.4, 0.55)  # seconds each task sleeps between draws


def say(idx: int, message: str) -> None:
    print(f"{COLOURS[idx]}{'    ' * idx}{message}{RESET}")


async def makerandom(idx: int, threshold: int = 6) -> int:
    loop = asyncio.get_running_loop()
    start = loop.time()
    beats = 0
    say(idx, f"Initiated makerandom({idx}).")
    i = random.randint(0, 10)
    while i <= threshold:
        say(idx, f"makerandom({idx}) == {i} too low; retrying.")
        beats += 1
        await asyncio.sleep(max(0.0, start + beats * PAUSES[idx] - loop.time()))
        i = random.randint(0, 10)
    say(idx, f"---> Finished: makerandom({idx}) == {i}")
    return i


async def main() -> tuple[int, ...]:
    return tuple(await asyncio.gather(*(makerandom(i, 9 - i) for i in range(3))))


if __name__ == "__main__":
    random.seed(SEED)
    start = time.perf_counter()
    r1, r2, r3 = asyncio.run(main())
    print()
    print(f"r1: {r1}, r2: {r2}, r3: {r3}")
    print(f"rand.py executed in {time.perf_counter() - start:0.2f} seconds.")
