//! Turning OS errors into Python exceptions at the PyO3 edge.
//!
//! PyO3's blanket `io::Error` conversion loses `errno`; building `OSError(errno,
//! strerror)` instead lets Python pick the subclass (`ConnectionResetError`, …) and keeps
//! `exc.errno`, as the stdlib's errors do.

use std::io;

use pyo3::exceptions::PyOSError;
use pyo3::PyErr;

/// `OSError(errno, strerror)` for an OS error; other errors keep their message.
pub fn os_error(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(code) => {
            // SAFETY: strerror returns a pointer to a static (or thread-local) C string.
            let msg = unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) }
                .to_string_lossy()
                .into_owned();
            PyOSError::new_err((code, msg))
        }
        None => PyOSError::new_err(err.to_string()),
    }
}
