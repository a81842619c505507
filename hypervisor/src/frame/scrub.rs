//! The one door to frame contents: zeroing and cleaning, implemented by the arch.
//!
//! The frame module decides *when* a frame is scrubbed (on release, and every free frame once
//! at boot); the arch decides *how* (at EL2: `DC ZVA` over the frame through its mapping, then
//! `DC CVAC` to the point of coherency and a `DSB`, so a guest running with its MMU off, whose
//! accesses are non-cacheable, reads zeros too). Tests implement it over fake memory.
//! Nothing here may be called on the atomic path: pooled frames are already scrubbed.

use super::Pfn;

/// Zeroes frames and cleans them to the point of coherency; reads them back for the audit.
pub trait FrameScrubber {
    /// Zero the `frames` frames from `first` and clean them to the point of coherency.
    /// Returns only when both are complete (the arch ends with `DSB`).
    fn scrub(&self, first: Pfn, frames: usize);

    /// Whether every byte of the frame reads zero. Audit only: it may be slow.
    fn reads_zero(&self, pfn: Pfn) -> bool;
}
