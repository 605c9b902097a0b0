"""Pipes and subprocesses: ``connect_read_pipe``, ``connect_write_pipe``, ``subprocess_exec``
and ``subprocess_shell``.

``SubprocessMixin`` sits in front of the Rust ``LoopCore`` in ``ferroloop.Loop``'s bases.
Everything here runs once per pipe or once per process: the bytes flow through the pipe
transports the core builds with ``loop._make_read_pipe_transport`` /
``loop._make_write_pipe_transport`` (the stdlib's ``_UnixReadPipeTransport`` /
``_UnixWritePipeTransport`` semantics).

A subprocess transport is the stdlib's ``BaseSubprocessTransport`` (which connects the
child's pipes through ``connect_read_pipe``/``connect_write_pipe``) started with
``subprocess.Popen`` as ``_UnixSubprocessTransport`` does. Its exit is detected without the
stdlib's child watchers: a pidfd (``os.pidfd_open``) is watched with ``add_reader``; when
it becomes readable the child is a zombie, which is reaped at once (``os.waitpid``) and its
return code (a negative signal number if a signal killed it) handed to the transport on
the next iteration. Where pidfds are unavailable (old kernel, seccomp), a daemon thread
per child blocks in ``os.waitpid`` and hands the code over with ``call_soon_threadsafe``,
as the stdlib's ``ThreadedChildWatcher`` does. Only the loop's own children are ever
reaped, so whatever the policy's child watcher does with other children is unaffected.
Children still running when the loop closes are handed to such threads too, so that none
stays a zombie.

The semantics, error messages included, are asyncio's (``base_events``, ``unix_events``)
of Python 3.11.
"""

from __future__ import annotations

import os
import subprocess
import threading
from asyncio import base_subprocess
from asyncio.log import logger

__all__ = ["SubprocessMixin"]


def _format_pipe(fd):
    if fd == subprocess.PIPE:
        return "<pipe>"
    if fd == subprocess.STDOUT:
        return "<stdout>"
    return repr(fd)


def _log_subprocess(msg, stdin, stdout, stderr):
    info = [msg]
    if stdin is not None:
        info.append(f"stdin={_format_pipe(stdin)}")
    if stdout is not None and stderr == subprocess.STDOUT:
        info.append(f"stdout=stderr={_format_pipe(stdout)}")
    else:
        if stdout is not None:
            info.append(f"stdout={_format_pipe(stdout)}")
        if stderr is not None:
            info.append(f"stderr={_format_pipe(stderr)}")
    logger.debug(" ".join(info))


def _returncode(pid, proc, status):
    """The return code of child ``pid`` (the ``subprocess.Popen`` ``proc``) from its wait
    status, or ``status=None`` if someone else collected the status first.

    The exit status, or minus the number of the signal that killed it. If someone else
    reaped it (``proc.wait()``, ``proc.poll()``, a ``waitpid(-1)`` elsewhere),
    ``proc.returncode`` when Popen knows it, else 255 as the stdlib's watchers report. The
    code is copied into ``proc`` at once, so that Popen never waits for (or signals) that
    pid again.
    """
    if status is not None:
        returncode = os.waitstatus_to_exitcode(status)
    elif proc.returncode is not None:
        returncode = proc.returncode
    else:
        logger.warning("Unknown child process pid %d, will report returncode 255", pid)
        returncode = 255
    if proc.returncode is None:
        proc.returncode = returncode
    return returncode


