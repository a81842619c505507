//! Proof that a frame was just claimed for a guest by the atomic path.
//!
//! The stage-2 fast path maps the frame a fault has just taken. Re-reading its tag there would
//! check what the claim's compare-and-swap has already established, so the claim hands over a
//! [`ClaimedPage`] instead: only this module's crate makes one, and only right after that CAS
//! succeeded, so holding one means "the frame database tags this frame as guest `vm`'s, and
//! nobody else knows the frame yet". It is not `Clone`: a claim maps at most once.

use super::tag::VmId;
use super::Pfn;

/// A 4 KiB frame tagged as guest `vm`'s by the atomic path's claim, not yet mapped anywhere.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimedPage {
    pfn: Pfn,
    vm: VmId,
}

impl ClaimedPage {
    /// Made by the atomic path right after its claim succeeded (and by tests that play it).
    pub(crate) fn new(pfn: Pfn, vm: VmId) -> Self {
        ClaimedPage { pfn, vm }
    }

    /// A claim the checking model stands in for: the model env tags the frame itself.
    #[cfg(any(test, feature = "model"))]
    pub fn assume(pfn: Pfn, vm: VmId) -> Self {
        ClaimedPage { pfn, vm }
    }

    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    pub fn vm(&self) -> VmId {
        self.vm
    }
}
