//! The loop proper: the ready queue, the timer heap, the reactor and the iteration that
//! drives them (the stdlib's `BaseEventLoop._run_once`).
//!
//! One iteration:
//! 1. drop cancelled timers at the top of the heap (or compact it, see `timers`);
//! 2. wait for I/O with the interpreter detached — not at all when callbacks are ready
//!    or the loop is stopping, until the earliest timer otherwise (rounded up to the
//!    millisecond, see `reactor`);
//! 3. queue the reader/writer/signal callbacks that fired, then every timer due by
//!    `now + clock resolution`;
//! 4. run exactly the callbacks queued so far; ones they schedule wait for the next
//!    iteration.
//!
//! Only the loop's thread runs iterations. Other threads reach the loop through
//! `call_soon_threadsafe`, which appends under the queue's lock and wakes the wait; no
//! lock is ever held while Python code runs or while the interpreter is detached.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::{PyAttributeError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyInt, PyString, PyTuple, PyType};
use pyo3::{ffi, intern};
use pyo3::{PyTraverseError, PyVisit};

use crate::clock::monotonic;
use crate::errors::os_error;
use crate::handles::{Args, Handle, HandlePool, NewHandle, ScratchContext, TimerHandle};
use crate::pyhelpers::{cached, call_with_keywords};
use crate::reactor::{Dispatch, FdMap, IoEvent, Reactor, Waiter, SIGNAL_TOKEN};
use crate::ready::{Job, ReadyQueue};
use crate::signals::Signals;
use crate::sock::Call;
use crate::sync::{lock, SpinGuard, SpinLock};
use crate::timers::TimerHeap;

/// The longest single wait, as in the stdlib (a day).
const MAXIMUM_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;
/// `time.get_clock_info('monotonic').resolution` on Linux.
const CLOCK_RESOLUTION: f64 = 1e-9;

#[derive(Default)]
struct Scheduler {
    ready: ReadyQueue<Job>,
    timers: TimerHeap<Py<TimerHandle>>,
}

/// The Rust half of `ferroloop.Loop`: everything that runs per callback, per timer or
/// per I/O event. The Python subclass adds what runs once per loop or per run.
#[pyclass(frozen, subclass, module = "ferroloop._ferroloop", name = "LoopCore")]
pub struct LoopCore {
    sched: SpinLock<Scheduler>,
    reactor: Reactor,
    signals: Mutex<Signals>,
    closed: AtomicBool,
    stopping: AtomicBool,
    /// `threading.get_ident()` of the thread running the loop; 0 when not running.
    thread_id: AtomicU64,
    debug: AtomicBool,
    slow_callback_duration: Mutex<f64>,
    /// `set_task_factory`'s factory (the `_task_factory` attribute), kept here so that
    /// `create_task` can tell there is none without an attribute lookup; visited by the
    /// collector (see `__traverse__`).
    task_factory: Mutex<Option<Py<PyAny>>>,
    /// `{"loop": self}`, made once: the keyword arguments of every `Future` that
    /// `create_future` makes and every plain `Task`. `Future` and `Task` have no vectorcall,
    /// so passing `loop=` as a keyword built a new dict per call. A cycle through the loop,
    /// visited by the collector (see `__traverse__`).
    loop_kwargs: Mutex<Option<Py<PyDict>>>,
    /// Spent handles kept for reuse while the loop runs (emptied when it stops).
    pool: HandlePool,
    /// fd -> the object (not an int) `add_reader`/`add_writer` first registered it with,
    /// kept while the fd has a reader or writer callback: once that object is a closed
    /// socket (whose `fileno()` is -1), `remove_reader`/`remove_writer` find its
    /// registration by identity, as the selectors' exhaustive lookup does.
    fileobjs: Mutex<FdMap<Py<PyAny>>>,
    /// The class replaces `time()` (a subclass's own clock, or a patch of the class):
    /// found at creation and again whenever a run starts.
    class_clock: AtomicBool,
    /// An instance attribute `time` shadows the method (`mock.patch.object(loop,
    /// "time")`, as virtual-clock test helpers do).
    instance_clock: AtomicBool,
}

fn current_thread_ident() -> u64 {
    // SAFETY: pthread_self has no preconditions. CPython's threading.get_ident() is the
    // same value cast to an unsigned long.
    unsafe { libc::pthread_self() as u64 }
}

/// What a run of the loop (`run_forever`, or one `_run_once`) keeps across its
/// iterations; owned by the run, so using it needs no lock.
struct RunState {
    /// The callbacks the current iteration runs; empty between iterations, and kept so
    /// that iterations neither allocate nor free a buffer.
    batch: VecDeque<Job>,
    /// The empty context reused by callbacks that need a fresh one (released by the
    /// owner when the run ends).
    scratch: ScratchContext,
    /// Spent handles go to the loop's pool (see `HandlePool`), which the owner must
    /// empty when the run ends.
    recycle: bool,
}

impl RunState {
    fn new(recycle: bool) -> Self {
        Self {
            batch: VecDeque::new(),
            scratch: ScratchContext::default(),
            recycle,
        }
    }
}

/// Drops `v`, without the out-of-line drop glue when it never allocated (so holds
/// nothing): the per-iteration scratch vectors are almost always empty.
#[inline(always)]
fn release_vec<T>(v: Vec<T>) {
    if v.capacity() == 0 {
        // Nothing to free or drop: forgetting a never-allocated vector is a no-op.
        std::mem::forget(v);
    } else {
        drop(v);
    }
}

#[cold]
fn not_callable(callback: &Bound<'_, PyAny>, method: &str) -> PyErr {
    match callback.repr() {
        Ok(r) => PyTypeError::new_err(format!(
            "a callable object was expected by {method}(), got {r}"
        )),
        Err(e) => e,
    }
}

/// While the loop runs, puts its bound `call_soon` in the instance's attributes, and
/// returns it (`None` if it did not: a Python that does not need it, `call_soon`
/// overridden or already set on the instance, or an instance without attribute dict).
///
/// Before 3.12 the C `Task` and `Future` get `loop.call_soon` as an attribute for every
/// step and callback: with the method only on the class, each lookup makes a new bound
/// method object; an instance attribute is found with one dict lookup. (Python code
/// calling `loop.call_soon` pays a little more for the shadowed method; 3.12's C `Task`
/// calls the method without binding it, so from 3.12 on nothing is pinned.) It is
/// removed when the loop stops running ([`unpin_call_soon`]), so it does not outlive
/// the run as a reference cycle.
fn pin_call_soon<'py>(slf: &Bound<'py, LoopCore>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = slf.py();
    if py.version_info() >= (3, 12) {
        return Ok(None);
    }
    let name = intern!(py, "call_soon");
    let core = py.get_type::<LoopCore>();
    let ty = slf.get_type();
    if ty.is(&core) || !ty.getattr(name)?.is(&core.getattr(name)?) {
        return Ok(None);
    }
    // SAFETY: `slf` is a live object; the result is a new reference or NULL.
    let dict = unsafe { ffi::PyObject_GenericGetDict(slf.as_ptr(), std::ptr::null_mut()) };
    // SAFETY: as above.
    let dict = match unsafe { Bound::from_owned_ptr_or_err(py, dict) } {
        Ok(d) => d.cast_into::<pyo3::types::PyDict>()?,
        Err(_) => return Ok(None),
    };
    if dict.contains(name)? {
        return Ok(None);
    }
    let bound = slf.getattr(name)?;
    dict.set_item(name, &bound)?;
    Ok(Some(bound))
}

