//! A per-CPU pool: a bounded stack of free, already scrubbed frames (or 2 MiB block bases),
//! taken from by the atomic path without locks.
//!
//! It owns the slots and the stack head. It never allocates after construction, never waits
//! and never reads a frame tag: the caller claims what it pops. Many may pop at once (the
//! owning CPU's trap handlers and other CPUs taking its surplus); only the holder of the
//! [`Filler`] token pushes, so pushes never race each other.
//!
//! The head packs the length (low 12 bits) with a generation (the 52 bits above) bumped by
//! every push and pop, so a pop that read a stale slot always fails its compare-and-swap (no
//! ABA): 2^52 operations would have to happen between a pop's load and its CAS. With the
//! length in the low 12 bits a pop is one `add #0xfff` (an aarch64 immediate).
//!
//! The slots are an inline array of `N` so the pop's bounds check compares with a constant; the
//! pool's runtime capacity (at most `N`) only limits pushes.

use alloc::vec::Vec;

use super::sync::{fence, AtomicBool, AtomicU64, Ordering};

const LEN_BITS: u32 = 12;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;
const GEN_ONE: u64 = 1 << LEN_BITS;
/// Pop: length - 1, generation + 1, in one add (length >= 1, so no borrow).
const POP_DELTA: u64 = GEN_ONE - 1;
/// Push: length + 1, generation + 1.
const PUSH_DELTA: u64 = GEN_ONE + 1;
/// Push of many: length + n, generation + 1 (one publication, one generation step).
const fn push_many_delta(n: usize) -> u64 {
    GEN_ONE + n as u64
}

/// Most slots a pool type can have: its length lives in 12 bits.
pub(crate) const MAX_SLOTS: usize = LEN_MASK as usize;

/// Head first (`repr(C)`): the pop addresses it with no offset.
#[repr(C)]
pub(crate) struct FramePool<const N: usize> {
    head: AtomicU64,
    filling: AtomicBool,
    capacity: usize,
    slots: [AtomicU64; N],
}

impl<const N: usize> FramePool<N> {
    /// A pool that holds at most `capacity` (<= `N`) entries.
    pub(crate) fn new(capacity: usize) -> FramePool<N> {
        const { assert!(N <= MAX_SLOTS) };
        FramePool {
            head: AtomicU64::new(0),
            filling: AtomicBool::new(false),
            capacity: capacity.min(N),
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries right now; Relaxed, a hint for watermarks only (it may change at once).
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        (self.head.load(Ordering::Relaxed) & LEN_MASK) as usize
    }

    /// Takes the top entry, or `None` if the pool is empty or `attempts` compare-and-swaps all
    /// lost to other poppers. Lock-free and bounded: never more than `attempts` tries.
    #[inline(always)]
    pub(crate) fn pop(&self, attempts: u32) -> Option<u64> {
        // Acquire: pairs with the push's Release, so the slot value and the frame's scrubbed
        // contents written before the push are visible here.
        let mut head = self.head.load(Ordering::Acquire);
        let mut left = attempts;
        loop {
            // Length 0 wraps to usize::MAX: one bounds check covers "empty" and "no such slot".
            let slot = self.slots.get(((head & LEN_MASK) as usize).wrapping_sub(1))?;
            let value = slot.load(Ordering::Relaxed);
            // Release on success: the pusher that reuses this slot loads the head with Acquire,
            // so it cannot overwrite the slot before our read above. Acquire on failure: the
            // fresh head is used like the first one. Weak: a spurious failure is one attempt.
            match self.head.compare_exchange_weak(
                head,
                head.wrapping_add(POP_DELTA),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(value),
                Err(now) => head = now,
            }
            left = left.saturating_sub(1);
            if left == 0 {
                return None;
            }
        }
    }

    /// The right to push, or `None` while someone else holds it. Never waits.
    pub(crate) fn filler(&self) -> Option<Filler<'_, N>> {
        // Acquire: pushes under this token come after the previous holder's.
        if self.filling.swap(true, Ordering::Acquire) {
            None
        } else {
            Some(Filler { pool: self })
        }
    }

