//! What every fd-based transport shares: the write buffer, buffer-protocol views and
//! the read/write syscalls (`recv`/`sendmsg` for sockets, `read`/`writev` for pipes).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard, TryLockError};

use pyo3::exceptions::{
    PyKeyboardInterrupt, PyResourceWarning, PyRuntimeError, PySystemExit, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use pyo3::{ffi, intern};

use crate::event_loop::LoopCore;
use crate::pyhelpers::cached;
use crate::pytype::{Args, Visit};

/// Bytes asked of one `recv`/`read` (the stdlib's `max_size`).
pub(crate) const MAX_READ: usize = 256 * 1024;
/// Buffers handed to one `sendmsg`.
const MAX_IOV: usize = 64;

/// What the loop thread reads into, and the `bytes` it may refill.
struct ReadState {
    /// Data is copied out into a `bytes` of the exact size before any Python code runs,
    /// so one buffer serves every transport.
    buf: RefCell<Box<[u8]>>,
    /// A `bytes` handed to `data_received` (or `datagram_received`) that came back with no
    /// other reference (see [`recycle`]): an owned reference or NULL. Not dropped with the
    /// thread: the loop empties it when it stops running, with the GIL held
    /// ([`release_spare`]).
    spare: Cell<*mut ffi::PyObject>,
}

thread_local! {
    static READ: ReadState = ReadState {
        buf: RefCell::new(vec![0u8; MAX_READ].into_boxed_slice()),
        spare: Cell::new(std::ptr::null_mut()),
    };
}

/// Largest `bytes` kept for reuse by [`recycle`].
const SPARE_MAX: usize = 64 * 1024;

/// Keeps `data`, a `bytes` the loop read and a protocol has been given, to be refilled
/// by the next read of the same size, if nothing else references it any more.
///
/// A 1 KiB `bytes` is over glibc's per-thread cache limit (1,032 bytes): allocating and
/// freeing one per message cost about 580 of the 3,140 user-space instructions of a
/// 1 KiB protocol echo. Nothing can tell a refilled object from a new one: this is its
/// only reference (no one holds its contents or its address), and its cached hash is
/// reset when it is refilled.
pub(crate) fn recycle(data: Bound<'_, PyBytes>) {
    let n = data.as_bytes().len();
    // Under 2 bytes it may be one of CPython's shared singletons.
    if !(2..=SPARE_MAX).contains(&n)
        // SAFETY: a live object.
        || unsafe { ffi::Py_REFCNT(data.as_ptr()) } != 1
        || !data.is_exact_instance_of::<PyBytes>()
    {
        return;
    }
    READ.with(|r| {
        if r.spare.get().is_null() {
            r.spare.set(data.into_ptr());
        }
    });
}

/// Drops the kept `bytes` (called when the loop stops running).
pub(crate) fn release_spare(_py: Python<'_>) {
    let obj = READ.with(|r| r.spare.replace(std::ptr::null_mut()));
    // SAFETY: an owned reference or NULL; the GIL is held (`_py`).
    unsafe { ffi::Py_XDECREF(obj) };
}

/// `data` as a `bytes`: the kept one refilled if it has exactly this size, else new.
fn bytes_from<'py>(
    py: Python<'py>,
    spare: &Cell<*mut ffi::PyObject>,
    data: &[u8],
) -> Bound<'py, PyBytes> {
    let obj = spare.get();
    // SAFETY: a live `bytes` object (owned reference) when not NULL.
    if obj.is_null() || unsafe { ffi::Py_SIZE(obj) } as usize != data.len() {
        return PyBytes::new(py, data);
    }
    spare.set(std::ptr::null_mut());
    // SAFETY: `obj` is an exact `bytes` of `data.len()` (>= 2) bytes whose only reference
    // is ours ([`recycle`] checked; unreachable from Python since). Refilled, with its
    // cached hash cleared, it is a new `bytes` of `data`.
    unsafe {
        #[allow(deprecated)]
        {
            (*obj.cast::<ffi::PyBytesObject>()).ob_shash = -1;
        }
        let dst = ffi::PyBytes_AS_STRING(obj).cast_mut().cast::<u8>();
        std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        Bound::from_owned_ptr(py, obj).cast_into_unchecked()
    }
}

