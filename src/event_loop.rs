//! The loop proper: the ready queue, the timer heap, the reactor and the iteration that
//! drives them (the stdlib's `BaseEventLoop._run_once`).
//!
//! One iteration:
//! 1. drop cancelled timers at the top of the heap (or compact it, see `timers`);
//! 2. wait for I/O with the interpreter detached — not at all when callbacks are ready
//!    or the loop is stopping, until the earliest timer otherwise;
//! 3. queue the reader/writer/signal callbacks that fired, then every timer due by
//!    `now + clock resolution`;
//! 4. run exactly the callbacks queued so far; ones they schedule wait for the next
//!    iteration.
//!
//! Only the loop's thread runs iterations. Other threads reach the loop through
//! `call_soon_threadsafe`, which appends under the queue's lock and wakes the wait; no
//! lock is ever held while Python code runs or while the interpreter is detached.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyAttributeError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyInt, PyTuple};

use crate::clock::monotonic;
use crate::errors::os_error;
use crate::handles::{Handle, NewHandle};
use crate::pyhelpers::{cached, call_with_keywords};
use crate::reactor::{Dispatch, Reactor, Waiter, SIGNAL_TOKEN};
use crate::ready::{Job, ReadyQueue};
use crate::signals::Signals;
use crate::sock::Call;
use crate::sync::lock;
use crate::timers::TimerHeap;

/// The longest single wait, as in the stdlib (a day).
const MAXIMUM_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;
/// `time.get_clock_info('monotonic').resolution` on Linux.
const CLOCK_RESOLUTION: f64 = 1e-9;

#[derive(Default)]
struct Scheduler {
    ready: ReadyQueue<Job>,
    timers: TimerHeap<Py<Handle>>,
}

/// The Rust half of `ferroloop.Loop`: everything that runs per callback, per timer or
/// per I/O event. The Python subclass adds what runs once per loop or per run.
#[pyclass(frozen, subclass, module = "ferroloop._ferroloop", name = "LoopCore")]
pub struct LoopCore {
    sched: Mutex<Scheduler>,
    reactor: Reactor,
    signals: Mutex<Signals>,
    closed: AtomicBool,
    stopping: AtomicBool,
    /// `threading.get_ident()` of the thread running the loop; 0 when not running.
    thread_id: AtomicU64,
    debug: AtomicBool,
    slow_callback_duration: Mutex<f64>,
}

fn current_thread_ident() -> u64 {
    // SAFETY: pthread_self has no preconditions. CPython's threading.get_ident() is the
    // same value cast to an unsigned long.
    unsafe { libc::pthread_self() as u64 }
}

/// `selectors._fileobj_to_fd`: an int, or an object whose `fileno()` gives one.
fn fileobj_to_fd(obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    let py = obj.py();
    let fd: i64 = if obj.is_instance_of::<PyInt>() {
        obj.extract()?
    } else {
        let as_int = obj
            .call_method0(intern!(py, "fileno"))
            .and_then(|n| py.get_type::<PyInt>().call1((n,)));
        match as_int {
            Ok(n) => n.extract()?,
            Err(e)
                if e.is_instance_of::<PyAttributeError>(py)
                    || e.is_instance_of::<PyTypeError>(py)
                    || e.is_instance_of::<PyValueError>(py) =>
            {
                return Err(PyValueError::new_err(format!(
                    "Invalid file object: {}",
                    obj.repr()?
                )));
            }
            Err(e) => return Err(e),
        }
    };
    RawFd::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| PyValueError::new_err(format!("Invalid file descriptor: {fd}")))
}

