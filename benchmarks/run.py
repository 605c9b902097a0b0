#!/usr/bin/env python3
"""Side-by-side benchmarks of asyncio event loops: asyncio, uvloop, rloop, rsloop, ferroloop.

In-process workloads (benchmarks/workloads.py) and network workloads (benchmarks/network.py:
echo servers from benchmarks/servers.py under load from the Rust client benchmarks/loadgen,
with a plain-Rust echo server as the ceiling; an HTTP server under wrk, with a plain-Rust HTTP
ceiling; the memory per idle connection); see benchmarks/README.md. --write-results also
draws benchmarks/results.png (benchmarks/chart.py). Every (workload, loop, repetition) runs
in fresh subprocesses, interleaved: for each workload, for each repetition, every loop once in
a fixed order (A B C D E, A B C D E, ...).

The peers live in the benchmark's own virtualenv, benchmarks/.venv. This script re-executes
itself under benchmarks/.venv/bin/python; if that venv does not exist it first runs
benchmarks/setup.sh to create it (--no-setup: stop and say so instead). When the venv's
ferroloop is older than the checkout's sources, setup.sh --ferroloop-only reinstalls it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
SETUP = HERE / "setup.sh"
WORKER = HERE / "workloads.py"
RESULTS = HERE / "RESULTS.md"
# Hand-written profiles of the rows where ferroloop is behind, appended to RESULTS.md.
NOTES = HERE / "NOTES.md"
CHART = HERE / "results.png"
RSLOOP_FAILED = VENV / "rsloop-install.failed"
ORIG_CMD_ENV = "FERROLOOP_BENCH_CMD"

sys.path.insert(0, str(HERE))
import chart  # noqa: E402
import network  # noqa: E402
from network import FULL_NET_WORKLOADS, NET_WORKLOADS, QUICK_NET_WORKLOADS  # noqa: E402
from workloads import (  # noqa: E402
    ALLOC_WARMUP_BYTES,
    LOOPS,
    QUEUE_MAXSIZE,
    RATIO_METRIC,
    SEED,
    WORKLOADS,
    tree_depth,
)

REFERENCE = "ferroloop"
# Environment variables that would change what is measured (debug mode, another allocator).
SCRUBBED_ENV = ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTHONMALLOC", "PYTHONMALLOCSTATS")

NOT_YET_MEASURED = (
    "**Not yet measured**: UDP; TLS handshake rates (the TLS workloads handshake during the "
    "warm-up and measure the encrypted echo); pipelined or multi-message-in-flight echo; "
    "pipelined HTTP (wrk sends one request at a time per connection), HTTP over TLS or Unix "
    "sockets, and HTTP with request or response bodies of any size; memory per connection "
    "under load (only idle connections are measured) and for the streams and sock_* servers."
)


# ---------------------------------------------------------------------------------------------
# the interpreter: re-execute under benchmarks/.venv
# ---------------------------------------------------------------------------------------------


def in_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


def ensure_venv(args: argparse.Namespace) -> None:
    """Re-execute this script under the benchmark venv (creating it with setup.sh if needed)."""
    os.environ.setdefault(ORIG_CMD_ENV, shlex.join(sys.orig_argv))
    if args.no_venv or in_venv():
        return
    if not VENV_PYTHON.exists():
        if args.no_setup:
            sys.exit(
                f"run.py: {VENV} does not exist; run benchmarks/setup.sh first "
                "(or drop --no-setup, or measure the current interpreter with --no-venv)"
            )
        print(f"run.py: {VENV} does not exist; running {SETUP}", file=sys.stderr, flush=True)
        subprocess.run(["bash", str(SETUP)], check=True)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------
# subprocesses
# ---------------------------------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONHASHSEED"] = "0"
    return env


def run_worker(cmd: list[str], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, str(WORKER), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=worker_env(),
            cwd=HERE,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    if proc.returncode != 0 and "error" not in out:
        out["error"] = f"exit {proc.returncode}"
    return out


def run_measure(cmd: list[str], timeout: float) -> dict[str, Any]:
    """`run_worker`, plus `other_load`: the CPU every other process used meanwhile, as a
    share of one core (`/proc/stat` busy time, steal included, minus the worker's)."""
    try:
        busy0, kids0 = network.machine_busy_seconds(), network.children_cpu_seconds()
    except (OSError, ValueError):
        busy0 = kids0 = None
    t0 = time.perf_counter()
    out = run_worker(cmd, timeout)
    took = time.perf_counter() - t0
    if busy0 is not None and kids0 is not None and "error" not in out:
        other = network.machine_busy_seconds() - busy0 - (network.children_cpu_seconds() - kids0)
        out["other_load"] = max(other, 0.0) / took
    return out


def path_args(loop: str, args: argparse.Namespace) -> list[str]:
    if loop == REFERENCE and args.ferroloop_path:
        return ["--path", str(Path(args.ferroloop_path).resolve())]
    return []


def probe(loop: str, args: argparse.Namespace) -> dict[str, Any]:
    info = run_worker(["probe", loop, *path_args(loop, args)], timeout=60)
    if "error" in info:
        reason = info["error"]
        if reason.startswith("ModuleNotFoundError"):
            reason = f"not installed ({reason})"
            if loop == "rsloop" and RSLOOP_FAILED.exists() and in_venv():
                lines = RSLOOP_FAILED.read_text(errors="replace").strip().splitlines()
                why = lines[-1] if lines else "?"
                reason = f"not installed: its build failed in setup.sh ({why}); see {RSLOOP_FAILED}"
        info["error"] = reason
    return info


def ferroloop_staleness(info: dict[str, Any]) -> list[str]:
    """Reasons why the ferroloop being measured is not the checkout's current code."""
    reasons: list[str] = []
    ext = Path(info["ext_file"])
    sources = [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "pyproject.toml"]
    sources += list((ROOT / "src").rglob("*.rs"))
    newest = max((p for p in sources if p.exists()), key=lambda p: p.stat().st_mtime, default=None)
    if newest is not None and newest.stat().st_mtime > ext.stat().st_mtime:
        reasons.append(f"{newest.relative_to(ROOT)} is newer than the extension {ext}")
    installed = Path(info["file"]).parent
    checkout = ROOT / "python" / "ferroloop"
    if installed.resolve() != checkout.resolve():
        for src in sorted(checkout.glob("*.py")):
            dst = installed / src.name
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                reasons.append(f"{installed / src.name} differs from python/ferroloop/{src.name}")
    return reasons


# ---------------------------------------------------------------------------------------------
# facts about the machine and the checkout
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout?)"
    return f"{rev}-dirty" if dirty else rev


