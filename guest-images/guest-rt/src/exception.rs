//! EL1 exception vectors, recorded faults and the probes built on them.
//!
//! The hypervisor answers any access a guest may not make with an injected synchronous external
//! abort. The handler records ESR_EL1, FAR_EL1 and ELR_EL1 ([`last_fault`]) and recovers:
//! - data abort (EC 0x25): skips the faulting instruction (ELR_EL1 += 4);
//! - instruction abort (EC 0x21): returns to the faulting call's return address, x30 (probes
//!   fetch from a bad address with `blr`, see [`probe_exec`]);
//! - inside a probe, also: any other synchronous exception (an `hvc`/`smc` that is UNDEFINED
//!   here: skipped; code fetched and executed from a probed address: back to x30), and an
//!   SError taken in the window a write probe opens (recorded, resumed).
//! An IRQ (current EL, SP_EL1) goes to [`crate::gic::handle_irq`] if the kernel installed a
//! handler there. Anything else prints `guest: unexpected <vector> esr=.. far=.. elr=.. spsr=..`
//! and powers off. The probe mode and the records are per CPU. An abort recovered outside a probe is printed too (`guest: recovered ...`) and counted
//! ([`stray_faults`]): it means the kernel touched something it should have been given.
//!
//! The entry code saves x0-x30, ELR, SPSR, FPSR, FPCR and q0-q31 (800 bytes, on SP_EL1).

use core::arch::{asm, global_asm};
use core::fmt;

use crate::smp::this_cpu;
use crate::PerCpu;