/// Undoes [`pin_call_soon`], unless the attribute was replaced meanwhile.
fn unpin_call_soon(slf: &Bound<'_, LoopCore>, pinned: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    let Some(bound) = pinned else {
        return Ok(());
    };
    let py = slf.py();
    let name = intern!(py, "call_soon");
    // SAFETY: `slf` is a live object; the result is a new reference or NULL.
    let dict = unsafe { ffi::PyObject_GenericGetDict(slf.as_ptr(), std::ptr::null_mut()) };
    // SAFETY: as above.
    let dict =
        unsafe { Bound::from_owned_ptr_or_err(py, dict) }?.cast_into::<pyo3::types::PyDict>()?;
    if dict.get_item(name)?.is_some_and(|v| v.is(&bound)) {
        dict.del_item(name)?;
    }
    Ok(())
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
    fn sched(&self) -> SpinGuard<'_, Scheduler> {
        self.sched.lock()
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

    fn has_task_factory(&self) -> bool {
        lock(&self.task_factory).is_some()
    }

    /// The stdlib's `_check_callback` (debug mode adds its thread and coroutine checks;
    /// the callable check always runs, so a bad argument fails at the call site).
    #[inline]
    fn check_callback(
        &self,
        callback: &Bound<'_, PyAny>,
        method: &str,
        threadsafe: bool,
    ) -> PyResult<()> {
        if self.is_debug() {
            self.check_callback_debug(callback, method, threadsafe)?;
        }
        if !callback.is_callable() {
            return Err(not_callable(callback, method));
        }
        Ok(())
    }

    /// Debug mode's part of [`Self::check_callback`].
    #[cold]
    fn check_callback_debug(
        &self,
        callback: &Bound<'_, PyAny>,
        method: &str,
        threadsafe: bool,
    ) -> PyResult<()> {
        let py = callback.py();
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
        args: Args,
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
        fileobj: &Bound<'_, PyAny>,
        write: bool,
        callback: Bound<'_, PyAny>,
        args: Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_closed()?;
        // A socket closed while registered is found by identity, as the selectors do.
        let (fd, closed) = match fileobj_to_fd(fileobj) {
            Ok(fd) => {
                this.ensure_fd_no_transport(slf.py(), fd)?;
                (fd, false)
            }
            Err(e) => (this.closed_fileobj_fd(fileobj).ok_or(e)?, true),
        };
        let method = if write { "add_writer" } else { "add_reader" };
        this.check_callback(&callback, method, false)?;
        let handle = this
            .new_handle(slf.as_any(), callback, Args::from_tuple(args), None)
            .handle(false)?;
        let waiter = Waiter::Callback(handle.clone_ref(slf.py()));
        // A closed socket's registration can only change callbacks: the selectors skip
        // the syscall then, which on a closed fd fails (and so does any other change, as
        // there).
        let swapped = if closed {
            this.reactor.replace(fd, write, waiter)
        } else {
            Err(waiter)
        };
        let old = match swapped {
            Ok(old) => Some(old),
            Err(waiter) => this.reactor.add(fd, write, waiter).map_err(os_error)?,
        };
        if !fileobj.is_instance_of::<PyInt>() {
            lock(&this.fileobjs)
                .entry(fd)
                .or_insert_with(|| fileobj.clone().unbind());
        }
        if let Some(old) = old {
            old.cancel(slf.py())?;
        }
        Ok(handle)
    }

    fn remove_io(slf: &Bound<'_, Self>, fileobj: &Bound<'_, PyAny>, write: bool) -> PyResult<bool> {
        let py = slf.py();
        let this = slf.get();
        if this.closed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let fd = match fileobj_to_fd(fileobj) {
            Ok(fd) => {
                this.ensure_fd_no_transport(py, fd)?;
                fd
            }
            // (The stdlib's transport check sees fd -1 here: no transport.)
            Err(e) => this.closed_fileobj_fd(fileobj).ok_or(e)?,
        };
        let old = this.reactor.remove(fd, write);
        let forgotten = if this.reactor.has(fd, false) || this.reactor.has(fd, true) {
            None
        } else {
            lock(&this.fileobjs).remove(&fd)
        };
        // Released with no lock held: dropping the object can run its finalizer.
        drop(forgotten);
        match old {
            Some(old) => {
                old.cancel(py)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The fd that `add_reader`/`add_writer` registered `fileobj` under, if `fileobj` is
    /// an object (not an int) whose `fileno()` now gives a negative number (a closed
    /// socket): `selectors`' `_fileobj_lookup` falls back to this identity search.
    #[cold]
    fn closed_fileobj_fd(&self, fileobj: &Bound<'_, PyAny>) -> Option<RawFd> {
        let py = fileobj.py();
        if fileobj.is_instance_of::<PyInt>() {
            return None;
        }
        let negative = fileobj
            .call_method0(intern!(py, "fileno"))
            .and_then(|n| n.extract::<i64>())
            .is_ok_and(|n| n < 0);
        if !negative {
            return None;
        }
        lock(&self.fileobjs)
            .iter()
            .find(|(_, obj)| obj.is(fileobj))
            .map(|(fd, _)| *fd)
    }

    /// One iteration (see the module docs), with the caller's [`RunState`].
    ///
    /// The common iteration of a busy loop (callbacks ready, no timer, no fd registered)
    /// takes its batch under one lock and goes straight to running it; everything else
    /// lives in out-of-line helpers, so the code run per callback stays small (it shares
    /// the instruction cache with the interpreter's own hot code).
    #[inline]
    fn run_once(slf: &Bound<'_, Self>, state: &mut RunState) -> PyResult<()> {
        let this = slf.get();
        let batch = &mut state.batch;
        let fast = {
            let mut s = this.sched();
            // Nothing to wait for (callbacks ready, or stopping), no timer to queue, and
            // nothing but the wake-up eventfd in the set (see `Reactor::is_idle`).
            let fast = s.timers.is_empty()
                && (!s.ready.is_empty() || this.stopping.load(Ordering::Relaxed))
                && this.reactor.is_idle();
            if fast {
                s.ready.swap_batch(batch);
            }
            fast
        };
        if !fast {
            Self::collect_ready(slf, batch)?;
        }
        Self::run_batch(slf, state)
    }

    /// Steps 1 to 3 of an iteration: waits for I/O (no longer than the earliest timer),
    /// then moves into `batch` what is ready: fired I/O and signal callbacks, due timers
    /// and the callbacks queued so far.
    #[inline(never)]
    fn collect_ready(slf: &Bound<'_, Self>, batch: &mut VecDeque<Job>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        // Timers dropped from the heap, released once the lock is given back.
        let mut dead = Vec::new();
        let clock = Self::replaced_clock(slf)?;
        let timeout = {
            let mut s = this.sched();
            if !s.timers.is_empty() {
                s.timers.purge(&mut dead);
            }
            if !s.ready.is_empty() || this.stopping.load(Ordering::Relaxed) {
                Some(0.0)
            } else {
                s.timers.next_deadline().map(|when| {
                    let now = clock.unwrap_or_else(monotonic);
                    (when - now).clamp(0.0, MAXIMUM_SELECT_TIMEOUT)
                })
            }
        };
        release_vec(dead);
        let mut readiness = this.reactor.poll(py, timeout).map_err(os_error)?;
        if readiness.interrupted {
            // Runs Python-level signal handlers; SIGINT's default one raises
            // KeyboardInterrupt here, before any queued callback is taken.
            py.check_signals()?;
        }
        let signalled = if readiness.signals {
            let (signalled, stale) = lock(&this.signals).take_pending(py);
            for sig in stale {
                slf.call_method1(intern!(py, "remove_signal_handler"), (sig,))?;
            }
            signalled
        } else {
            Vec::new()
        };
        let mut dead = Vec::new();
        let clock = Self::replaced_clock(slf)?;
        {
            let mut guard = this.sched();
            let s = &mut *guard;
            s.ready.extend(readiness.jobs.drain(..));
            if signalled.capacity() == 0 {
                release_vec(signalled);
            } else {
                s.ready.extend(signalled.into_iter().map(Job::Callback));
            }
            // No clock read when no timer is scheduled.
            if !s.timers.is_empty() {
                let end = clock.unwrap_or_else(monotonic) + CLOCK_RESOLUTION;
                let ready = &mut s.ready;
                s.timers.pop_due(end, &mut dead, |h| {
                    ready.push_back(Job::Callback(h.into_bound(py).into_super().unbind()))
                });
            }
            s.ready.swap_batch(batch);
        }
        this.reactor.recycle_jobs(readiness.jobs);
        release_vec(dead);
        Ok(())
    }

    /// Step 4 of an iteration: runs the callbacks in `batch`. If one raises
    /// `SystemExit`/`KeyboardInterrupt`, the rest go back to the front of the queue.
    #[inline]
    fn run_batch(slf: &Bound<'_, Self>, state: &mut RunState) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let debug = this.is_debug();
        let RunState {
            batch,
            scratch,
            recycle,
        } = state;
        while let Some(job) = batch.pop_front() {
            let result = match job {
                Job::Callback(handle) => {
                    // Bound: released with a plain decref once run.
                    let h = handle.into_bound(py);
                    if h.get().is_cancelled() {
                        continue;
                    }
                    let result = if debug {
                        this.run_timed(slf, h.as_any(), || Handle::run(&h, None))
                    } else {
                        Handle::run(&h, Some(scratch))
                    };
                    if *recycle {
                        this.pool.recycle(h);
                    }
                    result
                }
                Job::Io(ev) => Self::run_io(slf, ev, debug),
            };
            if let Err(err) = result {
                return Err(this.interrupted(batch, err));
            }
        }
        Ok(())
    }

    /// Runs a native transport's (or waiter's) dispatch for a ready fd.
    #[inline(never)]
    fn run_io(slf: &Bound<'_, Self>, ev: IoEvent, debug: bool) -> PyResult<()> {
        let py = slf.py();
        // Bound, so the references are released directly: dropping a `Py` first asks a
        // thread-local whether the interpreter is attached.
        let target = ev.target.into_bound(py);
        let context = ev.context.map(|c| c.into_bound(py));
        let target = &target;
        let run = || {
            in_context(py, context.as_ref().map(|c| c.as_unbound()), || {
                (ev.dispatch)(target, ev.write)
            })
        };
        if debug {
            slf.get().run_timed(slf, target, run)
        } else {
            run()
        }
    }

    /// A callback raised `SystemExit`/`KeyboardInterrupt`: the rest of its batch goes
    /// back to the front of the queue, and the error propagates.
    #[cold]
    #[inline(never)]
    fn interrupted(&self, batch: &mut VecDeque<Job>, err: PyErr) -> PyErr {
        self.sched().ready.requeue_front(batch);
        err
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
            .new_handle(slf.as_any(), func, Args::from_tuple(args), None)
            .oneshot(&this.pool)?;
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
        let py = slf.py();
        let future = cached(py, &FUTURE, "asyncio.futures", "Future")?;
        future.call((), Some(&Self::loop_kwargs(slf)?))
    }

    /// `{"loop": slf}` (see `loop_kwargs`). Callees must not change it: `Future` and
    /// `Task` only read their keyword arguments, and a Python `__init__` gets a copy.
    fn loop_kwargs<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let py = slf.py();
        let mut kwargs = lock(&slf.get().loop_kwargs);
        if let Some(d) = &*kwargs {
            return Ok(d.bind(py).clone());
        }
        let d = PyDict::new(py);
        d.set_item(intern!(py, "loop"), slf)?;
        *kwargs = Some(d.clone().unbind());
        Ok(d)
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
    #[classmethod]
    fn new(cls: &Bound<'_, PyType>) -> PyResult<Self> {
        let class_clock = AtomicBool::new(class_replaces_time(cls)?);
        Ok(Self {
            sched: SpinLock::new(Scheduler::default()),
            reactor: Reactor::new().map_err(os_error)?,
            signals: Mutex::new(Signals::default()),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread_id: AtomicU64::new(0),
            debug: AtomicBool::new(false),
            slow_callback_duration: Mutex::new(0.1),
            task_factory: Mutex::new(None),
            loop_kwargs: Mutex::new(None),
            pool: HandlePool::default(),
            fileobjs: Mutex::new(FdMap::default()),
            class_clock,
            instance_clock: AtomicBool::new(false),
        })
    }

    /// Re-reads whether the instance's own `time` attribute replaces the clock (see
    /// [`Self::replaced_clock`]). `Loop.__setattr__`/`__delattr__` call it when `time`
    /// changes; they are Python methods so that `object.__setattr__(loop, ...)` keeps
    /// working, which it would not with a C-level `tp_setattro` here.
    fn _note_clock(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let dict = slf.getattr(intern!(py, "__dict__"))?;
        let own = dict.cast::<PyDict>()?.contains(intern!(py, "time"))?;
        slf.get().instance_clock.store(own, Ordering::Relaxed);
        Ok(())
    }

    /// The loop clock: `time.monotonic()`.
    fn time(&self) -> f64 {
        monotonic()
    }

    /// Runs one iteration (exposed for tests and for `run_forever`'s Python half).
    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::check_clocks(slf)?;
        let mut state = RunState::new(false);
        let result = Self::run_once(slf, &mut state);
        state.scratch.release(slf.py());
        crate::iobuf::release_spare(slf.py());
        result
    }

    /// Iterates until `stop()` is called; the stop flag is cleared on the way out.
    fn _run_forever_core(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::check_clocks(slf)?;
        let this = slf.get();
        let pinned = pin_call_soon(slf)?;
        let mut state = RunState::new(true);
        let result = loop {
            if let Err(e) = Self::run_once(slf, &mut state) {
                break Err(e);
            }
            if this.stopping.load(Ordering::Relaxed) {
                break Ok(());
            }
        };
        this.stopping.store(false, Ordering::Relaxed);
        drop(this.pool.drain());
        state.scratch.release(slf.py());
        crate::iobuf::release_spare(slf.py());
        let unpinned = unpin_call_soon(slf, pinned);
        result.and(unpinned)
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

    /// The task factory (`set_task_factory` sets it), or None.
    #[getter(_task_factory)]
    fn task_factory_get(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        lock(&self.task_factory).as_ref().map(|f| f.clone_ref(py))
    }

    #[setter(_task_factory)]
    fn task_factory_set(&self, factory: Option<Py<PyAny>>) {
        // The old factory is released after the lock is given back (its finalizer may
        // run code).
        let old = std::mem::replace(&mut *lock(&self.task_factory), factory);
        drop(old);
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // Never waits: the lock is only held for a few instructions that allocate
        // nothing, but a collection must not block. Not visiting only makes the
        // collector keep the factory alive this time.
        if let Ok(factory) = self.task_factory.try_lock() {
            if let Some(factory) = &*factory {
                visit.call(factory)?;
            }
        }
        if let Ok(kwargs) = self.loop_kwargs.try_lock() {
            if let Some(kwargs) = &*kwargs {
                visit.call(kwargs)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let old = lock(&self.task_factory).take();
        drop(old);
        let old = lock(&self.loop_kwargs).take();
        drop(old);
    }

    #[getter(_debug)]
    fn debug_get(&self) -> bool {
        self.is_debug()
    }

    /// Takes any object, by its truth value: `set_debug(0)`/`set_debug(1)` are common
    /// (the stdlib stores whatever it is given).
    #[setter(_debug)]
    fn debug_set(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.debug.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
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

    /// Wraps `coro` in a Task. A task factory, extra keywords (for the factory) and
    /// debug mode go through the Python half's `_create_task_py`.
    ///
    /// The class's `create_task` is the fast one (`create_task_fast`), which handles the
    /// plain cases itself and calls this for the others.
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
            && !this.has_task_factory();
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
        this.new_handle(slf.as_any(), callback, Args::from_tuple(args), None)
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
        let fileobjs = std::mem::take(&mut *lock(&self.fileobjs));
        drop(self.pool.drain());
        // Released with no lock held: dropping a callback can run arbitrary finalizers.
        let queued = ready.iter().filter_map(|job| match job {
            Job::Callback(h) => Some(h),
            Job::Io(_) => None,
        });
        let timers = timers.iter().map(TimerHandle::base);
        for h in queued.chain(timers).chain(&registered) {
            h.get().release();
        }
        drop(targets);
        drop(fileobjs);
        drop(ready);
        // Breaks the loop's cycle through its own keyword dict: a closed loop nothing
        // else references is freed at once, as before the dict existed. Taken in a
        // statement of its own, so the dict is released after the lock, like the rest.
        let kwargs = lock(&self.loop_kwargs).take();
        drop(kwargs);
    }
}

// -- call_soon, call_soon_threadsafe, call_later, call_at, create_task, get_debug,
//    create_future -------------------------------------------------------------------
//
// The first four run once per callback (the C `Task` calls `call_soon(step, context=ctx)`
// for every step), `create_task` and `get_debug` once per task (the C `Future.__init__`
// calls `get_debug`), `create_future` once per awaited read of a stream, so they are C
// functions of their own instead of `#[pymethods]`: PyO3's generic argument extraction
// would build a tuple for `*args` and walk a keyword table on every call. Their C entry
// points are lighter than PyO3's trampoline (see [`fast_entry`]); they are installed on
// `LoopCore` by [`install_fast_methods`].

impl LoopCore {
    /// `call_soon`/`call_soon_threadsafe` once the arguments are parsed.
    fn schedule_soon(
        slf: &Bound<'_, Self>,
        call: CallArgs<'_>,
        threadsafe: bool,
    ) -> PyResult<Py<Handle>> {
        let this = slf.get();
        this.check_closed()?;
        let method = if threadsafe {
            "call_soon_threadsafe"
        } else {
            "call_soon"
        };
        this.check_callback(&call.callback, method, threadsafe)?;
        let handle = this
            .new_handle(slf.as_any(), call.callback, call.args, call.context)
            .oneshot(&this.pool)?;
        this.sched()
            .ready
            .push_back(Job::Callback(handle.clone_ref(slf.py())));
        if threadsafe && this.thread_id.load(Ordering::Relaxed) != current_thread_ident() {
            this.reactor.wake();
        }
        Ok(handle)
    }

    /// The scheduler's clock when `time()` is replaced (see `class_clock` and
    /// `instance_clock`): whatever `self.time()` says, as in the stdlib, where a patched
    /// or overridden clock moves the timers too. Read before taking the scheduler's lock,
    /// since it runs Python code. `None` means `monotonic()`, which the caller reads
    /// under the lock and only if a timer needs it.
    #[inline]
    fn replaced_clock(slf: &Bound<'_, Self>) -> PyResult<Option<f64>> {
        let this = slf.get();
        if !this.class_clock.load(Ordering::Relaxed) && !this.instance_clock.load(Ordering::Relaxed)
        {
            return Ok(None);
        }
        Self::call_clock(slf).map(Some)
    }

    /// Notices, as a run starts, a class whose `time` was replaced after this loop was
    /// created (e.g. `mock.patch.object(Loop, "time")`), and an instance `time` set past
    /// `Loop.__setattr__` (with `object.__setattr__`).
    fn check_clocks(slf: &Bound<'_, Self>) -> PyResult<()> {
        let replaced = class_replaces_time(&slf.get_type())?;
        slf.get().class_clock.store(replaced, Ordering::Relaxed);
        Self::_note_clock(slf)
    }

    #[inline(never)]
    fn call_clock(slf: &Bound<'_, Self>) -> PyResult<f64> {
        slf.call_method0(intern!(slf.py(), "time"))?.extract()
    }

    /// `call_at` (and `call_later`, which computes `when` first) once the arguments are
    /// parsed.
    fn schedule_at(
        slf: &Bound<'_, Self>,
        when: f64,
        int: bool,
        call: CallArgs<'_>,
    ) -> PyResult<Py<TimerHandle>> {
        if when.is_nan() {
            return Err(PyValueError::new_err("timer deadline must not be NaN"));
        }
        let this = slf.get();
        this.check_closed()?;
        this.check_callback(&call.callback, "call_at", false)?;
        let counter = this.sched().timers.cancel_counter();
        let handle = this
            .new_handle(slf.as_any(), call.callback, call.args, call.context)
            .timer(when, int, counter)?;
        this.sched().timers.push(when, handle.clone_ref(slf.py()));
        Ok(handle)
    }
}

/// The arguments of `name([lead,] callback, *args, context=None)`.
struct CallArgs<'py> {
    /// `delay` or `when`, for the timer methods.
    lead: Option<Bound<'py, PyAny>>,
    callback: Bound<'py, PyAny>,
    args: Args,
    /// `None` when absent or passed as None (the current context is copied).
    context: Option<Bound<'py, PyAny>>,
}

/// The parameter a keyword argument fills.
enum Keyword {
    Context,
    Callback,
    Lead,
}

/// Signature of one fast method, for argument parsing and its error messages.
struct Signature {
    name: &'static str,
    /// The parameter before `callback`, if any (`delay`, `when`).
    lead: Option<&'static str>,
}

impl Signature {
    #[cold]
    fn error(&self, what: std::fmt::Arguments<'_>) -> PyErr {
        PyTypeError::new_err(format!("LoopCore.{}() {what}", self.name))
    }

    #[cold]
    fn missing(&self, names: &[&str]) -> PyErr {
        let list = names
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(" and ");
        let plural = if names.len() == 1 { "" } else { "s" };
        self.error(format_args!(
            "missing {} required positional argument{plural}: {list}",
            names.len()
        ))
    }

    /// Which parameter a keyword argument names (`context` by another str object than
    /// the interned one, or another parameter).
    #[cold]
    fn keyword(&self, name: Borrowed<'_, '_, PyString>) -> PyResult<Keyword> {
        if name == "context" {
            remember_context_alias(name);
            Ok(Keyword::Context)
        } else if name == "callback" {
            Ok(Keyword::Callback)
        } else if self.lead.is_some_and(|l| name == l) {
            Ok(Keyword::Lead)
        } else {
            let name = name.to_owned();
            Err(self.error(format_args!("got an unexpected keyword argument '{name}'")))
        }
    }

    /// Parses a vectorcall argument array: `nargs` positional values, then one value per
    /// name in `kwnames` (a tuple of str, or NULL).
    ///
    /// The usual calls (the leading parameters positional, no keyword but `context`)
    /// are parsed inline; the others by [`Self::parse_general`].
    ///
    /// # Safety
    /// `args` must hold `nargs` plus `len(kwnames)` live object pointers, as CPython
    /// passes them to a METH_FASTCALL|METH_KEYWORDS function.
    #[inline(always)]
    unsafe fn parse<'py>(
        &self,
        py: Python<'py>,
        args: *const *mut ffi::PyObject,
        nargs: ffi::Py_ssize_t,
        kwnames: *mut ffi::PyObject,
    ) -> PyResult<CallArgs<'py>> {
        let n = nargs as usize;
        let fixed = usize::from(self.lead.is_some()) + 1;
        let context = if n < fixed {
            None
        } else if kwnames.is_null() {
            Some(std::ptr::null_mut())
        // SAFETY: a non-NULL `kwnames` is a tuple of str (vectorcall protocol), and its
        // one value follows the positional ones.
        } else if unsafe { ffi::PyTuple_GET_SIZE(kwnames) == 1 && is_context_name(py, kwnames) } {
            Some(unsafe { *args.add(n) })
        } else {
            None
        };
        let Some(context) = context else {
            // SAFETY: forwarded unchanged (see the safety section).
            return unsafe { self.parse_general(py, args, nargs, kwnames) };
        };
        // SAFETY: the caller guarantees `nargs` positional pointers.
        let positional = unsafe { raw_slice(args, n) };
        let get = |p: *mut ffi::PyObject| {
            // SAFETY: every pointer in the argument array is a live object.
            unsafe { Bound::from_borrowed_ptr(py, p) }
        };
        // SAFETY: a borrowed pointer to the None singleton.
        let none = unsafe { ffi::Py_None() };
        Ok(CallArgs {
            lead: self.lead.map(|_| get(positional[0])),
            callback: get(positional[fixed - 1]),
            args: Args::from_slice(py, &positional[fixed..])?,
            context: (!context.is_null() && context != none).then(|| get(context)),
        })
    }

    /// [`Self::parse`] for any call (and its errors).
    ///
    /// # Safety
    /// As for [`Self::parse`].
    #[cold]
    #[inline(never)]
    unsafe fn parse_general<'py>(
        &self,
        py: Python<'py>,
        args: *const *mut ffi::PyObject,
        nargs: ffi::Py_ssize_t,
        kwnames: *mut ffi::PyObject,
    ) -> PyResult<CallArgs<'py>> {
        let nargs = nargs as usize;
        // SAFETY: the caller guarantees `nargs` positional pointers.
        let positional = unsafe { raw_slice(args, nargs) };
        let get = |p: *mut ffi::PyObject| {
            // SAFETY: every pointer in the argument array is a live object.
            unsafe { Bound::from_borrowed_ptr(py, p) }
        };
        let fixed = usize::from(self.lead.is_some()) + 1;
        let mut lead = self.lead.and(positional.first().copied().map(get));
        let mut callback = positional.get(fixed - 1).copied().map(get);
        let mut context = None;
        if !kwnames.is_null() {
            // SAFETY: a non-NULL `kwnames` is a tuple of str (vectorcall protocol).
            let count = unsafe { ffi::PyTuple_GET_SIZE(kwnames) } as usize;
            // SAFETY: one value per keyword name follows the positional ones.
            let values = unsafe { raw_slice(args.add(nargs), count) };
            // Python callers pass interned names, and the C `Task` and `Future` always
            // the same (not interned) one, so identity settles the usual cases.
            let context_name = intern!(py, "context").as_ptr();
            let context_alias = CONTEXT_ALIAS.load(Ordering::Relaxed);
            for (i, &value) in values.iter().enumerate() {
                // SAFETY: `i` is within the tuple.
                let name = unsafe { ffi::PyTuple_GET_ITEM(kwnames, i as ffi::Py_ssize_t) };
                let keyword = if name == context_name || name == context_alias {
                    Keyword::Context
                } else {
                    // SAFETY: keyword names are live str objects.
                    self.keyword(unsafe { Borrowed::from_ptr(py, name).cast_unchecked() })?
                };
                let slot = match keyword {
                    Keyword::Context => &mut context,
                    Keyword::Callback => &mut callback,
                    Keyword::Lead => &mut lead,
                };
                if slot.is_some() {
                    // SAFETY: as above.
                    let name = unsafe { Bound::from_borrowed_ptr(py, name) };
                    return Err(
                        self.error(format_args!("got multiple values for argument '{name}'"))
                    );
                }
                *slot = Some(get(value));
            }
        }
        let (lead, callback) = match (self.lead, lead, callback) {
            (None, _, Some(cb)) => (None, cb),
            (Some(_), Some(l), Some(cb)) => (Some(l), cb),
            (Some(l), None, None) => return Err(self.missing(&[l, "callback"])),
            (Some(l), None, Some(_)) => return Err(self.missing(&[l])),
            (_, _, None) => return Err(self.missing(&["callback"])),
        };
        let rest = positional.get(fixed..).unwrap_or(&[]);
        // SAFETY: the argument array holds live objects (see the safety section).
        let args = unsafe { Args::from_slice(py, rest)? };
        Ok(CallArgs {
            lead,
            callback,
            args,
            context: context.filter(|c| !c.is_none()),
        })
    }
}

