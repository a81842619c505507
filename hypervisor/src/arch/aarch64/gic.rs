//! The physical GICv3 as Labyrinth uses it at EL2, and the hardware virtual CPU interface of
//! the guest on this CPU.
//!
//! Owns: the distributor's enable (once, boot CPU), this CPU's redistributor wake-up and the
//! two PPIs Labyrinth takes (the EL1 virtual timer, 27, and the vGIC maintenance interrupt,
//! 25), acknowledging and completing them through `ICC_*_EL1` at EL2, and the `ICH_*_EL2`
//! registers (list registers, `ICH_HCR_EL2`, `ICH_VMCR_EL2`, active priorities) of the vCPU.
//! Which interrupt goes into which list register is decided by the portable `vm::vgic`.
//!
//! It must never hand a guest the physical CPU interface (`ICC_SRE_EL2.Enable` lets EL1 use
//! the system registers, which with `HCR_EL2.IMO`/`FMO` are the virtual ones), never enable a
//! physical SPI, and never wait without bound on the hardware.

use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::registers::{
    CNTV_CTL_EL0, ICC_SRE_EL2, ICH_AP0R0_EL2, ICH_AP1R0_EL2, ICH_HCR_EL2, ICH_LR0_EL2, ICH_LR1_EL2,
    ICH_LR2_EL2, ICH_LR3_EL2, ICH_LR4_EL2, ICH_LR5_EL2, ICH_LR6_EL2, ICH_LR7_EL2, ICH_VMCR_EL2, ICH_VTR_EL2,
};
use labyrinth::dt::Gic;
use tock_registers::interfaces::{ReadWriteable, Readable as _, Writeable as _};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

use super::cpu::{cpu_index, MAX_CPUS};
use super::mmu::{map_range, MapKind};
use super::timer::HYP_TIMER_PPI;

/// Interrupt IDs Labyrinth takes on a CPU that runs a guest with a virtual GIC.
pub const VTIMER_PPI: u32 = 27;
pub const MAINTENANCE_PPI: u32 = 25;
/// The SGI one CPU sends another to take its vCPU out of the guest (a stop, a reset, new
/// virtual interrupts): the receiver only needs to trap, so it carries no payload.
pub const KICK_SGI: u32 = 8;
/// INTIDs 1020-1023 are special (1023: nothing pending).
pub const SPURIOUS: u32 = 1020;

register_bitfields! {u32,
    GICD_CTLR [
        EnableGrp0 OFFSET(0) NUMBITS(1) [],
        EnableGrp1 OFFSET(1) NUMBITS(1) [],
        ARE OFFSET(4) NUMBITS(1) [],
        DS OFFSET(6) NUMBITS(1) [],
        RWP OFFSET(31) NUMBITS(1) []
    ],
    GICR_WAKER [
        ProcessorSleep OFFSET(1) NUMBITS(1) [],
        ChildrenAsleep OFFSET(2) NUMBITS(1) []
    ]
}

register_bitfields! {u64,
    GICR_TYPER [
        Last OFFSET(4) NUMBITS(1) [],
        Affinity OFFSET(32) NUMBITS(32) []
    ]
}

register_structs! {
    /// The distributor registers Labyrinth itself touches.
    GicdRegs {
        (0x0000 => ctlr: ReadWrite<u32, GICD_CTLR::Register>),
        (0x0004 => _reserved0),
        (0x0080 => igroupr: [ReadWrite<u32>; 32]),
        (0x0100 => isenabler: [ReadWrite<u32>; 32]),
        (0x0180 => _reserved1),
        (0x0400 => ipriorityr: [ReadWrite<u8>; 1024]),
        (0x0800 => _reserved2),
        (0x6000 => irouter: [ReadWrite<u64>; 1020]),
        (0x7fe0 => @END),
    }
}

register_structs! {
    /// A redistributor's RD_base frame (first 64 KiB).
    GicrRdRegs {
        (0x0000 => _ctlr: ReadWrite<u32>),
        (0x0004 => _iidr: ReadOnly<u32>),
        (0x0008 => typer: ReadOnly<u64, GICR_TYPER::Register>),
        (0x0010 => _statusr: ReadWrite<u32>),
        (0x0014 => waker: ReadWrite<u32, GICR_WAKER::Register>),
        (0x0018 => @END),
    }
}

