#!/usr/bin/env python3
"""Run upstream test suites (AnyIO, aiohttp) on the stdlib loop and on ferroloop.

Usage::

    python tests/upstream/run.py [--suite anyio|aiohttp]... [--loop asyncio|ferroloop]...
                                 [--no-install] [--no-rerun] [-k EXPR]

(``make upstream``, ``make upstream-anyio``, ``make upstream-aiohttp``; ``--no-install``
reuses the venvs and the ferroloop already in them, ``-k`` narrows both runs.)

For each suite (the versions pinned in pyproject.toml's ``test`` extra):

1. the published sdist is downloaded from PyPI (``pip download --no-binary``), its sha256
   checked against the one recorded here, and unpacked into ``tests/upstream/.cache/``;
2. a venv ``tests/upstream/.venv/<suite>`` gets the suite's test requirements (from the
   sdist: AnyIO's ``test`` dependency group, aiohttp's pinned ``requirements/test.txt``,
   less what cannot install or run here, see ``Suite.skip_requirements``), the library
   itself from PyPI at the pinned version (the tests run against the installed release,
   never the sdist's source tree: ``upstream_swap.py`` checks it), and ferroloop built
   from this checkout (one wheel per invocation, reinstalled every time);
3. the suite's pytest runs twice in that venv, with ``upstream_swap.py`` loaded: once on
   the stdlib loop, once with ferroloop swapped in (see that plugin for how), each test's
   outcome streamed to ``.cache/results/<suite>-<loop>.jsonl``.  A run killed by a crash
   or a hang (no progress for the per-test timeout plus a minute) is restarted without
   the tests already recorded; the culprit is recorded as ``crash``/``timeout``;
4. ferroloop's failures are compared with the stdlib loop's and with
   ``<suite>-expected-failures.txt``.  A test that fails on ferroloop, passes on the
   stdlib loop and is not listed is run once more on ferroloop on its own; if it fails
   again the job fails (exit status 1), if it passes it is reported as flaky.  Listed
   tests that now pass are reported (so the list can shrink), and so are tests that fail
   on both loops (environment, flaky: never listed).  The job also fails when the
   ferroloop run did not run on ferroloop (``upstream_swap.py``'s check), on a collection
   error only ferroloop has, and on a pytest usage or internal error.

Tests deselected on both loops, with the reason, are ``Suite.deselect`` and
``Suite.environment_deselect`` (what this machine cannot run); they are printed first.

A summary table (``.cache/results/summary.md`` too) ends the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(HERE, ".cache")
VENVS = os.path.join(HERE, ".venv")
RESULTS = os.path.join(CACHE, "results")
LOOPS = ("asyncio", "ferroloop")
BAD = ("failed", "error", "crash", "timeout")
GOOD = ("passed", "xfailed", "xpassed")


@dataclasses.dataclass
class Suite:
    name: str
    version: str
    sha256: str
    # Requirements of the suite's tests, read from the unpacked sdist.
    requirements: Callable[[str], list[str]]
    # Requirement names not installed, with the reason.
    skip_requirements: dict[str, str]
    # pytest arguments (after the plugin's); run in the sdist's root.
    pytest_args: list[str]
    # nodeids (or prefixes: a file, a class) deselected on both loops, with the reason.
    deselect: dict[str, str]
    # The sdist's pytest configuration file.
    config_file: str
    # pytest-timeout's per-test limit the suite sets (the hang watchdog adds a minute).
    timeout: int
    # Deselections that depend on this machine: () -> {nodeid: reason}.
    environment_deselect: Callable[[], dict[str, str]] = dict
    # The sdist's copy of the library's package (not built: no C extensions), moved
    # aside after unpacking so that no process the tests start (``python -c "import
    # aiohttp._http_parser"`` in the sdist's root) imports it instead of the release.
    source_package: str | None = None
    # pip constraints, so that the venv is the same from run to run (aiohttp's
    # requirements/test.txt is pinned already; AnyIO's test group gives lower bounds only).
    constraints: list[str] = dataclasses.field(default_factory=list)


def _req_name(line: str) -> str:
    name = line.split(";", 1)[0]
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", " "):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def anyio_requirements(src: str) -> list[str]:
    with open(os.path.join(src, "pyproject.toml"), "rb") as f:
        group = tomllib.load(f)["dependency-groups"]["test"]
    return [" ".join(r.split()) for r in group]


def aiohttp_requirements(src: str) -> list[str]:
    reqs = []
    with open(os.path.join(src, "requirements", "test.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "-")):
                reqs.append(line)
    return reqs


def localhost_has_ipv6() -> bool:
    try:
        return bool(socket.getaddrinfo("localhost", 0, socket.AF_INET6, socket.SOCK_STREAM))
    except OSError:
        return False


def anyio_environment_deselect() -> dict[str, str]:
    if localhost_has_ipv6():
        return {}
    reason = (
        "'localhost' has no IPv6 address on this machine: fails on both loops, and the "
        "sockets its failed set-up leaves open raise ResourceWarnings in later tests"
    )
    return {
        "tests/test_sockets.py::TestTCPStream::*ipv6*": reason,
        "tests/test_sockets.py::TestTCPStream::test_happy_eyeballs[asyncio-dualstack]": reason,
        "tests/test_sockets.py::TestTCPStream::test_connection_refused[asyncio-multi]": reason,
    }


def aiohttp_environment_deselect() -> dict[str, str]:
    if os.geteuid() != 0:
        return {}
    reason = "runs as root here: a file without read permission is still readable"
    return {
        "tests/test_web_urldispatcher.py::test_static_directory_without_read_permission": reason,
        "tests/test_web_urldispatcher.py::test_static_file_without_read_permission": reason,
    }


SUITES = {
    "anyio": Suite(
        name="anyio",
        version="4.16.0",
        sha256="59bb03251907983d1603d27c3087ddb1e93299ea2163adcdba37899a4fb12ffb",
        requirements=anyio_requirements,
        skip_requirements={
            "uvloop": "only the plain asyncio backend runs",
            "winloop": "Windows only",
        },
        # The sdist's [tool.pytest] addopts stay (-p anyio, -p no:trio, strict config ...).
        pytest_args=["-m", "not network", "tests"],
        deselect={},
        config_file="pyproject.toml",
        timeout=20,
        environment_deselect=anyio_environment_deselect,
        constraints=[
            "blockbuster==1.5.29",
            "cffi==2.1.1",
            "coverage==7.17.3",
            "cryptography==50.0.2",
            "forbiddenfruit==0.1.4",
            "hypothesis==6.170.15",
            "idna==3.20",
            "iniconfig==2.3.1",
            "packaging==26.3",
            "pluggy==1.7.0",
            "psutil==7.2.2",
            "pycparser==3.12",
            "pygments==2.21.0",
            "pytest==9.2.0",
            "pytest-mock==3.17.0",
            "pytest-timeout==2.4.0",
            "sortedcontainers==2.4.0",
            "trustme==1.2.1",
            "truststore==0.10.5",
            "typing-extensions==4.16.0",
        ],
    ),
    "aiohttp": Suite(
        name="aiohttp",
        version="3.14.5",
        sha256="5558a7f5a05af9ecf744af91e5baefc436f93c9333e656c27ec253f9a6bbe178",
        requirements=aiohttp_requirements,
        skip_requirements={
            "uvloop": "the suite's uvloop params are not what is compared",
            "python-on-whales": "Docker, for the autobahn tests (deselected upstream too)",
            "mypy": "type checking, no test imports it",
            "pytest-xdist": "the runs are serial (2-core machine)",
            "pytest-cov": "coverage is not measured",
        },
        # The upstream addopts minus xdist and coverage; its marker selection kept.
        pytest_args=[
            "-o",
            "addopts=",
            "--strict-markers",
            "--doctest-modules",
            "-ra",
            "-m",
            "not dev_mode and not autobahn and not internal",
            "tests",
        ],
        deselect={},
        config_file="pytest.ini",
        timeout=120,
        environment_deselect=aiohttp_environment_deselect,
        source_package="aiohttp",
    ),
}


# -- helpers ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[upstream] {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(suite: Suite) -> str:
    """Download and unpack the sdist; return the unpacked source directory."""
    src = os.path.join(CACHE, f"{suite.name}-{suite.version}")
    if os.path.isfile(os.path.join(src, ".unpacked")):
        return src
    sdists = os.path.join(CACHE, "sdists")
    os.makedirs(sdists, exist_ok=True)
    archive = os.path.join(sdists, f"{suite.name}-{suite.version}.tar.gz")
    if not os.path.exists(archive) or sha256_of(archive) != suite.sha256:
        # --no-binary NAME: only this package from source (pip prepares its metadata).
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                suite.name,
                "--dest",
                sdists,
                f"{suite.name}=={suite.version}",
            ]
        )
    digest = sha256_of(archive)
    if digest != suite.sha256:
        raise SystemExit(f"{archive}: sha256 {digest}, expected {suite.sha256}")
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4+
            tar.extractall(CACHE, filter="data")
        else:
            tar.extractall(CACHE)  # a PyPI sdist whose sha256 was checked
    if suite.source_package:
        os.rename(
            os.path.join(src, suite.source_package),
            os.path.join(src, f"{suite.source_package}.sdist-source-unused"),
        )
    open(os.path.join(src, ".unpacked"), "w").close()
    return src


def venv_python(suite: Suite) -> str:
    return os.path.join(VENVS, suite.name, "bin", "python")


def prepare_venv(suite: Suite, src: str, wheel: str | None) -> None:
    venv = os.path.join(VENVS, suite.name)
    python = venv_python(suite)
    reqs = [r for r in suite.requirements(src) if _req_name(r) not in suite.skip_requirements]
    reqs.append(f"{suite.name}=={suite.version}")
    stamp_text = json.dumps([sys.version, reqs, suite.constraints])
    stamp = os.path.join(venv, ".requirements.json")
    if not os.path.exists(python):
        run([sys.executable, "-m", "venv", venv])
    if not os.path.exists(stamp) or open(stamp).read() != stamp_text:
        req_file = os.path.join(venv, "requirements.txt")
        constraints_file = os.path.join(venv, "constraints.txt")
        with open(req_file, "w") as f:
            f.write("\n".join(reqs) + "\n")
        with open(constraints_file, "w") as f:
            f.write("".join(c + "\n" for c in suite.constraints))
        run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        run([python, "-m", "pip", "install", "--quiet", "-r", req_file, "-c", constraints_file])
        with open(stamp, "w") as f:
            f.write(stamp_text)
    if wheel is not None:
        run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", wheel])


def build_wheel() -> str:
    out = os.path.join(CACHE, "wheel")
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, ROOT])
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return os.path.join(out, wheel)


# -- running a suite -------------------------------------------------------------------


def read_records(path: str) -> tuple[dict[str, dict], str | None, list[dict], list[dict]]:
    """Return (done records by nodeid, nodeid started but not done, sessions, collect errors)."""
    done: dict[str, dict] = {}
    started = None
    sessions, collect_errors = [], []
    if not os.path.exists(path):
        return done, None, sessions, collect_errors
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            event = rec["event"]
            if event == "start":
                started = rec["nodeid"]
            elif event == "done":
                done[rec["nodeid"]] = rec
                started = None
            elif event == "session":
                sessions.append(rec)
            elif event == "collect-error":
                collect_errors.append(rec)
    return done, started, sessions, collect_errors


class RecordTail:
    """Follows a record file as pytest appends to it: which test is running now."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.started: str | None = None
        self.partial = ""

    def poll(self) -> str | None:
        if not os.path.exists(self.path):
            return self.started
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset = f.tell()
        lines = (self.partial + data).split("\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec["event"] == "start":
                self.started = rec["nodeid"]
            elif rec["event"] == "done":
                self.started = None
        return self.started


def run_suite(
    suite: Suite,
    src: str,
    loop: str,
    extra: list[str],
    tag: str = "",
    only: list[str] | None = None,
) -> dict:
    """Run the suite's pytest on one loop; return the results summary."""
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"{suite.name}-{loop}{tag}")
    record, logfile, deselect_file = base + ".jsonl", base + ".log", base + ".deselect"
    for path in (record, logfile):
        if os.path.exists(path):
            os.unlink(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE
    for var in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        env.pop(var, None)
    pytest_exe = os.path.join(os.path.dirname(venv_python(suite)), "pytest")
    args = suite.pytest_args if only is None else [a for a in suite.pytest_args if a != "tests"]
    cmd = [
        pytest_exe,  # not "python -m pytest": the sdist's root must not be on sys.path
        # "--opt=value": a separate path argument would take part in pytest's rootdir search
        f"--rootdir={src}",
        f"--config-file={os.path.join(src, suite.config_file)}",
        "-p",
        "upstream_swap",
        f"--upstream-loop={loop}",
        f"--upstream-suite={suite.name}",
        f"--upstream-record={record}",
        f"--upstream-deselect-file={deselect_file}",
        *args,
        *extra,
        *(only or []),
    ]
    crashed: dict[str, dict] = {}
    t0 = time.monotonic()
    stall = suite.timeout + 60
    attempt = 0
    while True:
        attempt += 1
        done, _, _, _ = read_records(record)
        with open(deselect_file, "w", encoding="utf-8") as f:
            for nodeid, reason in {**suite.deselect, **suite.environment_deselect()}.items():
                f.write(f"{nodeid}  # {reason}\n")
            for nodeid in [*done, *crashed]:
                f.write(nodeid + "\n")
        if attempt == 1:
            log(f"{suite.name} on {loop}{tag}: running (log: {os.path.relpath(logfile, ROOT)})")
        else:
            log(f"{suite.name} on {loop}{tag}: restarting without the {len(done)} tests done")
        with open(logfile, "a", encoding="utf-8") as out:
            out.write(f"\n===== attempt {attempt}: {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(
                cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            tail = RecordTail(record)
            current, since, killed = None, time.monotonic(), False
            while proc.poll() is None:
                time.sleep(1)
                started = tail.poll()
                if started != current:
                    current, since = started, time.monotonic()
                elif current is not None and time.monotonic() - since > stall and not killed:
                    # A hang pytest-timeout could not break: dump the stacks, then kill.
                    killed = True
                    os.killpg(proc.pid, signal.SIGABRT)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.returncode
        done, started, _, _ = read_records(record)
        if started is not None and (killed or rc not in (0, 1, 5)):
            crashed[started] = {
                "event": "done",
                "nodeid": started,
                "outcome": "timeout" if killed else "crash",
                "message": f"no progress for {stall} s, killed"
                if killed
                else f"pytest died with status {rc}",
                "duration": None,
            }
            log(f"  {crashed[started]['outcome']}: {started} ({crashed[started]['message']})")
            if attempt < 50:
                continue
        break
    done, _, sessions, collect_errors = read_records(record)
    done.update(crashed)
    if rc not in (0, 1, 5) and not crashed:
        log(f"  pytest exited with status {rc}: see {os.path.relpath(logfile, ROOT)}")
    elapsed = time.monotonic() - t0
    return {
        "suite": suite.name,
        "loop": loop,
        "returncode": rc,
        "elapsed": elapsed,
        "tests": done,
        "sessions": sessions,
        "collect_errors": collect_errors,
        "log": logfile,
    }


def counts(result: dict) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for rec in result["tests"].values():
        o = rec["outcome"]
        if o in ("passed", "xfailed", "xpassed"):
            c["passed"] += 1
        elif o == "skipped":
            c["skipped"] += 1
        elif o == "failed":
            c["failed"] += 1
        else:  # error, crash, timeout
            c["errors"] += 1
    c["errors"] += len(result["collect_errors"])
    return c


def read_expected(suite: Suite) -> dict[str, str]:
    path = os.path.join(HERE, f"{suite.name}-expected-failures.txt")
    expected = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                nodeid, _, reason = line.partition(" #")
                expected[nodeid.strip()] = reason.strip()
    return expected


def fmt_counts(c: dict[str, int]) -> str:
    return f"{c['passed']} / {c['failed']} / {c['skipped']} / {c['errors']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=sorted(SUITES))
    parser.add_argument("--loop", action="append", choices=LOOPS)
    parser.add_argument("--no-install", action="store_true", help="reuse the venvs as they are")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (a partial run)")
    parser.add_argument("--no-rerun", action="store_true", help="don't rerun new failures")
    opts = parser.parse_args()
    suites = [SUITES[s] for s in (opts.suite or list(SUITES))]
    loops = opts.loop or list(LOOPS)
    extra = ["-k", opts.keyword] if opts.keyword else []

    wheel = None if opts.no_install else build_wheel()
    status = 0
    rows = []
    for suite in suites:
        src = fetch_sdist(suite)
        if not opts.no_install:
            prepare_venv(suite, src, wheel)
        for nodeid, reason in {**suite.deselect, **suite.environment_deselect()}.items():
            log(f"{suite.name}: deselected {nodeid}: {reason}")
        results = {loop: run_suite(suite, src, loop, extra) for loop in loops}
        for loop, res in results.items():
            c = counts(res)
            log(
                f"{suite.name} on {loop}: passed/failed/skipped/errors {fmt_counts(c)} "
                f"in {res['elapsed']:.0f} s (pytest status {res['returncode']})"
            )
            if res["returncode"] not in (0, 1, 5) and not any(
                r["outcome"] in ("crash", "timeout") for r in res["tests"].values()
            ):
                status = 1  # usage or internal error: the figures mean nothing
            for err in res["collect_errors"]:
                log(f"  collection error {err['nodeid']}: {err['message']}")
        if set(loops) == set(LOOPS):
            std_errors = {e["nodeid"] for e in results["asyncio"]["collect_errors"]}
            for err in results["ferroloop"]["collect_errors"]:
                if err["nodeid"] not in std_errors:
                    log(f"  NEW collection error on ferroloop: {err['nodeid']}")
                    status = 1
        status |= check_swap(results)
        expected = read_expected(suite)
        if set(loops) == set(LOOPS):
            bad, row = compare(suite, src, results, expected, extra, rerun=not opts.no_rerun)
            status |= bad
            rows.append(row)
    if rows:
        table = [
            "| suite | stdlib loop: passed / failed / skipped / errors | time "
            "| ferroloop: passed / failed / skipped / errors | time | expected failures |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
        with open(os.path.join(RESULTS, "summary.md"), "w") as f:
            f.write("\n".join(table) + "\n")
        print()
        print("\n".join(table))
    print()
    log("OK" if status == 0 else "FAILED: see above")
    return status


def check_swap(results: dict[str, dict]) -> int:
    """The ferroloop run must really have run on ferroloop."""
    res = results.get("ferroloop")
    if res is None:
        return 0
    bad = 0
    errors = {n: r["swap_error"] for n, r in res["tests"].items() if r.get("swap_error")}
    for nodeid, err in sorted(errors.items())[:20]:
        log(f"  SWAP ERROR {nodeid}: {err}")
    if errors:
        log(f"{len(errors)} tests of the ferroloop run did not run on ferroloop")
        bad = 1
    ran = sum(
        n
        for r in res["tests"].values()
        for kind, n in (r.get("ran_on") or {}).items()
        if kind.startswith("ferroloop.")
    )
    created: dict[str, int] = {}
    for rec in res["tests"].values():
        for kind, n in (rec.get("created") or {}).items():
            created[kind] = created.get(kind, 0) + n
    tests_stdlib = sorted(
        n
        for n, r in res["tests"].items()
        if any(not k.startswith("ferroloop.") for k in (r.get("created") or {}))
    )
    log(
        f"ferroloop run: {ran} test runners/loop fixtures checked to be ferroloop.Loop; "
        f"loops created: {created}; {len(tests_stdlib)} tests created a stdlib loop "
        "explicitly (e.g. asyncio.SelectorEventLoop())"
    )
    if not created.get("ferroloop._loop.Loop"):
        log("the ferroloop run created no ferroloop loop: the swap did not happen")
        bad = 1
    return bad


def compare(
    suite: Suite,
    src: str,
    results: dict[str, dict],
    expected: dict[str, str],
    extra: list[str],
    rerun: bool,
) -> tuple[int, str]:
    std, ferro = results["asyncio"]["tests"], results["ferroloop"]["tests"]
    status = 0
    only_std = sorted(set(std) - set(ferro))
    only_ferro = sorted(set(ferro) - set(std))
    if only_std or only_ferro:
        log(
            f"{suite.name}: {len(only_std)} tests ran on the stdlib loop only, "
            f"{len(only_ferro)} on ferroloop only (ids differ between runs)"
        )
        for n in (only_std + only_ferro)[:10]:
            log(f"  {n}")
    common = set(std) & set(ferro)
    new = sorted(
        n
        for n in common
        if ferro[n]["outcome"] in BAD and std[n]["outcome"] in GOOD and n not in expected
    )
    if new and rerun:
        log(f"{suite.name}: {len(new)} new failures on ferroloop; running them once more")
        again = run_suite(suite, src, "ferroloop", extra, tag="-rerun", only=new)["tests"]
        flaky = [n for n in new if again.get(n, {}).get("outcome") in GOOD]
        for n in flaky:
            log(f"  flaky on ferroloop (passed when run again): {n}")
        new = [n for n in new if n not in flaky]
    for n in new:
        rec = ferro[n]
        log(f"  NEW FAILURE on ferroloop ({rec['outcome']}): {n}: {rec['message']}")
    if new:
        status = 1
    fixed = sorted(n for n in expected if n in ferro and ferro[n]["outcome"] in GOOD)
    for n in fixed:
        log(f"  expected failure now passes (remove it from the list): {n}")
    missing = sorted(n for n in expected if n not in ferro)
    for n in missing if not extra else []:  # (a -k run leaves most of them out)
        log(f"  expected failure not run: {n}")
    still = sorted(n for n in expected if n in ferro and ferro[n]["outcome"] in BAD)
    both = sorted(n for n in common if ferro[n]["outcome"] in BAD and std[n]["outcome"] in BAD)
    for n in both:
        log(f"  fails on both loops (not ferroloop's): {n}: {std[n]['message'][:150]}")
    better = sorted(n for n in common if std[n]["outcome"] in BAD and ferro[n]["outcome"] in GOOD)
    for n in better:
        log(f"  fails on the stdlib loop only: {n}: {std[n]['message'][:150]}")
    log(
        f"{suite.name}: {len(new)} new failures on ferroloop, {len(still)} expected failures "
        f"still failing, {len(fixed)} fixed, {len(both)} failing on both loops"
    )
    std_res, ferro_res = results["asyncio"], results["ferroloop"]
    row = (
        f"| {suite.name} {suite.version} | {fmt_counts(counts(std_res))} "
        f"| {std_res['elapsed']:.0f} s | {fmt_counts(counts(ferro_res))} "
        f"| {ferro_res['elapsed']:.0f} s | {len(still)} |"
    )
    return status, row


if __name__ == "__main__":
    sys.exit(main())
