//! `loop.sock_recv`, `sock_recv_into` and `sock_sendall` in Rust.
//!
//! The stdlib writes them as coroutines that try the syscall, and only when it would
//! block arm a reader (or writer) callback that retries it and settles a future. Here
//! the call returns a [`SockOp`]: a coroutine-like object (it has `__await__`, `send`,
//! `throw` and `close`, so `asyncio.iscoroutine` accepts it and `create_task` runs it)
//! that makes the first attempt when first stepped, as the stdlib's coroutine does, and
//! otherwise registers *itself* as the fd's native waiter: the reactor dispatches it
//! straight from the ready queue, with no Handle, done-callback or Python frame.
//!
//! The observable protocol is the stdlib's: the attempt happens when the awaiting task
//! first runs, the waiter occupies the fd's reader/writer slot (a later `add_reader`
//! replaces it and `remove_reader` removes it, leaving the call waiting, as there), a
//! transport-owned fd is refused with the same RuntimeError, and cancellation leaves
//! the data in the socket. Only exact `socket.socket` objects outside debug mode take
//! this path; anything else (an SSL socket, a wrapper, a subclass that may override
//! `recv`) goes to the Python implementation, which calls the object's own methods.

use std::os::fd::RawFd;
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyInt, PyTuple, PyType};
use pyo3::{intern, PyTraverseError, PyVisit};

use crate::errors::os_error;
use crate::event_loop::LoopCore;
use crate::iobuf::{lock_state, would_block, NewBytes, RawBuffer};
use crate::pyhelpers::cached;
use crate::reactor::Waiter;
use crate::sockaddr::SockAddr;

/// A buffer export held across a wait.
struct Held(RawBuffer);

// SAFETY: a `SockOp` is only touched with the interpreter attached (its methods and the
// loop's dispatch), and its buffer only inside the op's mutex.
unsafe impl Send for Held {}

/// What the call does once the socket is ready. Arguments are validated at the first
/// attempt, as the socket method would validate them.
enum Op {
    /// `sock_recv(sock, n)`, or with `from`, `sock_recvfrom(sock, n)`.
    Recv {
        n: Py<PyAny>,
        max: usize,
        from: bool,
    },
    /// `sock_recv_into(sock, buf)`, or with `from`, `sock_recvfrom_into(sock, buf,
    /// nbytes)` (`nbytes` 0: the whole buffer).
    RecvInto {
        buf: Py<PyAny>,
        nbytes: Option<Py<PyAny>>,
        view: Option<Held>,
        len: usize,
        from: bool,
    },
    /// `sock_sendall(sock, data)`: `pos` bytes of `view` are sent.
    SendAll {
        data: Py<PyAny>,
        view: Option<Held>,
        pos: usize,
    },
    /// `sock_sendto(sock, data, address)`; `to` is None for an address only the socket
    /// object can convert (a host name, say), which then does the sending.
    SendTo {
        data: Py<PyAny>,
        address: Py<PyAny>,
        view: Option<Held>,
        to: Option<SockAddr>,
    },
}

enum Stage {
    /// Created, not yet stepped.
    Start,
    /// Waiting for readiness (or, once it is done, for the task to collect) `fut`.
    Waiting(Py<PyAny>),
    /// Returned or raised.
    Done,
}

struct State {
    op: Op,
    stage: Stage,
    /// `sock.fileno()` at the first attempt.
    fd: RawFd,
}

/// One pending `sock_*` call; see the module docs.
#[pyclass(frozen, weakref, module = "ferroloop._ferroloop", name = "SockOp")]
pub struct SockOp {
    loop_: Py<LoopCore>,
    sock: Py<PyAny>,
    name: &'static str,
    state: Mutex<State>,
}

/// The result of one attempt.
enum Attempt {
    Finished(Py<PyAny>),
    Again,
}

/// `socket.socket`, the only type whose `recv`/`send` we may bypass.
fn socket_type(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static T: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    cached(py, &T, "socket", "socket")
}

