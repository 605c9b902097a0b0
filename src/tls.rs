//! TLS over any transport: the stdlib's `asyncio.sslproto.SSLProtocol` and its
//! application-side `_SSLProtocolTransport`, in Rust.
//!
//! Behaviour is the stdlib's (Python 3.11's `sslproto.py`), method for method: the same
//! state machine (UNWRAPPED → DO_HANDSHAKE → WRAPPED → FLUSHING → SHUTDOWN), the same
//! handshake and shutdown timeouts, the same flow control both ways, the same error
//! messages and debug log lines. The TLS work itself is still done by the stdlib's `ssl`
//! module: the user's `ssl.SSLContext` wraps two `ssl.MemoryBIO`s into an `SSLObject`,
//! exactly as the stdlib does, so SNI, ALPN, client certificates, session reuse and every
//! `get_extra_info` key behave as before.
//!
//! What differs is where it runs. `SSLObject`'s methods are Python wrappers around the C
//! `_ssl._SSLSocket`; when the context's `sslobject_class` is the stdlib's own, the
//! protocol calls the C object directly, so a record costs C calls and no Python frame.
//! Reading stops when neither the incoming BIO nor OpenSSL holds anything more instead of
//! reading until `SSLWantReadError` (the exception costs more than the record), and the
//! plaintext of one read batch lands in one buffer, handed to the application as one
//! `bytes` (or read straight into a `BufferedProtocol`'s buffer).
//!
//! Two objects, as in the stdlib: [`TlsProtocol`] (`SSLProtocol`), the protocol of the
//! underlying transport, holds all the state; the application transport (a native class
//! deriving from `asyncio.Transport`, see `pytype`) forwards to it. The state sits behind
//! a mutex that is never held while Python code runs (the application's callbacks call
//! back into both objects).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{
    PyAssertionError, PyAttributeError, PyConnectionResetError, PyException, PyNotImplementedError,
    PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PySlice, PyType};
use pyo3::{ffi, intern, PyTraverseError};

use crate::iobuf::{
    cl, is_exit, lock_state, logger, none, notify_flow_reporting, py_bool, warn_unclosed, NewBytes,
    RawBuffer,
};
use crate::pyhelpers::cached;
use crate::pytype::{self, Args, MethodSpec, NativeState, Visit};

/// Plaintext asked of one read batch before the buffer grows (the stdlib's `max_size`).
const MAX_SIZE: usize = 256 * 1024;

/// Bytes received from the socket per readable event (the stdlib's `SSLProtocol` buffer).
const RECV_SIZE: usize = 256 * 1024;

/// The most plaintext OpenSSL can hold decrypted beyond what a read returned: one record.
const MAX_RECORD_PLAINTEXT: usize = 16384;

/// The longest TLS record on the wire (TLS 1.2's limit, header included).
const ONE_RECORD: usize = 5 + 16384 + 2048;

thread_local! {
    /// The loop thread's receive buffer for TLS streams: one `recv`, handed to the
    /// incoming BIO (which copies it) before any Python code runs.
    static RECV: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Unwrapped,
    DoHandshake,
    Wrapped,
    Flushing,
    Shutdown,
}

impl State {
    /// `str()` of the stdlib's `SSLProtocolState` member.
    fn name(self) -> &'static str {
        match self {
            State::Unwrapped => "SSLProtocolState.UNWRAPPED",
            State::DoHandshake => "SSLProtocolState.DO_HANDSHAKE",
            State::Wrapped => "SSLProtocolState.WRAPPED",
            State::Flushing => "SSLProtocolState.FLUSHING",
            State::Shutdown => "SSLProtocolState.SHUTDOWN",
        }
    }

    fn value(self) -> &'static str {
        match self {
            State::Unwrapped => "UNWRAPPED",
            State::DoHandshake => "DO_HANDSHAKE",
            State::Wrapped => "WRAPPED",
            State::Flushing => "FLUSHING",
            State::Shutdown => "SHUTDOWN",
        }
    }
}

/// The application protocol's state: INIT -cm-> CON_MADE [-dr*->] [-er-> EOF?] -cl-> CON_LOST.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AppState {
    Init,
    ConMade,
    Eof,
    ConLost,
}

/// A pair of water marks: the values as given (returned by the getters) and as numbers.
struct Limits {
    high: f64,
    low: f64,
    high_obj: Py<PyAny>,
    low_obj: Py<PyAny>,
}

impl Limits {
    fn new(py: Python<'_>, high: i64) -> Self {
        let low = high / 4;
        Self {
            high: high as f64,
            low: low as f64,
            high_obj: high.into_pyobject(py).expect("int").into_any().unbind(),
            low_obj: low.into_pyobject(py).expect("int").into_any().unbind(),
        }
    }

    /// The stdlib's `add_flowcontrol_defaults(high, low, kb)` (its own code: defaults,
    /// validation and messages).
    fn set(
        &mut self,
        py: Python<'_>,
        high: Option<Bound<'_, PyAny>>,
        low: Option<Bound<'_, PyAny>>,
        kb: i64,
    ) -> PyResult<()> {
        static F: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let r = cached(py, &F, "asyncio.sslproto", "add_flowcontrol_defaults")?.call1((
            high.unwrap_or_else(|| py.None().into_bound(py)),
            low.unwrap_or_else(|| py.None().into_bound(py)),
            kb,
        ))?;
        let (h, l): (Bound<'_, PyAny>, Bound<'_, PyAny>) = r.extract()?;
        self.high = h.extract()?;
        self.low = l.extract()?;
        self.high_obj = h.unbind();
        self.low_obj = l.unbind();
        Ok(())
    }
}

/// Where the TLS records in the incoming byte stream end, so that a read that can only
/// raise `SSLWantReadError` (no complete record left, nothing decrypted) is not made.
///
/// OpenSSL reads a record's 5-byte header and then exactly its body from the incoming
/// BIO (Python never turns on read-ahead), so the bytes it has consumed are the bytes
/// fed minus `incoming.pending`; once that reaches the end of the last complete record,
/// only a partial record is left. A header that does not look like TLS (OpenSSL will
/// reject it) turns the tracking off: from then on every read is made.
struct Records {
    valid: bool,
    /// Bytes fed to the incoming BIO.
    fed: u64,
    /// Stream offset just past the last complete record.
    complete_end: u64,
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current record not fed yet.
    body_left: u64,
}

/// The largest record body TLS allows (2^14 + 2048, TLS 1.2's ciphertext limit).
const MAX_RECORD_BODY: u64 = 16384 + 2048;

impl Records {
    fn new() -> Self {
        Self {
            valid: true,
            fed: 0,
            complete_end: 0,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        if !self.valid {
            return;
        }
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = (data.len() as u64).min(self.body_left);
                self.body_left -= n;
                self.fed += n;
                data = &data[n as usize..];
                if self.body_left == 0 {
                    self.complete_end = self.fed;
                }
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            self.fed += n as u64;
            data = &data[n..];
            if self.header_len < 5 {
                break;
            }
            self.header_len = 0;
            let [kind, major, _, hi, lo] = self.header;
            let len = u64::from(u16::from_be_bytes([hi, lo]));
            if !(20..=24).contains(&kind) || major != 3 || len > MAX_RECORD_BODY {
                self.valid = false;
                return;
            }
            self.body_left = len;
            if len == 0 {
                self.complete_end = self.fed;
            }
        }
    }

    /// Whether the BIO may still hold a complete record, given what it has pending.
    fn complete_record_pending(&self, incoming_pending: usize) -> bool {
        if !self.valid {
            return incoming_pending > 0;
        }
        let consumed = self.fed.saturating_sub(incoming_pending as u64);
        consumed < self.complete_end
    }
}

/// What changes during the connection.
struct Inner {
    records: Records,
    /// Bytes fed to the incoming BIO, and how many of them OpenSSL had consumed when
    /// last asked (forgotten at every TLS call): `incoming.pending` without asking.
    fed: u64,
    consumed: Option<u64>,
    /// `consumed` when last known: OpenSSL has consumed at least this much, so
    /// `fed - consumed_floor` bounds `incoming.pending` from above without asking.
    consumed_floor: u64,
    /// A data argument had no buffer interface: `fed` is unknown, always ask.
    fed_unknown: bool,
    /// The last read filled the buffer it was given: OpenSSL may hold more plaintext.
    /// (A shorter read returned all it had decrypted: `SSL_pending()` is 0.)
    ssl_pending_maybe: bool,
    /// A TLS call was made since the outgoing BIO was last emptied.
    outgoing_dirty: bool,
    app_protocol: Option<Py<PyAny>>,
    app_is_buffer: bool,
    app_transport: Option<Py<PyAny>>,
    app_transport_created: bool,
    /// The underlying transport, from `connection_made` to `connection_lost`.
    transport: Option<Py<PyAny>>,
    waiter: Option<Py<PyAny>>,
    state: State,
    app_state: AppState,
    conn_lost: u32,
    write_backlog: VecDeque<Py<PyAny>>,
    write_buffer_size: isize,
    handshake_start_time: Option<f64>,
    handshake_timeout_handle: Option<Py<PyAny>>,
    shutdown_timeout_handle: Option<Py<PyAny>>,
    ssl_writing_paused: bool,
    app_reading_paused: bool,
    ssl_reading_paused: bool,
    eof_received: bool,
    app_writing_paused: bool,
    incoming_limits: Limits,
    outgoing_limits: Limits,
}

