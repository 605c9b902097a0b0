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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString, PyTuple, PyType};

use crate::errors::os_error;
use crate::event_loop::LoopCore;
use crate::iobuf::{
    cl, close_fd, is_exit, lock_state, logger, none, py_bool, read_bytes_sized, read_into,
    report_fatal, schedule_connection_lost, warn_unclosed, would_block, write_vectored, RawBuffer,
    WriteBuffer,
};
use crate::pyhelpers::cached;
use crate::pytype::{self, Args, MethodSpec, NativeState, Visit};
use crate::server::ClientSet;
use crate::sockaddr::SockAddr;
use crate::transport::{self, Base, Transport};

/// After this many writes to a lost connection, each one logs a warning.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;
pub(crate) struct Inner {
    base: Base,
    sock: Option<Py<PyAny>>,
    /// How reads reach the protocol, decided when the protocol is set.
    read_mode: ReadMode,
    protocol_connected: bool,
    server: Option<Py<PyAny>>,
    wbuf: WriteBuffer,
    eof: bool,
    empty_waiter: Option<Py<PyAny>>,
    /// What the extra dict will hold, while `base.extra` is not built yet.
    lazy: Option<LazyExtra>,
    /// The server's connection set this transport is in (by address, see [`ClientSet`]).
    clients: Option<Py<ClientSet>>,
}

crate::deref_base!(Inner);

impl Drop for Inner {
    fn drop(&mut self) {
        // The set holds the transport's address: it must go before the object does.
        if let Some(clients) = self.clients.take() {
            clients.get().forget(self.base.owner);
        }
    }
}

/// Puts `transport` (a stream transport, else TypeError) in a server's connection set,
/// which it leaves when it is freed.
pub(crate) fn join_client_set(
    transport: &Bound<'_, PyAny>,
    clients: &Bound<'_, ClientSet>,
) -> PyResult<()> {
    let py = transport.py();
    if !transport.get_type().is(socket_transport_type(py)?) {
        return Err(PyTypeError::new_err(format!(
            "a server's connections are its socket transports, not {}",
            transport.get_type().name()?
        )));
    }
    // SAFETY: the type check above (the class is final).
    let st = unsafe { pytype::state::<Stream>(transport) }?;
    let old = st.lock()?.clients.replace(clients.clone().unbind());
    if let Some(old) = old.filter(|old| !old.is(clients)) {
        old.get().forget(transport.as_ptr() as usize);
    }
    Ok(())
}