/// Part of the write buffer: a `bytes` kept by reference, or a copy of anything
/// mutable (a `bytearray` or `memoryview` the caller may change after `write`).
pub(crate) enum Chunk {
    Shared { bytes: Py<PyBytes>, start: usize },
    Owned { data: Vec<u8>, start: usize },
}

impl Chunk {
    fn remaining<'a>(&'a self, py: Python<'_>) -> &'a [u8] {
        match self {
            Chunk::Shared { bytes, start } => &bytes.as_bytes(py)[*start..],
            Chunk::Owned { data, start } => &data[*start..],
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Shared { start, .. } | Chunk::Owned { start, .. } => *start += n,
        }
    }
}

/// Bytes not yet written, in order.
#[derive(Default)]
pub(crate) struct WriteBuffer {
    chunks: VecDeque<Chunk>,
    size: usize,
}

impl WriteBuffer {
    /// Total bytes waiting.
    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Empties the buffer, handing the contents back to be dropped with no lock held.
    pub fn take(&mut self) -> WriteBuffer {
        std::mem::take(self)
    }

    /// Appends what is left of `items` (viewed as `bufs`) after the first `skip` bytes:
    /// a `bytes` by reference, anything mutable as a copy.
    pub fn push_rest(&mut self, items: &[Bound<'_, PyAny>], bufs: &[RawBuffer], mut skip: usize) {
        for (item, buf) in items.iter().zip(bufs) {
            let len = buf.len();
            if skip >= len {
                skip -= len;
                continue;
            }
            let chunk = match item.cast::<PyBytes>() {
                Ok(b) if b.is_exact_instance_of::<PyBytes>() => Chunk::Shared {
                    bytes: b.clone().unbind(),
                    start: skip,
                },
                _ => Chunk::Owned {
                    data: buf.as_slice()[skip..].to_vec(),
                    start: 0,
                },
            };
            self.size += len - skip;
            skip = 0;
            self.chunks.push_back(chunk);
        }
    }

    /// Writes as much as the fd takes in one vectored call.
    pub fn write_to(&self, py: Python<'_>, fd: RawFd, socket: bool) -> io::Result<usize> {
        let bufs: Vec<&[u8]> = self
            .chunks
            .iter()
            .take(MAX_IOV)
            .map(|c| c.remaining(py))
            .collect();
        write_vectored(fd, &bufs, socket)
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, py: Python<'_>, mut n: usize) {
        self.size -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let len = front.remaining(py).len();
            if n >= len {
                n -= len;
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    pub fn traverse(&self, visit: &Visit) -> c_int {
        for c in &self.chunks {
            if let Chunk::Shared { bytes, .. } = c {
                let r = visit.call(bytes);
                if r != 0 {
                    return r;
                }
            }
        }
        0
    }
}

/// A contiguous view of any buffer-protocol object (`PyBUF_SIMPLE`), released on drop.
pub(crate) struct RawBuffer {
    view: View,
}

enum View {
    /// An exact `bytes`, read in place: it is immutable, so a reference keeps the data
    /// valid without a buffer export (which costs an allocation and two calls per write).
    Bytes {
        obj: *mut ffi::PyObject,
        ptr: *mut u8,
        len: usize,
    },
    Exported(Box<ffi::Py_buffer>),
}

impl RawBuffer {
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let raw = obj.as_ptr();
        // SAFETY: `raw` is a live object.
        if !writable && unsafe { ffi::PyBytes_CheckExact(raw) } != 0 {
            // SAFETY: an exact bytes object's data and size are fixed for its lifetime,
            // which the new reference extends to ours.
            return Ok(unsafe {
                ffi::Py_INCREF(raw);
                Self {
                    view: View::Bytes {
                        obj: raw,
                        ptr: ffi::PyBytes_AS_STRING(raw).cast_mut().cast(),
                        len: ffi::Py_SIZE(raw) as usize,
                    },
                }
            });
        }
        // SAFETY: an all-zero Py_buffer is a valid out-parameter.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let flags = if writable {
            ffi::PyBUF_WRITABLE
        } else {
            ffi::PyBUF_SIMPLE
        };
        // SAFETY: `view` is a boxed, writable Py_buffer that outlives the export.
        if unsafe { ffi::PyObject_GetBuffer(raw, &mut *view, flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(Self {
            view: View::Exported(view),
        })
    }

    pub fn len(&self) -> usize {
        match &self.view {
            View::Bytes { len, .. } => *len,
            View::Exported(v) => v.len as usize,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        let len = self.len();
        if len == 0 {
            return &[];
        }
        // SAFETY: both views hold `len` contiguous bytes at the pointer, alive while
        // `self` holds its reference or export.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), len) }
    }

    fn as_ptr(&self) -> *mut u8 {
        match &self.view {
            View::Bytes { ptr, .. } => *ptr,
            View::Exported(v) => v.buf.cast(),
        }
    }

    /// The start of a writable view (one obtained with `writable`, never a `bytes`).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_ptr()
    }
}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        // SAFETY: releases the reference or export taken in `get`; buffers are only
        // handled on the loop thread with the interpreter attached.
        unsafe {
            match &mut self.view {
                View::Bytes { obj, .. } => ffi::Py_DECREF(*obj),
                View::Exported(v) => ffi::PyBuffer_Release(&mut **v),
            }
        }
    }
}

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static WARN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Looks up `warnings.warn` now: a transport left open until the interpreter exits
/// warns from its finalizer, when importing is no longer possible.
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    cached(py, &WARN, "warnings", "warn").map(drop)
}

