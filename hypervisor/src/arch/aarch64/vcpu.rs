//! Running a guest vCPU on this CPU: the EL2 controls chosen for guests, the EL1 state a vCPU
//! starts with, entering the guest, and changing what it sees on return (injected aborts,
//! skipped instructions, register values).
//!
//! One vCPU per physical CPU: while a guest runs, its EL1 system registers live in the CPU
//! itself and EL2 never touches them, so a trap saves only general-purpose registers. They are
//! saved and restored as a whole ([`El1Context`]) when a vCPU is put on or taken off a CPU.
//!
//! `HCR_EL2`, chosen deliberately:
//! - `VM`: stage-2 translation on; `RW`: EL1 is AArch64; `SWIO`: set/way invalidate is treated
//!   as clean+invalidate, so a guest cannot discard another's dirty lines;
//! - `IMO`, `FMO`, `AMO`: physical interrupts and SErrors go to EL2 (none is enabled yet);
//! - `TSC`: SMC traps (guests have no firmware of their own; PSCI is answered here);
//! - `TSW`: data-cache set/way operations trap: they cannot be made safe for a guest that shares
//!   caches, and are answered as no-ops (a guest with its MMU off reads memory uncached anyway);
//! - `TIDCP`, `TACR`: implementation-defined and auxiliary control registers trap (UNDEFINED).
//! Not set: `TWI`/`TWE` (a waiting guest halts its own CPU, which no one else uses, and wakes
//! on its timer's physical interrupt or a pending virtual one: never a busy spin), `TVM`,
//! `TID3` (guests see the CPU's real ID registers: same CPU, nothing to hide yet).
//! `CPTR_EL2`: nothing trapped (FP/SIMD and SVE stay with the guest: Labyrinth is built
//! soft-float and never touches them). `MDCR_EL2`: debug and PMU registers left to the guest,
//! all event counters given to it (HPMN = PMCR_EL0.N): one guest per CPU, nothing to switch.
//! `CNTHCTL_EL2`: EL1 reads the physical counter, the physical timer traps (only the virtual
//! timer's interrupt is delivered, see `gic`); `CNTVOFF_EL2` = 0. `VMPIDR_EL2`: the vCPU is
//! Aff0 = its index in the guest whatever CPU runs it, as its device tree says.

use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, CPTR_EL2, ELR_EL1, ELR_EL2, ESR_EL1, ESR_EL2, FAR_EL1,
    FAR_EL2, HCR_EL2, HPFAR_EL2, ID_AA64MMFR0_EL1, SPSR_EL1, VBAR_EL1, VTCR_EL2, VTTBR_EL2,
};
use labyrinth::stage2::Geometry;

use super::cpu::{cpu_index, guest_frame, guest_frame_address};
use super::exception::TrapFrame;
use super::{gic, timer};
use labyrinth::vm::vcpu::{GuestRegs, VcpuHw};

/// PSTATE a vCPU starts in: EL1h, all exceptions masked (boot protocol).
pub const SPSR_EL1H_MASKED: u64 = 0x3c5;
/// SCTLR_EL1 at reset: MMU and caches off, RES1 bits set.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;
const CPTR_EL2_RES1: u64 = 0x32ff;