/// The stdlib's `SSLProtocol`: the protocol of the underlying transport.
#[pyclass(frozen, weakref, module = "ferroloop._ferroloop", name = "SSLProtocol")]
pub struct TlsProtocol {
    loop_: Py<PyAny>,
    sslcontext: Py<PyAny>,
    /// The `ssl.SSLObject` (`get_extra_info('ssl_object')`).
    sslobj: Py<PyAny>,
    /// What the TLS calls go to: the C `_ssl._SSLSocket` behind a stdlib `SSLObject`, or
    /// the `SSLObject` itself when it is a user subclass.
    raw: Py<PyAny>,
    /// `raw` is the C object (whose `unwrap` is called `shutdown`).
    raw_native: bool,
    incoming: Py<PyAny>,
    outgoing: Py<PyAny>,
    /// Bound C methods called per record: `incoming.write`, `outgoing.read`, and
    /// `raw.read`/`raw.write` when `raw` is the C object (a user `sslobject_class`'s
    /// methods are looked up at every call, as the stdlib does).
    incoming_write: Py<PyAny>,
    outgoing_read: Py<PyAny>,
    raw_read: Option<Py<PyAny>>,
    raw_write: Option<Py<PyAny>>,
    extra: Py<PyDict>,
    server_side: Py<PyAny>,
    server_hostname: Option<Py<PyAny>>,
    handshake_timeout: Py<PyAny>,
    shutdown_timeout: Py<PyAny>,
    inner: Mutex<Inner>,
}

// -- cached stdlib objects ------------------------------------------------------------

static WANT_READ: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SYSCALL_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SSL_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CERT_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CANCELLED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BUFFERED_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static APP_TRANSPORT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `SSLAgainErrors`: `(ssl.SSLWantReadError, ssl.SSLSyscallError)`.
fn is_again(py: Python<'_>, e: &PyErr) -> PyResult<bool> {
    Ok(
        e.is_instance(py, cached(py, &WANT_READ, "ssl", "SSLWantReadError")?)
            || e.is_instance(py, cached(py, &SYSCALL_ERROR, "ssl", "SSLSyscallError")?),
    )
}

fn is_ssl_error(py: Python<'_>, e: &PyErr) -> PyResult<bool> {
    Ok(e.is_instance(py, cached(py, &SSL_ERROR, "ssl", "SSLError")?))
}

fn constant<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("asyncio.constants")?.getattr(name)
}

/// Releases a memoryview over our own memory if anything kept a reference to it.
fn release_view(mv: Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: reading the reference count of a live object.
    if unsafe { ffi::Py_REFCNT(mv.as_ptr()) } > 1 {
        mv.call_method0(intern!(mv.py(), "release"))?;
    }
    Ok(())
}

/// A writable memoryview of `len` bytes at `ptr` (released by [`release_view`]).
fn mem_view(py: Python<'_>, ptr: *mut u8, len: usize) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: `ptr` points to `len` writable bytes that outlive the view's use.
    unsafe {
        let p = ffi::PyMemoryView_FromMemory(ptr.cast(), len as ffi::Py_ssize_t, ffi::PyBUF_WRITE);
        Bound::from_owned_ptr_or_err(py, p)
    }
}

fn set_state(g: &mut Inner, new: State) -> PyResult<()> {
    use State::*;
    let allowed = matches!(
        (g.state, new),
        (_, Unwrapped)
            | (Unwrapped, DoHandshake)
            | (DoHandshake, Wrapped)
            | (Wrapped, Flushing)
            | (Flushing, Shutdown)
    );
    if !allowed {
        return Err(PyRuntimeError::new_err(format!(
            "cannot switch state from {} to {}",
            g.state.name(),
            new.name()
        )));
    }
    g.state = new;
    Ok(())
}

impl TlsProtocol {
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        lock_state(&self.inner)
    }

    fn debug(&self, py: Python<'_>) -> PyResult<bool> {
        self.loop_
            .bind(py)
            .call_method0(intern!(py, "get_debug"))?
            .is_truthy()
    }

    /// `incoming.pending` (`_get_read_buffer_size`), known without asking when no TLS
    /// call was made since it was last asked.
    fn incoming_pending(&self, py: Python<'_>) -> PyResult<usize> {
        {
            let g = self.lock()?;
            if let (Some(c), false) = (g.consumed, g.fed_unknown) {
                return Ok((g.fed - c) as usize);
            }
        }
        let pending: usize = self
            .incoming
            .bind(py)
            .getattr(intern!(py, "pending"))?
            .extract()?;
        let mut g = self.lock()?;
        if !g.fed_unknown {
            let consumed = g.fed.saturating_sub(pending as u64);
            g.consumed = Some(consumed);
            g.consumed_floor = consumed;
        }
        Ok(pending)
    }

    /// An upper bound of `incoming.pending`, without asking: exact when no TLS call was
    /// made since it was last asked; None when unknown (data without a buffer interface).
    fn incoming_pending_bound(&self) -> PyResult<Option<usize>> {
        let g = self.lock()?;
        Ok((!g.fed_unknown).then(|| (g.fed - g.consumed.unwrap_or(g.consumed_floor)) as usize))
    }

    /// After any call into OpenSSL: it may have consumed incoming bytes and produced
    /// outgoing ones.
    fn tls_called(&self) -> PyResult<()> {
        let mut g = self.lock()?;
        g.consumed = None;
        g.outgoing_dirty = true;
        Ok(())
    }

    fn outgoing_pending(&self, py: Python<'_>) -> PyResult<usize> {
        self.outgoing
            .bind(py)
            .getattr(intern!(py, "pending"))?
            .extract()
    }

    /// Whether a read could return more: a complete record still in the incoming BIO,
    /// or decrypted bytes OpenSSL holds. When neither, a read can only raise
    /// `SSLWantReadError` (or return what it returned last: no close_notify is pending).
    fn more_available(&self, py: Python<'_>) -> PyResult<bool> {
        let pending = self.incoming_pending(py)?;
        let g = self.lock()?;
        Ok(g.records.complete_record_pending(pending) || g.ssl_pending_maybe)
    }

    /// [`more_available`], from the bound on `incoming.pending` when that says no (or
    /// says yes while a complete record arrived since OpenSSL last consumed any: a read
    /// is due then anyway, and almost never raises `SSLWantReadError`).
    ///
    /// [`more_available`]: TlsProtocol::more_available
    fn more_available_before_read(&self, py: Python<'_>) -> PyResult<bool> {
        {
            let g = self.lock()?;
            if g.ssl_pending_maybe {
                return Ok(true);
            }
            if !g.fed_unknown {
                let consumed = g.consumed.unwrap_or(g.consumed_floor);
                let bound = (g.fed - consumed) as usize;
                // OpenSSL has consumed at least `consumed`: no complete record is left
                // past it, or one is (exactly so when `consumed` is known).
                return Ok(g.records.complete_record_pending(bound));
            }
        }
        self.more_available(py)
    }

    /// One `read(len, buffer)` into `len` bytes at `ptr`; `None` on `SSLAgainErrors`.
    fn read_into(&self, py: Python<'_>, ptr: *mut u8, len: usize) -> PyResult<Option<usize>> {
        let mv = mem_view(py, ptr, len)?;
        let r = match &self.raw_read {
            Some(read) => read.bind(py).call1((len, &mv)),
            None => self
                .raw
                .bind(py)
                .call_method1(intern!(py, "read"), (len, &mv)),
        };
        release_view(mv)?;
        self.tls_called()?;
        let n = match r {
            Ok(n) => Some(n.extract::<usize>()?),
            Err(e) if is_again(py, &e)? => None,
            Err(e) => return Err(e),
        };
        self.lock()?.ssl_pending_maybe = n == Some(len);
        Ok(n)
    }

    /// One `read(len)` of the C object into a new `bytes` (trimmed by `_ssl`); `None` on
    /// `SSLAgainErrors`. Only when `raw` is the C object (`raw_read` is set).
    fn read_new<'py>(
        &self,
        py: Python<'py>,
        read: &Py<PyAny>,
        len: usize,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let r = read.bind(py).call1((len,));
        self.tls_called()?;
        let data = match r {
            Ok(d) => d.cast_into::<PyBytes>()?,
            Err(e) if is_again(py, &e)? => return Ok(None),
            Err(e) => return Err(e),
        };
        self.lock()?.ssl_pending_maybe = data.as_bytes().len() == len;
        Ok(Some(data))
    }

    fn app_protocol<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match cl(py, &self.lock()?.app_protocol) {
            Some(p) => Ok(p.into_bound(py)),
            None => Err(PyRuntimeError::new_err("SSL protocol has no app protocol")),
        }
    }
}

// -- the state machine ----------------------------------------------------------------