/// The Rust state of a stream transport object.
pub struct Stream {
    inner: Mutex<Inner>,
    /// Size of the last read, which decides how the next one is allocated (outside the
    /// lock: written only on the loop thread, after the read).
    last_read: AtomicUsize,
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
        if let (0, Some(lazy)) = (r, &g.lazy) {
            r = lazy.traverse(visit);
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
                g.lazy.as_mut().map(LazyExtra::take_objects),
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
                (g.take_sock(py), fd, cl(py, &g.loop_), g.owner)
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
static STREAM_READER_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// How the transport reads for its protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// `data_received(bytes)`.
    Bytes,
    /// Into the protocol's own buffer (a `BufferedProtocol`).
    Buffered,
    /// `data_received(bytes)`, the `bytes` allocated as `socket.recv` does for the
    /// stdlib's streams (`StreamReaderProtocol`, whose `bytearray` buffer keeps the
    /// allocator churning otherwise: see `iobuf::read_bytes_sized`).
    StreamReader,
    /// The native TLS protocol, fed straight from the socket.
    Tls,
}

fn read_mode(protocol: &Bound<'_, PyAny>) -> PyResult<ReadMode> {
    let py = protocol.py();
    if protocol.cast::<crate::tls::TlsProtocol>().is_ok() {
        return Ok(ReadMode::Tls);
    }
    let is = |cell, module, name| protocol.is_instance(cached(py, cell, module, name)?);
    Ok(
        if is(&BUFFERED_PROTOCOL, "asyncio.protocols", "BufferedProtocol")? {
            ReadMode::Buffered
        } else if is(
            &STREAM_READER_PROTOCOL,
            "asyncio.streams",
            "StreamReaderProtocol",
        )? {
            ReadMode::StreamReader
        } else {
            ReadMode::Bytes
        },
    )
}

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
    let (fd, protocol, mode) = {
        let g = st.lock()?;
        // Not registered any more (paused, closing, lost) while this event was queued:
        // the stdlib would have cancelled the reader handle.
        if g.conn_lost > 0 || !g.want_read || g.fd < 0 {
            return Ok(());
        }
        (g.fd, g.protocol(py)?, g.read_mode)
    };
    if mode == ReadMode::Buffered {
        return read_into_protocol_buffer(obj, st, fd, &protocol);
    }
    // The native TLS protocol is fed directly, from the receive buffer (it is the
    // stdlib's buffered SSLProtocol, hence the buffer_updated message).
    if mode == ReadMode::Tls {
        // SAFETY: `read_mode` found this protocol to be a TlsProtocol.
        let tls = unsafe { protocol.cast_unchecked::<crate::tls::TlsProtocol>() };
        let r = match crate::tls::feed_from_fd(tls, fd) {
            Ok(Some(r)) => r.map(|()| py.None().into_bound(py)),
            Ok(None) => return on_eof(obj, st, &protocol),
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => {
                return fatal_error(obj, st, os_error(e), "Fatal read error on socket transport")
            }
        };
        const FAILED: &str = "Fatal error: protocol.buffer_updated() call failed.";
        return protocol_call(obj, st, r, FAILED).map(drop);
    }
    let last = st.last_read.load(Ordering::Relaxed);
    let data = match read_bytes_sized(py, fd, true, last, mode == ReadMode::StreamReader)? {
        Ok(d) => d,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => return fatal_error(obj, st, os_error(e), "Fatal read error on socket transport"),
    };
    let n = data.as_bytes().len();
    if n == 0 {
        return on_eof(obj, st, &protocol);
    }
    st.last_read.store(n, Ordering::Relaxed);
    let r = protocol.call_method1(intern!(py, "data_received"), (&data,));
    crate::iobuf::recycle(data);
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
            g.take_sock(py),
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
    // One item (every `write`) stays off the heap.
    let single: [RawBuffer; 1];
    let many: Vec<RawBuffer>;
    let bufs: &[RawBuffer] = if let [item] = items {
        single = [RawBuffer::get(item, false)?];
        &single
    } else {
        many = items
            .iter()
            .map(|d| RawBuffer::get(d, false))
            .collect::<PyResult<_>>()?;
        &many
    };
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
        let one: [&[u8]; 1];
        let several: Vec<&[u8]>;
        let slices: &[&[u8]] = if let [b] = bufs {
            one = [b.as_slice()];
            &one
        } else {
            several = bufs
                .iter()
                .map(RawBuffer::as_slice)
                .filter(|s| !s.is_empty())
                .collect();
            &several
        };
        match write_vectored(g.fd, slices, true) {
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
    g.wbuf.push_rest(items, bufs, sent);
    drop(g);
    transport::maybe_pause_protocol(obj, st)
}

// -- extra info ----------------------------------------------------------------------
//
// The stdlib builds a transport's extra dict in its constructor: `socket` (a
// `TransportSocket`), `sockname` and `peername` (`getsockname()`/`getpeername()`, or the
// `peername` the caller passed, as the server passes `accept()`'s address). For an idle
// connection that is most of the transport's memory: a dict, a wrapper object and two
// address tuples with their strings and ints. Here the addresses are read at the same
// moment (so they are what the stdlib would report, even once the peer is gone or the
// socket is closed) but kept in their raw kernel form, and the dict is built the first
// time anything asks for one of those keys.

/// `sockaddr_in6`, the longest address kept inline (`sockaddr_in` is 16 bytes).
const INLINE_ADDR: usize = 28;

/// One of the extra dict's addresses, not converted to a Python object yet.
enum ExtraAddr {
    /// The call failed: the stdlib reports None.
    Failed,
    /// A raw sockaddr of `len` bytes.
    Inline { len: u8, bytes: [u8; INLINE_ADDR] },
    /// A longer raw sockaddr (a Unix socket path).
    Heap(Box<[u8]>),
    /// The caller's own object, when its raw form would not convert back to an equal one.
    Object(Py<PyAny>),
}

impl ExtraAddr {
    fn from_raw(addr: &SockAddr) -> Self {
        let (ptr, len) = addr.as_parts();
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `as_parts` gives the address; `len` bytes of its storage are in bounds.
        let raw = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
        if raw.len() <= INLINE_ADDR {
            let mut bytes = [0u8; INLINE_ADDR];
            bytes[..raw.len()].copy_from_slice(raw);
            ExtraAddr::Inline {
                len: raw.len() as u8,
                bytes,
            }
        } else {
            ExtraAddr::Heap(raw.into())
        }
    }