/// Programs the EL2 controls for running vCPU `vcpu` of `vttbr`'s guest on this CPU.
pub fn configure_el2(vttbr: u64, geo: Geometry, vcpu: usize) {
    HCR_EL2.write(
        HCR_EL2::VM::Enable
            + HCR_EL2::SWIO::SET
            + HCR_EL2::FMO::EnableVirtualFIQ
            + HCR_EL2::IMO::EnableVirtualIRQ
            + HCR_EL2::AMO::SET
            + HCR_EL2::TSC::EnableTrapEl1SmcToEl2
            + HCR_EL2::TSW::SET
            + HCR_EL2::TIDCP::SET
            + HCR_EL2::TACR::SET
            + HCR_EL2::RW::EL1IsAarch64,
    );
    let ps = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange).min(5);
    VTCR_EL2.write(
        VTCR_EL2::RES1::SET
            + VTCR_EL2::PS.val(ps)
            + VTCR_EL2::TG0::Granule4KB
            + VTCR_EL2::SH0::Inner
            + VTCR_EL2::ORGN0::NormalWBRAWA
            + VTCR_EL2::IRGN0::NormalWBRAWA
            + VTCR_EL2::SL0.val(geo.sl0())
            + VTCR_EL2::T0SZ.val(geo.t0sz()),
    );
    VTTBR_EL2.set(vttbr);
    CPTR_EL2.set(CPTR_EL2_RES1);
    let pmcr: u64;
    // SAFETY: reads PMCR_EL0 at EL2 (never trapped there).
    unsafe { core::arch::asm!("mrs {}, pmcr_el0", out(reg) pmcr, options(nomem, nostack)) };
    let hpmn = (pmcr >> 11) & 0x1f;
    // SAFETY: MDCR_EL2 with only HPMN set: no debug or PMU trap, every counter to the guest.
    unsafe { core::arch::asm!("msr mdcr_el2, {}", in(reg) hpmn, options(nomem, nostack)) };
    // The physical counter stays readable at EL1 (CNTPCT = CNTVCT: CNTVOFF is 0, one guest per
    // CPU, nothing to hide), the physical timer traps: its interrupt (PPI 30) is never routed
    // to a guest, so a guest must use the virtual timer, whose PPI 27 Labyrinth injects.
    CNTHCTL_EL2.write(CNTHCTL_EL2::EL1PCTEN::SET);
    CNTVOFF_EL2.set(0);
    // vCPU i is cpu@i of its device tree: MPIDR_EL1 reads Aff0 = i, Aff1-3 = 0 (bit 31 RES1),
    // whichever physical CPU runs it; MIDR_EL1 reads the real CPU's.
    let midr: u64;
    // SAFETY: reads MIDR_EL1, writes VPIDR_EL2 and VMPIDR_EL2 (what EL1 reads as MIDR and MPIDR).
    unsafe {
        core::arch::asm!("mrs {m}, midr_el1", "msr vpidr_el2, {m}", "msr vmpidr_el2, {v}",
            m = out(reg) midr, v = in(reg) 0x8000_0000u64 | (vcpu as u64 & 0xff), options(nomem, nostack));
    }
    let _ = midr;
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Puts EL1 in its reset state for a fresh vCPU: MMU off, no vectors, nothing pending.
pub fn reset_el1() {
    El1Context::RESET.load();
}

/// The EL1 system registers of a vCPU that is not on a CPU. With one vCPU per CPU a running
/// guest's EL1 state is never switched out; today this only loads the reset state.
#[derive(Clone, Copy, Debug, Default)]
pub struct El1Context {
    regs: [u64; EL1_REGS],
}

/// SP_EL0 is not among them: it is the hypervisor's thread stack until the guest first runs,
/// and `enter_guest` / [`restart`] zero it from the exception stack.
const EL1_REGS: usize = 17;

/// Reads or writes one EL1 register by name through `mrs`/`msr`.
macro_rules! el1_regs {
    ($m:ident) => {
        $m!(
            0 sctlr_el1, 1 ttbr0_el1, 2 ttbr1_el1, 3 tcr_el1, 4 mair_el1, 5 amair_el1, 6 vbar_el1,
            7 contextidr_el1, 8 tpidr_el1, 9 tpidr_el0, 10 tpidrro_el0, 11 sp_el1,
            12 elr_el1, 13 spsr_el1, 14 cpacr_el1, 15 cntkctl_el1, 16 par_el1
        )
    };
}

impl El1Context {
    const RESET: El1Context = {
        let mut regs = [0; EL1_REGS];
        regs[0] = SCTLR_EL1_RESET;
        El1Context { regs }
    };

    /// Writes them back (a vCPU put on the CPU).
    pub fn load(&self) {
        macro_rules! wr {
            ($($i:literal $r:ident),*) => {$(
                // SAFETY: writes an EL1 system register from EL2; EL1 is not running.
                unsafe { core::arch::asm!(concat!("msr ", stringify!($r), ", {}"), in(reg) self.regs[$i], options(nomem, nostack)) };
            )*};
        }
        el1_regs!(wr);
        aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    }
}

/// The syndrome registers of the trap being handled.
pub struct Syndrome {
    pub esr: u64,
    pub far: u64,
    pub hpfar: u64,
}

pub fn trap_syndrome() -> Syndrome {
    Syndrome { esr: ESR_EL2.get(), far: FAR_EL2.get(), hpfar: HPFAR_EL2.get() }
}

