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
``tls_files`` / ``tls_contexts``
    A throwaway self-signed certificate for localhost and 127.0.0.1 (``(cert, key)``
    paths, made with ``cryptography`` if installed, else the ``openssl`` command, else the
    test is skipped), and ``(server, client)`` SSL contexts where the client trusts it.
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
import datetime
import gc
import ipaddress
import shutil
import socket
import ssl
import subprocess

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


# -- TLS: a throwaway certificate for the tests that need one ---------------------------

TLS_HOST = "127.0.0.1"


def _self_signed_with_cryptography(cert_path, key_path) -> bool:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(TLS_HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def _self_signed_with_openssl(cert_path, key_path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the cryptography package or the openssl command for a certificate")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "2"]
        + ["-subj", "/CN=localhost", "-addext", f"subjectAltName=DNS:localhost,IP:{TLS_HOST}"],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def sockpair():
    """A connected, non-blocking ``socket.socketpair()``."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throwaway self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not _self_signed_with_cryptography(cert, key):
        _self_signed_with_openssl(cert, key)
    return cert, key


@pytest.fixture
def tls_contexts(tls_files):
    """(server, client) SSL contexts; the client trusts only the test certificate."""
    cert, key = tls_files
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client