    /// Audit: copies the entries into `out` and returns the head they were read under; the
    /// copy is consistent if [`FramePool::head`] still returns the same value afterwards.
    pub(crate) fn snapshot(&self, out: &mut Vec<u64>) -> u64 {
        out.clear();
        let head = self.head.load(Ordering::Acquire);
        let len = (head & LEN_MASK) as usize;
        // Acquire: pairs with the push's Release slot store, so if we read a slot rewritten
        // after a pop, the later head read sees that pop and the snapshot is discarded.
        out.extend(self.slots.iter().take(len).map(|s| s.load(Ordering::Acquire)));
        head
    }

    /// The head, for checking a snapshot (Acquire: ordered after the reads it validates).
    pub(crate) fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }
}

/// The token of the one pusher of a pool; dropping it lets the next one in.
pub(crate) struct Filler<'a, const N: usize> {
    pool: &'a FramePool<N>,
}

impl<const N: usize> Filler<'_, N> {
    /// Pushes `value`; gives it back if the pool is full. Bounded: a retry happens only after a
    /// pop succeeded, and pops cannot outnumber the entries present.
    pub(crate) fn push(&self, value: u64) -> Result<(), u64> {
        let pool = self.pool;
        // Acquire: pairs with the pops' Release, so a pop that read the slot we reuse is done.
        let mut head = pool.head.load(Ordering::Acquire);
        loop {
            let len = (head & LEN_MASK) as usize;
            let Some(slot) = pool.slots.get(len).filter(|_| len < pool.capacity) else {
                return Err(value);
            };
            // Release: see `snapshot`; the audit must not take a rewritten slot for a stale one.
            slot.store(value, Ordering::Release);
            // Release: publishes the slot and the scrubbed frame to poppers.
            match pool.head.compare_exchange(
                head,
                head.wrapping_add(PUSH_DELTA),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => head = now,
            }
        }
    }
}

impl<const N: usize> Filler<'_, N> {
    /// Pushes as many of the `count` values `first`, `first + step`, ... as there is room for
    /// with one publication (one head compare-and-swap for all of them) and returns how many it
    /// pushed; they pop in reverse order, as if pushed one by one. A run, not any iterator: the
    /// store loop then has one bound and one counter, about a third of the instructions per
    /// frame on the refill path. Bounded like [`Filler::push`]: a retry happens only after a
    /// pop moved the head, and then the slots are written again at the new top.
    pub(crate) fn push_run(&self, first: u64, step: u64, count: usize) -> usize {
        let pool = self.pool;
        // Acquire: pairs with the pops' Release, so a pop that read a slot we reuse is done.
        let mut head = pool.head.load(Ordering::Acquire);
        loop {
            let len = (head & LEN_MASK) as usize;
            let room = pool.capacity.saturating_sub(len);
            let Some(slots) = pool.slots.get(len..) else { return 0 };
            let n = count.min(room).min(slots.len());
            if n == 0 {
                return 0;
            }
            // Release fence, then plain stores: for the audit (see `snapshot`), one fence orders
            // everything we saw before every slot store after it, as a Release per store would.
            fence(Ordering::Release);
            // Eight per step (unrolled), then the rest: the loop's own cost once per eight.
            let (body, rest) = slots[..n].split_at(n - n % 8);
            let mut value = first;
            for eight in body.chunks_exact(8) {
                for slot in eight {
                    slot.store(value, Ordering::Relaxed);
                    value = value.wrapping_add(step);
                }
            }
            for slot in rest {
                slot.store(value, Ordering::Relaxed);
                value = value.wrapping_add(step);
            }
            // Release: publishes every slot and scrubbed frame to poppers at once.
            match pool.head.compare_exchange(
                head,
                head.wrapping_add(push_many_delta(n)),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return n,
                Err(now) => head = now,
            }
        }
    }
}

