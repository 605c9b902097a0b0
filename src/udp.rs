//! Datagram transports: UDP and Unix datagram sockets.
//!
//! Behaviour is the stdlib's `_SelectorDatagramTransport`: the same callback order
//! (`connection_made`, then reading starts, then the waiter), `_FlowControlMixin` flow
//! control, `OSError`s from the socket going to `protocol.error_received` and anything
//! else to the fatal-error path, the same `sendto` argument checks and messages. What
//! differs is where it runs: a readable socket is read here with `recvfrom` on the raw
//! fd and handed to `datagram_received` with no Python frame of ours, the sender's
//! address converted as `socket.recvfrom` converts it (see `sockaddr`); `sendto` tries
//! the socket at once and keeps only what would block, as `(bytes, addr)` pairs.
//!
//! Addresses that are not a numeric host with an int port (or a Unix path) go through
//! the socket object's own `sendto`, so name resolution, `''`, `'<broadcast>'` and the
//! error for a malformed address are exactly the socket module's.
//!
//! Deliberate differences from the stdlib, all where it misbehaves:
//! - once the transport is closing with nothing buffered (or aborted), `sendto` drops
//!   the datagram for unconnected endpoints too (the stdlib only does so for connected
//!   ones and otherwise fails on its released socket);
//! - `abort()` empties the write buffer and its size (the stdlib keeps the old size);
//! - `recvfrom`/`sendto` never block, even on a socket left in blocking mode.
//!
//! Locking follows `stream`: the state's mutex is never held while Python code runs.

use std::collections::VecDeque;
use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{
    PyBlockingIOError, PyInterruptedError, PyOSError, PyTypeError, PyValueError,
};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyTuple, PyType};

use crate::errors::os_error;
use crate::event_loop::LoopCore;
use crate::iobuf::{
    cl, close_fd, is_exit, lock_state, logger, none, read_bytes_with, report_fatal,
    schedule_connection_lost, RawBuffer, MAX_READ,
};
use crate::pyhelpers::cached;
use crate::pytype::{self, Args, MethodSpec, NativeState, Visit};
use crate::sockaddr::SockAddr;
use crate::transport::{self, Base, Transport};

/// After this many `sendto` calls on a lost endpoint, each one logs a warning.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;
const READ_ERROR: &str = "Fatal read error on datagram transport";
const WRITE_ERROR: &str = "Fatal write error on datagram transport";

/// A datagram waiting for the socket to become writable.
struct Datagram {
    data: Py<PyBytes>,
    /// The destination as given to `sendto` (None: the connected peer).
    addr: Py<PyAny>,
}

pub(crate) struct Inner {
    base: Base,
    /// The socket's address family, for converting destinations.
    family: i32,
    /// Whether received addresses are converted here (AF_INET, AF_INET6, AF_UNIX) or the
    /// socket object does the `recvfrom`.
    native_recv: bool,
    /// `extra['peername']` is true: datagrams go out with `send`, whatever `addr` says.
    connected: bool,
    /// The `address` given at creation (`remote_addr`), when it is truthy: the only
    /// destination `sendto` accepts.
    address: Option<Py<PyAny>>,
    /// Python 3.13+ sends empty datagrams; earlier versions ignore them (gh-113812).
    send_empty: bool,
    sock: Option<Py<PyAny>>,
    protocol_connected: bool,
    buffer: VecDeque<Datagram>,
    /// Bytes in `buffer`: payloads, plus `header` per datagram.
    buffer_size: usize,
    /// What a buffered datagram counts beyond its payload: 8 bytes from 3.13 on, which
    /// counts the UDP header so that empty datagrams still fill the buffer.
    header: usize,
    /// The last sender and its Python address: a peer that keeps talking gets the same
    /// (immutable) address object instead of a new one per datagram.
    last_peer: Option<(SockAddr, Py<PyAny>)>,
}

crate::deref_base!(Inner);

/// The Rust state of a datagram transport object.
pub struct Dgram {
    inner: Mutex<Inner>,
}

impl Transport for Dgram {
    type Inner = Inner;
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        lock_state(&self.inner)
    }
    fn write_buffer_size(g: &Inner) -> usize {
        g.buffer_size
    }
}