register_structs! {
    /// A redistributor's SGI_base frame (second 64 KiB): the PPI and SGI controls.
    GicrSgiRegs {
        (0x0000 => _reserved0),
        (0x0080 => igroupr0: ReadWrite<u32>),
        (0x0084 => _reserved1),
        (0x0100 => isenabler0: ReadWrite<u32>),
        (0x0104 => _reserved2),
        (0x0180 => icenabler0: ReadWrite<u32>),
        (0x0184 => _reserved3),
        (0x0400 => ipriorityr: [ReadWrite<u32>; 8]),
        (0x0420 => @END),
    }
}

const REDIST_STRIDE: u64 = 0x2_0000;
const SGI_FRAME: u64 = 0x1_0000;
/// Priority of the PPIs Labyrinth takes (any value above the PMR's 0xff passes).
const PPI_PRIORITY: u8 = 0x80;
/// Bounded polls of the hardware (a few ms under TCG).
const POLL_LIMIT: u32 = 1_000_000;

static GICD: AtomicU64 = AtomicU64::new(0);
static GICR: AtomicU64 = AtomicU64::new(0);
static GICR_END: AtomicU64 = AtomicU64::new(0);
/// Each CPU's redistributor SGI frame, found by [`init_cpu`] (0: none yet).
static SGI_FRAMES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Why the physical GIC cannot be used for guests.
#[derive(Debug, Clone, Copy)]
pub enum GicError {
    NotV3,
    NoRedistributor,
    Map,
    /// No redistributor frame carries this CPU's affinity.
    NoFrameForCpu(u64),
    /// The redistributor did not wake up within the poll limit.
    WakeTimeout,
}

impl core::fmt::Display for GicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GicError::NotV3 => f.write_str("the host GIC is not a GICv3"),
            GicError::NoRedistributor => f.write_str("the host device tree describes no GIC redistributor"),
            GicError::Map => f.write_str("cannot map the GIC at EL2"),
            GicError::NoFrameForCpu(a) => write!(f, "no redistributor for affinity {a:#x}"),
            GicError::WakeTimeout => f.write_str("the redistributor did not wake up"),
        }
    }
}

/// Maps the distributor and the first redistributor region and enables the distributor with
/// affinity routing (boot CPU, once, before any guest CPU calls [`init_cpu`]).
pub fn init(gic: &Gic) -> Result<(), GicError> {
    if gic.version != labyrinth::dt::GicVersion::V3 {
        return Err(GicError::NotV3);
    }
    let rd = *gic.redistributors.as_slice().first().ok_or(GicError::NoRedistributor)?;
    let d = gic.distributor;
    map_range(d.base(), d.base() + 0x1_0000, MapKind::Device).map_err(|_| GicError::Map)?;
    map_range(rd.base(), rd.end(), MapKind::Device).map_err(|_| GicError::Map)?;
    // SAFETY: GICD was just mapped as Device memory at its physical address (EL2 maps 1:1).
    let gicd = unsafe { &*(d.base() as *const GicdRegs) };
    // Affinity routing and both groups; DS (single security state) is what QEMU virt without
    // EL3 has, and the field is kept as found.
    gicd.ctlr.modify(GICD_CTLR::ARE::SET + GICD_CTLR::EnableGrp1::SET + GICD_CTLR::EnableGrp0::SET);
    let mut n = 0;
    while gicd.ctlr.is_set(GICD_CTLR::RWP) && n < POLL_LIMIT {
        n += 1;
    }
    GICR.store(rd.base(), Ordering::Relaxed);
    GICR_END.store(rd.end(), Ordering::Relaxed);
    GICD.store(d.base(), Ordering::Release);
    Ok(())
}

/// This CPU's redistributor: the frame whose `GICR_TYPER` affinity is this CPU's MPIDR.
fn this_redistributor() -> Result<u64, GicError> {
    let (mut at, end) = (GICR.load(Ordering::Acquire), GICR_END.load(Ordering::Acquire));
    let mpidr = super::cpu::mpidr();
    let aff = (mpidr & 0xff_ffff) | ((mpidr >> 32) & 0xff) << 24;
    while at != 0 && at + REDIST_STRIDE <= end {
        // SAFETY: inside the redistributor region mapped by `init`.
        let rd = unsafe { &*(at as *const GicrRdRegs) };
        let typer = rd.typer.extract();
        if typer.read(GICR_TYPER::Affinity) == aff {
            return Ok(at);
        }
        if typer.is_set(GICR_TYPER::Last) {
            break;
        }
        at += REDIST_STRIDE;
    }
    Err(GicError::NoFrameForCpu(mpidr))
}