/// A `"context"` str object other than the interned one, seen as a keyword name: the C
/// `Task` and `Future` (before 3.12) name the keyword with a string of their own on
/// every `call_soon`, which would otherwise be compared by value each time.
///
/// The slot keeps a reference for the life of the process, so the address can never
/// belong to another object: matching it is as good as comparing the text.
static CONTEXT_ALIAS: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

/// Whether the one name in `kwnames` is `context`, by identity with the interned name
/// or with [`CONTEXT_ALIAS`] (a name compared by value is left to the general parser).
///
/// # Safety
/// `kwnames` is a tuple of one str.
#[inline(always)]
unsafe fn is_context_name(py: Python<'_>, kwnames: *mut ffi::PyObject) -> bool {
    // SAFETY: index 0 exists (upheld by the caller).
    let name = unsafe { ffi::PyTuple_GET_ITEM(kwnames, 0) };
    name == CONTEXT_ALIAS.load(Ordering::Relaxed) || name == intern!(py, "context").as_ptr()
}

/// Records `name` (equal to `"context"`) in [`CONTEXT_ALIAS`] if the slot is empty.
#[cold]
fn remember_context_alias(name: Borrowed<'_, '_, PyString>) {
    let ptr = name.as_ptr();
    if CONTEXT_ALIAS
        .compare_exchange(
            std::ptr::null_mut(),
            ptr,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        // The slot's reference, never released (see `CONTEXT_ALIAS`).
        std::mem::forget(name.to_owned());
    }
}

