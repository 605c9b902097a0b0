#!/usr/bin/env python3
"""Run CPython's own asyncio test-suite against ferroloop.

The test modules are imported from the running interpreter (``test.test_asyncio``),
never copied.  Usage::

    python tests/conformance/runner.py --loop {ferroloop,asyncio} [--json OUT] [MODULE...]

Every module runs in its own child process (``--child``), which

* installs a counting event-loop policy, so that ``asyncio.new_event_loop()``,
  ``asyncio.run()``, ``asyncio.Runner()`` and ``IsolatedAsyncioTestCase`` create loops of
  the loop under test, and makes ``asyncio.set_event_loop_policy(None)`` fall back to that
  policy (``asyncio.events._init_event_loop_policy`` does ``from . import
  DefaultEventLoopPolicy``, so rebinding ``asyncio.DefaultEventLoopPolicy`` is enough);
* replaces the stdlib's loop-class-specific test classes (EPoll/Poll/Select/Kqueue/
  Proactor variants) by ``Ferroloop*`` classes combining the stdlib mixin with a
  ``create_event_loop``/``new_loop`` that returns a loop under test;
* streams one JSON record per test (outcome, first error line, number of loops under
  test created while the test ran) to a file the parent reads.

``--loop asyncio`` runs exactly the same machinery with the stdlib loop
(``asyncio.SelectorEventLoop`` and the stdlib default policy, only wrapped for counting):
it validates the runner itself and must pass (nearly) everything.

The parent kills a child whose current test runs longer than the per-test timeout (with
SIGABRT first, so faulthandler dumps every thread's stack), records that test as
``timeout`` (or ``crash`` if the child died by itself) and restarts the module without the
tests already recorded, until the module's time budget is spent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED_FILE = os.path.join(HERE, "expected_failures.txt")
PACKAGE = "test.test_asyncio"

# Modules that must conform now.
CORE_MODULES = [
    "test_events",
    "test_tasks",
    "test_futures",
    "test_futures2",
    "test_locks",
    "test_queues",
    "test_sock_lowlevel",
    "test_runners",
    "test_timeouts",
    "test_taskgroups",
    "test_context",
    "test_pep492",
    "test_waitfor",
    "test_threads",
]
# Transports, servers, TLS, subprocesses.
NEXT_MODULES = [
    "test_streams",
    "test_server",
    "test_sendfile",
    "test_subprocess",
    "test_ssl",
    "test_sslproto",
    "test_buffered_proto",
    "test_protocols",
    "test_transports",
    # Mostly the stdlib's own Unix loop and child watchers on mocks; what runs on a
    # loop under test is kept.
    "test_unix_events",
]
ALL_MODULES = CORE_MODULES + NEXT_MODULES

# Time budget (seconds) of a whole module, restarts included.  On the stdlib loop (2 cores)
# test_tasks takes ~18 s, test_subprocess ~13 s, test_ssl ~9 s, test_taskgroups ~6 s,
# test_sslproto ~5 s and every other module under 3 s.  The budgets leave room for a slower
# loop and a couple of hung tests (each costs TEST_TIMEOUT).  tests/test_conformance.py
# additionally caps the whole session (see SESSION_BUDGET there).
DEFAULT_MODULE_BUDGET = 40
MODULE_BUDGET = {
    "test_events": 90,
    "test_tasks": 90,
    "test_sock_lowlevel": 45,
    "test_taskgroups": 45,
    "test_streams": 60,
    "test_sendfile": 45,
    "test_subprocess": 90,
    "test_ssl": 90,
    "test_sslproto": 60,
}
# A test running longer than this is killed as hung.  The slowest stdlib asyncio test takes
# ~2.5 s on the stdlib loop, but a failing test often waits out one
# support.LOOPBACK_TIMEOUT (10 s) for a helper thread/server; 15 s stays clear of that and
# below 2 * LOOPBACK_TIMEOUT and support.SHORT_TIMEOUT (30 s), so tests stuck on those
# deadlines are classified the same way on every run.
DEFAULT_TEST_TIMEOUT = 15.0
MAX_RESTARTS = 25

PASS_OUTCOMES = ("pass", "xfail")
FAIL_OUTCOMES = ("fail", "xpass")
ERROR_OUTCOMES = ("error", "timeout", "crash")
BAD_OUTCOMES = FAIL_OUTCOMES + ERROR_OUTCOMES


EXPECTED_HEADER = """\
# Expected failures of CPython's asyncio tests (the installed interpreter's
# test.test_asyncio) under ferroloop, as run by tests/conformance/runner.py.
# One test id per line, then '  # reason'.  The list must only shrink:
# tests/test_conformance.py fails when a listed test passes (remove its line then).
# Current failures in this file's format (reasons must be written by a human):
#   python tests/conformance/runner.py --loop ferroloop --update-expected
# 'stdlib detail' = the test pokes a private attribute of the stdlib loop classes;
# 'not implemented yet' = the loop method is AbstractEventLoop's NotImplementedError stub.
"""


def module_budget(module: str) -> float:
    return MODULE_BUDGET.get(module, DEFAULT_MODULE_BUDGET)


# ---------------------------------------------------------------------------------------
# Expected-failure list
# ---------------------------------------------------------------------------------------


def load_expected(path: str = EXPECTED_FILE) -> dict[str, str]:
    """Parse ``test id  # reason`` lines into {id: reason}."""
    expected: dict[str, str] = {}
    if not os.path.exists(path):
        return expected
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tid, _, reason = line.partition("#")
            tid = tid.strip()
            if not tid or " " in tid:
                raise ValueError(f"{path}:{lineno}: malformed line {raw!r}")
            if tid in expected:
                raise ValueError(f"{path}:{lineno}: duplicate entry {tid}")
            expected[tid] = reason.strip()
    return expected


