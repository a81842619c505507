//! A guest's virtual GICv3 for up to `MAX_VCPUS` vCPUs: the distributor and one redistributor
//! per vCPU (RD and SGI frames) at QEMU virt's addresses, SGIs between vCPUs, SPI routing, and
//! which interrupts go into each vCPU's list registers.
//!
//! It owns the interrupt state of one guest (group, enable, pending, active, priority,
//! trigger; SGIs and PPIs per vCPU, `NR_SPIS` SPIs with their routing) and the rule that an
//! interrupt's pending/active state lives in exactly one place: the model (a redistributor for
//! SGIs/PPIs, the distributor for SPIs), or one list register of one vCPU (after that vCPU's
//! [`VGic::sync_lrs`] put it there, until its next sync takes it back). The one split is an
//! active interrupt in an LR whose new pending state waits in the model while the guest
//! cannot take it. An SGI on its way to another vCPU is in that vCPU's mailbox first: an edge
//! in flight, drained only by the target (mailbox -> model -> list register).
//!
//! Shared by the guest's vCPUs, each running on its own physical CPU: every method takes
//! `&self`. The distributor is behind one lock, each redistributor behind its own (taken by
//! its vCPU to sync, by others only for MMIO; order: redistributor, then distributor), and
//! sending an SGI takes no lock at all. Methods that change what a vCPU should see return
//! which vCPUs must sync their list registers (the caller kicks those on other CPUs).
//!
//! It never touches hardware and never trusts an access: a size or alignment a GIC would not
//! accept is refused (the caller injects an abort); registers Linux may touch but that mean
//! nothing without LPIs or security states are RAZ/WI. The CPU interface itself is the
//! hardware's (ICV_* registers behind `ICH_*_EL2`), not modelled here.
//!
//! Emulated as a GIC with a single security state (`GICD_CTLR.DS` = 1) and affinity routing
//! always on (`ARE` reads one), no LPIs, no extended SPI/PPI ranges, 1-of-N unsupported.

mod bank;
mod dist;
mod lr;
mod mailbox;
mod redist;
mod regs;
mod sgi;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

use spin::Mutex;

pub use super::vcpu_set::VcpuSet;
use bank::bit;
use dist::{Distributor, Touched};
pub use lr::{LR_ACTIVE, LR_EOI, LR_GROUP1, LR_INTID, LR_PENDING, LR_PRIORITY_SHIFT, LR_STATE};
use mailbox::Mailbox;
use redist::Redistributor;
pub use sgi::sgi_targets;

/// The most vCPUs a guest with a virtual GIC may have.
pub use crate::dt::MAX_VCPUS;

/// Distributor frame (64 KiB) at QEMU virt's GICD.
pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
/// The redistributors (RD frame + SGI frame, 128 KiB each), vCPU 0's first, from QEMU virt's
/// first GICR.
pub const GICR_BASE: u64 = 0x080a_0000;
/// One redistributor's size, the distance between two.
pub const GICR_SIZE: u64 = 0x2_0000;
/// The SGI frame's offset in a redistributor.
const SGI_FRAME: u64 = 0x1_0000;

/// The redistributor region of a guest with `vcpus` vCPUs.
pub const fn gicr_region_size(vcpus: usize) -> u64 {
    vcpus as u64 * GICR_SIZE
}

/// SPIs offered: INTIDs 32..96 (the UART's SPI 1 is INTID 33).
pub const NR_SPIS: usize = 64;
pub const NR_IRQS: usize = 32 + NR_SPIS;

/// The EL1 virtual timer's PPI, the EL1 physical timer's, and the maintenance interrupt's.
pub const VTIMER_INTID: u32 = 27;
pub const PTIMER_INTID: u32 = 30;
pub const MAINTENANCE_INTID: u32 = 25;
/// The emulated PL011's SPI (SPI 1).
pub const UART_INTID: u32 = 33;

/// Which frame an access hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    Distributor,
    /// A redistributor's control frame (RD_base).
    Redistributor {
        vcpu: usize,
    },
    /// A redistributor's SGI/PPI frame (SGI_base).
    Sgi {
        vcpu: usize,
    },
}