/// A slice over a vectorcall argument array.
///
/// # Safety
/// `ptr` must point to `len` initialised pointers (or `len` must be 0).
unsafe fn raw_slice<'a>(ptr: *const *mut ffi::PyObject, len: usize) -> &'a [*mut ffi::PyObject] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: upheld by the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Whether `cls.time` is something other than [`LoopCore::time`].
fn class_replaces_time(cls: &Bound<'_, PyType>) -> PyResult<bool> {
    let py = cls.py();
    let own = py.get_type::<LoopCore>().getattr(intern!(py, "time"))?;
    Ok(!cls.getattr(intern!(py, "time"))?.is(&own))
}

/// A float argument as PyO3 extracts one (`PyFloat_AsDouble`), None refused with `none`.
fn float_arg(arg: &Bound<'_, PyAny>, name: &str, none: &'static str) -> PyResult<f64> {
    if arg.is_none() {
        return Err(PyTypeError::new_err(none));
    }
    arg.extract::<f64>().inspect_err(|e| {
        let py = arg.py();
        let _ = e.value(py).call_method1(
            intern!(py, "add_note"),
            (format!("while processing '{name}'"),),
        );
    })
}

const SOON: Signature = Signature {
    name: "call_soon",
    lead: None,
};
const SOON_THREADSAFE: Signature = Signature {
    name: "call_soon_threadsafe",
    lead: None,
};
const LATER: Signature = Signature {
    name: "call_later",
    lead: Some("delay"),
};
const AT: Signature = Signature {
    name: "call_at",
    lead: Some("when"),
};

