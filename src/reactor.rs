//! The I/O multiplexer: epoll, driven directly.
//!
//! Why not mio: `add_reader`/`add_writer` promise *level-triggered* callbacks (a reader
//! that leaves data in the socket is called again next iteration, as with the stdlib's
//! selectors), and mio only offers edge-triggered registration. Timeouts are rounded up
//! to the millisecond, as the stdlib's selectors round them: a timer fires up to 1 ms
//! late, never early, and a dense run of timers costs a wake-up per millisecond at most.
//!
//! Two kinds of registration share the set:
//! - *waiters* per direction: a callback [`Handle`] (`add_reader`/`add_writer`), queued
//!   when the fd is ready, or a native one-shot waiter (a pending `sock_*` call) that the
//!   loop dispatches directly;
//! - *native targets* (transports): an object plus a dispatch function the loop calls
//!   directly, so a readable socket costs no Python frame beyond the protocol's own.
//!
//! Invariants:
//! - An fd is in the epoll set when it has a waiter or a native interest here, and
//!   otherwise only as a fired (so disabled) one-shot registration kept for the fd's next
//!   native waiter; its entry stays in the table until then or until the loop closes.
//! - An fd has waiters or a native target, never both.
//! - The token of a user fd is the fd itself; the two internal fds (the wake-up eventfd
//!   and the signal socket) use tokens above any fd.
//! - The caller (the loop) runs `poll` with the interpreter detached; nothing in the
//!   wait touches Python objects.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;

use crate::errors::os_error;
use crate::handles::Handle;
use crate::ready::Job;
use crate::sync::lock;

/// Token of the wake-up eventfd.
pub const WAKER_TOKEN: u64 = u64::MAX;
/// Token of the signal wake-up socket.
pub const SIGNAL_TOKEN: u64 = u64::MAX - 1;

const MAX_EVENTS: usize = 1024;

/// `contextvars.copy_context()`.
fn copy_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: a plain C-API call with the interpreter attached; it returns a new
    // reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_CopyCurrent()) }
        .map(Bound::unbind)
}

/// Turns a libc `-1` return into the OS error.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Called by the loop when a native target's fd is ready: `(target, writable)`. It
/// handles its own errors; an `Err` (KeyboardInterrupt, SystemExit) stops the loop.
pub type Dispatch = fn(&Bound<'_, PyAny>, bool) -> PyResult<()>;

/// A ready native target, as queued for the loop.
pub struct IoEvent {
    pub target: Py<PyAny>,
    pub dispatch: Dispatch,
    pub write: bool,
    /// The context the dispatch runs in: a transport's (whose protocol callbacks it
    /// runs); None for a native waiter, which runs no user code.
    pub context: Option<Py<PyAny>>,
}

struct Native {
    target: Py<PyAny>,
    dispatch: Dispatch,
    read: bool,
    write: bool,
    /// A copy of the context current when the fd was registered: what the stdlib's
    /// reader/writer handle would have captured, so each connection's callbacks see
    /// their own context variables.
    context: Py<PyAny>,
}

/// What waits on one direction of an fd.
pub enum Waiter {
    /// An `add_reader`/`add_writer` callback.
    Callback(Py<Handle>),
    /// A native waiter (a pending `sock_*` call): dispatched like a transport, and it
    /// removes itself once done.
    Native(Py<PyAny>, Dispatch),
}

impl Waiter {
    /// Whether this is the native waiter `target`.
    fn is_target(&self, target: &Bound<'_, PyAny>) -> bool {
        matches!(self, Waiter::Native(t, _) if t.as_ptr() == target.as_ptr())
    }

    /// Stops a replaced or removed waiter: a callback handle is cancelled (as the stdlib
    /// does); a native waiter is simply dropped, its caller left waiting, also as the
    /// stdlib leaves a `sock_*` call whose reader was replaced.
    pub fn cancel(self, py: Python<'_>) -> PyResult<()> {
        match self {
            Waiter::Callback(h) => Handle::cancel_now(h.bind(py)),
            Waiter::Native(..) => Ok(()),
        }
    }
}

/// Hashes an fd with one multiplication. fds are small, dense, non-adversarial keys
/// looked up once per I/O event, where the default SipHash cost about 100 instructions.
#[derive(Default)]
pub(crate) struct FdHasher(u64);

impl Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(FD_HASH_K);
        }
    }

    fn write_i32(&mut self, fd: i32) {
        // The multiplication spreads the fd into the high bits, which the table's
        // control bytes are taken from.
        self.0 = u64::from(fd as u32).wrapping_mul(FD_HASH_K);
    }
}

