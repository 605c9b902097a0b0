//! `Handle` and `TimerHandle`: what `call_soon`, `call_later`, `call_at` and
//! `add_reader`/`add_writer` return, and what the ready queue holds.
//!
//! Both are frozen Rust classes so the loop reads them without borrow bookkeeping: the
//! only mutable state is the cancelled flag (atomic) and the callback slot, which
//! `cancel()` empties to drop references early, as the stdlib does.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{ffi, intern};

use crate::pyhelpers;
use crate::sync::lock;
use crate::timers::Timer;

/// The callable and its positional arguments.
pub(crate) struct Callback {
    pub func: Py<PyAny>,
    pub args: Py<PyTuple>,
}

/// Timer-only state of a handle.
pub(crate) struct TimerState {
    when: f64,
    scheduled: AtomicBool,
    cancel_count: Arc<AtomicUsize>,
}

/// A callback scheduled on the loop (`asyncio.Handle`'s interface).
#[pyclass(frozen, subclass, module = "ferroloop", name = "Handle")]
pub struct Handle {
    callback: Mutex<Option<Callback>>,
    context: Py<PyAny>,
    loop_: Py<PyAny>,
    cancelled: AtomicBool,
    debug: bool,
    /// Runs at most once (`call_soon`/`call_later`), unlike reader, writer and signal
    /// handles; such a handle drops its callback after running (see [`untracked`]).
    oneshot: bool,
    /// In debug mode the repr is kept at cancel time, when the callback is dropped.
    repr_at_cancel: Mutex<Option<String>>,
    source_traceback: Option<Py<PyAny>>,
    timer: Option<TimerState>,
}

/// A callback scheduled for a deadline (`asyncio.TimerHandle`'s interface).
#[pyclass(frozen, extends = Handle, module = "ferroloop", name = "TimerHandle")]
pub struct TimerHandle;

/// Everything needed to build a handle.
pub(crate) struct NewHandle<'py> {
    pub func: Bound<'py, PyAny>,
    pub args: Bound<'py, PyTuple>,
    pub context: Option<Bound<'py, PyAny>>,
    pub loop_: &'py Bound<'py, PyAny>,
    pub debug: bool,
}

impl NewHandle<'_> {
    fn build(self, timer: Option<TimerState>, oneshot: bool) -> PyResult<Handle> {
        let py = self.func.py();
        let context = match self.context {
            Some(c) => c.unbind(),
            // SAFETY: called with the interpreter attached; the result is a new reference
            // or NULL with an exception set, which `from_owned_ptr_or_err` handles.
            None => {
                unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())? }.unbind()
            }
        };
        let source_traceback = if self.debug {
            pyhelpers::extract_caller_stack(py)?
        } else {
            None
        };
        Ok(Handle {
            callback: Mutex::new(Some(Callback {
                func: self.func.unbind(),
                args: self.args.unbind(),
            })),
            context,
            loop_: self.loop_.clone().unbind(),
            cancelled: AtomicBool::new(false),
            debug: self.debug,
            oneshot,
            repr_at_cancel: Mutex::new(None),
            source_traceback,
            timer,
        })
    }

    /// A plain handle; `oneshot` for `call_soon`, not for I/O or signal callbacks.
    pub fn handle(self, oneshot: bool) -> PyResult<Py<Handle>> {
        let py = self.func.py();
        let debug = self.debug;
        Ok(untracked(Py::new(py, self.build(None, oneshot)?)?, debug))
    }

    /// A timer handle due at `when`, counted in `cancel_count` if cancelled while scheduled.
    pub fn timer(self, when: f64, cancel_count: Arc<AtomicUsize>) -> PyResult<Py<Handle>> {
        let py = self.func.py();
        let state = TimerState {
            when,
            scheduled: AtomicBool::new(true),
            cancel_count,
        };
        let debug = self.debug;
        let init =
            PyClassInitializer::from(self.build(Some(state), true)?).add_subclass(TimerHandle);
        Ok(untracked(
            Bound::new(py, init)?.into_super().unbind(),
            debug,
        ))
    }
}

