//! The guest's GICv3: CPU interface through the ICC_* system registers (ICC_SRE_EL1.SRE), one
//! redistributor per CPU (found by its GICR_TYPER affinity), the distributor's group enable,
//! SGIs through ICC_SGI1R_EL1, and the IRQ hook the exception vectors call.
//!
//! Only SGIs and PPIs (INTIDs 0-31, the redistributor's SGI frame) are used: all in group 1 at
//! priority 0x80, each enabled on demand. MMIO accesses are aligned 32-bit words, except
//! GICR_TYPER (a 64-bit register, read as one).

use core::arch::asm;

use crate::console::{read32, write32};
use crate::dt::GicV3;
use crate::global::{Global, PerCpu};
use crate::smp::{dsb, this_cpu};

// Distributor.
const GICD_CTLR: u64 = 0x0;
const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
/// ARE (affinity routing); with one security state (DS = 1) this is bit 4.
const GICD_CTLR_ARE: u32 = 1 << 4;
const GICD_CTLR_RWP: u32 = 1 << 31;

// Redistributor: RD frame, then the SGI frame 64 KiB above it.
const GICR_FRAME_STRIDE: u64 = 0x2_0000;
const GICR_TYPER: u64 = 0x8;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_TYPER_AFFINITY_SHIFT: u64 = 32;
const GICR_WAKER: u64 = 0x14;
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
const SGI_FRAME: u64 = 0x1_0000;
const GICR_IGROUPR0: u64 = SGI_FRAME + 0x80;
const GICR_ISENABLER0: u64 = SGI_FRAME + 0x100;
const GICR_ICENABLER0: u64 = SGI_FRAME + 0x180;
const GICR_ICPENDR0: u64 = SGI_FRAME + 0x280;
const GICR_IPRIORITYR: u64 = SGI_FRAME + 0x400;

/// Every SGI and PPI's priority.
const PRIORITY: u32 = 0x80;
/// INTIDs 1020-1023 are special (1023: nothing pending).
const SPURIOUS_FIRST: u32 = 1020;
/// Polls of a GIC status bit before giving up.
const POLLS: u32 = 1_000_000;

// ICC_SGI1R_EL1 fields.
const SGI1R_INTID_SHIFT: u64 = 24;
const SGI1R_AFF1_SHIFT: u64 = 16;
const SGI1R_AFF2_SHIFT: u64 = 32;
const SGI1R_AFF3_SHIFT: u64 = 48;
/// Interrupt Routing Mode: every PE but the sender.
pub const SGI1R_IRM_ALL_BUT_SELF: u64 = 1 << 40;

static DISTRIBUTOR: Global<u64> = Global::new(0);
static REDISTRIBUTORS: Global<(u64, u64)> = Global::new((0, 0));
/// This CPU's redistributor (RD frame) base, once [`init_cpu`] found it.
static RD_BASE: PerCpu<u64> = PerCpu::new(0);
static HANDLER: Global<Option<fn(u32)>> = Global::new(None);

/// Records where the GIC is (CPU 0, before other CPUs use it).
pub fn init(gic: &GicV3) {
    DISTRIBUTOR.set(gic.distributor.start);
    REDISTRIBUTORS.set((gic.redistributors.start, gic.redistributors.end));
    dsb();
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: a GIC register (aligned word) of the device tree's GIC.
    unsafe { read32(addr as usize) }
}

fn mmio_write(addr: u64, v: u32) {
    // SAFETY: as mmio_read.
    unsafe { write32(addr as usize, v) }
}

fn poll_clear(addr: u64, bit: u32) -> bool {
    (0..POLLS).any(|_| mmio_read(addr) & bit == 0)
}

/// Affinity routing and group 1 on in the distributor (once, CPU 0).
pub fn init_distributor() -> Result<(), &'static str> {
    let d = DISTRIBUTOR.get();
    if d == 0 {
        return Err("no GICv3 in the device tree");
    }
    mmio_write(d + GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
    if !poll_clear(d + GICD_CTLR, GICD_CTLR_RWP) {
        return Err("GICD_CTLR.RWP stuck");
    }
    Ok(())
}

