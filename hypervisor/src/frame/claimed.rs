//! Proof that frames were just claimed for a guest by the atomic path.
//!
//! The stage-2 fast paths map what a fault has just taken. Re-reading the tags there would
//! check what the claim's compare-and-swap has already established, so the claim hands over a
//! [`Claimed`] instead: only this crate makes one, and only right after that CAS succeeded, so
//! holding one means "the frame database tags these frames as guest `vm`'s (a block as one
//! unit), and nobody else knows them yet". It is not `Clone`: a claim maps at most once.

use super::tag::VmId;
use super::{Pfn, BLOCK_FRAMES};

/// `FRAMES` frames from `first` (aligned to their size), tagged as guest `vm`'s by the atomic
/// path's claim, not yet mapped anywhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Claimed<const FRAMES: usize> {
    first: Pfn,
    vm: VmId,
}

/// One 4 KiB frame.
pub type ClaimedPage = Claimed<1>;
/// One 2 MiB block, owned as one unit.
pub type ClaimedBlock = Claimed<BLOCK_FRAMES>;

impl<const FRAMES: usize> Claimed<FRAMES> {
    /// Made by the atomic path right after its claim succeeded.
    pub(crate) fn new(first: Pfn, vm: VmId) -> Self {
        Claimed { first, vm }
    }

    /// A claim the checking model stands in for: the model env tags the frames itself.
    #[cfg(any(test, feature = "model"))]
    pub fn assume(first: Pfn, vm: VmId) -> Self {
        Claimed { first, vm }
    }

    pub fn pfn(&self) -> Pfn {
        self.first
    }

    pub fn vm(&self) -> VmId {
        self.vm
    }
}