/// Takes a new handle out of the cyclic garbage collector's lists (outside debug mode).
///
/// Handles are short-lived and numerous (one per task step); tracked, a queue of a
/// million of them makes every collection walk them all, which cost more than
/// scheduling itself. The collector cannot see an untracked object's references, so a
/// cycle through one would never be freed; handles therefore hold their callback only
/// while the loop holds them: a one-shot handle drops it once run, a cancelled one at
/// once, and `close()` drops every queued or registered handle. In debug mode handles
/// stay tracked and keep their callback, as the stdlib's do, for the reports.
fn untracked(handle: Py<Handle>, debug: bool) -> Py<Handle> {
    if !debug {
        // SAFETY: the object is fully initialised and tracked (PyO3 allocates its
        // classes with Py_TPFLAGS_HAVE_GC and tracks them); untracking is allowed.
        unsafe { ffi::PyObject_GC_UnTrack(handle.as_ptr().cast()) };
    }
    handle
}

fn is_fatal(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PySystemExit>(py) || err.is_instance_of::<PyKeyboardInterrupt>(py)
}

impl Handle {
    /// True once cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Drops the callback of a handle that can no longer run (its loop closed, its
    /// registration replaced), breaking any cycle through it; see [`untracked`].
    pub(crate) fn release(&self) {
        drop(lock(&self.callback).take());
    }

    /// `cancel()` from Rust.
    pub(crate) fn cancel_now(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.get().do_cancel(slf)
    }