/// Makes the guest take a synchronous exception at EL1 when it resumes, as the hardware would:
/// ESR/FAR/ELR/SPSR_EL1 set, PC at the right vector, EL1h with everything masked.
fn inject(frame: &mut TrapFrame, esr: u64, far: Option<u64>) {
    let offset = match frame.spsr & 0xf {
        0b0100 => 0x000, // EL1t
        0b0101 => 0x200, // EL1h
        _ => 0x400,      // EL0 (AArch64)
    };
    ESR_EL1.set(esr);
    if let Some(far) = far {
        FAR_EL1.set(far);
    }
    ELR_EL1.set(frame.elr);
    SPSR_EL1.set(frame.spsr);
    frame.elr = VBAR_EL1.get() + offset;
    frame.spsr = SPSR_EL1H_MASKED;
}

/// A synchronous external abort on the access that trapped (data or instruction).
fn inject_external_abort(frame: &mut TrapFrame, instruction: bool, trapped_esr: u64) {
    let from_el0 = frame.spsr & 0xf == 0;
    let class: u64 = match (instruction, from_el0) {
        (true, true) => 0x20,
        (true, false) => 0x21,
        (false, true) => 0x24,
        (false, false) => 0x25,
    };
    // Keep IL and, for data aborts, WnR; FSC 0x10 = synchronous external abort.
    let keep = trapped_esr & ((1 << 25) | if instruction { 0 } else { 1 << 6 });
    inject(frame, (class << 26) | keep | 0x10, Some(FAR_EL2.get()));
}

/// An UNDEFINED instruction exception for the trapped instruction.
fn inject_undefined(frame: &mut TrapFrame) {
    inject(frame, 1 << 25, None);
}

/// Starts this CPU's vCPU at `pc` with x0 = `x0`: EL1 reset state, then into the guest. The
/// thread stack is left behind for good; from here on this CPU runs in trap handlers.
pub fn enter(pc: u64, x0: u64) -> ! {
    reset_el1();
    let frame_at = guest_frame_address(cpu_index());
    let frame = TrapFrame::entry(pc, x0, SPSR_EL1H_MASKED);
    // SAFETY: `frame_at` is the top of this CPU's exception stack, mapped and unused (this CPU
    // is in thread mode, so no exception frame lives there); `enter_guest` makes it SP_EL2.
    unsafe {
        core::ptr::write(frame_at as *mut TrapFrame, frame);
        enter_guest(frame_at);
    }
}

extern "C" {
    fn enter_guest(frame: u64) -> !;
}

/// What the fast path can serve, from the syndrome alone.
pub enum FastTrap {
    /// An HVC (ELR already past it).
    Hvc,
    /// A stage-2 translation fault (data or instruction, any level) at the page `ipa`, with
    /// its syndrome (for an MMIO access: what the hardware decoded of it).
    TranslationFault {
        ipa: u64,
        esr: u64,
    },
    Other,
}

/// Classifies the trap being taken for the fast path (`guest_fast`, which the VMM provides).
#[inline(always)]
pub fn fast_trap() -> FastTrap {
    use ESR_EL2::EC::Value as Class;
    let esr = ESR_EL2.get();
    // ISS2 (bits 63:32) is left above the class: a CPU that sets it for an abort sends that
    // trap to the general path, which decodes it in full. The bare shift is what lets the
    // compiler test the data abort first (masked, it tests the HVC first: 2 more per fault).
    let class = esr >> ESR_EL2::EC.shift;
    if class == Class::HVC64 as u64 {
        return FastTrap::Hvc;
    }
    let abort = class == Class::DataAbortLowerEL as u64 || class == Class::InstrAbortLowerEL as u64;
    if !abort || esr & FSC_TYPE != FSC_TRANSLATION {
        return FastTrap::Other;
    }
    FastTrap::TranslationFault { ipa: HPFAR_EL2.read(HPFAR_EL2::FIPA) << 12, esr }
}

/// The fault status code's type bits (DFSC/IFSC bits 5:2; bits 1:0 are the level) and the
/// type of a translation fault (0b0001LL).
const FSC_TYPE: u64 = 0b11_1100;
const FSC_TRANSLATION: u64 = 0b00_0100;

/// The registers the vector entry saved for the fast path (`guest_fast` takes no argument: its
/// demand faults do not need them, so no instruction passes them).
///
/// # Safety
/// Only on the fast path, at most once per trap: the frame is this CPU's guest frame
/// (`cpu::guest_frame_address`, where `SP_EL2` stands while a guest runs), and the returned
/// reference must be the only one to it until the fast path returns.
#[inline(always)]
pub unsafe fn fast_frame() -> &'static mut TrapFrame {
    // SAFETY: a trap from a guest ran `guest_sync_fast`, which saved x0-x18 and x30 in the frame
    // at this CPU's exception-stack top, the address `set_cpu_local` recorded before the guest
    // ran (a static, mapped); the caller holds no other reference to it, and interrupts are
    // masked at EL2, so nothing else on this CPU touches it meanwhile.
    unsafe { &mut *(guest_frame() as *mut TrapFrame) }
}