/// The receiver of a fast method.
///
/// # Safety
/// `slf` must be the `self` CPython passes to a method of `LoopCore`: a method
/// descriptor only calls its function with an instance of its class or a subclass.
unsafe fn receiver<'a, 'py>(
    py: Python<'py>,
    slf: &'a *mut ffi::PyObject,
) -> &'a Bound<'py, LoopCore> {
    // SAFETY: upheld by the caller; a `*mut PyObject` has the layout of a `Bound`.
    unsafe { Bound::ref_from_ptr(py, slf).cast_unchecked::<LoopCore>() }
}

/// `call_soon(callback, *args, context=None)`.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
unsafe fn call_soon_fast(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython's method-call contract (see the function's safety section).
    let (slf, call) = unsafe { (receiver(py, &slf), SOON.parse(py, args, nargs, kwnames)?) };
    Ok(LoopCore::schedule_soon(slf, call, false)?.into_ptr())
}

/// `call_soon_threadsafe(callback, *args, context=None)`.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
unsafe fn call_soon_threadsafe_fast(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython's method-call contract (see the function's safety section).
    let (slf, call) = unsafe {
        (
            receiver(py, &slf),
            SOON_THREADSAFE.parse(py, args, nargs, kwnames)?,
        )
    };
    Ok(LoopCore::schedule_soon(slf, call, true)?.into_ptr())
}

