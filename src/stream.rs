//! Stream transports: TCP and Unix sockets.
//!
//! Behaviour is the stdlib's `_SelectorSocketTransport`, callback for callback: the
//! same ordering (`connection_made`, then reading starts, then the waiter), the same
//! flow control (`_FlowControlMixin`), the same error messages, the same `close`/
//! `abort`/half-close rules. What differs is where it runs: a readable socket is read
//! here and handed to `data_received` (or into a `BufferedProtocol`'s buffer) with no
//! Python frame of ours; `write` tries the socket at once and keeps only the rest, and
//! the rest goes out with one vectored `sendmsg` per writable event.
//!
//! The state sits behind a mutex that is never held while Python code runs (protocol
//! callbacks may call back into the transport). All access happens on the loop's thread
//! with the interpreter attached, so the lock is never contended; `try_lock` turns an
//! unexpected re-entry into a Python error instead of a deadlock.

use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyTuple, PyType};

use crate::errors::os_error;
use crate::event_loop::LoopCore;
use crate::iobuf::{
    cl, close_fd, is_exit, lock_state, logger, none, py_bool, read_bytes, read_into, report_fatal,
    schedule_connection_lost, warn_unclosed, would_block, write_vectored, RawBuffer, WriteBuffer,
};
use crate::pyhelpers::cached;
use crate::pytype::{self, Args, MethodSpec, NativeState, Visit};
use crate::transport::{self, Base, Transport};

/// After this many writes to a lost connection, each one logs a warning.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;
pub(crate) struct Inner {
    base: Base,
    sock: Option<Py<PyAny>>,
    buffered_protocol: bool,
    protocol_connected: bool,
    server: Option<Py<PyAny>>,
    wbuf: WriteBuffer,
    eof: bool,
    empty_waiter: Option<Py<PyAny>>,
}

crate::deref_base!(Inner);

/// The Rust state of a stream transport object.
pub struct Stream {
    inner: Mutex<Inner>,
}

impl Transport for Stream {
    type Inner = Inner;
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        lock_state(&self.inner)
    }
    fn write_buffer_size(g: &Inner) -> usize {
        g.wbuf.len()
    }
}

impl NativeState for Stream {
    fn traverse(&self, visit: &Visit) -> c_int {
        // Busy means we are inside one of our own operations, which holds references
        // anyway; not visiting only makes the collector more conservative.
        let Ok(g) = self.inner.try_lock() else {
            return 0;
        };
        let mut r = visit.opt(&g.loop_);
        for o in [&g.sock, &g.protocol, &g.server, &g.empty_waiter] {
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
            Ok(mut g) => (
                g.protocol.take(),
                g.server.take(),
                g.empty_waiter.take(),
                g.extra.take(),
            ),
            Err(_) => return,
        };
        drop(taken);
    }

    fn finalize(obj: &Bound<'_, PyAny>, state: &Self) {
        let py = obj.py();
        let open = state.lock().map(|g| g.fd >= 0).unwrap_or(false);
        if !open {
            return;
        }
        warn_unclosed(obj);
        let (sock, fd, loop_, owner) = match state.lock() {
            Ok(mut g) => {
                let fd = std::mem::replace(&mut g.fd, -1);
                (g.sock.take(), fd, cl(py, &g.loop_), g.owner)
            }
            Err(_) => return,
        };
        if let Some(l) = &loop_ {
            let l = l.get();
            let _ = l.set_native_interest(fd, obj, dispatch, false, false);
            l.release_fd(fd, owner);
        }
        close_fd(py, sock, fd).unwrap_or_else(|e| e.write_unraisable(py, Some(obj)));
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
        if g.fd >= 0 && g.loop_.as_ref().is_some_and(|l| !l.get().closed_flag()) {
            info.push(
                if g.want_read {
                    "read=polling"
                } else {
                    "read=idle"
                }
                .into(),
            );
            let state = if g.want_write { "polling" } else { "idle" };
            info.push(format!("write=<{state}, bufsize={}>", g.wbuf.len()));
        }
        Ok(format!("<{}>", info.join(" ")))
    }
}

