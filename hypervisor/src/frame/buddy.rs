//! The buddy allocator: `buddy_system_allocator::FrameAllocator`, holding every free frame
//! that is not in a per-CPU pool, behind a wrapper that keeps it away from the crate's edges.
//!
//! It owns the free lists and nothing else: it never reads or writes a tag and never touches
//! frame contents. Its callers (the manager, under its lock) hand it only frames the database
//! has just shown to be free and exclusively theirs. It is slow-path only: the crate keeps a
//! `BTreeSet` per order, so every call may allocate from the heap and takes a time that
//! depends on the free lists: never call it from a trap handler.
//!
//! The crate's edges (each has a regression test below showing the crate's behaviour and one
//! showing the wrapper is immune):
//! - `dealloc` validates nothing: freeing a frame twice makes the allocator hand it out
//!   twice. The wrapper is only fed frames whose release the frame database checked.
//! - With order `ORDER`, freeing both halves of a maximum-order pair drops the merged block
//!   on the floor. The wrapper refuses spans over 2^(ORDER-1) frames, so no such pair can
//!   ever be free.
//! - `add_frame` caps a block starting at frame 0 at 32 frames, so RAM at physical 0 could
//!   never yield a 2 MiB block. The wrapper offsets every frame number by 2^ORDER (a multiple
//!   of every block size, so alignment is kept) and never passes 0.
//! - `dealloc` subtracts from a private `allocated` counter, which underflows (a panic with
//!   overflow checks) for frames the allocator never handed out, such as boot frames released
//!   later. The wrapper mirrors that counter and adds such frames with `add_frame` instead.

use alloc::vec::Vec;
use buddy_system_allocator::FrameAllocator;

use super::error::FrameError;
use super::Pfn;

/// A `FrameAllocator` over absolute frame numbers in one bounded span.
pub(crate) struct BuddyFrames<const ORDER: usize = 32> {
    inner: FrameAllocator<ORDER>,
    first: u64,
    end: u64,
    /// Frames currently held (free) in `inner`.
    free: usize,
    /// Mirror of the crate's private `allocated`: frames handed out and not yet dealloc'd.
    lent: usize,
}

impl<const ORDER: usize> BuddyFrames<ORDER> {
    /// The largest block, in frames: the crate's top order.
    pub(crate) const MAX_BLOCK_FRAMES: usize = 1 << (ORDER - 1);
    /// Added to every frame number handed to the crate: never 0, and a multiple of every block.
    const BIAS: u64 = 1 << ORDER;

    /// An empty allocator for frames in `first..end`; refuses spans its `ORDER` cannot hold
    /// without losing blocks.
    pub(crate) fn new(first: Pfn, end: Pfn) -> Result<Self, FrameError> {
        // 2 MiB blocks (order 9) must fit, and biased frame numbers must fit 64 bits.
        const { assert!(ORDER >= 10 && ORDER <= 40) };
        let frames = end.0.saturating_sub(first.0) as usize;
        if frames > Self::MAX_BLOCK_FRAMES {
            return Err(FrameError::SpanTooLarge { frames, max: Self::MAX_BLOCK_FRAMES });
        }
        Ok(BuddyFrames { inner: FrameAllocator::new(), first: first.0, end: end.0, free: 0, lent: 0 })
    }

    /// Frames held free in the allocator.
    pub(crate) fn free_frames(&self) -> usize {
        self.free
    }

    /// Allocates `frames` frames (a power of two up to [`Self::MAX_BLOCK_FRAMES`]), aligned to
    /// their count. The caller must then claim them in the database.
    pub(crate) fn alloc(&mut self, frames: usize) -> Result<Pfn, FrameError> {
        if !frames.is_power_of_two() || frames > Self::MAX_BLOCK_FRAMES {
            return Err(FrameError::BadFrameCount(frames));
        }
        let biased = self.inner.alloc(frames).ok_or(FrameError::OutOfFrames)?;
        self.free -= frames;
        self.lent += frames;
        Ok(Pfn(biased as u64 - Self::BIAS))
    }

    /// Takes frames that are free in the database and held by no one (boot ranges, or frames
    /// just released and scrubbed). Merges with free neighbours where the crate allows.
    pub(crate) fn give_back(&mut self, first: Pfn, frames: usize) -> Result<(), FrameError> {
        let end = first.0.checked_add(frames as u64).ok_or(FrameError::OutOfRange(first))?;
        if first.0 < self.first || end > self.end {
            return Err(FrameError::OutOfRange(first));
        }
        let mut pfn = first.0;
        while pfn < end {
            // The largest aligned power-of-two chunk starting here that fits.
            let biased = pfn + Self::BIAS;
            let align = 1u64 << biased.trailing_zeros();
            let fit = prev_power_of_two(end - pfn);
            let size = align.min(fit).min(Self::MAX_BLOCK_FRAMES as u64) as usize;
            if self.lent >= size {
                self.inner.dealloc(biased as usize, size);
                self.lent -= size;
            } else {
                // Never lent by the crate: `dealloc` would underflow its counter.
                self.inner.add_frame(biased as usize, biased as usize + size);
            }
            self.free += size;
            pfn += size as u64;
        }
        Ok(())
    }

