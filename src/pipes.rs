//! Pipe transports: `connect_read_pipe` and `connect_write_pipe` (and through them the
//! pipes of subprocesses).
//!
//! Behaviour is the stdlib's `_UnixReadPipeTransport`/`_UnixWritePipeTransport`: a read
//! pipe's end of file schedules `eof_received` then `connection_lost(None)`; a write pipe
//! watches its fd for readability too, which on a pipe or socket means the reader went
//! away (the transport then closes, with `BrokenPipeError` if data was still buffered);
//! `write_eof` and `close` on a write pipe flush and then close the fd. Unlike sockets,
//! write errors go to the exception handler (except EIO, which means the other end of a
//! pseudo-terminal was closed).
//!
//! Locking follows `stream`: the state's mutex is never held while Python code runs.

use std::ffi::c_int;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyBrokenPipeError, PyOSError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::errors::os_error;
use crate::event_loop::LoopCore;
use crate::iobuf::{
    cl, close_fd, is_exit, lock_state, logger, none, py_bool, read_bytes, report_fatal,
    schedule_connection_lost, warn_unclosed, would_block, write_vectored, RawBuffer, WriteBuffer,
};
use crate::pyhelpers::cached;
use crate::pytype::{self, Args, MethodSpec, NativeState, Visit};
use crate::stream::check_data;
use crate::transport::{self, Base, Transport};

/// After this many writes to a closed pipe, each one logs a warning.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;

pub(crate) struct Inner {
    base: Base,
    /// True for a write pipe.
    writer: bool,
    pipe: Option<Py<PyAny>>,
    wbuf: WriteBuffer,
    /// `_call_connection_lost` is scheduled or done.
    lost_scheduled: bool,
}

crate::deref_base!(Inner);

/// The Rust state of a pipe transport object.
pub struct Pipe {
    inner: Mutex<Inner>,
}

impl Transport for Pipe {
    type Inner = Inner;
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        lock_state(&self.inner)
    }
    fn write_buffer_size(g: &Inner) -> usize {
        g.wbuf.len()
    }
}

impl NativeState for Pipe {
    fn traverse(&self, visit: &Visit) -> c_int {
        let Ok(g) = self.inner.try_lock() else {
            return 0;
        };
        let mut r = visit.opt(&g.loop_);
        for o in [&g.pipe, &g.protocol] {
            if r == 0 {
                r = visit.opt(o);
            }
        }
        if r == 0 {
            r = visit.opt(&g.extra);
        }
        if r == 0 {
            r = g.wbuf.traverse(visit);
        }
        r
    }

    fn clear(&self, _py: Python<'_>) {
        let taken = match self.inner.try_lock() {
            Ok(mut g) => (g.protocol.take(), g.extra.take()),
            Err(_) => return,
        };
        drop(taken);
    }

    fn finalize(obj: &Bound<'_, PyAny>, state: &Self) {
        let py = obj.py();
        if !state.lock().map(|g| g.fd >= 0).unwrap_or(false) {
            return;
        }
        warn_unclosed(obj);
        let (pipe, fd, l, owner) = match state.lock() {
            Ok(mut g) => {
                let fd = std::mem::replace(&mut g.fd, -1);
                (g.pipe.take(), fd, cl(py, &g.loop_), g.owner)
            }
            Err(_) => return,
        };
        if let Some(l) = &l {
            let _ = l.get().set_native_interest(fd, obj, dispatch, false, false);
            l.get().release_fd(fd, owner);
        }
        close_fd(py, pipe, fd).unwrap_or_else(|e| e.write_unraisable(py, Some(obj)));
    }

    fn repr(obj: &Bound<'_, PyAny>, state: &Self) -> PyResult<String> {
        let name = obj.get_type().name()?;
        let g = state.lock()?;
        let mut info = vec![name.to_string()];
        if g.fd < 0 {
            info.push("closed".into());
        } else if g.closing {
            info.push("closing".into());
        }
        info.push(format!("fd={}", g.fileno));
        let loop_open = g.loop_.as_ref().is_some_and(|l| !l.get().closed_flag());
        if g.fd >= 0 && !loop_open {
            info.push("open".into());
        } else if g.fd >= 0 {
            let polling = if g.writer { g.want_write } else { g.want_read };
            info.push(if polling { "polling" } else { "idle" }.into());
            if g.writer {
                info.push(format!("bufsize={}", g.wbuf.len()));
            }
        } else {
            info.push("closed".into());
        }
        Ok(format!("<{}>", info.join(" ")))
    }
}