pub(crate) fn logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    cached(py, &LOGGER, "asyncio.log", "logger")
}

/// Closes the transport's socket: through the socket object when there is one (so it
/// knows it is closed), else the bare fd.
pub(crate) fn close_fd(py: Python<'_>, sock: Option<Py<PyAny>>, fd: RawFd) -> PyResult<()> {
    match sock {
        Some(s) => s.bind(py).call_method0(intern!(py, "close")).map(drop),
        None if fd >= 0 => {
            // SAFETY: we own `fd` and nothing else refers to it any more.
            unsafe { libc::close(fd) };
            Ok(())
        }
        None => Ok(()),
    }
}

pub(crate) fn is_exit(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PySystemExit>(py) || e.is_instance_of::<PyKeyboardInterrupt>(py)
}

pub(crate) fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// Reads once from `fd` into the loop thread's buffer and returns the data as `bytes`
/// (empty at end of file).
pub(crate) fn read_bytes<'py>(
    py: Python<'py>,
    fd: RawFd,
    socket: bool,
) -> io::Result<Bound<'py, PyBytes>> {
    read_bytes_with(py, |buf| read_into(fd, buf.as_mut_ptr(), buf.len(), socket))
}

/// What `read` (one syscall into the loop thread's buffer, returning the length read)
/// brought, as `bytes`.
pub(crate) fn read_bytes_with<'py>(
    py: Python<'py>,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<Bound<'py, PyBytes>> {
    READ.with(|r| {
        let buf = &mut *r.buf.borrow_mut();
        read(buf).map(|n| bytes_from(py, &r.spare, &buf[..n]))
    })
}

/// Reads at and above this size are handed to the stdlib's streams the way `socket.recv`
/// hands them over (see [`read_bytes_sized`]).
const BIG_READ: usize = 64 * 1024;
/// After a read of at least this size (and under [`BIG_READ`]) the next one goes straight
/// into a new `bytes`; below it, copying out of the loop's buffer costs less than
/// allocating a block and shrinking it.
const DIRECT_MIN: usize = 4 * 1024;
/// The block a direct read allocates: under glibc's smallest mmap threshold (128 KiB), so
/// it always comes from the heap, never from an `mmap` of its own.
const DIRECT_CAP: usize = 120 * 1024;