def dist_version(dist: str) -> str:
    """The installed version of a distribution in this interpreter, or "not installed"."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def speedup(peer: float, ref: float) -> str:
    return f"{peer / ref:.2f}×"


def workload_size(workload: str, scale: int) -> str:
    desc = WORKLOADS[workload][1]
    if scale == 1:
        return desc
    if workload == "task_tree":
        d = tree_depth(scale)
        return f"{desc}; scaled: depth {d} ({6**d:,} leaf tasks)"
    return f"{desc}; scaled: sizes ÷{scale}"


def summarize(samples: list[dict[str, Any]]) -> dict[str, float]:
    walls = [s["wall"] for s in samples]
    cpus = [s["cpu"] for s in samples]
    others = [s.get("other_load", float("nan")) for s in samples]
    return {
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_median": statistics.median(cpus),
        "cpu_min": min(cpus),
        "cpu_max": max(cpus),
        "other_median": statistics.median(others),
        "other_max": max(others),
        "slowed": sum(bool(s.get("slowed")) for s in samples),
        "n": len(samples),
    }


def workload_table(
    workload: str,
    loops: list[str],
    stats: dict[tuple[str, str], dict[str, float]],
    errors: dict[tuple[str, str], str],
) -> list[str]:
    metric = RATIO_METRIC[workload]
    ref = stats.get((workload, REFERENCE))
    head = (
        "| loop | wall median (ms) | wall min | wall max | CPU median (ms) | CPU min | CPU max "
        f"| other load median / max | ferroloop speedup ({metric}) |"
    )
    rows = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for loop in loops:
        key = (workload, loop)
        if key in errors:
            rows.append(f"| {loop} | error: {errors[key]} | | | | | | | |")
            continue
        s = stats[key]
        if loop == REFERENCE:
            ratio = "(reference)"
        elif ref is None:
            ratio = "n/a"
        else:
            ratio = speedup(s[f"{metric}_median"], ref[f"{metric}_median"])
        rows.append(
            f"| {loop} | {ms(s['wall_median'])} | {ms(s['wall_min'])} | {ms(s['wall_max'])} "
            f"| {ms(s['cpu_median'])} | {ms(s['cpu_min'])} | {ms(s['cpu_max'])} "
            f"| {s['other_median']:.0%} / {s['other_max']:.0%}{other_flag(s)} | {ratio} |"
        )
    return rows


def other_flag(s: dict[str, float]) -> str:
    return (" §" if s["other_median"] > network.OTHER_LOAD else "") + network.slowed_flag(s)


def ratio_table(
    workloads: list[str],
    loops: list[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[str]:
    peers = [loop for loop in loops if loop != REFERENCE]
    rows = [
        "| workload (metric) | " + " | ".join(f"vs {p}" for p in peers) + " |",
        "|---|" + "--:|" * len(peers),
    ]
    for w in workloads:
        metric = RATIO_METRIC[w]
        ref = stats.get((w, REFERENCE))
        cells = []
        for p in peers:
            peer = stats.get((w, p))
            if ref is None or peer is None:
                cells.append("n/a")
            else:
                cells.append(speedup(peer[f"{metric}_median"], ref[f"{metric}_median"]))
        rows.append(f"| {w} ({metric}) | " + " | ".join(cells) + " |")
    return rows


def behind(
    workloads: list[str],
    loops: list[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[tuple[str, str, str, float]]:
    """(workload, peer, metric, speedup) wherever ferroloop's median is slower than a peer's."""
    rows = []
    for w in workloads:
        metric = RATIO_METRIC[w]
        ref = stats.get((w, REFERENCE))
        for p in loops:
            peer = stats.get((w, p))
            if p == REFERENCE or ref is None or peer is None:
                continue
            ratio = peer[f"{metric}_median"] / ref[f"{metric}_median"]
            if ratio < 1.0:
                rows.append((w, p, metric, ratio))
    return rows


def behind_section(rows: list[tuple[str, str, str, float]], notes: bool = True) -> list[str]:
    """Where this run has ferroloop behind a peer, then (`notes`) the profiles in NOTES.md."""
    out = ["## Where ferroloop is behind", ""]
    if rows:
        out += [
            "Every (workload, peer) of this run where ferroloop's median is behind the peer's "
            "(ratio < 1; the workload's metric, server CPU per request where a load generator "
            "was the limit). Under 10 % is within this machine's run-to-run noise: rerun those "
            "before reading anything into them.",
            "",
            "| workload | peer | metric | ferroloop ÷ peer (> 1 = ferroloop better) | |",
            "|---|---|---|--:|---|",
        ]
        for name, peer, metric, ratio in sorted(rows, key=lambda r: r[3]):
            noise = "within noise" if ratio >= 0.9 else "**behind**"
            out.append(f"| {name} | {peer} | {metric} | {ratio:.2f}× | {noise} |")
    else:
        out.append("Nowhere: ferroloop's median is at least every peer's on every workload.")
    out.append("")
    if notes and NOTES.exists():
        out += [NOTES.read_text(encoding="utf-8").strip(), ""]
    return out


RATIO_NOTE = (
    "**ferroloop speedup** = the peer's median ÷ ferroloop's median on the workload's metric: "
    "**> 1 means ferroloop is faster**, < 1 means ferroloop is slower. The metric is wall time, "
    "except `call_later` (process CPU time, because its wall time includes waiting up to "
    "0.1 s for the last timer)."
)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Side-by-side asyncio event-loop benchmarks (in-process workloads).",
        epilog="See benchmarks/README.md.",
    )
    p.add_argument("--quick", action="store_true", help="sizes ÷10, 3 repetitions (default 5)")
    p.add_argument("--reps", type=int, help="repetitions per (workload, loop)")
    p.add_argument("--loops", default=",".join(LOOPS), help="comma-separated (default: all)")
    p.add_argument(
        "--workloads",
        help="comma-separated names or shell patterns, e.g. 'sleep0,echo_protocol_*' "
        "(default: every in-process workload, and every network workload; --quick: a subset)",
    )
    p.add_argument(
        "--suite",
        choices=("all", "inprocess", "network"),
        default="all",
        help="which workloads to run (default: all)",
    )
    p.add_argument(
        "--net-reps", type=int, help="repetitions per network (workload, loop) (default 5; quick 3)"
    )
    p.add_argument(
        "--net-warmup", type=float, help="seconds of load before measuring (default 0.5; quick 0.2)"
    )
    p.add_argument(
        "--net-duration", type=float, help="seconds measured per cell (default 1.0; quick 0.5)"
    )
    p.add_argument(
        "--quiet-budget",
        "--net-quiet-budget",
        dest="quiet_budget",
        type=float,
        default=120,
        help="seconds a run may spend in all waiting, before each measurement, for other "
        "processes to leave the CPUs idle (default 120; 0: never wait)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    p.add_argument("--write-results", action="store_true", help=f"write {RESULTS}")
    p.add_argument(
        "--allow-debug", action="store_true", help="measure a debug build of ferroloop anyway"
    )
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="measure ferroloop even if it is older than the checkout (no reinstall)",
    )
    p.add_argument(
        "--ferroloop-path",
        metavar="DIR",
        help="import ferroloop from DIR (e.g. python/ of an editable build) instead of the venv",
    )
    p.add_argument("--no-venv", action="store_true", help="run under this interpreter as is")
    p.add_argument(
        "--no-setup", action="store_true", help="never run setup.sh (no venv creation/reinstall)"
    )
    args = p.parse_args(argv)
    args.loops = [x for x in args.loops.split(",") if x]
    for x in args.loops:
        if x not in LOOPS:
            p.error(f"unknown loop {x!r}; choose from {', '.join(LOOPS)}")
    default_net = QUICK_NET_WORKLOADS if args.quick else FULL_NET_WORKLOADS
    if args.workloads is None:
        inproc, net = list(WORKLOADS), default_net
    else:
        inproc, net = [], []
        for pat in (x for x in args.workloads.split(",") if x):
            hits_in = [w for w in WORKLOADS if fnmatch.fnmatchcase(w, pat)]
            hits_net = [w for w in NET_WORKLOADS if fnmatch.fnmatchcase(w, pat)]
            if not hits_in and not hits_net:
                p.error(
                    f"unknown workload {pat!r}; choose from {', '.join(WORKLOADS)}, "
                    f"or network workloads like echo_protocol_tcp_1k_c10 "
                    f"(echo_{{{','.join(network.KINDS)}}}_{{{','.join(network.TRANSPORTS)}}}"
                    f"_{{{','.join(network.SIZES)}}}_c{{{','.join(map(str, network.CONNS))}}}), "
                    f"http_tcp_c{{{','.join(map(str, network.HTTP_CONNS))}}}, "
                    f"mem_idle_tcp_c{{{','.join(map(str, network.MEM_CONNS))}}}"
                )
            inproc += [w for w in hits_in if w not in inproc]
            net += [w for w in hits_net if w not in net]
        inproc = [w for w in WORKLOADS if w in inproc]  # canonical order
        net = [w for w in NET_WORKLOADS if w in net]
    args.workloads = inproc if args.suite != "network" else []
    args.net_workloads = net if args.suite != "inprocess" else []
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.net_reps is None:
        # Five, not three: single cells of this machine vary by up to 40 %, and a median of
        # three let one slow repetition decide a row's ratio.
        args.net_reps = 3 if args.quick else 5
    if args.net_warmup is None:
        args.net_warmup = 0.2 if args.quick else 0.5
    if args.net_duration is None:
        args.net_duration = 0.5 if args.quick else 1.0
    args.scale = 10 if args.quick else 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_venv(args)
    command = os.environ[ORIG_CMD_ENV]
    started = dt.datetime.now(dt.UTC)
    # Taken before the run writes RESULTS.md and the chart, which would mark it dirty.
    revision = git_revision()
    load_before = loadavg()

    # which loops can run here, and which versions
    infos: dict[str, dict[str, Any]] = {}
    for loop in args.loops:
        infos[loop] = probe(loop, args)
    ferro = infos.get(REFERENCE)
    warnings: list[str] = []
    may_install = in_venv() and not (args.no_setup or args.allow_stale or args.ferroloop_path)
    if ferro is not None and may_install:
        why = ferro.get("error") or next(iter(ferroloop_staleness(ferro)), None)
        if why is not None:
            print(f"run.py: the venv's ferroloop needs (re)installing: {why}", flush=True)
            subprocess.run(["bash", str(SETUP), "--ferroloop-only"], check=True)
            ferro = infos[REFERENCE] = probe(REFERENCE, args)
    if ferro is not None and "error" not in ferro:
        stale = ferroloop_staleness(ferro)
        if stale:
            warnings.append("ferroloop may be stale: " + "; ".join(stale))
        profile = ferro.get("build_profile")
        if profile != "release":
            msg = (
                f"ferroloop's extension is not a release build (BUILD_PROFILE = {profile!r}, "
                f"{ferro['ext_file']})"
            )
            if not args.allow_debug:
                print(
                    f"run.py: refusing to run: {msg}; pass --allow-debug to measure it anyway",
                    file=sys.stderr,
                )
                return 2
            warnings.append(msg + ": measured anyway (--allow-debug), numbers are not meaningful")
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)

    available = [loop for loop in args.loops if "error" not in infos[loop]]
    print(f"# interpreter: {sys.executable} (Python {platform.python_version()})")
    for loop in args.loops:
        i = infos[loop]
        where = i.get("error") or f"{i['version']}  {i['loop_type']}  {i['file']}"
        print(f"# {loop:9} {where}")
    print(f"# load average before: {load_before}")
    if args.workloads:
        print(
            f"# in-process: {len(args.workloads)} workloads, {args.reps} reps, sizes ÷{args.scale}"
        )
    quiet = network.Quiet(budget=args.quiet_budget)
    net = None
    if args.net_workloads:
        server_cpu, client_cpu = network.pick_cpus()
        net = network.NetOptions(
            warmup=args.net_warmup,
            duration=args.net_duration,
            server_cpu=server_cpu,
            client_cpu=client_cpu,
            extra_path=[str(Path(args.ferroloop_path).resolve())] if args.ferroloop_path else [],
            env=worker_env(),
            quiet=quiet,
        )
        print(
            f"# network: {len(args.net_workloads)} workloads, {args.net_reps} reps, "
            f"{args.net_warmup:g} s warm-up + {args.net_duration:g} s measured per cell, "
            f"server on CPU {server_cpu}, load generator on CPU {client_cpu}"
        )

    # The network half's share of the quiet budget, in proportion to its measurements, is
    # kept from the in-process half: on a host that is slowed most of the time the first
    # half would otherwise spend it all.
    n_inproc = len(args.workloads) * args.reps * len(args.loops)
    n_net = network.waiting_measurements(args.net_workloads, args.loops, args.net_reps)
    net_share = args.quiet_budget * n_net / max(n_inproc + n_net, 1)
    quiet.budget -= net_share

    # in-process workloads
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], str] = {}
    for loop in args.loops:
        if loop not in available:
            for w in args.workloads:
                errors[(w, loop)] = infos[loop]["error"]
    for w in args.workloads:
        for rep in range(args.reps):
            for loop in available:
                key = (w, loop)
                if key in errors:  # failed once: don't retry
                    continue
                cmd = ["measure", w, loop, str(args.scale), *path_args(loop, args)]
                once = functools.partial(run_measure, cmd, args.timeout)
                out = network.measure_unslowed(once, quiet)
                if "error" in out:
                    errors[key] = out["error"]
                    print(f"  {w:16} rep {rep + 1}  {loop:9}  error: {out['error']}", flush=True)
                    continue
                assert out["alloc_warmup_bytes"] == ALLOC_WARMUP_BYTES
                samples.setdefault(key, []).append(out)
                other = out.get("other_load", 0.0)
                busy = f"  (other load {other:.0%})" if other > network.OTHER_LOAD else ""
                print(
                    f"  {w:16} rep {rep + 1}  {loop:9}  wall {ms(out['wall']):>9} ms"
                    f"  cpu {ms(out['cpu']):>9} ms{busy}",
                    flush=True,
                )
    stats = {k: summarize(v) for k, v in samples.items() if k not in errors}
    for k in list(samples):
        if k in errors:  # a loop that failed any repetition gets an error cell, not partial stats
            errors[k] += f" (after {len(samples[k])} good repetition(s))"

    quiet.budget += net_share

    # network workloads
    net_stats: dict[tuple[str, str], dict[str, float]] = {}
    net_errors: dict[tuple[str, str], str] = {}
    if net is not None:
        unavailable = {loop: infos[loop]["error"] for loop in args.loops if loop not in available}
        why = network.ensure_loadgen()
        if why is not None:
            print(f"run.py: {why}", file=sys.stderr)
            unavailable = dict.fromkeys([*args.loops, network.CEILING], why)
        net_samples, net_errors = network.run_all(
            args.net_workloads, args.loops, unavailable, args.net_reps, net
        )
        net_stats = {k: network.summarize(v) for k, v in net_samples.items()}
    load_after = loadavg()
    finished = dt.datetime.now(dt.UTC)

    inproc_report = ""
    if args.workloads:
        tables: list[str] = []
        for w in args.workloads:
            tables += [f"### {w}", "", workload_size(w, args.scale), ""]
            tables += workload_table(w, args.loops, stats, errors)
            tables.append("")
        ratios = ["### ferroloop speedup, all in-process workloads", "", RATIO_NOTE, ""]
        ratios += ratio_table(args.workloads, args.loops, stats)
        inproc_report = "\n".join([*tables, *ratios]) + "\n"
    net_report = ""
    if args.net_workloads:
        lines = []
        if any(network.NET_WORKLOADS[w].family == "echo" for w in args.net_workloads):
            lines += [NET_TABLE_NOTE, ""]
        lines += network.config_tables(args.net_workloads, args.loops, net_stats, net_errors)
        lines += network.mem_tables(args.net_workloads, args.loops, net_stats, net_errors)
        lines += network.ratio_tables(args.net_workloads, args.loops, net_stats)
        net_report = "\n".join(lines)
    print()
    if inproc_report:
        print("## In-process workloads (times in ms)\n")
        print(inproc_report)
    if net_report:
        print("## Network workloads\n")
        print(net_report)
    behind_rows = behind(args.workloads, args.loops, stats) if args.workloads else []
    if args.net_workloads:
        behind_rows += network.behind(args.net_workloads, args.loops, net_stats)
    print("\n".join(behind_section(behind_rows, notes=False)))
    print(f"load average after: {load_after}")

    if args.write_results:
        groups = inproc_chart_groups(args.workloads, args.loops, stats)
        groups += network.chart_groups(args.net_workloads, args.loops, net_stats)
        why = chart.write_chart(CHART, args.loops, groups, CHART_TITLE, CHART_CAPTION)
        if why is None:
            print(f"wrote {CHART}")
        else:
            print(f"run.py: no chart: {why}", file=sys.stderr)
        RESULTS.write_text(
            results_md(
                args,
                command,
                infos,
                warnings,
                inproc_report,
                net_report,
                net,
                quiet,
                load_before,
                load_after,
                revision,
                started,
                finished,
                behind_rows,
                chart_written=why is None,
            )
        )
        print(f"wrote {RESULTS}")
    return 0


CHART_TITLE = "Each loop relative to uvloop (= 1.0): higher is better"
CHART_CAPTION = (
    "Medians of this run (RESULTS.md has the numbers). In-process: uvloop's time ÷ the loop's "
    "(wall time; CPU time for call_later). Echo and HTTP: the loop's requests/s ÷ uvloop's; "
    "rows marked ‡ (CPU/req), where a load generator used > 90 % of its core in some loop's "
    "cell: uvloop's server CPU per request ÷ the loop's. Memory: uvloop's bytes per idle "
    "connection ÷ the loop's. n/a: the loop failed the workload or is unavailable (see the "
    "tables). The plain-Rust ceilings are in the tables only."
)


def inproc_chart_groups(
    workloads: list[str], loops: list[str], stats: dict[tuple[str, str], dict[str, float]]
) -> list[chart.Group]:
    """The chart's bar groups for the in-process workloads: uvloop's median time ÷ the loop's,
    on each workload's ratio metric (wall time; CPU time for call_later)."""
    groups = []
    for w in workloads:
        metric = RATIO_METRIC[w]
        values = {
            loop: stats[(w, loop)][f"{metric}_median"] if (w, loop) in stats else None
            for loop in loops
        }
        label = w if metric == "wall" else f"{w} (CPU time)"
        groups.append(chart.Group("in-process", label, chart.normalise(values, False)))
    return groups


