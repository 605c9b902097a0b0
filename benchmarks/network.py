"""Network workloads of the benchmark suite: echo and HTTP servers under load, and the memory
an idle connection costs.

Used by ``run.py``. One measurement (a "cell" repetition) of an echo workload is:

1. a fresh server process pinned to one CPU: ``servers.py KIND LOOP ADDR`` for the Python
   loops, or ``loadgen echo-server`` for the plain-Rust ceiling; it prints ``LISTENING ADDR``;
2. ``loadgen client`` pinned to another CPU, with ``--server-pid``: N connections with one
   SIZE-byte message in flight each, every byte checked; after the warm-up it measures for
   the duration and prints requests/s, latency percentiles, errors, its own CPU time and the
   server's CPU time over the same window (``/proc/PID/stat`` utime + stime, all threads);
3. the server is killed (SIGTERM, then SIGKILL).

An HTTP workload (``http_tcp_cN``) is the same with ``servers.py http`` (or ``loadgen
http-server``) as the server and ``wrk`` as the client: a warm-up run, then the measured run,
around which this module reads the server's CPU time, wrk's (``RUSAGE_CHILDREN``) and the
machine's busy time itself. A memory workload (``mem_idle_tcp_cN``) starts a ``protocol`` echo
server (or ``loadgen echo-server``), reads its RSS, has ``loadgen idle`` open N connections
(one echo round trip each) and hold them, and reads the RSS again once it has settled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import chart

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers.py"
LOADGEN_DIR = HERE / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"
KINDS = ("protocol", "streams", "sock")
TRANSPORTS = ("tcp", "unix", "tls")  # tls: TLS over TCP (protocol and streams servers only)
SIZES = {"1k": 1024, "10k": 10 * 1024, "100k": 100 * 1024}
CONNS = (10, 100)
CEILING = "rust"  # the pseudo-loop name of the plain-Rust servers (the ceilings)
HTTP_CONNS = (10, 100, 1000)
MEM_CONNS = (2000, 10000)
REFERENCE = "ferroloop"
CLIENT_BOUND = 0.90  # client CPU fraction above which a cell is flagged
OTHER_LOAD = 0.25  # CPU (share of a core) used by other processes, above which a cell is flagged
SERVER_START_TIMEOUT = 30.0
# Before each measurement: while other processes keep more than QUIET_CORES of CPU busy
# (sampled over QUIET_SAMPLE s), wait, at most QUIET_MAX_PER_CELL s per cell and the run's
# --quiet-budget in all (in-process measurements wait the same way).
QUIET_CORES = 0.3
QUIET_SAMPLE = 0.1
QUIET_MAX_PER_CELL = 10.0
# ... and while a fixed piece of work (SPEED_PROBE_N additions, best of 3) takes more than
# SLOW_CPU times the fastest it took on that CPU so far in the run: the host's other guests
# can slow a CPU down without that showing as busy or stolen time in /proc/stat.
SPEED_PROBE_N = 100_000
SLOW_CPU = 1.25
# A probe that found no CPU slowed stands for PROBE_FRESH s: the check after one
# measurement is then also the check before the next.
PROBE_FRESH = 0.5
# A measurement after which the same probe finds a CPU slowed is measured again, at most
# REDO_SLOWED times, the discarded measurement's time taken from the --quiet-budget; one
# kept while still slowed is marked (SLOWED_MARK on its cell).
REDO_SLOWED = 2
SLOWED_MARK = "¶"
# HTTP: how long wrk may overrun its -d (whole seconds: see wrk_seconds) before it is killed.
WRK_TIMEOUT_EXTRA = 60.0
# Memory: RSS is "settled" once its samples (every RSS_SAMPLE s) over RSS_STABLE_FOR s stay
# within RSS_STABLE_KB; at most RSS_SETTLE_MAX s. The idle client gets IDLE_TIMEOUT s to open
# every connection.
RSS_SAMPLE = 0.1
RSS_STABLE_FOR = 0.5
RSS_STABLE_KB = 64
RSS_SETTLE_MAX = 10.0
IDLE_TIMEOUT = 180.0
FD_MARGIN = 64  # file descriptors besides the connections (listener, epoll, pipes, imports)


@dataclass(frozen=True)
class NetWorkload:
    """An echo workload: ``echo_{kind}_{transport}_{size}_c{conns}``."""

    kind: str
    transport: str
    size_label: str
    conns: int
    family: ClassVar[str] = "echo"
    ceiling_label: ClassVar[str] = "rust echo (ceiling)"

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

    @property
    def ceiling_key(self) -> str:
        """The workload name the ceiling's results are keyed by (shared by every kind)."""
        return f"echo_{CEILING}_{self.config}"

    def describe_config(self) -> str:
        t = {"tcp": "TCP (127.0.0.1)", "unix": "Unix socket", "tls": "TLS over TCP (127.0.0.1)"}[
            self.transport
        ]
        return f"{t}, {self.size // 1024} KiB messages, {self.conns} connections"


