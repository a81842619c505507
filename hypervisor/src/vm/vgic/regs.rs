//! GICv3 register offsets and fields the model answers, and the layouts shared by the
//! distributor and the redistributor's SGI frame (one bit, two bits or a byte per INTID).

use super::bank::Bank;

// Distributor (GICD_*).
pub const GICD_CTLR: u64 = 0x0000;
pub const GICD_TYPER: u64 = 0x0004;
pub const GICD_IIDR: u64 = 0x0008;
/// GICD_IROUTER<n> for SPI INTID n, 64 bits each; n < 32 are reserved.
pub const GICD_IROUTER: u64 = 0x6000;
pub const GICD_IROUTER_END: u64 = 0x8000;

// Redistributor RD frame (GICR_*).
pub const GICR_IIDR: u64 = 0x0004;
pub const GICR_TYPER: u64 = 0x0008;
pub const GICR_WAKER: u64 = 0x0014;
/// GICR_PROPBASER and GICR_PENDBASER (no LPIs: RAZ/WI, but 64-bit accesses are legal).
pub const GICR_PROPBASER: u64 = 0x0070;
pub const GICR_PENDBASER: u64 = 0x0078;

// Registers with one bit per INTID, at the same offsets in the distributor (INTIDs 32n..) and
// in the SGI frame (word 0 only).
pub const IGROUPR: u64 = 0x080;
pub const ISENABLER: u64 = 0x100;
pub const ICENABLER: u64 = 0x180;
pub const ISPENDR: u64 = 0x200;
pub const ICPENDR: u64 = 0x280;
pub const ISACTIVER: u64 = 0x300;
pub const ICACTIVER: u64 = 0x380;
pub const BITMAP_END: u64 = 0x400;
/// One byte per INTID.
pub const IPRIORITYR: u64 = 0x400;
pub const IPRIORITYR_END: u64 = 0x800;
/// Two bits per INTID; bit 1 of each field = edge-triggered.
pub const ICFGR: u64 = 0xc00;
pub const ICFGR_END: u64 = 0xd00;
/// Both frames: PIDR2, whose ArchRev Linux checks.
pub const PIDR2: u64 = 0xffe8;

// GICD_CTLR with DS = 1: EnableGrp0, EnableGrp1, ARE, DS.
pub const CTLR_ENABLE_G0: u32 = 1 << 0;
pub const CTLR_ENABLE_G1: u32 = 1 << 1;
pub const CTLR_ARE: u32 = 1 << 4;
pub const CTLR_DS: u32 = 1 << 6;

// GICD_TYPER: ITLinesNumber (bits 4:0), IDbits (23:19), No1N (25).
pub const TYPER_IDBITS_16: u32 = 15 << 19;
pub const TYPER_NO1N: u32 = 1 << 25;

// GICR_TYPER: Last (4), Processor_Number (23:8), affinity (63:32, Aff3.Aff2.Aff1.Aff0).
pub const GICR_TYPER_LAST: u64 = 1 << 4;
pub const GICR_TYPER_PROC_NUM_SHIFT: u32 = 8;
pub const GICR_TYPER_AFF_SHIFT: u32 = 32;

// GICR_WAKER: ProcessorSleep (1), ChildrenAsleep (2).
pub const WAKER_PROCESSOR_SLEEP: u64 = 1 << 1;
pub const WAKER_CHILDREN_ASLEEP: u64 = 1 << 2;

// GICD_IROUTER: Aff0 (7:0), Aff1 (15:8), Aff2 (23:16), IRM (31), Aff3 (39:32).
pub const IROUTER_AFF0: u64 = 0xff;
pub const IROUTER_UPPER_AFF: u64 = 0xff_00ff_ff00;
pub const IROUTER_IRM: u64 = 1 << 31;
pub const IROUTER_WRITABLE: u64 = 0xff_80ff_ffff;

/// "LB" in the product ID, no JEP106 implementer: Linux matches errata on IIDR, none is ours.
pub const IIDR: u32 = 0x4c00_0000;
/// PIDR2.ArchRev = 3: GICv3 (Linux checks it on GICD and on every redistributor).
pub const PIDR2_GICV3: u32 = 0x3b;

impl<const W: usize> Bank<W> {
    /// Reads word `w` of the bit-per-INTID register at `reg` (IGROUPR...ICACTIVER).
    pub fn read_bitmap(&self, reg: u64, w: usize) -> u32 {
        match reg {
            IGROUPR => self.group[w],
            ISENABLER | ICENABLER => self.enabled[w],
            ISPENDR | ICPENDR => self.pending[w],
            ISACTIVER | ICACTIVER => self.active[w],
            _ => 0,
        }
    }

    /// Writes word `w` of the bit-per-INTID register at `reg`, for the INTIDs in `writable`.
    pub fn write_bitmap(&mut self, reg: u64, w: usize, v: u32, writable: u32) {
        let v = v & writable;
        match reg {
            IGROUPR => self.group[w] = (self.group[w] & !writable) | v,
            ISENABLER => self.enabled[w] |= v,
            ICENABLER => self.enabled[w] &= !v,
            ISPENDR => self.set_pending(w, v),
            ICPENDR => self.clear_pending(w, v),
            ISACTIVER => self.active[w] |= v,
            ICACTIVER => self.active[w] &= !v,
            _ => {}
        }
    }

    /// Reads `size` priority bytes from the bank's `first`th INTID (zero beyond the bank).
    pub fn read_priority(&self, first: usize, size: u8) -> u64 {
        (0..usize::from(size)).fold(0, |acc, i| {
            let n = first + i;
            let p = self.priority.get(n / 32).map_or(0, |word| word[n % 32]);
            acc | u64::from(p) << (8 * i)
        })
    }

    pub fn write_priority(&mut self, first: usize, size: u8, value: u64) {
        for i in 0..usize::from(size) {
            let n = first + i;
            if let Some(word) = self.priority.get_mut(n / 32) {
                word[n % 32] = (value >> (8 * i)) as u8;
            }
        }
    }

    /// ICFGR for the bank's INTIDs 16h..16h+15 (`h` counts half-words of the bank).
    pub fn read_config(&self, h: usize) -> u32 {
        let Some(&edge) = self.edge.get(h / 2) else { return 0 };
        let half = edge >> (16 * (h % 2));
        (0..16).filter(|i| half & (1 << i) != 0).fold(0, |acc, i| acc | 2 << (2 * i))
    }

    /// Writes ICFGR for INTIDs 16h..16h+15; `writable` (one bit per INTID of the half)
    /// limits which may change.
    pub fn write_config(&mut self, h: usize, value: u32, writable: u16) {
        if h / 2 >= W {
            return;
        }
        let edges = (0..16).filter(|i| value & (2 << (2 * i)) != 0).fold(0u32, |acc, i| acc | 1 << i);
        let shift = 16 * (h % 2);
        self.set_edge(h / 2, edges << shift, u32::from(writable) << shift);
    }
}
