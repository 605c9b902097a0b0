//! What every fd transport (stream, pipe, datagram) shares: the state every one of
//! them keeps ([`Base`]) and the methods that only touch it, written once.
//!
//! Each transport's state derefs to its `Base`, so its own code reads `g.fd`,
//! `g.closing`, … as if the fields were its own.

use std::ops::DerefMut;
use std::os::fd::RawFd;
use std::sync::MutexGuard;

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::event_loop::LoopCore;
use crate::iobuf::{cl, extra_info, logger, none, notify_flow, py_bool, FlowControl};
use crate::pytype::{Args, NativeState};
use crate::reactor::Dispatch;

/// The state every fd transport keeps.
pub(crate) struct Base {
    /// The transport's fd; -1 once closed.
    pub fd: RawFd,
    /// The fd number for `repr` (kept after close, as the stdlib does).
    pub fileno: RawFd,
    /// Address of the Python object, the key of the loop's fd-owner table.
    pub owner: usize,
    /// What the reactor calls when the fd is ready.
    pub dispatch: Dispatch,
    pub loop_: Option<Py<LoopCore>>,
    pub protocol: Option<Py<PyAny>>,
    pub extra: Option<Py<PyDict>>,
    pub closing: bool,
    pub conn_lost: u32,
    /// The write buffer's water marks (read-only transports never pass them).
    pub flow: FlowControl,
    /// `pause_reading()` is in effect.
    pub paused: bool,
    /// The reactor is asked for readability / writability.
    pub want_read: bool,
    pub want_write: bool,
}

impl Base {
    /// A fresh, open transport's state on `fd`.
    pub fn new(
        fd: RawFd,
        dispatch: Dispatch,
        l: &Bound<'_, LoopCore>,
        protocol: &Bound<'_, PyAny>,
        extra: Bound<'_, PyDict>,
    ) -> Self {
        Self::with_extra(fd, dispatch, l, protocol, Some(extra.unbind()))
    }

    /// [`Base::new`] with the extra dict optional: a transport that builds it on first
    /// use (see `stream.rs`) starts with none.
    pub fn with_extra(
        fd: RawFd,
        dispatch: Dispatch,
        l: &Bound<'_, LoopCore>,
        protocol: &Bound<'_, PyAny>,
        extra: Option<Py<PyDict>>,
    ) -> Self {
        Self {
            fd,
            fileno: fd,
            owner: 0,
            dispatch,
            loop_: Some(l.clone().unbind()),
            protocol: Some(protocol.clone().unbind()),
            extra,
            closing: false,
            conn_lost: 0,
            flow: FlowControl::default(),
            paused: false,
            want_read: false,
            want_write: false,
        }
    }

    /// Brings the reactor registration in line with `read`/`write`.
    pub fn set_interest(
        &mut self,
        obj: &Bound<'_, PyAny>,
        read: bool,
        write: bool,
    ) -> PyResult<()> {
        if (read, write) == (self.want_read, self.want_write) || self.fd < 0 {
            return Ok(());
        }
        let Some(l) = &self.loop_ else {
            return Ok(());
        };
        l.get()
            .set_native_interest(self.fd, obj, self.dispatch, read, write)?;
        self.want_read = read;
        self.want_write = write;
        Ok(())
    }

    pub fn loop_ref<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, LoopCore>> {
        self.loop_
            .as_ref()
            .map(|l| l.bind(py).clone())
            .ok_or_else(|| PyRuntimeError::new_err("transport is closed"))
    }

    pub fn protocol<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.protocol
            .as_ref()
            .map(|p| p.bind(py).clone())
            .ok_or_else(|| PyRuntimeError::new_err("transport has no protocol"))
    }

    fn debug(&self) -> bool {
        self.loop_.as_ref().is_some_and(|l| l.get().debug_enabled())
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        // The fd-owner table holds a borrowed pointer to the transport: it must go
        // before the object does.
        if let Some(l) = &self.loop_ {
            l.get().release_fd(self.fileno, self.owner);
        }
    }
}

/// Makes `$inner` (a struct with a `base: Base` field) deref to its [`Base`].
#[macro_export]
macro_rules! deref_base {
    ($inner:ty) => {
        impl std::ops::Deref for $inner {
            type Target = $crate::transport::Base;
            fn deref(&self) -> &Self::Target {
                &self.base
            }
        }

        impl std::ops::DerefMut for $inner {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.base
            }
        }
    };
}

