//! Hardware VMIDs (8-bit: `VTCR_EL2.VS` = 0). A VMID tags every TLB entry of its guest, so it is
//! handed to a new guest only after the old guest's entries are gone: releasing one needs the
//! proof that [`super::Stage2::teardown`] returns after its `TLBI VMALLS12E1IS`.

/// Proof that every TLB entry tagged with a VMID has been invalidated.
#[derive(Debug)]
pub struct VmidInvalidated(pub(super) u16);

impl VmidInvalidated {
    pub fn vmid(&self) -> u16 {
        self.0
    }
}

/// VMIDs 1..=255; 0 is never given to a guest, so "no guest" is never a guest's tag.
pub struct VmidAllocator {
    used: [u64; 4],
}

impl Default for VmidAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl VmidAllocator {
    pub const fn new() -> Self {
        VmidAllocator { used: [1, 0, 0, 0] }
    }

    /// The lowest free VMID, or `None` when all 255 are in use.
    pub fn alloc(&mut self) -> Option<u16> {
        for (w, word) in self.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = (!*word).trailing_zeros();
                *word |= 1 << bit;
                return Some((w as u16) * 64 + bit as u16);
            }
        }
        None
    }

    /// Makes a VMID available again, given the proof its TLB entries are gone.
    pub fn release(&mut self, proof: VmidInvalidated) {
        let v = proof.0 as usize;
        if v != 0 && v < 256 {
            self.used[v / 64] &= !(1 << (v % 64));
        }
    }

    pub fn in_use(&self, vmid: u16) -> bool {
        (vmid as usize) < 256 && self.used[vmid as usize / 64] & (1 << (vmid % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_1_to_255_then_none() {
        let mut a = VmidAllocator::new();
        for want in 1..=255u16 {
            assert_eq!(a.alloc(), Some(want));
        }
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn reuses_only_after_release_with_proof() {
        let mut a = VmidAllocator::new();
        let v = a.alloc().unwrap();
        let w = a.alloc().unwrap();
        assert_ne!(v, w);
        a.release(VmidInvalidated(v));
        assert!(!a.in_use(v));
        assert_eq!(a.alloc(), Some(v));
    }
}