/// The `sock_*` methods implemented here.
#[derive(Clone, Copy)]
pub(crate) enum Call {
    /// `sock_recv(sock, n)`.
    Recv,
    /// `sock_recv_into(sock, buf)`.
    RecvInto,
    /// `sock_sendall(sock, data)`.
    SendAll,
    /// `sock_recvfrom(sock, bufsize)`.
    RecvFrom,
    /// `sock_recvfrom_into(sock, buf, nbytes=0)`.
    RecvFromInto,
    /// `sock_sendto(sock, data, address)`.
    SendTo,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Recv => "sock_recv",
            Call::RecvInto => "sock_recv_into",
            Call::SendAll => "sock_sendall",
            Call::RecvFrom => "sock_recvfrom",
            Call::RecvFromInto => "sock_recvfrom_into",
            Call::SendTo => "sock_sendto",
        }
    }

    /// The Python implementation (`_sock.py`) for sockets this module must not bypass.
    fn fallback(self, py: Python<'_>) -> &Bound<'_, pyo3::types::PyString> {
        match self {
            Call::Recv => intern!(py, "_sock_recv_py"),
            Call::RecvInto => intern!(py, "_sock_recv_into_py"),
            Call::SendAll => intern!(py, "_sock_sendall_py"),
            Call::RecvFrom => intern!(py, "_sock_recvfrom_py"),
            Call::RecvFromInto => intern!(py, "_sock_recvfrom_into_py"),
            Call::SendTo => intern!(py, "_sock_sendto_py"),
        }
    }

    fn op(self, arg: Py<PyAny>, extra: Option<Py<PyAny>>) -> Op {
        match self {
            Call::Recv | Call::RecvFrom => Op::Recv {
                n: arg,
                max: 0,
                from: matches!(self, Call::RecvFrom),
            },
            Call::RecvInto | Call::RecvFromInto => Op::RecvInto {
                buf: arg,
                nbytes: extra,
                view: None,
                len: 0,
                from: matches!(self, Call::RecvFromInto),
            },
            Call::SendAll => Op::SendAll {
                data: arg,
                view: None,
                pos: 0,
            },
            Call::SendTo => Op::SendTo {
                data: arg,
                address: extra.expect("sock_sendto passes an address"),
                view: None,
                to: None,
            },
        }
    }
}

/// `loop.<call>(sock, arg[, extra])`: a [`SockOp`], or the Python implementation's
/// coroutine.
pub(crate) fn sock_call<'py>(
    lp: &Bound<'py, LoopCore>,
    call: Call,
    sock: Bound<'py, PyAny>,
    arg: Bound<'py, PyAny>,
    extra: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    if lp.get().debug_enabled() || !sock.get_type().is(socket_type(py)?.cast::<PyType>()?) {
        return match extra {
            Some(x) => lp.call_method1(call.fallback(py), (sock, arg, x)),
            None => lp.call_method1(call.fallback(py), (sock, arg)),
        };
    }
    let op = call.op(arg.unbind(), extra.map(Bound::unbind));
    SockOp::start(lp, sock, call.name(), op)
}

impl Op {
    fn writes(&self) -> bool {
        matches!(self, Op::SendAll { .. } | Op::SendTo { .. })
    }

    /// Validates the arguments as the socket method would, just before the first try.
    fn prepare(&mut self, py: Python<'_>, fd: RawFd) -> PyResult<()> {
        match self {
            Op::Recv { n, max, from } => {
                let n: isize = n.bind(py).extract()?;
                if n < 0 {
                    let method = if *from { "recvfrom" } else { "recv" };
                    return Err(PyValueError::new_err(format!(
                        "negative buffersize in {method}"
                    )));
                }
                *max = n as usize;
            }
            Op::RecvInto {
                buf,
                nbytes,
                view,
                len,
                from,
            } => {
                let method = if *from { "recvfrom_into" } else { "recv_into" };
                let buf = buf.bind(py);
                // 0 (or absent) means the whole buffer, counted as len() counts it.
                let asked: isize = match nbytes {
                    Some(n) if n.bind(py).is_truthy()? => n.bind(py).extract()?,
                    _ => buf.len()? as isize,
                };
                let exported = RawBuffer::get(buf, true).map_err(|_| {
                    // What the socket method's argument parser says of a failed export.
                    let kind = buf
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default();
                    PyTypeError::new_err(format!(
                        "{method}() argument 1 must be read-write bytes-like object, not {kind}"
                    ))
                })?;
                if asked < 0 {
                    return Err(PyValueError::new_err(format!(
                        "negative buffersize in {method}"
                    )));
                }
                if asked as usize > exported.len() {
                    return Err(PyValueError::new_err(
                        "nbytes is greater than the length of the buffer",
                    ));
                }
                *len = if *from {
                    asked as usize
                } else {
                    exported.len()
                };
                *view = Some(Held(exported));
            }
            Op::SendAll { data, view, .. } => {
                *view = Some(Held(RawBuffer::get(data.bind(py), false)?))
            }
            Op::SendTo {
                data,
                address,
                view,
                to,
            } => {
                *view = Some(Held(RawBuffer::get(data.bind(py), false)?));
                *to = SockAddr::from_python(socket_family(fd), address.bind(py));
            }
        }
        Ok(())
    }

