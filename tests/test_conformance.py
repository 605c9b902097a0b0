"""CPython's own asyncio tests, run against ferroloop: one pytest test per test module.

Each module runs through ``tests/conformance/runner.py`` in a subprocess.  A module's
test fails when

* a CPython test fails, errors, hangs or crashes and is not listed in
  ``tests/conformance/expected_failures.txt``;
* a listed test now passes, or no longer exists (the list must only shrink: the failure
  message says which lines to remove);
* the module as a whole crashes or runs out of its time budget.

Time: each module has a budget (``MODULE_BUDGET`` in the runner; a test running longer
than 15 s is killed as hung), and the whole session is capped at ``SESSION_BUDGET``
(12 minutes; env ``FERROLOOP_CONFORMANCE_SESSION_BUDGET``).  A normal run takes ~1-2
minutes.

Maintain the list with ``python tests/conformance/runner.py --loop ferroloop
--update-expected`` (reasons are written by a human).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_PATH = os.path.join(HERE, "conformance", "runner.py")


def _load_runner():
    spec = importlib.util.spec_from_file_location("_ferroloop_conformance_runner", RUNNER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()

# Hard cap (seconds) on the whole conformance session, on top of each module's own budget:
# a module gets min(its budget, what is left of this).
SESSION_BUDGET = float(os.environ.get("FERROLOOP_CONFORMANCE_SESSION_BUDGET", 720))
_session_deadline: list[float] = []


def _session_remaining() -> float:
    if not _session_deadline:
        _session_deadline.append(time.monotonic() + SESSION_BUDGET)
    return _session_deadline[0] - time.monotonic()


@functools.cache
def _ferroloop_unavailable() -> str | None:
    """Why ferroloop cannot be used in a fresh interpreter, or None if it can."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ferroloop; ferroloop.new_event_loop().close()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _describe(tid: str, rec: dict) -> str:
    text = f"  {rec['outcome']:7} {tid}\n          {rec.get('error', '')}"
    if rec.get("where"):
        text += f"\n          at {rec['where']}"
    if rec.get("test_where") and rec["test_where"] != rec.get("where"):
        text += f"\n          in {rec['test_where']}"
    return text


def _module_param(module: str):
    marks = [pytest.mark.timeout(runner.module_budget(module) + 90)]
    return pytest.param(module, id=module, marks=marks)


@pytest.mark.parametrize("module", [_module_param(m) for m in runner.ALL_MODULES])
def test_cpython_asyncio(module, tmp_path):
    unavailable = _ferroloop_unavailable()
    if unavailable:
        pytest.skip(f"ferroloop is not importable: {unavailable}")

    budget = min(runner.module_budget(module), _session_remaining())
    if budget < 5:
        pytest.fail(
            f"the conformance session budget ({SESSION_BUDGET:g}s) was used up by earlier "
            "modules; see their failures (or raise FERROLOOP_CONFORMANCE_SESSION_BUDGET)",
            pytrace=False,
        )
    out = tmp_path / "result.json"
    cmd = [sys.executable, RUNNER_PATH, "--loop", "ferroloop", "--json", str(out)]
    cmd += ["--timeout", str(budget), module]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=budget + 60)
    if not out.exists():
        pytest.fail(
            f"runner failed (exit status {proc.returncode}) before writing results:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    with open(out, encoding="utf-8") as f:
        result = json.load(f)["modules"][0]

    expected = runner.load_expected()
    cmp = runner.compare(result, expected)
    problems = []
    if result["status"] != "ok":
        problems.append(
            f"module {module} {result['status']}: {result['detail']}\n"
            f"--- output tail ---\n{result['log_tail'][-3000:]}"
        )
    if cmp["unexpected"]:
        problems.append(
            f"{len(cmp['unexpected'])} test(s) failed that are not in "
            f"tests/conformance/expected_failures.txt:\n"
            + "\n".join(_describe(tid, rec) for tid, rec in cmp["unexpected"])
        )
    if cmp["fixed"]:
        problems.append(
            f"{len(cmp['fixed'])} listed test(s) now pass; remove these lines from "
            "tests/conformance/expected_failures.txt:\n"
            + "\n".join(f"  {tid}  # {expected[tid]}" for tid in cmp["fixed"])
        )
    if cmp["stale"]:
        problems.append(
            f"{len(cmp['stale'])} listed test(s) no longer exist; remove these lines:\n"
            + "\n".join(f"  {tid}" for tid in cmp["stale"])
        )
    c = runner.counts(result)
    summary = (
        f"{module}: {c['ran']} ran, {c['passed']} passed, {c['failed']} failed, "
        f"{c['errors']} errors, {c['skipped']} skipped; {c['on_loop']} ran on a ferroloop "
        f"loop ({c['passed_on_loop']} passed)"
    )
    print(summary)
    if problems:
        pytest.fail(summary + "\n\n" + "\n\n".join(problems), pytrace=False)
