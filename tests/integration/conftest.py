"""Session-wide real servers for the integration tests: ``postgres`` and ``redis``.

One private instance of each per test session (see services.py), shared by the stdlib-loop
and ferroloop runs of every test.  When a server is not installed the tests that need it
are skipped with the reason -- unless ``FERROLOOP_REQUIRE_SERVICES=1`` (``make test`` sets
it, after installing them), where they fail: CI must not pass by skipping.
"""

from __future__ import annotations

import os

import pytest

from integration import services


def _unavailable(reason: str):
    if os.environ.get("FERROLOOP_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (FERROLOOP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _session_server(start):
    try:
        with start() as server:
            yield server
    except services.ServiceUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def postgres():
    yield from _session_server(services.postgres_server)


@pytest.fixture(scope="session")
def redis_service():
    yield from _session_server(services.redis_server)