/// The byte offset in its page of the address that faulted (`FAR_EL2`'s low 12 bits).
#[inline(always)]
pub fn fault_page_offset() -> u64 {
    FAR_EL2.get() & 0xfff
}

/// The registers of a trap on the fast path: x0-x18 and x30 in the frame, x19-x29 still in
/// the CPU (Rust preserves them) and the PC in `ELR_EL2` (the fast return does not reload
/// it). Only accesses to the frame's registers may be served through it.
pub struct FastRegs<'a>(pub &'a mut TrapFrame);

impl FastRegs<'_> {
    /// Whether register `r` is one this frame holds.
    #[inline(always)]
    pub fn holds(r: u8) -> bool {
        r <= 18 || r >= 30
    }
}

impl GuestRegs for FastRegs<'_> {
    #[inline(always)]
    fn x(&self, r: u8) -> u64 {
        if Self::holds(r) {
            self.0.x(r)
        } else {
            0
        }
    }
    #[inline(always)]
    fn set_x(&mut self, r: u8, value: u64) {
        if Self::holds(r) {
            self.0.set_x(r, value);
        }
    }
    fn pc(&self) -> u64 {
        ELR_EL2.get()
    }
    #[inline(always)]
    fn skip_instruction(&mut self) {
        ELR_EL2.set(ELR_EL2.get() + 4);
    }
}

impl GuestRegs for TrapFrame {
    #[inline(always)]
    fn x(&self, r: u8) -> u64 {
        self.x.get(r as usize).copied().unwrap_or(0)
    }
    #[inline(always)]
    fn set_x(&mut self, r: u8, value: u64) {
        if let Some(x) = self.x.get_mut(r as usize) {
            *x = value;
        }
    }
    fn pc(&self) -> u64 {
        self.elr
    }
    fn skip_instruction(&mut self) {
        self.elr += 4;
    }
}

/// This CPU, as exit handling sees it (`vm::vcpu::VcpuHw`).
pub struct Hw;

impl VcpuHw for Hw {
    type Regs = TrapFrame;
    fn inject_external_abort(&mut self, regs: &mut TrapFrame, instruction: bool, esr: u64) {
        inject_external_abort(regs, instruction, esr);
    }
    fn inject_undefined(&mut self, regs: &mut TrapFrame) {
        inject_undefined(regs);
    }
    fn ack(&mut self) -> Option<u32> {
        Some(gic::ack()).filter(|&i| i < gic::SPURIOUS)
    }
    fn eoi(&mut self, intid: u32) {
        gic::eoi(intid);
    }
    fn lr_count(&self) -> usize {
        gic::lr_count()
    }
    fn read_lrs(&mut self, lrs: &mut [u64]) {
        gic::read_lrs(lrs);
    }
    fn write_lrs(&mut self, lrs: &[u64]) {
        gic::write_lrs(lrs);
    }
    fn set_underflow(&mut self, on: bool) {
        gic::set_underflow(on);
    }
    fn set_ppi_enabled(&mut self, intid: u32, on: bool) {
        gic::set_ppi_enabled(intid, on);
    }
    fn counter(&self) -> u64 {
        timer::counter()
    }
    fn vtimer_registers(&self) -> (u64, u64) {
        timer::vtimer_registers()
    }
    fn set_hyp_timer(&mut self, deadline: Option<u64>) {
        timer::set_hyp_timer(deadline);
    }
    fn kick(&mut self, cpu: usize) {
        if let Some(mpidr) = super::cpu::mpidr_of(cpu) {
            gic::kick(mpidr);
        }
    }
    fn wake_waiters(&mut self) {
        super::power::send_event();
    }
    fn console_line(&mut self, guest: &str, line: &[u8]) {
        let text = core::str::from_utf8(line).unwrap_or("<non-UTF-8 output>");
        super::console::raw_line(format_args!("[{guest}] {text}"));
    }
    fn console_part(&mut self, guest: &str, line: &[u8], ended: bool) {
        // The name's address tags its open line: one per guest, fixed for the run.
        super::console::LOGGER.raw_part(guest.as_ptr() as usize, guest, line, ended);
    }
    fn console_intid(&self) -> Option<u32> {
        super::console::input_intid()
    }
}