def module_of(test_id: str) -> str:
    return test_id.split(".", 1)[0]


def _complete(module_result: dict) -> bool:
    """Whether every test of the module ran (no -k filter, no crash/timeout)."""
    return module_result["status"] == "ok" and not module_result.get("filtered")


def compare(module_result: dict, expected: dict[str, str]) -> dict[str, list]:
    """Compare one module's results with the expected-failure list.

    Returns {"unexpected": [(id, record)], "fixed": [id], "stale": [id]}:
    failures/errors not on the list, listed tests that now pass, and listed tests that did
    not run at all although the module completed.
    """
    module = module_result["module"]
    tests = module_result["tests"]
    listed = {tid for tid in expected if module_of(tid) == module}
    unexpected = [
        (tid, rec)
        for tid, rec in sorted(tests.items())
        if rec["outcome"] in BAD_OUTCOMES and tid not in listed
    ]
    fixed = sorted(tid for tid in listed if tid in tests and tests[tid]["outcome"] in PASS_OUTCOMES)
    stale = []
    if _complete(module_result):
        stale = sorted(tid for tid in listed if tid not in tests)
    return {"unexpected": unexpected, "fixed": fixed, "stale": stale}


# ---------------------------------------------------------------------------------------
# Child: runs one module in-process
# ---------------------------------------------------------------------------------------


class _Counter:
    value = 0  # loops of the loop under test created so far
    stdlib = 0  # real stdlib selector loops created so far (in ferroloop mode: escapes)


def _short_path(path: str) -> str:
    for marker in ("/test/test_asyncio/", "/lib/python3", "/site-packages/"):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + 1 :]
            if marker == "/lib/python3":
                rest = rest.split("/", 1)[1] if "/" in rest else rest
            return rest
    return path


def normalize_id(raw: str) -> str:
    """``test.test_asyncio.test_x.Cls.test_y`` -> ``test_x.Cls.test_y``.

    unittest reports fixture errors as ``setUpClass (test.test_asyncio.test_x.Cls)``;
    those become ``test_x.Cls.setUpClass``.
    """
    m = re.fullmatch(r"(\w+) \(([\w.]+)\)", raw)
    if m:
        raw = f"{m.group(2)}.{m.group(1)}"
    prefix = PACKAGE + "."
    if raw.startswith(prefix):
        raw = raw[len(prefix) :]
    return raw


