//! A guest's virtual GICv3: the distributor and the one redistributor (RD and SGI frames) it
//! sees at QEMU virt's addresses, and which of its interrupts go into the list registers.
//!
//! It owns the interrupt state of one single-vCPU guest (group, enable, pending, active,
//! priority, trigger, routing for SGIs, PPIs and `NR_SPIS` SPIs) and the rule that a virtual
//! interrupt's pending/active state lives in exactly one place: here, or in a list register
//! (after [`VGic::refill`] until [`VGic::fold`] takes it back); the one split is an active
//! interrupt in an LR whose new pending state waits here while the guest cannot take it.
//! The CPU interface itself is the hardware's (ICV_* registers behind `ICH_*_EL2`), not
//! modelled here.
//!
//! It never touches hardware and never trusts an access: a size or alignment a GIC would not
//! accept is refused (the caller injects an abort); registers Linux may touch but that mean
//! nothing for one vCPU without LPIs or security states are RAZ/WI.
//!
//! Emulated as a GIC with a single security state (`GICD_CTLR.DS` = 1) and affinity routing
//! always on (`ARE` reads one), no LPIs, no extended SPI/PPI ranges, 1-of-N unsupported.

/// Distributor frame (64 KiB) at QEMU virt's GICD.
pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
/// One redistributor (RD frame + SGI frame, 128 KiB) at QEMU virt's first GICR.
pub const GICR_BASE: u64 = 0x080a_0000;
pub const GICR_SIZE: u64 = 0x2_0000;

/// SPIs offered: INTIDs 32..96 (the UART's SPI 1 is INTID 33).
pub const NR_SPIS: usize = 64;
pub const NR_IRQS: usize = 32 + NR_SPIS;
const WORDS: usize = NR_IRQS / 32;

/// The EL1 virtual timer's PPI, and the maintenance interrupt's.
pub const VTIMER_INTID: u32 = 27;
pub const MAINTENANCE_INTID: u32 = 25;
/// The emulated PL011's SPI (SPI 1).
pub const UART_INTID: u32 = 33;

// List register fields (ICH_LR<n>_EL2).
const LR_PENDING: u64 = 1 << 62;
const LR_ACTIVE: u64 = 1 << 63;
const LR_GROUP1: u64 = 1 << 60;
const LR_PRIORITY_SHIFT: u32 = 48;

// GICD_CTLR with DS = 1: EnableGrp0, EnableGrp1, ARE, DS.
const CTLR_ENABLE_G0: u32 = 1 << 0;
const CTLR_ENABLE_G1: u32 = 1 << 1;
const CTLR_ARE: u32 = 1 << 4;
const CTLR_DS: u32 = 1 << 6;

/// "LB" in the product ID, no JEP106 implementer: Linux matches errata on IIDR, none is ours.
const IIDR: u32 = 0x4c00_0000;
/// PIDR2.ArchRev = 3: GICv3 (Linux checks it on GICD and on every redistributor).
const PIDR2: u32 = 0x3b;

/// Which frame an access hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    Distributor,
    /// The redistributor's control frame (RD_base).
    Redistributor,
    /// The redistributor's SGI/PPI frame (SGI_base).
    Sgi,
}

/// The frame and offset of a guest IPA, if it lies in the virtual GIC.
pub fn frame_of(ipa: u64) -> Option<(Frame, u64)> {
    if (GICD_BASE..GICD_BASE + GICD_SIZE).contains(&ipa) {
        Some((Frame::Distributor, ipa - GICD_BASE))
    } else if (GICR_BASE..GICR_BASE + GICR_SIZE).contains(&ipa) {
        let off = ipa - GICR_BASE;
        Some(if off < 0x1_0000 { (Frame::Redistributor, off) } else { (Frame::Sgi, off - 0x1_0000) })
    } else {
        None
    }
}

/// The interrupt state of one guest with one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VGic {
    ctlr: u32,
    group: [u32; WORDS],
    enabled: [u32; WORDS],
    pending: [u32; WORDS],
    active: [u32; WORDS],
    /// ICFGR: two bits per INTID, bit 1 of each = edge-triggered.
    config: [u32; WORDS * 2],
    priority: [u8; NR_IRQS],
    /// IROUTER of each SPI (kept for reading back; one vCPU receives them all).
    route: [u64; NR_SPIS],
    /// GICR_WAKER.ProcessorSleep.
    asleep: bool,
    /// The vCPU's affinity (MPIDR Aff3..Aff0, in GICR_TYPER's layout).
    affinity: u32,
}

