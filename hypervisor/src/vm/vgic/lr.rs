//! Moving interrupt state between the model and one vCPU's list registers (`ICH_LR<n>_EL2`):
//! `fold` takes back what the hardware left in them, `refill` fills them by priority.
//!
//! The caller holds the vCPU's redistributor and the distributor; the vCPU's SGIs and PPIs
//! come from its redistributor, SPIs from the distributor when the vCPU owns them (their
//! holder, else their IROUTER target), and an SPI in a list register is held by that vCPU
//! alone until it comes back.

use super::bank::{bit, GroupEnables};
use super::dist::{Distributor, SPI_WORDS};
use super::redist::Redistributor;
use super::NR_IRQS;

// ICH_LR<n>_EL2 fields.
pub const LR_INTID: u64 = 0xffff_ffff;
/// With HW = 0: a maintenance interrupt when the guest deactivates the interrupt.
pub const LR_EOI: u64 = 1 << 41;
pub const LR_PRIORITY_SHIFT: u32 = 48;
pub const LR_GROUP1: u64 = 1 << 60;
pub const LR_PENDING: u64 = 1 << 62;
pub const LR_ACTIVE: u64 = 1 << 63;
pub const LR_STATE: u64 = LR_PENDING | LR_ACTIVE;

/// Takes back what vCPU `vcpu`'s list registers hold (as the hardware left them after the
/// guest acknowledged or completed some) and empties them: their state is the model's again.
pub(super) fn fold(vcpu: usize, rd: &mut Redistributor, d: &mut Distributor, lrs: &mut [u64]) {
    for lr in lrs.iter_mut() {
        let intid = (*lr & LR_INTID) as u32;
        let (pending, active) = (*lr & LR_PENDING != 0, *lr & LR_ACTIVE != 0);
        *lr = 0;
        if !(pending || active) || intid as usize >= NR_IRQS {
            continue;
        }
        if let Some(spi) = intid.checked_sub(32) {
            let (w, b) = bit(spi);
            d.spis.fold(w, b, pending, active);
            // An acknowledged SPI stays with the vCPU that acknowledged it.
            d.holder[spi as usize] = if active { vcpu as u8 } else { u8::MAX };
        } else {
            let (w, b) = bit(intid);
            rd.irqs.fold(w, b, pending, active);
        }
    }
    // Whatever the guest completed (an LR left invalid) is out of the list registers too.
    rd.irqs.release_all(0, u32::MAX);
    for w in 0..SPI_WORDS {
        let mine =
            (0..32).filter(|&i| usize::from(d.holder[w * 32 + i]) == vcpu).fold(0u32, |acc, i| acc | 1 << i);
        d.spis.release_all(w, mine);
    }
}

/// Fills vCPU `vcpu`'s empty list registers with what its guest should see: active interrupts
/// first (their completion must reach an LR), then deliverable pending ones (enabled, group
/// enabled) by priority, lowest INTID first among equals. What goes into an LR leaves the
/// model. Returns whether an interrupt was left out for lack of a list register (the caller
/// then asks for an underflow maintenance interrupt).
pub(super) fn refill(
    vcpu: usize,
    vcpus: usize,
    rd: &mut Redistributor,
    d: &mut Distributor,
    lrs: &mut [u64],
) -> bool {
    let groups = d.groups();
    let owned = d.owned_by(vcpu, vcpus);
    loop {
        let best = next_candidate(rd, d, &owned, groups);
        let Some(free) = lrs.iter().position(|&lr| lr & LR_STATE == 0) else { return best.is_some() };
        let Some(intid) = best else { return false };
        lrs[free] = if let Some(spi) = intid.checked_sub(32) {
            let (w, b) = bit(spi);
            let pending = d.spis.deliverable(w, b, groups);
            let (p, a) = d.spis.take(w, b, pending);
            d.holder[spi as usize] = vcpu as u8;
            let prio = d.spis.priority[w][(spi % 32) as usize];
            lr_value(intid, p, a, d.spis.group[w] & b != 0, prio, d.spis.is_level_driven(w, b))
        } else {
            let (w, b) = bit(intid);
            let pending = rd.irqs.deliverable(w, b, groups);
            let (p, a) = rd.irqs.take(w, b, pending);
            let prio = rd.irqs.priority[w][intid as usize];
            lr_value(intid, p, a, rd.irqs.group[w] & b != 0, prio, rd.irqs.is_level_driven(w, b))
        };
    }
}

/// A list register for `intid`. A line-driven level-sensitive interrupt asks for an EOI
/// maintenance interrupt, so its line is resampled once the guest is done with it.
fn lr_value(intid: u32, pending: bool, active: bool, group1: bool, priority: u8, eoi: bool) -> u64 {
    let mut lr = u64::from(intid) | (u64::from(priority) << LR_PRIORITY_SHIFT);
    for (set, flag) in [(pending, LR_PENDING), (active, LR_ACTIVE), (group1, LR_GROUP1), (eoi, LR_EOI)] {
        if set {
            lr |= flag;
        }
    }
    lr
}

/// The next INTID for an LR: any active one first, else the deliverable pending one of
/// highest priority (lowest value, then lowest INTID).
fn next_candidate(
    rd: &Redistributor,
    d: &Distributor,
    owned: &[u32; SPI_WORDS],
    groups: GroupEnables,
) -> Option<u32> {
    let mut best: Option<(bool, u8, u32)> = None;
    let mut consider = |wanting: u32, active: u32, priority: &[u8; 32], first: u32| {
        let mut bits = wanting;
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            let key = (active & (1 << i) == 0, priority[i as usize], first + i);
            if best.is_none_or(|k| key < k) {
                best = Some(key);
            }
        }
    };
    consider(rd.irqs.wanting_lr(0, groups), rd.irqs.active[0], &rd.irqs.priority[0], 0);
    for (w, &mine) in owned.iter().enumerate() {
        consider(
            d.spis.wanting_lr(w, groups) & mine,
            d.spis.active[w],
            &d.spis.priority[w],
            32 + 32 * w as u32,
        );
    }
    best.map(|k| k.2)
}