    /// One non-blocking syscall.
    fn attempt(&mut self, py: Python<'_>, sock: &Bound<'_, PyAny>, fd: RawFd) -> PyResult<Attempt> {
        let res = match self {
            Op::Recv { max, from, .. } => {
                let mut peer = from.then(SockAddr::empty);
                match recv_bytes(py, fd, *max, peer.as_mut()) {
                    Ok(b) => return with_peer(py, b.into_any(), peer),
                    Err(e) => Err(e),
                }
            }
            Op::RecvInto {
                view, len, from, ..
            } => {
                let view = &mut view.as_mut().expect("prepared").0;
                let mut peer = from.then(SockAddr::empty);
                match recv(fd, view.as_mut_ptr(), *len, peer.as_mut()) {
                    Ok(n) => return with_peer(py, PyInt::new(py, n).into_any(), peer),
                    Err(e) => Err(e),
                }
            }
            Op::SendAll { view, pos, .. } => {
                let rest = &view.as_ref().expect("prepared").0.as_slice()[*pos..];
                match send(fd, rest, None) {
                    Ok(n) => {
                        *pos += n;
                        if *pos < view.as_ref().expect("prepared").0.len() {
                            return Ok(Attempt::Again);
                        }
                        Ok(py.None())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::SendTo {
                data,
                address,
                view,
                to,
            } => match to {
                Some(to) => send(fd, view.as_ref().expect("prepared").0.as_slice(), Some(to))
                    .map(|n| PyInt::new(py, n).into_any().unbind()),
                None => {
                    // The socket object resolves the address (as the stdlib's call does).
                    let args = (data.bind(py), 0, address.bind(py));
                    return match sock.call_method1(intern!(py, "sendto"), args) {
                        Ok(n) => Ok(Attempt::Finished(n.unbind())),
                        Err(e)
                            if e.is_instance_of::<pyo3::exceptions::PyBlockingIOError>(py)
                                || e.is_instance_of::<pyo3::exceptions::PyInterruptedError>(py) =>
                        {
                            Ok(Attempt::Again)
                        }
                        Err(e) => Err(e),
                    };
                }
            },
        };
        match res {
            Ok(v) => Ok(Attempt::Finished(v)),
            Err(e) if would_block(&e) => Ok(Attempt::Again),
            Err(e) => Err(os_error(e)),
        }
    }
}

/// The call's result: `result`, or `(result, address)` when it reports the sender.
fn with_peer(
    py: Python<'_>,
    result: Bound<'_, PyAny>,
    peer: Option<SockAddr>,
) -> PyResult<Attempt> {
    let value = match peer {
        None => result,
        Some(peer) => PyTuple::new(py, [result, peer.to_python(py)?])?.into_any(),
    };
    Ok(Attempt::Finished(value.unbind()))
}

/// The address family of socket `fd` (`SO_DOMAIN`), -1 if unknown.
fn socket_family(fd: RawFd) -> i32 {
    let mut family: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `family` and `len` are live out-parameters of the right sizes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut family as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        family
    } else {
        -1
    }
}

/// One `send`/`sendto` that neither blocks nor raises SIGPIPE.
fn send(fd: RawFd, buf: &[u8], to: Option<&SockAddr>) -> std::io::Result<usize> {
    let (addr, addrlen) = to.map_or((std::ptr::null(), 0), SockAddr::as_parts);
    // SAFETY: `buf` is a live slice; `addr` is null or a live sockaddr of `addrlen` bytes.
    let n = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            addr,
            addrlen,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recv`/`recvfrom` with `MSG_DONTWAIT` (a blocking socket must not stall the
/// loop); `peer` receives the sender's address.
fn recv(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    peer: Option<&mut SockAddr>,
) -> std::io::Result<usize> {
    let (addr, addrlen) = match peer {
        Some(p) => p.as_mut_parts(),
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    // SAFETY: `buf` points to `len` writable bytes; `addr`/`addrlen` are null or a live
    // sockaddr_storage and its length.
    let n = unsafe { libc::recvfrom(fd, buf.cast(), len, libc::MSG_DONTWAIT, addr, addrlen) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sock.recv(max)`: up to `max` bytes as `bytes`, read straight into a fresh bytes
/// object that is then shrunk, as the socket module does. (Reading into a shared buffer
/// and copying out was measured worse: the extra copy of large reads, and an allocation
/// pattern that made glibc trim and regrow its heap — three times the page faults.)
fn recv_bytes<'py>(
    py: Python<'py>,
    fd: RawFd,
    max: usize,
    peer: Option<&mut SockAddr>,
) -> std::io::Result<Bound<'py, PyBytes>> {
    // A failed allocation (its MemoryError dropped) is reported as out of memory.
    let enomem = |_: PyErr| std::io::Error::from_raw_os_error(libc::ENOMEM);
    let block = NewBytes::new(py, max).map_err(enomem)?;
    let n = recv(fd, block.ptr(), max, peer)?;
    block.finish(py, n).map_err(enomem)
}

/// Called by the loop when the op's fd is ready.
fn dispatch(target: &Bound<'_, PyAny>, _write: bool) -> PyResult<()> {
    let py = target.py();
    let op = target.cast::<SockOp>()?.get();
    let mut st = lock_state(&op.state)?;
    let fd = st.fd;
    let write = st.op.writes();
    let fut = match &st.stage {
        Stage::Waiting(f) => f.clone_ref(py),
        _ => {
            drop(st);
            op.disarm(py, target, fd, write);
            return Ok(());
        }
    };
    let fut = fut.bind(py);
    // Cancelled while the event was queued: leave the data in the socket.
    if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
        drop(st);
        op.disarm(py, target, fd, write);
        return Ok(());
    }
    let outcome = st.op.attempt(py, op.sock.bind(py), fd);
    if let Ok(Attempt::Again) = outcome {
        drop(st);
        return op.loop_.bind(py).get().rearm_native_waiter(fd);
    }
    // The buffer export ends with the call, as a completed `sock.send`'s would.
    release_view(&mut st.op);
    drop(st);
    op.disarm(py, target, fd, write);
    match outcome {
        Ok(Attempt::Finished(v)) => fut.call_method1(intern!(py, "set_result"), (v,))?,
        Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?,
        Ok(Attempt::Again) => unreachable!(),
    };
    Ok(())
}