impl NativeState for Dgram {
    fn traverse(&self, visit: &Visit) -> c_int {
        // Busy means we are inside one of our own operations, which holds references
        // anyway; not visiting only makes the collector more conservative.
        let Ok(g) = self.inner.try_lock() else {
            return 0;
        };
        let mut r = visit.opt(&g.loop_);
        for o in [&g.sock, &g.protocol, &g.address] {
            if r == 0 {
                r = visit.opt(o);
            }
        }
        if r == 0 {
            r = visit.opt(&g.extra);
        }
        if r == 0 {
            if let Some((_, a)) = &g.last_peer {
                r = visit.call(a);
            }
        }
        for d in &g.buffer {
            if r == 0 {
                r = visit.call(&d.data);
            }
            if r == 0 {
                r = visit.call(&d.addr);
            }
        }
        r
    }

    fn clear(&self, _py: Python<'_>) {
        let taken = match self.inner.try_lock() {
            Ok(mut g) => (
                g.protocol.take(),
                g.extra.take(),
                std::mem::take(&mut g.buffer),
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
        let warned = obj.repr().and_then(|r| {
            let warn = cached(py, &WARN, "warnings", "warn")?;
            let category = py.get_type::<pyo3::exceptions::PyResourceWarning>();
            let kwargs = PyDict::new(py);
            kwargs.set_item("source", obj)?;
            warn.call((format!("unclosed transport {r}"), category), Some(&kwargs))
        });
        if let Err(e) = warned {
            e.write_unraisable(py, Some(obj));
        }
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
            let read = if g.want_read { "polling" } else { "idle" };
            info.push(format!("read={read}"));
            let write = if g.want_write { "polling" } else { "idle" };
            info.push(format!("write=<{write}, bufsize={}>", g.buffer_size));
        }
        Ok(format!("<{}>", info.join(" ")))
    }
}

static WARN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SET_RESULT_UNLESS_CANCELLED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static DATAGRAM_TRANSPORT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

impl Inner {
    fn target(&self, py: Python<'_>) -> Target {
        Target {
            fd: self.fd,
            family: self.family,
            connected: self.connected,
            sock: cl(py, &self.sock),
        }
    }
}

/// What a send needs, copied out so that no lock is held while it runs.
struct Target {
    fd: RawFd,
    family: i32,
    connected: bool,
    sock: Option<Py<PyAny>>,
}

/// The outcome of one datagram send.
enum Sent {
    Done,
    WouldBlock,
    /// An OSError for `error_received`, or anything else for the fatal-error path.
    Failed(PyErr),
}

fn raw_send(mut call: impl FnMut() -> isize) -> Sent {
    loop {
        if call() >= 0 {
            return Sent::Done;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Sent::WouldBlock,
            _ => return Sent::Failed(os_error(e)),
        }
    }
}

/// Sends one datagram: `send` when connected, `sendto` on the fd for an address
/// converted here, else the socket object's `sendto` (its rules, its errors).
fn send_datagram(
    py: Python<'_>,
    t: &Target,
    data: &Bound<'_, PyAny>,
    bytes: &[u8],
    addr: &Bound<'_, PyAny>,
) -> Sent {
    const FLAGS: c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if t.fd < 0 {
        return Sent::Failed(os_error(io::Error::from_raw_os_error(libc::EBADF)));
    }
    if t.connected {
        // SAFETY: `bytes` is valid for its length during the call.
        return raw_send(|| unsafe { libc::send(t.fd, bytes.as_ptr().cast(), bytes.len(), FLAGS) });
    }
    if !addr.is_none() {
        if let Some(sa) = SockAddr::from_python(t.family, addr) {
            let (ptr, len) = sa.as_parts();
            return raw_send(|| {
                // SAFETY: `bytes` and `sa` are valid for the duration of the call.
                unsafe { libc::sendto(t.fd, bytes.as_ptr().cast(), bytes.len(), FLAGS, ptr, len) }
            });
        }
    }
    let Some(sock) = &t.sock else {
        return Sent::Failed(os_error(io::Error::from_raw_os_error(libc::EBADF)));
    };
    match sock
        .bind(py)
        .call_method1(intern!(py, "sendto"), (data, addr))
    {
        Ok(_) => Sent::Done,
        Err(e)
            if e.is_instance_of::<PyBlockingIOError>(py)
                || e.is_instance_of::<PyInterruptedError>(py) =>
        {
            Sent::WouldBlock
        }
        Err(e) => Sent::Failed(e),
    }
}

/// A failed send or receive, as the stdlib handles it: an OSError goes to
/// `protocol.error_received` (whose own exception propagates), anything else is fatal.
fn socket_error(obj: &Bound<'_, PyAny>, st: &Dgram, e: PyErr, fatal: &str) -> PyResult<()> {
    let py = obj.py();
    if is_exit(py, &e) {
        return Err(e);
    }
    if e.is_instance_of::<PyOSError>(py) {
        let protocol = st.lock()?.protocol(py)?;
        protocol
            .call_method1(intern!(py, "error_received"), (e.into_value(py),))
            .map(drop)
    } else {
        fatal_error(obj, st, e, fatal)
    }
}

/// Called by the loop when the transport's fd is ready.
fn dispatch(obj: &Bound<'_, PyAny>, write: bool) -> PyResult<()> {
    // SAFETY: the reactor registers only datagram transport objects with this function.
    let st = unsafe { pytype::state::<Dgram>(obj) }?;
    let (result, what) = if write {
        (on_writable(obj, st), "_sendto_ready")
    } else {
        (on_readable(obj, st), "_read_ready")
    };
    match result {
        Err(e) if !is_exit(obj.py(), &e) => report_callback_error(obj, st, e, what),
        r => r,
    }
}

/// An exception escaped a protocol callback run for an I/O event (`datagram_received`,
/// `error_received`): reported as the stdlib reports one escaping its `_read_ready`
/// handle; the transport stays open.
fn report_callback_error(obj: &Bound<'_, PyAny>, st: &Dgram, e: PyErr, what: &str) -> PyResult<()> {
    let py = obj.py();
    let (loop_, protocol) = match st.lock() {
        Ok(g) => (cl(py, &g.loop_), cl(py, &g.protocol)),
        Err(_) => (None, None),
    };
    match loop_ {
        Some(l) => {
            let ctx = PyDict::new(py);
            let name = obj.get_type().name()?;
            ctx.set_item("message", format!("Exception in callback {name}.{what}()"))?;
            ctx.set_item("exception", e)?;
            ctx.set_item("transport", obj)?;
            ctx.set_item("protocol", protocol)?;
            l.bind(py)
                .call_method1(intern!(py, "call_exception_handler"), (ctx,))?;
        }
        None => e.write_unraisable(py, Some(obj)),
    }
    Ok(())
}

fn recvfrom(fd: RawFd, buf: &mut [u8], addr: &mut SockAddr) -> io::Result<usize> {
    loop {
        let (sa, len) = addr.as_mut_parts();
        // SAFETY: `buf` is writable for its length; `sa`/`len` describe `addr`'s storage.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                sa,
                len,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn on_readable(obj: &Bound<'_, PyAny>, st: &Dgram) -> PyResult<()> {
    let py = obj.py();
    let (fd, protocol, native, sock) = {
        let g = st.lock()?;
        // Not registered any more (paused, closing, lost) while this event was queued:
        // the stdlib would have cancelled the reader handle.
        if g.conn_lost > 0 || !g.want_read || g.fd < 0 {
            return Ok(());
        }
        (g.fd, g.protocol(py)?, g.native_recv, cl(py, &g.sock))
    };
    if !native {
        return read_through_socket(obj, st, &protocol, sock);
    }
    let mut sa = SockAddr::empty();
    // Into the loop's read buffer (the stdlib's `max_size`: longer datagrams are truncated,
    // as with `sock.recvfrom(max_size)`).
    let read = read_bytes_with(py, |buf| recvfrom(fd, buf, &mut sa));
    let data = match read {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(()),
        Err(e) => return socket_error(obj, st, os_error(e), READ_ERROR),
    };
    let addr = match peer_address(py, st, &sa) {
        Ok(a) => a,
        Err(e) if is_exit(py, &e) => return Err(e),
        Err(e) => return fatal_error(obj, st, e, READ_ERROR),
    };
    let r = protocol.call_method1(intern!(py, "datagram_received"), (&data, addr));
    crate::iobuf::recycle(data);
    r.map(drop)
}

/// The Python form of the sender's address, reusing the last one for the same sender.
fn peer_address<'py>(py: Python<'py>, st: &Dgram, sa: &SockAddr) -> PyResult<Bound<'py, PyAny>> {
    if let Some((last, obj)) = &st.lock()?.last_peer {
        if last.same_as(sa) {
            return Ok(obj.bind(py).clone());
        }
    }
    let addr = sa.to_python(py)?;
    st.lock()?.last_peer = Some((*sa, addr.clone().unbind()));
    Ok(addr)
}

/// `_read_ready` for families whose addresses are not converted here: the socket
/// object's `recvfrom` does the read.
fn read_through_socket(
    obj: &Bound<'_, PyAny>,
    st: &Dgram,
    protocol: &Bound<'_, PyAny>,
    sock: Option<Py<PyAny>>,
) -> PyResult<()> {
    let py = obj.py();
    let Some(sock) = sock else {
        return Ok(());
    };
    let received = sock
        .bind(py)
        .call_method1(intern!(py, "recvfrom"), (MAX_READ,))
        .and_then(|r| r.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>());
    match received {
        Ok((data, addr)) => protocol
            .call_method1(intern!(py, "datagram_received"), (data, addr))
            .map(drop),
        Err(e)
            if e.is_instance_of::<PyBlockingIOError>(py)
                || e.is_instance_of::<PyInterruptedError>(py) =>
        {
            Ok(())
        }
        Err(e) => socket_error(obj, st, e, READ_ERROR),
    }
}

/// `_sendto_ready`: sends buffered datagrams until the socket would block.
fn on_writable(obj: &Bound<'_, PyAny>, st: &Dgram) -> PyResult<()> {
    let py = obj.py();
    let target = {
        let g = st.lock()?;
        if g.conn_lost > 0 || !g.want_write || g.fd < 0 {
            return Ok(());
        }
        g.target(py)
    };
    loop {
        let Some(d) = ({
            let mut g = st.lock()?;
            let d = g.buffer.pop_front();
            if let Some(d) = &d {
                g.buffer_size -= d.data.bind(py).as_bytes().len() + g.header;
            }
            d
        }) else {
            break;
        };
        let data = d.data.bind(py);
        match send_datagram(py, &target, data.as_any(), data.as_bytes(), d.addr.bind(py)) {
            Sent::Done => {}
            Sent::WouldBlock => {
                let mut g = st.lock()?;
                g.buffer_size += data.as_bytes().len() + g.header;
                g.buffer.push_front(d);
                break;
            }
            // The datagram is dropped; the rest waits for the next writable event.
            Sent::Failed(e) => return socket_error(obj, st, e, WRITE_ERROR),
        }
    }
    transport::maybe_resume_protocol(obj, st)?; // may buffer more
    let closing = {
        let mut g = st.lock()?;
        if !g.buffer.is_empty() {
            return Ok(());
        }
        let read = g.want_read;
        g.set_interest(obj, read, false)?;
        g.closing
    };
    if closing {
        call_connection_lost(obj, st, py.None().into_bound(py))?;
    }
    Ok(())
}

/// The stdlib's `_fatal_error`: OSErrors are only logged in debug mode; anything else
/// goes to the exception handler. Then `_force_close`.
fn fatal_error(obj: &Bound<'_, PyAny>, st: &Dgram, exc: PyErr, message: &str) -> PyResult<()> {
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

fn force_close(obj: &Bound<'_, PyAny>, st: &Dgram, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = obj.py();
    let (l, dropped) = {
        let mut g = st.lock()?;
        if g.conn_lost > 0 {
            return Ok(());
        }
        let dropped = std::mem::take(&mut g.buffer);
        g.buffer_size = 0;
        g.closing = true;
        g.set_interest(obj, false, false)?;
        g.conn_lost += 1;
        (g.loop_ref(py)?, dropped)
    };
    drop(dropped);
    schedule_connection_lost(obj, &l, exc)
}

fn close(obj: &Bound<'_, PyAny>, st: &Dgram) -> PyResult<()> {
    let py = obj.py();
    let l = {
        let mut g = st.lock()?;
        if g.closing {
            return Ok(());
        }
        g.closing = true;
        let write = g.want_write;
        g.set_interest(obj, false, write)?;
        if !g.buffer.is_empty() {
            return Ok(()); // connection_lost follows the last datagram
        }
        g.conn_lost += 1;
        g.set_interest(obj, false, false)?;
        g.loop_ref(py)?
    };
    schedule_connection_lost(obj, &l, py.None().into_bound(py))
}

fn call_connection_lost(obj: &Bound<'_, PyAny>, st: &Dgram, exc: Bound<'_, PyAny>) -> PyResult<()> {
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
    let (sock, fd, l, protocol, buffer) = {
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
            g.protocol.take(),
            std::mem::take(&mut g.buffer),
        )
    };
    let closed = close_fd(py, sock, fd);
    drop((protocol, buffer, l));
    result.and(closed)
}

// -- methods -------------------------------------------------------------------------

fn m_sendto(obj: &Bound<'_, PyAny>, st: &Dgram, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [data, addr] = args.parse("sendto", ["data", "addr"], 1)?;
    let data = data.expect("required");
    if !(data.is_instance_of::<PyBytes>()
        || data.is_instance_of::<PyByteArray>()
        || data.is_instance_of::<PyMemoryView>())
    {
        return Err(PyTypeError::new_err(format!(
            "data argument must be a bytes-like object, not {}",
            data.get_type().name()?.repr()?
        )));
    }
    let buf = RawBuffer::get(&data, false)?;
    let (address, send_empty) = {
        let g = st.lock()?;
        (cl(py, &g.address), g.send_empty)
    };
    if buf.len() == 0 && !send_empty {
        return Ok(none(py));
    }
    let mut addr = addr.unwrap_or_else(|| py.None().into_bound(py));
    if let Some(address) = address {
        let address = address.into_bound(py);
        if !(addr.is_none() || addr.is(&address) || addr.eq(&address)?) {
            return Err(PyValueError::new_err(format!(
                "Invalid address: must be None or {}",
                address.str()?
            )));
        }
        addr = address;
    }
    let target = {
        let mut g = st.lock()?;
        if g.conn_lost > 0 {
            let warn = g.conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES;
            g.conn_lost += 1;
            drop(g);
            if warn {
                logger(py)?
                    .call_method1(intern!(py, "warning"), ("socket.send() raised exception.",))?;
            }
            return Ok(none(py));
        }
        g.buffer.is_empty().then(|| g.target(py))
    };
    if let Some(target) = target {
        match send_datagram(py, &target, &data, buf.as_slice(), &addr) {
            Sent::Done => return Ok(none(py)),
            Sent::WouldBlock => {
                let mut g = st.lock()?;
                let read = g.want_read;
                g.set_interest(obj, read, true)?;
            }
            Sent::Failed(e) => {
                socket_error(obj, st, e, WRITE_ERROR)?;
                return Ok(none(py));
            }
        }
    }
    // What waits must not change under us: a copy unless it already is a `bytes`.
    let bytes = match data.cast::<PyBytes>() {
        Ok(b) if b.is_exact_instance_of::<PyBytes>() => b.clone().unbind(),
        _ => PyBytes::new(py, buf.as_slice()).unbind(),
    };
    let len = buf.len();
    drop(buf);
    {
        let mut g = st.lock()?;
        g.buffer.push_back(Datagram {
            data: bytes,
            addr: addr.unbind(),
        });
        g.buffer_size += len + g.header;
    }
    transport::maybe_pause_protocol(obj, st)?;
    Ok(none(py))
}

fn m_close(obj: &Bound<'_, PyAny>, st: &Dgram, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("close")?;
    close(obj, st)?;
    Ok(none(obj.py()))
}

fn m_abort(obj: &Bound<'_, PyAny>, st: &Dgram, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("abort")?;
    force_close(obj, st, obj.py().None().into_bound(obj.py()))?;
    Ok(none(obj.py()))
}

fn m_force_close(obj: &Bound<'_, PyAny>, st: &Dgram, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [exc] = args.parse("_force_close", ["exc"], 1)?;
    force_close(obj, st, exc.expect("required"))?;
    Ok(none(obj.py()))
}

fn m_call_connection_lost(
    obj: &Bound<'_, PyAny>,
    st: &Dgram,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let [exc] = args.parse("_call_connection_lost", ["exc"], 1)?;
    call_connection_lost(obj, st, exc.expect("required"))?;
    Ok(none(obj.py()))
}

fn m_set_protocol(obj: &Bound<'_, PyAny>, st: &Dgram, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let [protocol] = args.parse("set_protocol", ["protocol"], 1)?;
    let old = {
        let mut g = st.lock()?;
        g.protocol_connected = true;
        g.protocol.replace(protocol.expect("required").unbind())
    };
    drop(old);
    Ok(none(obj.py()))
}

crate::native_method!(c_sendto, Dgram, m_sendto);
crate::native_method!(c_close, Dgram, m_close);
crate::native_method!(c_abort, Dgram, m_abort);
crate::native_method!(c_force_close, Dgram, m_force_close);
crate::native_method!(c_call_connection_lost, Dgram, m_call_connection_lost);
crate::native_method!(c_is_closing, Dgram, transport::m_is_closing::<Dgram>);
crate::native_method!(c_is_reading, Dgram, transport::m_is_reading::<Dgram>);
crate::native_method!(c_pause_reading, Dgram, transport::m_pause_reading::<Dgram>);
crate::native_method!(
    c_resume_reading,
    Dgram,
    transport::m_resume_reading::<Dgram>
);
crate::native_method!(c_start_reading, Dgram, transport::m_start_reading::<Dgram>);
crate::native_method!(c_set_protocol, Dgram, m_set_protocol);
crate::native_method!(c_get_protocol, Dgram, transport::m_get_protocol::<Dgram>);
crate::native_method!(
    c_get_extra_info,
    Dgram,
    transport::m_get_extra_info::<Dgram>
);
crate::native_method!(
    c_set_write_buffer_limits,
    Dgram,
    transport::m_set_write_buffer_limits::<Dgram>
);
crate::native_method!(
    c_get_write_buffer_limits,
    Dgram,
    transport::m_get_write_buffer_limits::<Dgram>
);
crate::native_method!(
    c_get_write_buffer_size,
    Dgram,
    transport::m_get_write_buffer_size::<Dgram>
);

fn datagram_transport_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    DATAGRAM_TRANSPORT
        .get_or_try_init(py, || {
            let transports = py.import("asyncio.transports")?;
            // Like the stdlib's (3.11 asserts `isinstance(tr, asyncio.Transport)`; 3.12+
            // adds DatagramTransport), an instance of both.
            let bases = [
                transports.getattr("Transport")?.cast_into::<PyType>()?,
                transports
                    .getattr("DatagramTransport")?
                    .cast_into::<PyType>()?,
            ];
            let methods = [
                MethodSpec {
                    name: c"sendto",
                    func: c_sendto,
                    doc: c"Send data to addr (None: the connected peer); what would block is buffered.",
                },
                MethodSpec {
                    name: c"close",
                    func: c_close,
                    doc: c"Close after flushing the buffer; connection_lost(None) follows.",
                },
                MethodSpec {
                    name: c"abort",
                    func: c_abort,
                    doc: c"Close at once, discarding buffered datagrams.",
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
                    doc: c"Stop calling the protocol with received datagrams.",
                },
                MethodSpec {
                    name: c"resume_reading",
                    func: c_resume_reading,
                    doc: c"Resume calling the protocol with received datagrams.",
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
                    doc: c"Optional transport information (peername, sockname, socket).",
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
                    doc: c"Payload bytes of the datagrams waiting to be sent.",
                },
            ];
            pytype::create_type_with_bases::<Dgram>(
                &bases,
                c"ferroloop._ferroloop.DatagramTransport",
                c"A UDP or Unix datagram socket transport, driven by the loop's Rust core.",
                &methods,
            )
        })
        .map(|t| t.bind(py))
}