fn get_app_transport<'py>(slf: &Bound<'py, TlsProtocol>) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    let p = slf.get();
    {
        let g = p.lock()?;
        if let Some(t) = &g.app_transport {
            return Ok(t.bind(py).clone());
        }
        if g.app_transport_created {
            return Err(PyRuntimeError::new_err(
                "Creating _SSLProtocolTransport twice",
            ));
        }
    }
    let t = pytype::new_instance(
        app_transport_type(py)?,
        AppTransport {
            proto: AtomicPtr::new(slf.clone().unbind().into_ptr()),
            closed: AtomicBool::new(false),
        },
    )?;
    let mut g = p.lock()?;
    g.app_transport = Some(t.clone().unbind());
    g.app_transport_created = true;
    Ok(t)
}

fn mark_app_closed(t: &Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: a protocol's app transport is always an instance of the app transport type.
    unsafe { pytype::state::<AppTransport>(t) }?
        .closed
        .store(true, Ordering::Relaxed);
    Ok(())
}

fn set_app_protocol(p: &TlsProtocol, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = protocol.py();
    let is_buffer = protocol.hasattr(intern!(py, "get_buffer"))?
        && protocol.is_instance(cached(
            py,
            &BUFFERED_PROTOCOL,
            "asyncio.protocols",
            "BufferedProtocol",
        )?)?;
    let old = {
        let mut g = p.lock()?;
        g.app_is_buffer = is_buffer;
        g.app_protocol.replace(protocol.clone().unbind())
    };
    drop(old);
    Ok(())
}

fn wakeup_waiter(p: &TlsProtocol, py: Python<'_>, exc: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let Some(w) = p.lock()?.waiter.take() else {
        return Ok(());
    };
    let w = w.into_bound(py);
    if !w.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
        match exc {
            Some(e) => w.call_method1(intern!(py, "set_exception"), (e,))?,
            None => w.call_method1(intern!(py, "set_result"), (py.None(),))?,
        };
    }
    Ok(())
}

fn cancel_handle(py: Python<'_>, h: Option<Py<PyAny>>) -> PyResult<()> {
    if let Some(h) = h {
        h.bind(py).call_method0(intern!(py, "cancel"))?;
    }
    Ok(())
}

fn start_handshake(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let l = p.loop_.bind(py);
    let start = if p.debug(py)? {
        logger(py)?.call_method1(intern!(py, "debug"), ("%r starts SSL handshake", slf))?;
        Some(l.call_method0(intern!(py, "time"))?.extract::<f64>()?)
    } else {
        None
    };
    {
        let mut g = p.lock()?;
        g.handshake_start_time = start;
        set_state(&mut g, State::DoHandshake)?;
    }
    let cb = slf.getattr(intern!(py, "_check_handshake_timeout"))?;
    let h = l.call_method1(intern!(py, "call_later"), (&p.handshake_timeout, cb))?;
    let old = p.lock()?.handshake_timeout_handle.replace(h.unbind());
    drop(old);
    do_handshake(slf)
}

fn check_handshake_timeout(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    if p.lock()?.state != State::DoHandshake {
        return Ok(());
    }
    let msg = format!(
        "SSL handshake is taking longer than {} seconds: aborting the connection",
        p.handshake_timeout.bind(py).str()?
    );
    fatal_error(
        slf,
        pyo3::exceptions::PyConnectionAbortedError::new_err(msg),
        "Fatal error on transport",
    )
}

fn do_handshake(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let r = p.raw.bind(py).call_method0(intern!(py, "do_handshake"));
    p.tls_called()?;
    match r {
        Ok(_) => on_handshake_complete(slf, None),
        Err(e) if is_again(py, &e)? => process_outgoing(slf),
        Err(e) if is_ssl_error(py, &e)? => on_handshake_complete(slf, Some(e)),
        Err(e) => Err(e),
    }
}

fn on_handshake_complete(slf: &Bound<'_, TlsProtocol>, exc: Option<PyErr>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let h = p.lock()?.handshake_timeout_handle.take();
    cancel_handle(py, h)?;

    let sslobj = p.sslobj.bind(py);
    let peercert = (|| {
        match exc {
            None => set_state(&mut *p.lock()?, State::Wrapped)?,
            Some(e) => return Err(e),
        }
        sslobj.call_method0(intern!(py, "getpeercert"))
    })();
    let peercert = match peercert {
        Ok(c) => c,
        Err(e) if e.is_instance_of::<PyException>(py) => {
            set_state(&mut *p.lock()?, State::Unwrapped)?;
            let msg = if e.is_instance(py, cached(py, &CERT_ERROR, "ssl", "CertificateError")?) {
                "SSL handshake failed on verifying the certificate"
            } else {
                "SSL handshake failed"
            };
            let value = e.value(py).clone().into_any();
            fatal_error(slf, e, msg)?;
            return wakeup_waiter(p, py, Some(&value));
        }
        Err(e) => return Err(e),
    };

    if p.debug(py)? {
        let start = p.lock()?.handshake_start_time;
        if let Some(start) = start {
            let now: f64 = p
                .loop_
                .bind(py)
                .call_method0(intern!(py, "time"))?
                .extract()?;
            logger(py)?.call_method1(
                intern!(py, "debug"),
                ("%r: SSL handshake took %.1f ms", slf, (now - start) * 1e3),
            )?;
        }
    }

    let extra = p.extra.bind(py);
    extra.set_item("peercert", peercert)?;
    extra.set_item("cipher", sslobj.call_method0(intern!(py, "cipher"))?)?;
    extra.set_item(
        "compression",
        sslobj.call_method0(intern!(py, "compression"))?,
    )?;
    extra.set_item("ssl_object", sslobj)?;
    let app = {
        let mut g = p.lock()?;
        if g.app_state == AppState::Init {
            g.app_state = AppState::ConMade;
            cl(py, &g.app_protocol)
        } else {
            None
        }
    };
    if let Some(app) = app {
        let t = get_app_transport(slf)?;
        app.bind(py)
            .call_method1(intern!(py, "connection_made"), (t,))?;
    }
    wakeup_waiter(p, py, None)?;
    do_read(slf)
}

fn start_shutdown(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let (state, app_t) = {
        let g = p.lock()?;
        (g.state, cl(py, &g.app_transport))
    };
    if matches!(state, State::Flushing | State::Shutdown | State::Unwrapped) {
        return Ok(());
    }
    if let Some(t) = app_t {
        mark_app_closed(t.bind(py))?;
    }
    if state == State::DoHandshake {
        return abort(slf, None);
    }
    set_state(&mut *p.lock()?, State::Flushing)?;
    let cb = slf.getattr(intern!(py, "_check_shutdown_timeout"))?;
    let h = p
        .loop_
        .bind(py)
        .call_method1(intern!(py, "call_later"), (&p.shutdown_timeout, cb))?;
    let old = p.lock()?.shutdown_timeout_handle.replace(h.unbind());
    drop(old);
    do_flush(slf)
}

fn check_shutdown_timeout(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let t = {
        let g = p.lock()?;
        if !matches!(g.state, State::Flushing | State::Shutdown) {
            return Ok(());
        }
        cl(py, &g.transport)
    };
    static TIMEOUT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let exc = cached(py, &TIMEOUT, "asyncio.exceptions", "TimeoutError")?
        .call1(("SSL shutdown timed out",))?;
    if let Some(t) = t {
        t.bind(py)
            .call_method1(intern!(py, "_force_close"), (exc,))?;
    }
    Ok(())
}

fn do_flush(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    do_read(slf)?;
    set_state(&mut *slf.get().lock()?, State::Shutdown)?;
    do_shutdown(slf)
}

fn do_shutdown(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let eof = p.lock()?.eof_received;
    let r = if eof {
        Ok(())
    } else {
        let name = if p.raw_native {
            intern!(py, "shutdown")
        } else {
            intern!(py, "unwrap")
        };
        let r = p.raw.bind(py).call_method0(name).map(drop);
        p.tls_called()?;
        r
    };
    match r {
        Err(e) if is_again(py, &e)? => process_outgoing(slf),
        Err(e) if is_ssl_error(py, &e)? => on_shutdown_complete(slf, Some(e)),
        Err(e) => Err(e),
        Ok(()) => {
            process_outgoing(slf)?;
            call_eof_received(slf)?;
            on_shutdown_complete(slf, None)
        }
    }
}

fn on_shutdown_complete(slf: &Bound<'_, TlsProtocol>, exc: Option<PyErr>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let h = p.lock()?.shutdown_timeout_handle.take();
    cancel_handle(py, h)?;
    if let Some(e) = exc {
        return fatal_error(slf, e, "Fatal error on transport");
    }
    let t = cl(py, &p.lock()?.transport);
    if let Some(t) = t {
        let close = t.bind(py).getattr(intern!(py, "close"))?;
        p.loop_
            .bind(py)
            .call_method1(intern!(py, "call_soon"), (close,))?;
    }
    Ok(())
}

/// `_abort(exc)` (3.12's signature): the underlying transport is aborted, with `exc`
/// for its `connection_lost` when given.
fn abort(slf: &Bound<'_, TlsProtocol>, exc: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    let py = slf.py();
    let t = {
        let mut g = slf.get().lock()?;
        set_state(&mut g, State::Unwrapped)?;
        cl(py, &g.transport)
    };
    if let Some(t) = t {
        let t = t.bind(py);
        match exc.filter(|e| !e.is_none()) {
            None => t.call_method0(intern!(py, "abort"))?,
            Some(e) => t.call_method1(intern!(py, "_force_close"), (e,))?,
        };
    }
    Ok(())
}