static SET_RESULT_UNLESS_CANCELLED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TRANSPORT_SOCKET: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BUFFERED_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SOCKET_TRANSPORT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Called by the loop when the transport's fd is ready.
fn dispatch(obj: &Bound<'_, PyAny>, write: bool) -> PyResult<()> {
    // SAFETY: the reactor registers only stream transport objects with this function.
    let st = unsafe { pytype::state::<Stream>(obj) }?;
    let result = if write {
        on_writable(obj, st)
    } else {
        on_readable(obj, st)
    };
    match result {
        Err(e) if !is_exit(obj.py(), &e) => report_internal(obj, st, e),
        r => r,
    }
}

/// An error escaped a transport event (a bug, or the loop closing under it): report it
/// as the stdlib reports an exception in a callback.
fn report_internal(obj: &Bound<'_, PyAny>, st: &Stream, e: PyErr) -> PyResult<()> {
    let py = obj.py();
    let loop_ = st.lock().ok().and_then(|g| cl(py, &g.loop_));
    match loop_ {
        Some(l) => {
            let ctx = PyDict::new(py);
            ctx.set_item("message", "Exception in transport event handler")?;
            ctx.set_item("exception", e)?;
            ctx.set_item("transport", obj)?;
            l.bind(py)
                .call_method1(intern!(py, "call_exception_handler"), (ctx,))?;
        }
        None => e.write_unraisable(py, Some(obj)),
    }
    Ok(())
}

/// Runs a protocol callback; an exception other than an exit becomes a fatal transport
/// error with `message`. Returns `Ok(None)` once the error was handled.
fn protocol_call<'py>(
    obj: &Bound<'py, PyAny>,
    st: &Stream,
    result: PyResult<Bound<'py, PyAny>>,
    message: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_exit(obj.py(), &e) => Err(e),
        Err(e) => {
            fatal_error(obj, st, e, message)?;
            Ok(None)
        }
    }
}

fn on_readable(obj: &Bound<'_, PyAny>, st: &Stream) -> PyResult<()> {
    let py = obj.py();
    let (fd, protocol, buffered) = {
        let g = st.lock()?;
        // Not registered any more (paused, closing, lost) while this event was queued:
        // the stdlib would have cancelled the reader handle.
        if g.conn_lost > 0 || !g.want_read || g.fd < 0 {
            return Ok(());
        }
        (g.fd, g.protocol(py)?, g.buffered_protocol)
    };
    if buffered {
        return read_into_protocol_buffer(obj, st, fd, &protocol);
    }
    let read = read_bytes(py, fd, true);
    let data = match read {
        Ok(d) => d,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => return fatal_error(obj, st, os_error(e), "Fatal read error on socket transport"),
    };
    if data.as_bytes().is_empty() {
        return on_eof(obj, st, &protocol);
    }
    // The native TLS protocol is fed directly (it is the stdlib's buffered SSLProtocol,
    // hence the buffer_updated message).
    if let Ok(tls) = protocol.cast::<crate::tls::TlsProtocol>() {
        let r = crate::tls::feed(tls, &data).map(|()| py.None().into_bound(py));
        const FAILED: &str = "Fatal error: protocol.buffer_updated() call failed.";
        return protocol_call(obj, st, r, FAILED).map(drop);
    }
    let r = protocol.call_method1(intern!(py, "data_received"), (data,));
    protocol_call(
        obj,
        st,
        r,
        "Fatal error: protocol.data_received() call failed.",
    )
    .map(drop)
}

fn read_into_protocol_buffer(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    fd: RawFd,
    protocol: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = obj.py();
    const GET_BUFFER_FAILED: &str = "Fatal error: protocol.get_buffer() call failed.";
    let buf = protocol
        .call_method1(intern!(py, "get_buffer"), (-1,))
        .and_then(|b| {
            let raw = RawBuffer::get(&b, true)?;
            if raw.len() == 0 {
                return Err(PyRuntimeError::new_err(
                    "get_buffer() returned an empty buffer",
                ));
            }
            Ok(raw)
        });
    let Some(mut buf) = (match buf {
        Ok(b) => Some(b),
        Err(e) if is_exit(py, &e) => return Err(e),
        Err(e) => {
            fatal_error(obj, st, e, GET_BUFFER_FAILED)?;
            None
        }
    }) else {
        return Ok(());
    };
    let n = read_into(fd, buf.as_mut_ptr(), buf.len(), true);
    drop(buf);
    let n = match n {
        Ok(n) => n,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => return fatal_error(obj, st, os_error(e), "Fatal read error on socket transport"),
    };
    if n == 0 {
        return on_eof(obj, st, protocol);
    }
    let r = protocol.call_method1(intern!(py, "buffer_updated"), (n,));
    protocol_call(
        obj,
        st,
        r,
        "Fatal error: protocol.buffer_updated() call failed.",
    )
    .map(drop)
}