fn dispatch(obj: &Bound<'_, PyAny>, write: bool) -> PyResult<()> {
    // SAFETY: the reactor registers only pipe transport objects with this function.
    let st = unsafe { pytype::state::<Pipe>(obj) }?;
    let writer = st.lock()?.writer;
    let result = match (writer, write) {
        (false, _) => on_readable(obj, st),
        (true, false) => on_peer_closed(obj, st),
        (true, true) => on_writable(obj, st),
    };
    match result {
        Err(e) if !is_exit(obj.py(), &e) => report(obj, st, e, "_read_ready"),
        r => r,
    }
}

/// An exception out of a pipe event is reported like one from the stdlib's reader or
/// writer callback: through the exception handler, and the transport carries on.
fn report(obj: &Bound<'_, PyAny>, st: &Pipe, e: PyErr, what: &str) -> PyResult<()> {
    let py = obj.py();
    let Some(l) = st.lock().ok().and_then(|g| cl(py, &g.loop_)) else {
        e.write_unraisable(py, Some(obj));
        return Ok(());
    };
    let ctx = PyDict::new(py);
    ctx.set_item(
        "message",
        format!("Exception in callback {}.{what}()", obj.repr()?),
    )?;
    ctx.set_item("exception", e)?;
    ctx.set_item("transport", obj)?;
    l.bind(py)
        .call_method1(intern!(py, "call_exception_handler"), (ctx,))?;
    Ok(())
}

fn on_readable(obj: &Bound<'_, PyAny>, st: &Pipe) -> PyResult<()> {
    let py = obj.py();
    let (fd, protocol) = {
        let g = st.lock()?;
        if !g.want_read || g.fd < 0 {
            return Ok(());
        }
        (g.fd, cl(py, &g.protocol))
    };
    let data = match read_bytes(py, fd, false) {
        Ok(d) => d,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => return fatal_error(obj, st, os_error(e), "Fatal read error on pipe transport"),
    };
    let Some(protocol) = protocol else {
        return Ok(());
    };
    let protocol = protocol.bind(py);
    if !data.as_bytes().is_empty() {
        let r = protocol.call_method1(intern!(py, "data_received"), (&data,));
        crate::iobuf::recycle(data);
        return r.map(drop);
    }
    if st.lock()?.loop_ref(py)?.get().debug_enabled() {
        logger(py)?.call_method1(intern!(py, "debug"), ("%r was closed by peer", obj))?;
    }
    let l = {
        let mut g = st.lock()?;
        g.closing = true;
        g.lost_scheduled = true;
        g.set_interest(obj, false, false)?;
        g.loop_ref(py)?
    };
    LoopCore::soon(
        &l,
        protocol.getattr(intern!(py, "eof_received"))?,
        PyTuple::empty(py),
    )?;
    schedule_connection_lost(obj, &l, py.None().into_bound(py))
}

/// A write pipe's fd became readable: the reading end is gone.
fn on_peer_closed(obj: &Bound<'_, PyAny>, st: &Pipe) -> PyResult<()> {
    let py = obj.py();
    let buffered = {
        let g = st.lock()?;
        if !g.want_read || g.fd < 0 {
            return Ok(());
        }
        !g.wbuf.is_empty()
    };
    let exc = if buffered {
        PyBrokenPipeError::new_err(())
            .into_value(py)
            .into_bound(py)
            .into_any()
    } else {
        py.None().into_bound(py)
    };
    close_with(obj, st, exc)
}

