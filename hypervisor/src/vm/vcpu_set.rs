//! A set of one guest's vCPUs, by index: whom an interrupt targets, who must be kicked, who
//! is still inside the guest.

use crate::dt::MAX_VCPUS;

/// A set of a guest's vCPUs, by index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuSet(u32);

const _: () = assert!(MAX_VCPUS <= 32, "VcpuSet holds up to 32 vCPUs");

impl VcpuSet {
    pub const EMPTY: VcpuSet = VcpuSet(0);

    /// vCPUs `0..n`.
    pub const fn first(n: usize) -> VcpuSet {
        if n >= 32 {
            VcpuSet(u32::MAX)
        } else {
            VcpuSet((1 << n) - 1)
        }
    }

    pub const fn only(vcpu: usize) -> VcpuSet {
        VcpuSet::EMPTY.with(vcpu)
    }

    /// This set and `vcpu` (an index beyond the set's range is ignored).
    pub const fn with(self, vcpu: usize) -> VcpuSet {
        if vcpu < 32 {
            VcpuSet(self.0 | 1 << vcpu)
        } else {
            self
        }
    }

    pub const fn without(self, vcpu: usize) -> VcpuSet {
        if vcpu < 32 {
            VcpuSet(self.0 & !(1 << vcpu))
        } else {
            self
        }
    }

    pub const fn union(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 | other.0)
    }

    pub const fn intersection(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 & other.0)
    }

    pub const fn contains(self, vcpu: usize) -> bool {
        vcpu < 32 && self.0 & (1 << vcpu) != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// One bit per vCPU, vCPU 0 in bit 0.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The vCPUs in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        // One step per member (lowest set bit), not one per possible vCPU.
        let mut bits = self.0;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iter_yields_exactly_the_members_lowest_first() {
        assert_eq!(VcpuSet::EMPTY.iter().count(), 0);
        let s = VcpuSet::only(31).with(0).with(5);
        assert_eq!(s.iter().collect::<std::vec::Vec<_>>(), [0, 5, 31]);
        assert_eq!(VcpuSet::first(32).iter().count(), 32);
    }
}