/// Runs `f` inside `context` (entered as `Context.run` would), or as is for None.
fn in_context(
    py: Python<'_>,
    context: Option<&Py<PyAny>>,
    f: impl FnOnce() -> PyResult<()>,
) -> PyResult<()> {
    let Some(ctx) = context else {
        return f();
    };
    // SAFETY: `ctx` is a live contextvars.Context; enter and exit pair up on this thread.
    if unsafe { pyo3::ffi::PyContext_Enter(ctx.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let result = f();
    // SAFETY: as above; exiting the context entered just before cannot fail.
    unsafe { pyo3::ffi::PyContext_Exit(ctx.as_ptr()) };
    result
}

impl LoopCore {
    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        lock(&self.sched)
    }

    fn check_closed(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(PyRuntimeError::new_err("Event loop is closed"))
        } else {
            Ok(())
        }
    }

    fn is_debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    /// The stdlib's `_check_callback` (debug mode adds its thread and coroutine checks;
    /// the callable check always runs, so a bad argument fails at the call site).
    fn check_callback(
        &self,
        callback: &Bound<'_, PyAny>,
        method: &str,
        threadsafe: bool,
    ) -> PyResult<()> {
        let py = callback.py();
        if self.is_debug() {
            if !threadsafe {
                self.check_thread()?;
            }
            let coroutines = py.import(intern!(py, "asyncio.coroutines"))?;
            if coroutines
                .call_method1(intern!(py, "iscoroutine"), (callback,))?
                .is_truthy()?
                || coroutines
                    .call_method1(intern!(py, "iscoroutinefunction"), (callback,))?
                    .is_truthy()?
            {
                return Err(PyTypeError::new_err(format!(
                    "coroutines cannot be used with {method}()"
                )));
            }
        }
        if !callback.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "a callable object was expected by {method}(), got {}",
                callback.repr()?
            )));
        }
        Ok(())
    }

    fn check_thread(&self) -> PyResult<()> {
        let tid = self.thread_id.load(Ordering::Relaxed);
        if tid != 0 && tid != current_thread_ident() {
            return Err(PyRuntimeError::new_err(
                "Non-thread-safe operation invoked on an event loop other than the current one",
            ));
        }
        Ok(())
    }

    fn new_handle<'py>(
        &self,
        loop_: &'py Bound<'py, PyAny>,
        func: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        context: Option<Bound<'py, PyAny>>,
    ) -> NewHandle<'py> {
        NewHandle {
            func,
            args,
            context,
            loop_,
            debug: self.is_debug(),
        }
    }

    fn add_io(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        write: bool,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_closed()?;
        let fd = fileobj_to_fd(fd)?;
        this.ensure_fd_no_transport(slf.py(), fd)?;
        let method = if write { "add_writer" } else { "add_reader" };
        this.check_callback(&callback, method, false)?;
        let handle = this
            .new_handle(slf.as_any(), callback, args, None)
            .handle(false)?;
        let old = this
            .reactor
            .add(fd, write, Waiter::Callback(handle.clone_ref(slf.py())))
            .map_err(os_error)?;
        if let Some(old) = old {
            old.cancel(slf.py())?;
        }
        Ok(handle)
    }

    fn remove_io(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>, write: bool) -> PyResult<bool> {
        let this = slf.get();
        if this.closed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let fd = fileobj_to_fd(fd)?;
        this.ensure_fd_no_transport(slf.py(), fd)?;
        match this.reactor.remove(fd, write) {
            Some(old) => {
                old.cancel(slf.py())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// One iteration (see the module docs).
    fn run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let timeout = {
            let mut s = this.sched();
            s.timers.purge();
            if !s.ready.is_empty() || this.stopping.load(Ordering::Relaxed) {
                Some(0.0)
            } else {
                s.timers
                    .next_deadline()
                    .map(|when| (when - monotonic()).clamp(0.0, MAXIMUM_SELECT_TIMEOUT))
            }
        };
        let readiness = this.reactor.poll(py, timeout).map_err(os_error)?;
        if readiness.interrupted {
            // Runs Python-level signal handlers; SIGINT's default one raises
            // KeyboardInterrupt here, before any queued callback is taken.
            py.check_signals()?;
        }
        let (signalled, stale_signals) = if readiness.signals {
            lock(&this.signals).take_pending(py)
        } else {
            (Vec::new(), Vec::new())
        };
        for sig in stale_signals {
            slf.call_method1(intern!(py, "remove_signal_handler"), (sig,))?;
        }
        let mut batch = {
            let mut guard = this.sched();
            let s = &mut *guard;
            s.ready.extend(readiness.jobs);
            s.ready.extend(signalled.into_iter().map(Job::Callback));
            let end = monotonic() + CLOCK_RESOLUTION;
            let ready = &mut s.ready;
            s.timers.pop_due(end, |h| ready.push_back(Job::Callback(h)));
            s.ready.take_batch()
        };
        let debug = this.is_debug();
        while let Some(job) = batch.pop_front() {
            let result = match &job {
                Job::Callback(handle) => {
                    let h = handle.bind(py);
                    if h.get().is_cancelled() {
                        continue;
                    }
                    if debug {
                        this.run_timed(slf, h.as_any(), || Handle::run(h))
                    } else {
                        Handle::run(h)
                    }
                }
                Job::Io(ev) => {
                    let target = ev.target.bind(py);
                    let run =
                        || in_context(py, ev.context.as_ref(), || (ev.dispatch)(target, ev.write));
                    if debug {
                        this.run_timed(slf, target, run)
                    } else {
                        run()
                    }
                }
            };
            if let Err(err) = result {
                this.sched().ready.requeue_front(batch);
                return Err(err);
            }
        }
        this.sched().ready.recycle(batch);
        Ok(())
    }

    /// Runs `f` and reports it through `_log_slow_callback` if it took too long.
    fn run_timed(
        &self,
        slf: &Bound<'_, Self>,
        what: &Bound<'_, PyAny>,
        f: impl FnOnce() -> PyResult<()>,
    ) -> PyResult<()> {
        let t0 = monotonic();
        let result = f();
        let dt = monotonic() - t0;
        if dt >= *lock(&self.slow_callback_duration) {
            slf.call_method1(intern!(slf.py(), "_log_slow_callback"), (what, dt))?;
        }
        result
    }

    /// The stdlib's `_ensure_fd_no_transport`: user callbacks may not take over an fd a
    /// live transport owns.
    fn ensure_fd_no_transport(&self, py: Python<'_>, fd: RawFd) -> PyResult<()> {
        let Some(owner) = self.reactor.owner(fd) else {
            return Ok(());
        };
        // SAFETY: an owner entry is removed before its transport is deallocated, so the
        // address is a live object (we hold the interpreter; nothing frees it meanwhile).
        let transport = unsafe { Bound::from_borrowed_ptr(py, owner as *mut pyo3::ffi::PyObject) };
        if transport
            .call_method0(intern!(py, "is_closing"))?
            .is_truthy()?
        {
            return Ok(());
        }
        Err(PyRuntimeError::new_err(format!(
            "File descriptor {fd} is used by transport {}",
            transport.repr()?
        )))
    }

    /// Queues `func(*args)` for the next iteration (a transport's internal `call_soon`).
    pub(crate) fn soon(
        slf: &Bound<'_, Self>,
        func: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        let this = slf.get();
        this.check_closed()?;
        let handle = this
            .new_handle(slf.as_any(), func, args, None)
            .handle(true)?;
        this.sched().ready.push_back(Job::Callback(handle));
        Ok(())
    }

    /// Sets a native target's interest in `fd` (see `Reactor::set_native`).
    pub(crate) fn set_native_interest(
        &self,
        fd: RawFd,
        target: &Bound<'_, PyAny>,
        dispatch: Dispatch,
        read: bool,
        write: bool,
    ) -> PyResult<()> {
        let old = self.reactor.set_native(fd, target, dispatch, read, write)?;
        drop(old);
        Ok(())
    }

    /// Whether `close()` was called, for the transports.
    pub(crate) fn closed_flag(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Debug mode flag, for the transports.
    pub(crate) fn debug_enabled(&self) -> bool {
        self.is_debug()
    }

    /// Installs a native waiter (a pending `sock_*` call) as `fd`'s reader or writer,
    /// with `add_reader`'s checks and replacement rules.
    pub(crate) fn arm_native_waiter(
        &self,
        py: Python<'_>,
        fd: RawFd,
        write: bool,
        waiter: Waiter,
    ) -> PyResult<()> {
        self.check_closed()?;
        self.ensure_fd_no_transport(py, fd)?;
        if let Some(old) = self.reactor.add(fd, write, waiter).map_err(os_error)? {
            old.cancel(py)?;
        }
        Ok(())
    }

    /// Removes the native waiter `target` from `fd` if it is still installed; the
    /// returned waiter is to be dropped by the caller once it holds no lock.
    pub(crate) fn remove_native_waiter(
        &self,
        fd: RawFd,
        write: bool,
        target: &Bound<'_, PyAny>,
    ) -> Option<Waiter> {
        self.reactor.remove_native(fd, write, target)
    }

    /// `Future(loop=slf)`: what `create_future` returns.
    pub(crate) fn new_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static FUTURE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static NAMES: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();
        let py = slf.py();
        let future = cached(py, &FUTURE, "asyncio.futures", "Future")?;
        call_with_keywords(future, &[], &NAMES, &["loop"], &[slf.as_any()])
    }

    /// Re-arms `fd` for its native waiter after a spurious wake-up.
    pub(crate) fn rearm_native_waiter(&self, fd: RawFd) -> PyResult<()> {
        self.reactor.rearm(fd).map_err(os_error)
    }

    /// Records the transport owning `fd`.
    pub(crate) fn claim_fd(&self, fd: RawFd, owner: usize) {
        self.reactor.claim(fd, owner);
    }

    /// Forgets `fd`'s owner if it is still `owner`.
    pub(crate) fn release_fd(&self, fd: RawFd, owner: usize) {
        self.reactor.release(fd, owner);
    }
}

#[pymethods]
impl LoopCore {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self {
            sched: Mutex::new(Scheduler::default()),
            reactor: Reactor::new().map_err(os_error)?,
            signals: Mutex::new(Signals::default()),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread_id: AtomicU64::new(0),
            debug: AtomicBool::new(false),
            slow_callback_duration: Mutex::new(0.1),
        })
    }

    /// The loop clock: `time.monotonic()`.
    fn time(&self) -> f64 {
        monotonic()
    }

    /// Schedules `callback(*args)` for the next iteration.
    #[pyo3(signature = (callback, *args, context=None))]
    fn call_soon(
        slf: &Bound<'_, Self>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_closed()?;
        this.check_callback(&callback, "call_soon", false)?;
        let handle = this
            .new_handle(slf.as_any(), callback, args, context)
            .handle(true)?;
        this.sched()
            .ready
            .push_back(Job::Callback(handle.clone_ref(slf.py())));
        Ok(handle)
    }

    /// `call_soon` from any thread: also wakes the loop if it is waiting for I/O.
    #[pyo3(signature = (callback, *args, context=None))]
    fn call_soon_threadsafe(
        slf: &Bound<'_, Self>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_closed()?;
        this.check_callback(&callback, "call_soon_threadsafe", true)?;
        let handle = this
            .new_handle(slf.as_any(), callback, args, context)
            .handle(true)?;
        this.sched()
            .ready
            .push_back(Job::Callback(handle.clone_ref(slf.py())));
        if this.thread_id.load(Ordering::Relaxed) != current_thread_ident() {
            this.reactor.wake();
        }
        Ok(handle)
    }

    /// Schedules `callback(*args)` after `delay` seconds.
    #[pyo3(signature = (delay, callback, *args, context=None))]
    fn call_later(
        slf: &Bound<'_, Self>,
        delay: Option<f64>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let delay = delay.ok_or_else(|| PyTypeError::new_err("delay must not be None"))?;
        Self::schedule_at(slf, monotonic() + delay, callback, args, context)
    }

    /// Schedules `callback(*args)` at `when` on the loop clock.
    #[pyo3(signature = (when, callback, *args, context=None))]
    fn call_at(
        slf: &Bound<'_, Self>,
        when: Option<f64>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let when = when.ok_or_else(|| PyTypeError::new_err("when cannot be None"))?;
        Self::schedule_at(slf, when, callback, args, context)
    }

    /// Runs one iteration (exposed for tests and for `run_forever`'s Python half).
    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::run_once(slf)
    }

    /// Iterates until `stop()` is called; the stop flag is cleared on the way out.
    fn _run_forever_core(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        let result = loop {
            if let Err(e) = Self::run_once(slf) {
                break Err(e);
            }
            if this.stopping.load(Ordering::Relaxed) {
                break Ok(());
            }
        };
        this.stopping.store(false, Ordering::Relaxed);
        result
    }

    /// Makes `run_forever` return after the current iteration.
    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let tid = self.thread_id.load(Ordering::Relaxed);
        if tid != 0 && tid != current_thread_ident() {
            self.reactor.wake();
        }
    }

    #[getter]
    fn _stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// True while `run_forever`/`run_until_complete` runs.
    fn is_running(&self) -> bool {
        self.thread_id.load(Ordering::Relaxed) != 0
    }

    /// True once `close()` was called.
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn _check_closed(&self) -> PyResult<()> {
        self.check_closed()
    }

    #[getter(_thread_id)]
    fn thread_id_get(&self) -> Option<u64> {
        match self.thread_id.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    #[setter(_thread_id)]
    fn thread_id_set(&self, value: Option<u64>) {
        self.thread_id.store(value.unwrap_or(0), Ordering::Relaxed);
    }

    /// Debug mode flag.
    fn get_debug(&self) -> bool {
        self.is_debug()
    }

    #[getter(_debug)]
    fn debug_get(&self) -> bool {
        self.is_debug()
    }

    #[setter(_debug)]
    fn debug_set(&self, value: bool) {
        self.debug.store(value, Ordering::Relaxed);
    }

    /// In debug mode, callbacks running at least this long are logged.
    #[getter]
    fn get_slow_callback_duration(&self) -> f64 {
        *lock(&self.slow_callback_duration)
    }

    #[setter]
    fn set_slow_callback_duration(&self, value: f64) {
        *lock(&self.slow_callback_duration) = value;
    }

    /// Wakes the loop's wait from any thread.
    fn _write_to_self(&self) {
        self.reactor.wake();
    }

    /// Calls `callback(*args)` whenever `fd` is readable.
    #[pyo3(signature = (fd, callback, *args))]
    fn add_reader(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        Self::add_io(slf, fd, false, callback, args).map(drop)
    }

    /// `add_reader`, returning the handle.
    #[pyo3(signature = (fd, callback, *args))]
    fn _add_reader(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        Self::add_io(slf, fd, false, callback, args)
    }

    /// Stops watching `fd` for reading; True if it was watched.
    fn remove_reader(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        Self::remove_io(slf, fd, false)
    }

    /// Calls `callback(*args)` whenever `fd` is writable.
    #[pyo3(signature = (fd, callback, *args))]
    fn add_writer(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        Self::add_io(slf, fd, true, callback, args).map(drop)
    }

    /// `add_writer`, returning the handle.
    #[pyo3(signature = (fd, callback, *args))]
    fn _add_writer(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        Self::add_io(slf, fd, true, callback, args)
    }

    /// Stops watching `fd` for writing; True if it was watched.
    fn remove_writer(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        Self::remove_io(slf, fd, true)
    }

    /// Whether `fd` has a reader (`write=False`) or writer callback.
    #[pyo3(signature = (fd, write=false))]
    fn _has_io(&self, fd: &Bound<'_, PyAny>, write: bool) -> PyResult<bool> {
        Ok(self.reactor.has(fileobj_to_fd(fd)?, write))
    }

    /// A stream transport over the connected socket `sock` (the stdlib's
    /// `_SelectorSocketTransport` constructor, see `stream`).
    #[pyo3(signature = (sock, protocol, waiter=None, *, extra=None, server=None))]
    fn _make_socket_transport<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        protocol: Bound<'py, PyAny>,
        waiter: Option<Bound<'py, PyAny>>,
        extra: Option<Bound<'py, PyAny>>,
        server: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed()?;
        crate::stream::new_socket_transport(slf, sock, protocol, waiter, extra, server)
    }

    /// The read end of a pipe as a transport (`connect_read_pipe`, see `pipes`).
    #[pyo3(signature = (pipe, protocol, waiter=None, extra=None))]
    fn _make_read_pipe_transport<'py>(
        slf: &Bound<'py, Self>,
        pipe: Bound<'py, PyAny>,
        protocol: Bound<'py, PyAny>,
        waiter: Option<Bound<'py, PyAny>>,
        extra: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed()?;
        crate::pipes::new_pipe_transport(slf, pipe, protocol, waiter, extra, false)
    }

    /// The write end of a pipe as a transport (`connect_write_pipe`, see `pipes`).
    #[pyo3(signature = (pipe, protocol, waiter=None, extra=None))]
    fn _make_write_pipe_transport<'py>(
        slf: &Bound<'py, Self>,
        pipe: Bound<'py, PyAny>,
        protocol: Bound<'py, PyAny>,
        waiter: Option<Bound<'py, PyAny>>,
        extra: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed()?;
        crate::pipes::new_pipe_transport(slf, pipe, protocol, waiter, extra, true)
    }

    /// A datagram transport over `sock` (the stdlib's `_SelectorDatagramTransport`
    /// constructor, see `udp`); `address` is the connected `remote_addr`, if any.
    #[pyo3(signature = (sock, protocol, address=None, waiter=None, extra=None))]
    fn _make_datagram_transport<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        protocol: Bound<'py, PyAny>,
        address: Option<Bound<'py, PyAny>>,
        waiter: Option<Bound<'py, PyAny>>,
        extra: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed()?;
        crate::udp::new_datagram_transport(slf, sock, protocol, address, waiter, extra)
    }

    /// Sets (a ferroloop transport) or clears (None) the owner of `fd`, as the stdlib's
    /// `loop._transports[fd]`: `loop.sendfile` lends a transport's socket to
    /// `sock_sendfile` this way.
    fn _set_fd_owner(&self, fd: RawFd, transport: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        match transport {
            None => {
                if let Some(owner) = self.reactor.owner(fd) {
                    self.reactor.release(fd, owner);
                }
            }
            Some(t) if crate::stream::is_stream_transport(t) => {
                self.reactor.claim(fd, t.as_ptr() as usize)
            }
            Some(t) => {
                return Err(PyTypeError::new_err(format!(
                    "not a ferroloop transport: {}",
                    t.repr()?
                )))
            }
        }
        Ok(())
    }

    /// A Future attached to the loop.
    fn create_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::new_future(slf)
    }

    /// Wraps `coro` in a Task. A task factory, extra keywords (for the factory) and
    /// debug mode go through the Python half's `_create_task_py`.
    #[pyo3(signature = (coro, *, name=None, context=None, **kwargs))]
    fn create_task<'py>(
        slf: &Bound<'py, Self>,
        coro: Bound<'py, PyAny>,
        name: Option<Bound<'py, PyAny>>,
        context: Option<Bound<'py, PyAny>>,
        kwargs: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        static TASK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static NAMES: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let plain = !this.is_debug()
            && kwargs.as_ref().is_none_or(|k| k.is_empty())
            && slf.getattr(intern!(py, "_task_factory"))?.is_none();
        let none = py.None().into_bound(py);
        let name = name.unwrap_or_else(|| none.clone());
        let context = context.unwrap_or(none);
        if !plain {
            let kw = kwargs.unwrap_or_else(|| PyDict::new(py));
            kw.set_item(intern!(py, "name"), name)?;
            kw.set_item(intern!(py, "context"), context)?;
            return slf.call_method(intern!(py, "_create_task_py"), (coro,), Some(&kw));
        }
        let task = cached(py, &TASK, "asyncio.tasks", "Task")?;
        call_with_keywords(
            task,
            &[&coro],
            &NAMES,
            &["loop", "name", "context"],
            &[slf.as_any(), &name, &context],
        )
    }

    /// Receives up to `n` bytes from `sock` (a coroutine-like call, see `sock`).
    fn sock_recv<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        n: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::sock::sock_call(slf, Call::Recv, sock, n, None)
    }

    /// Receives into the writable buffer `buf`; the call returns the byte count.
    fn sock_recv_into<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        buf: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::sock::sock_call(slf, Call::RecvInto, sock, buf, None)
    }

    /// Sends all of `data` on the connected `sock`.
    fn sock_sendall<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        data: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::sock::sock_call(slf, Call::SendAll, sock, data, None)
    }

    /// Receives a datagram of up to `bufsize` bytes: `(data, address)`.
    fn sock_recvfrom<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        bufsize: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::sock::sock_call(slf, Call::RecvFrom, sock, bufsize, None)
    }

    /// Receives a datagram into `buf` (at most `nbytes`, 0: all of it): `(n, address)`.
    #[pyo3(signature = (sock, buf, nbytes=None))]
    fn sock_recvfrom_into<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        buf: Bound<'py, PyAny>,
        nbytes: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let nbytes = nbytes.unwrap_or_else(|| PyInt::new(slf.py(), 0).into_any());
        crate::sock::sock_call(slf, Call::RecvFromInto, sock, buf, Some(nbytes))
    }

    /// Sends the datagram `data` to `address`; the call returns the bytes sent.
    fn sock_sendto<'py>(
        slf: &Bound<'py, Self>,
        sock: Bound<'py, PyAny>,
        data: Bound<'py, PyAny>,
        address: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::sock::sock_call(slf, Call::SendTo, sock, data, Some(address))
    }

    /// Raises RuntimeError if a live transport owns `fd` (the sock_* methods' check).
    fn _ensure_fd_no_transport(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        self.ensure_fd_no_transport(py, fileobj_to_fd(fd)?)
    }

    /// The fd to give `signal.set_wakeup_fd`, created on first use.
    fn _signal_wakeup_fd(&self) -> PyResult<RawFd> {
        let (wfd, new_read_end) = lock(&self.signals).wakeup_fd().map_err(os_error)?;
        if let Some(rfd) = new_read_end {
            self.reactor
                .add_internal(rfd, SIGNAL_TOKEN)
                .map_err(os_error)?;
        }
        Ok(wfd)
    }

    /// Registers (or with None, unregisters) the handle run when `sig` arrives; returns
    /// whether one was registered before.
    fn _signal_set(&self, sig: i32, handle: Option<Py<Handle>>) -> bool {
        let old = lock(&self.signals).set(sig, handle);
        if let Some(old) = &old {
            old.get().release();
        }
        old.is_some()
    }

    /// The signals with handlers.
    fn _signal_registered(&self) -> Vec<i32> {
        lock(&self.signals).registered()
    }

    /// A handle for `callback(*args)` that is not scheduled anywhere (signal handlers).
    #[pyo3(signature = (method, callback, *args))]
    fn _make_handle(
        slf: &Bound<'_, Self>,
        method: &str,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_callback(&callback, method, true)?;
        this.new_handle(slf.as_any(), callback, args, None)
            .handle(false)
    }

    /// Number of callbacks queued for the next iteration.
    fn _ready_count(&self) -> usize {
        self.sched().ready.len()
    }

    /// Number of timers in the heap, cancelled ones included.
    fn _timer_count(&self) -> usize {
        self.sched().timers.len()
    }

    /// Marks the loop closed and drops every queued callback, timer and registration.
    fn _close_core(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let (ready, timers) = {
            let mut s = self.sched();
            (s.ready.clear(), s.timers.clear())
        };
        let (registered, targets) = self.reactor.clear();
        // Released with no lock held: dropping a callback can run arbitrary finalizers.
        let queued = ready.iter().filter_map(|job| match job {
            Job::Callback(h) => Some(h),
            Job::Io(_) => None,
        });
        for h in queued.chain(&timers).chain(&registered) {
            h.get().release();
        }
        drop(targets);
        drop(ready);
    }
}

impl LoopCore {
    fn schedule_at(
        slf: &Bound<'_, Self>,
        when: f64,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        if when.is_nan() {
            return Err(PyValueError::new_err("timer deadline must not be NaN"));
        }
        let this = slf.get();
        this.check_closed()?;
        this.check_callback(&callback, "call_at", false)?;
        let counter = this.sched().timers.cancel_counter();
        let handle = this
            .new_handle(slf.as_any(), callback, args, context)
            .timer(when, counter)?;
        this.sched().timers.push(when, handle.clone_ref(slf.py()));
        Ok(handle)
    }
}
