"""The benchmark driver's handling of a CPU the host slows during a measurement
(`benchmarks/network.py`): such a measurement is made again, and one kept is marked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import network  # noqa: E402


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The speed probe's answers after each measurement, in order (no wait before one)."""
    answers: list[list[int]] = []
    monkeypatch.setattr(network, "wait_quiet", lambda quiet: None)
    monkeypatch.setattr(network, "slowed_cpus", lambda quiet: answers.pop(0))
    return answers


def counting_run(outs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    made: list[dict[str, Any]] = []

    def run() -> dict[str, Any]:
        out = dict(outs[len(made)])
        made.append(out)
        return out

    return made, run


def test_a_measurement_a_cpu_was_slowed_by_the_end_of_is_made_again(probes):
    probes += [[0], []]
    quiet = network.Quiet(budget=60.0)
    made, run = counting_run([{"rps": 1.0}, {"rps": 2.0}])
    out = network.measure_unslowed(run, quiet)
    assert len(made) == 2
    assert out == {"rps": 2.0}
    assert (quiet.redone, quiet.kept_slowed, quiet.kept) == (1, 0, 1)
    assert quiet.budget < 60.0


def test_a_measurement_still_slowed_after_the_last_redo_is_kept_and_marked(probes):
    probes += [[1]] * (network.REDO_SLOWED + 1)
    quiet = network.Quiet(budget=60.0)
    made, run = counting_run([{"rps": float(i)} for i in range(network.REDO_SLOWED + 1)])
    out = network.measure_unslowed(run, quiet)
    assert len(made) == network.REDO_SLOWED + 1
    assert out["slowed"] is True
    assert (quiet.redone, quiet.kept_slowed, quiet.kept) == (network.REDO_SLOWED, 1, 1)


def test_with_no_budget_left_a_slowed_measurement_is_kept_and_marked(probes):
    probes += [[0]]
    quiet = network.Quiet(budget=0.0)
    made, run = counting_run([{"rps": 1.0}])
    out = network.measure_unslowed(run, quiet)
    assert len(made) == 1
    assert out["slowed"] is True
    assert (quiet.redone, quiet.kept_slowed, quiet.kept) == (0, 1, 1)


def test_a_failed_measurement_is_not_made_again(probes):
    quiet = network.Quiet(budget=60.0)
    made, run = counting_run([{"error": "server: boom"}])
    assert network.measure_unslowed(run, quiet) == {"error": "server: boom"}
    assert len(made) == 1
    assert probes == []
    assert quiet.kept == 0


def test_only_a_cell_that_kept_a_slowed_measurement_carries_the_mark():
    sample = {
        "rps": 1000.0,
        "p99_us": 10.0,
        "p50_us": 5.0,
        "requests": 1000,
        "server_cpu_s": 0.5,
        "duration_s": 1.0,
        "client_cpu_frac": 0.5,
        "client_cpu_s": 0.5,
        "machine_busy_s": 1.0,
    }
    clean = network.summarize([sample, sample])
    marked = network.summarize([sample, {**sample, "slowed": True}])
    assert network.SLOWED_MARK not in network._other_flag(clean)
    assert network.SLOWED_MARK in network._other_flag(marked)


def test_the_measurements_that_wait_count_each_ceiling_once_and_no_memory_workload():
    workloads = ["echo_protocol_tcp_1k_c10", "echo_streams_tcp_1k_c10", "mem_idle_tcp_c10000"]
    loops = ["asyncio", "ferroloop"]
    # protocol: both loops and the configuration's ceiling; streams: both loops.
    assert network.waiting_measurements(workloads, loops, reps=5) == 5 * (3 + 2)


def test_a_probe_that_found_no_cpu_slowed_stands_for_the_next_check(monkeypatch):
    took = [0.002, 0.002, 0.004, 0.004]  # per probe: CPU 0, then CPU 1
    monkeypatch.setattr(network, "probe_seconds", lambda cpu: took.pop(0))
    monkeypatch.setattr(network, "pick_cpus", lambda: (0, 1))
    quiet = network.Quiet(budget=60.0)
    assert network.slowed_cpus(quiet) == []
    assert network.slowed_cpus(quiet) == []  # straight after: not probed again
    assert len(took) == 2
    quiet.unslowed_at -= network.PROBE_FRESH  # once it is stale, the CPUs are probed again
    assert network.slowed_cpus(quiet) == [0, 1]
    assert took == []
