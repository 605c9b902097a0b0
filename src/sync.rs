//! Lock helpers shared by the core.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: every critical section in the core is a short,
/// panic-free update (a push, a swap, an assignment), so a panic elsewhere while the lock
/// was held cannot have left the data half-updated.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A lock for the core's hottest short critical sections (the ready queue, the timer
/// heap, a handle's callback slot): sections that neither block, nor run Python code,
/// nor drop Python objects (whose finalizers could).
///
/// Taken a few times per callback, so it is kept minimal: acquiring is one
/// compare-and-swap, releasing one store, and there is no poisoning (as with [`lock`],
/// the sections are panic-free updates). Under the GIL the threads that take it hold
/// the interpreter, so it is never contended; without the GIL a waiter spins briefly,
/// then yields its time slice until the holder is done.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and `locked` grants at most one
// guard at a time (acquire/release ordering publishes the holder's writes to the next).
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T: Default> Default for SpinLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> SpinLock<T> {
    /// An unlocked lock around `value`.
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Waits for the lock and returns the guard that releases it.
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// Calls `f` with the value, without locking (which costs an atomic
    /// read-modify-write).
    ///
    /// # Safety
    /// No guard exists or is created meanwhile: the caller has the only access to the
    /// lock's owner (as with a pooled handle, whose only reference the caller holds).
    #[inline]
    pub unsafe fn with_unlocked<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        debug_assert!(!self.locked.load(Ordering::Relaxed));
        // SAFETY: no other access exists (upheld by the caller).
        f(unsafe { &mut *self.value.get() })
    }
}

/// Holds a [`SpinLock`] until dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see `SpinLock`'s Sync impl).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the only one (see `SpinLock`'s Sync impl).
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn spin_lock_serialises_increments_from_many_threads() {
        let counter = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *c.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*counter.lock(), 40_000);
    }
}
