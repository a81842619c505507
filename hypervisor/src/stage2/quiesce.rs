//! Quiescent points: when a table page that left a guest's tree may be freed. EL2 has no RCU,
//! so each vCPU of the guest publishes the space's epoch whenever it holds no table pointer
//! (a quiescent point: a guest entry or exit, outside the fault path), and a retired page goes
//! only once every vCPU has published a later epoch than the one it was retired at.
//!
//! The rule the caller keeps: call [`Quiescence::pass`] on a quiescent point of each vCPU that
//! runs the guest (the vCPU's own [`super::FaultCache`] may stay: it is checked against the
//! epoch before every use); [`Quiescence::offline`] when a vCPU stops running it, and
//! [`Quiescence::online`] before it runs it again; then
//! `s2.drain_retired(env, q.oldest())` from any CPU, at any time. A vCPU that stays in the
//! guest without exits holds back every free until it exits (kick it if that matters).

use super::sync::{AtomicU64, Ordering};
use super::table::Stage2;

/// A vCPU that holds nothing and blocks nothing.
const OFFLINE: u64 = u64::MAX;

/// The epoch each vCPU of one guest published at its last quiescent point.
pub struct Quiescence<const VCPUS: usize> {
    seen: [AtomicU64; VCPUS],
}

impl<const VCPUS: usize> Default for Quiescence<VCPUS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const VCPUS: usize> Quiescence<VCPUS> {
    /// Every vCPU offline.
    pub fn new() -> Self {
        Quiescence { seen: core::array::from_fn(|_| AtomicU64::new(OFFLINE)) }
    }

    /// vCPU `vcpu` holds no pointer into the tables it found before now.
    #[inline]
    pub fn pass(&self, vcpu: usize, s2: &Stage2) {
        if let Some(seen) = self.seen.get(vcpu) {
            seen.store(s2.epoch(), Ordering::SeqCst);
        }
    }

    /// vCPU `vcpu` starts running the guest. It first blocks every free (0), then publishes the
    /// epoch it reads: a drain that missed the 0 had moved the epoch before this read, so the
    /// vCPU cannot find a page that drain frees.
    pub fn online(&self, vcpu: usize, s2: &Stage2) {
        if let Some(seen) = self.seen.get(vcpu) {
            seen.store(0, Ordering::SeqCst);
            seen.store(s2.epoch(), Ordering::SeqCst);
        }
    }

    /// vCPU `vcpu` stopped running the guest (it holds no table pointer).
    pub fn offline(&self, vcpu: usize) {
        if let Some(seen) = self.seen.get(vcpu) {
            seen.store(OFFLINE, Ordering::SeqCst);
        }
    }

    /// The oldest epoch any vCPU published: table pages retired before it can be freed.
    pub fn oldest(&self) -> u64 {
        self.seen.iter().map(|s| s.load(Ordering::SeqCst)).min().unwrap_or(OFFLINE)
    }
}
