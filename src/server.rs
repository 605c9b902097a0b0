//! The native half of a server (`python/ferroloop/_server.py`): the set of connections
//! accepted through it.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::ffi;
use pyo3::prelude::*;

/// The live connections accepted through a server (`Server._clients`, what
/// `close_clients`/`abort_clients` walk).
///
/// Members are held by address, without a reference, so that a transport dropped unclosed
/// is still freed (and warns) as in the stdlib, whose `WeakSet` does the same with a weak
/// reference per member: about 130 bytes of RSS per idle connection. Only ferroloop's
/// stream transports can join, and each one leaves before its memory is freed (when its
/// native state is dropped, see `stream::Stream`), so every address here is a live
/// object's.
#[pyclass(frozen, module = "ferroloop._ferroloop")]
#[derive(Default)]
pub struct ClientSet {
    members: Mutex<HashSet<usize>>,
}

impl ClientSet {
    fn members(&self) -> MutexGuard<'_, HashSet<usize>> {
        // Every critical section is a single set operation: a poisoned set is intact.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the object at `addr` (a transport being freed, or detached).
    pub(crate) fn forget(&self, addr: usize) {
        self.members().remove(&addr);
    }
}

#[pymethods]
impl ClientSet {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Adds a stream transport; anything else is a TypeError.
    fn add(slf: &Bound<'_, Self>, transport: &Bound<'_, PyAny>) -> PyResult<()> {
        crate::stream::join_client_set(transport, slf)?;
        slf.get().members().insert(transport.as_ptr() as usize);
        Ok(())
    }

    /// Removes `transport` if it is a member.
    fn discard(&self, transport: &Bound<'_, PyAny>) {
        self.forget(transport.as_ptr() as usize);
    }

    fn __len__(&self) -> usize {
        self.members().len()
    }

    fn __contains__(&self, transport: &Bound<'_, PyAny>) -> bool {
        self.members().contains(&(transport.as_ptr() as usize))
    }

    /// The members, as a new list (a snapshot to iterate over while they close).
    fn copy<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
        self.members()
            .iter()
            .map(|&addr| addr as *mut ffi::PyObject)
            // SAFETY: members leave before their memory is freed, so each address is an
            // object's. One whose count is zero is being deallocated right now (its state
            // is dropped, and it leaves, a moment later): reviving it would free it twice.
            .filter(|&ptr| unsafe { ffi::Py_REFCNT(ptr) } > 0)
            // SAFETY: a live object; the new reference is ours.
            .map(|ptr| unsafe { Bound::from_borrowed_ptr(py, ptr) })
            .collect()
    }
}
