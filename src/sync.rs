//! Lock helpers shared by the core.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: every critical section in the core is a short,
/// panic-free update (a push, a swap, an assignment), so a panic elsewhere while the lock
/// was held cannot have left the data half-updated.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
