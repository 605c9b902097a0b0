"""The programs in examples/ behave the same on ferroloop as on the stdlib loop.

Each example is run as a subprocess twice: ``python examples/X.py`` (the stdlib
loop) and ``python -m ferroloop examples/X.py`` (ferroloop, installed as the
event loop policy by the runner).  Both runs must exit with status 0, print the
same output once measured timings are masked, and take the same wall time to
within 10%.  The examples are written to be deterministic (seeded random
numbers, no two timers due at nearly the same moment), so any difference is a
difference between the loops.

The stdlib half runs everywhere; the ferroloop half is skipped only when
``import ferroloop`` fails.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A measured duration, e.g. "executed in 1.00 seconds", "took 0.60 seconds",
# "after 2.10 seconds".  Planned durations ("sleeping for 0.4 seconds") are
# part of the deterministic output and stay unmasked.
TIMING = re.compile(r"\b(in|took|after) \d+\.\d+ seconds\b")

TOLERANCE = 0.10  # relative difference allowed between the two wall times
SUBPROCESS_TIMEOUT = 50  # seconds; every example should finish in about 1-3


@dataclass(frozen=True)
class Example:
    id: str
    script: str
    args: tuple[str, ...]
    # Lines (timings masked) that the stdlib run must print, in this order.
    expected: tuple[str, ...]


EXAMPLES = [
    Example(
        "countasync",
        "countasync.py",
        (),
        ("One", "One", "One", "Two", "Two", "Two", "countasync.py executed in <T> seconds."),
    ),
    Example(
        "rand",
        "rand.py",
        (),
        (
            "\033[36mInitiated makerandom(0).\033[0m",
            "\033[91m    Initiated makerandom(1).\033[0m",
            "\033[35m        Initiated makerandom(2).\033[0m",
            "\033[91m    ---> Finished: makerandom(1) == 10\033[0m",
            "\033[35m        ---> Finished: makerandom(2) == 9\033[0m",
            "\033[36m---> Finished: makerandom(0) == 10\033[0m",
            "r1: 10, r2: 10, r3: 9",
            "rand.py executed in <T> seconds.",
        ),
    ),
    Example(
        "chained",
        "chained.py",
        (),
        (
            "part1(1) sleeping for 1.0 seconds.",
            "part1(2) sleeping for 0.1 seconds.",
            "part1(3) sleeping for 0.7 seconds.",
            "-->Chained result2 => result2-2 derived from result2-1 (took <T> seconds).",
            "-->Chained result1 => result1-2 derived from result1-1 (took <T> seconds).",
            "-->Chained result3 => result3-2 derived from result3-1 (took <T> seconds).",
            "Program finished in <T> seconds.",
        ),
    ),
    Example(
        "asyncq-p5-c100",
        "asyncq.py",
        ("-p", "5", "-c", "100"),
        (
            "Producer 0 will make 4 items.",
            "Producer 4 will make 4 items.",
            "Consumer 0 got <0:290013>, processing it for 10 ms.",
            "Consumer 18 got <2:7e9a39>, processing it for 20 ms.",
            "All producers are done; waiting for the queue to drain.",
            "Queue drained; cancelling the consumers.",
            "Program completed in <T> seconds.",
        ),
    ),
    Example(
        "asyncq-p2-c3",
        "asyncq.py",
        ("--nprod", "2", "--ncon", "3"),
        (
            "Producer 0 will make 4 items.",
            "Producer 1 will make 2 items.",
            "Consumer 2 got <0:c5c57e>, processing it for 50 ms.",
            "Consumer 0 got <1:dc6594>, processing it for 25 ms.",
            "All producers are done; waiting for the queue to drain.",
            "Queue drained; cancelling the consumers.",
            "Program completed in <T> seconds.",
        ),
    ),
    Example(
        "hello_call_soon",
        "hello_call_soon.py",
        (),
        (
            "callbacks scheduled; running the loop",
            "slow_callback: blocking the loop for a second...",
            "slow_callback: done",
            "Hello World",
            "hello ran after <T> seconds.",
            "run_forever returned",
        ),
    ),
    Example(
        "call_later_reschedule",
        "call_later_reschedule.py",
        (),
        (
            "tick 1 after <T> seconds.",
            "tick 2 after <T> seconds.",
            "tick 3 after <T> seconds.",
            "tick 4 after <T> seconds.",
            "tick 5 after <T> seconds.",
            "stopping the loop after <T> seconds.",
            "run_forever returned",
        ),
    ),
    Example(
        "fib",
        "fib.py",
        (),
        ("fib(0) = 0", "fib(1) = 1", "fib(12) = 144", "1205 calls to fib()"),
    ),
    Example(
        "memoize",
        "memoize.py",
        (),
        (
            "round 1: slow_square of [3, 3, 4, 3]",
            "  computing slow_square(3) (takes 0.3 seconds)",
            "  computing slow_square(4) (takes 0.4 seconds)",
            "round 2: slow_square of [4, 3, 5]",
            "  computing slow_square(5) (takes 0.5 seconds)",
            "  the impatient caller timed out",
            "  the patient caller got 36",
            "  slow_square(-2) -> ValueError('negative numbers are not supported')",
            "6 computations in total",
        ),
    ),
    Example(
        "run_until_complete_call_later",
        "run_until_complete_call_later.py",
        (),
        (
            "main: going to sleep for 1.5 seconds",
            "callback 'first' fired after <T> seconds.",
            "callback 'second' fired after <T> seconds.",
            "main: woke up after <T> seconds.",
            "run_until_complete returned 42",
        ),
    ),
]


@dataclass(frozen=True)
class Run:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float  # wall time of the whole subprocess, seconds

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.command)}\n"
            f"exit status {self.returncode} after {self.elapsed:.3f} s\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


def mask(text: str) -> list[str]:
    return [TIMING.sub(r"\1 <T> seconds", line) for line in text.splitlines()]


def run(example: Example, *, ferroloop: bool) -> Run:
    command = [sys.executable]
    if ferroloop:
        command += ["-m", "ferroloop"]
    command += [f"examples/{example.script}", *example.args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    start = time.perf_counter()
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    elapsed = time.perf_counter() - start
    return Run(command, proc.returncode, proc.stdout, proc.stderr, elapsed)


def ferroloop_import_error() -> str | None:
    """Why ``import ferroloop`` fails for the interpreter running the tests, or None."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ferroloop"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


