"""Shared fixtures: every loop-level test runs on the stdlib loop and on ferroloop.

Fixtures
--------
``impl``
    ``"asyncio"`` or ``"ferroloop"`` (test ids ``[asyncio]`` / ``[ferroloop]``).  The
    ferroloop param is skipped, with the import error as the reason, only when
    ``import ferroloop`` raises ImportError (any other import-time exception makes the
    ``[ferroloop]`` tests fail with that error instead of hiding it).
``loop_factory``
    A zero-argument callable that creates a fresh loop of the implementation under test
    (usable as ``asyncio.Runner(loop_factory=...)``); loops it made are closed at teardown.
``loop``
    A fresh loop from ``loop_factory``.  Its exception handler records every call (and
    still logs through ``loop.default_exception_handler``).  At teardown, pending tasks are
    cancelled, ``shutdown_asyncgens`` / ``shutdown_default_executor`` run, the loop is
    closed, the current event loop is set to None, and the test fails if the exception
    handler was called -- unless the test opted out with the ``expect_loop_errors`` fixture
    (which returns the list of recorded contexts) or the ``loop_errors_expected`` marker.
``loop_factory_code``
    Python source that defines ``new_loop`` (the loop factory) in a child process.

Markers
-------
``ferroloop_only(reason)``
    Pins behaviour the stdlib loop does not have (or only has in debug mode); the
    ``[asyncio]`` param is skipped with that reason.
``stdlib_only(reason)``
    Pins a stdlib behaviour ferroloop deliberately differs from; ``[ferroloop]`` skipped.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

FERROLOOP_SKIP_REASON = ""  # set when the package is not installed/built: skip
FERROLOOP_BROKEN = ""  # set when importing it raises something else: fail, don't hide it
try:
    import ferroloop
except ImportError as exc:
    ferroloop = None
    FERROLOOP_SKIP_REASON = f"ferroloop is not importable: {type(exc).__name__}: {exc}"
except Exception as exc:  # reported by every [ferroloop] test
    ferroloop = None
    FERROLOOP_BROKEN = f"import ferroloop raised {type(exc).__name__}: {exc}"

IMPL_PARAMS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "ferroloop",
        id="ferroloop",
        marks=pytest.mark.skipif(bool(FERROLOOP_SKIP_REASON), reason=FERROLOOP_SKIP_REASON),
    ),
]

_FACTORY_CODE = {
    "asyncio": "import asyncio\nnew_loop = asyncio.new_event_loop\n",
    "ferroloop": "import ferroloop\nnew_loop = ferroloop.new_event_loop\n",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "ferroloop_only(reason): behaviour pinned for ferroloop only; [asyncio] is skipped",
    )
    config.addinivalue_line(
        "markers",
        "stdlib_only(reason): stdlib behaviour ferroloop deliberately differs from",
    )
    config.addinivalue_line(
        "markers",
        "loop_errors_expected: calls to the loop's exception handler do not fail the test",
    )


def _marker_reason(marker) -> str:
    if marker.args:
        return str(marker.args[0])
    return str(marker.kwargs.get("reason", ""))


def _raw_factory(impl: str):
    if impl == "asyncio":
        return asyncio.new_event_loop
    assert ferroloop is not None
    return ferroloop.new_event_loop


@pytest.fixture(params=IMPL_PARAMS)
def impl(request) -> str:
    name = request.param
    if name == "ferroloop" and FERROLOOP_BROKEN:
        pytest.fail(FERROLOOP_BROKEN, pytrace=False)
    only_ferro = request.node.get_closest_marker("ferroloop_only")
    if only_ferro is not None and name != "ferroloop":
        pytest.skip(f"ferroloop-only: {_marker_reason(only_ferro)}")
    only_std = request.node.get_closest_marker("stdlib_only")
    if only_std is not None and name != "asyncio":
        pytest.skip(f"stdlib-only: {_marker_reason(only_std)}")
    return name


@pytest.fixture
def loop_factory_code(impl) -> str:
    """Source for a child process: defines ``new_loop()`` for the implementation."""
    return _FACTORY_CODE[impl]


def _cancel_all_tasks(loop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def finalize_loop(loop) -> None:
    """Close *loop* the way ``asyncio.run`` does; set the current loop to None."""
    try:
        if not loop.is_closed() and not loop.is_running():
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        if not loop.is_closed() and not loop.is_running():
            loop.close()


@pytest.fixture
def loop_factory(impl):
    """Zero-argument loop factory for the implementation under test."""
    raw = _raw_factory(impl)
    made = []

    def factory():
        new = raw()
        made.append(new)
        return new

    factory.impl = impl
    yield factory
    for made_loop in made:
        finalize_loop(made_loop)


class HandlerCalls(list):
    """Contexts passed to the ``loop`` fixture's exception handler."""

    expected = False


@pytest.fixture
def _handler_calls() -> HandlerCalls:
    return HandlerCalls()


@pytest.fixture
def expect_loop_errors(_handler_calls) -> HandlerCalls:
    """Opt out of the teardown check; returns the recorded handler contexts."""
    _handler_calls.expected = True
    return _handler_calls


@pytest.fixture
def loop(request, impl, _handler_calls):
    new = _raw_factory(impl)()

    def recording_handler(the_loop, context):
        _handler_calls.append(context)
        the_loop.default_exception_handler(context)

    new.set_exception_handler(recording_handler)
    try:
        yield new
    finally:
        finalize_loop(new)
        # Flush "exception was never retrieved" / "task was destroyed" reports.
        gc.collect()
    expected = _handler_calls.expected or (
        request.node.get_closest_marker("loop_errors_expected") is not None
    )
    if _handler_calls and not expected:
        messages = "; ".join(
            f"{ctx.get('message')!r} exception={ctx.get('exception')!r}" for ctx in _handler_calls
        )
        pytest.fail(
            f"loop exception handler called unexpectedly {len(_handler_calls)} time(s): {messages}",
            pytrace=False,
        )


@pytest.fixture
def ferroloop_module():
    """The ferroloop package, for tests that are ferroloop-only by nature."""
    if FERROLOOP_BROKEN:
        pytest.fail(FERROLOOP_BROKEN, pytrace=False)
    if ferroloop is None:
        pytest.skip(FERROLOOP_SKIP_REASON)
    return ferroloop