    /// The object `sock.getsockname()`/`getpeername()` returned for this address.
    fn to_python<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let raw: &[u8] = match self {
            ExtraAddr::Failed => return Ok(py.None().into_bound(py)),
            ExtraAddr::Object(o) => return Ok(o.bind(py).clone()),
            ExtraAddr::Inline { len, bytes } => &bytes[..*len as usize],
            ExtraAddr::Heap(b) => b,
        };
        let mut addr = SockAddr::empty();
        let (ptr, len) = addr.as_mut_parts();
        // SAFETY: `raw` came out of a SockAddr, so it fits in another one's storage.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), ptr.cast::<u8>(), raw.len());
            *len = raw.len() as libc::socklen_t;
        }
        addr.to_python(py)
    }

    /// The caller's `peername` on a socket of `family`: its raw form when that converts
    /// back to an equal object of the same types (what the socket module made from the
    /// same sockaddr), else the object itself.
    fn given(family: i32, value: Bound<'_, PyAny>) -> PyResult<Self> {
        let Some(raw) = SockAddr::from_python(family, &value) else {
            return Ok(ExtraAddr::Object(value.unbind()));
        };
        let converted = ExtraAddr::from_raw(&raw);
        // IPv4: `inet_pton` takes only the dotted quad `inet_ntop` writes, and the port
        // is an exact int, so the round trip is exact. IPv6 text has other spellings and
        // Unix paths str/bytes forms: compare.
        if family == libc::AF_INET || converted.to_python(value.py())?.eq(&value)? {
            Ok(converted)
        } else {
            Ok(ExtraAddr::Object(value.unbind()))
        }
    }
}

/// The extra dict's contents while it is not built.
struct LazyExtra {
    sockname: ExtraAddr,
    peername: ExtraAddr,
    /// `peername` came from the caller's `extra` (its key comes first, as in the stdlib).
    peer_given: bool,
    /// The socket once the transport has closed it: `TransportSocket` still wraps it.
    closed_sock: Option<Py<PyAny>>,
}

impl LazyExtra {
    fn traverse(&self, visit: &Visit) -> c_int {
        let mut r = visit.opt(&self.closed_sock);
        if let (0, ExtraAddr::Object(o)) = (r, &self.peername) {
            r = visit.call(o);
        }
        r
    }

    /// The Python references, to be dropped by `tp_clear` (outside the lock).
    fn take_objects(&mut self) -> (Option<Py<PyAny>>, ExtraAddr) {
        let peer = match self.peername {
            ExtraAddr::Object(_) => std::mem::replace(&mut self.peername, ExtraAddr::Failed),
            _ => ExtraAddr::Failed,
        };
        (self.closed_sock.take(), peer)
    }
}

/// What the stdlib would put in the extra dict, left unbuilt: the transport's own
/// `extra` forms (none, or the accepted socket's `{'peername': addr}`) on TCP and Unix
/// sockets. Anything else (more keys, other families) returns None and is built now.
fn lazy_extra(fd: RawFd, extra: Option<&Bound<'_, PyAny>>) -> PyResult<Option<LazyExtra>> {
    let given = match extra {
        None => None,
        Some(e) => {
            let Ok(d) = e.cast::<PyDict>() else {
                return Ok(None);
            };
            if !d.is_exact_instance_of::<PyDict>() || d.len() > 1 {
                return Ok(None);
            }
            match d.len() {
                0 => None,
                _ => match d.get_item(intern!(e.py(), "peername"))? {
                    Some(v) => Some(v),
                    None => return Ok(None),
                },
            }
        }
    };
    let Some(sockname) = socket_name(fd, false) else {
        return Ok(None);
    };
    let family = addr_family(&sockname);
    if !matches!(family, libc::AF_INET | libc::AF_INET6 | libc::AF_UNIX) {
        return Ok(None);
    }
    let peer_given = given.is_some();
    let peername = match given {
        Some(v) => ExtraAddr::given(family, v)?,
        None => socket_name(fd, true).map_or(ExtraAddr::Failed, |a| ExtraAddr::from_raw(&a)),
    };
    Ok(Some(LazyExtra {
        sockname: ExtraAddr::from_raw(&sockname),
        peername,
        peer_given,
        closed_sock: None,
    }))
}

