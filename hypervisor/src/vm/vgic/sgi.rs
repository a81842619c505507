//! Software-generated interrupts: decoding a trapped write of `ICC_SGI1R_EL1` (or `ASGI1R`,
//! `SGI0R`, same layout) into an INTID and the set of vCPUs it targets.
//!
//! vCPU `i` of a guest has MPIDR Aff0 = `i` and Aff1..Aff3 = 0; targets that name no vCPU
//! are dropped, as a GIC drops SGIs to PEs that do not exist.

use super::{VcpuSet, MAX_VCPUS};

// ICC_SGI1R_EL1 fields (ASGI1R and SGI0R share them).
const TARGET_LIST: u64 = 0xffff;
const AFF1_SHIFT: u32 = 16;
const INTID_SHIFT: u32 = 24;
const INTID_MASK: u64 = 0xf;
const AFF2_SHIFT: u32 = 32;
/// Interrupt Routing Mode: every PE but the sender.
const IRM: u64 = 1 << 40;
/// Range Selector: the target list names Aff0 values RS * 16 + bit.
const RS_SHIFT: u32 = 44;
const RS_MASK: u64 = 0xf;
const AFF3_SHIFT: u32 = 48;
const AFF_MASK: u64 = 0xff;

/// The SGI a write of `value` to `ICC_SGI1R_EL1` by vCPU `sender` raises, and the vCPUs (of
/// `vcpus`) it reaches. The sender is a target like any other when the list names it.
pub fn sgi_targets(sender: usize, value: u64, vcpus: usize) -> (u32, VcpuSet) {
    let intid = ((value >> INTID_SHIFT) & INTID_MASK) as u32;
    let all = VcpuSet::first(vcpus.min(MAX_VCPUS));
    if value & IRM != 0 {
        return (intid, all.without(sender));
    }
    let upper = [AFF1_SHIFT, AFF2_SHIFT, AFF3_SHIFT].iter().any(|&s| (value >> s) & AFF_MASK != 0);
    if upper {
        return (intid, VcpuSet::EMPTY);
    }
    let base = ((value >> RS_SHIFT) & RS_MASK) as usize * 16;
    let list = value & TARGET_LIST;
    let set = (0..16).filter(|bit| list & (1 << bit) != 0).fold(VcpuSet::EMPTY, |s, bit| s.with(base + bit));
    (intid, set.intersection(all))
}