def _install(kind: str):
    """Install the loop under test; return (make_loop, loop_type)."""
    import asyncio
    import asyncio.unix_events

    if kind == "ferroloop":
        import ferroloop

        base_policy = ferroloop.EventLoopPolicy
        raw_factory = ferroloop.new_event_loop
        loop_type = ferroloop.Loop
    else:
        base_policy = asyncio.unix_events._UnixDefaultEventLoopPolicy
        raw_factory = asyncio.SelectorEventLoop
        loop_type = asyncio.SelectorEventLoop

    def note(loop):
        if isinstance(loop, loop_type):
            _Counter.value += 1
        return loop

    def make_loop():
        return note(raw_factory())

    class ConformancePolicy(base_policy):
        """The loop-under-test policy, counting the loops it creates."""

        def new_event_loop(self):
            return note(super().new_event_loop())

    ConformancePolicy.__name__ = ConformancePolicy.__qualname__ = f"{kind}ConformancePolicy"

    # asyncio.events._init_event_loop_policy() does `from . import DefaultEventLoopPolicy`
    # on every set_event_loop_policy(None) + get_event_loop_policy(): rebinding the
    # package attribute makes the reset fall back to our policy.
    asyncio.DefaultEventLoopPolicy = ConformancePolicy
    asyncio.unix_events.DefaultEventLoopPolicy = ConformancePolicy
    asyncio.set_event_loop_policy(None)
    asyncio.set_event_loop_policy(ConformancePolicy())

    # Count real stdlib loops too: under ferroloop, a test creating one either names a
    # stdlib loop class explicitly or escaped the patching (mocks such as
    # test_utils.TestLoop are BaseEventLoops but not selector loops, so not counted).
    from asyncio import selector_events

    original_init = selector_events.BaseSelectorEventLoop.__init__

    def counting_init(self, *args, **kwargs):
        _Counter.stdlib += 1
        original_init(self, *args, **kwargs)

    selector_events.BaseSelectorEventLoop.__init__ = counting_init

    _patch_test_utils()
    return make_loop, loop_type


def _patch_test_utils():
    """Make test_utils.TestCase.close_loop tolerate loops without ``_default_executor``.

    close_loop is test *harness* code (a cleanup registered for every loop) that peeks at
    ``BaseEventLoop._default_executor`` only to decide whether to shut the default
    executor down; for loops without that attribute we call the public
    ``shutdown_default_executor()`` instead.  Loops that have the attribute (the stdlib
    loop) go through the original code unchanged.
    """
    import types

    from test.test_asyncio import utils as test_utils

    original = test_utils.TestCase.close_loop
    if getattr(original, "_conformance_patched", False):
        return

    def close_loop(loop):
        if hasattr(loop, "_default_executor"):
            return original(loop)
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_default_executor())
        # Let the original close the loop and join child-watcher threads.
        proxy = types.SimpleNamespace(
            _default_executor=None, is_closed=loop.is_closed, close=loop.close
        )
        return original(proxy)

    close_loop._conformance_patched = True
    test_utils.TestCase.close_loop = staticmethod(close_loop)


# Loop-class-specific stdlib classes: they test the stdlib loops, not ours.
_STDLIB_LOOP_CLASSES = (
    "SelectEventLoopTests",
    "ProactorEventLoopTests",
    "KqueueEventLoopTests",
    "EPollEventLoopTests",
    "PollEventLoopTests",
)


def _drop(mod, names):
    for name in names:
        if hasattr(mod, name):
            delattr(mod, name)


def _add(mod, name, bases, ns=None, *, only=None):
    """Define ``name`` in ``mod`` (so module fixtures and ids work as for stdlib classes).

    ``only``: restrict the tests to those defined by that mixin.
    """
    ns = dict(ns or {})
    if only is not None:
        keep = {n for n in dir(only) if n.startswith("test")}
        for base in bases:
            for n in dir(base):
                if n.startswith("test") and n not in keep:
                    ns[n] = None  # not callable -> not collected by the loader
    cls = type(name, bases, ns)
    cls.__module__ = mod.__name__
    cls.__qualname__ = name
    setattr(mod, name, cls)
    return cls


def _borrow(mod, cls_name, *test_names):
    """Borrow loop-generic tests that the stdlib placed in a loop-specific class."""
    src = vars(getattr(mod, cls_name))
    return {n: src[n] for n in test_names if n in src}