/// Prepares this CPU to run a guest with a virtual GIC: wakes its redistributor, takes PPIs
/// 25 and 27 as group 1 at EL2, enables the system-register CPU interface for EL2 and for the
/// guest (virtual), and resets the virtual interface ([`vcpu_reset`]).
pub fn init_cpu() -> Result<(), GicError> {
    let base = this_redistributor()?;
    // SAFETY: this CPU's redistributor frames, mapped by `init`; no one else writes them.
    let (rd, sgi) = unsafe { (&*(base as *const GicrRdRegs), &*((base + SGI_FRAME) as *const GicrSgiRegs)) };
    rd.waker.modify(GICR_WAKER::ProcessorSleep::CLEAR);
    let mut n = 0;
    while rd.waker.is_set(GICR_WAKER::ChildrenAsleep) {
        n += 1;
        if n == POLL_LIMIT {
            return Err(GicError::WakeTimeout);
        }
    }
    let ours = (1 << VTIMER_PPI) | (1 << MAINTENANCE_PPI) | (1 << KICK_SGI) | (1 << HYP_TIMER_PPI);
    sgi.igroupr0.set(sgi.igroupr0.get() | ours);
    for intid in [VTIMER_PPI, MAINTENANCE_PPI, KICK_SGI, HYP_TIMER_PPI] {
        let reg = &sgi.ipriorityr[(intid / 4) as usize];
        let shift = (intid % 4) * 8;
        reg.set((reg.get() & !(0xff << shift)) | (u32::from(PPI_PRIORITY) << shift));
    }
    sgi.isenabler0.set(ours);
    if let Some(slot) = SGI_FRAMES.get(cpu_index()) {
        slot.store(base + SGI_FRAME, Ordering::Release);
    }
    // System registers at EL2 and (Enable) for EL1, which then reaches the virtual interface.
    ICC_SRE_EL2.write(ICC_SRE_EL2::SRE::SET + ICC_SRE_EL2::ENABLE::SET);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    // SAFETY: the physical CPU interface at EL2 (SRE set just above): priority mask open,
    // binary point 0, EOImode 0 (EOIR drops priority and deactivates), group 1 on.
    unsafe {
        core::arch::asm!(
            "msr S3_0_C4_C6_0, {pmr}",   // ICC_PMR_EL1
            "msr S3_0_C12_C12_3, xzr",   // ICC_BPR1_EL1
            "msr S3_0_C12_C12_4, xzr",   // ICC_CTLR_EL1
            "msr S3_0_C12_C12_7, {one}", // ICC_IGRPEN1_EL1
            "isb",
            pmr = in(reg) 0xffu64, one = in(reg) 1u64, options(nostack)
        );
    }
    vcpu_reset();
    Ok(())
}