/// The frame and offset of a guest IPA, if it lies in the virtual GIC of a guest with `vcpus`
/// vCPUs.
pub fn frame_of(ipa: u64, vcpus: usize) -> Option<(Frame, u64)> {
    if (GICD_BASE..GICD_BASE + GICD_SIZE).contains(&ipa) {
        return Some((Frame::Distributor, ipa - GICD_BASE));
    }
    let off = ipa.checked_sub(GICR_BASE)?;
    let vcpu = (off / GICR_SIZE) as usize;
    if vcpu >= vcpus.min(MAX_VCPUS) {
        return None;
    }
    let off = off % GICR_SIZE;
    Some(if off < SGI_FRAME {
        (Frame::Redistributor { vcpu }, off)
    } else {
        (Frame::Sgi { vcpu }, off - SGI_FRAME)
    })
}

/// The interrupt state of one guest.
pub struct VGic {
    vcpus: usize,
    dist: Mutex<Distributor>,
    /// Entries `vcpus..` are never used.
    redists: [Mutex<Redistributor>; MAX_VCPUS],
    mailboxes: [Mailbox; MAX_VCPUS],
}

impl VGic {
    /// The reset state for `vcpus` vCPUs (1..=`MAX_VCPUS`, else `None`): everything disabled,
    /// group 0, priority 0, SGIs edge, the rest level, every redistributor asleep.
    pub fn new(vcpus: usize) -> Option<Self> {
        (1..=MAX_VCPUS).contains(&vcpus).then(|| VGic {
            vcpus,
            dist: Mutex::new(Distributor::new()),
            redists: core::array::from_fn(|_| Mutex::new(Redistributor::new())),
            mailboxes: core::array::from_fn(|_| Mailbox::new()),
        })
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Back to the reset state (a guest reset), mailboxes emptied. The caller empties the list
    /// registers of every vCPU.
    pub fn reset(&self) {
        for (rd, mb) in self.redists.iter().zip(&self.mailboxes) {
            *rd.lock() = Redistributor::new();
            mb.take();
        }
        *self.dist.lock() = Distributor::new();
    }

    fn redist(&self, vcpu: usize) -> Option<&Mutex<Redistributor>> {
        self.redists.get(vcpu).filter(|_| vcpu < self.vcpus)
    }

    /// A read of a register whose value never changes (`GICD_TYPER`, `GICD_IIDR`,
    /// `GICD_PIDR2`) with the size a GIC accepts: its value, from no state and under no lock.
    /// `None` for anything else (then [`VGic::read`]).
    #[inline(always)]
    pub fn read_constant(frame: Frame, offset: u64, size: u8) -> Option<u64> {
        match frame {
            Frame::Distributor if size == 4 => Distributor::read_constant(offset),
            _ => None,
        }
    }

    /// A guest read; `None` refuses it (bad size or alignment, or no such redistributor).
    pub fn read(&self, frame: Frame, offset: u64, size: u8) -> Option<u64> {
        if !size_ok(frame, offset, size) {
            return None;
        }
        Some(match frame {
            // Registers no write changes: no lock (Linux reads them at boot, on every CPU).
            Frame::Distributor => match Distributor::read_constant(offset) {
                Some(v) => v,
                None => self.dist.lock().read(offset, size),
            },
            Frame::Redistributor { vcpu } => {
                self.redist(vcpu)?.lock().read_rd(vcpu, self.vcpus, offset, size)
            }
            Frame::Sgi { vcpu } => self.redist(vcpu)?.lock().read_sgi(offset, size),
        })
    }

    /// A guest write; `None` refuses it (bad size or alignment, or no such redistributor),
    /// else the vCPUs whose list registers may now be stale (the writer included when it is
    /// one of them).
    pub fn write(&self, frame: Frame, offset: u64, size: u8, value: u64) -> Option<VcpuSet> {
        if !size_ok(frame, offset, size) {
            return None;
        }
        match frame {
            Frame::Distributor => {
                let mut d = self.dist.lock();
                let before = self.owners(&d);
                let touched = d.write(offset, size, value);
                let after = self.owners(&d);
                Some(match touched {
                    Touched::Nothing => VcpuSet::EMPTY,
                    Touched::All => VcpuSet::first(self.vcpus),
                    Touched::Spis(spis) => (0..NR_SPIS)
                        .filter(|&spi| {
                            let (w, b) = bit(spi as u32);
                            spis[w] & b != 0
                        })
                        .flat_map(|spi| [before[spi], after[spi]])
                        .flatten()
                        .fold(VcpuSet::EMPTY, |s, v| s.with(v)),
                })
            }
            Frame::Redistributor { vcpu } => {
                self.redist(vcpu)?.lock().write_rd(offset, value);
                Some(VcpuSet::only(vcpu))
            }
            Frame::Sgi { vcpu } => {
                self.redist(vcpu)?.lock().write_sgi(offset, size, value);
                Some(VcpuSet::only(vcpu))
            }
        }
    }

    fn owners(&self, d: &Distributor) -> [Option<usize>; NR_SPIS] {
        core::array::from_fn(|spi| d.owner(spi, self.vcpus))
    }

    /// A trapped write of `value` to `ICC_SGI1R_EL1` by vCPU `sender` (`ICC_ASGI1R_EL1` and
    /// `ICC_SGI0R_EL1` are taken the same way, whatever the SGI's group at the target): posts
    /// the SGI to each target's mailbox, without a lock. Returns the targets; the caller kicks
    /// those running on other CPUs and syncs its own list registers if it is one.
    pub fn send_sgi(&self, sender: usize, value: u64) -> VcpuSet {
        let (intid, targets) = sgi_targets(sender, value, self.vcpus);
        for t in targets.iter() {
            if let Some(mb) = self.mailboxes.get(t) {
                mb.post(1 << intid);
            }
        }
        targets
    }

    /// Whether SGIs wait in `vcpu`'s mailbox (a hint for a caller deciding whether to sync).
    pub fn has_mail(&self, vcpu: usize) -> bool {
        self.mailboxes.get(vcpu).is_some_and(|mb| !mb.is_empty())
    }

    /// An edge on `intid`: an SGI or PPI of vCPU `vcpu`, or an SPI (`vcpu` ignored). Returns
    /// the vCPU that must sync to see it (for an SPI, its owner; none if IROUTER names no
    /// vCPU). Unknown INTIDs and vCPUs are ignored.
    pub fn raise(&self, vcpu: usize, intid: u32) -> Option<usize> {
        if let Some(spi) = intid.checked_sub(32).filter(|&s| (s as usize) < NR_SPIS) {
            let (w, b) = bit(spi);
            let mut d = self.dist.lock();
            d.spis.set_pending(w, b);
            d.owner(spi as usize, self.vcpus)
        } else if intid < 32 {
            self.redist(vcpu)?.lock().irqs.set_pending(0, 1 << intid);
            Some(vcpu)
        } else {
            None
        }
    }

    /// Raises SPI `intid` (a device's edge): pending in the distributor. Returns the vCPU to
    /// kick (see [`VGic::raise`]).
    pub fn raise_spi(&self, intid: u32) -> Option<usize> {
        if intid < 32 {
            return None;
        }
        self.raise(0, intid)
    }

    /// The level of the line driving PPI `intid` of vCPU `vcpu`, or SPI `intid` (`vcpu`
    /// ignored). A level-sensitive interrupt is pending exactly while its line is high (or
    /// while a software pending state set by ISPENDR holds, until acknowledged); an
    /// edge-triggered one becomes pending on a rising edge. The caller reports the level when
    /// it changes and resamples it before `sync_lrs` whenever the line may have moved without
    /// its knowing (the guest reprogrammed its timer, enabled the interrupt, completed it:
    /// such interrupts' list registers ask for an EOI maintenance interrupt). Returns the vCPU
    /// that must sync for the guest to see the change. SGIs have no line: ignored.
    pub fn set_line_level(&self, vcpu: usize, intid: u32, level: bool) -> Option<usize> {
        if let Some(spi) = intid.checked_sub(32).filter(|&s| (s as usize) < NR_SPIS) {
            let (w, b) = bit(spi);
            let mut d = self.dist.lock();
            let changed = d.spis.set_line(w, b, level);
            changed.then(|| d.owner(spi as usize, self.vcpus)).flatten()
        } else if (16..32).contains(&intid) {
            self.redist(vcpu)?.lock().irqs.set_line(0, 1 << intid, level).then_some(vcpu)
        } else {
            None
        }
    }

    /// Syncs vCPU `vcpu`'s list registers `lrs` (as read from the hardware; written back by
    /// the caller): folds what the guest did into the model, drains the vCPU's SGI mailbox,
    /// resamples the driven level-sensitive interrupts, and refills the LRs by priority. Only
    /// that vCPU's CPU may call it with its own list registers. Returns whether a deliverable
    /// interrupt was left out for lack of an LR (the caller then asks for the underflow
    /// maintenance interrupt, `ICH_HCR_EL2.UIE`). An unknown vCPU gets nothing.
    pub fn sync_lrs(&self, vcpu: usize, lrs: &mut [u64]) -> bool {
        let (Some(rd), Some(mb)) = (self.redist(vcpu), self.mailboxes.get(vcpu)) else { return false };
        let mut rd = rd.lock();
        let mut d = self.dist.lock();
        lr::fold(vcpu, &mut rd, &mut d, lrs);
        rd.irqs.set_pending(0, mb.take() & 0xffff);
        rd.irqs.resample();
        d.spis.resample();
        lr::refill(vcpu, self.vcpus, &mut rd, &mut d, lrs)
    }

    /// Whether `intid` (of `vcpu` if an SGI or PPI) is pending in the model; not counting a
    /// mailbox or a list register.
    pub fn is_pending(&self, vcpu: usize, intid: u32) -> bool {
        self.state_bit(vcpu, intid, |pending, _| pending)
    }

    pub fn is_enabled(&self, vcpu: usize, intid: u32) -> bool {
        self.state_bit(vcpu, intid, |_, enabled| enabled)
    }

    /// `pick(pending, enabled)` applied to the word of `intid`, masked to its bit.
    fn state_bit(&self, vcpu: usize, intid: u32, pick: impl Fn(u32, u32) -> u32) -> bool {
        if let Some(spi) = intid.checked_sub(32).filter(|&s| (s as usize) < NR_SPIS) {
            let (w, b) = bit(spi);
            let d = self.dist.lock();
            pick(d.spis.pending[w], d.spis.enabled[w]) & b != 0
        } else if intid < 32 {
            self.redist(vcpu).is_some_and(|rd| {
                let rd = rd.lock();
                pick(rd.irqs.pending[0], rd.irqs.enabled[0]) & (1 << intid) != 0
            })
        } else {
            false
        }
    }
}

/// 32-bit accesses everywhere; bytes for priorities; 64-bit for IROUTER and GICR_TYPER (and
/// the LPI base registers, RAZ/WI). Always naturally aligned.
fn size_ok(frame: Frame, offset: u64, size: u8) -> bool {
    if !matches!(size, 1 | 4 | 8) || !offset.is_multiple_of(u64::from(size)) {
        return false;
    }
    let priority = (regs::IPRIORITYR..regs::IPRIORITYR_END).contains(&offset);
    match size {
        4 => true,
        1 => matches!(frame, Frame::Distributor | Frame::Sgi { .. }) && priority,
        _ => match frame {
            Frame::Distributor => (regs::GICD_IROUTER..regs::GICD_IROUTER_END).contains(&offset),
            Frame::Redistributor { .. } => {
                matches!(offset, regs::GICR_TYPER | regs::GICR_PROPBASER | regs::GICR_PENDBASER)
            }
            Frame::Sgi { .. } => false,
        },
    }
}