fn on_writable(obj: &Bound<'_, PyAny>, st: &Pipe) -> PyResult<()> {
    let py = obj.py();
    let mut g = st.lock()?;
    if g.fd < 0 || !g.want_write {
        return Ok(());
    }
    let n = match g.wbuf.write_to(py, g.fd, false) {
        Ok(n) => n,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => {
            let dropped = g.wbuf.take();
            g.conn_lost += 1;
            let read = g.want_read;
            g.set_interest(obj, read, false)?;
            drop(g);
            drop(dropped);
            return fatal_error(obj, st, os_error(e), "Fatal write error on pipe transport");
        }
    };
    g.wbuf.consume(py, n);
    if !g.wbuf.is_empty() {
        return Ok(());
    }
    let read = g.want_read;
    g.set_interest(obj, read, false)?;
    drop(g);
    transport::maybe_resume_protocol(obj, st)?; // may write more
    let closing = {
        let mut g = st.lock()?;
        if g.closing && g.wbuf.is_empty() {
            g.set_interest(obj, false, false)?;
            g.lost_scheduled = true;
            true
        } else {
            false
        }
    };
    if closing {
        call_connection_lost(obj, st, py.None().into_bound(py))?;
    }
    Ok(())
}

/// The stdlib's pipe `_fatal_error`: EIO is only logged in debug mode, anything else
/// goes to the exception handler; then the transport closes with `exc`.
fn fatal_error(obj: &Bound<'_, PyAny>, st: &Pipe, exc: PyErr, message: &str) -> PyResult<()> {
    let py = obj.py();
    let (l, protocol) = {
        let g = st.lock()?;
        (cl(py, &g.loop_), cl(py, &g.protocol))
    };
    if let Some(l) = l {
        // A write pipe's peer going away is routine (a child exited); for a read pipe
        // only EIO (a closed pseudo-terminal) is.
        let writer = st.lock()?.writer;
        let quiet = exc.is_instance_of::<PyOSError>(py)
            && (writer
                || exc
                    .value(py)
                    .getattr(intern!(py, "errno"))
                    .and_then(|e| e.extract::<Option<i32>>())
                    .ok()
                    .flatten()
                    == Some(libc::EIO));
        report_fatal(obj, l.bind(py), protocol, &exc, message, quiet)?;
    }
    close_with(obj, st, exc.into_value(py).into_bound(py).into_any())
}

/// The stdlib's `_close(exc)`: stop watching the fd, drop buffered data, and schedule
/// `connection_lost(exc)`.
fn close_with(obj: &Bound<'_, PyAny>, st: &Pipe, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = obj.py();
    let (l, dropped) = {
        let mut g = st.lock()?;
        g.closing = true;
        let dropped = g.wbuf.take();
        g.set_interest(obj, false, false)?;
        if g.lost_scheduled {
            return Ok(());
        }
        g.lost_scheduled = true;
        (g.loop_ref(py)?, dropped)
    };
    drop(dropped);
    schedule_connection_lost(obj, &l, exc)
}

fn call_connection_lost(obj: &Bound<'_, PyAny>, st: &Pipe, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = obj.py();
    let protocol = cl(py, &st.lock()?.protocol);
    let result = match &protocol {
        Some(p) => p
            .bind(py)
            .call_method1(intern!(py, "connection_lost"), (&exc,))
            .map(drop),
        None => Ok(()),
    };
    let (pipe, fd, l, protocol) = {
        let mut g = st.lock()?;
        g.set_interest(obj, false, false)?;
        let fd = std::mem::replace(&mut g.fd, -1);
        if let Some(l) = &g.loop_ {
            l.get().release_fd(g.fileno, g.owner);
        }
        (g.pipe.take(), fd, g.loop_.take(), g.protocol.take())
    };
    let closed = close_fd(py, pipe, fd);
    drop((l, protocol));
    result.and(closed)
}

// -- methods -------------------------------------------------------------------------