// -- outgoing flow --------------------------------------------------------------------

fn write_appdata(slf: &Bound<'_, TlsProtocol>, items: &[Bound<'_, PyAny>]) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let state = p.lock()?.state;
    if matches!(state, State::Flushing | State::Shutdown | State::Unwrapped) {
        let warn = {
            let mut g = p.lock()?;
            let warn = g.conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES;
            g.conn_lost += 1;
            warn
        };
        if warn {
            logger(py)?.call_method1(intern!(py, "warning"), ("SSL connection is closed",))?;
        }
        return Ok(());
    }
    if let [d] = items {
        let n = d.len()? as isize;
        let mut g = p.lock()?;
        g.write_backlog.push_back(d.clone().unbind());
        g.write_buffer_size += n;
    } else {
        let lens = items
            .iter()
            .map(|d| d.len().map(|n| n as isize))
            .collect::<PyResult<Vec<_>>>()?;
        let mut g = p.lock()?;
        for (d, n) in items.iter().zip(&lens) {
            g.write_backlog.push_back(d.clone().unbind());
            g.write_buffer_size += n;
        }
    }
    if state != State::Wrapped {
        return Ok(());
    }
    match do_write(slf) {
        Err(e) if e.is_instance_of::<PyException>(py) => {
            fatal_error(slf, e, "Fatal error on SSL protocol")
        }
        r => r,
    }
}

const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;

fn do_write(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let raw = p.raw.bind(py);
    loop {
        let data = match p.lock()?.write_backlog.front() {
            Some(d) => d.clone_ref(py).into_bound(py),
            None => break,
        };
        let r = match &p.raw_write {
            Some(write) => write.bind(py).call1((&data,)),
            None => raw.call_method1(intern!(py, "write"), (&data,)),
        };
        p.tls_called()?;
        match r {
            Ok(count) => {
                let count: isize = count.extract()?;
                let len = data.len()? as isize;
                if count < len {
                    let rest = data.get_item(PySlice::new(py, count, isize::MAX, 1))?;
                    let old = {
                        let mut g = p.lock()?;
                        g.write_buffer_size -= count;
                        g.write_backlog
                            .front_mut()
                            .map(|f| std::mem::replace(f, rest.unbind()))
                    };
                    drop(old);
                } else {
                    let old = {
                        let mut g = p.lock()?;
                        g.write_buffer_size -= len;
                        g.write_backlog.pop_front()
                    };
                    drop(old);
                }
            }
            Err(e) if is_again(py, &e)? => break,
            Err(e) => return Err(e),
        }
    }
    process_outgoing(slf)
}

fn process_outgoing(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let (paused, dirty, t) = {
        let mut g = p.lock()?;
        let paused = g.ssl_writing_paused;
        let dirty = std::mem::replace(&mut g.outgoing_dirty, paused);
        (g.ssl_writing_paused, dirty, cl(py, &g.transport))
    };
    // Nothing can have reached the outgoing BIO since it was last emptied.
    if !paused && dirty {
        let data = p.outgoing_read.bind(py).call0()?;
        if data.len()? > 0 {
            if let Some(t) = t {
                t.bind(py).call_method1(intern!(py, "write"), (data,))?;
            }
        }
    }
    // Not paused, the BIO was just emptied.
    control_app_writing(slf, !paused)
}

fn control_app_writing(slf: &Bound<'_, TlsProtocol>, outgoing_empty: bool) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let pending = if outgoing_empty {
        0
    } else {
        p.outgoing_pending(py)?
    };
    let action = {
        let mut g = p.lock()?;
        let size = (pending as isize + g.write_buffer_size) as f64;
        let pause = if size >= g.outgoing_limits.high && !g.app_writing_paused {
            g.app_writing_paused = true;
            true
        } else if size <= g.outgoing_limits.low && g.app_writing_paused {
            g.app_writing_paused = false;
            false
        } else {
            return Ok(());
        };
        (pause, cl(py, &g.app_protocol), cl(py, &g.app_transport))
    };
    let (pause, Some(app), app_t) = action else {
        return Ok(());
    };
    let app_t = app_t.map_or_else(|| py.None().into_bound(py), |t| t.into_bound(py));
    notify_flow_reporting(app.bind(py), p.loop_.bind(py), &app_t, slf.as_any(), pause)
}

// -- incoming flow --------------------------------------------------------------------

fn do_read(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let (state, paused, buffered) = {
        let g = p.lock()?;
        (g.state, g.app_reading_paused, g.app_is_buffer)
    };
    if !matches!(state, State::Wrapped | State::Flushing) {
        return Ok(());
    }
    let r = (|| {
        if !paused {
            if buffered {
                do_read_buffered(slf)?;
            } else {
                do_read_copied(slf)?;
            }
            let backlog = !p.lock()?.write_backlog.is_empty();
            if backlog {
                do_write(slf)?;
            } else {
                process_outgoing(slf)?;
            }
        }
        control_ssl_reading(slf)
    })();
    match r {
        Err(e) if e.is_instance_of::<PyException>(py) => {
            fatal_error(slf, e, "Fatal error on SSL protocol")
        }
        r => r,
    }
}

/// Decrypts what is available into one `bytes`: `(plaintext, close_notify seen)`.
///
/// The `bytes` is sized from `incoming.pending` (plaintext is never longer than the
/// records it came in, TLS compression being off) and read into directly, then trimmed.
fn read_plaintext<'py>(
    p: &TlsProtocol,
    py: Python<'py>,
) -> PyResult<(Option<Bound<'py, PyBytes>>, bool)> {
    // Only a partial record: the read could only raise SSLWantReadError.
    if !p.more_available_before_read(py)? {
        return Ok((None, false));
    }
    let pending = match p.incoming_pending_bound()? {
        Some(n) => n,
        None => p.incoming_pending(py)?,
    };
    let held = if p.lock()?.ssl_pending_maybe {
        MAX_RECORD_PLAINTEXT
    } else {
        0
    };
    let cap = (pending + held).max(1024);
    let mut off = 0;
    let mut eof = false;
    let mut buf = match &p.raw_read {
        // At most one full record: most likely one record, whose plaintext `read(len)`
        // returns as it is.
        Some(read) if held == 0 && pending <= ONE_RECORD => match p.read_new(py, read, cap)? {
            None => return Ok((None, false)),
            Some(d) if d.as_bytes().is_empty() => return Ok((None, true)),
            Some(d) if !p.more_available(py)? => return Ok((Some(d), false)),
            Some(d) => {
                // More records: on in one buffer.
                let first = d.as_bytes();
                let held = if p.lock()?.ssl_pending_maybe {
                    MAX_RECORD_PLAINTEXT
                } else {
                    0
                };
                let rest = p.incoming_pending_bound()?.unwrap_or(MAX_SIZE) + held;
                let buf = NewBytes::new(py, (first.len() + rest).max(1024))?;
                // SAFETY: `buf` has room for `first`; distinct objects.
                unsafe {
                    std::ptr::copy_nonoverlapping(first.as_ptr(), buf.ptr(), first.len());
                }
                off = first.len();
                buf
            }
        },
        _ => NewBytes::new(py, cap)?,
    };
    loop {
        if off == buf.capacity() {
            let n = (buf.capacity() * 2).max(MAX_SIZE);
            buf.resize(py, n)?;
        }
        let avail = buf.capacity() - off;
        // SAFETY: `off < buf.len`.
        let ptr = unsafe { buf.ptr().add(off) };
        match p.read_into(py, ptr, avail)? {
            None => break,
            Some(0) => {
                eof = true;
                break;
            }
            Some(n) => {
                off += n;
                if !p.more_available(py)? {
                    break;
                }
            }
        }
    }
    let data = if off > 0 {
        Some(buf.finish(py, off)?)
    } else {
        None
    };
    Ok((data, eof))
}

fn do_read_copied(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let (data, eof) = read_plaintext(p, py)?;
    if let Some(data) = data {
        p.app_protocol(py)?
            .call_method1(intern!(py, "data_received"), (data,))?;
    }
    if eof {
        call_eof_received(slf)?;
        start_shutdown(slf)?;
    }
    Ok(())
}

fn do_read_buffered(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    // Only a partial record: the read could only raise SSLWantReadError (the stdlib
    // would ask the protocol for a buffer it then leaves untouched).
    if !p.more_available_before_read(py)? {
        return Ok(());
    }
    let app = p.app_protocol(py)?;
    let size = p.incoming_pending(py)?;
    let buf = app.call_method1(intern!(py, "get_buffer"), (size,))?;
    let mut view = RawBuffer::get(&buf, true)?;
    let wants = view.len();
    let ptr = view.as_mut_ptr();
    let mut offset = 0;
    let mut count = 1;
    if let Some(c) = p.read_into(py, ptr, wants)? {
        count = c;
        if c > 0 {
            offset = c;
            loop {
                if offset >= wants {
                    let cb = slf.getattr(intern!(py, "_do_read"))?;
                    p.loop_
                        .bind(py)
                        .call_method1(intern!(py, "call_soon"), (cb,))?;
                    break;
                }
                if !p.more_available(py)? {
                    break;
                }
                // SAFETY: `offset < wants`, the length of the exported buffer.
                let at = unsafe { ptr.add(offset) };
                match p.read_into(py, at, wants - offset)? {
                    None => break,
                    Some(c) => {
                        count = c;
                        if c == 0 {
                            break;
                        }
                        offset += c;
                    }
                }
            }
        }
    }
    drop(view);
    drop(buf);
    if offset > 0 {
        app.call_method1(intern!(py, "buffer_updated"), (offset,))?;
    }
    if count == 0 {
        call_eof_received(slf)?;
        start_shutdown(slf)?;
    }
    Ok(())
}