def adapt_module(mod, make_loop) -> None:
    """Swap the stdlib loop-specific classes of ``mod`` for loop-under-test ones."""
    import unittest

    from test.test_asyncio import utils as test_utils

    def create_event_loop(self):
        return make_loop()

    def new_loop(self):
        return make_loop()

    name = mod.__name__.rsplit(".", 1)[-1]
    if name == "test_events":
        _drop(mod, _STDLIB_LOOP_CLASSES)
        _add(
            mod,
            "FerroloopEventLoopTests",
            (mod.EventLoopTestsMixin, test_utils.TestCase),
            {"create_event_loop": create_event_loop},
        )
        # The Unix mixin installs a SafeChildWatcher for the subprocess tests; keep those
        # in their own class so a missing child-watcher feature doesn't fail every
        # EventLoopTestsMixin test.
        _add(
            mod,
            "FerroloopSubprocessTests",
            (mod.UnixEventLoopTestsMixin, mod.SubprocessTestsMixin, test_utils.TestCase),
            {"create_event_loop": create_event_loop},
            only=mod.SubprocessTestsMixin,
        )
    elif name == "test_sock_lowlevel":
        _drop(mod, _STDLIB_LOOP_CLASSES)
        _add(
            mod,
            "FerroloopSockTests",
            (mod.BaseSockTestsMixin, test_utils.TestCase),
            {"create_event_loop": create_event_loop},
        )
    elif name == "test_sendfile":
        _drop(mod, _STDLIB_LOOP_CLASSES)
        _add(
            mod,
            "FerroloopSendfileTests",
            (mod.SendfileTestsBase, test_utils.TestCase),
            {"create_event_loop": create_event_loop},
        )
    elif name == "test_server":
        borrowed = _borrow(mod, "SelectorStartServerTests", "test_start_unix_server_1")
        _drop(mod, ("SelectorStartServerTests", "ProactorStartServerTests"))
        _add(
            mod,
            "FerroloopStartServerTests",
            (mod.BaseStartServer, unittest.TestCase),
            {"new_loop": new_loop, **borrowed},
        )
    elif name == "test_sslproto":
        _drop(mod, ("SelectorStartTLSTests", "ProactorStartTLSTests"))
        cls = _add(
            mod,
            "FerroloopStartTLSTests",
            (mod.BaseStartTLS, unittest.TestCase),
            {"new_loop": new_loop},
        )
        if mod.ssl is None:
            unittest.skip("No ssl module")(cls)
    elif name == "test_buffered_proto":
        _drop(mod, ("BufferedProtocolSelectorTests", "BufferedProtocolProactorTests"))
        _add(
            mod,
            "FerroloopBufferedProtocolTests",
            (mod.BaseTestBufferedProtocol, unittest.TestCase),
            {"new_loop": new_loop},
        )
    elif name == "test_subprocess":
        # The watcher classes build their loop with policy.new_event_loop(): loop-generic.
        _drop(mod, ("SubprocessProactorTests",))
    # Every other module is written against "any loop" (asyncio.new_event_loop(),
    # asyncio.run(), IsolatedAsyncioTestCase, or the stdlib's TestLoop mock).


def _iter_tests(suite):
    import unittest

    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter_tests(item)
        else:
            yield item


def _error_info(err, failure_exception) -> dict:
    import traceback

    etype, value, tb = err
    text = str(value).strip()
    first = text.splitlines()[0] if text else ""
    msg = f"{etype.__name__}: {first}" if first else etype.__name__
    frames = traceback.extract_tb(tb)
    where = ""
    if frames:
        fr = frames[-1]
        where = f"{_short_path(fr.filename)}:{fr.lineno} in {fr.name}"
    test_where = ""
    for fr in reversed(frames):
        if "/test_asyncio/" in fr.filename:
            test_where = f"{_short_path(fr.filename)}:{fr.lineno} in {fr.name}"
            break
    full = "".join(traceback.format_exception(etype, value, tb))
    return {
        "error": msg[:300],
        "where": where,
        "test_where": test_where,
        "traceback": full[-4000:],
        "is_failure": issubclass(etype, failure_exception),
    }