fn on_eof(obj: &Bound<'_, PyAny>, st: &Stream, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = obj.py();
    if is_debug(st) {
        logger(py)?.call_method1(intern!(py, "debug"), ("%r received EOF", obj))?;
    }
    const FAILED: &str = "Fatal error: protocol.eof_received() call failed.";
    let r = protocol.call_method0(intern!(py, "eof_received"));
    let Some(keep_open) = protocol_call(obj, st, r, FAILED)? else {
        return Ok(());
    };
    if keep_open.is_truthy()? {
        // The protocol may still write; nothing more can be read.
        let mut g = st.lock()?;
        let write = g.want_write;
        g.set_interest(obj, false, write)
    } else {
        close(obj, st)
    }
}

fn is_debug(st: &Stream) -> bool {
    st.lock()
        .ok()
        .and_then(|g| g.loop_.as_ref().map(|l| l.get().debug_enabled()))
        .unwrap_or(false)
}

fn on_writable(obj: &Bound<'_, PyAny>, st: &Stream) -> PyResult<()> {
    let py = obj.py();
    let mut g = st.lock()?;
    if g.conn_lost > 0 || g.fd < 0 {
        return Ok(());
    }
    if g.wbuf.is_empty() {
        let read = g.want_read;
        return g.set_interest(obj, read, false);
    }
    let sent = g.wbuf.write_to(py, g.fd, true);
    let n = match sent {
        Ok(n) => n,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => {
            let read = g.want_read;
            g.set_interest(obj, read, false)?;
            let dropped = g.wbuf.take();
            let waiter = cl(py, &g.empty_waiter);
            drop(g);
            drop(dropped);
            let exc = os_error(e);
            let exc_obj = exc.value(py).clone();
            fatal_error(obj, st, exc, "Fatal write error on socket transport")?;
            if let Some(w) = waiter {
                w.bind(py)
                    .call_method1(intern!(py, "set_exception"), (exc_obj,))?;
            }
            return Ok(());
        }
    };
    g.wbuf.consume(py, n);
    drop(g);
    transport::maybe_resume_protocol(obj, st)?; // may write more
    let mut g = st.lock()?;
    if !g.wbuf.is_empty() {
        return Ok(());
    }
    let read = g.want_read;
    g.set_interest(obj, read, false)?;
    let waiter = cl(py, &g.empty_waiter);
    let (closing, eof, fd) = (g.closing, g.eof, g.fd);
    drop(g);
    if let Some(w) = waiter {
        w.bind(py)
            .call_method1(intern!(py, "set_result"), (py.None(),))?;
    }
    if closing {
        call_connection_lost(obj, st, py.None().into_bound(py))?;
    } else if eof {
        if let Err(e) = shutdown_write(fd) {
            return fatal_error(
                obj,
                st,
                os_error(e),
                "Fatal write error on socket transport",
            );
        }
    }
    Ok(())
}

/// The stdlib's `_fatal_error`: OSErrors are only logged in debug mode (they are the
/// peer's doing); anything else goes to the exception handler. Then `_force_close`.
fn fatal_error(obj: &Bound<'_, PyAny>, st: &Stream, exc: PyErr, message: &str) -> PyResult<()> {
    let py = obj.py();
    let (l, protocol) = {
        let g = st.lock()?;
        (cl(py, &g.loop_), cl(py, &g.protocol))
    };
    if let Some(l) = l {
        let quiet = exc.is_instance_of::<PyOSError>(py);
        report_fatal(obj, l.bind(py), protocol, &exc, message, quiet)?;
    }
    force_close(obj, st, exc.into_value(py).into_bound(py).into_any())
}

fn force_close(obj: &Bound<'_, PyAny>, st: &Stream, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = obj.py();
    let (l, dropped) = {
        let mut g = st.lock()?;
        if g.conn_lost > 0 {
            return Ok(());
        }
        let dropped = g.wbuf.take();
        g.closing = true;
        g.set_interest(obj, false, false)?;
        g.conn_lost += 1;
        (g.loop_ref(py)?, dropped)
    };
    drop(dropped);
    schedule_connection_lost(obj, &l, exc)
}