fn call_eof_received(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let app = {
        let mut g = p.lock()?;
        if g.app_state != AppState::ConMade {
            return Ok(());
        }
        g.app_state = AppState::Eof;
        cl(py, &g.app_protocol)
    };
    let Some(app) = app else {
        return Ok(());
    };
    let r = app
        .bind(py)
        .call_method0(intern!(py, "eof_received"))
        .and_then(|keep| {
            if keep.is_truthy()? {
                logger(py)?.call_method1(
                    intern!(py, "warning"),
                    ("returning true from eof_received() has no effect when using ssl",),
                )?;
            }
            Ok(())
        });
    match r {
        Err(e) if is_exit(py, &e) => Err(e),
        Err(e) => fatal_error(slf, e, "Error calling eof_received()"),
        Ok(()) => Ok(()),
    }
}

fn control_ssl_reading(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    // Not paused and `incoming.pending` cannot reach the high-water mark: nothing to do.
    if let Some(bound) = p.incoming_pending_bound()? {
        let g = p.lock()?;
        if !g.ssl_reading_paused && (bound as f64) < g.incoming_limits.high {
            return Ok(());
        }
    }
    let size = p.incoming_pending(py)? as f64;
    let (pause, t) = {
        let mut g = p.lock()?;
        let pause = if size >= g.incoming_limits.high && !g.ssl_reading_paused {
            g.ssl_reading_paused = true;
            true
        } else if size <= g.incoming_limits.low && g.ssl_reading_paused {
            g.ssl_reading_paused = false;
            false
        } else {
            return Ok(());
        };
        (pause, cl(py, &g.transport))
    };
    if let Some(t) = t {
        let method = if pause {
            intern!(py, "pause_reading")
        } else {
            intern!(py, "resume_reading")
        };
        t.bind(py).call_method0(method)?;
    }
    Ok(())
}

fn fatal_error(slf: &Bound<'_, TlsProtocol>, exc: PyErr, message: &str) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    let t = cl(py, &p.lock()?.transport);
    let value = exc.value(py);
    if let Some(t) = &t {
        t.bind(py)
            .call_method1(intern!(py, "_force_close"), (value,))?;
    }
    if exc.is_instance_of::<PyOSError>(py) {
        if p.debug(py)? {
            let kwargs = PyDict::new(py);
            kwargs.set_item("exc_info", value)?;
            logger(py)?.call_method(
                intern!(py, "debug"),
                ("%r: %s", slf, message),
                Some(&kwargs),
            )?;
        }
    } else if !exc.is_instance(
        py,
        cached(py, &CANCELLED, "asyncio.exceptions", "CancelledError")?,
    ) {
        let ctx = PyDict::new(py);
        ctx.set_item("message", message)?;
        ctx.set_item("exception", value)?;
        ctx.set_item("transport", t)?;
        ctx.set_item("protocol", slf)?;
        p.loop_
            .bind(py)
            .call_method1(intern!(py, "call_exception_handler"), (ctx,))?;
    }
    Ok(())
}

/// What the underlying transport's readable data goes through (`buffer_updated` in the
/// stdlib): into the incoming BIO, then on according to the state.
pub(crate) fn feed(slf: &Bound<'_, TlsProtocol>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let p = slf.get();
    p.incoming_write.bind(py).call1((data,))?;
    {
        let mut g = p.lock()?;
        let view;
        let bytes = match data.cast::<PyBytes>() {
            Ok(b) => Some(b.as_bytes()),
            Err(_) => match RawBuffer::get(data, false) {
                Ok(v) => {
                    view = v;
                    Some(view.as_slice())
                }
                Err(_) => None,
            },
        };
        match bytes {
            Some(b) => {
                g.fed += b.len() as u64;
                g.records.feed(b);
            }
            None => {
                g.fed_unknown = true;
                g.records.valid = false;
            }
        }
    }
    process_incoming(slf)
}

/// One `recv` from the stream transport's socket `fd`, fed to the protocol as [`feed`]
/// does, without a `bytes` in between: the incoming BIO copies the bytes straight out of
/// the loop thread's receive buffer. `Ok(None)` at end of stream; the inner result is
/// the protocol's (`buffer_updated` in the stdlib).
pub(crate) fn feed_from_fd(
    slf: &Bound<'_, TlsProtocol>,
    fd: RawFd,
) -> io::Result<Option<PyResult<()>>> {
    let py = slf.py();
    let p = slf.get();
    let recv = |buf: &mut Vec<u8>| -> io::Result<Option<PyResult<()>>> {
        if buf.len() < RECV_SIZE {
            buf.resize(RECV_SIZE, 0);
        }
        let n = crate::iobuf::read_into(fd, buf.as_mut_ptr(), buf.len(), true)?;
        if n == 0 {
            return Ok(None);
        }
        // The view lives for the call only (MemoryBIO.write copies what it is given).
        let r = mem_view(py, buf.as_mut_ptr(), n).and_then(|mv| {
            let r = p.incoming_write.bind(py).call1((&mv,));
            release_view(mv)?;
            r
        });
        let r = r.and_then(|_| {
            let mut g = p.lock()?;
            g.fed += n as u64;
            g.records.feed(&buf[..n]);
            Ok(())
        });
        Ok(Some(r))
    };
    let fed = RECV.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => recv(&mut buf),
        // Not reachable (no Python code runs while it is borrowed); a buffer of its own.
        Err(_) => recv(&mut Vec::new()),
    })?;
    Ok(fed.map(|r| r.and_then(|()| process_incoming(slf))))
}

/// After bytes reached the incoming BIO: on according to the state.
fn process_incoming(slf: &Bound<'_, TlsProtocol>) -> PyResult<()> {
    let state = slf.get().lock()?.state;
    match state {
        State::DoHandshake => do_handshake(slf),
        State::Wrapped => do_read(slf),
        State::Flushing => do_flush(slf),
        State::Shutdown => do_shutdown(slf),
        State::Unwrapped => Ok(()),
    }
}

// -- the protocol's Python face -------------------------------------------------------