_RANK = {"pass": 0, "xfail": 1, "skip": 2, "xpass": 3, "fail": 4, "error": 5}


def _make_result_class():
    import threading
    import unittest

    class StreamResult(unittest.TestResult):
        """Writes one JSON line per event to ``out`` (flushed at once)."""

        def __init__(self, out):
            super().__init__()
            self._out = out
            self._lock = threading.Lock()
            self._rec = None
            self._t0 = 0.0
            self._loops0 = 0
            self._stdlib0 = 0

        def emit(self, obj):
            with self._lock:
                self._out.write(json.dumps(obj) + "\n")
                self._out.flush()

        def startTest(self, test):
            super().startTest(test)
            tid = normalize_id(test.id())
            self._rec = {"id": tid, "outcome": "pass"}
            self._loops0 = _Counter.value
            self._stdlib0 = _Counter.stdlib
            self._t0 = time.monotonic()
            self.emit({"event": "start", "id": tid})

        def _record(self, test, outcome, info=None):
            tid = normalize_id(test.id())
            rec = self._rec
            if rec is None or rec["id"] != tid:
                # Fixture error (setUpClass/setUpModule/...) outside a test.
                rec = {"id": tid, "outcome": outcome, "loops": 0, "duration": 0.0}
                rec.update(info or {})
                self.emit({"event": "result", **rec})
                return
            if _RANK[outcome] > _RANK[rec["outcome"]]:
                rec["outcome"] = outcome
                rec.update(info or {})

        def addSuccess(self, test):
            super().addSuccess(test)

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._record(test, "fail", _error_info(err, test.failureException))

        def addError(self, test, err):
            super().addError(test, err)
            self._record(test, "error", _error_info(err, getattr(test, "failureException", ())))

        def addSubTest(self, test, subtest, err):
            super().addSubTest(test, subtest, err)
            if err is not None:
                info = _error_info(err, test.failureException)
                info["error"] = f"{subtest._subDescription()} {info['error']}"[:300]
                self._record(test, "fail" if info["is_failure"] else "error", info)

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._record(test, "skip", {"error": str(reason)[:300]})

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._record(test, "xfail")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._record(test, "xpass", {"error": "unexpected success"})

        def stopTest(self, test):
            super().stopTest(test)
            rec = self._rec
            if rec is not None:
                rec["loops"] = _Counter.value - self._loops0
                rec["stdlib_loops"] = _Counter.stdlib - self._stdlib0
                rec["duration"] = round(time.monotonic() - self._t0, 3)
                rec.pop("is_failure", None)
                self.emit({"event": "result", **rec})
            self._rec = None

    return StreamResult