fn close(obj: &Bound<'_, PyAny>, st: &Stream) -> PyResult<()> {
    let py = obj.py();
    let l = {
        let mut g = st.lock()?;
        if g.closing {
            return Ok(());
        }
        g.closing = true;
        let write = g.want_write;
        g.set_interest(obj, false, write)?;
        if !g.wbuf.is_empty() {
            return Ok(()); // connection_lost follows the last write
        }
        g.conn_lost += 1;
        g.set_interest(obj, false, false)?;
        g.loop_ref(py)?
    };
    schedule_connection_lost(obj, &l, py.None().into_bound(py))
}

fn call_connection_lost(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    exc: Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = obj.py();
    let (connected, protocol) = {
        let g = st.lock()?;
        (g.protocol_connected, cl(py, &g.protocol))
    };
    let result = match (connected, protocol) {
        (true, Some(p)) => p
            .bind(py)
            .call_method1(intern!(py, "connection_lost"), (&exc,))
            .map(drop),
        _ => Ok(()),
    };
    // Whatever connection_lost did, the socket goes and the references with it.
    let (sock, fd, l, server, protocol, waiter) = {
        let mut g = st.lock()?;
        g.set_interest(obj, false, false)?;
        let fd = std::mem::replace(&mut g.fd, -1);
        if let Some(l) = &g.loop_ {
            l.get().release_fd(fd, g.owner);
        }
        (
            g.sock.take(),
            fd,
            g.loop_.take(),
            g.server.take(),
            g.protocol.take(),
            cl(py, &g.empty_waiter),
        )
    };
    let closed = close_fd(py, sock, fd);
    drop(protocol);
    drop(l);
    if let Some(server) = server {
        server
            .bind(py)
            .call_method1(intern!(py, "_detach"), (obj,))?;
    }
    if let Some(w) = waiter {
        w.bind(py).call_method1(
            intern!(py, "set_exception"),
            (PyConnectionError::new_err("Connection is closed by peer").into_value(py),),
        )?;
    }
    result.and(closed)
}

/// Validates `write`'s argument type as the stdlib does.
pub(crate) fn check_data(data: &Bound<'_, PyAny>) -> PyResult<()> {
    if data.is_instance_of::<PyBytes>()
        || data.is_instance_of::<PyByteArray>()
        || data.is_instance_of::<PyMemoryView>()
    {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!(
            "data argument must be a bytes-like object, not '{}'",
            data.get_type().name()?
        )))
    }
}

