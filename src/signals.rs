//! Delivery of `add_signal_handler` callbacks.
//!
//! CPython's C-level signal handler writes each signal's number as one byte to the fd
//! given to `signal.set_wakeup_fd`. We hand it the write end of a non-blocking socket
//! pair whose read end sits in the epoll set; when it turns readable the bytes are read
//! here and each registered handle is queued. Registration itself (validation,
//! `signal.signal`, `set_wakeup_fd`) happens once per handler, in Python.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use pyo3::prelude::*;

use crate::handles::Handle;
use crate::reactor::cvt;

/// The wake-up socket pair and the handler table.
#[derive(Default)]
pub struct Signals {
    pair: Option<(OwnedFd, OwnedFd)>,
    handlers: HashMap<i32, Py<Handle>>,
}

impl Signals {
    /// The write end for `signal.set_wakeup_fd`, creating the pair on first use; the
    /// read end is returned too when it was just created, so the caller can watch it.
    pub fn wakeup_fd(&mut self) -> io::Result<(RawFd, Option<RawFd>)> {
        if let Some((_, w)) = &self.pair {
            return Ok((w.as_raw_fd(), None));
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: both fds were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (rfd, wfd) = (r.as_raw_fd(), w.as_raw_fd());
        self.pair = Some((r, w));
        Ok((wfd, Some(rfd)))
    }

    /// Sets (or with `None`, removes) the handle for `sig`; returns the previous one.
    pub fn set(&mut self, sig: i32, handle: Option<Py<Handle>>) -> Option<Py<Handle>> {
        match handle {
            Some(h) => self.handlers.insert(sig, h),
            None => self.handlers.remove(&sig),
        }
    }

    /// The signals that have handlers.
    pub fn registered(&self) -> Vec<i32> {
        self.handlers.keys().copied().collect()
    }

    /// Reads every pending signal number and returns the handles to run, in arrival
    /// order, plus the signals whose handle was cancelled (to be unregistered).
    pub fn take_pending(&self, py: Python<'_>) -> (Vec<Py<Handle>>, Vec<i32>) {
        let mut run = Vec::new();
        let mut stale = Vec::new();
        let Some((r, _)) = &self.pair else {
            return (run, stale);
        };
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reads into a live buffer from our non-blocking socket.
            let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            for &sig in &buf[..n as usize] {
                if sig == 0 {
                    continue;
                }
                let sig = i32::from(sig);
                if let Some(h) = self.handlers.get(&sig) {
                    if h.get().is_cancelled() {
                        stale.push(sig);
                    } else {
                        run.push(h.clone_ref(py));
                    }
                }
            }
        }
        (run, stale)
    }
}
