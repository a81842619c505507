//! The distributor: `GICD_CTLR`'s group enables, the SPIs' state and their routing
//! (`GICD_IROUTER<n>`), and its MMIO frame. Shared by all vCPUs behind the `VGic`'s lock.

use super::bank::{bit, Bank, GroupEnables};
use super::regs::*;
use super::{NR_IRQS, NR_SPIS};

pub(super) const SPI_WORDS: usize = NR_SPIS / 32;
const _: () = assert!(NR_SPIS.is_multiple_of(32));

/// `holder` when no vCPU holds the SPI.
const NO_HOLDER: u8 = u8::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Distributor {
    pub ctlr: u32,
    /// SPI `i` (INTID 32 + i) is the bank's `i`th interrupt.
    pub spis: Bank<SPI_WORDS>,
    pub route: [u64; NR_SPIS],
    /// The vCPU whose list register holds the SPI (while `in_lr`), or to which its active
    /// state belongs (while active in the model after leaving that LR): an active SPI goes
    /// back to the vCPU that acknowledged it, wherever IROUTER points since.
    pub holder: [u8; NR_SPIS],
}

/// What a distributor write may have changed for delivery.
pub(super) enum Touched {
    Nothing,
    /// These SPIs (bit i = SPI i).
    Spis([u32; SPI_WORDS]),
    /// Everything (the group enables).
    All,
}

impl Distributor {
    pub const fn new() -> Self {
        Distributor { ctlr: 0, spis: Bank::new(), route: [0; NR_SPIS], holder: [NO_HOLDER; NR_SPIS] }
    }

    pub fn groups(&self) -> GroupEnables {
        GroupEnables { g0: self.ctlr & CTLR_ENABLE_G0 != 0, g1: self.ctlr & CTLR_ENABLE_G1 != 0 }
    }

    /// The vCPU `GICD_IROUTER` routes SPI `spi` to: Aff0 when Aff1..Aff3 are zero and it names
    /// one of `vcpus`, none otherwise (the SPI then stays pending, as on a GIC routed to a PE
    /// that does not exist). IRM = 1 ("any PE"; GICD_TYPER says 1-of-N is not supported, so
    /// a guest has no reason to set it) means vCPU 0.
    pub fn target(&self, spi: usize, vcpus: usize) -> Option<usize> {
        let r = *self.route.get(spi)?;
        if r & IROUTER_IRM != 0 {
            return Some(0);
        }
        let aff0 = (r & IROUTER_AFF0) as usize;
        (r & IROUTER_UPPER_AFF == 0 && aff0 < vcpus).then_some(aff0)
    }

    /// The vCPU that must take SPI `spi` into its list registers: its holder while it has one,
    /// else its target.
    pub fn owner(&self, spi: usize, vcpus: usize) -> Option<usize> {
        let (w, b) = bit(spi as u32);
        let held = (self.spis.in_lr.get(w)? | self.spis.active[w]) & b != 0;
        match self.holder.get(spi) {
            Some(&h) if held && h != NO_HOLDER => Some(usize::from(h)),
            _ => self.target(spi, vcpus),
        }
    }

    /// The SPIs vCPU `vcpu` owns, one bit each.
    pub fn owned_by(&self, vcpu: usize, vcpus: usize) -> [u32; SPI_WORDS] {
        let mut owned = [0; SPI_WORDS];
        for spi in 0..NR_SPIS {
            if self.owner(spi, vcpus) == Some(vcpu) {
                let (w, b) = bit(spi as u32);
                owned[w] |= b;
            }
        }
        owned
    }

    /// The identification registers, the same for every distributor at every moment: read
    /// without the distributor (and its lock). `None` for every other offset.
    #[inline(always)]
    pub fn read_constant(offset: u64) -> Option<u64> {
        match offset {
            // ITLinesNumber, 16 INTID bits, no 1-of-N; no LPIs, no MBIs, no security extension.
            GICD_TYPER => Some(u64::from((NR_IRQS as u32 / 32 - 1) | TYPER_IDBITS_16 | TYPER_NO1N)),
            GICD_IIDR => Some(u64::from(IIDR)),
            PIDR2 => Some(u64::from(PIDR2_GICV3)),
            _ => None,
        }
    }