impl Default for VGic {
    fn default() -> Self {
        Self::new()
    }
}

/// The bit of `intid` in its 32-INTID word.
fn bit(intid: u32) -> (usize, u32) {
    ((intid / 32) as usize, 1 << (intid % 32))
}

impl VGic {
    /// The reset state: everything disabled, group 0, priority 0, SGIs edge, the rest level,
    /// the redistributor asleep.
    pub const fn new() -> Self {
        let mut config = [0; WORDS * 2];
        config[0] = 0xaaaa_aaaa; // SGIs are always edge-triggered
        VGic {
            ctlr: 0,
            group: [0; WORDS],
            enabled: [0; WORDS],
            pending: [0; WORDS],
            active: [0; WORDS],
            config,
            priority: [0; NR_IRQS],
            route: [0; NR_SPIS],
            asleep: true,
            affinity: 0,
        }
    }

    /// Makes `intid` pending (an edge, or a level interrupt's line going high). Unknown
    /// INTIDs are ignored.
    pub fn raise(&mut self, intid: u32) {
        if (intid as usize) < NR_IRQS {
            let (w, b) = bit(intid);
            self.pending[w] |= b;
        }
    }

    pub fn is_pending(&self, intid: u32) -> bool {
        let (w, b) = bit(intid);
        (intid as usize) < NR_IRQS && self.pending[w] & b != 0
    }

    pub fn is_enabled(&self, intid: u32) -> bool {
        let (w, b) = bit(intid);
        (intid as usize) < NR_IRQS && self.enabled[w] & b != 0
    }

    /// The SGI a trapped write of `ICC_SGI1R_EL1` (or ASGI1R/SGI0R, same layout) raises on
    /// this guest's only vCPU, if it targets it: IRM = 0, RS = 0, Aff3.Aff2.Aff1 = 0 and bit 0
    /// of the target list (Aff0 = 0). "All but self" (IRM = 1) reaches no one.
    pub fn sgi_for_self(value: u64) -> Option<u32> {
        let intid = ((value >> 24) & 0xf) as u32;
        let irm = value & (1 << 40) != 0;
        let rs = (value >> 44) & 0xf;
        let aff123 = value & ((0xff << 16) | (0xff << 32) | (0xff << 48));
        (!irm && rs == 0 && aff123 == 0 && value & 1 != 0).then_some(intid)
    }

    /// A list register for `intid` with `state` (LR_PENDING / LR_ACTIVE bits).
    fn lr_for(&self, intid: u32, state: u64) -> u64 {
        let (w, b) = bit(intid);
        let group = if self.group[w] & b != 0 { LR_GROUP1 } else { 0 };
        state | group | (u64::from(self.priority[intid as usize]) << LR_PRIORITY_SHIFT) | u64::from(intid)
    }

    fn group_enabled(&self, intid: u32) -> bool {
        let (w, b) = bit(intid);
        let need = if self.group[w] & b != 0 { CTLR_ENABLE_G1 } else { CTLR_ENABLE_G0 };
        // SGIs and PPIs are the redistributor's: with affinity routing the distributor's group
        // enables still gate them (GICv3 architecture, "Enabling the distribution").
        self.ctlr & need != 0
    }

    /// Takes back what the list registers hold (as the hardware left them after the guest
    /// acknowledged or completed some) and empties them: their state is the model's again.
    pub fn fold(&mut self, lrs: &mut [u64]) {
        for lr in lrs.iter_mut() {
            let intid = (*lr & 0xffff_ffff) as u32;
            if *lr & (LR_PENDING | LR_ACTIVE) != 0 && (intid as usize) < NR_IRQS {
                let (w, b) = bit(intid);
                if *lr & LR_PENDING != 0 {
                    self.pending[w] |= b;
                }
                if *lr & LR_ACTIVE != 0 {
                    self.active[w] |= b;
                }
            }
            *lr = 0;
        }
    }