fn write_buffers(obj: &Bound<'_, PyAny>, st: &Pipe, items: &[Bound<'_, PyAny>]) -> PyResult<()> {
    let py = obj.py();
    for d in items {
        check_data(d)?;
    }
    let bufs = items
        .iter()
        .map(|d| RawBuffer::get(d, false))
        .collect::<PyResult<Vec<_>>>()?;
    let total: usize = bufs.iter().map(RawBuffer::len).sum();
    if total == 0 {
        return Ok(());
    }
    let mut g = st.lock()?;
    if g.conn_lost > 0 || g.closing || g.fd < 0 {
        let warn = g.conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES;
        g.conn_lost += 1;
        drop(g);
        if warn {
            logger(py)?.call_method1(
                intern!(py, "warning"),
                ("pipe closed by peer or os.write(pipe, data) raised exception.",),
            )?;
        }
        return Ok(());
    }
    let mut sent = 0;
    if g.wbuf.is_empty() {
        let slices: Vec<&[u8]> = bufs
            .iter()
            .map(RawBuffer::as_slice)
            .filter(|s| !s.is_empty())
            .collect();
        match write_vectored(g.fd, &slices, false) {
            Ok(n) => sent = n,
            Err(e) if would_block(&e) => {}
            Err(e) => {
                g.conn_lost += 1;
                drop(g);
                return fatal_error(obj, st, os_error(e), "Fatal write error on pipe transport");
            }
        }
        if sent == total {
            return Ok(());
        }
        let read = g.want_read;
        g.set_interest(obj, read, true)?;
    }
    g.wbuf.push_rest(items, &bufs, sent);
    drop(g);
    drop(bufs);
    transport::maybe_pause_protocol(obj, st)
}

fn m_write(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [data] = args.parse("write", ["data"], 1)?;
    write_buffers(obj, st, &[data.expect("required")])?;
    Ok(none(obj.py()))
}

fn m_writelines(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [lines] = args.parse("writelines", ["list_of_data"], 1)?;
    let items = lines
        .expect("required")
        .try_iter()?
        .collect::<PyResult<Vec<_>>>()?;
    write_buffers(obj, st, &items)?;
    Ok(none(obj.py()))
}

fn m_can_write_eof(obj: &Bound<'_, PyAny>, _st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("can_write_eof")?;
    Ok(py_bool(obj.py(), true))
}

/// A write pipe's `write_eof`: close once the buffer is flushed.
fn write_eof(obj: &Bound<'_, PyAny>, st: &Pipe) -> PyResult<()> {
    let py = obj.py();
    let l = {
        let mut g = st.lock()?;
        if g.closing {
            return Ok(());
        }
        g.closing = true;
        if !g.wbuf.is_empty() {
            return Ok(()); // on_writable finishes the close
        }
        g.set_interest(obj, false, false)?;
        g.lost_scheduled = true;
        g.loop_ref(py)?
    };
    schedule_connection_lost(obj, &l, py.None().into_bound(py))
}

fn m_write_eof(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("write_eof")?;
    write_eof(obj, st)?;
    Ok(none(obj.py()))
}

fn m_close(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("close")?;
    let (writer, open) = {
        let g = st.lock()?;
        (g.writer, g.fd >= 0 && !g.closing)
    };
    if open {
        if writer {
            write_eof(obj, st)?;
        } else {
            close_with(obj, st, obj.py().None().into_bound(obj.py()))?;
        }
    }
    Ok(none(obj.py()))
}

fn m_abort(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("abort")?;
    close_with(obj, st, obj.py().None().into_bound(obj.py()))?;
    Ok(none(obj.py()))
}

fn m_call_connection_lost(
    obj: &Bound<'_, PyAny>,
    st: &Pipe,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let [exc] = args.parse("_call_connection_lost", ["exc"], 1)?;
    call_connection_lost(obj, st, exc.expect("required"))?;
    Ok(none(obj.py()))
}

fn m_set_protocol(obj: &Bound<'_, PyAny>, st: &Pipe, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [protocol] = args.parse("set_protocol", ["protocol"], 1)?;
    let old = st
        .lock()?
        .protocol
        .replace(protocol.expect("required").unbind());
    drop(old);
    Ok(none(obj.py()))
}