/// `call_later(delay, callback, *args, context=None)`.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
unsafe fn call_later_fast(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython's method-call contract (see the function's safety section).
    let (slf, mut call) = unsafe { (receiver(py, &slf), LATER.parse(py, args, nargs, kwnames)?) };
    let lead = call.lead.take().expect("call_later has a lead parameter");
    let delay = float_arg(&lead, "delay", "delay must not be None")?;
    let now = LoopCore::replaced_clock(slf)?.unwrap_or_else(monotonic);
    Ok(LoopCore::schedule_at(slf, now + delay, false, call)?.into_ptr())
}

/// `call_at(when, callback, *args, context=None)`.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
unsafe fn call_at_fast(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython's method-call contract (see the function's safety section).
    let (slf, mut call) = unsafe { (receiver(py, &slf), AT.parse(py, args, nargs, kwnames)?) };
    let lead = call.lead.take().expect("call_at has a lead parameter");
    let when = float_arg(&lead, "when", "when cannot be None")?;
    // An int deadline reads back as that int (`handle.when()`), as the stdlib's does.
    let int = lead.is_exact_instance_of::<PyInt>()
        && lead.extract::<i64>().is_ok_and(|i| i as f64 == when);
    Ok(LoopCore::schedule_at(slf, when, int, call)?.into_ptr())
}