@dataclass(frozen=True)
class HttpWorkload:
    """HTTP/1.1 keep-alive under wrk: ``http_tcp_c{conns}`` (servers.py's ``http`` kind)."""

    conns: int
    family: ClassVar[str] = "http"
    kind: ClassVar[str] = "http"
    transport: ClassVar[str] = "tcp"
    ceiling_label: ClassVar[str] = "rust http (ceiling)"

    @property
    def config(self) -> str:
        return f"tcp_c{self.conns}"

    @property
    def name(self) -> str:
        return f"http_{self.config}"

    @property
    def ceiling_key(self) -> str:
        return f"http_{CEILING}_{self.config}"

    def describe_config(self) -> str:
        return f"HTTP/1.1 keep-alive over TCP (127.0.0.1), {self.conns} connections, wrk (1 thread)"


@dataclass(frozen=True)
class MemWorkload:
    """RSS per idle connection: ``mem_idle_tcp_c{conns}`` (servers.py's ``protocol`` kind)."""

    conns: int
    family: ClassVar[str] = "mem"
    kind: ClassVar[str] = "protocol"
    transport: ClassVar[str] = "tcp"
    ceiling_label: ClassVar[str] = "rust echo (ceiling)"

    @property
    def config(self) -> str:
        return f"tcp_c{self.conns}"

    @property
    def name(self) -> str:
        return f"mem_idle_{self.config}"

    @property
    def ceiling_key(self) -> str:
        return f"mem_idle_{CEILING}_{self.config}"

    def describe_config(self) -> str:
        return (
            f"{self.conns:,} idle TCP connections (127.0.0.1) to a Protocol echo server, "
            "one 16-byte echo each"
        )


AnyWorkload = NetWorkload | HttpWorkload | MemWorkload

NET_WORKLOADS: dict[str, AnyWorkload] = {
    w.name: w
    for w in (
        *(
            NetWorkload(kind, transport, size, conns)
            for transport in TRANSPORTS
            for size in SIZES
            for conns in CONNS
            for kind in KINDS
            if not (kind == "sock" and transport == "tls")
        ),
        *(HttpWorkload(conns) for conns in HTTP_CONNS),
        *(MemWorkload(conns) for conns in MEM_CONNS),
    )
}

# The full run: every plain TCP and Unix echo workload, TLS at 1 KiB and 100 KiB over 10
# connections (all 12 TLS workloads would add about 6 minutes; select them with --workloads),
# every HTTP workload, and the memory of 10,000 idle connections.
FULL_NET_WORKLOADS = [
    *(n for n, w in NET_WORKLOADS.items() if w.family == "echo" and w.transport != "tls"),
    *(f"echo_{kind}_tls_{size}_c10" for size in ("1k", "100k") for kind in ("protocol", "streams")),
    *(HttpWorkload(conns).name for conns in HTTP_CONNS),
    MemWorkload(10000).name,
]

# --quick: every kind over TCP and Unix sockets at the smallest size, two heavier rows, TLS,
# HTTP over 100 connections and the memory of 2,000 idle connections.
QUICK_NET_WORKLOADS = [
    *(f"echo_{kind}_{t}_1k_c10" for t in ("tcp", "unix") for kind in KINDS),
    "echo_protocol_tcp_100k_c100",
    "echo_streams_unix_10k_c100",
    "echo_protocol_tls_1k_c10",
    HttpWorkload(100).name,
    MemWorkload(2000).name,
]
assert set(QUICK_NET_WORKLOADS) <= set(NET_WORKLOADS) >= set(FULL_NET_WORKLOADS)


@dataclass
class Quiet:
    """A run's allowance for waiting on a quiet machine, shared by every measurement."""

    budget: float  # seconds left
    waited: float = 0.0  # seconds waited so far
    waits: int = 0  # measurements that waited
    slow_waits: int = 0  # ... of them, those that waited for a slowed CPU
    redone: int = 0  # measurements discarded and made again: a CPU was slowed by their end
    kept_slowed: int = 0  # measurements kept although a CPU was slowed by their end
    kept: int = 0  # measurements kept in all (those that did not fail)
    fastest: dict[int | None, float] = field(default_factory=dict)  # best probe per CPU
    unslowed_at: float = -math.inf  # perf_counter() of the last probe that found none slowed


@dataclass
class NetOptions:
    warmup: float
    duration: float
    server_cpu: int | None
    client_cpu: int | None
    extra_path: list[str]  # --path arguments for ferroloop's server
    env: dict[str, str]
    quiet: Quiet
    tls_files: tuple[str, str] | None = None  # (certificate, key) for the TLS workloads


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