#[pymethods]
impl TlsProtocol {
    #[new]
    #[pyo3(signature = (
        loop_, app_protocol, sslcontext, waiter, server_side=None, server_hostname=None,
        call_connection_made=true, ssl_handshake_timeout=None, ssl_shutdown_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        loop_: Bound<'_, PyAny>,
        app_protocol: Bound<'_, PyAny>,
        sslcontext: Option<Bound<'_, PyAny>>,
        waiter: Option<Bound<'_, PyAny>>,
        server_side: Option<Bound<'_, PyAny>>,
        server_hostname: Option<Bound<'_, PyAny>>,
        call_connection_made: bool,
        ssl_handshake_timeout: Option<Bound<'_, PyAny>>,
        ssl_shutdown_timeout: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let timeout = |t: Option<Bound<'_, PyAny>>, name: &str, default: &str| match t {
            None => Ok(constant(py, default)?.unbind()),
            Some(t) if t.le(0)? => Err(PyValueError::new_err(format!(
                "{name} should be a positive number, got {}",
                t.str()?
            ))),
            Some(t) => Ok(t.unbind()),
        };
        let handshake_timeout = timeout(
            ssl_handshake_timeout,
            "ssl_handshake_timeout",
            "SSL_HANDSHAKE_TIMEOUT",
        )?;
        let shutdown_timeout = timeout(
            ssl_shutdown_timeout,
            "ssl_shutdown_timeout",
            "SSL_SHUTDOWN_TIMEOUT",
        )?;
        let server_side = server_side
            .unwrap_or_else(|| pyo3::types::PyBool::new(py, false).to_owned().into_any());
        let server_hostname = server_hostname.filter(|h| !h.is_none());
        let sslcontext = match sslcontext {
            Some(c) if c.is_truthy()? => c,
            _ => py
                .import("asyncio.sslproto")?
                .getattr("_create_transport_context")?
                .call1((&server_side, &server_hostname))?,
        };
        let server_hostname = match server_hostname {
            Some(h) if h.is_truthy()? && !server_side.is_truthy()? => Some(h),
            _ => None,
        };
        let extra = PyDict::new(py);
        extra.set_item("sslcontext", &sslcontext)?;
        let ssl = py.import("ssl")?;
        let incoming = ssl.getattr("MemoryBIO")?.call0()?;
        let outgoing = ssl.getattr("MemoryBIO")?.call0()?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("server_side", &server_side)?;
        kwargs.set_item("server_hostname", &server_hostname)?;
        let sslobj = sslcontext.call_method("wrap_bio", (&incoming, &outgoing), Some(&kwargs))?;
        let raw_native = sslobj.get_type().is(&ssl.getattr("SSLObject")?);
        let raw = if raw_native {
            sslobj.getattr("_sslobj")?
        } else {
            sslobj.clone()
        };
        let incoming_write = incoming.getattr("write")?.unbind();
        let outgoing_read = outgoing.getattr("read")?.unbind();
        let (raw_read, raw_write) = if raw_native {
            (
                Some(raw.getattr("read")?.unbind()),
                Some(raw.getattr("write")?.unbind()),
            )
        } else {
            (None, None)
        };
        let read_kb: i64 = constant(py, "FLOW_CONTROL_HIGH_WATER_SSL_READ")?.extract()?;
        let write_kb: i64 = constant(py, "FLOW_CONTROL_HIGH_WATER_SSL_WRITE")?.extract()?;
        let this = Self {
            loop_: loop_.unbind(),
            sslcontext: sslcontext.unbind(),
            sslobj: sslobj.unbind(),
            raw: raw.unbind(),
            raw_native,
            incoming: incoming.unbind(),
            outgoing: outgoing.unbind(),
            incoming_write,
            outgoing_read,
            raw_read,
            raw_write,
            extra: extra.unbind(),
            server_side: server_side.unbind(),
            server_hostname: server_hostname.map(Bound::unbind),
            handshake_timeout,
            shutdown_timeout,
            inner: Mutex::new(Inner {
                records: Records::new(),
                fed: 0,
                consumed: None,
                consumed_floor: 0,
                fed_unknown: false,
                ssl_pending_maybe: false,
                outgoing_dirty: true,
                app_protocol: None,
                app_is_buffer: false,
                app_transport: None,
                app_transport_created: false,
                transport: None,
                waiter: waiter.filter(|w| !w.is_none()).map(Bound::unbind),
                state: State::Unwrapped,
                app_state: if call_connection_made {
                    AppState::Init
                } else {
                    AppState::ConMade
                },
                conn_lost: 0,
                write_backlog: VecDeque::new(),
                write_buffer_size: 0,
                handshake_start_time: None,
                handshake_timeout_handle: None,
                shutdown_timeout_handle: None,
                ssl_writing_paused: false,
                app_reading_paused: false,
                ssl_reading_paused: false,
                eof_received: false,
                app_writing_paused: false,
                incoming_limits: Limits::new(py, read_kb * 1024),
                outgoing_limits: Limits::new(py, write_kb * 1024),
            }),
        };
        set_app_protocol(&this, &app_protocol)?;
        Ok(this)
    }

    /// The underlying transport is connected: start the handshake.
    fn connection_made(slf: &Bound<'_, Self>, transport: Bound<'_, PyAny>) -> PyResult<()> {
        let old = slf.get().lock()?.transport.replace(transport.unbind());
        drop(old);
        start_handshake(slf)
    }

    /// The underlying connection is lost or closed.
    fn connection_lost(slf: &Bound<'_, Self>, exc: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let p = slf.get();
        let backlog = std::mem::take(&mut p.lock()?.write_backlog);
        drop(backlog);
        p.outgoing.bind(py).call_method0(intern!(py, "read"))?;
        let (app_t, lost) = {
            let mut g = p.lock()?;
            g.conn_lost += 1;
            let mut lost = None;
            if g.state != State::DoHandshake
                && matches!(g.app_state, AppState::ConMade | AppState::Eof)
            {
                g.app_state = AppState::ConLost;
                lost = cl(py, &g.app_protocol);
            }
            (cl(py, &g.app_transport), lost)
        };
        if let Some(t) = &app_t {
            mark_app_closed(t.bind(py))?;
        }
        if let Some(app) = lost {
            let cb = app.bind(py).getattr(intern!(py, "connection_lost"))?;
            p.loop_
                .bind(py)
                .call_method1(intern!(py, "call_soon"), (cb, &exc))?;
        }
        let dropped = {
            let mut g = p.lock()?;
            set_state(&mut g, State::Unwrapped)?;
            (
                g.transport.take(),
                g.app_transport.take(),
                g.app_protocol.take(),
            )
        };
        drop(dropped);
        drop(app_t);
        let exc = (!exc.is_none()).then_some(exc);
        wakeup_waiter(p, py, exc.as_ref())?;
        let handles = {
            let mut g = p.lock()?;
            (
                g.shutdown_timeout_handle.take(),
                g.handshake_timeout_handle.take(),
            )
        };
        cancel_handle(py, handles.0)?;
        cancel_handle(py, handles.1)
    }

    /// Received bytes of the underlying transport.
    fn data_received(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        feed(slf, data)
    }

    /// The other end half-closed the underlying stream.
    fn eof_received(slf: &Bound<'_, Self>) -> PyResult<Option<bool>> {
        let py = slf.py();
        let p = slf.get();
        let state = {
            let mut g = p.lock()?;
            g.eof_received = true;
            g.state
        };
        let r = (|| -> PyResult<Option<bool>> {
            if p.debug(py)? {
                logger(py)?.call_method1(intern!(py, "debug"), ("%r received EOF", slf))?;
            }
            match state {
                State::DoHandshake => {
                    on_handshake_complete(slf, Some(PyConnectionResetError::new_err(())))?
                }
                State::Wrapped => {
                    let paused = {
                        let mut g = p.lock()?;
                        set_state(&mut g, State::Flushing)?;
                        g.app_reading_paused
                    };
                    if paused {
                        return Ok(Some(true));
                    }
                    do_flush(slf)?;
                }
                State::Flushing => {
                    do_write(slf)?;
                    set_state(&mut *p.lock()?, State::Shutdown)?;
                    do_shutdown(slf)?;
                }
                State::Shutdown => do_shutdown(slf)?,
                State::Unwrapped => {}
            }
            Ok(None)
        })();
        match r {
            Err(e) if e.is_instance_of::<PyException>(py) => {
                let t = cl(py, &p.lock()?.transport);
                if let Some(t) = t {
                    t.bind(py).call_method0(intern!(py, "close"))?;
                }
                Err(e)
            }
            r => r,
        }
    }

    /// The underlying transport's buffer went over its high-water mark.
    fn pause_writing(&self) -> PyResult<()> {
        let mut g = self.lock()?;
        if g.ssl_writing_paused {
            return Err(PyAssertionError::new_err(()));
        }
        g.ssl_writing_paused = true;
        Ok(())
    }

    /// The underlying transport's buffer drained below its low-water mark.
    fn resume_writing(slf: &Bound<'_, Self>) -> PyResult<()> {
        {
            let mut g = slf.get().lock()?;
            if !g.ssl_writing_paused {
                return Err(PyAssertionError::new_err(()));
            }
            g.ssl_writing_paused = false;
        }
        process_outgoing(slf)
    }

    #[pyo3(signature = (name, default=None))]
    fn _get_extra_info(
        &self,
        py: Python<'_>,
        name: Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        extra_info(self, py, &name, default)
    }

    fn _get_app_transport(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        get_app_transport(slf).map(Bound::unbind)
    }

    fn _set_app_protocol(&self, app_protocol: Bound<'_, PyAny>) -> PyResult<()> {
        set_app_protocol(self, &app_protocol)
    }

    fn _start_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        start_shutdown(slf)
    }

    #[pyo3(signature = (exc=None))]
    fn _abort(slf: &Bound<'_, Self>, exc: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        abort(slf, exc)
    }

    fn _check_handshake_timeout(slf: &Bound<'_, Self>) -> PyResult<()> {
        check_handshake_timeout(slf)
    }

    fn _check_shutdown_timeout(slf: &Bound<'_, Self>) -> PyResult<()> {
        check_shutdown_timeout(slf)
    }

    fn _do_read(slf: &Bound<'_, Self>) -> PyResult<()> {
        do_read(slf)
    }

    /// What `resume_reading()` schedules: the read (or the shutdown step) it held up.
    fn _resume(slf: &Bound<'_, Self>) -> PyResult<()> {
        let state = slf.get().lock()?.state;
        match state {
            State::Wrapped => do_read(slf),
            State::Flushing => do_flush(slf),
            State::Shutdown => do_shutdown(slf),
            _ => Ok(()),
        }
    }

    #[getter]
    fn _app_transport(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(cl(py, &self.lock()?.app_transport))
    }

    #[getter]
    fn _app_protocol(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(cl(py, &self.lock()?.app_protocol))
    }

    #[getter]
    fn _transport(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(cl(py, &self.lock()?.transport))
    }

    #[getter]
    fn _sslobj(&self, py: Python<'_>) -> Py<PyAny> {
        self.sslobj.clone_ref(py)
    }

    #[getter]
    fn _sslcontext(&self, py: Python<'_>) -> Py<PyAny> {
        self.sslcontext.clone_ref(py)
    }

    #[getter]
    fn _server_side(&self, py: Python<'_>) -> Py<PyAny> {
        self.server_side.clone_ref(py)
    }

    #[getter]
    fn _server_hostname(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        cl(py, &self.server_hostname)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.loop_.clone_ref(py)
    }

    /// The state's name, as the stdlib's `SSLProtocolState` values.
    #[getter]
    fn _state_name(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.state.value())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.sslcontext)?;
        visit.call(&self.sslobj)?;
        visit.call(&self.raw)?;
        visit.call(&self.incoming)?;
        visit.call(&self.outgoing)?;
        visit.call(&self.incoming_write)?;
        visit.call(&self.outgoing_read)?;
        visit.call(&self.raw_read)?;
        visit.call(&self.raw_write)?;
        visit.call(&self.extra)?;
        visit.call(&self.server_side)?;
        visit.call(&self.server_hostname)?;
        visit.call(&self.handshake_timeout)?;
        visit.call(&self.shutdown_timeout)?;
        // A call in progress owns its lock; skipping it then only delays collection.
        if let Ok(g) = self.inner.try_lock() {
            for o in [
                &g.app_protocol,
                &g.app_transport,
                &g.transport,
                &g.waiter,
                &g.handshake_timeout_handle,
                &g.shutdown_timeout_handle,
            ] {
                visit.call(o)?;
            }
            for o in &g.write_backlog {
                visit.call(o)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let taken = match self.inner.try_lock() {
            Ok(mut g) => (
                g.app_protocol.take(),
                g.app_transport.take(),
                g.transport.take(),
                g.waiter.take(),
                g.handshake_timeout_handle.take(),
                g.shutdown_timeout_handle.take(),
                std::mem::take(&mut g.write_backlog),
            ),
            Err(_) => return,
        };
        drop(taken);
    }
}