/// `loop._make_datagram_transport(sock, protocol, address=None, waiter=None, extra=None)`.
pub fn new_datagram_transport<'py>(
    l: &Bound<'py, LoopCore>,
    sock: Bound<'py, PyAny>,
    protocol: Bound<'py, PyAny>,
    address: Option<Bound<'py, PyAny>>,
    waiter: Option<Bound<'py, PyAny>>,
    extra: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = l.py();
    let fd: RawFd = sock.call_method0(intern!(py, "fileno"))?.extract()?;
    if fd < 0 {
        return Err(PyValueError::new_err("socket is closed"));
    }
    let family: i32 = sock.getattr(intern!(py, "family"))?.extract()?;
    let extra_dict = crate::stream::eager_extra(&sock, extra.filter(|e| !e.is_none()).as_ref())?;
    let connected = match extra_dict.get_item("peername")? {
        Some(p) => p.is_truthy()?,
        None => false,
    };
    let mut truthy_address = None;
    if let Some(a) = address.filter(|a| !a.is_none()) {
        if a.is_truthy()? {
            truthy_address = Some(a.unbind());
        }
    }
    let state = Dgram {
        inner: Mutex::new(Inner {
            base: Base::new(fd, dispatch, l, &protocol, extra_dict),
            family,
            native_recv: matches!(family, libc::AF_INET | libc::AF_INET6 | libc::AF_UNIX),
            connected,
            address: truthy_address,
            send_empty: py.version_info() >= (3, 13),
            sock: Some(sock.unbind()),
            protocol_connected: true,
            buffer: VecDeque::new(),
            buffer_size: 0,
            header: if py.version_info() >= (3, 13) { 8 } else { 0 },
            last_peer: None,
        }),
    };
    let obj = pytype::new_instance(datagram_transport_type(py)?, state)?;
    let owner = obj.as_ptr() as usize;
    // SAFETY: `obj` was just created with a Dgram state.
    unsafe { pytype::state::<Dgram>(&obj) }?.lock()?.owner = owner;
    l.get().claim_fd(fd, owner);
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