def child_main(args) -> int:
    import faulthandler
    import importlib
    import unittest

    faulthandler.enable(all_threads=True)
    out = open(args.stream, "a", encoding="utf-8")

    def emit(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    exclude: set[str] = set()
    if args.exclude_file:
        with open(args.exclude_file, encoding="utf-8") as f:
            exclude = {line.strip() for line in f if line.strip()}

    make_loop, _ = _install(args.loop)
    mod = importlib.import_module(f"{PACKAGE}.{args.child}")
    adapt_module(mod, make_loop)
    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    tests = [
        t
        for t in _iter_tests(suite)
        if normalize_id(t.id()) not in exclude
        and (not args.filter or any(k in normalize_id(t.id()) for k in args.filter))
    ]
    emit({"event": "collected", "count": len(tests)})
    result = _make_result_class()(out)
    unittest.TestSuite(tests).run(result)
    emit({"event": "done"})
    out.close()
    return 0


# ---------------------------------------------------------------------------------------
# Parent: one child process per module
# ---------------------------------------------------------------------------------------


def _read_new_lines(path: str, state: dict) -> list[dict]:
    try:
        with open(path, "rb") as f:
            f.seek(state.get("offset", 0))
            data = f.read()
    except FileNotFoundError:
        return []
    state["offset"] = state.get("offset", 0) + len(data)
    lines = (state.get("partial", b"") + data).split(b"\n")
    state["partial"] = lines.pop()
    events = []
    for line in lines:
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def _tail(path: str, nbytes: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _faulthandler_dump(log_text: str) -> tuple[str, str, str]:
    """(dump, innermost frame, innermost test_asyncio frame) of the main thread.

    Parsed from the last faulthandler dump (``Fatal Python error: ...`` then one block per
    thread) in the child's output; empty strings if there is none.
    """
    start = log_text.rfind("Fatal Python error")
    if start < 0:
        return "", "", ""
    dump = log_text[start:]
    m = re.search(r"Current thread 0x\w+ \(most recent call first\):\n((?:\s+File .*\n?)+)", dump)
    frames = []
    if m:
        for line in m.group(1).splitlines():
            fm = re.match(r'\s+File "([^"]+)", line (\d+) in (\S+)', line)
            if fm:
                frames.append((fm.group(1), fm.group(2), fm.group(3)))
    where = test_where = ""
    if frames:
        where = f"{_short_path(frames[0][0])}:{frames[0][1]} in {frames[0][2]}"
        for path, line, func in frames:
            if "/test_asyncio/" in path:
                test_where = f"{_short_path(path)}:{line} in {func}"
                break
    return dump, where, test_where


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGABRT)  # faulthandler dumps all threads' stacks
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_module(
    module: str,
    loop: str,
    *,
    budget: float | None = None,
    test_timeout: float = DEFAULT_TEST_TIMEOUT,
    filters: list[str] | None = None,
    log_dir: str | None = None,
    verbose: bool = False,
) -> dict:
    budget = module_budget(module) if budget is None else budget
    workdir = tempfile.mkdtemp(prefix=f"conformance-{module}-")
    stream = os.path.join(workdir, "results.jsonl")
    log_path = os.path.join(workdir, "output.log")
    exclude_path = os.path.join(workdir, "exclude.txt")
    tests: dict[str, dict] = {}
    started_at = time.monotonic()
    deadline = started_at + budget
    status, detail, restarts, rc, collected = "ok", "", 0, None, None
    state: dict = {}
    try:
        while True:
            with open(exclude_path, "w", encoding="utf-8") as f:
                f.write("\n".join(sorted(tests)))
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                module,
                "--loop",
                loop,
                "--stream",
                stream,
                "--exclude-file",
                exclude_path,
            ]
            for k in filters or ():
                cmd += ["-k", k]
            with open(log_path, "ab") as log:
                log.write(f"\n===== {' '.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            current, current_t0, done, why = None, None, False, None
            while True:
                rc = proc.poll()
                for ev in _read_new_lines(stream, state):
                    kind = ev.pop("event")
                    if kind == "start":
                        current, current_t0 = ev["id"], time.monotonic()
                    elif kind == "result":
                        tests[ev["id"]] = ev
                        if ev["id"] == current:
                            current = None
                        if verbose:
                            print(f"  {ev['outcome']:7} {ev['id']}", file=sys.stderr)
                    elif kind == "collected":
                        if collected is None:
                            collected = ev["count"]
                    elif kind == "done":
                        done = True
                if rc is not None:
                    break
                now = time.monotonic()
                if current is not None and now - current_t0 > test_timeout:
                    why = "timeout"
                    _kill(proc)
                    continue
                if now > deadline:
                    why = "budget"
                    _kill(proc)
                    continue
                time.sleep(0.05)

            if done and rc == 0:
                break
            if done:
                status, detail = "crash", f"exit status {rc} after all tests ran"
                break
            log_text = _tail(log_path)
            dump, where, test_where = _faulthandler_dump(log_text)
            if current is not None:
                if why == "timeout":
                    outcome, err = "timeout", f"hung: still running after {test_timeout:g}s"
                elif why == "budget":
                    outcome, err = "timeout", f"module budget of {budget:g}s exhausted"
                else:
                    outcome, err = "crash", f"process died ({_describe_rc(rc)})"
                tests[current] = {
                    "id": current,
                    "outcome": outcome,
                    "error": err,
                    "where": where,
                    "test_where": test_where,
                    "traceback": (dump or log_text)[-4000:],
                    "loops": -1,
                    "duration": round(time.monotonic() - current_t0, 3),
                }
            if why == "budget":
                status, detail = "timeout", f"module budget of {budget:g}s exhausted"
                break
            if current is None:
                status = "crash"
                detail = f"process died outside a test ({_describe_rc(rc)}) {where}".strip()
                break
            restarts += 1
            if restarts > MAX_RESTARTS:
                status, detail = "crash", f"gave up after {MAX_RESTARTS} restarts"
                break
            # The partially written line (if any) belongs to the dead child.
            state["partial"] = b""
    finally:
        log_tail = _tail(log_path) if status != "ok" else ""
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            shutil.copy(log_path, os.path.join(log_dir, f"{module}.log"))
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "module": module,
        "loop": loop,
        "status": status,
        "detail": detail,
        "restarts": restarts,
        "returncode": rc,
        "collected": collected,
        "duration": round(time.monotonic() - started_at, 2),
        "budget": budget,
        "filtered": bool(filters),
        "tests": tests,
        "log_tail": log_tail,
    }