fn extra_info(
    p: &TlsProtocol,
    py: Python<'_>,
    name: &Bound<'_, PyAny>,
    default: Option<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    if let Some(v) = p.extra.bind(py).get_item(name)? {
        return Ok(v.unbind());
    }
    let t = cl(py, &p.lock()?.transport);
    let default = default.unwrap_or_else(|| py.None());
    match t {
        Some(t) => Ok(t
            .bind(py)
            .call_method1(intern!(py, "get_extra_info"), (name, default))?
            .unbind()),
        None => Ok(default),
    }
}

// -- the application transport --------------------------------------------------------

/// The Rust state of the application-side transport (`_SSLProtocolTransport`).
pub struct AppTransport {
    /// The protocol (an owned reference), or null once `close()` was called a second
    /// time: the stdlib's transport forgets its protocol then, so a user's protocol that
    /// keeps the transport no longer keeps the TLS state (and the `SSLContext`) alive.
    /// Only changed with the interpreter attached; readers take their own reference.
    proto: AtomicPtr<ffi::PyObject>,
    closed: AtomicBool,
}

impl Drop for AppTransport {
    fn drop(&mut self) {
        let ptr = std::mem::replace(self.proto.get_mut(), std::ptr::null_mut());
        if !ptr.is_null() {
            // SAFETY: a non-null pointer is the reference this state owns. Only
            // `tp_dealloc` drops the state, with the thread attached; a `Bound` releases
            // its reference at once (no PyO3 attach, which fails during finalization).
            drop(unsafe { Bound::from_owned_ptr(Python::assume_attached(), ptr) });
        }
    }
}

impl NativeState for AppTransport {
    fn traverse(&self, visit: &Visit) -> c_int {
        // SAFETY: a non-null pointer is the reference this state owns.
        unsafe { visit.ptr(self.proto.load(Ordering::Acquire)) }
    }

    fn clear(&self, _py: Python<'_>) {}

    fn finalize(obj: &Bound<'_, PyAny>, state: &Self) {
        if !state.closed.swap(true, Ordering::Relaxed) {
            warn_unclosed(obj);
        }
    }

    fn repr(obj: &Bound<'_, PyAny>, _state: &Self) -> PyResult<String> {
        let name = obj.get_type().name()?;
        Ok(format!(
            "<ferroloop._ferroloop.{name} object at {:#x}>",
            obj.as_ptr() as usize
        ))
    }
}

impl AppTransport {
    /// The protocol, or the `AttributeError` the stdlib's transport raises once it has
    /// forgotten it.
    fn proto<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, TlsProtocol>> {
        self.proto_if_attached(py).ok_or_else(|| {
            PyAttributeError::new_err("'NoneType' object has no attribute '_ssl_protocol'")
        })
    }

    fn proto_if_attached<'py>(&self, py: Python<'py>) -> Option<Bound<'py, TlsProtocol>> {
        let ptr = self.proto.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a live reference owned by this state; it is only
        // released by `detach` or `Drop`, with the interpreter attached as here, so it
        // cannot go while we take our own reference.
        (!ptr.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, ptr).cast_into_unchecked() })
    }

    /// Forgets the protocol (the stdlib's second `close()`).
    fn detach(&self, py: Python<'_>) {
        let ptr = self.proto.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !ptr.is_null() {
            // SAFETY: the reference this state owned, now ours to release.
            drop(unsafe { Bound::from_owned_ptr(py, ptr) });
        }
    }
}

fn check_data(data: &Bound<'_, PyAny>) -> PyResult<()> {
    if data.is_instance_of::<PyBytes>()
        || data.is_instance_of::<PyByteArray>()
        || data.is_instance_of::<PyMemoryView>()
    {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!(
            "data: expecting a bytes-like instance, got {}",
            data.get_type().name()?
        )))
    }
}

fn t_write(obj: &Bound<'_, PyAny>, st: &AppTransport, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [data] = args.parse("write", ["data"], 1)?;
    let data = data.expect("required");
    check_data(&data)?;
    if data.is_truthy()? {
        write_appdata(&st.proto(py)?, std::slice::from_ref(&data))?;
    }
    Ok(none(py))
}

fn t_writelines(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [lines] = args.parse("writelines", ["list_of_data"], 1)?;
    let items = lines
        .expect("required")
        .try_iter()?
        .collect::<PyResult<Vec<_>>>()?;
    write_appdata(&st.proto(py)?, &items)?;
    Ok(none(py))
}

fn t_write_eof(
    _obj: &Bound<'_, PyAny>,
    _st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("write_eof")?;
    Err(PyNotImplementedError::new_err(()))
}

fn t_can_write_eof(
    obj: &Bound<'_, PyAny>,
    _st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("can_write_eof")?;
    Ok(py_bool(obj.py(), false))
}

fn t_get_extra_info(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [name, default] = args.parse("get_extra_info", ["name", "default"], 1)?;
    extra_info(
        st.proto(py)?.get(),
        py,
        &name.expect("required"),
        default.map(Bound::unbind),
    )
}

fn t_set_protocol(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [protocol] = args.parse("set_protocol", ["protocol"], 1)?;
    set_app_protocol(st.proto(py)?.get(), &protocol.expect("required"))?;
    Ok(none(py))
}

fn t_get_protocol(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("get_protocol")?;
    Ok(cl(py, &st.proto(py)?.get().lock()?.app_protocol).unwrap_or_else(|| none(py)))
}

fn t_is_closing(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    args.none("is_closing")?;
    Ok(py_bool(obj.py(), st.closed.load(Ordering::Relaxed)))
}

fn t_close(obj: &Bound<'_, PyAny>, st: &AppTransport, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("close")?;
    if !st.closed.swap(true, Ordering::Relaxed) {
        start_shutdown(&st.proto(py)?)?;
    } else {
        st.detach(py);
    }
    Ok(none(py))
}

fn t_abort(obj: &Bound<'_, PyAny>, st: &AppTransport, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("abort")?;
    st.closed.store(true, Ordering::Relaxed);
    if let Some(proto) = st.proto_if_attached(py) {
        abort(&proto, None)?;
    }
    Ok(none(py))
}

fn t_force_close(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [exc] = args.parse("_force_close", ["exc"], 1)?;
    st.closed.store(true, Ordering::Relaxed);
    abort(&st.proto(py)?, exc)?;
    Ok(none(py))
}

fn t_is_reading(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("is_reading")?;
    let paused = st.proto(py)?.get().lock()?.app_reading_paused;
    Ok(py_bool(py, !paused))
}

fn t_pause_reading(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("pause_reading")?;
    st.proto(py)?.get().lock()?.app_reading_paused = true;
    Ok(none(py))
}

fn t_resume_reading(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("resume_reading")?;
    let proto = st.proto(py)?;
    let was_paused = {
        let mut g = proto.get().lock()?;
        std::mem::replace(&mut g.app_reading_paused, false)
    };
    if was_paused {
        let cb = proto.getattr(intern!(py, "_resume"))?;
        proto
            .get()
            .loop_
            .bind(py)
            .call_method1(intern!(py, "call_soon"), (cb,))?;
    }
    Ok(none(py))
}

fn t_set_write_buffer_limits(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [high, low] = args.parse("set_write_buffer_limits", ["high", "low"], 0)?;
    let proto = st.proto(py)?;
    let kb: i64 = constant(py, "FLOW_CONTROL_HIGH_WATER_SSL_WRITE")?.extract()?;
    let mut limits = Limits::new(py, 0);
    limits.set(py, high, low, kb)?;
    let old = std::mem::replace(&mut proto.get().lock()?.outgoing_limits, limits);
    drop(old);
    control_app_writing(&proto, false)?;
    Ok(none(py))
}

fn t_get_write_buffer_limits(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("get_write_buffer_limits")?;
    let proto = st.proto(py)?;
    let g = proto.get().lock()?;
    let t = (
        g.outgoing_limits.low_obj.clone_ref(py),
        g.outgoing_limits.high_obj.clone_ref(py),
    );
    drop(g);
    Ok(t.into_pyobject(py)?.into_any().unbind())
}