/// `create_task(coro, *, name=None, context=None, **kwargs)`.
///
/// `ensure_future` and `gather` call it for every task, mostly as `create_task(coro)`:
/// that case (and `name=`/`context=` keywords) outside debug mode and without a task
/// factory calls `Task(coro, loop=self, ...)` from here; anything else goes to the
/// general method, PyO3's `create_task` (see [`install_fast_methods`]), so it behaves
/// (and fails) exactly as before.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
unsafe fn create_task_fast(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    static TASK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static ALL: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();
    // SAFETY: CPython's method-call contract (see the function's safety section).
    let this = unsafe { receiver(py, &slf) }.get();
    // SAFETY: as above: `nargs` positional values, then one per keyword name.
    let plain = (nargs == 1 && !this.is_debug() && !this.has_task_factory())
        .then(|| unsafe { task_keywords(py, args.add(1), kwnames) })
        .flatten();
    let Some((name, context)) = plain else {
        // SAFETY: forwarded unchanged from CPython.
        return unsafe { create_task_general(py, slf, args, nargs, kwnames) };
    };
    this.check_closed()?;
    let task = cached(py, &TASK, "asyncio.tasks", "Task")?;
    // SAFETY: `args` holds the one positional argument.
    let coro = unsafe { *args };
    // The keywords left out default to None, as when passed as None.
    if name.is_null() && context.is_null() {
        // SAFETY: `slf` is the method's receiver, a live LoopCore; `coro` a live object.
        let (slf, coro) = unsafe { (receiver(py, &slf), Borrowed::from_ptr(py, coro)) };
        let kwargs = LoopCore::loop_kwargs(slf)?;
        return task.call((coro,), Some(&kwargs)).map(Bound::into_ptr);
    }
    let task = task.as_ptr();
    // SAFETY: a borrowed pointer to the None singleton.
    let none = unsafe { ffi::Py_None() };
    let names = ALL.get_or_try_init(py, || {
        PyTuple::new(py, ["loop", "name", "context"]).map(Bound::unbind)
    })?;
    let or_none = |p: *mut ffi::PyObject| if p.is_null() { none } else { p };
    let all = [coro, slf, or_none(name), or_none(context)];
    // SAFETY: `all` starts with the one positional argument, then a live value for each
    // name in `names` (all borrowed for the call); the result is a new reference or NULL
    // with an exception set.
    let task = unsafe { ffi::PyObject_Vectorcall(task, all.as_ptr(), 1, names.as_ptr()) };
    if task.is_null() {
        return Err(PyErr::fetch(py));
    }
    Ok(task)
}

/// The `name` and `context` values (NULL when absent or None) of a plain
/// `create_task(coro, ...)` call, or None if another keyword is passed (or a name is
/// not one of the interned strings Python passes), for the general method to handle.
///
/// # Safety
/// `values` holds one live object pointer per name in `kwnames` (a tuple of str, or
/// NULL).
unsafe fn task_keywords(
    py: Python<'_>,
    values: *const *mut ffi::PyObject,
    kwnames: *mut ffi::PyObject,
) -> Option<(*mut ffi::PyObject, *mut ffi::PyObject)> {
    let (mut name, mut context) = (std::ptr::null_mut(), std::ptr::null_mut());
    if kwnames.is_null() {
        return Some((name, context));
    }
    // SAFETY: a non-NULL `kwnames` is a tuple of str (vectorcall protocol).
    let count = unsafe { ffi::PyTuple_GET_SIZE(kwnames) } as usize;
    // SAFETY: one value per keyword name (upheld by the caller).
    let values = unsafe { raw_slice(values, count) };
    // SAFETY: a borrowed pointer to the None singleton.
    let none = unsafe { ffi::Py_None() };
    for (i, &value) in values.iter().enumerate() {
        // SAFETY: `i` is within the tuple.
        let key = unsafe { ffi::PyTuple_GET_ITEM(kwnames, i as ffi::Py_ssize_t) };
        let slot = if key == intern!(py, "name").as_ptr() {
            &mut name
        } else if key == intern!(py, "context").as_ptr() {
            &mut context
        } else {
            return None;
        };
        if value != none {
            *slot = value;
        }
    }
    Some((name, context))
}

/// The general `create_task`: PyO3's method, called with the arguments as they came.
///
/// # Safety
/// As for [`create_task_fast`].
#[cold]
unsafe fn create_task_general(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    let Some(general) = GENERAL_CREATE_TASK.get(py) else {
        return Err(PyRuntimeError::new_err("create_task is not initialised"));
    };
    let nkw = if kwnames.is_null() {
        0
    } else {
        // SAFETY: a non-NULL `kwnames` is a tuple (vectorcall protocol).
        unsafe { ffi::PyTuple_GET_SIZE(kwnames) as usize }
    };
    // SAFETY: CPython passes `nargs` positional values, then one per keyword name.
    let rest = unsafe { raw_slice(args, nargs as usize + nkw) };
    // The method descriptor takes the instance as its first positional argument.
    let all: Vec<*mut ffi::PyObject> = std::iter::once(slf).chain(rest.iter().copied()).collect();
    // SAFETY: `all` holds `nargs + 1` positional values then the keyword values, live
    // references borrowed for the call; the result is a new reference or NULL with an
    // exception set.
    let ret = unsafe {
        ffi::PyObject_Vectorcall(general.as_ptr(), all.as_ptr(), nargs as usize + 1, kwnames)
    };
    if ret.is_null() {
        return Err(PyErr::fetch(py));
    }
    Ok(ret)
}