/// `getsockname` (or `getpeername`) of `fd`, None when it fails.
fn socket_name(fd: RawFd, peer: bool) -> Option<SockAddr> {
    let mut addr = SockAddr::empty();
    let (ptr, len) = addr.as_mut_parts();
    // SAFETY: `ptr`/`len` describe the address storage, valid for the call.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, ptr, len)
        } else {
            libc::getsockname(fd, ptr, len)
        }
    };
    (r == 0).then_some(addr)
}

fn addr_family(addr: &SockAddr) -> i32 {
    let (ptr, len) = addr.as_parts();
    if (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return libc::AF_UNSPEC;
    }
    // SAFETY: every sockaddr starts with its family.
    i32::from(unsafe { (*ptr).sa_family })
}

/// The stdlib's constructor-time extra dict: the caller's `extra`, then `socket`,
/// `sockname` and (unless given) `peername`. Datagram transports build theirs with it
/// too.
pub(crate) fn eager_extra<'py>(
    sock: &Bound<'py, PyAny>,
    extra: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let py = sock.py();
    let extra_dict = PyDict::new(py);
    if let Some(e) = extra {
        extra_dict.update(e.cast::<pyo3::types::PyMapping>()?)?;
    }
    let tsock =
        cached(py, &TRANSPORT_SOCKET, "asyncio.trsock", "TransportSocket")?.call1((sock,))?;
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
    Ok(extra_dict)
}

impl Inner {
    /// Takes the socket to close it, keeping a reference for the extra dict's
    /// `TransportSocket` if that is not built yet.
    fn take_sock(&mut self, py: Python<'_>) -> Option<Py<PyAny>> {
        let sock = self.sock.take();
        if let Some(lazy) = self.lazy.as_mut() {
            lazy.closed_sock = cl(py, &sock);
        }
        sock
    }
}

/// The transport's extra dict, built now if it was left for later.
fn extra_dict<'py>(obj: &Bound<'py, PyAny>, st: &Stream) -> PyResult<Bound<'py, PyDict>> {
    let py = obj.py();
    let (sock, sockname, peername, peer_given) = {
        let g = st.lock()?;
        if let Some(d) = &g.extra {
            return Ok(d.bind(py).clone());
        }
        match &g.lazy {
            Some(lazy) => (
                cl(py, &g.sock).or_else(|| cl(py, &lazy.closed_sock)),
                lazy.sockname.to_python(py)?,
                lazy.peername.to_python(py)?,
                lazy.peer_given,
            ),
            // Cleared by the collector: nothing left to report.
            None => (
                None,
                py.None().into_bound(py),
                py.None().into_bound(py),
                false,
            ),
        }
    };
    let d = PyDict::new(py);
    if peer_given {
        d.set_item(intern!(py, "peername"), &peername)?;
    }
    if let Some(sock) = sock {
        let tsock =
            cached(py, &TRANSPORT_SOCKET, "asyncio.trsock", "TransportSocket")?.call1((sock,))?;
        d.set_item(intern!(py, "socket"), tsock)?;
    }
    d.set_item(intern!(py, "sockname"), sockname)?;
    if !peer_given {
        d.set_item(intern!(py, "peername"), peername)?;
    }
    let (d, lazy) = {
        let mut g = st.lock()?;
        match &g.extra {
            Some(built) => (built.bind(py).clone(), None),
            None => {
                g.extra = Some(d.clone().unbind());
                (d, g.lazy.take())
            }
        }
    };
    drop(lazy);
    Ok(d)
}

