//! Host frames: who owns every 4 KiB frame of RAM, and how frames move between owners.
//!
//! This module owns:
//! - the frame database ([`FrameDb`]): one atomic 16-bit ownership tag per frame of every RAM
//!   bank (holes included, tagged absent), changed only by compare-and-swap transitions;
//! - the buddy allocator (`BuddyFrames`, a guarded `buddy_system_allocator::FrameAllocator`)
//!   holding every free frame that is not in a per-CPU pool;
//! - the per-CPU pools and the atomic, non-blocking allocation path
//!   ([`CpuFrames::alloc_page_atomic_exclusive`]), callable from a trap handler;
//! - release (scrub, then free) and the ownership audit ([`AuditReport`]).
//!
//! It must never: touch physical memory itself (zeroing and cache maintenance go through
//! [`FrameScrubber`], the heap through [`HeapSink`]), let a frame have two owners, overwrite a
//! tag without checking what it held, take a lock or allocate on the atomic path, or hand out a
//! frame that was not zeroed and cleaned since its last owner.
//!
//! The ownership model, the boot order and the figures are in `docs/memory.md`.

mod audit;
mod buddy;
mod claimed;
mod db;
mod error;
mod heap;
mod manager;
mod pool;
mod promise;
mod scrub;
mod sync;
mod tag;
mod unpromised;

/// The `frame_ops` fuzz harness, shared by the fuzz target and the host tests.
#[cfg(all(any(test, feature = "model"), not(loom)))]
pub mod exercise;
#[cfg(test)]
pub(crate) mod testing;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod manager_tests;
#[cfg(all(test, not(loom)))]
mod model_tests;
#[cfg(all(test, not(loom)))]
mod stress_tests;

pub use audit::{AuditProblem, AuditReport, GuestFrames, Holder};
pub use claimed::{Claimed, ClaimedBlock, ClaimedPage};
pub use db::{FrameDb, TagCell};
pub use error::{AtomicError, FrameError};
pub use heap::HeapSink;
pub use manager::{CpuFrames, FrameManager, PoolConfig, RefillReport, BLOCK_POOL_SLOTS, PAGE_POOL_SLOTS};
pub use promise::Promise;
pub use scrub::FrameScrubber;
pub use tag::{FrameState, Owner, VmId};
pub use unpromised::{take_if_there, Unpromised};

/// log2 of the frame size.
pub const FRAME_SHIFT: u32 = 12;
/// Bytes in a host frame.
pub const FRAME_SIZE: u64 = 1 << FRAME_SHIFT;
/// Frames in a 2 MiB block (one level-2 block mapping with 4 KiB granules).
pub const BLOCK_FRAMES: usize = 512;
/// Bytes in a 2 MiB block.
pub const BLOCK_SIZE: u64 = FRAME_SIZE * BLOCK_FRAMES as u64;

/// A physical frame number: the physical address shifted right by [`FRAME_SHIFT`].
///
/// Always absolute (never relative to a RAM bank), so the same number means the same frame in
/// the database, the allocator, the pools and the page tables.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame starting at `addr`, or `None` if `addr` is not frame-aligned.
    pub const fn from_phys(addr: u64) -> Option<Pfn> {
        if addr.is_multiple_of(FRAME_SIZE) {
            Some(Pfn(addr >> FRAME_SHIFT))
        } else {
            None
        }
    }

    /// The physical address of the frame's first byte.
    pub const fn phys(self) -> u64 {
        self.0 << FRAME_SHIFT
    }

    /// The frame `frames` after this one.
    pub const fn add(self, frames: u64) -> Pfn {
        Pfn(self.0 + frames)
    }
}

impl core::fmt::Display for Pfn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "frame {:#x}", self.phys())
    }
}

/// Converts a physical `(start, end)` byte range (end exclusive) into frame numbers.
/// Both ends must be frame-aligned and `start < end`: the memory map rounds RAM inward and
/// reservations outward before they get here, so a misaligned edge is a caller bug.
pub(crate) fn frames_of(range: (u64, u64)) -> Result<(Pfn, Pfn), FrameError> {
    let (start, end) = range;
    match (Pfn::from_phys(start), Pfn::from_phys(end)) {
        (Some(first), Some(last)) if first < last => Ok((first, last)),
        (Some(_), Some(_)) => Err(FrameError::EmptyRange { start, end }),
        _ => Err(FrameError::Misaligned { start, end }),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    // A physical address converts to its frame and back only when aligned.
    #[test]
    fn pfn_round_trips_aligned_addresses_only() {
        assert_eq!(Pfn::from_phys(0x4000_1000), Some(Pfn(0x40001)));
        assert_eq!(Pfn(0x40001).phys(), 0x4000_1000);
        assert_eq!(Pfn::from_phys(0x4000_1008), None);
    }

    // Ranges must be aligned and non-empty; the error says which.
    #[test]
    fn frames_of_rejects_misaligned_and_empty_ranges() {
        assert_eq!(frames_of((0x1000, 0x3000)), Ok((Pfn(1), Pfn(3))));
        assert_eq!(frames_of((0x1000, 0x1800)), Err(FrameError::Misaligned { start: 0x1000, end: 0x1800 }));
        assert_eq!(frames_of((0x3000, 0x1000)), Err(FrameError::EmptyRange { start: 0x3000, end: 0x1000 }));
    }
}
