"""In-process event-loop workloads: the code that runs inside each measuring subprocess.

``run.py`` starts one fresh interpreter per (workload, loop, repetition) as::

    python benchmarks/workloads.py measure WORKLOAD LOOP SCALE [--path DIR]
    python benchmarks/workloads.py probe LOOP [--path DIR]

and reads one JSON object from the last line of its stdout. Stdlib only (plus the loop being
measured), so it runs in any interpreter that can import that loop.

A measurement, always in this order, identical for every loop:

1. allocator steady state: allocate and free one 1 MiB block (``bytearray(1 << 20)``). With
   glibc this moves the dynamic mmap threshold up to 1 MiB (and the trim threshold to
   2 MiB), as in a long-running server, instead of measuring a cold allocator;
2. warm-up: the same workload at a tenth of its size, on its own loop, which is then closed;
3. ``gc.collect()``; the cyclic GC stays enabled, as in a real program;
4. a new loop is created (not timed), the workload runs on it, timed with
   ``time.perf_counter`` (wall) and ``time.process_time`` (CPU of the whole process, user +
   system, all threads); its result is checked; the loop is closed (not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

# name -> (module, attribute that makes a new loop, distribution name for its version)
LOOPS: dict[str, tuple[str, str, str | None]] = {
    "asyncio": ("asyncio", "new_event_loop", None),
    "uvloop": ("uvloop", "new_event_loop", "uvloop"),
    "rloop": ("rloop", "new_event_loop", "rloop"),
    "rsloop": ("rsloop", "new_event_loop", "rsloop"),
    "ferroloop": ("ferroloop", "new_event_loop", "ferroloop"),
}

SEED = 20240601
ALLOC_WARMUP_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# workloads: each takes (loop, scale) and returns a value that check() compares
# ---------------------------------------------------------------------------------------------


def _n(base: int, scale: int) -> int:
    return max(1, base // scale)


def call_soon(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """Schedule N call_soon callbacks up front, then run the loop until they have all run."""
    n = _n(1_000_000, scale)
    count = [0]

    def cb() -> None:
        count[0] += 1

    def run() -> int:
        call = loop.call_soon
        for _ in range(n):
            call(cb)
        loop.call_soon(loop.stop)
        loop.run_forever()
        return count[0]

    run.expected = n  # type: ignore[attr-defined]
    return run


def call_soon_chain(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """A chain of N callbacks: each one schedules the next with call_soon (one per iteration)."""
    n = _n(1_000_000, scale)
    count = [0]

    def step(remaining: int) -> None:
        count[0] += 1
        if remaining:
            loop.call_soon(step, remaining - 1)
        else:
            loop.stop()

    def run() -> int:
        loop.call_soon(step, n - 1)
        loop.run_forever()
        return count[0]

    run.expected = n  # type: ignore[attr-defined]
    return run


def call_later(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """N call_later timers, delays uniform in [0, 0.1) s, half of them (random) cancelled at once.

    The wall time includes waiting for the last timer (up to 0.1 s); compare CPU time.
    """
    n = _n(100_000, scale)
    rng = random.Random(SEED)
    delays = [rng.random() * 0.1 for _ in range(n)]
    cancel = sorted(rng.sample(range(n), n // 2))
    live = n - len(cancel)
    count = [0]

    def cb() -> None:
        count[0] += 1
        if count[0] == live:
            loop.stop()

    def run() -> int:
        later = loop.call_later
        handles = [later(d, cb) for d in delays]
        for i in cancel:
            handles[i].cancel()
        del handles
        loop.run_forever()
        return count[0]

    run.expected = live  # type: ignore[attr-defined]
    return run


def tasks_sleep0(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """N tasks gathered at once, each doing one ``await asyncio.sleep(0)``."""
    n = _n(100_000, scale)

    async def child() -> int:
        await asyncio.sleep(0)
        return 1

    async def main() -> int:
        return sum(await asyncio.gather(*[child() for _ in range(n)]))

    def run() -> int:
        return loop.run_until_complete(main())

    run.expected = n  # type: ignore[attr-defined]
    return run


QUEUE_PRODUCERS = 10
QUEUE_CONSUMERS = 10
QUEUE_MAXSIZE = 100


def queue(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """An asyncio.Queue(maxsize=100) moving N items from 10 producers to 10 consumers."""
    n = _n(1_000_000, scale)
    per_producer = n // QUEUE_PRODUCERS
    total = per_producer * QUEUE_PRODUCERS

    async def producer(q: asyncio.Queue[int | None]) -> None:
        for i in range(per_producer):
            await q.put(i)

    async def consumer(q: asyncio.Queue[int | None]) -> int:
        got = 0
        while True:
            item = await q.get()
            if item is None:
                return got
            got += 1

    async def main() -> int:
        q: asyncio.Queue[int | None] = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
        consumers = [asyncio.ensure_future(consumer(q)) for _ in range(QUEUE_CONSUMERS)]
        await asyncio.gather(*[producer(q) for _ in range(QUEUE_PRODUCERS)])
        for _ in range(QUEUE_CONSUMERS):
            await q.put(None)
        return sum(await asyncio.gather(*consumers))

    def run() -> int:
        return loop.run_until_complete(main())

    run.expected = total  # type: ignore[attr-defined]
    return run


TREE_BRANCHING = 6


def tree_depth(scale: int) -> int:
    # depth 6 = 6**6 = 46,656 leaves (55,987 tasks); --quick (scale 10) uses depth 5: 1/6 of it.
    return 6 if scale == 1 else 5 if scale <= 10 else 4


def task_tree(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """A recursive tree of tasks: each node gathers 6 children, down to depth 6; leaves return 1."""
    depth = tree_depth(scale)

    async def node(d: int) -> int:
        if d == 0:
            return 1
        return sum(await asyncio.gather(*[node(d - 1) for _ in range(TREE_BRANCHING)]))

    def run() -> int:
        return loop.run_until_complete(node(depth))

    run.expected = TREE_BRANCHING**depth  # type: ignore[attr-defined]
    return run


def sleep0(loop: asyncio.AbstractEventLoop, scale: int) -> Callable[[], Any]:
    """One coroutine doing ``await asyncio.sleep(0)`` N times in a tight loop."""
    n = _n(1_000_000, scale)

    async def main() -> int:
        s = asyncio.sleep
        for _ in range(n):
            await s(0)
        return n

    def run() -> int:
        return loop.run_until_complete(main())

    run.expected = n  # type: ignore[attr-defined]
    return run


Factory = Callable[[asyncio.AbstractEventLoop, int], Callable[[], Any]]

# name -> (factory, one-line description at full size)
WORKLOADS: dict[str, tuple[Factory, str]] = {
    "call_soon": (call_soon, "1,000,000 call_soon callbacks scheduled up front, then run"),
    "call_soon_chain": (
        call_soon_chain,
        "a 1,000,000-step chain: each callback call_soon's the next",
    ),
    "call_later": (
        call_later,
        "100,000 call_later timers, delays uniform in [0, 0.1) s, half cancelled",
    ),
    "tasks_sleep0": (tasks_sleep0, "100,000 tasks gathered, each awaits asyncio.sleep(0) once"),
    "queue": (queue, "asyncio.Queue(maxsize=100): 1,000,000 items, 10 producers -> 10 consumers"),
    "task_tree": (task_tree, "recursive gather tree, branching 6, depth 6 (46,656 leaf tasks)"),
    "sleep0": (sleep0, "await asyncio.sleep(0) 1,000,000 times in one coroutine"),
}

# The timers workload waits for its last timer, so its wall time is mostly a sleep: its ratio
# is taken on process CPU time. Every other workload keeps the loop busy: ratio on wall time.
RATIO_METRIC: dict[str, str] = {name: "wall" for name in WORKLOADS} | {"call_later": "cpu"}


# ---------------------------------------------------------------------------------------------
# subprocess entry points
# ---------------------------------------------------------------------------------------------


def _import_loop(name: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], Any]:
    module_name, attr, _ = LOOPS[name]
    module = importlib.import_module(module_name)
    return getattr(module, attr), module


def probe(name: str) -> dict[str, Any]:
    """Can this loop be imported and run a trivial coroutine? Which version, from where?"""
    import importlib.metadata
    import platform

    new_loop, module = _import_loop(name)
    _, _, dist = LOOPS[name]
    if dist is None:
        version = platform.python_version()
    else:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "?")
    info: dict[str, Any] = {
        "loop": name,
        "version": version,
        "file": getattr(module, "__file__", None),
        "python": sys.version.split()[0],
        "executable": sys.executable,
    }
    if name == "ferroloop":
        ext = importlib.import_module("ferroloop._ferroloop")
        info["ext_file"] = ext.__file__
        info["build_profile"] = getattr(ext, "BUILD_PROFILE", None)
    loop = new_loop()
    try:
        info["loop_type"] = f"{type(loop).__module__}.{type(loop).__qualname__}"

        async def hello() -> int:
            await asyncio.sleep(0)
            return 42

        if loop.run_until_complete(hello()) != 42:
            raise RuntimeError("trivial coroutine returned the wrong value")
    finally:
        loop.close()
    return info


def _one_pass(new_loop: Callable[[], asyncio.AbstractEventLoop], workload: str, scale: int):
    factory = WORKLOADS[workload][0]
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        run = factory(loop, scale)
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        result = run()
        t1 = time.perf_counter()
        c1 = time.process_time()
        if result != run.expected:  # type: ignore[attr-defined]
            raise AssertionError(f"{workload}: got {result!r}, expected {run.expected!r}")  # type: ignore[attr-defined]
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return t1 - t0, c1 - c0


def measure(name: str, workload: str, scale: int) -> dict[str, Any]:
    # 1. allocator steady state, the same for every loop
    block = bytearray(ALLOC_WARMUP_BYTES)
    del block
    new_loop, _ = _import_loop(name)
    # 2. warm-up at a tenth of the size, on its own loop
    _one_pass(new_loop, workload, scale * 10)
    # 3-4. the measured pass on a new loop
    wall, cpu = _one_pass(new_loop, workload, scale)
    return {
        "loop": name,
        "workload": workload,
        "scale": scale,
        "wall": wall,
        "cpu": cpu,
        "alloc_warmup_bytes": ALLOC_WARMUP_BYTES,
        "warmup_scale": scale * 10,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_probe = sub.add_parser("probe")
    p_probe.add_argument("loop", choices=LOOPS)
    p_measure = sub.add_parser("measure")
    p_measure.add_argument("workload", choices=WORKLOADS)
    p_measure.add_argument("loop", choices=LOOPS)
    p_measure.add_argument("scale", type=int)
    for p in (p_probe, p_measure):
        p.add_argument("--path", action="append", default=[], help="prepend DIR to sys.path")
    args = parser.parse_args(argv)
    sys.path[:0] = args.path
    try:
        if args.cmd == "probe":
            out = probe(args.loop)
        else:
            out = measure(args.loop, args.workload, args.scale)
    except BaseException as exc:  # report any failure as data, the parent makes a cell of it
        out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