/// The virtual CPU interface and the virtual timer as a fresh vCPU finds them: no list
/// register in use, no active priority, everything masked (VMCR 0), the timer off, the
/// interface on (`ICH_HCR_EL2.En`).
pub fn vcpu_reset() {
    write_lrs(&[0; 16][..lr_count()]);
    ICH_AP0R0_EL2.set(0);
    ICH_AP1R0_EL2.set(0);
    ICH_VMCR_EL2.set(0);
    CNTV_CTL_EL0.set(0);
    ICH_HCR_EL2.write(ICH_HCR_EL2::En::SET);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Stops this CPU taking anything for a guest that has stopped: virtual interface off, timer
/// off, group 1 off (so a parked CPU is never woken for nothing).
pub fn vcpu_off() {
    ICH_HCR_EL2.set(0);
    CNTV_CTL_EL0.set(0);
    // SAFETY: ICC_IGRPEN1_EL1 at EL2 is the physical interface's group 1 enable.
    unsafe { core::arch::asm!("msr S3_0_C12_C12_7, xzr", "isb", options(nostack)) };
}

/// Acknowledges the highest-priority pending group 1 interrupt: its INTID (>= 1020: none).
pub fn ack() -> u32 {
    let v: u64;
    // SAFETY: ICC_IAR1_EL1 at EL2 (physical interface), in the IRQ handler.
    unsafe { core::arch::asm!("mrs {}, S3_0_C12_C12_0", out(reg) v, options(nostack)) };
    v as u32 & 0xff_ffff
}

/// Routes SPI `intid` to the CPU whose MPIDR is `mpidr` as a group 1 interrupt Labyrinth
/// takes at EL2, and enables it: the host console's receiver. Called again to move it.
pub fn route_spi(intid: u32, mpidr: u64) {
    let d = GICD.load(Ordering::Acquire);
    let i = intid as usize;
    if d == 0 || !(32..1020).contains(&i) {
        return;
    }
    // SAFETY: the distributor, mapped as Device memory by `init` (EL2 maps 1:1).
    let gicd = unsafe { &*(d as *const GicdRegs) };
    gicd.igroupr[i / 32].set(gicd.igroupr[i / 32].get() | 1 << (i % 32));
    gicd.ipriorityr[i].set(PPI_PRIORITY);
    // Aff3 at [39:32], Aff2-Aff0 at [23:0]; Interrupt_Routing_Mode 0: this one CPU.
    gicd.irouter[i].set((mpidr & 0xff_ffff) | (mpidr & 0xff_0000_0000));
    gicd.isenabler[i / 32].set(1 << (i % 32));
}

/// Sends [`KICK_SGI`] to the CPU whose MPIDR is `mpidr` (group 1, affinity-routed).
pub fn kick(mpidr: u64) {
    let aff0 = mpidr & 0xff;
    let (aff1, aff2, aff3) = ((mpidr >> 8) & 0xff, (mpidr >> 16) & 0xff, (mpidr >> 32) & 0xff);
    // ICC_SGI1R_EL1: Aff3 [55:48], RS [47:44] (which 16 of Aff0), Aff2 [39:32], INTID [27:24],
    // Aff1 [23:16], TargetList [15:0].
    let value = aff3 << 48
        | (aff0 >> 4) << 44
        | aff2 << 32
        | u64::from(KICK_SGI) << 24
        | aff1 << 16
        | 1 << (aff0 & 0xf);

    // SAFETY: ICC_SGI1R_EL1 at EL2 (physical interface): generates a group 1 SGI; the DSB makes
    // the stores the receiver will look for visible before it can take the interrupt.
    unsafe { core::arch::asm!("dsb ish", "msr S3_0_C12_C11_5, {}", "isb", in(reg) value, options(nostack)) };
}

/// Completes `intid` (priority drop and deactivation: EOImode 0).
pub fn eoi(intid: u32) {
    // SAFETY: ICC_EOIR1_EL1 at EL2, for an INTID this CPU acknowledged.
    unsafe { core::arch::asm!("msr S3_0_C12_C12_1, {}", "isb", in(reg) u64::from(intid), options(nostack)) };
}

/// Enables or disables PPI `intid` in this CPU's redistributor: how the virtual timer's line
/// is held off while the guest has not dealt with its interrupt (its own `CNTV_CTL_EL0` stays
/// as the guest wrote it).
pub fn set_ppi_enabled(intid: u32, on: bool) {
    let Some(frame) = SGI_FRAMES.get(cpu_index()).map(|f| f.load(Ordering::Acquire)).filter(|&f| f != 0)
    else {
        return;
    };
    // SAFETY: this CPU's redistributor SGI frame, mapped by `init` and found by `init_cpu`.
    let sgi = unsafe { &*(frame as *const GicrSgiRegs) };
    let bit = 1u32 << (intid % 32);
    if on {
        sgi.isenabler0.set(bit);
    } else {
        sgi.icenabler0.set(bit);
    }
}

/// List registers this CPU implements (at most 16; Labyrinth uses the first 8).
pub fn lr_count() -> usize {
    ((ICH_VTR_EL2.get() & 0x1f) as usize + 1).min(8)
}

macro_rules! each_lr {
    ($f:ident) => {
        $f!(0 ICH_LR0_EL2, 1 ICH_LR1_EL2, 2 ICH_LR2_EL2, 3 ICH_LR3_EL2, 4 ICH_LR4_EL2, 5 ICH_LR5_EL2, 6 ICH_LR6_EL2, 7 ICH_LR7_EL2)
    };
}

/// Reads the first `lrs.len()` list registers.
pub fn read_lrs(lrs: &mut [u64]) {
    macro_rules! rd {
        ($($i:literal $r:ident),*) => {$(
            if let Some(v) = lrs.get_mut($i) { *v = $r.get(); }
        )*};
    }
    each_lr!(rd);
}

/// Writes the first `lrs.len()` list registers.
pub fn write_lrs(lrs: &[u64]) {
    macro_rules! wr {
        ($($i:literal $r:ident),*) => {$(
            if let Some(&v) = lrs.get($i) { $r.set(v); }
        )*};
    }
    each_lr!(wr);
}

/// Asks for a maintenance interrupt when the list registers are (nearly) empty, so that
/// interrupts left out of full list registers are delivered without waiting for a trap.
pub fn set_underflow(on: bool) {
    ICH_HCR_EL2.modify(if on { ICH_HCR_EL2::UIE::SET } else { ICH_HCR_EL2::UIE::CLEAR });
}