/// [`read_bytes`], with the `bytes` allocated according to what the transport read last
/// (`last`, its size) and who reads it (`streams`: the stdlib's `StreamReaderProtocol`).
///
/// - After a mid-sized read (4–64 KiB) the data goes straight into a new block of
///   [`DIRECT_CAP`] bytes shrunk in place, as `socket.recv` does: one copy fewer
///   (a 10 KiB streams echo: 64,266 → 54,366 user-space instructions per request).
/// - After a big read ([`BIG_READ`] or more) it goes straight into a new block of
///   [`MAX_READ`] bytes shrunk in place, the block `socket.recv(256 KiB)` leaves for the
///   stdlib loop (a 100 KiB streams echo: 480,765 → 378,295 user-space instructions per
///   request, rloop 377,115; a 100 KiB protocol echo: 21.5 → 19.7 µs of server CPU).
/// - Otherwise it comes through the loop's buffer, in an exact copy: for a small read
///   the copy costs less than a block.
/// - Except that for the stdlib's streams a big read that came through the loop's buffer
///   is copied into a [`MAX_READ`] block shrunk in place too. `StreamReader.feed_data`
///   extends a `bytearray` with each chunk and `read(n)` slices it off again, so each
///   connection's buffer grows and shrinks by up to a message per round trip. Big
///   chunks in exact-size `bytes` made glibc's heap trim its top and grow it again over
///   and over with 100 connections of 100 KiB echoes: up to 24 page faults and 0.5 `brk`
///   calls per request. Shrinking a 256 KiB block leaves its free tail right after the
///   data, where the `bytearray` and the next read find room: 0.3 faults and 0.007 `brk`
///   calls per request, as the stdlib loop (server CPU per request 61.5 → 45.9 µs).
///   Direct reads into 120 KiB blocks brought the faults back (1.5 per request).
///
/// A read after a small one never gets a 256 KiB block: in a process whose glibc mmap
/// threshold has not grown past it (see [`big_block`]) that is an `mmap`, `mremap` and
/// `munmap` each time, which costs the stdlib loop 2 page faults per 1 KiB echo and
/// triples its CPU per request there.
pub(crate) fn read_bytes_sized<'py>(
    py: Python<'py>,
    fd: RawFd,
    socket: bool,
    last: usize,
    streams: bool,
) -> PyResult<io::Result<Bound<'py, PyBytes>>> {
    if (DIRECT_MIN..BIG_READ).contains(&last) {
        return read_fresh_bytes(py, fd, socket, NewBytes::new(py, DIRECT_CAP)?);
    }
    if last >= BIG_READ {
        return read_fresh_bytes(py, fd, socket, big_block(py)?);
    }
    READ.with(|r| {
        let buf = &mut *r.buf.borrow_mut();
        let n = match read_into(fd, buf.as_mut_ptr(), buf.len(), socket) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        if !streams || n < BIG_READ {
            return Ok(Ok(bytes_from(py, &r.spare, &buf[..n])));
        }
        let block = big_block(py)?;
        // SAFETY: the block has `MAX_READ` >= `n` writable bytes and is no one else's yet.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), block.ptr(), n) };
        block.finish(py, n).map(Ok)
    })
}

/// A new `bytes` of [`MAX_READ`] bytes, with glibc's allocator put where a long-running
/// process's is, once, before the first.
///
/// glibc serves a `malloc` above its mmap threshold (128 KiB in a new process) with an
/// `mmap` of its own, and raises the threshold only when such a block is freed whole. A
/// read block is shrunk to its data before it is freed, so it never raises it: in a
/// process that had not freed a big block yet, every big read was an `mmap`, a page
/// fault per 4 KiB read, an `mremap` and a `munmap`. Server CPU per request in such a
/// process: a 100 KiB protocol echo 100.3 µs, 18.6 once settled (the stdlib loop, whose
/// `recv(256 KiB)` does the same, 101.6); a 100 KiB streams echo 153 → 33.3 (rloop 53.3).
/// Freeing one 1 MiB block takes the thresholds to 1 MiB (mmap) and 2 MiB (heap
/// trimming), where any process that has freed a big block has them and where the
/// benchmarks put every loop. A threshold fixed by the user (`mallopt`,
/// `MALLOC_MMAP_THRESHOLD_`) does not move.
fn big_block(py: Python<'_>) -> PyResult<NewBytes> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static SETTLED: std::sync::Once = std::sync::Once::new();
        SETTLED.call_once(|| {
            // SAFETY: a block allocated and freed at once, never read or written.
            unsafe { libc::free(std::hint::black_box(libc::malloc(1 << 20))) }
        });
    }
    NewBytes::new(py, MAX_READ)
}