NET_TABLE_NOTE = (
    "One table per transport, message size and number of connections; rows: how the echo is "
    "written (kind) × loop, then the plain-Rust echo server (the ceiling). req/s: echoed "
    "messages per second (one message in flight per connection). p99 latency: median over the "
    "repetitions of each run's 99th percentile, send of the first byte to receipt of the last. "
    "Server CPU / req: the server process's CPU time (user + system, all threads, "
    "`/proc/PID/stat`) over the measured window ÷ the requests in it. Server CPU / client "
    "CPU: share of one core over the window. Other load: CPU time used by every other process "
    "on the machine during the window (`/proc/stat` busy time minus the server's and the "
    "client's), as a share of one core; **§** marks a median above 25 %: those cells shared "
    "their cores and are less reliable; **¶**: a repetition kept was measured while a CPU was "
    "slowed (see below). **‡**: the load generator used more than 90 % of its "
    "core, so that cell's req/s is capped by the client. Ratios are ferroloop's against the "
    "peer in the same kind: > 1 means ferroloop is better (more req/s, less CPU per request)."
)


QUIET_NOTE = (
    f"Before each measurement the driver samples the machine's busy CPU for "
    f"{network.QUIET_SAMPLE:g} s and, while other processes keep more than "
    f"{network.QUIET_CORES:g} of a core busy, waits (at most {network.QUIET_MAX_PER_CELL:g} s "
    "per measurement and the run's budget in all, of which the in-process half may use its "
    "share by number of measurements; see Run above). It also waits while a fixed "
    f"piece of work ({network.SPEED_PROBE_N:,} additions in Python, best of 3, on each "
    f"benchmark CPU) takes more than {network.SLOW_CPU:g}× the shortest it took in the run: "
    "the host's other guests can slow a CPU without it showing as busy or stolen time. A "
    "measurement after which that probe finds a CPU slowed is discarded and made again (at "
    f"most {network.REDO_SLOWED} times, within the same budget); **{network.SLOWED_MARK}** "
    "marks a cell that kept one measured while a CPU was still slowed."
)