/// This CPU's redistributor: the frame whose GICR_TYPER affinity is this CPU's MPIDR.
fn find_redistributor() -> Option<u64> {
    let (start, end) = REDISTRIBUTORS.get();
    let m = crate::mpidr_affinity();
    // GICR_TYPER.Affinity_Value is Aff3.Aff2.Aff1.Aff0, one byte each.
    let want = (((m >> 32) & 0xff) << 24) | (m & 0xff_ffff);
    let mut rd = start;
    while rd + GICR_FRAME_STRIDE <= end {
        // SAFETY: GICR_TYPER, a 64-bit register at an 8-byte aligned offset.
        let typer = unsafe { core::ptr::read_volatile((rd + GICR_TYPER) as *const u64) };
        if typer >> GICR_TYPER_AFFINITY_SHIFT == want {
            return Some(rd);
        }
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
        rd += GICR_FRAME_STRIDE;
    }
    None
}

/// This CPU's part: wakes its redistributor, puts every SGI and PPI in group 1 at priority
/// 0x80, disabled and not pending, and opens the CPU interface (SRE, PMR 0xff, group 1 on).
/// IRQs stay masked in PSTATE until [`irqs_on`].
pub fn init_cpu() -> Result<(), &'static str> {
    let rd = find_redistributor().ok_or("no redistributor with this CPU's affinity")?;
    RD_BASE.set(this_cpu(), rd);
    mmio_write(rd + GICR_WAKER, mmio_read(rd + GICR_WAKER) & !GICR_WAKER_PROCESSOR_SLEEP);
    if !poll_clear(rd + GICR_WAKER, GICR_WAKER_CHILDREN_ASLEEP) {
        return Err("GICR_WAKER.ChildrenAsleep stuck");
    }
    mmio_write(rd + GICR_ICENABLER0, u32::MAX);
    mmio_write(rd + GICR_ICPENDR0, u32::MAX);
    mmio_write(rd + GICR_IGROUPR0, u32::MAX);
    for n in 0..8 {
        mmio_write(rd + GICR_IPRIORITYR + 4 * n, PRIORITY * 0x0101_0101);
    }
    dsb();
    const SRE: u64 = 1;
    let sre: u64;
    // SAFETY: the GIC CPU interface's own registers: system-register access on, then every
    // priority unmasked, binary point 0, group 1 on.
    unsafe {
        asm!("mrs {t}, icc_sre_el1", "orr {t}, {t}, {sre}", "msr icc_sre_el1, {t}", "isb", "mrs {t}, icc_sre_el1",
            t = out(reg) sre, sre = in(reg) SRE, options(nostack));
    }
    if sre & SRE == 0 {
        return Err("ICC_SRE_EL1.SRE stays 0: no system-register interface");
    }
    // SAFETY: as above.
    unsafe {
        asm!("msr icc_pmr_el1, {pmr}", "msr icc_bpr1_el1, xzr", "msr icc_igrpen1_el1, {on}", "isb",
            pmr = in(reg) 0xffu64, on = in(reg) 1u64, options(nostack));
    }
    Ok(())
}

fn rd_base() -> u64 {
    RD_BASE.get(this_cpu())
}

/// Enables SGI/PPI `intid` (< 32) in this CPU's redistributor.
pub fn enable(intid: u32) {
    mmio_write(rd_base() + GICR_ISENABLER0, 1 << (intid & 31));
    dsb();
}

/// Enables SPI `intid` (32 and above) in the distributor: group 1, priority 0x80, routed as
/// the distributor has it (vCPU 0 after reset).
pub fn enable_spi(intid: u32) {
    let d = DISTRIBUTOR.get();
    let (word, bit) = (u64::from(intid / 32) * 4, 1u32 << (intid % 32));
    mmio_write(d + 0x80 + word, mmio_read(d + 0x80 + word) | bit);
    let prio = d + 0x400 + u64::from(intid & !3);
    let shift = (intid % 4) * 8;
    mmio_write(prio, (mmio_read(prio) & !(0xff << shift)) | (0x80 << shift));
    mmio_write(d + 0x100 + word, bit);
    dsb();
}