/// One read straight into `block`, shrunk to what came.
fn read_fresh_bytes<'py>(
    py: Python<'py>,
    fd: RawFd,
    socket: bool,
    block: NewBytes,
) -> PyResult<io::Result<Bound<'py, PyBytes>>> {
    match read_into(fd, block.ptr(), block.capacity(), socket) {
        Ok(n) => block.finish(py, n).map(Ok),
        Err(e) => Ok(Err(e)),
    }
}

extern "C" {
    // Part of CPython's C API (not of the limited API); pyo3-ffi keeps its binding private.
    fn _PyBytes_Resize(bytes: *mut *mut ffi::PyObject, newsize: ffi::Py_ssize_t) -> c_int;
}

/// A `bytes` object being filled: created uninitialised, private until [`finish`], freed
/// if dropped before. What `socket.recv` does: read into it, then shrink it in place.
///
/// [`finish`]: NewBytes::finish
pub(crate) struct NewBytes {
    obj: *mut ffi::PyObject,
    len: usize,
}

impl NewBytes {
    pub(crate) fn new(py: Python<'_>, len: usize) -> PyResult<Self> {
        let Ok(size) = ffi::Py_ssize_t::try_from(len) else {
            return Err(pyo3::exceptions::PyMemoryError::new_err(()));
        };
        // SAFETY: a new bytes object of `len` uninitialised bytes (filled before use).
        let obj = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        Ok(Self { obj, len })
    }

    /// How many bytes it holds now.
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }

    /// Where its bytes start.
    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: `obj` is a live bytes object that nothing else references.
        unsafe { ffi::PyBytes_AsString(self.obj).cast() }
    }

    /// Resizes in place (or moves, keeping the contents); `obj` has one reference.
    pub(crate) fn resize(&mut self, py: Python<'_>, len: usize) -> PyResult<()> {
        // SAFETY: `obj` is a bytes object with a single reference (ours); on failure it is
        // released and set to NULL.
        if unsafe { _PyBytes_Resize(&mut self.obj, len as ffi::Py_ssize_t) } != 0 {
            self.obj = std::ptr::null_mut();
            return Err(PyErr::fetch(py));
        }
        self.len = len;
        Ok(())
    }

    /// The first `len` bytes, as a `bytes` object.
    pub(crate) fn finish<'py>(
        mut self,
        py: Python<'py>,
        len: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if len != self.len {
            self.resize(py, len)?;
        }
        let obj = std::mem::replace(&mut self.obj, std::ptr::null_mut());
        // SAFETY: `obj` is an owned reference to a bytes object.
        Ok(unsafe { Bound::from_owned_ptr(py, obj).cast_into_unchecked() })
    }
}

impl Drop for NewBytes {
    fn drop(&mut self) {
        // SAFETY: the GIL is held wherever a `NewBytes` lives (it never leaves the
        // functions that create it); `obj` is owned or NULL.
        unsafe { ffi::Py_XDECREF(self.obj) };
    }
}