crate::native_method!(c_write, Pipe, m_write);
crate::native_method!(c_writelines, Pipe, m_writelines);
crate::native_method!(c_can_write_eof, Pipe, m_can_write_eof);
crate::native_method!(c_write_eof, Pipe, m_write_eof);
crate::native_method!(c_close, Pipe, m_close);
crate::native_method!(c_abort, Pipe, m_abort);
crate::native_method!(c_call_connection_lost, Pipe, m_call_connection_lost);
crate::native_method!(c_is_closing, Pipe, transport::m_is_closing::<Pipe>);
crate::native_method!(c_is_reading, Pipe, transport::m_is_reading::<Pipe>);
crate::native_method!(c_pause_reading, Pipe, transport::m_pause_reading::<Pipe>);
crate::native_method!(c_resume_reading, Pipe, transport::m_resume_reading::<Pipe>);
crate::native_method!(c_start_reading, Pipe, transport::m_start_reading::<Pipe>);
crate::native_method!(c_set_protocol, Pipe, m_set_protocol);
crate::native_method!(c_get_protocol, Pipe, transport::m_get_protocol::<Pipe>);
crate::native_method!(c_get_extra_info, Pipe, transport::m_get_extra_info::<Pipe>);
crate::native_method!(
    c_set_write_buffer_limits,
    Pipe,
    transport::m_set_write_buffer_limits::<Pipe>
);
crate::native_method!(
    c_get_write_buffer_limits,
    Pipe,
    transport::m_get_write_buffer_limits::<Pipe>
);
crate::native_method!(
    c_get_write_buffer_size,
    Pipe,
    transport::m_get_write_buffer_size::<Pipe>
);

static READ_PIPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static WRITE_PIPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

const fn method(
    name: &'static std::ffi::CStr,
    func: pyo3::ffi::PyCFunctionFastWithKeywords,
    doc: &'static std::ffi::CStr,
) -> MethodSpec {
    MethodSpec { name, func, doc }
}