/// Routes SPI `intid` to the CPU with affinity `mpidr` (`GICD_IROUTER`, affinity routing).
pub fn route_spi(intid: u32, mpidr: u64) {
    let router = DISTRIBUTOR.get() + 0x6000 + 8 * u64::from(intid);
    // Two 32-bit halves: Aff3 lives in the upper word (zero here).
    mmio_write(router, mpidr as u32);
    mmio_write(router + 4, (mpidr >> 32) as u32 & 0xff);
    dsb();
}

/// Disables (masks) SGI/PPI `intid` (< 32) in this CPU's redistributor.
pub fn disable(intid: u32) {
    mmio_write(rd_base() + GICR_ICENABLER0, 1 << (intid & 31));
    dsb();
}

/// Sets the function that handles this guest's IRQs (`intid`), on every CPU.
pub fn set_handler(f: fn(u32)) {
    HANDLER.set(Some(f));
    dsb();
}

/// Unmasks IRQs (PSTATE.I).
pub fn irqs_on() {
    // SAFETY: IRQs are handled by the vectors (handle_irq).
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack)) };
}

/// Masks IRQs (PSTATE.I).
pub fn irqs_off() {
    // SAFETY: masking is always safe.
    unsafe { asm!("msr daifset, #2", "isb", options(nostack)) };
}

/// With IRQs masked: takes whatever interrupt is pending now (IRQs unmasked for one `ISB`),
/// and masks them again. After a `WFI` with IRQs masked, this closes the gap in which an
/// interrupt arriving between a check and an unmasked `WFI` would be taken before the `WFI`
/// and leave it waiting for the next one.
pub fn take_pending_irqs() {
    // SAFETY: IRQs are handled by the vectors (handle_irq); masked again before returning.
    unsafe { asm!("msr daifclr, #2", "isb", "msr daifset, #2", options(nostack)) };
}

/// Sends SGI `intid` (< 16) to the CPU with affinity `target` (MPIDR affinity fields).
pub fn send_sgi(intid: u32, target: u64) {
    let aff0 = target & 0xff;
    let v = ((intid as u64 & 0xf) << SGI1R_INTID_SHIFT)
        | (((target >> 8) & 0xff) << SGI1R_AFF1_SHIFT)
        | (((target >> 16) & 0xff) << SGI1R_AFF2_SHIFT)
        | (((target >> 32) & 0xff) << SGI1R_AFF3_SHIFT)
        | (1 << aff0.min(15));
    write_sgi1r(v);
}

/// Writes ICC_SGI1R_EL1 (after a DSB, so that what the sender wrote before is visible).
pub fn write_sgi1r(v: u64) {
    dsb();
    // SAFETY: generates an SGI; the ISB makes the write take effect before what follows.
    unsafe { asm!("msr icc_sgi1r_el1, {v}", "isb", v = in(reg) v, options(nostack)) };
}

/// Called by the IRQ vector: acknowledges the interrupt, hands it to the handler, ends it.
/// False if no handler is installed (the vector then reports an unexpected IRQ).
pub(crate) fn handle_irq() -> bool {
    let Some(handler) = HANDLER.get() else {
        return false;
    };
    let iar: u64;
    // SAFETY: acknowledges the highest-priority pending group 1 interrupt.
    unsafe { asm!("mrs {i}, icc_iar1_el1", i = out(reg) iar, options(nostack)) };
    let intid = (iar & 0xff_ffff) as u32;
    if intid >= SPURIOUS_FIRST {
        return true;
    }
    handler(intid);
    // SAFETY: ends the interrupt acknowledged above (EOImode 0: priority drop and deactivate).
    unsafe { asm!("msr icc_eoir1_el1, {i}", "isb", i = in(reg) iar, options(nostack)) };
    true
}