def probe_seconds(cpu: int | None) -> float:
    """How long SPEED_PROBE_N additions take on `cpu` (best of 3), the driver pinned there."""
    try:
        before = os.sched_getaffinity(0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        before = None
    try:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            total = 0
            for i in range(SPEED_PROBE_N):
                total += i
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def slowed_cpus(quiet: Quiet) -> list[int | None]:
    """The CPUs now slower than SLOW_CPU times their best so far (which this updates); none,
    without probing again, within PROBE_FRESH s of a probe that found none."""
    if time.perf_counter() - quiet.unslowed_at < PROBE_FRESH:
        return []
    server_cpu, client_cpu = pick_cpus()
    slow = []
    for cpu in dict.fromkeys((server_cpu, client_cpu)):
        took = probe_seconds(cpu)
        fastest = quiet.fastest.get(cpu, math.inf)
        if took > SLOW_CPU * fastest:
            slow.append(cpu)
        quiet.fastest[cpu] = min(fastest, took)
    if not slow:
        quiet.unslowed_at = time.perf_counter()
    return slow


def wait_quiet(quiet: Quiet) -> None:
    """Wait (within the budget) until other processes leave the CPUs mostly idle and the
    CPUs run at their usual speed."""
    waited = 0.0
    slowed = False
    while quiet.budget > 0 and waited < QUIET_MAX_PER_CELL:
        try:
            b0 = machine_busy_seconds()
            time.sleep(QUIET_SAMPLE)
            busy = (machine_busy_seconds() - b0) / QUIET_SAMPLE
        except (OSError, ValueError):
            return
        if busy < QUIET_CORES:
            if not slowed_cpus(quiet):
                break
            slowed = True
        time.sleep(0.5)
        waited += 0.5 + QUIET_SAMPLE
        quiet.budget -= 0.5 + QUIET_SAMPLE
    if waited:
        quiet.waited += waited
        quiet.waits += 1
        quiet.slow_waits += slowed
        why = "a slowed CPU" if slowed else "other processes to leave the CPUs"
        print(f"  (waited {waited:.1f} s for {why})", flush=True)


def measure_unslowed(run: Callable[[], dict[str, Any]], quiet: Quiet) -> dict[str, Any]:
    """`run()` on a quiet machine (see `wait_quiet`), made again while the speed probe after
    it finds a CPU slowed: a slowdown that began during the measurement is seen only then.
    A measurement kept while still slowed (REDO_SLOWED reached, or no budget left) comes back
    with `slowed` set."""
    for attempt in range(REDO_SLOWED + 1):
        wait_quiet(quiet)
        t0 = time.perf_counter()
        out = run()
        took = time.perf_counter() - t0
        if "error" in out:
            return out
        slowed = bool(slowed_cpus(quiet))
        if slowed and attempt < REDO_SLOWED and quiet.budget > 0:
            quiet.budget -= took
            quiet.redone += 1
            print("  (a CPU was slowed by the end of the measurement: measuring again)", flush=True)
            continue
        quiet.kept += 1
        if slowed:
            out["slowed"] = True
            quiet.kept_slowed += 1
        return out
    raise AssertionError("unreachable")


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


def _server_cmd(
    kind: str, loop: str, addr: str, opts: NetOptions, tls: Sequence[str] = ()
) -> list[str]:
    """The command of a fresh server: the ceiling (``loadgen echo-server`` for the echo kinds,
    ``loadgen http-server`` for ``http``) or ``servers.py KIND LOOP ADDR``."""
    if loop == CEILING:
        mode = "http-server" if kind == "http" else "echo-server"
        return [str(LOADGEN), mode, "--addr", addr, *tls]
    cmd = [sys.executable, str(SERVERS), kind, loop, addr, *tls]
    if loop == REFERENCE:
        cmd += [arg for p in opts.extra_path for arg in ("--path", p)]
    return cmd


def _start_server(
    cmd: list[str], err_file: Path, opts: NetOptions
) -> tuple[subprocess.Popen[str], str]:
    """Starts a server pinned to the server CPU; returns it and the address it prints. On a
    failure before it listens, raises RuntimeError with the reason (the process, if any,
    attached as ``exc.server`` so the caller can stop it)."""
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
        return server, _wait_listening(server, SERVER_START_TIMEOUT)
    except RuntimeError as exc:
        msg = str(exc)
        if server.poll() is not None and (tail := _tail(err_file)):
            msg += f": {tail}"
        if "No module named 'httptools'" in msg:
            msg += (
                " (benchmarks/setup.sh installs it, or: benchmarks/.venv/bin/pip install httptools)"
            )
        failure = RuntimeError(msg)
        failure.server = server  # type: ignore[attr-defined]
        raise failure from None


def _close_server(server: subprocess.Popen[str] | None) -> None:
    if server is not None:
        _stop(server)
        if server.stdout is not None:
            server.stdout.close()


def measure(w: AnyWorkload, loop: str, opts: NetOptions) -> dict[str, Any]:
    """One repetition of workload ``w`` on ``loop`` (or the ceiling): the client's JSON (echo),
    the same fields from wrk's output (HTTP), or the RSS figures (memory)."""
    if isinstance(w, HttpWorkload):
        return measure_http(w, loop, opts)
    if isinstance(w, MemWorkload):
        return measure_mem(w, loop, opts)
    tmp = Path(tempfile.mkdtemp(prefix="ferroloop-bench-"))
    addr = f"unix:{tmp / 'echo.sock'}" if w.transport == "unix" else "tcp:127.0.0.1:0"
    tls: list[str] = []
    if w.transport == "tls":
        if opts.tls_files is None:
            return {"error": "no TLS certificate (the openssl command failed or is missing)"}
        tls = ["--tls-cert", opts.tls_files[0], "--tls-key", opts.tls_files[1]]
    err_file = tmp / "server.stderr"
    server = None
    try:
        try:
            server, shown = _start_server(
                _server_cmd(w.kind, loop, addr, opts, tls), err_file, opts
            )
        except RuntimeError as exc:
            server = getattr(exc, "server", None)
            return {"error": str(exc)}
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
        _close_server(server)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# HTTP: wrk against servers.py http (or loadgen http-server)
# ---------------------------------------------------------------------------------------------


def wrk_missing() -> str | None:
    """Why the HTTP workloads cannot run here, or None."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (benchmarks/setup.sh runs apt-get install wrk)"
    return None


def wrk_version() -> str:
    """``wrk debian/4.1.0-3+b2 [epoll]``: the first words of ``wrk -v``."""
    try:
        proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    except OSError:
        return "wrk (not installed)"
    first = (proc.stdout.strip().splitlines() or ["wrk ?"])[0]
    return first.split(" Copyright")[0]


def wrk_seconds(seconds: float) -> int:
    """wrk's -d takes whole seconds: the nearest, at least 1."""
    return max(1, round(seconds))


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU time, utime + stime of all its threads (``/proc/PID/stat``), in s."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's terminated, waited-for children (``RUSAGE_CHILDREN``)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


_WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_WRK_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _wrk_us(value: str, unit: str) -> float:
    return float(value) * _WRK_UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, requests/s, latency percentiles (µs) and errors from ``wrk --latency``."""
    out: dict[str, Any] = {}
    if m := re.search(r"(\d+) requests in " + _WRK_TIME, text):
        out["requests"] = int(m[1])
        out["wrk_duration_s"] = _wrk_us(m[2], m[3]) / 1e6
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m[1])
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+" + _WRK_TIME + r"\s*$", text, re.M):
        out[f"p{pct}_us"] = _wrk_us(value, unit)
    if m := re.search(r"Latency\s+\S+\s+\S+\s+" + _WRK_TIME, text):
        out["max_us"] = _wrk_us(m[1], m[2])
    errors = []
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        counts = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
        errors += [f"{n} {what}" for what, n in counts.items() if n]
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors.append(f"{m[1]} non-2xx/3xx responses")
    out["errors"] = len(errors)
    if errors:
        out["first_error"] = "wrk: " + ", ".join(errors)
    missing = {"requests", "rps", "p50_us", "p99_us"} - out.keys()
    if missing:
        out["error"] = f"cannot read {', '.join(sorted(missing))} from wrk's output"
    return out


def _run_wrk(w: HttpWorkload, url: str, seconds: int, opts: NetOptions) -> tuple[str, str | None]:
    """``wrk -t1 -cN -dS --latency URL`` pinned to the client CPU: (stdout, error or None)."""
    cmd = ["wrk", "-t1", f"-c{w.conns}", f"-d{seconds}s", "--latency", url]
    timeout = seconds + WRK_TIMEOUT_EXTRA
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_pin(opts.client_cpu)
        )
    except subprocess.TimeoutExpired:
        return "", f"wrk timed out after {timeout:g} s"
    except OSError as exc:
        return "", f"cannot run wrk: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return proc.stdout, f"wrk exit {proc.returncode}: {tail}"
    return proc.stdout, None


def measure_http(w: HttpWorkload, loop: str, opts: NetOptions) -> dict[str, Any]:
    """One repetition of an HTTP workload: a fresh server, a warm-up wrk run, then the measured
    wrk run with the server's CPU time (``/proc/PID/stat``), wrk's (``RUSAGE_CHILDREN``: wrk is
    the only child reaped in between) and the machine's busy time read around it. wrk has no
    warm-up of its own, so the measured run opens its connections afresh: the window includes
    accepting and closing N connections (negligible next to the 10^4-10^5 requests in it)."""
    if why := wrk_missing():
        return {"error": why}
    tmp = Path(tempfile.mkdtemp(prefix="ferroloop-bench-"))
    server = None
    try:
        try:
            cmd = _server_cmd("http", loop, "tcp:127.0.0.1:0", opts)
            server, shown = _start_server(cmd, tmp / "server.stderr", opts)
        except RuntimeError as exc:
            server = getattr(exc, "server", None)
            return {"error": str(exc)}
        url = f"http://{shown.removeprefix('tcp:')}/"
        if opts.warmup > 0:
            text, err = _run_wrk(w, url, wrk_seconds(opts.warmup), opts)
            if err is None:
                warm = parse_wrk(text)
                err = warm.get("error") or warm.get("first_error")
            if err is not None:
                return {"error": f"warm-up: {err}"}
        seconds = wrk_seconds(opts.duration)
        srv0, cli0, busy0 = (
            process_cpu_seconds(server.pid),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )
        t0 = time.perf_counter()
        text, err = _run_wrk(w, url, seconds, opts)
        elapsed = time.perf_counter() - t0
        busy1, cli1 = machine_busy_seconds(), children_cpu_seconds()
        if server.poll() is not None:
            tail = _tail(tmp / "server.stderr") or "no stderr"
            return {"error": f"server exited {server.returncode} ({tail})"}
        srv1 = process_cpu_seconds(server.pid)
        if err is not None:
            return {"error": err}
        out = parse_wrk(text)
        if "error" in out:
            return out
        if out["errors"] or out["requests"] == 0:
            return {"error": out.get("first_error") or "no request completed"}
        client_cpu = cli1 - cli0
        out.update(
            mode="wrk",
            conns=w.conns,
            wrk_seconds=seconds,
            duration_s=elapsed,
            client_cpu_s=client_cpu,
            client_cpu_frac=client_cpu / elapsed,
            server_cpu_s=srv1 - srv0,
            machine_busy_s=busy1 - busy0,
        )
        return out
    finally:
        _close_server(server)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# memory: RSS per idle connection
# ---------------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of a process (``/proc/PID/status``), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def settled_rss_kb(pid: int) -> tuple[int, float, bool]:
    """(RSS in kB, seconds waited, settled?): samples every RSS_SAMPLE s until those over the
    last RSS_STABLE_FOR s stay within RSS_STABLE_KB (at most RSS_SETTLE_MAX s)."""
    need = round(RSS_STABLE_FOR / RSS_SAMPLE) + 1
    t0 = time.perf_counter()
    samples = [rss_kb(pid)]
    while True:
        recent = samples[-need:]
        if len(recent) == need and max(recent) - min(recent) <= RSS_STABLE_KB:
            return samples[-1], time.perf_counter() - t0, True
        if time.perf_counter() - t0 >= RSS_SETTLE_MAX:
            return samples[-1], time.perf_counter() - t0, False
        time.sleep(RSS_SAMPLE)
        samples.append(rss_kb(pid))


def nofile_problem(need: int) -> str | None:
    """Why this machine cannot hold ``need`` descriptors in one process, or None."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        return (
            f"the hard RLIMIT_NOFILE is {hard:,}, below the {need:,} file descriptors needed "
            "(raise it: ulimit -Hn, /etc/security/limits.conf, systemd LimitNOFILE)"
        )
    return None