    /// Fills empty list registers with what the guest should see: active interrupts first
    /// (their completion must reach an LR), then deliverable pending ones (enabled, group
    /// enabled) by priority. What goes into an LR leaves the model. Returns whether a
    /// deliverable interrupt was left out for lack of a list register (the caller then asks
    /// for an underflow maintenance interrupt).
    pub fn refill(&mut self, lrs: &mut [u64]) -> bool {
        loop {
            let Some(free) = lrs.iter().position(|&lr| lr & (LR_PENDING | LR_ACTIVE) == 0) else {
                return self.next_candidate().is_some();
            };
            let Some(intid) = self.next_candidate() else { return false };
            let (w, b) = bit(intid);
            let mut state = 0;
            if self.active[w] & b != 0 {
                state |= LR_ACTIVE;
            }
            if self.pending[w] & b != 0 && self.deliverable(intid) {
                state |= LR_PENDING;
            }
            lrs[free] = self.lr_for(intid, state);
            self.active[w] &= !b;
            if state & LR_PENDING != 0 {
                self.pending[w] &= !b;
            }
        }
    }

    fn deliverable(&self, intid: u32) -> bool {
        self.is_pending(intid) && self.is_enabled(intid) && self.group_enabled(intid)
    }

    /// The next INTID for an LR: any active one first, else the deliverable pending one of
    /// highest priority (lowest value, then lowest INTID).
    fn next_candidate(&self) -> Option<u32> {
        let mut best: Option<(bool, u8, u32)> = None;
        for intid in 0..NR_IRQS as u32 {
            let (w, b) = bit(intid);
            let active = self.active[w] & b != 0;
            if !active && !self.deliverable(intid) {
                continue;
            }
            let key = (!active, self.priority[intid as usize], intid);
            if best.is_none_or(|k| key < k) {
                best = Some(key);
            }
        }
        best.map(|k| k.2)
    }

    /// A guest read; `None` refuses it (bad size or alignment).
    pub fn read(&self, frame: Frame, offset: u64, size: u8) -> Option<u64> {
        if !Self::size_ok(frame, offset, size) {
            return None;
        }
        let value = match frame {
            Frame::Distributor => self.read_dist(offset, size),
            Frame::Redistributor => self.read_rd(offset, size),
            Frame::Sgi => self.read_sgi(offset, size),
        };
        Some(value)
    }

    /// A guest write; `false` refuses it (bad size or alignment).
    pub fn write(&mut self, frame: Frame, offset: u64, size: u8, value: u64) -> bool {
        if !Self::size_ok(frame, offset, size) {
            return false;
        }
        match frame {
            Frame::Distributor => self.write_dist(offset, size, value),
            Frame::Redistributor => self.write_rd(offset, value),
            Frame::Sgi => self.write_sgi(offset, size, value),
        }
        true
    }

    /// 32-bit accesses everywhere; bytes for priorities; 64-bit for IROUTER and GICR_TYPER
    /// (and the LPI base registers, RAZ/WI). Always naturally aligned.
    fn size_ok(frame: Frame, offset: u64, size: u8) -> bool {
        if !matches!(size, 1 | 4 | 8) || !offset.is_multiple_of(u64::from(size)) {
            return false;
        }
        let priority = (0x400..0x800).contains(&offset);
        match size {
            4 => true,
            1 => matches!(frame, Frame::Distributor | Frame::Sgi) && priority,
            _ => match frame {
                Frame::Distributor => (0x6000..0x8000).contains(&offset),
                Frame::Redistributor => matches!(offset, 0x08 | 0x70 | 0x78),
                Frame::Sgi => false,
            },
        }
    }

    /// A bit-per-INTID register word `n` (INTIDs 32n..32n+31) of `regs`.
    fn word(regs: &[u32; WORDS], n: usize) -> u32 {
        regs.get(n).copied().unwrap_or(0)
    }

    fn read_bits(&self, base: u64, offset: u64, n_base: usize) -> Option<u32> {
        let n = ((offset - base) % 0x80 / 4) as usize + n_base;
        Some(match (offset - base) / 0x80 {
            0 => Self::word(&self.group, n),
            1 | 2 => Self::word(&self.enabled, n),
            3 | 4 => Self::word(&self.pending, n),
            5 | 6 => Self::word(&self.active, n),
            _ => return None,
        })
    }

    /// Writes a bit-per-INTID register: IGROUPR (0x80), IS/ICENABLER, IS/ICPENDR, IS/ICACTIVER.
    /// `mask` limits which INTIDs of the word exist.
    fn write_bits(&mut self, offset: u64, n: usize, v: u32) {
        if n >= WORDS {
            return;
        }
        match offset & !0x7f {
            0x080 => self.group[n] = v,
            0x100 => self.enabled[n] |= v,
            0x180 => self.enabled[n] &= !v,
            0x200 => self.pending[n] |= v,
            0x280 => self.pending[n] &= !v,
            0x300 => self.active[n] |= v,
            0x380 => self.active[n] &= !v,
            _ => {}
        }
    }