impl<const N: usize> Drop for Filler<'_, N> {
    fn drop(&mut self) {
        // Release: the next holder sees our pushes complete.
        self.pool.filling.store(false, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    // Pops come back in reverse push order, and an empty pool says so.
    #[test]
    fn pops_are_last_in_first_out() {
        let pool = FramePool::<8>::new(4);
        let filler = pool.filler().unwrap();
        for v in [10, 11, 12] {
            filler.push(v).unwrap();
        }
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.pop(1), Some(12));
        assert_eq!(pool.pop(1), Some(11));
        assert_eq!(pool.pop(1), Some(10));
        assert_eq!(pool.pop(1), None);
        assert_eq!(pool.len(), 0);
    }

    // A full pool refuses a push and hands the value back.
    #[test]
    fn full_pool_refuses_push() {
        let pool = FramePool::<8>::new(2);
        let filler = pool.filler().unwrap();
        filler.push(1).unwrap();
        filler.push(2).unwrap();
        assert_eq!(filler.push(3), Err(3));
        assert_eq!(pool.len(), 2);
    }

    // A pool holds no more than its runtime capacity, even with more slots.
    #[test]
    fn capacity_below_slots_limits_pushes() {
        let pool = FramePool::<8>::new(1);
        let filler = pool.filler().unwrap();
        filler.push(1).unwrap();
        assert_eq!(filler.push(2), Err(2));
        assert_eq!(pool.capacity(), 1);
    }

    // A zero-capacity pool is always empty and always full.
    #[test]
    fn zero_capacity_pool_is_empty_and_full() {
        let pool = FramePool::<8>::new(0);
        assert_eq!(pool.pop(4), None);
        assert_eq!(pool.filler().unwrap().push(1), Err(1));
    }

    // Only one pusher at a time: the token is exclusive until dropped.
    #[test]
    fn filler_token_is_exclusive() {
        let pool = FramePool::<8>::new(1);
        let first = pool.filler().unwrap();
        assert!(pool.filler().is_none());
        drop(first);
        assert!(pool.filler().is_some());
    }

    // Every push and pop bumps the generation, so equal lengths never mean equal heads.
    #[test]
    fn generation_changes_on_every_operation() {
        let pool = FramePool::<8>::new(2);
        let before = pool.head();
        pool.filler().unwrap().push(5).unwrap();
        pool.pop(1).unwrap();
        let after = pool.head();
        assert_eq!(before & LEN_MASK, after & LEN_MASK);
        assert_ne!(before, after);
    }

    // A snapshot lists the entries bottom to top and validates against the head.
    #[test]
    fn snapshot_lists_entries_and_detects_change() {
        let pool = FramePool::<8>::new(4);
        let filler = pool.filler().unwrap();
        filler.push(7).unwrap();
        filler.push(8).unwrap();
        let mut out = Vec::new();
        let head = pool.snapshot(&mut out);
        assert_eq!(out, [7, 8]);
        assert_eq!(pool.head(), head);
        pool.pop(1).unwrap();
        assert_ne!(pool.head(), head);
    }

    // A bulk push fills up to capacity in one publication and pops in reverse order.
    #[test]
    fn push_run_stops_at_capacity_and_pops_in_reverse() {
        let pool = FramePool::<8>::new(5);
        let filler = pool.filler().unwrap();
        filler.push(1).unwrap();
        let before = pool.head();
        assert_eq!(filler.push_run(10, 1, 10), 4);
        assert_eq!(pool.head() >> LEN_BITS, (before >> LEN_BITS) + 1, "one generation step");
        assert_eq!(filler.push_run(30, 1, 1), 0, "full");
        let popped: Vec<u64> = core::iter::from_fn(|| pool.pop(1)).collect();
        assert_eq!(popped, [13, 12, 11, 10, 1]);
    }

    // A bulk push of nothing changes nothing.
    #[test]
    fn push_run_of_nothing_leaves_the_head() {
        let pool = FramePool::<8>::new(4);
        let before = pool.head();
        assert_eq!(pool.filler().unwrap().push_run(5, 1, 0), 0);
        assert_eq!(pool.head(), before);
    }

    // Two threads popping a shared pool get every entry exactly once between them.
    #[test]
    fn concurrent_pops_never_duplicate() {
        let pool = FramePool::<4000>::new(4000);
        let filler = pool.filler().unwrap();
        for v in 0..4000 {
            filler.push(v).unwrap();
        }
        drop(filler);
        let taken: Vec<Vec<u64>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        while pool.len() > 0 {
                            if let Some(v) = pool.pop(8) {
                                got.push(v);
                            }
                        }
                        got
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..4000).collect::<Vec<_>>());
    }
}
