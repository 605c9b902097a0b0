"""Subprocesses: asyncio.create_subprocess_exec/_shell and loop.subprocess_exec/_shell.

Every test runs on the stdlib loop and on ferroloop (the ``loop`` fixture), which fails the
test if the loop's exception handler is called.  Children are small shell utilities
(``sh``, ``cat``, ``sleep``) so that the file stays fast; a child whose exit status we
never collect would be a zombie, which several tests check for explicitly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
PIPE = asyncio.subprocess.PIPE


def run(loop, coro, timeout: float = 20.0):
    """run_until_complete with a deadline, so a missing wake-up fails instead of hanging."""

    async def guarded():
        async with asyncio.timeout(timeout):
            return await coro

    return loop.run_until_complete(guarded())


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"), key=int)


def proc_state(pid: int) -> str | None:
    """The state letter of *pid* in /proc ("Z": a zombie), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or mid-read
        return None


def assert_not_our_child(pid: int) -> None:
    """The exit status of *pid* was collected: waiting for it again finds no such child."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class RecordingSubprocessProtocol(asyncio.SubprocessProtocol):
    def __init__(self, loop):
        self.events = []
        self.output = {1: bytearray(), 2: bytearray()}
        self.done = loop.create_future()

    def connection_made(self, transport):
        self.events.append("connection_made")

    def pipe_data_received(self, fd, data):
        self.output[fd] += data

    def pipe_connection_lost(self, fd, exc):
        self.events.append(("pipe_connection_lost", fd, exc))

    def process_exited(self):
        self.events.append("process_exited")

    def connection_lost(self, exc):
        self.events.append(("connection_lost", exc))
        self.done.set_result(None)


def test_exec_pipes_carry_stdin_stdout_and_stderr_separately(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            "tr a-z A-Z; echo to-stderr >&2; exit 3",
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
        )
        proc.stdin.write(b"hello, child\n")
        await proc.stdin.drain()
        proc.stdin.close()
        out = await proc.stdout.read()
        err = await proc.stderr.read()
        return out, err, await proc.wait()

    assert run(loop, main()) == (b"HELLO, CHILD\n", b"to-stderr\n", 3)


def test_communicate_streams_50_mib_through_cat_byte_for_byte(loop):
    data = random.Random(50).randbytes(50 * MiB)

    async def main():
        proc = await asyncio.create_subprocess_exec("cat", stdin=PIPE, stdout=PIPE)
        out, err = await proc.communicate(data)
        return out, err, proc.returncode

    out, err, returncode = run(loop, main())
    assert err is None
    assert returncode == 0
    assert len(out) == len(data)
    assert out == data


def test_stderr_can_be_redirected_to_stdout(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "echo out; echo err >&2", stdout=PIPE, stderr=subprocess.STDOUT
        )
        return await proc.communicate()

    out, err = run(loop, main())
    assert sorted(out.splitlines()) == [b"err", b"out"]
    assert err is None


def test_wait_returns_the_exit_status_and_sets_returncode(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 7")
        assert proc.returncode is None
        first = await proc.wait()
        second = await proc.wait()
        return first, second, proc.returncode, proc.pid

    first, second, returncode, pid = run(loop, main())
    assert (first, second, returncode) == (7, 7, 7)
    assert_not_our_child(pid)


def test_no_zombie_is_left_after_wait(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        return proc.pid

    pid = run(loop, main())
    assert proc_state(pid) != "Z"  # looked at without reaping it
    assert_not_our_child(pid)


@pytest.mark.parametrize(
    ("how", "returncode"),
    [
        ("terminate", -signal.SIGTERM),
        ("kill", -signal.SIGKILL),
        ("send_signal", -signal.SIGUSR1),
    ],
)
def test_signalled_child_reports_minus_the_signal_number(loop, how, returncode):
    async def main():
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        if how == "send_signal":
            proc.send_signal(signal.SIGUSR1)
        else:
            getattr(proc, how)()
        return await proc.wait(), proc.pid

    got, pid = run(loop, main())
    assert got == returncode
    assert_not_our_child(pid)


def test_signalling_a_child_whose_exit_was_delivered_raises_process_lookup_error(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        for signalling in (proc.terminate, proc.kill, lambda: proc.send_signal(signal.SIGTERM)):
            with pytest.raises(ProcessLookupError):
                signalling()
        return proc.returncode

    assert run(loop, main()) == 0


def test_drain_raises_when_the_child_exits_while_we_write_its_stdin(loop):
    gate_r, gate_w = os.pipe()

    async def main():
        # The child exits without reading stdin, once we say so.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import os; os.read({gate_r}, 1)",
            stdin=PIPE,
            pass_fds=(gate_r,),
        )
        # More than the pipe holds, so that data is still buffered when the child exits.
        proc.stdin.write(b"x" * (4 * MiB))
        os.write(gate_w, b"go")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            await proc.stdin.drain()
        return await proc.wait()

    try:
        assert run(loop, main()) == 0
    finally:
        os.close(gate_r)
        os.close(gate_w)


def test_create_subprocess_shell_runs_the_command_through_the_shell(loop):
    async def main():
        proc = await asyncio.create_subprocess_shell(
            "echo $((6 * 7)); echo oops >&2; exit 3", stdout=PIPE, stderr=PIPE
        )
        out, err = await proc.communicate()
        return out, err, proc.returncode

    assert run(loop, main()) == (b"42\n", b"oops\n", 3)


def test_nonexistent_program_raises_file_not_found_and_leaks_no_fd(loop):
    async def main():
        before = open_fds()
        for _ in range(3):
            with pytest.raises(FileNotFoundError):
                await asyncio.create_subprocess_exec(
                    "/nonexistent/ferroloop-test-program", stdin=PIPE, stdout=PIPE, stderr=PIPE
                )
        return before, open_fds()

    before, after = run(loop, main())
    assert after == before


def test_fifty_concurrent_subprocesses_each_report_their_output_and_status(loop):
    async def one(i):
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f"echo child {i}; exit {i % 7}", stdout=PIPE
        )
        out, _ = await proc.communicate()
        return out, proc.returncode, proc.pid

    async def main():
        before = open_fds()
        results = await asyncio.gather(*(one(i) for i in range(50)))
        return before, results, open_fds()

    before, results, after = run(loop, main(), timeout=40)
    assert [(out, rc) for out, rc, _ in results] == [
        (f"child {i}\n".encode(), i % 7) for i in range(50)
    ]
    for _, _, pid in results:
        assert_not_our_child(pid)
    assert after == before


def test_popen_keyword_arguments_pass_through(loop, tmp_path):
    extra_r, extra_w = os.pipe()
    script = f'pwd; echo "$GREETING"; [ -e /proc/$$/fd/{extra_w} ] && echo fd-passed; exec sleep 30'

    async def main():
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            script,
            stdout=PIPE,
            cwd=tmp_path,
            env={"GREETING": "bonjour", "PATH": os.environ["PATH"]},
            start_new_session=True,
            pass_fds=(extra_w,),
        )
        lines = [await proc.stdout.readline() for _ in range(3)]
        sid = os.getsid(proc.pid)
        proc.kill()
        await proc.wait()
        return lines, sid, proc.pid

    try:
        lines, sid, pid = run(loop, main())
    finally:
        os.close(extra_r)
        os.close(extra_w)
    assert lines == [f"{tmp_path}\n".encode(), b"bonjour\n", b"fd-passed\n"]
    assert sid == pid  # start_new_session=True made the child a session leader


EXEC_INVALID = [
    ({"universal_newlines": True}, "universal_newlines must be False"),
    ({"shell": True}, "shell must be False"),
    ({"bufsize": 4096}, "bufsize must be 0"),
    ({"text": True}, "text must be False"),
    ({"encoding": "utf-8"}, "encoding must be None"),
    ({"errors": "strict"}, "errors must be None"),
]
SHELL_INVALID = [
    ({"cmd": ["ls", "-l"]}, "cmd must be a string"),
    ({"universal_newlines": True}, "universal_newlines must be False"),
    ({"shell": False}, "shell must be True"),
    ({"bufsize": 4096}, "bufsize must be 0"),
    ({"text": True}, "text must be False"),
    ({"encoding": "utf-8"}, "encoding must be None"),
    ({"errors": "strict"}, "errors must be None"),
]


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [("exec", k, m) for k, m in EXEC_INVALID] + [("shell", k, m) for k, m in SHELL_INVALID],
)
def test_invalid_arguments_raise_value_error_before_spawning(loop, kind, kwargs, message):
    created = []

    def factory():
        created.append(1)
        return asyncio.SubprocessProtocol()

    async def main():
        kwargs_ = dict(kwargs)
        if kind == "exec":
            return await loop.subprocess_exec(factory, "true", **kwargs_)
        cmd = kwargs_.pop("cmd", "true")
        return await loop.subprocess_shell(factory, cmd, **kwargs_)

    with pytest.raises(ValueError) as info:
        run(loop, main())
    assert str(info.value) == message
    assert created == []  # rejected before the protocol (let alone the child) exists


def test_subprocess_protocol_sees_connection_lost_after_exit_and_every_pipe(loop):
    async def main():
        transport, proto = await loop.subprocess_exec(
            lambda: RecordingSubprocessProtocol(loop),
            "sh",
            "-c",
            "cat; echo done >&2",
        )
        assert transport.get_pid() > 0
        assert transport.get_returncode() is None
        stdin = transport.get_pipe_transport(0)
        stdin.write(b"echoed")
        stdin.close()
        await proto.done
        returncode = transport.get_returncode()
        transport.close()
        return proto, returncode

    proto, returncode = run(loop, main())
    assert returncode == 0
    assert bytes(proto.output[1]) == b"echoed"
    assert bytes(proto.output[2]) == b"done\n"
    assert proto.events[0] == "connection_made"
    assert proto.events[-1] == ("connection_lost", None)
    middle = proto.events[1:-1]
    assert sorted(map(str, middle)) == sorted(
        map(
            str,
            [
                ("pipe_connection_lost", 0, None),
                ("pipe_connection_lost", 1, None),
                ("pipe_connection_lost", 2, None),
                "process_exited",
            ],
        )
    )


def test_closing_the_transport_kills_a_running_child(loop):
    async def main():
        transport, proto = await loop.subprocess_exec(
            lambda: RecordingSubprocessProtocol(loop), "sleep", "30"
        )
        pid = transport.get_pid()
        transport.close()
        assert transport.is_closing()
        await proto.done
        return transport.get_returncode(), pid

    returncode, pid = run(loop, main())
    assert returncode == -signal.SIGKILL
    assert_not_our_child(pid)


def test_exit_status_is_reported_when_pidfd_open_is_unavailable(loop, monkeypatch, impl):
    if impl == "asyncio" and sys.version_info >= (3, 12):
        pytest.skip("3.12's stdlib policy may already hold a pidfd child watcher")

    def no_pidfd(pid, flags=0):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd, raising=False)

    async def main():
        proc = await asyncio.create_subprocess_exec("sh", "-c", "echo hi; exit 5", stdout=PIPE)
        out, _ = await proc.communicate()
        killed = await asyncio.create_subprocess_exec("sleep", "30")
        killed.kill()
        return out, proc.returncode, await killed.wait(), proc.pid, killed.pid

    out, returncode, killed_returncode, pid, killed_pid = run(loop, main())
    assert (out, returncode, killed_returncode) == (b"hi\n", 5, -signal.SIGKILL)
    assert_not_our_child(pid)
    assert_not_our_child(killed_pid)


def test_child_still_running_when_the_loop_closes_does_not_stay_a_zombie(loop, impl):
    if impl == "asyncio" and sys.version_info >= (3, 12):
        pytest.skip("3.12's stdlib pidfd child watcher dies with the loop, leaving a zombie")

    async def main():
        transport, _ = await loop.subprocess_exec(
            asyncio.SubprocessProtocol, "sleep", "30", stdin=None, stdout=None, stderr=None
        )
        return transport

    transport = run(loop, main())
    pid = transport.get_pid()
    popen = transport.get_extra_info("subprocess")
    transport.close()  # kills the child; the loop never hears of its exit
    loop.close()
    # Killed, it becomes a zombie until someone collects its status: the loop must have
    # left something behind that does (without the test reaping it itself).
    deadline = time.monotonic() + 10
    while proc_state(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc_state(pid) is None
    # The stdlib loop's watcher thread reaps it without telling the Popen object, which
    # would warn "subprocess ... is still running" when collected: let it find out
    # (poll() gives up while another thread holds the Popen's wait lock, so retry).
    deadline = time.monotonic() + 5
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert popen.returncode is not None


def test_debug_mode_logs_the_spawn_and_the_pipe_connections(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 10.0

    async def main():
        proc = await asyncio.create_subprocess_exec("true", stdin=PIPE, stdout=PIPE, stderr=PIPE)
        await proc.communicate()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        run(loop, main())
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert "execute program 'true' stdin=<pipe> stdout=<pipe> stderr=<pipe>" in messages
    assert any(m.startswith("execute program 'true': <") for m in messages)
    assert any(m.startswith("Read pipe ") and " connected: (" in m for m in messages)
    assert any(m.startswith("Write pipe ") and " connected: (" in m for m in messages)