/// PyO3's `create_task` method descriptor, which the fast one replaces on the class.
static GENERAL_CREATE_TASK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// What a fast method does once its C entry point has set up.
type FastMethod = unsafe fn(
    Python<'_>,
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject>;

/// The body of each fast method's C entry point.
///
/// It does what PyO3's trampoline does for `#[pymethods]` minus its attach bookkeeping
/// (a thread-local counter incremented and decremented on every call, and a check for
/// references whose release was deferred): errors are raised, panics become
/// `PanicException`s. Without that bookkeeping PyO3 does not know the thread is
/// attached, so a `Py` dropped in here would have its release deferred to the next
/// PyO3 entry point instead of done at once; the fast methods keep their temporaries as
/// `Bound` (released directly), so that only happens to the arguments of a call that
/// fails (a closed loop, a callback that is not callable), where it is harmless.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`, with the
/// thread attached.
#[inline(always)]
unsafe fn fast_entry(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    method: FastMethod,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls C methods with the thread attached.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: forwarded unchanged from CPython (see the safety section).
    guarded(py, || unsafe { method(py, slf, args, nargs, kwnames) })
}

/// Runs a fast method's body: an error is raised (NULL returned), a panic becomes a
/// `PanicException`.
#[inline(always)]
fn guarded(
    py: Python<'_>,
    body: impl FnOnce() -> PyResult<*mut ffi::PyObject>,
) -> *mut ffi::PyObject {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let err = match result {
        Ok(Ok(obj)) => return obj,
        Ok(Err(err)) => err,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic from Rust code".to_owned());
            pyo3::panic::PanicException::new_err(msg)
        }
    };
    err.restore(py);
    std::ptr::null_mut()
}

macro_rules! fast_entry_points {
    ($($entry:ident => $method:ident),* $(,)?) => {$(
        /// C entry point of a fast method (see [`fast_entry`]).
        ///
        /// # Safety
        /// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of `LoopCore`.
        unsafe extern "C" fn $entry(
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargs: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            // SAFETY: forwarded unchanged from CPython.
            unsafe { fast_entry(slf, args, nargs, kwnames, $method) }
        }
    )*};
}

fast_entry_points!(
    call_soon_fast_entry => call_soon_fast,
    call_soon_threadsafe_fast_entry => call_soon_threadsafe_fast,
    call_later_fast_entry => call_later_fast,
    call_at_fast_entry => call_at_fast,
    create_task_fast_entry => create_task_fast,
);

/// `get_debug()`, a METH_NOARGS method: the C `Future.__init__` (so every Future and
/// Task) calls it.
///
/// # Safety
/// Called by CPython as a METH_NOARGS method of `LoopCore`, with the thread attached.
unsafe extern "C" fn get_debug_entry(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls C methods with the thread attached.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: the method's receiver, a live LoopCore (the descriptor checks its type).
    let debug = unsafe { receiver(py, &slf) }.get().is_debug();
    pyo3::types::PyBool::new(py, debug).to_owned().into_ptr()
}

/// `create_future()`, a METH_NOARGS method: once per awaited read of the stdlib's
/// streams, per `asyncio.sleep`, per blocked `Queue` call.
///
/// # Safety
/// Called by CPython as a METH_NOARGS method of `LoopCore`, with the thread attached.
unsafe extern "C" fn create_future_entry(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls C methods with the thread attached.
    let py = unsafe { Python::assume_attached() };
    guarded(py, || {
        // SAFETY: the method's receiver, a live LoopCore (the descriptor checks its type).
        let slf = unsafe { receiver(py, &slf) };
        LoopCore::new_future(slf).map(Bound::into_ptr)
    })
}

/// The method table of the fast methods; CPython keeps pointers into it for good.
struct FastMethods([ffi::PyMethodDef; 7]);

// SAFETY: the table is never written after construction and holds only pointers to
// static strings and functions, so sharing it between threads is sound.
unsafe impl Sync for FastMethods {}

const FAST_FLAGS: std::ffi::c_int = ffi::METH_FASTCALL | ffi::METH_KEYWORDS;

static FAST_METHODS: FastMethods = FastMethods([
    ffi::PyMethodDef {
        ml_name: c"call_soon".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: call_soon_fast_entry,
        },
        ml_flags: FAST_FLAGS,
        ml_doc: c"call_soon($self, callback, *args, context=None)\n--\n\nSchedules `callback(*args)` for the next iteration.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"call_soon_threadsafe".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: call_soon_threadsafe_fast_entry,
        },
        ml_flags: FAST_FLAGS,
        ml_doc: c"call_soon_threadsafe($self, callback, *args, context=None)\n--\n\n`call_soon` from any thread: also wakes the loop if it is waiting for I/O.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"call_later".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: call_later_fast_entry,
        },
        ml_flags: FAST_FLAGS,
        ml_doc: c"call_later($self, delay, callback, *args, context=None)\n--\n\nSchedules `callback(*args)` after `delay` seconds.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"call_at".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: call_at_fast_entry,
        },
        ml_flags: FAST_FLAGS,
        ml_doc: c"call_at($self, when, callback, *args, context=None)\n--\n\nSchedules `callback(*args)` at `when` on the loop clock.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"create_task".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: create_task_fast_entry,
        },
        ml_flags: FAST_FLAGS,
        ml_doc: c"create_task($self, coro, *, name=None, context=None, **kwargs)\n--\n\nWraps `coro` in a Task.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"get_debug".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunction: get_debug_entry,
        },
        ml_flags: ffi::METH_NOARGS,
        ml_doc: c"get_debug($self, /)\n--\n\nWhether debug mode is on.".as_ptr(),
    },
    ffi::PyMethodDef {
        ml_name: c"create_future".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunction: create_future_entry,
        },
        ml_flags: ffi::METH_NOARGS,
        ml_doc: c"create_future($self, /)\n--\n\nA Future attached to the loop.".as_ptr(),
    },
]);

/// Adds the fast methods (see the section comment above) to `LoopCore`, keeping PyO3's
/// `create_task` for the cases the fast one hands over; called once when the module is
/// initialised.
pub fn install_fast_methods(py: Python<'_>) -> PyResult<()> {
    let class = py.get_type::<LoopCore>();
    // The general `create_task` stays reachable for the cases the fast one hands over.
    let general = class.getattr("create_task")?.unbind();
    GENERAL_CREATE_TASK.get_or_init(py, || general);
    for def in &FAST_METHODS.0 {
        // SAFETY: `class` is a live type object; `def` is a static definition whose
        // function matches its flags, and CPython never writes through the pointer.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(class.as_type_ptr(), std::ptr::from_ref(def).cast_mut()),
            )?
        };
        // SAFETY: `ml_name` points to a static NUL-terminated ASCII name.
        let name = unsafe { std::ffi::CStr::from_ptr(def.ml_name) };
        class.setattr(name.to_string_lossy().as_ref(), descr)?;
    }
    Ok(())
}