    /// Audit: calls `visit(first, frames)` for every free block, by taking every block out of
    /// the crate (largest order first, so none is split) and putting each back.
    pub(crate) fn for_each_block(&mut self, mut visit: impl FnMut(Pfn, usize)) {
        let mut blocks = Vec::new();
        for order in (0..ORDER).rev() {
            while let Some(biased) = self.inner.alloc(1 << order) {
                blocks.push((biased, 1usize << order));
            }
        }
        for &(biased, frames) in &blocks {
            visit(Pfn(biased as u64 - Self::BIAS), frames);
        }
        // Balanced alloc/dealloc pairs: the crate's counter, and our mirror, end where they began.
        for &(biased, frames) in &blocks {
            self.inner.dealloc(biased, frames);
        }
    }
}

fn prev_power_of_two(n: u64) -> u64 {
    1 << (63 - n.leading_zeros())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn blocks<const O: usize>(buddy: &mut BuddyFrames<O>) -> Vec<(Pfn, usize)> {
        let mut out = Vec::new();
        buddy.for_each_block(|pfn, n| out.push((pfn, n)));
        out.sort();
        out
    }

    // Crate edge: `dealloc` checks nothing, so a double free makes it hand out one frame twice.
    #[test]
    fn crate_double_dealloc_hands_a_frame_out_twice() {
        let mut fa = FrameAllocator::<32>::new();
        fa.add_frame(0x40000, 0x40004);
        let a = fa.alloc(1).unwrap();
        let b = fa.alloc(1).unwrap();
        let _c = fa.alloc(1).unwrap(); // stays allocated, so the crate's counter cannot underflow
        fa.dealloc(a, 1);
        fa.dealloc(b, 1); // merges a and b into one 2-frame block
        fa.dealloc(a, 1); // the double free: a is now free both alone and inside that block
        let mut seen = Vec::new();
        while let Some(f) = fa.alloc(1) {
            seen.push(f);
        }
        let distinct: BTreeSet<_> = seen.iter().collect();
        assert!(distinct.len() < seen.len(), "crate now validates dealloc: {seen:x?}");
    }

    // Crate edge: with a small ORDER, freeing both halves of a maximum-order pair loses both.
    #[test]
    fn crate_loses_a_freed_maximum_order_pair() {
        let mut fa = FrameAllocator::<4>::new(); // maximum block: 8 frames
        fa.add_frame(16, 32);
        let a = fa.alloc(8).unwrap();
        let b = fa.alloc(8).unwrap();
        fa.dealloc(a, 8);
        fa.dealloc(b, 8);
        assert_eq!(fa.alloc(1), None, "crate now keeps merged maximum-order blocks");
    }

    // Crate edge: a block starting at frame 0 is capped at 32 frames, so no 2 MiB block there.
    #[test]
    fn crate_caps_block_at_frame_zero() {
        let mut at_zero = FrameAllocator::<32>::new();
        at_zero.add_frame(0, 512);
        assert_eq!(at_zero.alloc(512), None, "crate now builds full blocks at frame 0");
        let mut elsewhere = FrameAllocator::<32>::new();
        elsewhere.add_frame(512, 1024);
        assert_eq!(elsewhere.alloc(512), Some(512));
    }

    // Crate edge: `dealloc` of frames it never handed out underflows its private counter
    // (a panic in builds with overflow checks, like this test build).
    #[test]
    #[cfg(debug_assertions)]
    fn crate_dealloc_of_never_lent_frames_underflows() {
        let result = std::panic::catch_unwind(|| {
            let mut fa = FrameAllocator::<32>::new();
            fa.dealloc(0x40000, 1);
        });
        assert!(result.is_err(), "crate no longer underflows on foreign dealloc");
    }

    // Wrapper: a span the ORDER cannot hold safely is refused; one it can never loses frames
    // through a cycle that frees both maximum-order blocks.
    #[test]
    fn wrapper_refuses_spans_where_pairs_could_be_lost() {
        assert_eq!(
            BuddyFrames::<10>::new(Pfn(0), Pfn(1024)).err(),
            Some(FrameError::SpanTooLarge { frames: 1024, max: 512 })
        );
        let mut buddy = BuddyFrames::<10>::new(Pfn(512), Pfn(1024)).unwrap();
        buddy.give_back(Pfn(512), 512).unwrap();
        for _ in 0..3 {
            let block = buddy.alloc(512).unwrap();
            buddy.give_back(block, 512).unwrap();
        }
        assert_eq!(buddy.free_frames(), 512);
        assert_eq!(blocks(&mut buddy), vec![(Pfn(512), 512)]);
    }

    // Wrapper: RAM at physical 0 still yields 2 MiB blocks.
    #[test]
    fn wrapper_builds_full_blocks_at_frame_zero() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0), Pfn(1024)).unwrap();
        buddy.give_back(Pfn(0), 1024).unwrap();
        assert_eq!(buddy.alloc(512), Ok(Pfn(0)));
        assert_eq!(buddy.alloc(512), Ok(Pfn(512)));
    }

    // Wrapper: releasing frames the allocator never lent (boot frames) does not underflow, and
    // they become allocatable.
    #[test]
    fn wrapper_takes_never_lent_frames_without_underflow() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0x40000), Pfn(0x40010)).unwrap();
        buddy.give_back(Pfn(0x40004), 4).unwrap();
        assert_eq!(buddy.free_frames(), 4);
        assert_eq!(buddy.alloc(4), Ok(Pfn(0x40004)));
    }

    // Wrapper: frames outside the span are refused, so the span bound cannot be bypassed.
    #[test]
    fn wrapper_refuses_frames_outside_its_span() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0x40000), Pfn(0x40010)).unwrap();
        assert_eq!(buddy.give_back(Pfn(0x4000f), 2), Err(FrameError::OutOfRange(Pfn(0x4000f))));
        assert_eq!(buddy.give_back(Pfn(0x3ffff), 1), Err(FrameError::OutOfRange(Pfn(0x3ffff))));
        assert_eq!(buddy.free_frames(), 0);
    }

    // Wrapper: counts must be powers of two no larger than the top order.
    #[test]
    fn wrapper_rejects_bad_counts() {
        let mut buddy = BuddyFrames::<10>::new(Pfn(0), Pfn(512)).unwrap();
        buddy.give_back(Pfn(0), 512).unwrap();
        assert_eq!(buddy.alloc(3), Err(FrameError::BadFrameCount(3)));
        assert_eq!(buddy.alloc(0), Err(FrameError::BadFrameCount(0)));
        assert_eq!(buddy.alloc(1024), Err(FrameError::BadFrameCount(1024)));
        assert_eq!(buddy.free_frames(), 512);
    }

    // Allocations are aligned to their size and never overlap.
    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0x40003), Pfn(0x40803)).unwrap();
        buddy.give_back(Pfn(0x40003), 0x800).unwrap();
        let mut taken = BTreeSet::new();
        for frames in [1, 512, 8, 2, 64, 1, 256] {
            let first = buddy.alloc(frames).unwrap();
            assert_eq!(first.0 % frames as u64, 0, "{first} for {frames}");
            for f in first.0..first.0 + frames as u64 {
                assert!(taken.insert(f), "frame {f:#x} handed out twice");
            }
        }
    }

    // Released frames merge back: after everything is returned, the free blocks are the same
    // maximal blocks as before.
    #[test]
    fn give_back_merges_buddies() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0x40000), Pfn(0x40400)).unwrap();
        buddy.give_back(Pfn(0x40000), 0x400).unwrap();
        let before = blocks(&mut buddy);
        let pages: Vec<Pfn> = (0..0x400).map(|_| buddy.alloc(1).unwrap()).collect();
        assert_eq!(buddy.alloc(1), Err(FrameError::OutOfFrames));
        for pfn in pages {
            buddy.give_back(pfn, 1).unwrap();
        }
        assert_eq!(blocks(&mut buddy), before);
        assert_eq!(buddy.free_frames(), 0x400);
    }

    // The audit walk sees every free frame once and leaves the allocator as it was.
    #[test]
    fn for_each_block_visits_all_and_restores() {
        let mut buddy = BuddyFrames::<32>::new(Pfn(0x40000), Pfn(0x40100)).unwrap();
        buddy.give_back(Pfn(0x40001), 0xfe).unwrap();
        let held = buddy.alloc(16).unwrap();
        let first = blocks(&mut buddy);
        let total: usize = first.iter().map(|&(_, n)| n).sum();
        assert_eq!(total, 0xfe - 16);
        assert!(first.iter().all(|&(p, n)| p.0 + n as u64 <= held.0 || p.0 >= held.0 + 16));
        assert_eq!(blocks(&mut buddy), first);
        assert_eq!(buddy.free_frames(), 0xfe - 16);
    }
}