const FD_HASH_K: u64 = 0x9E37_79B9_7F4A_7C15;

/// A map keyed by fd.
pub(crate) type FdMap<V> = HashMap<RawFd, V, BuildHasherDefault<FdHasher>>;

/// One fd's waiters and what the kernel's epoll set holds for it.
#[derive(Default)]
struct FdEntry {
    reader: Option<Waiter>,
    writer: Option<Waiter>,
    native: Option<Native>,
    /// The fd is (as far as we know) in the epoll set.
    in_kernel: bool,
    /// The kernel's registration is one-shot: it disables itself after one event.
    oneshot: bool,
    /// A one-shot registration has not fired since it was last armed.
    armed: bool,
}

impl FdEntry {
    fn mask(&self) -> u32 {
        let (read, write) = match &self.native {
            Some(n) => (n.read, n.write),
            None => (self.reader.is_some(), self.writer.is_some()),
        };
        let mut m = 0;
        if read {
            m |= libc::EPOLLIN as u32;
        }
        if write {
            m |= libc::EPOLLOUT as u32;
        }
        m
    }

    /// Whether the fd's only waiter is one native (`sock_*`) waiter. Such a waiter is
    /// registered one-shot: it is done after an event or two, and a one-shot
    /// registration needs no syscall to stop (it already has) and one `EPOLL_CTL_MOD` to
    /// re-arm, where level-triggered interest would cost an add and a delete per call.
    fn oneshot_eligible(&self) -> bool {
        self.native.is_none()
            && matches!(
                (&self.reader, &self.writer),
                (Some(Waiter::Native(..)), None) | (None, Some(Waiter::Native(..)))
            )
    }

    /// Nothing waits and the kernel holds nothing that can fire: the entry can go.
    fn is_idle(&self) -> bool {
        self.mask() == 0 && !self.in_kernel
    }
}

/// What one wait produced, translated for the loop.
#[derive(Default)]
pub struct Readiness {
    /// Reader/writer callbacks and native events to append to the ready queue, in
    /// event order.
    pub jobs: Vec<Job>,
    /// The signal socket became readable.
    pub signals: bool,
    /// The wait was interrupted by a signal.
    pub interrupted: bool,
}

/// An epoll set plus the callbacks registered on its fds.
pub struct Reactor {
    epfd: OwnedFd,
    waker: OwnedFd,
    fds: Mutex<FdMap<FdEntry>>,
    /// fd → the transport that owns it (a borrowed pointer: a transport removes its
    /// entry when it closes the fd or is deallocated), registered or not.
    owners: Mutex<FdMap<usize>>,
    events: Mutex<Vec<libc::epoll_event>>,
    /// The jobs vector [`Reactor::poll`] fills, handed back empty by the loop through
    /// [`Reactor::recycle_jobs`]: a fresh one cost an allocation and a regrowth per
    /// iteration.
    jobs: Mutex<Vec<Job>>,
    /// Set once an internal fd (the signal socket) joins the set.
    has_internal: AtomicBool,
    /// Nothing but the wake-up eventfd is in the set (no fd in `fds`, no internal fd):
    /// kept up to date by [`FdsGuard`], so the loop can tell without taking a lock.
    idle: AtomicBool,
}

/// The locked fd table; on release it records in [`Reactor::idle`] whether the table
/// is empty, so every change to the table keeps that flag right.
struct FdsGuard<'a> {
    fds: MutexGuard<'a, FdMap<FdEntry>>,
    idle: &'a AtomicBool,
    has_internal: &'a AtomicBool,
}