global_asm!(
    r#"
    .macro GUEST_RT_VENTRY kind
    .balign 0x80
    sub     sp, sp, #800
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       __guest_rt_exception_entry
    .endm

    .section .text.vectors, "ax"
    .balign 2048
    .global __guest_rt_vectors
__guest_rt_vectors:
    GUEST_RT_VENTRY 0
    GUEST_RT_VENTRY 1
    GUEST_RT_VENTRY 2
    GUEST_RT_VENTRY 3
    GUEST_RT_VENTRY 4
    GUEST_RT_VENTRY 5
    GUEST_RT_VENTRY 6
    GUEST_RT_VENTRY 7
    GUEST_RT_VENTRY 8
    GUEST_RT_VENTRY 9
    GUEST_RT_VENTRY 10
    GUEST_RT_VENTRY 11
    GUEST_RT_VENTRY 12
    GUEST_RT_VENTRY 13
    GUEST_RT_VENTRY 14
    GUEST_RT_VENTRY 15

__guest_rt_exception_entry:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x1, elr_el1
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el1
    str     x1, [sp, #256]
    stp     q0, q1, [sp, #288]
    stp     q2, q3, [sp, #320]
    stp     q4, q5, [sp, #352]
    stp     q6, q7, [sp, #384]
    stp     q8, q9, [sp, #416]
    stp     q10, q11, [sp, #448]
    stp     q12, q13, [sp, #480]
    stp     q14, q15, [sp, #512]
    stp     q16, q17, [sp, #544]
    stp     q18, q19, [sp, #576]
    stp     q20, q21, [sp, #608]
    stp     q22, q23, [sp, #640]
    stp     q24, q25, [sp, #672]
    stp     q26, q27, [sp, #704]
    stp     q28, q29, [sp, #736]
    stp     q30, q31, [sp, #768]
    mrs     x1, fpsr
    mrs     x2, fpcr
    stp     x1, x2, [sp, #264]
    mov     x1, x0
    mov     x0, sp
    mov     x29, #0
    bl      __guest_rt_exception
    ldp     x1, x2, [sp, #264]
    msr     fpsr, x1
    msr     fpcr, x2
    ldp     q0, q1, [sp, #288]
    ldp     q2, q3, [sp, #320]
    ldp     q4, q5, [sp, #352]
    ldp     q6, q7, [sp, #384]
    ldp     q8, q9, [sp, #416]
    ldp     q10, q11, [sp, #448]
    ldp     q12, q13, [sp, #480]
    ldp     q14, q15, [sp, #512]
    ldp     q16, q17, [sp, #544]
    ldp     q18, q19, [sp, #576]
    ldp     q20, q21, [sp, #608]
    ldp     q22, q23, [sp, #640]
    ldp     q24, q25, [sp, #672]
    ldp     q26, q27, [sp, #704]
    ldp     q28, q29, [sp, #736]
    ldp     q30, q31, [sp, #768]
    ldp     x30, x1, [sp, #240]
    msr     elr_el1, x1
    ldr     x1, [sp, #256]
    msr     spsr_el1, x1
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #800
    eret
"#
);

/// What the entry code saved (the general-purpose part; FP/SIMD follows it on the stack).
#[repr(C)]
pub struct Frame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
}

/// Vector offsets / 0x80.
const CURRENT_SPX_SYNC: u64 = 4;
const CURRENT_SPX_IRQ: u64 = 5;
const CURRENT_SPX_SERROR: u64 = 7;

pub const EC_UNKNOWN: u64 = 0x00;
pub const EC_IABT_CUR: u64 = 0x21;
pub const EC_DABT_CUR: u64 = 0x25;
pub const EC_SERROR: u64 = 0x2f;

/// One recorded exception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Vector index (offset / 0x80): 4 = synchronous, 7 = SError (current EL, SP_EL1).
    pub vector: u64,
    pub esr: u64,
    pub far: u64,
    pub elr: u64,
}

impl Fault {
    pub fn ec(&self) -> u64 {
        (self.esr >> 26) & 0x3f
    }

    pub fn is_abort(&self) -> bool {
        matches!(self.ec(), 0x20 | 0x21 | 0x24 | 0x25)
    }

    /// Fault status code of an abort (ISS[5:0]).
    pub fn fsc(&self) -> u64 {
        self.esr & 0x3f
    }
}

/// The exception's class, e.g. `data abort ec=0x25, external abort fsc=0x10, esr=0x96000010`.
impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ec = if self.vector == CURRENT_SPX_SERROR { EC_SERROR } else { self.ec() };
        write!(f, "{} ec={:#04x}", ec_name(ec), ec)?;
        if self.vector != CURRENT_SPX_SERROR && self.is_abort() {
            write!(f, ", {} fsc={:#04x}", fsc_name(self.fsc()), self.fsc())?;
        }
        write!(f, ", esr={:#x}", self.esr)
    }
}

pub fn ec_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "undefined instruction",
        0x01 => "wfi/wfe trap",
        0x07 => "fp/simd access",
        0x0e => "illegal execution state",
        0x15 => "svc",
        0x16 => "hvc",
        0x17 => "smc",
        0x18 => "system register trap",
        0x20 | 0x21 => "instruction abort",
        0x22 => "pc alignment fault",
        0x24 | 0x25 => "data abort",
        0x26 => "sp alignment fault",
        0x2f => "serror",
        0x3c => "brk",
        _ => "exception",
    }
}

pub fn fsc_name(fsc: u64) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x09..=0x0b => "access flag fault",
        0x0d..=0x0f => "permission fault",
        0x10 => "external abort",
        0x11 => "tag check fault",
        0x14..=0x17 => "external abort on table walk",
        0x18 => "parity/ecc error",
        0x21 => "alignment fault",
        0x30 => "tlb conflict",
        _ => "abort",
    }
}

/// How the handler treats the exceptions it does not always recover from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only aborts are recovered (and reported as stray).
    Normal,
    /// A probe of one instruction: any synchronous exception skips it, an SError is resumed.
    Insn,
    /// A `blr` probe: any synchronous exception returns to x30.
    Exec,
}

static MODE: PerCpu<Mode> = PerCpu::new(Mode::Normal);
static LAST: PerCpu<Option<Fault>> = PerCpu::new(None);
static STRAY: PerCpu<u64> = PerCpu::new(0);

/// The last exception the handler recovered from on this CPU.
pub fn last_fault() -> Option<Fault> {
    LAST.get(this_cpu())
}

/// Aborts recovered outside a probe since boot, on this CPU.
pub fn stray_faults() -> u64 {
    STRAY.get(this_cpu())
}

/// Aborts recovered outside a probe since boot, on CPU `cpu`.
pub fn stray_faults_of(cpu: usize) -> u64 {
    STRAY.get(cpu)
}

fn read_esr_far() -> (u64, u64) {
    let (esr, far): (u64, u64);
    // SAFETY: reads syndrome registers.
    unsafe {
        asm!("mrs {e}, esr_el1", "mrs {f}, far_el1", e = out(reg) esr, f = out(reg) far, options(nomem, nostack))
    };
    (esr, far)
}

fn vector_name(v: u64) -> &'static str {
    [
        "sync (SP_EL0)",
        "irq (SP_EL0)",
        "fiq (SP_EL0)",
        "serror (SP_EL0)",
        "sync",
        "irq",
        "fiq",
        "serror",
        "sync from lower EL",
        "irq from lower EL",
        "fiq from lower EL",
        "serror from lower EL",
        "sync from aarch32",
        "irq from aarch32",
        "fiq from aarch32",
        "serror from aarch32",
    ][(v & 15) as usize]
}

#[no_mangle]
extern "C" fn __guest_rt_exception(frame: &mut Frame, vector: u64) {
    if vector == CURRENT_SPX_IRQ && crate::gic::handle_irq() {
        return;
    }
    let me = this_cpu();
    let (esr, far) = read_esr_far();
    let fault = Fault { vector, esr, far, elr: frame.elr };
    let mode = MODE.get(me);
    let ec = fault.ec();
    if vector == CURRENT_SPX_SYNC {
        let resume = match (mode, ec) {
            (Mode::Exec, _) | (_, EC_IABT_CUR) => Some(frame.x[30]),
            (_, EC_DABT_CUR) | (Mode::Insn, _) => Some(frame.elr + 4),
            _ => None,
        };
        if let Some(pc) = resume {
            LAST.set(me, Some(fault));
            if mode == Mode::Normal {
                STRAY.set(me, STRAY.get(me) + 1);
                crate::println!(
                    "guest: recovered {}: esr={:#x} far={:#x} elr={:#x}, resuming at {:#x}",
                    ec_name(ec),
                    esr,
                    far,
                    frame.elr,
                    pc
                );
            }
            frame.elr = pc;
            return;
        }
    } else if vector == CURRENT_SPX_SERROR && mode != Mode::Normal {
        LAST.set(me, Some(fault));
        return;
    }
    crate::println!(
        "guest: unexpected {} ({}) esr={:#x} far={:#x} elr={:#x} spsr={:#x}",
        vector_name(vector),
        ec_name(ec),
        esr,
        far,
        frame.elr,
        frame.spsr
    );
    crate::psci::system_off();
}

/// Runs `f` (one probing instruction) in `mode`, then opens a window for a pending SError.
fn probe<R>(mode: Mode, f: impl FnOnce() -> R) -> (R, Option<Fault>) {
    let me = this_cpu();
    LAST.set(me, None);
    MODE.set(me, mode);
    let r = f();
    // An asynchronous abort the hypervisor may have raised for this access is taken here.
    // SAFETY: unmasks SError for two instructions; the handler resumes it in probe mode.
    unsafe { asm!("msr daifclr, #4", "isb", "msr daifset, #4", options(nostack)) };
    MODE.set(me, Mode::Normal);
    (r, LAST.get(me))
}

/// Runs `f`, one instruction that may be UNDEFINED or abort (e.g. a system register access):
/// its result, or the exception it raised (the instruction is then skipped).
pub fn probe_insn<R>(f: impl FnOnce() -> R) -> Result<R, Fault> {
    match probe(Mode::Insn, f) {
        (_, Some(fault)) => Err(fault),
        (r, None) => Ok(r),
    }
}

/// One aligned 32-bit load from `addr`: the value, or the exception it raised.
///
/// # Safety
/// Reads anything; the caller must be ready for what a read of `addr` does.
pub unsafe fn probe_read32(addr: u64) -> Result<u32, Fault> {
    match probe(Mode::Insn, || {
        let mut v: u32 = 0xdead_dead;
        asm!("ldr {v:w}, [{a}]", a = in(reg) addr, v = inout(reg) v, options(nostack, preserves_flags));
        v
    }) {
        (_, Some(f)) => Err(f),
        (v, None) => Ok(v),
    }
}

/// One 32-bit store (`str wN`) to `addr` (which may be unaligned, to test exactly that).
///
/// # Safety
/// Writes anything.
pub unsafe fn probe_write32(addr: u64, v: u32) -> Result<(), Fault> {
    match probe(Mode::Insn, || {
        asm!("str {v:w}, [{a}]", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags));
    }) {
        (_, Some(f)) => Err(f),
        _ => Ok(()),
    }
}

/// One 8-bit store (`strb wN`) to `addr`.
///
/// # Safety
/// Writes anything.
pub unsafe fn probe_write8(addr: u64, v: u8) -> Result<(), Fault> {
    match probe(Mode::Insn, || {
        asm!("strb {v:w}, [{a}]", a = in(reg) addr, v = in(reg) v as u32, options(nostack, preserves_flags));
    }) {
        (_, Some(f)) => Err(f),
        _ => Ok(()),
    }
}

/// `blr addr`: `Err` with the exception if one was taken (an instruction abort is a denied
/// fetch; anything else means code at `addr` was fetched and executed), `Ok` if the code at
/// `addr` returned by itself.
///
/// # Safety
/// Executes anything.
pub unsafe fn probe_exec(addr: u64) -> Result<(), Fault> {
    match probe(Mode::Exec, || {
        asm!("blr {t}", t = in(reg) addr, clobber_abi("C"));
    }) {
        (_, Some(f)) => Err(f),
        _ => Ok(()),
    }
}

/// An SMCCC call with `hvc #0` (`smc == false`) or `smc #0`: x0, or the exception if the
/// instruction was not handled (e.g. UNDEFINED).
pub fn probe_call(smc: bool, fid: u32, a1: u64, a2: u64, a3: u64) -> Result<u64, Fault> {
    let call = || {
        let r: u64;
        // SAFETY: a firmware/hypervisor call; registers per SMCCC.
        unsafe {
            if smc {
                asm!("smc #0", inlateout("x0") fid as u64 => r,
                    inlateout("x1") a1 => _, inlateout("x2") a2 => _, inlateout("x3") a3 => _,
                    clobber_abi("C"), options(nostack));
            } else {
                asm!("hvc #0", inlateout("x0") fid as u64 => r,
                    inlateout("x1") a1 => _, inlateout("x2") a2 => _, inlateout("x3") a3 => _,
                    clobber_abi("C"), options(nostack));
            }
        }
        r
    };
    match probe(Mode::Insn, call) {
        (_, Some(f)) => Err(f),
        (r, None) => Ok(r),
    }
}