/// A transport state whose inner data derefs to [`Base`].
pub(crate) trait Transport: NativeState {
    type Inner: DerefMut<Target = Base>;
    fn lock(&self) -> PyResult<MutexGuard<'_, Self::Inner>>;
    /// Bytes (payload bytes, for datagrams) waiting to be written.
    fn write_buffer_size(g: &Self::Inner) -> usize;
}

/// The stdlib's `_maybe_pause_protocol`: past the high-water mark, `pause_writing()`.
pub(crate) fn maybe_pause_protocol<S: Transport>(obj: &Bound<'_, PyAny>, st: &S) -> PyResult<()> {
    let py = obj.py();
    let (l, protocol) = {
        let mut g = st.lock()?;
        let size = S::write_buffer_size(&g);
        if !g.flow.pause_needed(size) {
            return Ok(());
        }
        (g.loop_ref(py)?, g.protocol(py)?)
    };
    notify_flow(obj, &l, &protocol, true)
}

/// The stdlib's `_maybe_resume_protocol`: down to the low-water mark, `resume_writing()`.
pub(crate) fn maybe_resume_protocol<S: Transport>(obj: &Bound<'_, PyAny>, st: &S) -> PyResult<()> {
    let py = obj.py();
    let (l, protocol) = {
        let mut g = st.lock()?;
        let size = S::write_buffer_size(&g);
        if !g.flow.resume_needed(size) {
            return Ok(());
        }
        (g.loop_ref(py)?, g.protocol(py)?)
    };
    notify_flow(obj, &l, &protocol, false)
}

pub(crate) fn m_set_write_buffer_limits<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    st.lock()?.flow.set_limits(args)?;
    maybe_pause_protocol(obj, st)?;
    Ok(none(obj.py()))
}

pub(crate) fn m_get_write_buffer_limits<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("get_write_buffer_limits")?;
    let limits = st.lock()?.flow.limits();
    Ok(limits.into_pyobject(obj.py())?.into_any().unbind())
}

pub(crate) fn m_get_write_buffer_size<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("get_write_buffer_size")?;
    let size = S::write_buffer_size(&*st.lock()?);
    Ok(size.into_pyobject(obj.py())?.into_any().unbind())
}

pub(crate) fn m_is_closing<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("is_closing")?;
    let closing = st.lock()?.closing;
    Ok(py_bool(obj.py(), closing))
}

pub(crate) fn m_is_reading<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("is_reading")?;
    let g = st.lock()?;
    Ok(py_bool(obj.py(), !g.paused && !g.closing))
}

pub(crate) fn m_pause_reading<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("pause_reading")?;
    let py = obj.py();
    let debug = {
        let mut g = st.lock()?;
        if g.closing || g.paused {
            return Ok(none(py));
        }
        g.paused = true;
        let write = g.want_write;
        g.set_interest(obj, false, write)?;
        g.debug()
    };
    if debug {
        logger(py)?.call_method1(intern!(py, "debug"), ("%r pauses reading", obj))?;
    }
    Ok(none(py))
}

pub(crate) fn m_resume_reading<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("resume_reading")?;
    let py = obj.py();
    let debug = {
        let mut g = st.lock()?;
        if g.closing || !g.paused {
            return Ok(none(py));
        }
        g.paused = false;
        let write = g.want_write;
        g.set_interest(obj, true, write)?;
        g.debug()
    };
    if debug {
        logger(py)?.call_method1(intern!(py, "debug"), ("%r resumes reading", obj))?;
    }
    Ok(none(py))
}

/// Starts reading once `connection_made` has run (the constructor schedules it).
pub(crate) fn m_start_reading<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("_start_reading")?;
    let mut g = st.lock()?;
    if !g.closing && !g.paused {
        let write = g.want_write;
        g.set_interest(obj, true, write)?;
    }
    Ok(none(obj.py()))
}

pub(crate) fn m_get_protocol<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("get_protocol")?;
    Ok(cl(obj.py(), &st.lock()?.protocol).unwrap_or_else(|| none(obj.py())))
}

pub(crate) fn m_get_extra_info<S: Transport>(
    obj: &Bound<'_, PyAny>,
    st: &S,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let extra = cl(obj.py(), &st.lock()?.extra);
    extra_info(obj.py(), extra, args)
}