def results_md(
    args: argparse.Namespace,
    command: str,
    infos: dict[str, dict[str, Any]],
    warnings: list[str],
    inproc_report: str,
    net_report: str,
    net: network.NetOptions | None,
    quiet: network.Quiet,
    load_before: str,
    load_after: str,
    revision: str,
    started: dt.datetime,
    finished: dt.datetime,
    behind_rows: list[tuple[str, str, str, float]],
    chart_written: bool = False,
) -> str:
    uname = platform.uname()
    libc = " ".join(platform.libc_ver()) or "?"
    versions = ["| loop | version | loop class | imported from |", "|---|---|---|---|"]
    for loop in args.loops:
        i = infos[loop]
        if "error" in i:
            versions.append(f"| {loop} | unavailable: {i['error']} | | |")
        else:
            versions.append(f"| {loop} | {i['version']} | `{i['loop_type']}` | `{i['file']}` |")
    ferro = infos.get(REFERENCE, {})
    mode = "--quick" if args.quick else "full"
    run_lines = [
        f"- command: `{command}`",
        f"- git revision at the start: `{revision}` (`-dirty`: tracked files had changes)",
        f"- started {started:%Y-%m-%d %H:%M:%S} UTC, finished {finished:%H:%M:%S} UTC",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
    ]
    if inproc_report:
        run_lines.append(
            f"- in-process: mode {mode}, sizes ÷{args.scale}, {args.reps} repetitions per "
            "(workload, loop)"
        )
    if net is not None:
        run_lines.append(
            f"- network: mode {mode}, {len(args.net_workloads)} workloads, {args.net_reps} "
            f"repetitions per (workload, loop), {net.warmup:g} s warm-up + {net.duration:g} s "
            f"measured per repetition; servers pinned to CPU {net.server_cpu}, the load "
            f"generator to CPU {net.client_cpu}; load generator built with "
            f"{network.rustc_version()}"
        )
    run_lines.append(
        f"- waited {quiet.waited:.0f} s in all (before {quiet.waits} measurement(s), budget "
        f"{args.quiet_budget:g} s) for other processes to leave the CPUs idle, "
        f"{quiet.slow_waits} of those for a slowed CPU; made {quiet.redone} measurement(s) "
        f"again (within the same budget) because a CPU was slowed by their end, and "
        f"kept {quiet.kept_slowed} of {quiet.kept} measured on a slowed CPU "
        f"({network.SLOWED_MARK})"
    )
    alloc_note = (
        f"- Allocator warm-up: before anything else, every measuring subprocess (in-process "
        f"workers and the Python echo servers alike) allocated and freed one "
        f"{ALLOC_WARMUP_BYTES // (1 << 20)} MiB block (`bytearray(1 << 20)`, then `del`), the "
        "same for every loop, so the allocator is in a long-running-server steady state (with "
        "glibc: the dynamic mmap threshold raised to 1 MiB, the trim threshold to 2 MiB)."
    )
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run.py --write-results`; see `benchmarks/README.md` for what "
        "each workload measures and how to run it.",
        "",
        *(
            [
                f"![{CHART_TITLE}](results.png)",
                "",
                f"*{CHART_CAPTION}*",
                "",
            ]
            if chart_written
            else []
        ),
        *(f"> **WARNING:** {w}" for w in warnings),
        "",
        "## Run",
        "",
        *run_lines,
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores",
        f"- kernel: {uname.system} {uname.release} ({uname.machine}), libc: {libc}",
        f"- Python: {platform.python_implementation()} {sys.version.split()[0]} "
        f"(`{sys.executable}`)",
        "",
        "## Loops",
        "",
        *versions,
        "",
        f"ferroloop extension: `{ferro.get('ext_file', '?')}`, "
        f"BUILD_PROFILE = `{ferro.get('build_profile')}`.",
        "",
        "## Method",
        "",
        alloc_note,
        "- `PYTHONASYNCIODEBUG`, `PYTHONDEVMODE`, `PYTHONMALLOC` are unset in the subprocesses; "
        "`PYTHONHASHSEED=0`.",
        "- min/max show the spread; with few repetitions on a shared machine, treat "
        "differences under ~10 % as noise.",
    ]
    if inproc_report:
        lines += [
            "",
            "In-process workloads:",
            "",
            "- Each (workload, loop, repetition) is a fresh subprocess of the same interpreter, "
            "so no GC or allocator state carries over between loops. Order: for each workload, "
            "for each repetition, every loop once (A B C D E, A B C D E, ...).",
            "- Warm-up: the same workload at a tenth of its size, on a separate loop, then "
            "`gc.collect()`; the measured pass runs on a new loop. The cyclic GC stays enabled.",
            "- Timed: from scheduling the first callback / creating the first coroutine to the "
            "result; loop creation and closing are not timed. Results are checked (callback "
            "counts, sums).",
            "- Wall = `time.perf_counter`; CPU = `time.process_time` (user + system, whole "
            "process, all threads).",
            f"- {QUIET_NOTE} Other load in the tables: CPU time every other process used while "
            "the worker ran (`/proc/stat` busy time, steal included, minus the worker's), as a "
            "share of one core; **§** marks a median above 25 %, **¶** a repetition kept while a "
            "CPU was slowed.",
            f"- Fixed parameters: random seed {SEED}, queue maxsize {QUEUE_MAXSIZE}.",
        ]
    if net is not None:
        lines += [
            "",
            "Network workloads:",
            "",
            "- Each (workload, loop, repetition) is a fresh server process "
            "(`benchmarks/servers.py KIND LOOP ADDR`, or `loadgen echo-server` for the ceiling) "
            f"pinned to CPU {net.server_cpu}, and a fresh `loadgen client` pinned to CPU "
            f"{net.client_cpu}. Order: for each workload, for each repetition, every loop once; "
            "the ceiling of each (transport, size, connections) is interleaved with the first "
            "workload of that configuration.",
            "- The client (Rust, single-threaded, epoll via mio) keeps exactly one message in "
            "flight per connection, checks every echoed byte against a per-connection "
            "pseudo-random pattern (each message at a different offset), loads for the warm-up, "
            "then measures; any connection error or mismatch makes the cell an error.",
            "- Server CPU over the measured window: utime + stime of the server process from "
            "`/proc/PID/stat`, read by the client when the window opens and closes (10 ms "
            "ticks). Client CPU: its own `getrusage`.",
            f"- {QUIET_NOTE} The tables still show the other load during each window.",
            "- TCP on 127.0.0.1 with `TCP_NODELAY` on both ends; Unix sockets in a fresh "
            "temporary directory. Servers listen with backlog 1024 and read at most 65,536 "
            "bytes at a time (streams, sock).",
        ]
        families = {network.NET_WORKLOADS[w].family for w in args.net_workloads}
        if "http" in families:
            lines.append(
                f"- HTTP: `servers.py http` (httptools {dist_version('httptools')}) or `loadgen "
                f"http-server`, loaded by {network.wrk_version()} (`-t1`, pinned like the load "
                "generator); the driver reads the server's CPU time (`/proc/PID/stat`), wrk's "
                "(`RUSAGE_CHILDREN`) and the machine's busy time around the measured wrk run "
                "(see the HTTP note with the tables)."
            )
        if "mem" in families:
            lines.append(
                "- Memory: RSS (`VmRSS`) of a fresh `protocol` echo server (or `loadgen "
                "echo-server`) before and after `loadgen idle` opened the connections (see the "
                "memory note with the tables); no quiet-machine wait, since CPU load does not "
                "change it."
            )
    lines.append("")
    if inproc_report:
        lines += ["## In-process results (times in ms)", "", inproc_report]
    if net_report:
        lines += ["## Network results", "", net_report]
    lines += behind_section(behind_rows)
    lines += ["## Not yet measured", "", NOT_YET_MEASURED, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
