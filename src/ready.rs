//! The ready queue: callbacks to run in the current or next iteration.
//!
//! Invariants:
//! - An iteration runs exactly the callbacks queued when it took its batch
//!   ([`ReadyQueue::swap_batch`]); what they schedule lands in the queue proper and waits
//!   for the next iteration, as in the stdlib (`ntodo = len(self._ready)`).
//! - If running a batch is cut short (KeyboardInterrupt, SystemExit), the callbacks not
//!   yet run go back to the front in their order ([`ReadyQueue::requeue_front`]), ahead of
//!   anything queued since: a queued callback is never lost.
//! - Taking a batch swaps the queue with the caller's drained batch buffer, so
//!   steady-state iterations neither allocate nor free.

use std::collections::VecDeque;

use pyo3::prelude::*;

use crate::handles::Handle;
use crate::reactor::IoEvent;

/// One entry of the loop's ready queue.
pub enum Job {
    /// A `Handle` (call_soon, a due timer, a reader/writer or signal callback).
    Callback(Py<Handle>),
    /// A native transport's fd became ready.
    Io(IoEvent),
}

/// FIFO of ready callbacks with batch hand-off.
pub struct ReadyQueue<T> {
    queue: VecDeque<T>,
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
        }
    }
}

impl<T> ReadyQueue<T> {
    /// Queues `item` behind everything already queued.
    #[inline]
    pub fn push_back(&mut self, item: T) {
        self.queue.push_back(item);
    }

    /// Number of queued callbacks.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing is queued.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes everything queued so far into `batch` (which must be empty), leaving the
    /// queue empty with `batch`'s former buffer.
    #[inline]
    pub fn swap_batch(&mut self, batch: &mut VecDeque<T>) {
        debug_assert!(batch.is_empty());
        std::mem::swap(&mut self.queue, batch);
    }

    /// Puts the unrun rest of a batch back in front, in its order.
    pub fn requeue_front(&mut self, rest: &mut VecDeque<T>) {
        while let Some(item) = rest.pop_back() {
            self.queue.push_front(item);
        }
    }

    /// Removes everything (loop close).
    pub fn clear(&mut self) -> VecDeque<T> {
        std::mem::take(&mut self.queue)
    }
}

impl<T> Extend<T> for ReadyQueue<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        self.queue.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(q: &mut ReadyQueue<i32>) -> Vec<i32> {
        let mut batch = VecDeque::new();
        q.swap_batch(&mut batch);
        batch.into_iter().collect()
    }

    #[test]
    fn batch_holds_only_what_was_queued_before_it_was_taken() {
        let mut q = ReadyQueue::default();
        q.push_back(1);
        q.push_back(2);
        let mut batch = VecDeque::new();
        q.swap_batch(&mut batch);
        // A callback in the batch schedules another one.
        q.push_back(3);
        assert_eq!(batch.pop_front(), Some(1));
        assert_eq!(batch.pop_front(), Some(2));
        assert_eq!(batch.pop_front(), None);
        assert_eq!(take(&mut q), vec![3]);
    }

    #[test]
    fn interrupted_batch_goes_back_ahead_of_newer_callbacks() {
        let mut q = ReadyQueue::default();
        q.extend([1, 2, 3, 4]);
        let mut batch = VecDeque::new();
        q.swap_batch(&mut batch);
        assert_eq!(batch.pop_front(), Some(1));
        q.push_back(5); // scheduled by callback 1
        q.requeue_front(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(take(&mut q), vec![2, 3, 4, 5]);
    }

    #[test]
    fn batch_buffers_are_reused() {
        let mut q = ReadyQueue::default();
        q.extend(0..1000);
        let mut batch = VecDeque::new();
        q.swap_batch(&mut batch);
        let cap = batch.capacity();
        batch.clear();
        // The next swap hands the big buffer back to the queue.
        q.push_back(1);
        let mut small = VecDeque::new();
        q.swap_batch(&mut small);
        q.swap_batch(&mut batch);
        assert!(q.queue.capacity() >= cap);
    }

    #[test]
    fn fifo_order_is_kept() {
        let mut q = ReadyQueue::default();
        for i in 0..100 {
            q.push_back(i);
        }
        assert_eq!(q.len(), 100);
        assert_eq!(take(&mut q), (0..100).collect::<Vec<_>>());
        assert!(q.is_empty());
    }
}