fn write_buffers(obj: &Bound<'_, PyAny>, st: &Stream, items: &[Bound<'_, PyAny>]) -> PyResult<()> {
    let py = obj.py();
    let bufs = items
        .iter()
        .map(|d| RawBuffer::get(d, false))
        .collect::<PyResult<Vec<_>>>()?;
    let total: usize = bufs.iter().map(RawBuffer::len).sum();
    let mut g = st.lock()?;
    if g.eof {
        return Err(PyRuntimeError::new_err(
            "Cannot call write() after write_eof()",
        ));
    }
    if g.empty_waiter.is_some() {
        return Err(PyRuntimeError::new_err(
            "unable to write; sendfile is in progress",
        ));
    }
    if total == 0 {
        return Ok(());
    }
    if g.conn_lost > 0 {
        let warn = g.conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES;
        g.conn_lost += 1;
        drop(g);
        if warn {
            logger(py)?
                .call_method1(intern!(py, "warning"), ("socket.send() raised exception.",))?;
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
        match write_vectored(g.fd, &slices, true) {
            Ok(n) => sent = n,
            Err(e) if would_block(&e) => {}
            Err(e) => {
                drop(g);
                return fatal_error(
                    obj,
                    st,
                    os_error(e),
                    "Fatal write error on socket transport",
                );
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

// -- methods -------------------------------------------------------------------------

fn m_write(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [data] = args.parse("write", ["data"], 1)?;
    let data = data.expect("required");
    check_data(&data)?;
    write_buffers(obj, st, &[data])?;
    Ok(none(obj.py()))
}

fn m_writelines(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [lines] = args.parse("writelines", ["list_of_data"], 1)?;
    let items = lines
        .expect("required")
        .try_iter()?
        .collect::<PyResult<Vec<_>>>()?;
    for d in &items {
        check_data(d)?;
    }
    write_buffers(obj, st, &items)?;
    Ok(none(obj.py()))
}

fn m_write_eof(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("write_eof")?;
    let mut g = st.lock()?;
    if g.closing || g.eof {
        return Ok(none(obj.py()));
    }
    g.eof = true;
    if g.wbuf.is_empty() {
        shutdown_write(g.fd).map_err(os_error)?;
    }
    Ok(none(obj.py()))
}

fn m_can_write_eof(
    obj: &Bound<'_, PyAny>,
    _st: &Stream,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("can_write_eof")?;
    Ok(py_bool(obj.py(), true))
}

fn m_close(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("close")?;
    close(obj, st)?;
    Ok(none(obj.py()))
}

fn m_abort(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("abort")?;
    force_close(obj, st, obj.py().None().into_bound(obj.py()))?;
    Ok(none(obj.py()))
}

fn m_force_close(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [exc] = args.parse("_force_close", ["exc"], 1)?;
    force_close(obj, st, exc.expect("required"))?;
    Ok(none(obj.py()))
}

fn m_call_connection_lost(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let [exc] = args.parse("_call_connection_lost", ["exc"], 1)?;
    call_connection_lost(obj, st, exc.expect("required"))?;
    Ok(none(obj.py()))
}

fn m_set_protocol(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [protocol] = args.parse("set_protocol", ["protocol"], 1)?;
    let protocol = protocol.expect("required");
    let py = obj.py();
    let buffered = protocol.is_instance(cached(
        py,
        &BUFFERED_PROTOCOL,
        "asyncio.protocols",
        "BufferedProtocol",
    )?)?;
    let old = {
        let mut g = st.lock()?;
        g.buffered_protocol = buffered;
        g.protocol_connected = true;
        g.protocol.replace(protocol.unbind())
    };
    drop(old);
    Ok(none(py))
}

fn m_make_empty_waiter(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("_make_empty_waiter")?;
    let py = obj.py();
    let l = {
        let g = st.lock()?;
        if g.empty_waiter.is_some() {
            return Err(PyRuntimeError::new_err("Empty waiter is already set"));
        }
        g.loop_ref(py)?
    };
    let fut = l.call_method0(intern!(py, "create_future"))?;
    let empty = {
        let mut g = st.lock()?;
        g.empty_waiter = Some(fut.clone().unbind());
        g.wbuf.is_empty()
    };
    if empty {
        fut.call_method1(intern!(py, "set_result"), (py.None(),))?;
    }
    Ok(fut.unbind())
}

fn m_reset_empty_waiter(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("_reset_empty_waiter")?;
    let old = st.lock()?.empty_waiter.take();
    drop(old);
    Ok(none(obj.py()))
}

/// `transport._sock`: the socket object, None once closed (sendfile and start_tls use it).
fn m_get_sock(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("_get_sock")?;
    Ok(cl(obj.py(), &st.lock()?.sock).unwrap_or_else(|| none(obj.py())))
}

crate::native_method!(c_write, Stream, m_write);
crate::native_method!(c_writelines, Stream, m_writelines);
crate::native_method!(c_write_eof, Stream, m_write_eof);
crate::native_method!(c_can_write_eof, Stream, m_can_write_eof);
crate::native_method!(c_close, Stream, m_close);
crate::native_method!(c_abort, Stream, m_abort);
crate::native_method!(c_force_close, Stream, m_force_close);
crate::native_method!(c_call_connection_lost, Stream, m_call_connection_lost);
crate::native_method!(c_is_closing, Stream, transport::m_is_closing::<Stream>);
crate::native_method!(c_is_reading, Stream, transport::m_is_reading::<Stream>);
crate::native_method!(
    c_pause_reading,
    Stream,
    transport::m_pause_reading::<Stream>
);
crate::native_method!(
    c_resume_reading,
    Stream,
    transport::m_resume_reading::<Stream>
);
crate::native_method!(
    c_start_reading,
    Stream,
    transport::m_start_reading::<Stream>
);
crate::native_method!(c_set_protocol, Stream, m_set_protocol);
crate::native_method!(c_get_protocol, Stream, transport::m_get_protocol::<Stream>);
crate::native_method!(
    c_get_extra_info,
    Stream,
    transport::m_get_extra_info::<Stream>
);
crate::native_method!(
    c_set_write_buffer_limits,
    Stream,
    transport::m_set_write_buffer_limits::<Stream>
);
crate::native_method!(
    c_get_write_buffer_limits,
    Stream,
    transport::m_get_write_buffer_limits::<Stream>
);
crate::native_method!(
    c_get_write_buffer_size,
    Stream,
    transport::m_get_write_buffer_size::<Stream>
);
crate::native_method!(c_make_empty_waiter, Stream, m_make_empty_waiter);
crate::native_method!(c_reset_empty_waiter, Stream, m_reset_empty_waiter);
crate::native_method!(c_get_sock, Stream, m_get_sock);

fn socket_transport_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    SOCKET_TRANSPORT
        .get_or_try_init(py, || {
            let base = py
                .import("asyncio.transports")?
                .getattr("Transport")?
                .cast_into::<PyType>()?;
            let methods = [
                MethodSpec {
                    name: c"write",
                    func: c_write,
                    doc: c"Write data to the socket; what cannot be sent now is buffered.",
                },
                MethodSpec {
                    name: c"writelines",
                    func: c_writelines,
                    doc: c"Write each buffer of an iterable, in one vectored send where possible.",
                },
                MethodSpec {
                    name: c"write_eof",
                    func: c_write_eof,
                    doc: c"Shut down the write side once the buffer is flushed.",
                },
                MethodSpec {
                    name: c"can_write_eof",
                    func: c_can_write_eof,
                    doc: c"True: sockets support half-close.",
                },
                MethodSpec {
                    name: c"close",
                    func: c_close,
                    doc: c"Close after flushing the buffer; connection_lost(None) follows.",
                },
                MethodSpec {
                    name: c"abort",
                    func: c_abort,
                    doc: c"Close at once, discarding buffered data.",
                },
                MethodSpec {
                    name: c"_force_close",
                    func: c_force_close,
                    doc: c"Close at once with exc for connection_lost.",
                },
                MethodSpec {
                    name: c"_call_connection_lost",
                    func: c_call_connection_lost,
                    doc: c"Deliver connection_lost and release the socket.",
                },
                MethodSpec {
                    name: c"is_closing",
                    func: c_is_closing,
                    doc: c"True once the transport is closing or closed.",
                },
                MethodSpec {
                    name: c"is_reading",
                    func: c_is_reading,
                    doc: c"True unless reading is paused or the transport is closing.",
                },
                MethodSpec {
                    name: c"pause_reading",
                    func: c_pause_reading,
                    doc: c"Stop calling the protocol with received data.",
                },
                MethodSpec {
                    name: c"resume_reading",
                    func: c_resume_reading,
                    doc: c"Resume calling the protocol with received data.",
                },
                MethodSpec {
                    name: c"_start_reading",
                    func: c_start_reading,
                    doc: c"Start reading (after connection_made).",
                },
                MethodSpec {
                    name: c"set_protocol",
                    func: c_set_protocol,
                    doc: c"Replace the protocol.",
                },
                MethodSpec {
                    name: c"get_protocol",
                    func: c_get_protocol,
                    doc: c"The current protocol.",
                },
                MethodSpec {
                    name: c"get_extra_info",
                    func: c_get_extra_info,
                    doc: c"Optional transport information (peername, sockname, socket, ...).",
                },
                MethodSpec {
                    name: c"set_write_buffer_limits",
                    func: c_set_write_buffer_limits,
                    doc: c"Set the high- and low-water marks of the write buffer.",
                },
                MethodSpec {
                    name: c"get_write_buffer_limits",
                    func: c_get_write_buffer_limits,
                    doc: c"(low, high) water marks of the write buffer.",
                },
                MethodSpec {
                    name: c"get_write_buffer_size",
                    func: c_get_write_buffer_size,
                    doc: c"Bytes waiting in the write buffer.",
                },
                MethodSpec {
                    name: c"_make_empty_waiter",
                    func: c_make_empty_waiter,
                    doc: c"A future done when the write buffer is empty (sendfile).",
                },
                MethodSpec {
                    name: c"_reset_empty_waiter",
                    func: c_reset_empty_waiter,
                    doc: c"Forget the empty waiter.",
                },
                MethodSpec {
                    name: c"_get_sock",
                    func: c_get_sock,
                    doc: c"The socket object, or None once closed.",
                },
            ];
            let ty = pytype::create_type::<Stream>(
                &base,
                c"ferroloop._ferroloop.SocketTransport",
                c"A TCP or Unix stream socket transport, driven by the loop's Rust core.",
                &methods,
            )?;
            let b = ty.bind(py);
            b.setattr("_start_tls_compatible", true)?;
            b.setattr(
                "_sendfile_compatible",
                py.import("asyncio.constants")?
                    .getattr("_SendfileMode")?
                    .getattr("TRY_NATIVE")?,
            )?;
            b.setattr(
                "_sock",
                py.import("builtins")?
                    .getattr("property")?
                    .call1((b.getattr("_get_sock")?,))?,
            )?;
            Ok::<_, PyErr>(ty)
        })
        .map(|t| t.bind(py))
}

/// Whether `obj` is one of this module's transports.
pub fn is_stream_transport(obj: &Bound<'_, PyAny>) -> bool {
    SOCKET_TRANSPORT
        .get(obj.py())
        .is_some_and(|t| obj.get_type().is(t.bind(obj.py())))
}

fn sock_opt(fd: RawFd, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `v`/`len` are a valid out-buffer for an int option.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// Disables Nagle on TCP sockets (the stdlib's `_set_nodelay`): small writes go out
/// without waiting for the peer's ACK.
fn set_nodelay(fd: RawFd) {
    let domain = sock_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN);
    let ty = sock_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE);
    let proto = sock_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL);
    if matches!(domain, Some(libc::AF_INET) | Some(libc::AF_INET6))
        && ty == Some(libc::SOCK_STREAM)
        && proto == Some(libc::IPPROTO_TCP)
    {
        let one: c_int = 1;
        // SAFETY: sets an int option from a live int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
    }
}

/// `loop._make_socket_transport(sock, protocol, waiter, extra=, server=)`.
pub fn new_socket_transport<'py>(
    l: &Bound<'py, LoopCore>,
    sock: Bound<'py, PyAny>,
    protocol: Bound<'py, PyAny>,
    waiter: Option<Bound<'py, PyAny>>,
    extra: Option<Bound<'py, PyAny>>,
    server: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = l.py();
    let fd: RawFd = sock.call_method0(intern!(py, "fileno"))?.extract()?;
    if fd < 0 {
        return Err(PyValueError::new_err("socket is closed"));
    }
    let extra_dict = PyDict::new(py);
    if let Some(e) = extra.filter(|e| !e.is_none()) {
        extra_dict.update(e.cast::<pyo3::types::PyMapping>()?)?;
    }
    let tsock =
        cached(py, &TRANSPORT_SOCKET, "asyncio.trsock", "TransportSocket")?.call1((&sock,))?;
    extra_dict.set_item("socket", tsock)?;
    let os_error_type = py.get_type::<PyOSError>();
    for (key, method) in [("sockname", "getsockname"), ("peername", "getpeername")] {
        if key == "peername" && extra_dict.contains(key)? {
            continue;
        }
        match sock.call_method0(method) {
            Ok(v) => extra_dict.set_item(key, v)?,
            Err(e) if e.is_instance(py, &os_error_type) => extra_dict.set_item(key, py.None())?,
            Err(e) => return Err(e),
        }
    }
    set_nodelay(fd);
    let buffered = protocol.is_instance(cached(
        py,
        &BUFFERED_PROTOCOL,
        "asyncio.protocols",
        "BufferedProtocol",
    )?)?;
    let state = Stream {
        inner: Mutex::new(Inner {
            base: Base::new(fd, dispatch, l, &protocol, extra_dict),
            sock: Some(sock.unbind()),
            buffered_protocol: buffered,
            protocol_connected: true,
            server: server.clone().filter(|s| !s.is_none()).map(Bound::unbind),
            wbuf: WriteBuffer::default(),
            eof: false,
            empty_waiter: None,
        }),
    };
    let obj = pytype::new_instance(socket_transport_type(py)?, state)?;
    let owner = obj.as_ptr() as usize;
    // SAFETY: `obj` was just created with a Stream state.
    unsafe { pytype::state::<Stream>(&obj) }?.lock()?.owner = owner;
    l.get().claim_fd(fd, owner);
    if let Some(server) = server.filter(|s| !s.is_none()) {
        server.call_method1(intern!(py, "_attach"), (&obj,))?;
    }
    let args1 = PyTuple::new(py, [&obj])?;
    LoopCore::soon(l, protocol.getattr(intern!(py, "connection_made"))?, args1)?;
    LoopCore::soon(
        l,
        obj.getattr(intern!(py, "_start_reading"))?,
        PyTuple::empty(py),
    )?;
    if let Some(w) = waiter.filter(|w| !w.is_none()) {
        let f = cached(
            py,
            &SET_RESULT_UNLESS_CANCELLED,
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