def _describe_rc(rc) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def counts(module_result: dict) -> dict:
    c = dict(ran=0, passed=0, failed=0, errors=0, skipped=0, on_loop=0, passed_on_loop=0)
    for rec in module_result["tests"].values():
        c["ran"] += 1
        out = rec["outcome"]
        if out in PASS_OUTCOMES:
            c["passed"] += 1
        elif out in FAIL_OUTCOMES:
            c["failed"] += 1
        elif out in ERROR_OUTCOMES:
            c["errors"] += 1
        elif out == "skip":
            c["skipped"] += 1
        if out != "skip" and rec.get("loops", 0) > 0:
            c["on_loop"] += 1
            if out in PASS_OUTCOMES:
                c["passed_on_loop"] += 1
    return c


def format_table(results: list[dict], loop: str) -> str:
    head = (
        f"{'module':22} {'status':8} {'ran':>5} {'passed':>6} {'failed':>6} {'errors':>6} "
        f"{'skipped':>7} {'on-' + loop:>13} {'passed-on-' + loop:>19} {'time':>6}"
    )
    lines = [head, "-" * len(head)]
    total = dict.fromkeys(counts({"tests": {}}), 0)
    for r in results:
        c = counts(r)
        for k in total:
            total[k] += c[k]
        lines.append(
            f"{r['module']:22} {r['status']:8} {c['ran']:5} {c['passed']:6} {c['failed']:6} "
            f"{c['errors']:6} {c['skipped']:7} {c['on_loop']:13} {c['passed_on_loop']:19} "
            f"{r['duration']:6.1f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'TOTAL':22} {'':8} {total['ran']:5} {total['passed']:6} {total['failed']:6} "
        f"{total['errors']:6} {total['skipped']:7} {total['on_loop']:13} "
        f"{total['passed_on_loop']:19}"
    )
    notes = [
        f"  {r['module']}: {r['status']} {r['detail']}".rstrip()
        + (f" ({r['restarts']} restarts after hung/crashed tests)" if r["restarts"] else "")
        for r in results
        if r["status"] != "ok" or r["detail"] or r["restarts"]
    ]
    if loop != "asyncio":
        for r in results:
            escaped = [t for t, rec in r["tests"].items() if rec.get("stdlib_loops", 0) > 0]
            if escaped:
                notes.append(
                    f"  {r['module']}: {len(escaped)} tests created a stdlib selector loop "
                    f"(e.g. {escaped[0]})"
                )
    if notes:
        lines += ["", "notes:", *notes]
    lines += [
        "",
        f"on-{loop}: tests (not skipped) that created at least one {loop} loop; the rest ran",
        "only on mocks such as test_utils.TestLoop or on no loop at all.",
    ]
    return "\n".join(lines)