    fn read_priority(&self, first: usize, size: u8) -> u64 {
        (0..size as usize)
            .fold(0, |acc, i| acc | u64::from(self.priority.get(first + i).copied().unwrap_or(0)) << (8 * i))
    }

    fn write_priority(&mut self, first: usize, size: u8, value: u64) {
        for i in 0..size as usize {
            if let Some(p) = self.priority.get_mut(first + i) {
                *p = (value >> (8 * i)) as u8;
            }
        }
    }

    fn read_dist(&self, offset: u64, size: u8) -> u64 {
        match offset {
            0x0000 => u64::from(self.ctlr | CTLR_ARE | CTLR_DS),
            // ITLinesNumber, IDbits = 16, No1N; no LPIs, no MBIs, no security extension.
            0x0004 => u64::from(((NR_IRQS as u32 / 32) - 1) | (15 << 19) | (1 << 25)),
            0x0008 => u64::from(IIDR),
            // Registers for INTIDs 0-31 are the redistributor's under affinity routing.
            0x0080..=0x0083
            | 0x0100..=0x0103
            | 0x0180..=0x0183
            | 0x0200..=0x0203
            | 0x0280..=0x0283
            | 0x0300..=0x0303
            | 0x0380..=0x0383 => 0,
            0x0080..=0x03ff => u64::from(self.read_bits(0x80, offset, 0).unwrap_or(0)),
            0x0420..=0x07ff => self.read_priority((offset - 0x400) as usize, size),
            0x0c08..=0x0cff => {
                u64::from(self.config.get(((offset - 0xc00) / 4) as usize).copied().unwrap_or(0))
            }
            0x6100..=0x7fff => {
                let spi = ((offset - 0x6100) / 8) as usize;
                self.route.get(spi).copied().unwrap_or(0)
            }
            0xffe8 => u64::from(PIDR2),
            _ => 0,
        }
    }

    fn write_dist(&mut self, offset: u64, size: u8, value: u64) {
        let v = value as u32;
        match offset {
            0x0000 => self.ctlr = v & (CTLR_ENABLE_G0 | CTLR_ENABLE_G1),
            0x0080..=0x0083
            | 0x0100..=0x0103
            | 0x0180..=0x0183
            | 0x0200..=0x0203
            | 0x0280..=0x0283
            | 0x0300..=0x0303
            | 0x0380..=0x0383 => {}
            0x0080..=0x03ff => self.write_bits(offset, ((offset % 0x80) / 4) as usize, v),
            0x0420..=0x07ff => self.write_priority((offset - 0x400) as usize, size, value),
            0x0c08..=0x0cff => {
                if let Some(c) = self.config.get_mut(((offset - 0xc00) / 4) as usize) {
                    // Only bit 1 of each field (edge/level) is writable.
                    *c = v & 0xaaaa_aaaa;
                }
            }
            0x6100..=0x7fff => {
                let spi = ((offset - 0x6100) / 8) as usize;
                if let Some(r) = self.route.get_mut(spi) {
                    // Aff3.Aff2.Aff1.Aff0 and IRM; a 32-bit write replaces the low half only.
                    let keep = if size == 8 { 0 } else { *r & !0xffff_ffff };
                    *r = (keep | value) & 0xff_80ff_ffff;
                }
            }
            _ => {}
        }
    }

    fn read_rd(&self, offset: u64, size: u8) -> u64 {
        // Affinity, Last (the only redistributor), Processor_Number 0; no LPIs, no VLPIs.
        let typer = (u64::from(self.affinity) << 32) | (1 << 4);
        match offset {
            0x04 => u64::from(IIDR),
            0x08 if size == 8 => typer,
            0x08 => typer & 0xffff_ffff,
            0x0c => typer >> 32,
            // WAKER: ChildrenAsleep follows ProcessorSleep at once.
            0x14 => {
                if self.asleep {
                    0b110
                } else {
                    0
                }
            }
            0xffe8 => u64::from(PIDR2),
            _ => 0,
        }
    }

    fn write_rd(&mut self, offset: u64, value: u64) {
        if offset == 0x14 {
            self.asleep = value & 0b10 != 0;
        }
    }