    fn do_cancel(&self, slf: &Bound<'_, Self>) -> PyResult<()> {
        if self.cancelled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(t) = &self.timer {
            if t.scheduled.load(Ordering::Relaxed) {
                t.cancel_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.debug {
            let r = Self::repr_text(slf, false)?;
            *lock(&self.repr_at_cancel) = Some(r);
        }
        let dropped = lock(&self.callback).take();
        drop(dropped);
        Ok(())
    }

    /// Runs the callback inside its context. A `SystemExit`/`KeyboardInterrupt` is
    /// returned as an error for the loop to propagate; any other exception goes to the
    /// loop's exception handler.
    pub(crate) fn run(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (func, args) = match &*lock(&this.callback) {
            Some(cb) => (cb.func.clone_ref(py), cb.args.clone_ref(py)),
            None => return Ok(()),
        };
        let result = run_in_context(py, this.context.bind(py), func.bind(py), args.bind(py));
        if this.oneshot && !this.debug {
            drop(lock(&this.callback).take());
        }
        match result {
            Ok(()) => Ok(()),
            Err(err) if is_fatal(py, &err) => Err(err),
            Err(err) => {
                let cb = pyhelpers::format_callback_source(py, func.bind(py), args.bind(py))?;
                let ctx = PyDict::new(py);
                ctx.set_item(
                    intern!(py, "message"),
                    format!("Exception in callback {cb}"),
                )?;
                ctx.set_item(intern!(py, "exception"), err.into_value(py))?;
                ctx.set_item(intern!(py, "handle"), slf)?;
                if let Some(tb) = &this.source_traceback {
                    ctx.set_item(intern!(py, "source_traceback"), tb)?;
                }
                this.loop_
                    .bind(py)
                    .call_method1(intern!(py, "call_exception_handler"), (ctx,))?;
                Ok(())
            }
        }
    }

    fn repr_text(slf: &Bound<'_, Self>, with_cache: bool) -> PyResult<String> {
        let py = slf.py();
        let this = slf.get();
        if with_cache {
            if let Some(r) = &*lock(&this.repr_at_cancel) {
                return Ok(r.clone());
            }
        }
        let mut info: Vec<String> = vec![slf.get_type().name()?.to_string()];
        if this.is_cancelled() {
            info.push("cancelled".into());
        }
        if let Some(t) = &this.timer {
            info.push(format!("when={}", py_float_repr(py, t.when)?));
        }
        let cb = lock(&this.callback)
            .as_ref()
            .map(|c| (c.func.clone_ref(py), c.args.clone_ref(py)));
        if let Some((func, args)) = cb {
            info.push(pyhelpers::format_callback_source(
                py,
                func.bind(py),
                args.bind(py),
            )?);
        }
        if let Some(tb) = &this.source_traceback {
            let tb = tb.bind(py);
            if tb.len()? > 0 {
                let frame = tb.get_item(-1)?;
                let file: String = frame.get_item(0)?.str()?.to_string();
                let line: String = frame.get_item(1)?.str()?.to_string();
                info.push(format!("created at {file}:{line}"));
            }
        }
        Ok(format!("<{}>", info.join(" ")))
    }
}

fn py_float_repr(py: Python<'_>, v: f64) -> PyResult<String> {
    Ok(pyo3::types::PyFloat::new(py, v).repr()?.to_string())
}

/// Calls `func(*args)` with `context` entered, like `context.run(func, *args)`.
fn run_in_context(
    py: Python<'_>,
    context: &Bound<'_, PyAny>,
    func: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
) -> PyResult<()> {
    // SAFETY: `context` is a live object; PyContext_Enter type-checks it and fails with
    // an exception set (e.g. the context is already entered) without side effects.
    if unsafe { ffi::PyContext_Enter(context.as_ptr()) } < 0 {
        return Err(PyErr::fetch(py));
    }
    let result = func.call1(args).map(drop);
    // SAFETY: we entered `context` above on this thread, so exiting it is balanced.
    if unsafe { ffi::PyContext_Exit(context.as_ptr()) } < 0 {
        let exit_err = PyErr::fetch(py);
        return result.and(Err(exit_err));
    }
    result
}

impl Timer for Py<Handle> {
    fn is_cancelled(&self) -> bool {
        self.get().is_cancelled()
    }
    fn unschedule(&self) {
        if let Some(t) = &self.get().timer {
            t.scheduled.store(false, Ordering::Relaxed);
        }
    }
}

#[pymethods]
impl Handle {
    /// Cancels the callback; it will not run. Idempotent.
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::cancel_now(slf)
    }

    /// True if the handle was cancelled.
    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    /// The `contextvars.Context` the callback runs in.
    fn get_context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    /// Runs the callback now, as the loop would.
    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::run(slf)
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        lock(&self.callback).as_ref().map(|c| c.func.clone_ref(py))
    }

    #[getter]
    fn _args(&self, py: Python<'_>) -> Option<Py<PyTuple>> {
        lock(&self.callback).as_ref().map(|c| c.args.clone_ref(py))
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.loop_.clone_ref(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.source_traceback.as_ref().map(|t| t.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Handle::repr_text(slf, true)
    }
}

#[pymethods]
impl TimerHandle {
    /// The absolute deadline, in `loop.time()` seconds.
    fn when(slf: &Bound<'_, Self>) -> f64 {
        timer_of(slf).when
    }

    #[getter]
    fn _when(slf: &Bound<'_, Self>) -> f64 {
        timer_of(slf).when
    }

    #[getter]
    fn _scheduled(slf: &Bound<'_, Self>) -> bool {
        timer_of(slf).scheduled.load(Ordering::Relaxed)
    }

    fn __lt__(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> bool {
        timer_of(slf).when < timer_of(other).when
    }

    fn __le__(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> bool {
        timer_of(slf).when <= timer_of(other).when
    }

    fn __gt__(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> bool {
        timer_of(slf).when > timer_of(other).when
    }

    fn __ge__(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> bool {
        timer_of(slf).when >= timer_of(other).when
    }
}

fn timer_of<'a>(slf: &'a Bound<'_, TimerHandle>) -> &'a TimerState {
    slf.as_super()
        .get()
        .timer
        .as_ref()
        .expect("a TimerHandle always carries timer state")
}