def measure_mem(w: MemWorkload, loop: str, opts: NetOptions) -> dict[str, Any]:
    """One repetition of a memory workload: a fresh ``protocol`` echo server (or the Rust echo
    server), its settled RSS once it listens, then ``loadgen idle`` opens N connections, one
    16-byte echo round trip each (so the server has accepted each one and set up its
    protocol and transport), and holds them; the settled RSS again, (after − before) ÷ N."""
    if why := nofile_problem(w.conns + FD_MARGIN):
        return {"error": why}
    tmp = Path(tempfile.mkdtemp(prefix="ferroloop-bench-"))
    server = idle = None
    try:
        try:
            cmd = _server_cmd("protocol", loop, "tcp:127.0.0.1:0", opts)
            server, shown = _start_server(cmd, tmp / "server.stderr", opts)
        except RuntimeError as exc:
            server = getattr(exc, "server", None)
            return {"error": str(exc)}
        before, _, _ = settled_rss_kb(server.pid)
        idle = subprocess.Popen(
            [str(LOADGEN), "idle", "--addr", shown, "--conns", str(w.conns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pin(opts.client_cpu),
        )
        assert idle.stdout is not None
        ready, _, _ = select.select([idle.stdout], [], [], IDLE_TIMEOUT)
        if not ready:
            return {
                "error": f"loadgen idle did not open {w.conns:,} connections in {IDLE_TIMEOUT:g} s"
            }
        line = idle.stdout.readline().strip()
        try:
            opened = json.loads(line)
        except json.JSONDecodeError:
            idle.wait(timeout=5)
            tail = (idle.stderr.read() if idle.stderr else "").strip()[-200:]
            return {"error": f"loadgen idle exit {idle.returncode}: {tail or line or 'no output'}"}
        if "error" in opened:
            if server.poll() is not None:
                tail = _tail(tmp / "server.stderr") or "no stderr"
                opened["error"] += f"; server exited {server.returncode} ({tail})"
            return opened
        after, settle_s, settled = settled_rss_kb(server.pid)
        if server.poll() is not None:
            tail = _tail(tmp / "server.stderr") or "no stderr"
            return {"error": f"server exited {server.returncode} ({tail})"}
        return {
            "mode": "idle",
            "conns": w.conns,
            "rss_before_kb": before,
            "rss_after_kb": after,
            "bytes_per_conn": (after - before) * 1024 / w.conns,
            "established_s": opened["established_s"],
            "settle_s": settle_s,
            "settled": settled,
        }
    finally:
        _close_server(server)
        if idle is not None:
            for pipe in (idle.stdin, idle.stdout, idle.stderr):
                if pipe is not None:
                    pipe.close()  # closing stdin tells it to exit
            try:
                idle.wait(timeout=10)
            except subprocess.TimeoutExpired:
                idle.kill()
                idle.wait()
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
        if w.ceiling_key not in seen:
            seen.add(w.ceiling_key)
            parts.append(CEILING)
        out.append((name, parts))
    return out


def waiting_measurements(workloads: Sequence[str], loops: Sequence[str], reps: int) -> int:
    """How many measurements of these workloads wait for a quiet machine (memory ones do not)."""
    return reps * sum(
        len(parts)
        for name, parts in plan(workloads, loops)
        if not isinstance(NET_WORKLOADS[name], MemWorkload)
    )


def run_all(
    workloads: Sequence[str],
    loops: Sequence[str],
    unavailable: dict[str, str],
    reps: int,
    opts: NetOptions,
) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[tuple[str, str], str]]:
    """Every (workload, loop) ``reps`` times: for each workload, for each repetition, every
    loop once. Returns the samples and the error cells, keyed (workload, loop); the ceiling is
    keyed (``w.ceiling_key``, ``rust``), e.g. (``echo_rust_tcp_1k_c10``, ``rust``)."""
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
        keys = {
            loop: (w.ceiling_key, CEILING) if loop == CEILING else (name, loop) for loop in parts
        }
        cannot = wrk_missing() if isinstance(w, HttpWorkload) else None
        for loop in parts:
            if cannot is not None:
                errors[keys[loop]] = cannot
            elif loop in unavailable:
                errors[keys[loop]] = unavailable[loop]
        for rep in range(reps):
            for loop in parts:
                key = keys[loop]
                if key in errors:  # failed once: don't retry
                    continue
                t0 = time.perf_counter()
                if isinstance(w, MemWorkload):  # memory does not depend on a quiet machine
                    out = measure(w, loop, opts)
                else:
                    out = measure_unslowed(functools.partial(measure, w, loop, opts), opts.quiet)
                took = time.perf_counter() - t0
                label = CEILING if loop == CEILING else loop
                if "error" in out:
                    errors[key] = out["error"]
                    print(
                        f"  {name:28} rep {rep + 1}  {label:9}  error: {out['error']}", flush=True
                    )
                    continue
                samples.setdefault(key, []).append(out)
                if isinstance(w, MemWorkload):
                    settled = "" if out["settled"] else ", not settled"
                    print(
                        f"  {name:28} rep {rep + 1}  {label:9}"
                        f"  {out['bytes_per_conn']:>8,.0f} B/conn"
                        f"  RSS {out['rss_before_kb'] / 1024:,.1f} -> "
                        f"{out['rss_after_kb'] / 1024:,.1f} MiB"
                        f"  (opened in {out['established_s']:.1f} s, RSS settled in "
                        f"{out['settle_s']:.1f} s{settled}; {took:.1f} s)",
                        flush=True,
                    )
                    continue
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
    if "bytes_per_conn" in samples[0]:
        return summarize_mem(samples)
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
        "slowed": sum(bool(s.get("slowed")) for s in samples),
        "n": len(samples),
    }