fn release_view(op: &mut Op) {
    match op {
        Op::RecvInto { view, .. } | Op::SendAll { view, .. } | Op::SendTo { view, .. } => {
            *view = None
        }
        Op::Recv { .. } => {}
    }
}

/// Ends a step with `value` as the call's result: `StopIteration(value)`, or for None
/// plain exhaustion, which costs no exception object.
fn finish(py: Python<'_>, value: Py<PyAny>) -> PyResult<Option<Py<PyAny>>> {
    if value.is_none(py) {
        Ok(None)
    } else {
        Err(PyStopIteration::new_err((value,)))
    }
}

impl SockOp {
    fn start<'py>(
        lp: &Bound<'py, LoopCore>,
        sock: Bound<'py, PyAny>,
        name: &'static str,
        op: Op,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = SockOp {
            loop_: lp.clone().unbind(),
            sock: sock.unbind(),
            name,
            state: Mutex::new(State {
                op,
                stage: Stage::Start,
                fd: -1,
            }),
        };
        Ok(Bound::new(lp.py(), op)?.into_any())
    }

    /// Removes this op from its fd's reader/writer slot if it is still there.
    fn disarm(&self, py: Python<'_>, me: &Bound<'_, PyAny>, fd: RawFd, write: bool) {
        let lp = self.loop_.bind(py).get();
        drop(lp.remove_native_waiter(fd, write, me));
    }

    /// One step of the coroutine: returns the future to wait on, or ends the call.
    fn step(slf: &Bound<'_, Self>) -> PyResult<Option<Py<PyAny>>> {
        let py = slf.py();
        let this = slf.get();
        let mut st = lock_state(&this.state)?;
        match &st.stage {
            Stage::Start => {}
            Stage::Waiting(fut) => {
                let fut = fut.bind(py).clone();
                if !fut.call_method0(intern!(py, "done"))?.is_truthy()? {
                    // Stepped before the future settled (not by a Task): wait on.
                    fut.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
                    return Ok(Some(fut.unbind()));
                }
                st.stage = Stage::Done;
                drop(st);
                return finish(py, fut.call_method0(intern!(py, "result"))?.unbind());
            }
            Stage::Done => {
                return Err(PyRuntimeError::new_err(
                    "cannot reuse already awaited coroutine",
                ))
            }
        }
        st.stage = Stage::Done;
        let fd: RawFd = this
            .sock
            .bind(py)
            .call_method0(intern!(py, "fileno"))?
            .extract()?;
        st.fd = fd;
        st.op.prepare(py, fd)?;
        match st.op.attempt(py, this.sock.bind(py), fd)? {
            Attempt::Finished(v) => {
                release_view(&mut st.op);
                return finish(py, v);
            }
            Attempt::Again => {}
        }
        // Would block: wait for readiness, as the stdlib's reader/writer callback does.
        let lp = this.loop_.bind(py);
        let write = st.op.writes();
        let fut = LoopCore::new_future(lp)?;
        lp.get().arm_native_waiter(
            py,
            fd,
            write,
            Waiter::Native(slf.clone().into_any().unbind(), dispatch),
        )?;
        fut.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
        st.stage = Stage::Waiting(fut.clone().unbind());
        Ok(Some(fut.unbind()))
    }

    /// Ends the call early (`throw`, `close`): unregisters it and cancels its future.
    fn abandon(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let mut st = lock_state(&this.state)?;
        let stage = std::mem::replace(&mut st.stage, Stage::Done);
        let (fd, write) = (st.fd, st.op.writes());
        release_view(&mut st.op);
        drop(st);
        if let Stage::Waiting(fut) = stage {
            this.disarm(py, slf.as_any(), fd, write);
            fut.bind(py).call_method0(intern!(py, "cancel"))?;
        }
        Ok(())
    }
}