    pub fn read(&self, offset: u64, size: u8) -> u64 {
        if let Some(v) = Self::read_constant(offset) {
            return v;
        }
        match offset {
            GICD_CTLR => u64::from(self.ctlr | CTLR_ARE | CTLR_DS),
            IGROUPR..BITMAP_END => match Self::bitmap_word(offset) {
                Some(w) => u64::from(self.spis.read_bitmap(offset & !0x7f, w)),
                None => 0,
            },
            IPRIORITYR..IPRIORITYR_END => match ((offset - IPRIORITYR) as usize).checked_sub(32) {
                Some(first) => self.spis.read_priority(first, size),
                None => 0,
            },
            ICFGR..ICFGR_END => match (((offset - ICFGR) / 4) as usize).checked_sub(2) {
                Some(h) => u64::from(self.spis.read_config(h)),
                None => 0,
            },
            GICD_IROUTER..GICD_IROUTER_END => match Self::router_spi(offset) {
                Some(spi) if size == 8 => self.route[spi],
                Some(spi) => (self.route[spi] >> (8 * (offset & 4))) & 0xffff_ffff,
                None => 0,
            },
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u64, size: u8, value: u64) -> Touched {
        let v = value as u32;
        match offset {
            GICD_CTLR => {
                self.ctlr = v & (CTLR_ENABLE_G0 | CTLR_ENABLE_G1);
                Touched::All
            }
            IGROUPR..BITMAP_END => {
                let Some(w) = Self::bitmap_word(offset) else { return Touched::Nothing };
                let reg = offset & !0x7f;
                self.spis.write_bitmap(reg, w, v, u32::MAX);
                if matches!(reg, ISACTIVER | ICACTIVER) {
                    // Out of any list register, an active state set or cleared here belongs to
                    // no vCPU in particular: the SPI follows IROUTER again.
                    for spi in (0..32).filter(|i| v & !self.spis.in_lr[w] & (1 << i) != 0) {
                        self.holder[w * 32 + spi] = NO_HOLDER;
                    }
                }
                let mut spis = [0; SPI_WORDS];
                spis[w] = if reg == IGROUPR { u32::MAX } else { v };
                Touched::Spis(spis)
            }
            IPRIORITYR..IPRIORITYR_END => {
                let Some(first) = ((offset - IPRIORITYR) as usize).checked_sub(32) else {
                    return Touched::Nothing;
                };
                self.spis.write_priority(first, size, value);
                Self::touched_range(first, usize::from(size))
            }
            ICFGR..ICFGR_END => {
                let Some(h) = (((offset - ICFGR) / 4) as usize).checked_sub(2) else {
                    return Touched::Nothing;
                };
                self.spis.write_config(h, v, 0xffff);
                Self::touched_range(16 * h, 16)
            }
            GICD_IROUTER..GICD_IROUTER_END => {
                let Some(spi) = Self::router_spi(offset) else { return Touched::Nothing };
                let r = &mut self.route[spi];
                *r = match (size, offset & 4) {
                    (8, _) => value,
                    (_, 0) => (*r & !0xffff_ffff) | (value & 0xffff_ffff),
                    _ => (*r & 0xffff_ffff) | ((value & 0xffff_ffff) << 32),
                } & IROUTER_WRITABLE;
                Self::touched_range(spi, 1)
            }
            _ => Touched::Nothing,
        }
    }

    /// The SPI word of a bit-per-INTID register access, if it names SPIs (INTIDs 0-31 are the
    /// redistributor's under affinity routing: RAZ/WI here).
    fn bitmap_word(offset: u64) -> Option<usize> {
        let n = ((offset & 0x7f) / 4) as usize;
        n.checked_sub(1).filter(|&w| w < SPI_WORDS)
    }

    /// The SPI whose IROUTER an access at `offset` hits.
    fn router_spi(offset: u64) -> Option<usize> {
        (((offset - GICD_IROUTER) / 8) as usize).checked_sub(32).filter(|&spi| spi < NR_SPIS)
    }

    fn touched_range(first: usize, n: usize) -> Touched {
        let mut spis = [0; SPI_WORDS];
        for spi in (first..first + n).filter(|&s| s < NR_SPIS) {
            let (w, b) = bit(spi as u32);
            spis[w] |= b;
        }
        Touched::Spis(spis)
    }
}
