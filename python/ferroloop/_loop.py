"""The Python half of ``ferroloop.Loop``.

Everything that runs per callback, per timer or per I/O event lives in the Rust
``LoopCore``; this class adds what runs once per loop or once per run: the run/close
bookkeeping, futures and tasks, the exception handler, async generator hooks, the default
executor and signal-handler registration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from asyncio import base_events, coroutines, events, futures, tasks
from asyncio.log import logger

from ._ferroloop import Handle, LoopCore
from ._net import NetMixin
from ._sock import SockMixin
from ._subprocess import SubprocessMixin
from ._udp import DatagramMixin

# How deep a coroutine's origin is recorded in debug mode (asyncio's own constant).
_DEBUG_STACK_DEPTH = 10


def _stop_when_done(fut: asyncio.Future) -> None:
    # A SystemExit/KeyboardInterrupt in the future will break out of run_forever on its
    # own; stopping here as well would swallow it.
    if not fut.cancelled():
        exc = fut.exception()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return
    futures._get_loop(fut).stop()


# From 3.12 a custom exception handler runs in the context of the task or handle that
# failed (gh-96704), so it sees the context variables the failing code set.
_HANDLER_IN_CONTEXT = sys.version_info >= (3, 12)


# A task factory is handed ``name=`` in 3.13.3 (by accident) and from 3.14 on; 3.13.4
# went back to calling set_name() afterwards (gh-128307, gh-133745).
_FACTORY_GETS_NAME = sys.version_info >= (3, 14) or sys.version_info[:3] == (3, 13, 3)


def _handler_context(context: dict):
    """The ``contextvars.Context`` a 3.12+ exception handler runs in, or None."""
    thing = context.get("task")
    if thing is None:
        thing = context.get("future")  # may hold a Task
    if thing is None:
        thing = context.get("handle")
    get_context = getattr(thing, "get_context", None)
    run_in = get_context() if get_context is not None else None
    return run_in if hasattr(run_in, "run") else None


def _sighandler_noop(signum, frame):
    """Installed for signals with loop handlers: the wake-up fd does the real work."""


class Loop(
    SockMixin, NetMixin, DatagramMixin, SubprocessMixin, LoopCore, asyncio.AbstractEventLoop
):
    """An asyncio event loop whose scheduler, timers and reactor are written in Rust."""

    def __init__(self) -> None:
        super().__init__()
        self._default_executor = None
        self._executor_shutdown_called = False
        self._exception_handler = None
        self._task_factory = None
        self._current_handle = None
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        # Timers due within this of now count as due (the monotonic clock's resolution).
        self._clock_resolution = time.get_clock_info("monotonic").resolution
        self.set_debug(coroutines._is_debug_mode())

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name == "time":  # an instance clock moves the timers too, as in the stdlib
            self._note_clock()

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        if name == "time":
            self._note_clock()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    # -- running and stopping ---------------------------------------------------------

    def _check_running(self) -> None:
        if self.is_running():
            raise RuntimeError("This event loop is already running")
        if events._get_running_loop() is not None:
            raise RuntimeError("Cannot run the event loop while another loop is running")

    def run_forever(self) -> None:
        """Run until ``stop()`` is called."""
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        old_agen_hooks = sys.get_asyncgen_hooks()
        try:
            self._thread_id = threading.get_ident()
            sys.set_asyncgen_hooks(
                firstiter=self._asyncgen_firstiter_hook,
                finalizer=self._asyncgen_finalizer_hook,
            )
            events._set_running_loop(self)
            self._run_forever_core()
        finally:
            self._thread_id = None
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    def run_until_complete(self, future):
        """Run until ``future`` is done and return its result (or raise its exception)."""
        self._check_closed()
        self._check_running()
        new_task = not futures.isfuture(future)
        future = tasks.ensure_future(future, loop=self)
        if new_task:
            # The task is ours: if the loop is interrupted, don't log it as destroyed
            # while pending.
            future._log_destroy_pending = False
        future.add_done_callback(_stop_when_done)
        try:
            self.run_forever()
        except BaseException:
            if new_task and future.done() and not future.cancelled():
                # The exception is being raised anyway; mark it retrieved.
                future.exception()
            raise
        finally:
            future.remove_done_callback(_stop_when_done)
        if not future.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return future.result()

    def close(self) -> None:
        """Close the loop: drop pending callbacks, signal handlers and the executor."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        registered = self._signal_registered()
        if registered:
            if sys.is_finalizing():
                warnings.warn(
                    f"Closing the loop {self!r} on interpreter shutdown "
                    f"stage, skipping signal handlers removal",
                    ResourceWarning,
                    stacklevel=2,
                    source=self,
                )
                for sig in registered:
                    self._signal_set(sig, None)
            else:
                for sig in registered:
                    self.remove_signal_handler(sig)
        if self._debug:
            logger.debug("Close %r", self)
        self._close_core()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    def __del__(self, _warn=warnings.warn) -> None:
        if not self.is_closed():
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                self.close()

    # -- futures and tasks ------------------------------------------------------------

    # create_future and create_task are the core's; it defers to this one for a task
    # factory, extra keywords and debug mode.

    def _create_task_py(self, coro, *, name=None, context=None, **kwargs):
        """Schedule a coroutine as a Task; extra keywords go to the task factory."""
        self._check_closed()
        if context is not None:
            kwargs["context"] = context
        if self._task_factory is None:
            task = tasks.Task(coro, loop=self, name=name, **kwargs)
            if task._source_traceback:
                del task._source_traceback[-1]
            return task
        if _FACTORY_GETS_NAME and name is not None:
            kwargs["name"] = name
            name = None
        task = self._task_factory(self, coro, **kwargs)
        if name is not None:
            task.set_name(name)
        return task

    def set_task_factory(self, factory) -> None:
        if factory is not None and not callable(factory):
            raise TypeError("task factory must be a callable or None")
        self._task_factory = factory

    def get_task_factory(self):
        return self._task_factory

    # -- debug ------------------------------------------------------------------------

    def set_debug(self, enabled: bool) -> None:
        self._debug = enabled
        if self.is_running():
            self.call_soon_threadsafe(self._set_coroutine_origin_tracking, enabled)

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if bool(enabled) == bool(self._coroutine_origin_tracking_enabled):
            return
        if enabled:
            self._coroutine_origin_tracking_saved_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(_DEBUG_STACK_DEPTH)
        else:
            sys.set_coroutine_origin_tracking_depth(self._coroutine_origin_tracking_saved_depth)
        self._coroutine_origin_tracking_enabled = enabled

    def _log_slow_callback(self, what, duration: float) -> None:
        # `what` is a Handle, or the transport whose I/O event the core just handled.
        if isinstance(what, Handle):
            text = base_events._format_handle(what)
        else:
            text = f"<I/O event of {what!r}>"
        logger.warning("Executing %s took %.3f seconds", text, duration)

    # -- errors -----------------------------------------------------------------------

    def set_exception_handler(self, handler) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"A callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def get_exception_handler(self):
        return self._exception_handler

    def default_exception_handler(self, context: dict) -> None:
        """Log ``context`` on the ``asyncio`` logger, as the stdlib loop does."""
        message = context.get("message") or "Unhandled exception in event loop"
        exception = context.get("exception")
        exc_info = (type(exception), exception, exception.__traceback__) if exception else False
        current = self._current_handle
        if "source_traceback" not in context and current is not None and current._source_traceback:
            context["handle_traceback"] = current._source_traceback
        lines = [message]
        for key in sorted(context):
            if key in ("message", "exception"):
                continue
            value = context[key]
            if key == "source_traceback":
                stack = "".join(traceback.format_list(value)).rstrip()
                value = f"Object created at (most recent call last):\n{stack}"
            elif key == "handle_traceback":
                stack = "".join(traceback.format_list(value)).rstrip()
                value = f"Handle created at (most recent call last):\n{stack}"
            else:
                value = repr(value)
            lines.append(f"{key}: {value}")
        logger.error("\n".join(lines), exc_info=exc_info)

    def call_exception_handler(self, context: dict) -> None:
        """Pass ``context`` to the installed handler, or log it."""
        if self._exception_handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                # The logging machinery itself failed; say so as simply as possible.
                logger.error("Exception in default exception handler", exc_info=True)
            return
        try:
            run_in = _handler_context(context) if _HANDLER_IN_CONTEXT else None
            if run_in is not None:
                run_in.run(self._exception_handler, self, context)
            else:
                self._exception_handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {
                        "message": "Unhandled error in exception handler",
                        "exception": exc,
                        "context": context,
                    }
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error(
                    "Exception in default exception handler while handling an "
                    "unexpected error in custom exception handler",
                    exc_info=True,
                )

    # -- async generators -------------------------------------------------------------

    def _asyncgen_finalizer_hook(self, agen) -> None:
        self._asyncgens.discard(agen)
        if not self.is_closed():
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    def _asyncgen_firstiter_hook(self, agen) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(
                f"asynchronous generator {agen!r} was scheduled after "
                f"loop.shutdown_asyncgens() call",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        self._asyncgens.add(agen)

    async def shutdown_asyncgens(self) -> None:
        """Close every async generator still open on this loop."""
        self._asyncgens_shutdown_called = True
        if not len(self._asyncgens):
            return
        closing = list(self._asyncgens)
        self._asyncgens.clear()
        results = await tasks.gather(*[ag.aclose() for ag in closing], return_exceptions=True)
        for result, agen in zip(results, closing, strict=True):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": f"an error occurred during closing of "
                        f"asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # -- executor ---------------------------------------------------------------------

    def run_in_executor(self, executor, func, *args):
        self._check_closed()
        if self._debug:
            self._make_handle("run_in_executor", func)
        if executor is None:
            if self._executor_shutdown_called:
                raise RuntimeError("Executor shutdown has been called")
            executor = self._default_executor
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
                self._default_executor = executor
        return futures.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor) -> None:
        if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            raise TypeError("executor must be ThreadPoolExecutor instance")
        self._default_executor = executor

    async def shutdown_default_executor(self, timeout=None) -> None:
        """Shut the default executor down without blocking the loop.

        ``timeout`` (3.12's ``asyncio.run`` passes one): after that many seconds stop
        waiting for its threads, with a RuntimeWarning, as the stdlib does.
        """
        self._executor_shutdown_called = True
        if self._default_executor is None:
            return
        future = self.create_future()
        thread = threading.Thread(target=self._shutdown_executor_in_thread, args=(future,))
        thread.start()
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            warnings.warn(
                f"The executor did not finishing joining its threads within {timeout} seconds.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._default_executor.shutdown(wait=False)
        else:
            thread.join()

    def _shutdown_executor_in_thread(self, future) -> None:
        try:
            self._default_executor.shutdown(wait=True)
        except Exception as exc:
            if not self.is_closed() and not future.cancelled():
                self.call_soon_threadsafe(future.set_exception, exc)
        else:
            # The waiter may have given up (timeout) and cancelled the future meanwhile.
            if not self.is_closed():
                self.call_soon_threadsafe(futures._set_result_unless_cancelled, future, None)

    # -- signals ----------------------------------------------------------------------

    def _check_signal(self, sig) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig, callback, *args) -> None:
        """Run ``callback(*args)`` on the loop whenever signal ``sig`` arrives."""
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            # Raises ValueError outside the main thread, as the stdlib's does.
            signal.set_wakeup_fd(self._signal_wakeup_fd())
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        handle = self._make_handle("add_signal_handler", callback, *args)
        self._signal_set(sig, handle)
        try:
            signal.signal(sig, _sighandler_noop)
            # Let interrupted system calls restart; the wake-up fd wakes the loop anyway.
            signal.siginterrupt(sig, False)
        except OSError as exc:
            self._signal_set(sig, None)
            if not self._signal_registered():
                try:
                    signal.set_wakeup_fd(-1)
                except (ValueError, OSError) as nexc:
                    logger.info("set_wakeup_fd(-1) failed: %s", nexc)
            if exc.errno == 22:  # EINVAL: SIGKILL, SIGSTOP
                raise RuntimeError(f"sig {sig} cannot be caught") from None
            raise

    def remove_signal_handler(self, sig) -> bool:
        """Remove the handler for ``sig``; True if there was one."""
        self._check_signal(sig)
        if not self._signal_set(sig, None):
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == 22:
                raise RuntimeError(f"sig {sig} cannot be caught") from None
            raise
        if not self._signal_registered():
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info("set_wakeup_fd(-1) failed: %s", exc)
        return True