def summarize_mem(samples: list[dict[str, Any]]) -> dict[str, float]:
    bpc = [s["bytes_per_conn"] for s in samples]
    return {
        "bpc_median": statistics.median(bpc),
        "bpc_min": min(bpc),
        "bpc_max": max(bpc),
        "rss_before_median_kb": statistics.median(s["rss_before_kb"] for s in samples),
        "rss_after_median_kb": statistics.median(s["rss_after_kb"] for s in samples),
        "established_median_s": statistics.median(s["established_s"] for s in samples),
        "unsettled": sum(not s["settled"] for s in samples),
        "n": len(samples),
    }


def _client_bound(s: dict[str, float]) -> bool:
    return s["client_frac_median"] > CLIENT_BOUND


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}×" if y > 0 else "n/a"


def _flag(s: dict[str, float]) -> str:
    return " ‡" if _client_bound(s) else ""


def _other_flag(s: dict[str, float]) -> str:
    return (" §" if s["other_frac_median"] > OTHER_LOAD else "") + slowed_flag(s)


def slowed_flag(s: dict[str, float]) -> str:
    """SLOWED_MARK on a cell that kept a repetition measured on a slowed CPU."""
    return f" {SLOWED_MARK}" if s.get("slowed") else ""


HTTP_NOTE = (
    "**HTTP** (`http_tcp_cN`): `servers.py http`, an `asyncio.Protocol` feeding an "
    "`httptools.HttpRequestParser` and answering every request with the same small `200 OK` "
    "(13-byte body `Hello, World!`, keep-alive), under `wrk -t1 -cN --latency` pinned to the "
    "load generator's CPU; the ceiling is `loadgen http-server` (plain Rust, the same bytes). "
    "wrk takes whole seconds: a warm-up run, then the measured run, each max(1, round(s)) s "
    "long; the measured run opens its N connections afresh, so accepting and closing them is "
    "in the window. req/s and p99 are wrk's; server CPU / req is the server's CPU over the "
    "measured run ÷ wrk's request count; client CPU is wrk's own (`RUSAGE_CHILDREN`). wrk "
    "sends one request at a time per connection (no pipelining)."
)