#[pymethods]
impl SockOp {
    fn __await__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Option<Py<PyAny>>> {
        Self::step(slf)
    }

    /// Resumes the call; like a coroutine that has not started, it only takes None first.
    fn send(slf: &Bound<'_, Self>, value: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let started = !matches!(lock_state(&slf.get().state)?.stage, Stage::Start);
        if !started && !value.is_none() {
            return Err(PyTypeError::new_err(
                "can't send non-None value to a just-started coroutine",
            ));
        }
        Self::step(slf)
    }

    /// Raises `typ` (an exception or its class, with `val`) in the call: it stops
    /// waiting, cancels its future and lets the exception out.
    #[pyo3(signature = (typ, val=None, _tb=None))]
    fn throw(
        slf: &Bound<'_, Self>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        Self::abandon(slf)?;
        let exc = if typ.is_instance_of::<pyo3::exceptions::PyBaseException>() {
            typ.clone()
        } else {
            match val {
                Some(v) if !v.is_none() => typ.call1((v,))?,
                _ => typ.call0()?,
            }
        };
        Err(PyErr::from_value(exc))
    }

    /// Stops the call (no result will be delivered).
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::abandon(slf)
    }

    #[getter]
    fn __name__(&self) -> &'static str {
        self.name
    }

    #[getter]
    fn __qualname__(&self) -> String {
        format!("Loop.{}", self.name)
    }

    fn __repr__(&self) -> String {
        format!("<Loop.{} call>", self.name)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.sock)?;
        // A call in progress owns its lock; skipping it then only delays collection.
        if let Ok(st) = self.state.try_lock() {
            if let Stage::Waiting(f) = &st.stage {
                visit.call(f)?;
            }
            match &st.op {
                Op::Recv { n, .. } => visit.call(n)?,
                Op::RecvInto { buf, nbytes, .. } => {
                    visit.call(buf)?;
                    if let Some(n) = nbytes {
                        visit.call(n)?;
                    }
                }
                Op::SendAll { data, .. } => visit.call(data)?,
                Op::SendTo { data, address, .. } => {
                    visit.call(data)?;
                    visit.call(address)?;
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        if let Ok(mut st) = self.state.try_lock() {
            st.stage = Stage::Done;
            release_view(&mut st.op);
        }
    }
}