impl Deref for FdsGuard<'_> {
    type Target = FdMap<FdEntry>;
    fn deref(&self) -> &Self::Target {
        &self.fds
    }
}

impl DerefMut for FdsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.fds
    }
}

impl Drop for FdsGuard<'_> {
    fn drop(&mut self) {
        // Stored before the lock is released, so whoever takes the lock next sees it.
        let idle = self.fds.is_empty() && !self.has_internal.load(Ordering::Relaxed);
        self.idle.store(idle, Ordering::Release);
    }
}

impl Reactor {
    /// A fresh epoll set with its wake-up eventfd registered.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscalls; each returned fd is owned by exactly one OwnedFd.
        let epfd = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let waker = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        let r = Self {
            epfd,
            waker,
            fds: Mutex::new(FdMap::default()),
            owners: Mutex::new(FdMap::default()),
            events: Mutex::new(Vec::with_capacity(MAX_EVENTS)),
            jobs: Mutex::new(Vec::new()),
            has_internal: AtomicBool::new(false),
            idle: AtomicBool::new(true),
        };
        r.ctl(
            libc::EPOLL_CTL_ADD,
            r.waker.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKER_TOKEN,
        )?;
        Ok(r)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Sets `fd`'s interest to `mask`, adding or modifying as the kernel's set requires
    /// (the kernel drops closed fds on its own, so our view can be stale).
    fn apply(&self, fd: RawFd, mask: u32, known: bool) -> io::Result<()> {
        let (first, second) = if known {
            (libc::EPOLL_CTL_MOD, libc::EPOLL_CTL_ADD)
        } else {
            (libc::EPOLL_CTL_ADD, libc::EPOLL_CTL_MOD)
        };
        match self.ctl(first, fd, mask, fd as u64) {
            Err(e)
                if (known && e.raw_os_error() == Some(libc::ENOENT))
                    || (!known && e.raw_os_error() == Some(libc::EEXIST)) =>
            {
                self.ctl(second, fd, mask, fd as u64)
            }
            r => r,
        }
    }