/// `get_extra_info(name, default=None)`: only `socket`, `sockname` and `peername` (or a
/// name that is not a plain str, which the dict must answer) build the dict; any other
/// name of a transport whose dict is not built yet is not in it.
fn m_get_extra_info(
    obj: &Bound<'_, PyAny>,
    st: &Stream,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [name, default] = args.parse("get_extra_info", ["name", "default"], 1)?;
    let name = name.expect("required");
    let default = default.map_or_else(|| none(py), Bound::unbind);
    let built = cl(py, &st.lock()?.extra);
    let d = match built {
        Some(d) => d.into_bound(py),
        None => {
            if let Ok(s) = name.cast::<PyString>() {
                if s.is_exact_instance_of::<PyString>()
                    && !matches!(s.to_str()?, "socket" | "sockname" | "peername")
                {
                    return Ok(default);
                }
            }
            extra_dict(obj, st)?
        }
    };
    Ok(d.get_item(name)?.map_or(default, Bound::unbind))
}

/// `transport._extra`, the stdlib's attribute for the dict (built on first use).
fn m_get_extra(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("_get_extra")?;
    Ok(extra_dict(obj, st)?.into_any().unbind())
}

/// `transport._extra = d`: `d` (a dict) is what `get_extra_info` answers from then on.
fn m_set_extra(obj: &Bound<'_, PyAny>, st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [value] = args.parse("_set_extra", ["value"], 1)?;
    let value = value.expect("required");
    let d = value.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "transport._extra must be a dict, not '{}'",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    let old = {
        let mut g = st.lock()?;
        (g.extra.replace(d.clone().unbind()), g.lazy.take())
    };
    drop(old);
    Ok(none(obj.py()))
}

/// `del transport._extra`, refused: the transport always has the dict.
fn m_del_extra(_obj: &Bound<'_, PyAny>, _st: &Stream, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("_del_extra")?;
    Err(pyo3::exceptions::PyAttributeError::new_err(
        "can't delete the transport's _extra",
    ))
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
    let mode = read_mode(&protocol)?;
    let old = {
        let mut g = st.lock()?;
        g.read_mode = mode;
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
crate::native_method!(c_get_extra_info, Stream, m_get_extra_info);
crate::native_method!(c_get_extra, Stream, m_get_extra);
crate::native_method!(c_set_extra, Stream, m_set_extra);
crate::native_method!(c_del_extra, Stream, m_del_extra);
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
                MethodSpec {
                    name: c"_get_extra",
                    func: c_get_extra,
                    doc: c"The extra dict behind get_extra_info (built on first use).",
                },
                MethodSpec {
                    name: c"_set_extra",
                    func: c_set_extra,
                    doc: c"Replace the extra dict behind get_extra_info.",
                },
                MethodSpec {
                    name: c"_del_extra",
                    func: c_del_extra,
                    doc: c"Refused: the transport always has an extra dict.",
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
            let property = py.import("builtins")?.getattr("property")?;
            b.setattr("_sock", property.call1((b.getattr("_get_sock")?,))?)?;
            b.setattr(
                "_extra",
                property.call1((
                    b.getattr("_get_extra")?,
                    b.getattr("_set_extra")?,
                    b.getattr("_del_extra")?,
                ))?,
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
    let extra = extra.filter(|e| !e.is_none());
    let lazy = lazy_extra(fd, extra.as_ref())?;
    let extra_dict = match lazy {
        Some(_) => None,
        None => Some(eager_extra(&sock, extra.as_ref())?.unbind()),
    };
    set_nodelay(fd);
    let read_mode = read_mode(&protocol)?;
    let state = Stream {
        last_read: AtomicUsize::new(0),
        inner: Mutex::new(Inner {
            base: Base::with_extra(fd, dispatch, l, &protocol, extra_dict),
            sock: Some(sock.unbind()),
            read_mode,
            protocol_connected: true,
            server: server.clone().filter(|s| !s.is_none()).map(Bound::unbind),
            wbuf: WriteBuffer::default(),
            eof: false,
            empty_waiter: None,
            lazy,
            clients: None,
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