/// One `recv` (sockets) or `read` (pipes) into `len` bytes at `buf`.
pub(crate) fn read_into(fd: RawFd, buf: *mut u8, len: usize, socket: bool) -> io::Result<usize> {
    // SAFETY: `buf` points to `len` writable bytes.
    let n = unsafe {
        if socket {
            libc::recv(fd, buf.cast(), len, 0)
        } else {
            libc::read(fd, buf.cast(), len)
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `send`/`sendmsg` (sockets, with MSG_NOSIGNAL: a closed peer is EPIPE, never
/// SIGPIPE) or `write`/`writev` (pipes) of up to [`MAX_IOV`] buffers.
pub(crate) fn write_vectored(fd: RawFd, bufs: &[&[u8]], socket: bool) -> io::Result<usize> {
    let n = if bufs.len() == 1 {
        let b = bufs[0];
        // SAFETY: the slice is valid for its length.
        unsafe {
            if socket {
                libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL)
            } else {
                libc::write(fd, b.as_ptr().cast(), b.len())
            }
        }
    } else {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .take(MAX_IOV)
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        if socket {
            // SAFETY: an all-zero msghdr is valid; it points at `iov`, alive for the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut _;
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: `msg` describes live buffers.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: `iov` describes live buffers.
            unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as c_int) }
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `Option<Py<T>>::clone` with the interpreter's token.
pub(crate) fn cl<T>(py: Python<'_>, o: &Option<Py<T>>) -> Option<Py<T>> {
    o.as_ref().map(|x| x.clone_ref(py))
}

/// `None`, as a method result.
pub(crate) fn none(py: Python<'_>) -> Py<PyAny> {
    py.None()
}

/// A `bool` method result.
pub(crate) fn py_bool(py: Python<'_>, v: bool) -> Py<PyAny> {
    pyo3::types::PyBool::new(py, v)
        .to_owned()
        .into_any()
        .unbind()
}

/// Emits the stdlib's `ResourceWarning: unclosed transport <repr>` (from a finalizer).
pub(crate) fn warn_unclosed(obj: &Bound<'_, PyAny>) {
    let py = obj.py();
    let warned = obj.repr().and_then(|r| {
        let warn = cached(py, &WARN, "warnings", "warn")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("source", obj)?;
        warn.call(
            (
                format!("unclosed transport {r}"),
                py.get_type::<PyResourceWarning>(),
            ),
            Some(&kwargs),
        )
    });
    if let Err(e) = warned {
        e.write_unraisable(py, Some(obj));
    }
}

/// Default high-water mark of a write buffer (the stdlib's).
pub(crate) const DEFAULT_HIGH_WATER: i64 = 64 * 1024;

/// The stdlib's `_FlowControlMixin` state: the write buffer's water marks and whether
/// the protocol was told to pause.
pub(crate) struct FlowControl {
    high: i64,
    low: i64,
    paused: bool,
}

impl Default for FlowControl {
    fn default() -> Self {
        Self {
            high: DEFAULT_HIGH_WATER,
            low: DEFAULT_HIGH_WATER / 4,
            paused: false,
        }
    }
}

impl FlowControl {
    /// True (and now paused) if a buffer of `size` bytes must pause the protocol.
    pub fn pause_needed(&mut self, size: usize) -> bool {
        if size as i64 <= self.high || self.paused {
            return false;
        }
        self.paused = true;
        true
    }

    /// True (and no longer paused) if a buffer of `size` bytes lets the protocol resume.
    pub fn resume_needed(&mut self, size: usize) -> bool {
        if !(self.paused && size as i64 <= self.low) {
            return false;
        }
        self.paused = false;
        true
    }

    /// `(low, high)`, as `get_write_buffer_limits` returns them.
    pub fn limits(&self) -> (i64, i64) {
        (self.low, self.high)
    }

    /// `set_write_buffer_limits(high=None, low=None)`'s defaults and validation.
    pub fn set_limits(&mut self, args: &Args<'_, '_>) -> PyResult<()> {
        let [high, low] = args.parse("set_write_buffer_limits", ["high", "low"], 0)?;
        let int = |v: Option<Bound<'_, PyAny>>| -> PyResult<Option<i64>> {
            v.filter(|v| !v.is_none()).map(|v| v.extract()).transpose()
        };
        let (high, low) = (int(high)?, int(low)?);
        let high = high.unwrap_or(match low {
            None => DEFAULT_HIGH_WATER,
            Some(l) => 4 * l,
        });
        let low = low.unwrap_or(high.div_euclid(4));
        if !(high >= low && low >= 0) {
            return Err(PyValueError::new_err(format!(
                "high ({high}) must be >= low ({low}) must be >= 0"
            )));
        }
        self.high = high;
        self.low = low;
        Ok(())
    }
}

/// Calls the protocol's `pause_writing()` (`pause`) or `resume_writing()`; an exception
/// other than an exit goes to the loop's exception handler, as in the stdlib.
pub(crate) fn notify_flow(
    obj: &Bound<'_, PyAny>,
    l: &Bound<'_, LoopCore>,
    protocol: &Bound<'_, PyAny>,
    pause: bool,
) -> PyResult<()> {
    notify_flow_reporting(protocol, l.as_any(), obj, protocol, pause)
}

/// [`notify_flow`] calling `callee`'s method and naming `transport` and `protocol` in
/// the error report (a TLS layer reports itself, not the application protocol it calls).
pub(crate) fn notify_flow_reporting(
    callee: &Bound<'_, PyAny>,
    l: &Bound<'_, PyAny>,
    transport: &Bound<'_, PyAny>,
    protocol: &Bound<'_, PyAny>,
    pause: bool,
) -> PyResult<()> {
    let py = callee.py();
    let (method, message) = if pause {
        (
            intern!(py, "pause_writing"),
            "protocol.pause_writing() failed",
        )
    } else {
        (
            intern!(py, "resume_writing"),
            "protocol.resume_writing() failed",
        )
    };
    match callee.call_method0(method) {
        Ok(_) => Ok(()),
        Err(e) if is_exit(py, &e) => Err(e),
        Err(e) => {
            let ctx = PyDict::new(py);
            ctx.set_item("message", message)?;
            ctx.set_item("exception", e)?;
            ctx.set_item("transport", transport)?;
            ctx.set_item("protocol", protocol)?;
            l.call_method1(intern!(py, "call_exception_handler"), (ctx,))
                .map(drop)
        }
    }
}

/// Locks a transport's state. All access happens on the loop thread with the
/// interpreter attached, so a busy lock can only mean re-entry from a Python callback
/// during an update: that becomes an error instead of a deadlock.
pub(crate) fn lock_state<T>(m: &Mutex<T>) -> PyResult<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
        Err(TryLockError::WouldBlock) => Err(PyRuntimeError::new_err(
            "transport re-entered while it was updating its state",
        )),
    }
}

/// Queues `transport._call_connection_lost(exc)` for the next iteration.
pub(crate) fn schedule_connection_lost(
    obj: &Bound<'_, PyAny>,
    l: &Bound<'_, LoopCore>,
    exc: Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = obj.py();
    let cb = obj.getattr(intern!(py, "_call_connection_lost"))?;
    LoopCore::soon(l, cb, PyTuple::new(py, [exc])?)
}

/// A transport's `_fatal_error` reporting: an expected OS error (`quiet`) is only
/// logged in debug mode; anything else goes to the loop's exception handler with the
/// transport and its protocol.
pub(crate) fn report_fatal(
    obj: &Bound<'_, PyAny>,
    l: &Bound<'_, LoopCore>,
    protocol: Option<Py<PyAny>>,
    exc: &PyErr,
    message: &str,
    quiet: bool,
) -> PyResult<()> {
    let py = obj.py();
    if quiet {
        if l.get().debug_enabled() {
            let kwargs = PyDict::new(py);
            kwargs.set_item("exc_info", exc.value(py))?;
            logger(py)?.call_method(
                intern!(py, "debug"),
                ("%r: %s", obj, message),
                Some(&kwargs),
            )?;
        }
        return Ok(());
    }
    let ctx = PyDict::new(py);
    ctx.set_item("message", message)?;
    ctx.set_item("exception", exc.value(py))?;
    ctx.set_item("transport", obj)?;
    ctx.set_item("protocol", protocol)?;
    l.call_method1(intern!(py, "call_exception_handler"), (ctx,))
        .map(drop)
}

/// `get_extra_info(name, default=None)` over a transport's extra dict.
pub(crate) fn extra_info(
    py: Python<'_>,
    extra: Option<Py<PyDict>>,
    args: &Args<'_, '_>,
) -> PyResult<Py<PyAny>> {
    let [name, default] = args.parse("get_extra_info", ["name", "default"], 1)?;
    let default = default.map_or_else(|| none(py), Bound::unbind);
    match extra {
        Some(d) => Ok(d
            .bind(py)
            .get_item(name.expect("required"))?
            .map_or(default, Bound::unbind)),
        None => Ok(default),
    }
}