def _reap_in_thread(loop, pid, proc, transport):
    """Body of a reaper thread: wait for ``pid``, then report to ``loop`` if any."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = None
    returncode = _returncode(pid, proc, status)
    if loop is None:
        return
    if loop.is_closed():
        logger.warning("Loop %r that handles pid %r is closed", loop, pid)
        return
    try:
        loop.call_soon_threadsafe(loop._child_exited_threadsafe, transport, returncode)
    except RuntimeError:  # closed in the meantime
        logger.warning("Loop %r that handles pid %r is closed", loop, pid)


def _start_reaper_thread(loop, pid, proc, transport):
    thread = threading.Thread(
        target=_reap_in_thread,
        name=f"ferroloop-waitpid-{pid}",
        args=(loop, pid, proc, transport),
        daemon=True,
    )
    thread.start()


class _SubprocessTransport(base_subprocess.BaseSubprocessTransport):
    """A child process started with ``subprocess.Popen``, as ``_UnixSubprocessTransport``.

    stdin is a pipe, as in the stdlib on Linux (a socketpair, which the stdlib uses on AIX
    only, would make ``open("/dev/stdin")`` fail in the child with ENXIO). On failure
    Popen closes the pipes it created itself.
    """

    def _start(self, args, shell, stdin, stdout, stderr, bufsize, **kwargs):
        self._proc = subprocess.Popen(
            args,
            shell=shell,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            universal_newlines=False,
            bufsize=bufsize,
            **kwargs,
        )


class SubprocessMixin:
    """Pipes and subprocesses for ``ferroloop.Loop``.

    Relies on the loop for ``_make_read_pipe_transport``, ``_make_write_pipe_transport``,
    ``add_reader``/``remove_reader``, ``create_future``, ``create_task``, ``call_soon``,
    ``call_soon_threadsafe``, ``_close_core`` and ``_debug``.
    """

    __slots__ = ()

    # -- pipes ------------------------------------------------------------------------------

    async def connect_read_pipe(self, protocol_factory, pipe):
        """Register the read end of ``pipe`` (a file-like object with ``fileno()``)."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_read_pipe_transport(pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self._debug:
            logger.debug("Read pipe %r connected: (%r, %r)", pipe.fileno(), transport, protocol)
        return transport, protocol

    async def connect_write_pipe(self, protocol_factory, pipe):
        """Register the write end of ``pipe`` (a file-like object with ``fileno()``)."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_write_pipe_transport(pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self._debug:
            logger.debug("Write pipe %r connected: (%r, %r)", pipe.fileno(), transport, protocol)
        return transport, protocol

    # -- subprocesses -----------------------------------------------------------------------

    async def subprocess_shell(
        self,
        protocol_factory,
        cmd,
        *,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=False,
        shell=True,
        bufsize=0,
        encoding=None,
        errors=None,
        text=None,
        **kwargs,
    ):
        """Run ``cmd`` through the shell; return ``(transport, protocol)``."""
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if not shell:
            raise ValueError("shell must be True")
        if bufsize != 0:
            raise ValueError("bufsize must be 0")
        if text:
            raise ValueError("text must be False")
        if encoding is not None:
            raise ValueError("encoding must be None")
        if errors is not None:
            raise ValueError("errors must be None")

        protocol = protocol_factory()
        debug_log = None
        if self._debug:
            # Not the arguments: they may hold secrets (passwords) or be long.
            debug_log = f"run shell command {cmd!r}"
            _log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, cmd, True, stdin, stdout, stderr, bufsize, **kwargs
        )
        if self._debug and debug_log is not None:
            logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    async def subprocess_exec(
        self,
        protocol_factory,
        program,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=False,
        shell=False,
        bufsize=0,
        encoding=None,
        errors=None,
        text=None,
        **kwargs,
    ):
        """Run ``program`` with ``args``; return ``(transport, protocol)``."""
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if shell:
            raise ValueError("shell must be False")
        if bufsize != 0:
            raise ValueError("bufsize must be 0")
        if text:
            raise ValueError("text must be False")
        if encoding is not None:
            raise ValueError("encoding must be None")
        if errors is not None:
            raise ValueError("errors must be None")

        popen_args = (program, *args)
        protocol = protocol_factory()
        debug_log = None
        if self._debug:
            # Not the arguments: they may hold secrets (passwords) or be long.
            debug_log = f"execute program {program!r}"
            _log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, popen_args, False, stdin, stdout, stderr, bufsize, **kwargs
        )
        if self._debug and debug_log is not None:
            logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    async def _make_subprocess_transport(
        self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
    ):
        waiter = self.create_future()
        transport = _SubprocessTransport(
            self,
            protocol,
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            waiter=waiter,
            extra=extra,
            **kwargs,
        )
        try:
            self._watch_child(transport)
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

    # -- child exit -------------------------------------------------------------------------

    def _child_pidfds(self):
        """{pidfd: (pid, Popen, transport)} of the children being watched."""
        try:
            return self.__dict__["_ferroloop_child_pidfds"]
        except KeyError:
            return self.__dict__.setdefault("_ferroloop_child_pidfds", {})

    def _watch_child(self, transport):
        """Deliver the exit of ``transport``'s child to ``transport._process_exited``."""
        proc = transport._proc
        pid = proc.pid
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            # No pidfd_open in os (non-Linux build) or in the kernel (ENOSYS, before
            # 5.3), refused (EPERM under seccomp), or out of fds: a thread waits instead.
            _start_reaper_thread(self, pid, proc, transport)
            return
        pidfds = self._child_pidfds()
        pidfds[pidfd] = (pid, proc, transport)
        try:
            self.add_reader(pidfd, self._child_exited, pidfd)
        except Exception:
            # Not watchable after all: without a report of its exit the transport could
            # never finish, so a thread waits for it instead.
            del pidfds[pidfd]
            os.close(pidfd)
            _start_reaper_thread(self, pid, proc, transport)

    def _child_exited(self, pidfd):
        """The pidfd of a child became readable: the child has exited (it is a zombie)."""
        entry = self._child_pidfds().pop(pidfd, None)
        if entry is None:
            return
        self.remove_reader(pidfd)
        os.close(pidfd)
        pid, proc, transport = entry
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            wpid, status = pid, None
        if wpid == 0:
            # It has exited, but its status is not ours to collect yet (a tracer such as
            # strace sees it first): wait for it in a thread rather than block the loop.
            _start_reaper_thread(self, pid, proc, transport)
            return
        returncode = _returncode(pid, proc, status)
        if self._debug:
            logger.debug("process %s exited with returncode %s", pid, returncode)
        self.call_soon(transport._process_exited, returncode)

    def _child_exited_threadsafe(self, transport, returncode):
        """A reaper thread collected the child of ``transport``."""
        self.call_soon(transport._process_exited, returncode)

    def _close_core(self):
        # Children still running when the loop closes are nobody's to report to any more,
        # but must not stay zombies: a daemon thread reaps each when it exits.
        pidfds = self._child_pidfds()
        entries = list(pidfds.items())
        pidfds.clear()
        for pidfd, (pid, proc, _transport) in entries:
            self.remove_reader(pidfd)
            os.close(pidfd)
            _start_reaper_thread(None, pid, proc, None)
        super()._close_core()
