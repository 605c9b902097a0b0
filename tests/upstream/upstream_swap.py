"""pytest plugin of ``tests/upstream/run.py``: swaps ferroloop in and records outcomes.

``run.py`` loads it into an upstream suite's pytest with ``-p upstream_swap`` (it puts
this folder on ``PYTHONPATH``); the upstream test files are never edited.

``--upstream-loop ferroloop``
    * the event-loop policy becomes ``ferroloop.EventLoopPolicy`` and
      ``asyncio.DefaultEventLoopPolicy`` is rebound to it, so ``asyncio.new_event_loop()``,
      ``asyncio.run()``, ``asyncio.Runner()`` and a later ``set_event_loop_policy(None)``
      all give ferroloop loops (aiohttp's ``loop_factory`` is ``asyncio.new_event_loop``);
    * AnyIO: every test on the plain ``asyncio`` backend gets the backend options
      ``{"loop_factory": ferroloop.new_event_loop}`` (the conftest's shared options dict
      is updated in place; a bare ``"asyncio"`` parameter becomes ``("asyncio", {...})``),
      so the test ids stay those of the stdlib run;
    * blockbuster's allowances for blocking calls inside named functions of the stdlib's
      asyncio modules apply to the same-named functions of ferroloop's Python modules
      (see ``_mirror_blockbuster_allowances``).
``--upstream-loop asyncio``
    the same machinery with nothing swapped: the stdlib loop the suite normally uses.

Both modes
    * AnyIO: only the plain ``asyncio`` backend runs (trio, uvloop and eager-task params
      are deselected);
    * nodeids listed in ``--upstream-deselect-file`` are deselected (an entry also
      matches the nodeids under it: ``file.py``, ``file.py::Class``, ``...::test[``;
      ``*`` in an entry matches anything);
    * ``--upstream-record FILE`` gets one JSON line when a test starts and one when it
      ends (outcome, duration, short message, loops created by kind, the loop types the
      test actually ran on), so a run killed by a crash or a hang still leaves a record;
    * the swap is checked: every AnyIO test runner and every aiohttp ``loop`` fixture must
      be of the loop under test, otherwise the test is recorded with ``swap_error`` (which
      ``run.py`` treats as a failure of the whole job), and the tested library must be the
      one installed in the venv, not the sdist's source tree.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import json
import os
import re
import sys
import time
from typing import Any

import pytest

LOOP_KINDS = ("asyncio", "ferroloop")

_state: dict[str, Any] = {
    "loop": None,  # "asyncio" or "ferroloop"
    "suite": None,
    "record": None,  # open file
    "created": {},  # loop class name -> count, whole session
    "current": None,  # per-test dict while a test runs
    "factory": None,  # ferroloop loop factory handed to AnyIO
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "ferroloop upstream-suite runner")
    group.addoption("--upstream-loop", choices=LOOP_KINDS, default=None)
    group.addoption("--upstream-suite", default=None)
    group.addoption("--upstream-record", default=None, help="JSON-lines outcome file")
    group.addoption("--upstream-deselect-file", default=None)


# -- loop accounting -------------------------------------------------------------------


def _count_creation(loop: object) -> None:
    name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    _state["created"][name] = _state["created"].get(name, 0) + 1
    cur = _state["current"]
    if cur is not None:
        cur["created"][name] = cur["created"].get(name, 0) + 1


def _wrap_init(cls: type) -> None:
    original = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _count_creation(self)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def _expected_loop_type() -> type:
    if _state["loop"] == "ferroloop":
        import ferroloop

        return ferroloop.Loop
    return asyncio.base_events.BaseEventLoop


def _note_loop_used(loop: object, where: str) -> None:
    cur = _state["current"]
    if cur is None:
        return
    name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    cur["ran_on"][name] = cur["ran_on"].get(name, 0) + 1
    if not isinstance(loop, _expected_loop_type()):
        cur["swap_error"] = f"{where} runs on {name}, not on the {_state['loop']} loop"


def pytest_configure(config: pytest.Config) -> None:
    loop = config.getoption("upstream_loop")
    if loop is None:
        return
    _state["loop"] = loop
    _state["suite"] = config.getoption("upstream_suite")
    record = config.getoption("upstream_record")
    if record:
        _state["record"] = open(record, "a", encoding="utf-8")  # closed at session end

    _wrap_init(asyncio.base_events.BaseEventLoop)
    if loop == "ferroloop":
        import ferroloop
        import ferroloop._loop

        _wrap_init(ferroloop._loop.Loop)
        asyncio.set_event_loop_policy(ferroloop.EventLoopPolicy())
        # asyncio.events._init_event_loop_policy() does "from . import
        # DefaultEventLoopPolicy": a set_event_loop_policy(None) comes back to ferroloop.
        asyncio.DefaultEventLoopPolicy = ferroloop.EventLoopPolicy  # type: ignore[misc]
        _state["factory"] = ferroloop.new_event_loop
        _mirror_blockbuster_allowances()

    if _state["suite"] == "anyio":
        from anyio._backends import _asyncio as anyio_asyncio

        runner_cls = anyio_asyncio.TestRunner
        original_enter = runner_cls.__enter__

        def __enter__(self: Any) -> Any:
            result = original_enter(self)
            _note_loop_used(self.get_loop(), "AnyIO's test runner")
            return result

        runner_cls.__enter__ = __enter__  # type: ignore[method-assign]


def _mirror_blockbuster_allowances() -> None:
    """Give ferroloop's Python modules blockbuster's allowances for the stdlib loop's.

    blockbuster (an autouse fixture in both suites' conftests) lets a blocking call through
    when a named function of the stdlib's asyncio modules is on the stack: for instance
    ``os.read`` of ``subprocess.Popen``'s error pipe inside ``base_events.subprocess_exec``
    (the stdlib loop starts children in the loop thread).  ferroloop does the same in its
    own ``_subprocess.py``, so the same function names are allowed in ferroloop's modules.
    """
    try:
        from blockbuster import blockbuster as bb
    except ImportError:
        return
    import ferroloop

    pkg = os.path.dirname(ferroloop.__file__)
    modules = sorted(f"ferroloop/{f}" for f in os.listdir(pkg) if f.endswith(".py"))

    def mirrored(entries: Any) -> list[Any]:
        extra = []
        for filename, functions in entries or []:
            if filename.startswith("asyncio/"):
                extra.extend((module, set(functions)) for module in modules)
        return extra

    original_init = bb.BlockBusterFunction.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.can_block_functions.extend(mirrored(self.can_block_functions))

    bb.BlockBusterFunction.__init__ = __init__  # type: ignore[method-assign]
    original_can_block_in = bb.BlockBusterFunction.can_block_in

    def can_block_in(self: Any, filename: str, functions: Any) -> Any:
        result = original_can_block_in(self, filename, functions)
        if isinstance(functions, str):
            functions = {functions}
        self.can_block_functions.extend(mirrored([(filename, functions)]))
        return result

    bb.BlockBusterFunction.can_block_in = can_block_in  # type: ignore[method-assign]


def _write(record: dict[str, Any]) -> None:
    out = _state["record"]
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.flush()


# -- selection -------------------------------------------------------------------------


def _read_deselect(path: str | None) -> list[str]:
    if not path or not os.path.exists(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                entries.append(line)
    return entries


def _matches(
    nodeid: str, entries: set[str], prefixes: tuple[str, ...], patterns: list[re.Pattern[str]]
) -> bool:
    return (
        nodeid in entries
        or nodeid.startswith(prefixes)
        or any(p.fullmatch(nodeid) for p in patterns)
    )


def _anyio_backend_keep(item: pytest.Item) -> bool:
    """Keep only the plain asyncio backend; give it ferroloop's factory in ferroloop mode."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "anyio_backend" not in callspec.params:
        return True
    backend = callspec.params["anyio_backend"]
    if isinstance(backend, str):
        name, options = backend, {}
    else:
        name, options = backend[0], backend[1]
    if name != "asyncio":
        return False
    factory = options.get("loop_factory")
    if factory is not None and factory is not _state["factory"]:
        return False  # uvloop, eager task factory
    if _state["factory"] is not None:
        if isinstance(backend, str):
            callspec.params["anyio_backend"] = ("asyncio", {"loop_factory": _state["factory"]})
        else:
            # The conftest's params share one options dict: updated in place.
            options["loop_factory"] = _state["factory"]
    return True


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state["loop"] is None:
        return
    entries = _read_deselect(config.getoption("upstream_deselect_file"))
    exact = {e for e in entries if "*" not in e}
    prefixes = tuple(p for e in exact for p in (e + "::", e + "["))
    patterns = [
        re.compile(".*".join(re.escape(part) for part in e.split("*"))) for e in entries if "*" in e
    ]
    keep, drop = [], []
    for item in items:
        if _matches(item.nodeid, exact, prefixes, patterns):
            drop.append(item)
        elif _state["suite"] == "anyio" and not _anyio_backend_keep(item):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    if _state["loop"] is None:
        return
    # The library under test must be the release installed in the venv, not the sdist's
    # source tree next to the tests.
    lib = sys.modules.get(_state["suite"] or "")
    if lib is not None:
        path = os.path.realpath(lib.__file__ or "")
        if not path.startswith(os.path.realpath(sys.prefix) + os.sep):
            pytest.exit(f"{lib.__name__} is imported from {path}, not from the venv", 3)
    if _state["loop"] == "ferroloop":
        policy = asyncio.get_event_loop_policy()
        import ferroloop

        if not isinstance(policy, ferroloop.EventLoopPolicy):
            pytest.exit(f"the event loop policy is {policy!r}, not ferroloop's", 3)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _state["loop"] is not None and report.failed:
        _write({"event": "collect-error", "nodeid": report.nodeid, "message": _message(report)})


# -- per-test records ------------------------------------------------------------------


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if _state["loop"] is None:
        return
    _state["current"] = {
        "nodeid": nodeid,
        "t0": time.monotonic(),
        "created": {},
        "ran_on": {},
        "swap_error": None,
        "reports": {},
    }
    _write({"event": "start", "nodeid": nodeid})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    if _state["loop"] == "ferroloop":
        import ferroloop

        if not isinstance(asyncio.get_event_loop_policy(), ferroloop.EventLoopPolicy):
            # A previous test installed another policy and did not restore it.
            asyncio.set_event_loop_policy(ferroloop.EventLoopPolicy())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    funcargs = getattr(item, "funcargs", {})
    loop = funcargs.get("loop") if _state["suite"] == "aiohttp" else None
    # (a few test modules override 'loop' with a mock: nothing runs on it)
    if isinstance(loop, asyncio.AbstractEventLoop):
        _note_loop_used(loop, "the 'loop' fixture")
    yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cur = _state["current"]
    if cur is not None and report.nodeid == cur["nodeid"]:
        cur["reports"][report.when] = report


def _message(report: Any) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # skip: (path, lineno, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr).strip().splitlines()[-1]
    text = " ".join(text.split())
    return text[:400]


def _outcome(reports: dict[str, Any]) -> tuple[str, str]:
    setup, call, teardown = (reports.get(w) for w in ("setup", "call", "teardown"))
    if setup is None:
        return "error", "no setup report"
    if setup.failed:
        return "error", _message(setup)
    if setup.skipped:
        if hasattr(setup, "wasxfail"):
            return "xfailed", setup.wasxfail
        return "skipped", _message(setup)
    outcome, message = "passed", ""
    if call is not None:
        if call.failed:
            outcome, message = "failed", _message(call)
        elif call.skipped:
            if hasattr(call, "wasxfail"):
                outcome, message = "xfailed", call.wasxfail or ""
            else:
                outcome, message = "skipped", _message(call)
        elif hasattr(call, "wasxfail"):
            outcome = "xpassed"
    if teardown is not None and teardown.failed and outcome != "failed":
        outcome, message = "error", "teardown: " + _message(teardown)
    return outcome, message


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    cur = _state["current"]
    if cur is None or cur["nodeid"] != nodeid:
        return
    _state["current"] = None
    outcome, message = _outcome(cur["reports"])
    _write(
        {
            "event": "done",
            "nodeid": nodeid,
            "outcome": outcome,
            "message": message,
            "duration": round(time.monotonic() - cur["t0"], 3),
            "created": cur["created"],
            "ran_on": cur["ran_on"],
            "swap_error": cur["swap_error"],
        }
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _state["loop"] is None:
        return
    lib = sys.modules.get(_state["suite"] or "")
    info = {
        "event": "session",
        "exitstatus": int(exitstatus),
        "created": _state["created"],
        "library": getattr(lib, "__file__", None),
        "python": sys.version.split()[0],
    }
    if _state["loop"] == "ferroloop":
        import ferroloop

        info["ferroloop"] = ferroloop.__file__
    _write(info)
    if _state["record"] is not None:
        _state["record"].close()
        _state["record"] = None