fn t_get_write_buffer_size(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("get_write_buffer_size")?;
    let proto = st.proto(py)?;
    let p = proto.get();
    let size = p.outgoing_pending(py)? as isize + p.lock()?.write_buffer_size;
    Ok(size.into_pyobject(py)?.into_any().unbind())
}

fn t_set_read_buffer_limits(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [high, low] = args.parse("set_read_buffer_limits", ["high", "low"], 0)?;
    let proto = st.proto(py)?;
    let kb: i64 = constant(py, "FLOW_CONTROL_HIGH_WATER_SSL_READ")?.extract()?;
    let mut limits = Limits::new(py, 0);
    limits.set(py, high, low, kb)?;
    let old = std::mem::replace(&mut proto.get().lock()?.incoming_limits, limits);
    drop(old);
    control_ssl_reading(&proto)?;
    Ok(none(py))
}

fn t_get_read_buffer_limits(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("get_read_buffer_limits")?;
    let proto = st.proto(py)?;
    let g = proto.get().lock()?;
    let t = (
        g.incoming_limits.low_obj.clone_ref(py),
        g.incoming_limits.high_obj.clone_ref(py),
    );
    drop(g);
    Ok(t.into_pyobject(py)?.into_any().unbind())
}

fn t_get_read_buffer_size(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("get_read_buffer_size")?;
    let size = st.proto(py)?.get().incoming_pending(py)?;
    Ok(size.into_pyobject(py)?.into_any().unbind())
}

fn t_protocol_paused(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("_get_protocol_paused")?;
    let paused = st.proto(py)?.get().lock()?.app_writing_paused;
    Ok(py_bool(py, paused))
}

fn t_ssl_protocol(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("_get_ssl_protocol")?;
    Ok(st
        .proto_if_attached(py)
        .map_or_else(|| none(py), |p| p.into_any().unbind()))
}

fn t_closed(obj: &Bound<'_, PyAny>, st: &AppTransport, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    args.none("_get_closed")?;
    Ok(py_bool(obj.py(), st.closed.load(Ordering::Relaxed)))
}

fn t_loop(obj: &Bound<'_, PyAny>, st: &AppTransport, args: &Args<'_, '_>) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    args.none("_get_loop")?;
    Ok(st.proto(py)?.get().loop_.clone_ref(py))
}

fn t_append_write_backlog(
    obj: &Bound<'_, PyAny>,
    st: &AppTransport,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let [data] = args.parse("_test__append_write_backlog", ["data"], 1)?;
    let data = data.expect("required");
    let n = data.len()? as isize;
    let proto = st.proto(py)?;
    let mut g = proto.get().lock()?;
    g.write_backlog.push_back(data.unbind());
    g.write_buffer_size += n;
    Ok(none(py))
}

crate::native_method!(c_write, AppTransport, t_write);
crate::native_method!(c_writelines, AppTransport, t_writelines);
crate::native_method!(c_write_eof, AppTransport, t_write_eof);
crate::native_method!(c_can_write_eof, AppTransport, t_can_write_eof);
crate::native_method!(c_get_extra_info, AppTransport, t_get_extra_info);
crate::native_method!(c_set_protocol, AppTransport, t_set_protocol);
crate::native_method!(c_get_protocol, AppTransport, t_get_protocol);
crate::native_method!(c_is_closing, AppTransport, t_is_closing);
crate::native_method!(c_close, AppTransport, t_close);
crate::native_method!(c_abort, AppTransport, t_abort);
crate::native_method!(c_force_close, AppTransport, t_force_close);
crate::native_method!(c_is_reading, AppTransport, t_is_reading);
crate::native_method!(c_pause_reading, AppTransport, t_pause_reading);
crate::native_method!(c_resume_reading, AppTransport, t_resume_reading);
crate::native_method!(
    c_set_write_buffer_limits,
    AppTransport,
    t_set_write_buffer_limits
);
crate::native_method!(
    c_get_write_buffer_limits,
    AppTransport,
    t_get_write_buffer_limits
);
crate::native_method!(
    c_get_write_buffer_size,
    AppTransport,
    t_get_write_buffer_size
);
crate::native_method!(
    c_set_read_buffer_limits,
    AppTransport,
    t_set_read_buffer_limits
);
crate::native_method!(
    c_get_read_buffer_limits,
    AppTransport,
    t_get_read_buffer_limits
);
crate::native_method!(c_get_read_buffer_size, AppTransport, t_get_read_buffer_size);
crate::native_method!(c_protocol_paused, AppTransport, t_protocol_paused);
crate::native_method!(c_ssl_protocol, AppTransport, t_ssl_protocol);
crate::native_method!(c_closed, AppTransport, t_closed);
crate::native_method!(c_loop, AppTransport, t_loop);
crate::native_method!(c_append_write_backlog, AppTransport, t_append_write_backlog);

fn m(
    name: &'static std::ffi::CStr,
    func: ffi::PyCFunctionFastWithKeywords,
    doc: &'static std::ffi::CStr,
) -> MethodSpec {
    MethodSpec { name, func, doc }
}

fn app_transport_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    APP_TRANSPORT
        .get_or_try_init(py, || {
            let base = py
                .import("asyncio.transports")?
                .getattr("Transport")?
                .cast_into::<PyType>()?;
            let methods = [
                m(c"write", c_write as _, c"Encrypt and send data."),
                m(c"writelines", c_writelines as _, c"Encrypt and send each buffer of an iterable."),
                m(c"write_eof", c_write_eof as _, c"Not supported over TLS: raises NotImplementedError."),
                m(c"can_write_eof", c_can_write_eof as _, c"False: TLS has no half-close."),
                m(c"get_extra_info", c_get_extra_info as _, c"TLS information (peercert, cipher, ssl_object, ...), else the underlying transport's."),
                m(c"set_protocol", c_set_protocol as _, c"Replace the application protocol."),
                m(c"get_protocol", c_get_protocol as _, c"The application protocol."),
                m(c"is_closing", c_is_closing as _, c"True once the transport is closing or closed."),
                m(c"close", c_close as _, c"Flush, shut TLS down, then close the underlying transport."),
                m(c"abort", c_abort as _, c"Close the underlying transport at once, discarding buffered data."),
                m(c"_force_close", c_force_close as _, c"Abort with exc for connection_lost."),
                m(c"is_reading", c_is_reading as _, c"True unless reading is paused."),
                m(c"pause_reading", c_pause_reading as _, c"Stop calling the protocol with received data."),
                m(c"resume_reading", c_resume_reading as _, c"Resume calling the protocol with received data."),
                m(c"set_write_buffer_limits", c_set_write_buffer_limits as _, c"Set the high- and low-water marks of write flow control."),
                m(c"get_write_buffer_limits", c_get_write_buffer_limits as _, c"(low, high) water marks of write flow control."),
                m(c"get_write_buffer_size", c_get_write_buffer_size as _, c"Bytes waiting to be encrypted or sent."),
                m(c"set_read_buffer_limits", c_set_read_buffer_limits as _, c"Set the high- and low-water marks of read flow control."),
                m(c"get_read_buffer_limits", c_get_read_buffer_limits as _, c"(low, high) water marks of read flow control."),
                m(c"get_read_buffer_size", c_get_read_buffer_size as _, c"Bytes received and not decrypted yet."),
                m(c"_get_protocol_paused", c_protocol_paused as _, c"Whether the protocol was told to pause writing."),
                m(c"_get_ssl_protocol", c_ssl_protocol as _, c"The SSL protocol behind this transport."),
                m(c"_get_closed", c_closed as _, c"Whether close() or abort() was called."),
                m(c"_get_loop", c_loop as _, c"The event loop."),
                m(c"_test__append_write_backlog", c_append_write_backlog as _, c"For tests: queue data without writing it."),
            ];
            let ty = pytype::create_type::<AppTransport>(
                &base,
                c"ferroloop._ferroloop._SSLProtocolTransport",
                c"The application side of a TLS connection, driven by the loop's Rust core.",
                &methods,
            )?;
            let b = ty.bind(py);
            b.setattr("_start_tls_compatible", true)?;
            b.setattr(
                "_sendfile_compatible",
                py.import("asyncio.constants")?
                    .getattr("_SendfileMode")?
                    .getattr("FALLBACK")?,
            )?;
            let property = py.import("builtins")?.getattr("property")?;
            for (attr, getter) in [
                ("_protocol_paused", "_get_protocol_paused"),
                ("_ssl_protocol", "_get_ssl_protocol"),
                ("_closed", "_get_closed"),
                ("_loop", "_get_loop"),
            ] {
                b.setattr(attr, property.call1((b.getattr(getter)?,))?)?;
            }
            Ok::<_, PyErr>(ty)
        })
        .map(|t| t.bind(py))
}

/// Whether `obj` is a native TLS application transport.
pub fn is_tls_transport(obj: &Bound<'_, PyAny>) -> bool {
    APP_TRANSPORT
        .get(obj.py())
        .is_some_and(|t| obj.get_type().is(t.bind(obj.py())))
}