MEM_NOTE = (
    "**Memory per idle connection** (`mem_idle_tcp_cN`): a fresh `protocol` echo server "
    "(`servers.py protocol`, or `loadgen echo-server` for the ceiling: no per-connection "
    "buffer), its RSS (`VmRSS`, `/proc/PID/status`) once it listens and has settled; then "
    "`loadgen idle` opens N TCP connections one after another, each with one checked 16-byte "
    f"echo round trip, and holds them; once RSS has settled again (samples every "
    f"{RSS_SAMPLE:g} s within {RSS_STABLE_KB} kB over {RSS_STABLE_FOR:g} s) bytes per "
    "connection = (RSS after − RSS before) ÷ N. Kernel socket memory is not in RSS. Ratio: "
    "the peer's bytes ÷ ferroloop's, **> 1 means ferroloop uses less memory**."
)


def config_tables(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
    errors: dict[tuple[str, str], str],
) -> list[str]:
    """One table per echo (transport, size, conns), every kind × loop, then the ceiling; then
    one per HTTP workload. Memory workloads: ``mem_tables``."""
    out: list[str] = []
    by_config: dict[tuple[str, str], list[NetWorkload | HttpWorkload]] = {}
    for name in workloads:
        w = NET_WORKLOADS[name]
        if not isinstance(w, MemWorkload):
            by_config.setdefault((w.family, w.config), []).append(w)
    http_noted = False
    for (family, config), ws in by_config.items():
        if family == "http" and not http_noted:
            out += [HTTP_NOTE, ""]
            http_noted = True
        out += [f"### {family} {config}: {ws[0].describe_config()}", ""]
        out += [
            "| kind | loop | req/s median | req/s min | req/s max | p99 latency (µs) "
            "| server CPU / req (µs) | server CPU | client CPU | other load "
            "| ferroloop ÷ peer, req/s | peer ÷ ferroloop, server CPU/req |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        rows = [(w.kind, w.name, loop) for w in ws for loop in loops]
        rows.append(("—", ws[0].ceiling_key, CEILING))
        for kind, name, loop in rows:
            label = ws[0].ceiling_label if loop == CEILING else loop
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


def mem_tables(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
    errors: dict[tuple[str, str], str],
) -> list[str]:
    """One table per memory workload: bytes per idle connection, every loop, then the ceiling."""
    ws = [w for n in workloads if isinstance(w := NET_WORKLOADS[n], MemWorkload)]
    if not ws:
        return []
    out = [MEM_NOTE, ""]
    for w in ws:
        out += [f"### memory {w.config}: {w.describe_config()}", ""]
        out += [
            "| loop | bytes / connection median | min | max | RSS before (MiB) "
            "| RSS after (MiB) | connections opened in (s) | peer ÷ ferroloop, bytes/conn |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        ref = stats.get((w.name, REFERENCE))
        for name, loop in [*((w.name, loop) for loop in loops), (w.ceiling_key, CEILING)]:
            label = w.ceiling_label if loop == CEILING else loop
            key = (name, loop)
            if key in errors:
                out.append(f"| {label} | error: {errors[key]} | | | | | | |")
                continue
            if key not in stats:
                continue
            s = stats[key]
            if loop == REFERENCE:
                ratio = "(reference)"
            elif ref is None:
                ratio = "n/a"
            else:
                ratio = _ratio(s["bpc_median"], ref["bpc_median"])
            unsettled = (
                f" (RSS not settled in {s['unsettled']:.0f} run(s))" if s["unsettled"] else ""
            )
            out.append(
                f"| {label} | {s['bpc_median']:,.0f}{unsettled} | {s['bpc_min']:,.0f} "
                f"| {s['bpc_max']:,.0f} | {s['rss_before_median_kb'] / 1024:,.1f} "
                f"| {s['rss_after_median_kb'] / 1024:,.1f} | {s['established_median_s']:.1f} "
                f"| {ratio} |"
            )
        out.append("")
    return out


def behind(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[tuple[str, str, str, float]]:
    """(workload, peer, metric, ratio) wherever ferroloop's median is behind a peer's.

    The metric is server CPU per request where a load generator was the limit in
    ferroloop's or that peer's cell (requests/s then says little), requests/s elsewhere, and
    bytes per connection for memory; ratio > 1 would mean ferroloop is better.
    """
    rows = []
    for name in workloads:
        w = NET_WORKLOADS[name]
        ref = stats.get((name, REFERENCE))
        if ref is None:
            continue
        for peer_name in loops:
            peer = stats.get((name, peer_name))
            if peer_name == REFERENCE or peer is None:
                continue
            if isinstance(w, MemWorkload):
                metric, ratio = "bytes/conn", peer["bpc_median"] / ref["bpc_median"]
            elif _client_bound(ref) or _client_bound(peer):
                metric = "server CPU/req"
                ratio = peer["cpu_req_median"] / ref["cpu_req_median"]
            else:
                metric, ratio = "req/s", ref["rps_median"] / peer["rps_median"]
            if ratio < 1.0:
                rows.append((name, peer_name, metric, ratio))
    return rows


def ratio_tables(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[str]:
    peers = [loop for loop in loops if loop != REFERENCE]
    cols = [*peers, CEILING]
    head = "| workload | " + " | ".join(
        f"vs {'rust (ceiling)' if c == CEILING else c}" for c in cols
    )
    sep = "|---|" + "--:|" * len(cols)
    rps_rows = [head + " |", sep]
    cpu_rows = [head + " |", sep]
    mem_rows = [head + " |", sep]
    for name in workloads:
        w = NET_WORKLOADS[name]
        ref = stats.get((name, REFERENCE))
        rps_cells, cpu_cells, mem_cells = [], [], []
        for c in cols:
            peer = stats.get((w.ceiling_key, CEILING) if c == CEILING else (name, c))
            if ref is None or peer is None:
                for cells in (rps_cells, cpu_cells, mem_cells):
                    cells.append("n/a")
                continue
            if isinstance(w, MemWorkload):
                mem_cells.append(_ratio(peer["bpc_median"], ref["bpc_median"]))
                continue
            flag = " ‡" if _client_bound(ref) or _client_bound(peer) else ""
            rps_cells.append(_ratio(ref["rps_median"], peer["rps_median"]) + flag)
            cpu_cells.append(_ratio(peer["cpu_req_median"], ref["cpu_req_median"]) + flag)
        if isinstance(w, MemWorkload):
            mem_rows.append(f"| {name} | " + " | ".join(mem_cells) + " |")
        else:
            rps_rows.append(f"| {name} | " + " | ".join(rps_cells) + " |")
            cpu_rows.append(f"| {name} | " + " | ".join(cpu_cells) + " |")
    out: list[str] = []
    ceiling_note = (
        "The ceiling column compares with the plain-Rust server of the same workload (echo or "
        "HTTP)."
    )
    if len(rps_rows) > 2:
        out += [
            "### ferroloop vs each peer, requests/s",
            "",
            "ferroloop's median requests/s ÷ the peer's: **> 1 means ferroloop serves more**. "
            "‡: the load generator used more than 90 % of its core in ferroloop's or the peer's "
            "cell, so requests/s is capped by the client there; read the CPU table instead. "
            + ceiling_note,
            "",
            *rps_rows,
            "",
            "### ferroloop vs each peer, server CPU time per request",
            "",
            "The peer's median server CPU per request ÷ ferroloop's: **> 1 means ferroloop "
            "spends less CPU per request**. This is the comparison that holds where the client "
            "was the limit (‡).",
            "",
            *cpu_rows,
            "",
        ]
    if len(mem_rows) > 2:
        out += [
            "### ferroloop vs each peer, memory per idle connection",
            "",
            "The peer's median bytes per idle connection ÷ ferroloop's: **> 1 means ferroloop "
            "uses less memory per connection**.",
            "",
            *mem_rows,
            "",
        ]
    return out


def chart_groups(
    workloads: Sequence[str],
    loops: Sequence[str],
    stats: dict[tuple[str, str], dict[str, float]],
) -> list[chart.Group]:
    """The chart's bar groups for the network workloads, normalised to the chart's baseline
    loop: req/s (loop ÷ baseline), or, where any loop's load generator was the limit (‡), the
    baseline's server CPU per request ÷ the loop's; bytes per idle connection, baseline ÷ loop."""
    groups = []
    for name in workloads:
        w = NET_WORKLOADS[name]
        cells = {loop: stats.get((name, loop)) for loop in loops}
        if isinstance(w, MemWorkload):
            panel = "memory per idle connection"
            metric = {k: s["bpc_median"] if s else None for k, s in cells.items()}
            label, higher = f"{name} (bytes/conn)", False
        else:
            panel = {
                "http": "HTTP (wrk)",
                "tcp": "echo over TCP",
                "unix": "echo over Unix sockets",
                "tls": "echo over TLS",
            }["http" if w.family == "http" else w.transport]
            if any(s is not None and _client_bound(s) for s in cells.values()):
                metric = {k: s["cpu_req_median"] if s else None for k, s in cells.items()}
                label, higher = f"{name} ‡ (CPU/req)", False
            else:
                metric = {k: s["rps_median"] if s else None for k, s in cells.items()}
                label, higher = name, True
        groups.append(chart.Group(panel, label, chart.normalise(metric, higher)))
    return groups
