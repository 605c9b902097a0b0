"""Private PostgreSQL and Redis servers for the integration tests.

Each server is the real one from the distribution's packages (installed by
``install-services.sh``), started on a free loopback port in a fresh temporary directory,
with its data thrown away at the end.  Nothing here touches a system-wide instance.

PostgreSQL refuses to run as root; when the tests run as root, ``initdb`` and
``postgres`` run as the ``postgres`` account the Debian package creates, and the
temporary directory is handed to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

HOST = "127.0.0.1"
START_TIMEOUT = 60.0


class ServiceUnavailable(Exception):
    """The server's programs are not installed here (the message says which)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _pg_bindir() -> str:
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise ServiceUnavailable(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "tests/integration/install-services.sh installs it"
        )
    return os.path.dirname(found[-1])


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until(ready, proc: subprocess.Popen, log_path: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log_path)}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready in {START_TIMEOUT:.0f} s:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A running server: connect as ``user`` (trust auth) to ``database``."""

    host: str
    port: int
    socket_dir: str
    user: str = "ferroloop"
    database: str = "postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    bindir = _pg_bindir()
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable("running as root and there is no postgres account") from None
        run_as = {"user": account.pw_uid, "group": account.pw_gid}
    root = tempfile.mkdtemp(prefix="ferroloop-pg-")
    try:
        if run_as:
            os.chown(root, run_as["user"], run_as["group"])
        data = os.path.join(root, "data")
        log = os.path.join(root, "server.log")
        initdb = [
            os.path.join(bindir, "initdb"),
            *("-D", data, "-U", "ferroloop", "--auth=trust", "-E", "UTF8", "--locale=C"),
            "--no-sync",
        ]
        done = subprocess.run(initdb, capture_output=True, text=True, **run_as)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stderr[-3000:]}")
        port = free_port()
        settings = {
            "listen_addresses": HOST,
            "port": str(port),
            "unix_socket_directories": root,
            "max_connections": "60",
            # Throwaway data: durability costs time and proves nothing about the loop.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [os.path.join(bindir, "postgres"), "-D", data]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **run_as
            )
        try:
            _wait_until(
                lambda: "ready to accept connections" in _tail(log, 200),
                proc,
                log,
                "postgres",
            )
            yield Postgres(HOST, port, root)
        finally:
            _stop(proc, signal.SIGINT)  # "fast" shutdown: roll back and disconnect clients
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Redis:
    host: str
    port: int
    unix_path: str

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceUnavailable(
            "redis-server is not installed; tests/integration/install-services.sh installs it"
        )
    root = tempfile.mkdtemp(prefix="ferroloop-redis-")
    try:
        port = free_port()
        unix_path = os.path.join(root, "redis.sock")
        log = os.path.join(root, "server.log")
        argv = [exe, "--bind", HOST, "--port", str(port), "--unixsocket", unix_path]
        argv += ["--dir", root, "--save", "", "--appendonly", "no", "--daemonize", "no"]
        argv += ["--logfile", log]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_until(lambda: _redis_pong(port), proc, log, "redis-server")
            yield Redis(HOST, port, unix_path)
        finally:
            _stop(proc, signal.SIGTERM)
    finally:
        shutil.rmtree(root, ignore_errors=True)
