"""Network workloads of the benchmark suite: echo servers under load from a Rust client.

Used by ``run.py``. One measurement (a "cell" repetition) is:

1. a fresh server process pinned to one CPU: ``servers.py KIND LOOP ADDR`` for the Python
   loops, or ``loadgen echo-server`` for the plain-Rust ceiling; it prints ``LISTENING ADDR``;
2. ``loadgen client`` pinned to another CPU, with ``--server-pid``: N connections with one
   SIZE-byte message in flight each, every byte checked; after the warm-up it measures for
   the duration and prints requests/s, latency percentiles, errors, its own CPU time and the
   server's CPU time over the same window (``/proc/PID/stat`` utime + stime, all threads);
3. the server is killed (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers.py"
LOADGEN_DIR = HERE / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"
KINDS = ("protocol", "streams", "sock")
TRANSPORTS = ("tcp", "unix", "tls")  # tls: TLS over TCP (protocol and streams servers only)
SIZES = {"1k": 1024, "10k": 10 * 1024, "100k": 100 * 1024}
CONNS = (10, 100)
CEILING = "rust"  # the pseudo-loop name of the plain-Rust echo server
CEILING_LABEL = "rust echo (ceiling)"
REFERENCE = "ferroloop"
CLIENT_BOUND = 0.90  # client CPU fraction above which a cell is flagged
OTHER_LOAD = 0.25  # CPU (share of a core) used by other processes, above which a cell is flagged
SERVER_START_TIMEOUT = 30.0
# Before each measurement: while other processes keep more than QUIET_CORES of CPU busy
# (sampled over QUIET_SAMPLE s), wait, at most QUIET_MAX_PER_CELL s per cell and the run's
# --net-quiet-budget in all.
QUIET_CORES = 0.3
QUIET_SAMPLE = 0.1
QUIET_MAX_PER_CELL = 10.0


@dataclass(frozen=True)
class NetWorkload:
    kind: str
    transport: str
    size_label: str
    conns: int

    @property
    def size(self) -> int:
        return SIZES[self.size_label]

    @property
    def config(self) -> str:
        """The (transport, size, conns) part, shared with the ceiling row."""
        return f"{self.transport}_{self.size_label}_c{self.conns}"

    @property
    def name(self) -> str:
        return f"echo_{self.kind}_{self.config}"

    def describe_config(self) -> str:
        t = {"tcp": "TCP (127.0.0.1)", "unix": "Unix socket", "tls": "TLS over TCP (127.0.0.1)"}[
            self.transport
        ]
        return f"{t}, {self.size // 1024} KiB messages, {self.conns} connections"


NET_WORKLOADS: dict[str, NetWorkload] = {
    w.name: w
    for w in (
        NetWorkload(kind, transport, size, conns)
        for transport in TRANSPORTS
        for size in SIZES
        for conns in CONNS
        for kind in KINDS
        if not (kind == "sock" and transport == "tls")
    )
}

# The full run: every plain TCP and Unix workload, and TLS at 1 KiB and 100 KiB over 10
# connections (all 12 TLS workloads would add about 6 minutes; select them with --workloads).
FULL_NET_WORKLOADS = [
    *(n for n, w in NET_WORKLOADS.items() if w.transport != "tls"),
    *(f"echo_{kind}_tls_{size}_c10" for size in ("1k", "100k") for kind in ("protocol", "streams")),
]

# --quick: every kind over TCP and Unix sockets at the smallest size, two heavier rows, and TLS.
QUICK_NET_WORKLOADS = [
    *(f"echo_{kind}_{t}_1k_c10" for t in ("tcp", "unix") for kind in KINDS),
    "echo_protocol_tcp_100k_c100",
    "echo_streams_unix_10k_c100",
    "echo_protocol_tls_1k_c10",
]
assert set(QUICK_NET_WORKLOADS) <= set(NET_WORKLOADS) >= set(FULL_NET_WORKLOADS)


@dataclass
class NetOptions:
    warmup: float
    duration: float
    server_cpu: int | None
    client_cpu: int | None
    extra_path: list[str]  # --path arguments for ferroloop's server
    env: dict[str, str]
    tls_files: tuple[str, str] | None = None  # (certificate, key) for the TLS workloads
    quiet_budget: float = 0.0  # seconds left to wait for a quiet machine
    quiet_waited: float = 0.0  # seconds waited so far
    quiet_waits: int = 0  # cells that waited


def pick_cpus() -> tuple[int | None, int | None]:
    """Server on the first CPU we may use, the load generator on the second."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def machine_busy_seconds() -> float:
    """CPU time used on the whole machine so far (`/proc/stat`, all CPUs, without idle)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6, 7) if i < len(ticks))
    return busy / os.sysconf("SC_CLK_TCK")


def wait_quiet(opts: NetOptions) -> None:
    """Wait (within the budget) until other processes leave the CPUs mostly idle."""
    waited = 0.0
    while opts.quiet_budget > 0 and waited < QUIET_MAX_PER_CELL:
        try:
            b0 = machine_busy_seconds()
            time.sleep(QUIET_SAMPLE)
            busy = (machine_busy_seconds() - b0) / QUIET_SAMPLE
        except (OSError, ValueError):
            return
        if busy < QUIET_CORES:
            break
        time.sleep(0.5)
        waited += 0.5 + QUIET_SAMPLE
        opts.quiet_budget -= 0.5 + QUIET_SAMPLE
    if waited:
        opts.quiet_waited += waited
        opts.quiet_waits += 1
        print(f"  (waited {waited:.1f} s for other processes to leave the CPUs)", flush=True)


# ---------------------------------------------------------------------------------------------
# the load generator binary
# ---------------------------------------------------------------------------------------------


def loadgen_stale() -> bool:
    if not LOADGEN.exists():
        return True
    built = LOADGEN.stat().st_mtime
    sources = [LOADGEN_DIR / "Cargo.toml", LOADGEN_DIR / "Cargo.lock"]
    sources += list((LOADGEN_DIR / "src").rglob("*.rs"))
    return any(p.exists() and p.stat().st_mtime > built for p in sources)


def ensure_loadgen() -> str | None:
    """Build benchmarks/loadgen if it is missing or older than its sources; None if usable."""
    if not loadgen_stale():
        return None
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    cmd = [cargo, "build", "--release", "--manifest-path", str(LOADGEN_DIR / "Cargo.toml")]
    print(f"run.py: building the load generator: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        return f"cannot build the load generator: {exc}"
    if proc.returncode != 0 or not LOADGEN.exists():
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"cargo build of benchmarks/loadgen failed: {tail}"
    return None


def make_certificate(folder: Path) -> tuple[str, str]:
    """A throwaway self-signed certificate for localhost and 127.0.0.1 (openssl command)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        # an end-entity certificate: rustls refuses a CA certificate as the server's own
        + ["-addext", "basicConstraints=critical,CA:FALSE"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def rustc_version() -> str:
    try:
        return subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _wait_listening(proc: subprocess.Popen[str], timeout: float) -> str:
    """The server's address from its first stdout line, or raises RuntimeError."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"server did not listen within {timeout:g} s")
    line = proc.stdout.readline().strip()
    if line.startswith("LISTENING "):
        return line.removeprefix("LISTENING ")
    if line.startswith("ERROR "):
        raise RuntimeError("server: " + line.removeprefix("ERROR "))
    proc.wait(timeout=5)
    raise RuntimeError(f"server exited {proc.returncode} before listening")


def measure(w: NetWorkload, loop: str, opts: NetOptions) -> dict[str, Any]:
    """One repetition of workload ``w`` on ``loop`` (or the ceiling): the client's JSON."""
    tmp = Path(tempfile.mkdtemp(prefix="ferroloop-bench-"))
    addr = f"unix:{tmp / 'echo.sock'}" if w.transport == "unix" else "tcp:127.0.0.1:0"
    tls: list[str] = []
    if w.transport == "tls":
        if opts.tls_files is None:
            return {"error": "no TLS certificate (the openssl command failed or is missing)"}
        tls = ["--tls-cert", opts.tls_files[0], "--tls-key", opts.tls_files[1]]
    if loop == CEILING:
        cmd = [str(LOADGEN), "echo-server", "--addr", addr, *tls]
    else:
        cmd = [sys.executable, str(SERVERS), w.kind, loop, addr, *tls]
        if loop == REFERENCE:
            cmd += [arg for p in opts.extra_path for arg in ("--path", p)]
    err_file = tmp / "server.stderr"
    server = None
    try:
        with err_file.open("w") as err:
            server = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env=opts.env,
                cwd=HERE,
                preexec_fn=_pin(opts.server_cpu),
            )
        try:
            shown = _wait_listening(server, SERVER_START_TIMEOUT)
        except RuntimeError as exc:
            msg = str(exc)
            if server.poll() is not None and (tail := _tail(err_file)):
                msg += f": {tail}"
            return {"error": msg}
        client = [
            str(LOADGEN),
            "client",
            "--addr",
            shown,
            "--conns",
            str(w.conns),
            "--size",
            str(w.size),
            "--warmup",
            f"{opts.warmup:g}",
            "--duration",
            f"{opts.duration:g}",
            "--server-pid",
            str(server.pid),
        ]
        if opts.tls_files is not None and w.transport == "tls":
            client += ["--tls", opts.tls_files[0]]
        timeout = opts.warmup + opts.duration + 60
        try:
            proc = subprocess.run(
                client,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=_pin(opts.client_cpu),
            )
        except subprocess.TimeoutExpired:
            return {"error": f"load generator timed out after {timeout:g} s"}
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"error": f"load generator exit {proc.returncode}: {proc.stderr.strip()[-200:]}"}
        if "error" in out:
            return out
        server_died = server.poll() is not None
        if out["errors"] or server_died or out["requests"] == 0:
            why = out.get("first_error") or "no request completed"
            if server_died:
                why = f"server exited {server.returncode} ({_tail(err_file) or 'no stderr'}); {why}"
            return {"error": f"{out['errors']} connection error(s): {why}"}
        return out
    finally:
        if server is not None:
            _stop(server)
            if server.stdout is not None:
                server.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# running the set, interleaved
