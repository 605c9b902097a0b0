//! The timer heap behind `call_later`/`call_at`.
//!
//! Invariants:
//! - Entries are ordered by deadline, then by insertion sequence, so equal deadlines
//!   fire in FIFO order (the stdlib gets the same from `heapq` plus handle identity).
//! - Cancellation is lazy: a cancelled timer stays in the heap until it reaches the top,
//!   or until cancelled timers make up more than half of a heap of more than
//!   [`MIN_SCHEDULED`] entries, when the heap is rebuilt without them (the stdlib's rule).
//! - The cancelled count is shared with the handles (an `Arc<AtomicUsize>`), so a
//!   handle's `cancel()` is O(1) and never touches the heap.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

/// Below this size the heap is never compacted; popping cancelled tops is enough.
pub const MIN_SCHEDULED: usize = 100;

/// What the heap needs to know about the timers it holds.
pub trait Timer {
    /// True once the timer was cancelled; it will be dropped instead of fired.
    fn is_cancelled(&self) -> bool;
    /// Called as the timer leaves the heap (fired or dropped).
    fn unschedule(&self);
}

struct Entry<T> {
    /// The deadline as an integer with the order of `f64::total_cmp` (see [`order_key`]):
    /// the heap compares entries on every level of every push and pop, and an integer
    /// comparison is much cheaper than a float's total order.
    key: i64,
    seq: u64,
    item: T,
}

impl<T> Entry<T> {
    fn when(&self) -> f64 {
        from_order_key(self.key)
    }
}

/// `when`'s bits, rearranged so that integer order is `f64::total_cmp` order (the
/// transform `total_cmp` itself applies to both operands of every comparison).
fn order_key(when: f64) -> i64 {
    let bits = when.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

/// The inverse of [`order_key`] (the transform is its own inverse).
fn from_order_key(key: i64) -> f64 {
    f64::from_bits((key ^ ((((key >> 63) as u64) >> 1) as i64)) as u64)
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: `BinaryHeap` is a max-heap and we want the earliest deadline on top.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.key, other.seq).cmp(&(self.key, self.seq))
    }
}

/// A min-heap of timers keyed by deadline with lazy cancellation.
pub struct TimerHeap<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
    cancelled: Arc<AtomicUsize>,
}

impl<T: Timer> Default for TimerHeap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Timer> TimerHeap<T> {
    /// An empty heap.
    pub fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
            cancelled: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The counter a timer bumps when it is cancelled while scheduled.
    pub fn cancel_counter(&self) -> Arc<AtomicUsize> {
        self.cancelled.clone()
    }

    /// Number of entries, cancelled ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when no timer is scheduled.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Schedules `item` at `when` (seconds on the loop clock; never NaN).
    pub fn push(&mut self, when: f64, item: T) {
        debug_assert!(!when.is_nan());
        self.seq += 1;
        self.heap.push(Entry {
            key: order_key(when),
            seq: self.seq,
            item,
        });
    }

    /// Removes cancelled timers into `dead`: all of them when they dominate the heap,
    /// otherwise only those at the top, so that [`Self::next_deadline`] is a live timer's.
    /// (The caller releases `dead` after unlocking: dropping a timer can run finalizers.)
    pub fn purge(&mut self, dead: &mut Vec<T>) {
        let n = self.heap.len();
        let cancelled = self.cancelled.load(AtomicOrdering::Relaxed);
        if n > MIN_SCHEDULED && cancelled * 2 > n {
            let mut entries = std::mem::take(&mut self.heap).into_vec();
            let mut i = 0;
            while i < entries.len() {
                if entries[i].item.is_cancelled() {
                    let e = entries.swap_remove(i);
                    e.item.unschedule();
                    dead.push(e.item);
                } else {
                    i += 1;
                }
            }
            // Rebuilt from what is left; order comes from (deadline, sequence) alone.
            self.heap = BinaryHeap::from(entries);
            self.cancelled.store(0, AtomicOrdering::Relaxed);
            return;
        }
        while let Some(top) = self.heap.peek() {
            if !top.item.is_cancelled() {
                break;
            }
            let e = self.heap.pop().expect("peeked entry exists");
            e.item.unschedule();
            self.note_dropped();
            dead.push(e.item);
        }
    }