    fn read_sgi(&self, offset: u64, size: u8) -> u64 {
        match offset {
            0x080 | 0x100 | 0x180 | 0x200 | 0x280 | 0x300 | 0x380 => {
                u64::from(self.read_bits(0x80, offset, 0).unwrap_or(0))
            }
            0x400..=0x41f => self.read_priority((offset - 0x400) as usize, size),
            0xc00 => u64::from(self.config[0]),
            0xc04 => u64::from(self.config[1]),
            _ => 0,
        }
    }

    fn write_sgi(&mut self, offset: u64, size: u8, value: u64) {
        match offset {
            0x080 | 0x100 | 0x180 | 0x200 | 0x280 | 0x300 | 0x380 => self.write_bits(offset, 0, value as u32),
            0x400..=0x41f => self.write_priority((offset - 0x400) as usize, size, value),
            // SGIs stay edge-triggered; PPIs' bit 1 is writable.
            0xc04 => self.config[1] = value as u32 & 0xaaaa_aaaa,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Frame = Frame::Distributor;

    /// What Linux's irq-gic-v3 does before it takes interrupts: enable the distributor with
    /// affinity routing, wake the redistributor, group 1 and a priority for everything.
    fn linux_like() -> VGic {
        let mut g = VGic::new();
        assert!(g.write(D, 0, 4, u64::from(CTLR_ARE | CTLR_ENABLE_G1 | CTLR_ENABLE_G0)));
        assert!(g.write(Frame::Redistributor, 0x14, 4, 0));
        assert!(g.write(Frame::Sgi, 0x80, 4, 0xffff_ffff));
        assert!(g.write(D, 0x84, 4, 0xffff_ffff));
        assert!(g.write(D, 0x88, 4, 0xffff_ffff));
        for off in (0x400..0x460).step_by(4) {
            assert!(g.write(if off < 0x420 { Frame::Sgi } else { D }, off, 4, 0xa0a0_a0a0));
        }
        g
    }

    #[test]
    fn identification_as_linux_probes_it() {
        let g = VGic::new();
        assert_eq!(g.read(D, 0xffe8, 4), Some(0x3b), "GICD_PIDR2.ArchRev must say GICv3");
        assert_eq!(g.read(Frame::Redistributor, 0xffe8, 4).map(|v| v & 0xf0), Some(0x30));
        let typer = g.read(D, 4, 4).unwrap();
        assert_eq!(typer & 0x1f, 2, "96 INTIDs: ITLinesNumber 2");
        assert_eq!((typer >> 19) & 0x1f, 15);
        assert_eq!(typer & (1 << 17), 0, "no LPIs");
        let ctlr = g.read(D, 0, 4).unwrap();
        assert_ne!(ctlr & u64::from(CTLR_DS), 0);
        assert_ne!(ctlr & u64::from(CTLR_ARE), 0);
        assert_eq!(ctlr & 1 << 31, 0, "RWP never set");
    }

    #[test]
    fn redistributor_typer_says_last_with_the_vcpu_affinity() {
        let g = VGic::new();
        let t = g.read(Frame::Redistributor, 8, 8).unwrap();
        assert_eq!(t >> 32, 0);
        assert_ne!(t & (1 << 4), 0, "Last");
        assert_eq!(t & 1, 0, "no physical LPIs");
        assert_eq!(g.read(Frame::Redistributor, 8, 4), Some(t & 0xffff_ffff));
        assert_eq!(g.read(Frame::Redistributor, 0xc, 4), Some(t >> 32));
    }

    #[test]
    fn waker_children_follow_processor_sleep() {
        let mut g = VGic::new();
        assert_eq!(g.read(Frame::Redistributor, 0x14, 4), Some(0b110));
        g.write(Frame::Redistributor, 0x14, 4, 0);
        assert_eq!(g.read(Frame::Redistributor, 0x14, 4), Some(0));
    }

    #[test]
    fn enable_set_and_clear_registers() {
        let mut g = VGic::new();
        g.write(D, 0x104, 4, 0b1010); // SPIs 1 and 3 (INTIDs 33, 35)
        assert!(g.is_enabled(33) && g.is_enabled(35) && !g.is_enabled(34));
        g.write(D, 0x184, 4, 0b1000);
        assert_eq!(g.read(D, 0x104, 4), Some(0b10));
        assert_eq!(g.read(D, 0x184, 4), Some(0b10), "ICENABLER reads the enables too");
        g.write(Frame::Sgi, 0x100, 4, 1 << 27);
        assert!(g.is_enabled(27));
        // INTIDs 0-31 through the distributor are RAZ/WI under affinity routing.
        g.write(D, 0x100, 4, 1 << 26);
        assert!(!g.is_enabled(26));
        assert_eq!(g.read(D, 0x100, 4), Some(0));
    }

    #[test]
    fn pending_and_active_through_mmio() {
        let mut g = VGic::new();
        g.write(Frame::Sgi, 0x200, 4, 1 << 3);
        assert!(g.is_pending(3));
        g.write(Frame::Sgi, 0x280, 4, 1 << 3);
        assert!(!g.is_pending(3));
        g.write(D, 0x304, 4, 1);
        assert_eq!(g.read(D, 0x304, 4), Some(1));
        g.write(D, 0x384, 4, 1);
        assert_eq!(g.read(D, 0x304, 4), Some(0));
    }

    #[test]
    fn priorities_by_byte_and_word() {
        let mut g = VGic::new();
        g.write(D, 0x421, 1, 0x80); // INTID 33
        assert_eq!(g.read(D, 0x420, 4), Some(0x8000));
        g.write(Frame::Sgi, 0x418, 4, 0x1122_3344); // INTIDs 24-27
        assert_eq!(g.read(Frame::Sgi, 0x41b, 1), Some(0x11));
        assert_eq!(g.priority[27], 0x11);
    }

    #[test]
    fn config_sgis_stay_edge_spis_writable() {
        let mut g = VGic::new();
        g.write(Frame::Sgi, 0xc00, 4, 0);
        assert_eq!(g.read(Frame::Sgi, 0xc00, 4), Some(0xaaaa_aaaa));
        g.write(D, 0xc08, 4, 0xffff_ffff);
        assert_eq!(g.read(D, 0xc08, 4), Some(0xaaaa_aaaa));
    }

    #[test]
    fn irouter_64_and_32_bit() {
        let mut g = VGic::new();
        assert!(g.write(D, 0x6100 + 8, 8, 0xff_0000_0102));
        assert_eq!(g.read(D, 0x6108, 8), Some(0xff_0000_0102));
        assert!(g.write(D, 0x6108, 4, 0x3));
        assert_eq!(g.read(D, 0x6108, 8), Some(0xff_0000_0003));
    }

    #[test]
    fn bad_sizes_and_alignment_are_refused() {
        let mut g = VGic::new();
        assert_eq!(g.read(D, 2, 4), None);
        assert_eq!(g.read(D, 0, 2), None);
        assert_eq!(g.read(D, 0x100, 1), None, "bytes only for priorities");
        assert_eq!(g.read(D, 0x100, 8), None);
        assert!(!g.write(Frame::Sgi, 0x100, 8, 0));
        assert!(g.read(D, 0x401, 1).is_some());
        assert!(g.read(Frame::Redistributor, 8, 8).is_some());
    }

    #[test]
    fn unknown_offsets_read_zero_and_ignore_writes() {
        let mut g = linux_like();
        let before = g.clone();
        for off in [0x10u64, 0x40, 0x800, 0xd00, 0xe00, 0xf00, 0x5000, 0xfffc] {
            assert_eq!(g.read(D, off, 4), Some(0), "{off:#x}");
            assert!(g.write(D, off, 4, 0xffff_ffff));
        }
        assert!(g.write(Frame::Redistributor, 0x70, 8, u64::MAX));
        assert_eq!(g.read(Frame::Redistributor, 0x70, 8), Some(0));
        assert_eq!(g, before);
        // Every aligned word of all three frames is answered without panicking.
        for frame in [D, Frame::Redistributor, Frame::Sgi] {
            for off in (0..0x1_0000).step_by(4) {
                let _ = g.read(frame, off, 4);
                let _ = g.clone().write(frame, off, 4, u64::MAX);
            }
        }
    }

    #[test]
    fn frames_by_address() {
        assert_eq!(frame_of(0x0800_0004), Some((Frame::Distributor, 4)));
        assert_eq!(frame_of(0x080a_0014), Some((Frame::Redistributor, 0x14)));
        assert_eq!(frame_of(0x080b_0100), Some((Frame::Sgi, 0x100)));
        assert_eq!(frame_of(0x080c_0000), None, "only one redistributor");
        assert_eq!(frame_of(0x0801_0000), None);
    }

    #[test]
    fn a_raised_enabled_interrupt_goes_to_a_free_lr_and_leaves_the_model() {
        let mut g = linux_like();
        g.write(Frame::Sgi, 0x100, 4, 1 << VTIMER_INTID);
        g.raise(VTIMER_INTID);
        let mut lrs = [0u64; 4];
        assert!(!g.refill(&mut lrs));
        assert_eq!(lrs[0], LR_PENDING | LR_GROUP1 | (0xa0 << 48) | 27);
        assert!(!g.is_pending(VTIMER_INTID), "the LR owns it now");
        assert_eq!(&lrs[1..], &[0, 0, 0]);
    }

    #[test]
    fn disabled_or_group_disabled_interrupts_wait() {
        let mut g = linux_like();
        g.raise(VTIMER_INTID);
        let mut lrs = [0u64; 4];
        assert!(!g.refill(&mut lrs), "disabled: not deliverable, not left out");
        assert_eq!(lrs, [0; 4]);
        assert!(g.is_pending(VTIMER_INTID));
        g.write(Frame::Sgi, 0x100, 4, 1 << VTIMER_INTID);
        g.write(D, 0, 4, 0); // distributor group enables off
        g.refill(&mut lrs);
        assert_eq!(lrs, [0; 4]);
        g.write(D, 0, 4, u64::from(CTLR_ENABLE_G1));
        g.refill(&mut lrs);
        assert_eq!(lrs[0] & 0xffff_ffff, 27);
    }

    #[test]
    fn fold_takes_back_what_the_guest_has_not_completed() {
        let mut g = linux_like();
        g.write(Frame::Sgi, 0x100, 4, 0xffff_ffff);
        g.raise(1);
        g.raise(VTIMER_INTID);
        let mut lrs = [0u64; 4];
        g.refill(&mut lrs);
        // The guest acknowledged the timer (active) and completed SGI 1 (LR invalid).
        let timer = lrs.iter().position(|l| l & 0xffff_ffff == 27).unwrap();
        let sgi = lrs.iter().position(|l| l & 0xffff_ffff == 1).unwrap();
        lrs[timer] = (lrs[timer] & !LR_PENDING) | LR_ACTIVE;
        lrs[sgi] &= !(LR_PENDING | LR_ACTIVE);
        g.fold(&mut lrs);
        assert_eq!(lrs, [0; 4]);
        assert!(!g.is_pending(1) && !g.is_pending(27));
        assert_eq!(g.read(Frame::Sgi, 0x300, 4), Some(1 << 27), "still active");
        // Raised again while active: back in one LR as pending and active.
        g.raise(VTIMER_INTID);
        g.refill(&mut lrs);
        assert_eq!(lrs[0] >> 62, 0b11);
        assert_eq!(lrs[1], 0);
    }

    #[test]
    fn overflow_is_reported_and_priority_decides() {
        let mut g = linux_like();
        g.write(Frame::Sgi, 0x100, 4, 0xffff);
        g.write(Frame::Sgi, 0x404, 4, 0x1010_1010); // SGIs 4-7 most urgent
        for i in 0..8 {
            g.raise(i);
        }
        let mut lrs = [0u64; 4];
        assert!(g.refill(&mut lrs), "four left over");
        let mut got: Vec<u64> = lrs.iter().map(|l| l & 0xffff_ffff).collect();
        got.sort();
        assert_eq!(got, [4, 5, 6, 7]);
        // The guest completes two: two more go in, two still wait.
        lrs[0] = 0;
        lrs[2] = 0;
        g.fold(&mut lrs);
        assert!(g.refill(&mut lrs));
        let mut got: Vec<u64> = lrs.iter().map(|l| l & 0xffff_ffff).collect();
        got.sort();
        assert_eq!(got, [0, 1, 5, 7]);
    }

    #[test]
    fn sgi_targets() {
        // SGI 5 to Aff0 list {0}.
        assert_eq!(VGic::sgi_for_self((5 << 24) | 1), Some(5));
        assert_eq!(VGic::sgi_for_self((5 << 24) | 2), None, "Aff0 = 1: no such vCPU");
        assert_eq!(VGic::sgi_for_self((5 << 24) | (1 << 16) | 1), None, "Aff1 = 1");
        assert_eq!(VGic::sgi_for_self((5 << 24) | (1 << 40)), None, "all but self");
        assert_eq!(VGic::sgi_for_self((5 << 24) | (1 << 44) | 1), None, "range selector 1");
    }

    #[test]
    fn raising_unknown_intids_is_ignored() {
        let mut g = VGic::new();
        g.raise(NR_IRQS as u32);
        g.raise(1023);
        g.raise(u32::MAX);
        assert_eq!(g, VGic::new());
    }

    /// One thing a guest (or the hardware on its behalf) can do to its virtual GIC.
    #[derive(Clone, Debug)]
    enum Op {
        Read {
            frame: u8,
            offset: u64,
            size: u8,
        },
        Write {
            frame: u8,
            offset: u64,
            size: u8,
            value: u64,
        },
        Raise(u32),
        /// The guest acknowledges (pending -> active) or completes (active -> invalid) the
        /// interrupt in list register `lr`, then Labyrinth folds and refills them.
        Guest {
            lr: usize,
            complete: bool,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Mostly the registers that change delivery (CTLR, group, enable, pending, active,
        // priority), aligned, so interrupts really flow; some accesses anywhere, any size.
        let key = prop_oneof![
            Just(0u64),
            Just(0x80),
            Just(0x100),
            Just(0x180),
            Just(0x200),
            Just(0x280),
            Just(0x300),
            Just(0x380),
            Just(0x400)
        ];
        let offset = prop_oneof![
            6 => (key, 0u64..3).prop_map(|(k, word)| k + word * 4),
            1 => 0x6000u64..0x6400,
            1 => 0u64..0x1_0000,
        ];
        let size = prop_oneof![6 => Just(4u8), 1 => Just(1), 1 => Just(8), 1 => 0u8..=16];
        let value = prop_oneof![Just(u64::MAX), Just(0), any::<u64>()];
        prop_oneof![
            (0u8..3, offset.clone(), size.clone()).prop_map(|(frame, offset, size)| Op::Read {
                frame,
                offset,
                size
            }),
            (0u8..3, offset, size, value).prop_map(|(frame, offset, size, value)| Op::Write {
                frame,
                offset,
                size,
                value
            }),
            prop_oneof![4 => 25u32..40, 1 => 0u32..NR_IRQS as u32 + 8, 1 => any::<u32>()].prop_map(Op::Raise),
            (0usize..4, any::<bool>()).prop_map(|(lr, complete)| Op::Guest { lr, complete }),
        ]
    }

    fn frame_n(n: u8) -> Frame {
        match n {
            0 => Frame::Distributor,
            1 => Frame::Redistributor,
            _ => Frame::Sgi,
        }
    }

    proptest::proptest! {
        // Whatever a guest writes or reads, in any order, with any size or alignment: nothing
        // panics, and an interrupt's state lives in one place only: an INTID in a list register
        // is neither pending nor active in the model, and no INTID is in two list registers.
        #[test]
        fn no_access_sequence_breaks_the_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut g = VGic::new();
            let mut lrs = [0u64; 4];
            for op in ops {
                match op {
                    Op::Read { frame, offset, size } => {
                        let _ = g.read(frame_n(frame), offset, size);
                    }
                    Op::Write { frame, offset, size, value } => {
                        let _ = g.write(frame_n(frame), offset, size, value);
                    }
                    Op::Raise(intid) => g.raise(intid),
                    Op::Guest { lr, complete } => {
                        let l = &mut lrs[lr];
                        if complete && *l & LR_ACTIVE != 0 {
                            *l &= !LR_ACTIVE;
                        } else if *l & LR_PENDING != 0 {
                            *l = (*l & !LR_PENDING) | LR_ACTIVE;
                        }
                    }
                }
                g.fold(&mut lrs);
                proptest::prop_assert!(lrs.iter().all(|&l| l == 0), "fold leaves the list registers empty");
                g.refill(&mut lrs);
                let live: Vec<u64> = lrs.iter().copied().filter(|&l| l & (LR_PENDING | LR_ACTIVE) != 0).collect();
                for (i, &lr) in live.iter().enumerate() {
                    let intid = lr as u32;
                    proptest::prop_assert!((intid as usize) < NR_IRQS);
                    proptest::prop_assert!(!live[i + 1..].iter().any(|&o| o as u32 == intid), "INTID {} in two list registers", intid);
                    let (w, b) = bit(intid);
                    proptest::prop_assert!(g.active[w] & b == 0, "INTID {} active both in an LR and in the model", intid);
                    // A pending state may stay behind only while the guest cannot take it
                    // (disabled): the LR then carries the active state alone.
                    proptest::prop_assert!(
                        g.pending[w] & b == 0 || (lr & LR_PENDING == 0 && !g.deliverable(intid)),
                        "INTID {} pending both in an LR and in the model", intid
                    );
                }
            }
        }
    }
}