# ---------------------------------------------------------------------------------------------


def plan(workloads: Sequence[str], loops: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(workload or ceiling key, participants) in run order: the ceiling of each configuration
    is interleaved with the first workload of that configuration (usually the Protocol one)."""
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for name in workloads:
        w = NET_WORKLOADS[name]
        parts = list(loops)
        if w.config not in seen:
            seen.add(w.config)
            parts.append(CEILING)
        out.append((name, parts))
    return out


def ceiling_key(w: NetWorkload) -> str:
    return f"echo_{CEILING}_{w.config}"


def run_all(
    workloads: Sequence[str],
    loops: Sequence[str],
    unavailable: dict[str, str],
    reps: int,
    opts: NetOptions,
) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[tuple[str, str], str]]:
    """Every (workload, loop) ``reps`` times: for each workload, for each repetition, every
    loop once. Returns the samples and the error cells, keyed (workload, loop); the ceiling is
    keyed (``echo_rust_<config>``, ``rust``)."""
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], str] = {}
    cert_dir = None
    if any(NET_WORKLOADS[n].transport == "tls" for n in workloads):
        cert_dir = Path(tempfile.mkdtemp(prefix="ferroloop-bench-tls-"))
        try:
            opts.tls_files = make_certificate(cert_dir)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"run.py: cannot make a TLS certificate: {exc}", file=sys.stderr)
    try:
        _run_all(workloads, loops, unavailable, reps, opts, samples, errors)
    finally:
        if cert_dir is not None:
            shutil.rmtree(cert_dir, ignore_errors=True)
    for k in list(samples):
        if k in errors:
            errors[k] += f" (after {len(samples[k])} good repetition(s))"
            del samples[k]
    return samples, errors


def _run_all(
    workloads: Sequence[str],
    loops: Sequence[str],
    unavailable: dict[str, str],
    reps: int,
    opts: NetOptions,
    samples: dict[tuple[str, str], list[dict[str, Any]]],
    errors: dict[tuple[str, str], str],
) -> None:
    for name, parts in plan(workloads, loops):
        w = NET_WORKLOADS[name]
        for loop in parts:
            if loop in unavailable:
                errors[(name, loop)] = unavailable[loop]
        for rep in range(reps):
            for loop in parts:
                key = (ceiling_key(w), CEILING) if loop == CEILING else (name, loop)
                if key in errors:  # failed once: don't retry
                    continue
                wait_quiet(opts)
                t0 = time.perf_counter()
                out = measure(w, loop, opts)
                took = time.perf_counter() - t0
                label = CEILING if loop == CEILING else loop
                if "error" in out:
                    errors[key] = out["error"]
                    print(
                        f"  {name:28} rep {rep + 1}  {label:9}  error: {out['error']}", flush=True
                    )
                    continue
                samples.setdefault(key, []).append(out)
                print(
                    f"  {name:28} rep {rep + 1}  {label:9}  {out['rps']:>10,.0f} req/s"
                    f"  p99 {out['p99_us']:>9,.0f} µs"
                    f"  srv {cpu_per_req_us(out):>6.1f} µs/req {server_frac(out):>4.0%}"
                    f"  client {out['client_cpu_frac']:>4.0%}  other {other_frac(out):>4.0%}"
                    f"  ({took:.1f} s)",
                    flush=True,
                )


# ---------------------------------------------------------------------------------------------
# statistics and tables
# ---------------------------------------------------------------------------------------------


def cpu_per_req_us(out: dict[str, Any]) -> float:
    return out.get("server_cpu_s", float("nan")) / max(out["requests"], 1) * 1e6


def server_frac(out: dict[str, Any]) -> float:
    return out.get("server_cpu_s", float("nan")) / out["duration_s"]


def other_frac(out: dict[str, Any]) -> float:
    """CPU used by everything but the server and the load generator during the window."""
    other = out.get("machine_busy_s", float("nan")) - out["client_cpu_s"]
    other -= out.get("server_cpu_s", 0.0)
    return max(other, 0.0) / out["duration_s"]


def summarize(samples: list[dict[str, Any]]) -> dict[str, float]:
    rps = [s["rps"] for s in samples]
    return {
        "rps_median": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p99_median": statistics.median(s["p99_us"] for s in samples),
        "p50_median": statistics.median(s["p50_us"] for s in samples),
        "cpu_req_median": statistics.median(cpu_per_req_us(s) for s in samples),
        "server_frac_median": statistics.median(server_frac(s) for s in samples),
        "client_frac_median": statistics.median(s["client_cpu_frac"] for s in samples),
        "client_frac_max": max(s["client_cpu_frac"] for s in samples),
        "other_frac_median": statistics.median(other_frac(s) for s in samples),
        "other_frac_max": max(other_frac(s) for s in samples),
        "n": len(samples),
    }


def _client_bound(s: dict[str, float]) -> bool:
    return s["client_frac_median"] > CLIENT_BOUND


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}×" if y > 0 else "n/a"


def _flag(s: dict[str, float]) -> str:
    return " ‡" if _client_bound(s) else ""


def _other_flag(s: dict[str, float]) -> str:
    return " §" if s["other_frac_median"] > OTHER_LOAD else ""


def config_tables(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
    errors: dict[tuple[str, str], str],
) -> list[str]:
    """One table per (transport, size, conns): every kind × loop, then the ceiling."""
    out: list[str] = []
    by_config: dict[str, list[NetWorkload]] = {}
    for name in workloads:
        w = NET_WORKLOADS[name]
        by_config.setdefault(w.config, []).append(w)
    for config, ws in by_config.items():
        out += [f"### echo {config}: {ws[0].describe_config()}", ""]
        out += [
            "| kind | loop | req/s median | req/s min | req/s max | p99 latency (µs) "
            "| server CPU / req (µs) | server CPU | client CPU | other load "
            "| ferroloop ÷ peer, req/s | peer ÷ ferroloop, server CPU/req |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        rows = [(w.kind, w.name, loop) for w in ws for loop in loops]
        rows.append(("—", ceiling_key(ws[0]), CEILING))
        for kind, name, loop in rows:
            label = CEILING_LABEL if loop == CEILING else loop
            key = (name, loop)
            if key in errors:
                out.append(f"| {kind} | {label} | error: {errors[key]} | | | | | | | | | |")
                continue
            if key not in stats:
                continue
            s = stats[key]
            ref = stats.get((name, REFERENCE))
            if loop == REFERENCE:
                r_rps = r_cpu = "(reference)"
            elif loop == CEILING or ref is None:
                r_rps = r_cpu = "—" if loop == CEILING else "n/a"
            else:
                r_rps = _ratio(ref["rps_median"], s["rps_median"])
                r_cpu = _ratio(s["cpu_req_median"], ref["cpu_req_median"])
            out.append(
                f"| {kind} | {label} | {s['rps_median']:,.0f} | {s['rps_min']:,.0f} "
                f"| {s['rps_max']:,.0f} | {s['p99_median']:,.0f} | {s['cpu_req_median']:.1f} "
                f"| {s['server_frac_median']:.0%} | {s['client_frac_median']:.0%}{_flag(s)} "
                f"| {s['other_frac_median']:.0%}{_other_flag(s)} | {r_rps} | {r_cpu} |"
            )
        out.append("")
    return out


def ratio_tables(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[str]:
    peers = [loop for loop in loops if loop != REFERENCE]
    cols = [*peers, CEILING]
    head = "| workload | " + " | ".join(f"vs {CEILING_LABEL if c == CEILING else c}" for c in cols)
    sep = "|---|" + "--:|" * len(cols)
    rps_rows = [head + " |", sep]
    cpu_rows = [head + " |", sep]
    for name in workloads:
        w = NET_WORKLOADS[name]
        ref = stats.get((name, REFERENCE))
        rps_cells, cpu_cells = [], []
        for c in cols:
            peer = stats.get((ceiling_key(w), CEILING) if c == CEILING else (name, c))
            if ref is None or peer is None:
                rps_cells.append("n/a")
                cpu_cells.append("n/a")
                continue
            flag = " ‡" if _client_bound(ref) or _client_bound(peer) else ""
            rps_cells.append(_ratio(ref["rps_median"], peer["rps_median"]) + flag)
            cpu_cells.append(_ratio(peer["cpu_req_median"], ref["cpu_req_median"]) + flag)
        rps_rows.append(f"| {name} | " + " | ".join(rps_cells) + " |")
        cpu_rows.append(f"| {name} | " + " | ".join(cpu_cells) + " |")
    return [
        "### ferroloop vs each peer, requests/s",
        "",
        "ferroloop's median requests/s ÷ the peer's: **> 1 means ferroloop serves more**. "
        "‡: the load generator used more than 90 % of its core in ferroloop's or the peer's "
        "cell, so requests/s is capped by the client there; read the CPU table instead.",
        "",
        *rps_rows,
        "",
        "### ferroloop vs each peer, server CPU time per request",
        "",
        "The peer's median server CPU per request ÷ ferroloop's: **> 1 means ferroloop spends "
        "less CPU per echoed message**. This is the comparison that holds where the client was "
        "the limit (‡).",
        "",
        *cpu_rows,
        "",
    ]