FERROLOOP_IMPORT_ERROR = ferroloop_import_error()
needs_ferroloop = pytest.mark.skipif(
    FERROLOOP_IMPORT_ERROR is not None,
    reason=f"ferroloop is not importable ({FERROLOOP_IMPORT_ERROR}); "
    "only the stdlib half of the example tests can run",
)
parametrize_examples = pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)


def assert_in_order(expected: tuple[str, ...], lines: list[str]) -> None:
    rest = iter(lines)
    for want in expected:
        assert any(line == want for line in rest), f"missing (or out of order): {want!r}"


@parametrize_examples
def test_example_on_stdlib(example: Example) -> None:
    """The example runs on the stdlib loop, prints what it should and takes 1-3 s."""
    std = run(example, ferroloop=False)
    assert std.returncode == 0, std.describe()
    assert std.stderr == "", std.describe()
    assert_in_order(example.expected, mask(std.stdout))
    assert 1.0 <= std.elapsed <= 3.5, std.describe()


@needs_ferroloop
@parametrize_examples
def test_example_on_ferroloop_matches_stdlib(example: Example) -> None:
    """Same exit status, same output (timings masked), same wall time within 10%.

    The wall times are of separate processes on a shared machine: a pair that differs by
    more is run again (up to three pairs), so only a difference that persists fails.
    """
    for _attempt in range(3):
        std = run(example, ferroloop=False)
        fer = run(example, ferroloop=True)
        assert std.returncode == 0, std.describe()
        assert fer.returncode == 0, fer.describe()
        assert mask(fer.stdout) == mask(std.stdout), fer.describe()
        assert mask(fer.stderr) == mask(std.stderr), fer.describe()
        difference = abs(fer.elapsed - std.elapsed)
        if difference <= TOLERANCE * std.elapsed:
            break
    assert difference <= TOLERANCE * std.elapsed, (
        f"wall time {fer.elapsed:.3f} s on ferroloop vs {std.elapsed:.3f} s on the stdlib loop "
        f"(differs by {difference / std.elapsed:.1%}, allowed {TOLERANCE:.0%})"
    )


RUNNER_PROBE = """\
import asyncio
import sys

import ferroloop


async def main():
    return asyncio.get_running_loop()


loop = asyncio.run(main())
print(isinstance(loop, ferroloop.Loop), __name__, sys.argv[1:])
loop = asyncio.new_event_loop()
print(isinstance(loop, ferroloop.Loop))
loop.close()
"""


@needs_ferroloop
def test_runner_gives_scripts_a_ferroloop_loop(tmp_path: Path) -> None:
    """`python -m ferroloop script.py` really runs the script on ferroloop.

    Without this, the comparisons above could pass with both runs on the stdlib loop.
    """
    script = tmp_path / "probe.py"
    script.write_text(RUNNER_PROBE)
    proc = subprocess.run(
        [sys.executable, "-m", "ferroloop", str(script), "a", "b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True __main__ ['a', 'b']", "True"], proc.stderr