    fn note_dropped(&self) {
        // Saturating: a timer cancelled after it was counted out must not wrap.
        let _ =
            self.cancelled
                .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |c| {
                    Some(c.saturating_sub(1))
                });
    }

    /// Deadline of the earliest entry (call [`Self::purge`] first to skip cancelled ones).
    pub fn next_deadline(&self) -> Option<f64> {
        self.heap.peek().map(Entry::when)
    }

    /// Removes every live timer due before `end`, in deadline-then-FIFO order, handing
    /// each to `fire`; cancelled ones met on the way go to `dead` (see [`Self::purge`]).
    pub fn pop_due(&mut self, end: f64, dead: &mut Vec<T>, mut fire: impl FnMut(T)) {
        while let Some(top) = self.heap.peek() {
            if top.when() >= end {
                break;
            }
            let e = self.heap.pop().expect("peeked entry exists");
            e.item.unschedule();
            if e.item.is_cancelled() {
                self.note_dropped();
                dead.push(e.item);
            } else {
                fire(e.item);
            }
        }
    }

    /// Removes everything (loop close).
    pub fn clear(&mut self) -> Vec<T> {
        self.cancelled.store(0, AtomicOrdering::Relaxed);
        self.heap.drain().map(|e| e.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone)]
    struct T {
        id: u32,
        cancelled: Rc<Cell<bool>>,
        scheduled: Rc<Cell<bool>>,
    }
    impl Timer for T {
        fn is_cancelled(&self) -> bool {
            self.cancelled.get()
        }
        fn unschedule(&self) {
            self.scheduled.set(false);
        }
    }
    fn t(id: u32) -> T {
        T {
            id,
            cancelled: Rc::new(Cell::new(false)),
            scheduled: Rc::new(Cell::new(true)),
        }
    }
    fn cancel(heap: &TimerHeap<T>, t: &T) {
        t.cancelled.set(true);
        if t.scheduled.get() {
            heap.cancel_counter().fetch_add(1, AtomicOrdering::Relaxed);
        }
    }
    fn due(heap: &mut TimerHeap<T>, end: f64) -> Vec<u32> {
        let mut out = vec![];
        heap.pop_due(end, &mut vec![], |t| out.push(t.id));
        out
    }

    #[test]
    fn earliest_deadline_fires_first() {
        let mut h = TimerHeap::new();
        h.push(3.0, t(3));
        h.push(1.0, t(1));
        h.push(2.0, t(2));
        assert_eq!(due(&mut h, 10.0), vec![1, 2, 3]);
    }

    #[test]
    fn equal_deadlines_fire_in_fifo_order() {
        let mut h = TimerHeap::new();
        for id in 0..50 {
            h.push(5.0, t(id));
        }
        assert_eq!(due(&mut h, 6.0), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn timer_due_exactly_at_end_is_not_fired() {
        let mut h = TimerHeap::new();
        h.push(2.0, t(1));
        assert!(due(&mut h, 2.0).is_empty());
        assert_eq!(due(&mut h, 2.0 + 1e-9), vec![1]);
    }

    #[test]
    fn cancelled_timers_never_fire() {
        let mut h = TimerHeap::new();
        let a = t(1);
        h.push(1.0, a.clone());
        h.push(2.0, t(2));
        cancel(&h, &a);
        assert_eq!(due(&mut h, 10.0), vec![2]);
        assert_eq!(h.cancel_counter().load(AtomicOrdering::Relaxed), 0);
    }

    #[test]
    fn purge_skips_cancelled_tops_for_next_deadline() {
        let mut h = TimerHeap::new();
        let a = t(1);
        h.push(1.0, a.clone());
        h.push(4.0, t(2));
        cancel(&h, &a);
        h.purge(&mut vec![]);
        assert_eq!(h.next_deadline(), Some(4.0));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn heap_is_compacted_when_most_timers_are_cancelled() {
        let mut h = TimerHeap::new();
        let timers: Vec<T> = (0..1000).map(t).collect();
        for (i, x) in timers.iter().enumerate() {
            h.push(i as f64, x.clone());
        }
        // Cancel the late ones, which a top-only purge would never reach.
        for x in &timers[300..] {
            cancel(&h, x);
        }
        h.purge(&mut vec![]);
        assert_eq!(h.len(), 300);
        assert!(!timers[999].scheduled.get());
        assert_eq!(h.cancel_counter().load(AtomicOrdering::Relaxed), 0);
    }

    #[test]
    fn small_heap_is_not_compacted() {
        let mut h = TimerHeap::new();
        let timers: Vec<T> = (0..10).map(t).collect();
        for (i, x) in timers.iter().enumerate() {
            h.push(i as f64, x.clone());
        }
        for x in &timers[5..] {
            cancel(&h, x);
        }
        h.purge(&mut vec![]);
        assert_eq!(h.len(), 10);
        assert_eq!(due(&mut h, 100.0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn dropped_timers_are_handed_back_to_be_released_by_the_caller() {
        let mut h = TimerHeap::new();
        let timers: Vec<T> = (0..4).map(t).collect();
        for (i, x) in timers.iter().enumerate() {
            h.push(i as f64, x.clone());
        }
        cancel(&h, &timers[0]);
        cancel(&h, &timers[2]);
        let mut dead = vec![];
        h.purge(&mut dead);
        assert_eq!(dead.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0]);
        let mut fired = vec![];
        h.pop_due(10.0, &mut dead, |x| fired.push(x.id));
        assert_eq!(fired, vec![1, 3]);
        assert_eq!(dead.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0, 2]);
        assert!(timers.iter().all(|x| !x.scheduled.get()));
    }

    #[test]
    fn order_key_keeps_total_order_and_round_trips() {
        let values = [
            f64::NEG_INFINITY,
            -1e300,
            -2.5,
            -f64::MIN_POSITIVE,
            -0.0,
            0.0,
            f64::MIN_POSITIVE,
            1e-9,
            2.5,
            1e300,
            f64::INFINITY,
        ];
        for (i, a) in values.iter().enumerate() {
            assert_eq!(from_order_key(order_key(*a)).to_bits(), a.to_bits());
            for b in &values[i + 1..] {
                assert!(order_key(*a) < order_key(*b), "{a} < {b}");
            }
        }
    }

    #[test]
    fn infinite_deadline_is_never_due() {
        let mut h = TimerHeap::new();
        h.push(f64::INFINITY, t(1));
        assert!(due(&mut h, 1e300).is_empty());
        assert_eq!(h.len(), 1);
    }
}