    /// Registers an internal fd (signal socket) for reading under `token`.
    pub fn add_internal(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, token)?;
        self.has_internal.store(true, Ordering::Relaxed);
        self.idle.store(false, Ordering::Release);
        Ok(())
    }

    /// Locks the fd table (see [`FdsGuard`]).
    fn fds(&self) -> FdsGuard<'_> {
        FdsGuard {
            fds: lock(&self.fds),
            idle: &self.idle,
            has_internal: &self.has_internal,
        }
    }

    /// True when nothing but the wake-up eventfd is in the set: a wait with a zero
    /// timeout could only report a wake-up, which a loop with callbacks ready has no
    /// use for (the callbacks a wake-up announces are queued before it is sent).
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }

    /// Installs `waiter` as `fd`'s reader (`write == false`) or writer, returning the
    /// waiter it replaces.
    pub fn add(&self, fd: RawFd, write: bool, waiter: Waiter) -> io::Result<Option<Waiter>> {
        let mut fds = self.fds();
        let entry = fds.entry(fd).or_default();
        if entry.native.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let slot = if write {
            &mut entry.writer
        } else {
            &mut entry.reader
        };
        let old = slot.replace(waiter);
        if let Err(e) = self.sync(fd, entry) {
            // Leave the table as it was.
            let slot = if write {
                &mut entry.writer
            } else {
                &mut entry.reader
            };
            *slot = old;
            if entry.is_idle() {
                fds.remove(&fd);
            }
            return Err(e);
        }
        Ok(old)
    }

    /// Swaps the waiter of a direction `fd` already has one for, with no syscall (the
    /// kernel's interest is unchanged); hands `waiter` back if there is none to swap.
    pub fn replace(&self, fd: RawFd, write: bool, waiter: Waiter) -> Result<Waiter, Waiter> {
        let mut fds = self.fds();
        let slot = fds.get_mut(&fd).and_then(|e| {
            let slot = if write { &mut e.writer } else { &mut e.reader };
            slot.as_mut()
        });
        match slot {
            Some(slot) => Ok(std::mem::replace(slot, waiter)),
            None => Err(waiter),
        }
    }

    /// Brings the kernel's registration of `fd` in line with `entry`'s waiters.
    fn sync(&self, fd: RawFd, entry: &mut FdEntry) -> io::Result<()> {
        let mask = entry.mask();
        if mask == 0 {
            if entry.in_kernel && (entry.armed || !entry.oneshot) {
                // The fd may already be closed (EBADF) or gone from the set (ENOENT):
                // either way it is no longer watched, which is what we want.
                let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
                entry.in_kernel = false;
            }
            // A fired one-shot registration stays in the set, disabled, ready for a MOD.
            return Ok(());
        }
        let oneshot = entry.oneshot_eligible();
        let flags = if oneshot {
            mask | libc::EPOLLONESHOT as u32
        } else {
            mask
        };
        self.apply(fd, flags, entry.in_kernel)?;
        entry.in_kernel = true;
        entry.oneshot = oneshot;
        entry.armed = true;
        Ok(())
    }

    /// Re-arms `fd`'s one-shot registration after an event that found its native
    /// waiter not ready after all (a spurious wake-up).
    pub fn rearm(&self, fd: RawFd) -> io::Result<()> {
        let mut fds = self.fds();
        match fds.get_mut(&fd) {
            Some(e) if e.oneshot && !e.armed => self.sync(fd, e),
            _ => Ok(()),
        }
    }

    /// Removes `fd`'s reader or writer, returning it if there was one.
    pub fn remove(&self, fd: RawFd, write: bool) -> Option<Waiter> {
        self.remove_locked(&mut self.fds(), fd, write)
    }

    /// Removes `fd`'s reader or writer if it is still the native waiter `target` (it may
    /// have been replaced meanwhile), returning it. After the event that completed it,
    /// this costs no syscall (see [`FdEntry::oneshot_eligible`]).
    pub fn remove_native(
        &self,
        fd: RawFd,
        write: bool,
        target: &Bound<'_, PyAny>,
    ) -> Option<Waiter> {
        let mut fds = self.fds();
        let entry = fds.get(&fd)?;
        let slot = if write { &entry.writer } else { &entry.reader };
        if !slot.as_ref().is_some_and(|w| w.is_target(target)) {
            return None;
        }
        self.remove_locked(&mut fds, fd, write)
    }

    fn remove_locked(&self, fds: &mut FdsGuard<'_>, fd: RawFd, write: bool) -> Option<Waiter> {
        let entry = fds.get_mut(&fd)?;
        let old = if write {
            entry.writer.take()
        } else {
            entry.reader.take()
        }?;
        // Only a deletion (which cannot fail usefully) or a narrowing MOD happens here.
        let _ = self.sync(fd, entry);
        if entry.is_idle() {
            fds.remove(&fd);
        }
        Some(old)
    }

    /// Sets a native target's interest in `fd` (both false: unregisters it). Returns the
    /// reference the table held before, to be dropped with no lock held (dropping a
    /// transport can run its finalizer).
    pub fn set_native(
        &self,
        fd: RawFd,
        target: &Bound<'_, PyAny>,
        dispatch: Dispatch,
        read: bool,
        write: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let py = target.py();
        let mut fds = self.fds();
        if !read && !write {
            let Some(entry) = fds.get_mut(&fd) else {
                return Ok(None);
            };
            let old = entry.native.take();
            let _ = self.sync(fd, entry);
            if entry.is_idle() {
                fds.remove(&fd);
            }
            return Ok(old.map(|n| n.target));
        }
        let entry = fds.entry(fd).or_default();
        if entry.reader.is_some() || entry.writer.is_some() {
            return Err(os_error(io::Error::from_raw_os_error(libc::EBUSY)));
        }
        // A registration keeps its context while its interest changes.
        let context = match &entry.native {
            Some(n) => n.context.clone_ref(py),
            None => copy_context(py)?,
        };
        let old = entry.native.replace(Native {
            target: target.clone().unbind(),
            dispatch,
            read,
            write,
            context,
        });
        if let Err(e) = self.sync(fd, entry) {
            entry.native = old;
            if entry.is_idle() {
                fds.remove(&fd);
            }
            return Err(os_error(e));
        }
        Ok(old.map(|n| n.target))
    }

    /// Records `owner` (a transport's address) as the owner of `fd`.
    pub fn claim(&self, fd: RawFd, owner: usize) {
        lock(&self.owners).insert(fd, owner);
    }

    /// Forgets `fd`'s owner if it is still `owner`.
    pub fn release(&self, fd: RawFd, owner: usize) {
        let mut owners = lock(&self.owners);
        if owners.get(&fd) == Some(&owner) {
            owners.remove(&fd);
        }
    }

    /// The address of the transport owning `fd`, if any.
    pub fn owner(&self, fd: RawFd) -> Option<usize> {
        lock(&self.owners).get(&fd).copied()
    }

    /// Whether `fd` has a reader (`write == false`) or writer callback.
    pub fn has(&self, fd: RawFd, write: bool) -> bool {
        self.fds().get(&fd).is_some_and(|e| {
            if write {
                e.writer.is_some()
            } else {
                e.reader.is_some()
            }
        })
    }

    /// Drops every registration (loop close); the handles and targets are returned to be
    /// released with the interpreter attached and no lock held.
    pub fn clear(&self) -> (Vec<Py<Handle>>, Vec<Py<PyAny>>) {
        let mut fds = self.fds();
        let (mut handles, mut targets) = (Vec::new(), Vec::new());
        for (fd, e) in fds.drain() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
            for w in [e.reader, e.writer].into_iter().flatten() {
                match w {
                    Waiter::Callback(h) => handles.push(h),
                    Waiter::Native(t, _) => targets.push(t),
                }
            }
            targets.extend(e.native.map(|n| n.target));
        }
        (handles, targets)
    }

    /// Wakes a `wait` in progress (or makes the next one return at once).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full counter
        // (EAGAIN) already guarantees a wake-up, so the result is ignored.
        unsafe {
            libc::write(
                self.waker.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn drain_waker(&self) {
        let mut buf: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe {
            libc::read(
                self.waker.as_raw_fd(),
                (&mut buf as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Waits up to `timeout` seconds (`None`: forever) with the interpreter detached,
    /// then maps the events to callbacks.
    pub fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> io::Result<Readiness> {
        // A zero-timeout poll with nothing but the wake-up eventfd in the set can only
        // report a wake-up, which a loop with callbacks ready has no use for: skip the
        // syscall (a pending wake-up is consumed by the next real wait).
        if timeout == Some(0.0) && self.is_idle() {
            return Ok(Readiness::default());
        }
        let mut events = std::mem::take(&mut *lock(&self.events));
        let n = py.detach(|| wait(self.epfd.as_raw_fd(), &mut events, timeout));
        let mut out = Readiness {
            jobs: std::mem::take(&mut *lock(&self.jobs)),
            ..Readiness::default()
        };
        match n {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => out.interrupted = true,
            Err(e) => {
                *lock(&self.events) = events;
                return Err(e);
            }
        }
        {
            let mut fds = self.fds();
            // A cancelled reader/writer is unregistered instead of run (as the stdlib
            // does); left in a level-triggered set it would wake every poll.
            let mut stale: Vec<(RawFd, bool)> = Vec::new();
            for ev in &events {
                let (flags, token) = (ev.events, ev.u64);
                match token {
                    WAKER_TOKEN => self.drain_waker(),
                    SIGNAL_TOKEN => out.signals = true,
                    fd => {
                        let fd = fd as RawFd;
                        let Some(entry) = fds.get_mut(&fd) else {
                            continue;
                        };
                        if entry.oneshot {
                            entry.armed = false;
                        }
                        // Like selectors: anything beyond "only writable" wakes the reader,
                        // anything beyond "only readable" wakes the writer (HUP/ERR wake both).
                        let readable = flags & !(libc::EPOLLOUT as u32) != 0;
                        let writable = flags & !(libc::EPOLLIN as u32) != 0;
                        if let Some(n) = &entry.native {
                            for (hit, write) in
                                [(readable && n.read, false), (writable && n.write, true)]
                            {
                                if hit {
                                    out.jobs.push(Job::Io(IoEvent {
                                        target: n.target.clone_ref(py),
                                        dispatch: n.dispatch,
                                        write,
                                        context: Some(n.context.clone_ref(py)),
                                    }));
                                }
                            }
                            continue;
                        }
                        let wakes = [
                            (readable, &entry.reader, false),
                            (writable, &entry.writer, true),
                        ];
                        for (hit, slot, write) in wakes {
                            match slot {
                                _ if !hit => {}
                                Some(Waiter::Callback(h)) if h.get().is_cancelled() => {
                                    stale.push((fd, write))
                                }
                                Some(Waiter::Callback(h)) => {
                                    out.jobs.push(Job::Callback(h.clone_ref(py)))
                                }
                                Some(Waiter::Native(target, dispatch)) => {
                                    out.jobs.push(Job::Io(IoEvent {
                                        target: target.clone_ref(py),
                                        dispatch: *dispatch,
                                        write,
                                        context: None,
                                    }))
                                }
                                None => {}
                            }
                        }
                    }
                }
            }
            for (fd, write) in stale {
                drop(self.remove_locked(&mut fds, fd, write));
            }
        }
        *lock(&self.events) = events;
        Ok(out)
    }

    /// Gives back the (emptied) jobs vector of a [`Readiness`] for the next poll. One
    /// that never allocated (an idle poll returns a fresh one) must not replace the
    /// kept one.
    pub fn recycle_jobs(&self, jobs: Vec<Job>) {
        debug_assert!(jobs.is_empty());
        if jobs.is_empty() && jobs.capacity() > 0 {
            *lock(&self.jobs) = jobs;
        }
    }
}

/// `epoll_wait`'s timeout for a wait of `timeout` seconds (`None`: forever, -1), rounded
/// up to the millisecond as the stdlib's selectors round it: waking a little late is
/// fine, waking early is not, and a dense run of timers then fires in batches, a wake-up
/// per millisecond at most instead of one per timer.
fn timeout_ms(timeout: Option<f64>) -> libc::c_int {
    timeout.map_or(-1, |t| {
        (t.max(0.0) * 1e3).ceil().min(libc::c_int::MAX as f64) as libc::c_int
    })
}

/// One `epoll_wait` call into `events`' spare capacity.
fn wait(
    epfd: RawFd,
    events: &mut Vec<libc::epoll_event>,
    timeout: Option<f64>,
) -> io::Result<usize> {
    events.clear();
    let cap = events.capacity().clamp(1, MAX_EVENTS);
    let ms = timeout_ms(timeout);
    // SAFETY: `events` has room for `cap` entries.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), cap as libc::c_int, ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first `n` (≤ cap) entries.
    unsafe { events.set_len(n as usize) };
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::timeout_ms;

    #[test]
    fn a_wait_is_rounded_up_to_the_millisecond_never_down() {
        assert_eq!(timeout_ms(Some(1e-9)), 1);
        assert_eq!(timeout_ms(Some(0.000_999)), 1);
        assert_eq!(timeout_ms(Some(0.001)), 1);
        assert_eq!(timeout_ms(Some(0.001_000_1)), 2);
        assert_eq!(timeout_ms(Some(2.5)), 2500);
    }

    #[test]
    fn no_wait_stays_zero_and_no_timeout_waits_forever() {
        assert_eq!(timeout_ms(Some(0.0)), 0);
        assert_eq!(timeout_ms(Some(-3.0)), 0);
        assert_eq!(timeout_ms(None), -1);
    }

    #[test]
    fn a_huge_wait_is_clamped_to_the_largest_timeout() {
        assert_eq!(timeout_ms(Some(1e12)), libc::c_int::MAX);
        assert_eq!(timeout_ms(Some(f64::INFINITY)), libc::c_int::MAX);
    }
}