def format_expected(results: list[dict], expected: dict[str, str]) -> str:
    """The expected-failure file body for the current failures.

    Existing reasons are kept; new entries get a TODO with the first error line.  Entries
    of modules that were not run are kept unchanged.
    """
    ran = {r["module"] for r in results}
    out = EXPECTED_HEADER.splitlines()
    modules = sorted(
        ran | {module_of(t) for t in expected},
        key=lambda m: (ALL_MODULES.index(m) if m in ALL_MODULES else len(ALL_MODULES), m),
    )
    by_module = {r["module"]: r for r in results}
    for module in modules:
        listed = {t: reason for t, reason in expected.items() if module_of(t) == module}
        entries = dict(listed)
        r = by_module.get(module)
        if r is not None:
            entries = {}
            for tid, rec in r["tests"].items():
                if rec["outcome"] not in BAD_OUTCOMES:
                    continue
                reason = listed.get(tid)
                if not reason:
                    reason = f"TODO: [{rec['outcome']}] {rec.get('error', '')}".strip()
                    if rec.get("where"):
                        reason += f" (at {rec['where']})"
                entries[tid] = reason
            if not _complete(r):  # keep entries for tests that did not run this time
                for tid, reason in listed.items():
                    if tid not in r["tests"]:
                        entries[tid] = reason
        if entries:
            out += ["", f"# --- {module}"]
            out += [f"{tid}  # {reason}" for tid, reason in sorted(entries.items())]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", metavar="MODULE", help="e.g. test_tasks (default: all)")
    p.add_argument("--loop", choices=("ferroloop", "asyncio"), default="ferroloop")
    p.add_argument("--json", metavar="OUT", help="write full results as JSON")
    p.add_argument(
        "--timeout", type=float, help="module time budget in seconds (default: per module)"
    )
    p.add_argument("--test-timeout", type=float, default=DEFAULT_TEST_TIMEOUT)
    p.add_argument("-j", "--jobs", type=int, default=1, help="modules run in parallel")
    p.add_argument("-k", dest="filter", action="append", help="only test ids containing this")
    p.add_argument("-v", "--verbose", action="store_true", help="print every test outcome")
    p.add_argument("--log-dir", help="keep every module's output log here")
    p.add_argument(
        "--expected",
        default=EXPECTED_FILE,
        help="expected-failure list (for --check / --update-expected)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 on failures not in the expected list or listed tests that pass",
    )
    p.add_argument(
        "--update-expected",
        action="store_true",
        help="print the current failures in the expected-failure file format on stdout",
    )
    p.add_argument(
        "--show-failures", action="store_true", help="print each failing test's error line"
    )
    # internal
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    p.add_argument("--exclude-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        return child_main(args)

    modules = args.modules or ALL_MODULES
    for m in modules:
        if not re.fullmatch(r"test_\w+", m):
            p.error(f"bad module name {m!r} (expected e.g. test_tasks)")
    report = sys.stderr if args.update_expected else sys.stdout

    def one(module):
        r = run_module(
            module,
            args.loop,
            budget=args.timeout,
            test_timeout=args.test_timeout,
            filters=args.filter,
            log_dir=args.log_dir,
            verbose=args.verbose,
        )
        c = counts(r)
        print(
            f"[{module}] {r['status']} in {r['duration']:.1f}s: {c['passed']} passed, "
            f"{c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped",
            file=report,
            flush=True,
        )
        return r

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
        results = list(ex.map(one, modules))

    if args.show_failures:
        for r in results:
            for tid, rec in sorted(r["tests"].items()):
                if rec["outcome"] in BAD_OUTCOMES:
                    print(f"{rec['outcome']:7} {tid}\n        {rec.get('error', '')}", file=report)
                    if rec.get("where"):
                        print(f"        at {rec['where']}", file=report)
    print(file=report)
    print(format_table(results, args.loop), file=report)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"loop": args.loop, "python": sys.version, "modules": results},
                f,
                indent=1,
                sort_keys=True,
            )

    rc = 0
    if any(r["status"] != "ok" for r in results):
        rc = 1
    if args.check or args.update_expected:
        expected = load_expected(args.expected)
    if args.check:
        for r in results:
            cmp = compare(r, expected)
            for tid, rec in cmp["unexpected"]:
                print(f"UNEXPECTED {rec['outcome']}: {tid}: {rec.get('error', '')}", file=report)
            for tid in cmp["fixed"]:
                print(f"NOW PASSING (remove from list): {tid}", file=report)
            for tid in cmp["stale"]:
                print(f"STALE (not run, remove from list): {tid}", file=report)
            if any(cmp.values()):
                rc = 1
    if args.update_expected:
        sys.stdout.write(format_expected(results, expected))
    return rc


if __name__ == "__main__":
    sys.exit(main())