fn pipe_type(py: Python<'_>, writer: bool) -> PyResult<&Bound<'_, PyType>> {
    let common = [
        method(
            c"close",
            c_close,
            c"Close the pipe (a write pipe flushes first).",
        ),
        method(
            c"is_closing",
            c_is_closing,
            c"True once the transport is closing or closed.",
        ),
        method(c"set_protocol", c_set_protocol, c"Replace the protocol."),
        method(c"get_protocol", c_get_protocol, c"The current protocol."),
        method(
            c"get_extra_info",
            c_get_extra_info,
            c"Optional transport information ('pipe').",
        ),
        method(
            c"_call_connection_lost",
            c_call_connection_lost,
            c"Deliver connection_lost and close the pipe.",
        ),
        method(
            c"_start_reading",
            c_start_reading,
            c"Start watching the fd (after connection_made).",
        ),
    ];
    if writer {
        WRITE_PIPE.get_or_try_init(py, || {
            let mut methods = common.to_vec();
            methods.extend([
                method(
                    c"write",
                    c_write,
                    c"Write data to the pipe; what cannot be written now is buffered.",
                ),
                method(
                    c"writelines",
                    c_writelines,
                    c"Write each buffer of an iterable.",
                ),
                method(
                    c"can_write_eof",
                    c_can_write_eof,
                    c"True: write_eof closes the pipe.",
                ),
                method(
                    c"write_eof",
                    c_write_eof,
                    c"Close the pipe once the buffer is flushed.",
                ),
                method(
                    c"abort",
                    c_abort,
                    c"Close at once, discarding buffered data.",
                ),
                method(
                    c"set_write_buffer_limits",
                    c_set_write_buffer_limits,
                    c"Set the high- and low-water marks.",
                ),
                method(
                    c"get_write_buffer_limits",
                    c_get_write_buffer_limits,
                    c"(low, high) water marks.",
                ),
                method(
                    c"get_write_buffer_size",
                    c_get_write_buffer_size,
                    c"Bytes waiting in the write buffer.",
                ),
            ]);
            let base = py
                .import("asyncio.transports")?
                .getattr("WriteTransport")?
                .cast_into::<PyType>()?;
            pytype::create_type::<Pipe>(
                &base,
                c"ferroloop._ferroloop.WritePipeTransport",
                c"The write end of a pipe, driven by the loop's Rust core.",
                &methods,
            )
        })
    } else {
        READ_PIPE.get_or_try_init(py, || {
            let mut methods = common.to_vec();
            methods.extend([
                method(
                    c"is_reading",
                    c_is_reading,
                    c"True unless reading is paused or the transport is closing.",
                ),
                method(
                    c"pause_reading",
                    c_pause_reading,
                    c"Stop calling the protocol with received data.",
                ),
                method(
                    c"resume_reading",
                    c_resume_reading,
                    c"Resume calling the protocol with received data.",
                ),
            ]);
            let base = py
                .import("asyncio.transports")?
                .getattr("ReadTransport")?
                .cast_into::<PyType>()?;
            pytype::create_type::<Pipe>(
                &base,
                c"ferroloop._ferroloop.ReadPipeTransport",
                c"The read end of a pipe, driven by the loop's Rust core.",
                &methods,
            )
        })
    }
    .map(|t| t.bind(py))
}

/// `loop._make_read_pipe_transport` (`writer == false`) or
/// `loop._make_write_pipe_transport`.
pub fn new_pipe_transport<'py>(
    l: &Bound<'py, LoopCore>,
    pipe: Bound<'py, PyAny>,
    protocol: Bound<'py, PyAny>,
    waiter: Option<Bound<'py, PyAny>>,
    extra: Option<Bound<'py, PyAny>>,
    writer: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = l.py();
    let fd: RawFd = pipe.call_method0(intern!(py, "fileno"))?.extract()?;
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd the caller gave us, into a live struct.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(os_error(std::io::Error::last_os_error()));
    }
    let kind = st.st_mode & libc::S_IFMT;
    let (is_fifo, is_sock, is_chr) = (
        kind == libc::S_IFIFO,
        kind == libc::S_IFSOCK,
        kind == libc::S_IFCHR,
    );
    if !(is_fifo || is_sock || is_chr) {
        return Err(PyValueError::new_err(if writer {
            "Pipe transport is only for pipes, sockets and character devices"
        } else {
            "Pipe transport is for pipes/sockets only."
        }));
    }
    // SAFETY: fcntl flag update on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(os_error(std::io::Error::last_os_error()));
        }
    }
    let extra_dict = PyDict::new(py);
    if let Some(e) = extra.filter(|e| !e.is_none()) {
        extra_dict.update(e.cast::<pyo3::types::PyMapping>()?)?;
    }
    extra_dict.set_item("pipe", &pipe)?;
    let state = Pipe {
        inner: Mutex::new(Inner {
            base: Base::new(fd, dispatch, l, &protocol, extra_dict),
            writer,
            pipe: Some(pipe.unbind()),
            wbuf: WriteBuffer::default(),
            lost_scheduled: false,
        }),
    };
    let obj = pytype::new_instance(pipe_type(py, writer)?, state)?;
    let owner = obj.as_ptr() as usize;
    // SAFETY: `obj` was just created with a Pipe state.
    unsafe { pytype::state::<Pipe>(&obj) }?.lock()?.owner = owner;
    l.get().claim_fd(fd, owner);
    LoopCore::soon(
        l,
        protocol.getattr(intern!(py, "connection_made"))?,
        PyTuple::new(py, [&obj])?,
    )?;
    // A write pipe reads only to learn that the reader went away, which works for
    // pipes and sockets, not character devices.
    if !writer || is_fifo || is_sock {
        LoopCore::soon(
            l,
            obj.getattr(intern!(py, "_start_reading"))?,
            PyTuple::empty(py),
        )?;
    }
    if let Some(w) = waiter.filter(|w| !w.is_none()) {
        static SET_RESULT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let f = cached(
            py,
            &SET_RESULT,
            "asyncio.futures",
            "_set_result_unless_cancelled",
        )?;
        LoopCore::soon(
            l,
            f.clone(),
            PyTuple::new(py, [w, py.None().into_bound(py)])?,
        )?;
    }
    Ok(obj)
}
