//! EL2 exception vectors. Exceptions from a guest (lower EL, AArch64) go to the two handlers
//! the VMM provides, `guest_fast` (with only the caller-saved registers in the frame) and
//! `guest_trap` (a full frame), and return to the guest through the same frame: the arch's one
//! contract with what runs above it, which it names and never calls otherwise. Every other
//! exception is unexpected: it is reported in full (class by name, syndrome, addresses,
//! registers) and the machine is powered off, so Labyrinth never hangs silently.

use core::arch::global_asm;
use labyrinth::esr::Syndrome;

/// Registers saved by the vector stubs, in the order the assembly stores them.
#[repr(C)]
pub struct TrapFrame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pub esr: u64,
    pub far: u64,
    _pad: u64,
}

impl TrapFrame {
    /// A frame that enters a guest at `pc` with `x0` and PSTATE `spsr`, other registers zero.
    pub const fn entry(pc: u64, x0: u64, spsr: u64) -> TrapFrame {
        let mut x = [0; 31];
        x[0] = x0;
        TrapFrame { x, elr: pc, spsr, esr: 0, far: 0, _pad: 0 }
    }
}

const FRAME_SIZE: usize = core::mem::size_of::<TrapFrame>();
// The entries allocate the frame with a pre-indexed `stp` (and free it with a post-indexed `ldp`),
// whose offset reaches 504 at most.
const _: () = assert!(FRAME_SIZE % 16 == 0 && FRAME_SIZE <= 504);

global_asm!(
    r#"
// Frame layout (TrapFrame): x0..x30 at 8*n, ELR at 248, SPSR at 256, ESR at 264, FAR at 272.
// x0/x1 are stored by the vector entry itself, to free two registers.

// The rest of what a Rust call may clobber: x2-x18.
.macro SAVE_CALLER_REST
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    str     x18, [sp, #144]
.endm

.macro RESTORE_CALLER_REST
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldr     x18, [sp, #144]
.endm

// What Rust preserves itself: x19-x29 (needed in the frame only where the handler reads or
// rewrites every register).
.macro SAVE_CALLEE
    str     x19, [sp, #152]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
.endm

.macro RESTORE_CALLEE
    ldr     x19, [sp, #152]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
.endm

// x30, ELR and SPSR into the frame (x1 is free: already saved).
.macro SAVE_LINK_AND_STATE
    mrs     x1, elr_el2
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el2
    str     x1, [sp, #256]
.endm

.macro VENTRY kind
    .balign 0x80
    stp     x0, x1, [sp, #-{frame}]!
    mov     x0, #\kind
    b       el2_trap_common
.endm

// A guest's exception: save its registers in a frame on this CPU's exception stack, let Rust
// handle it (it may rewrite the frame), restore and return to the guest.
.macro GUEST_VENTRY kind
    .balign 0x80
    stp     x0, x1, [sp, #-{frame}]!
    mov     x0, #\kind
    b       guest_trap_common
.endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global el2_vectors
el2_vectors:
    VENTRY 0
    VENTRY 1
    VENTRY 2
    VENTRY 3
    VENTRY 4
    VENTRY 5
    VENTRY 6
    VENTRY 7
    .balign 0x80                    // lower EL, AArch64, synchronous: the hot one
// Fast path, in the vector slot itself (26 of its 32 instructions: no branch to reach it):
// save only what a Rust call may clobber (x0-x18, x30). If `guest_fast` handles the trap (a
// demand fault, a PSCI query, a device read), restore those (x0-x18 as it may have rewritten
// them) and return; the guest's ELR/SPSR are untouched.
guest_sync_fast:
    stp     x0, x1, [sp, #-{frame}]!
    SAVE_CALLER_REST
    str     x30, [sp, #240]
    bl      guest_fast
    cbz     w0, guest_sync_slow
    RESTORE_CALLER_REST
    ldr     x30, [sp, #240]
    ldp     x0, x1, [sp], #{frame}
    eret
    .if (. - guest_sync_fast) > 0x80
    .error "the fast path overflows its vector slot"
    .endif
    GUEST_VENTRY 9
    GUEST_VENTRY 10
    GUEST_VENTRY 11
    VENTRY 12
    VENTRY 13
    VENTRY 14
    VENTRY 15

el2_trap_common:
    SAVE_CALLER_REST
    SAVE_CALLEE
    SAVE_LINK_AND_STATE
    mrs     x2, esr_el2
    mrs     x3, far_el2
    stp     x2, x3, [sp, #264]
    mov     x1, sp
    bl      el2_unexpected_exception
1:  wfe
    b       1b

// Not handled fast: the callee-saved registers still hold the guest's values (Rust kept
// them); complete the frame and take the general path.
guest_sync_slow:
    SAVE_CALLEE
    mrs     x1, elr_el2
    str     x1, [sp, #248]
    mrs     x1, spsr_el2
    str     x1, [sp, #256]
    mov     x0, #8
    mov     x1, sp
    bl      guest_trap
    b       guest_resume

guest_trap_common:
    SAVE_CALLER_REST
    SAVE_CALLEE
    SAVE_LINK_AND_STATE
    mov     x1, sp
    bl      guest_trap
    .global guest_resume
guest_resume:                       // sp = a frame to load into the guest
    ldp     x30, x1, [sp, #240]
    msr     elr_el2, x1
    ldr     x1, [sp, #256]
    msr     spsr_el2, x1
    RESTORE_CALLER_REST
    RESTORE_CALLEE
    ldp     x0, x1, [sp], #{frame}
    eret

// x0 = a frame at the top of this CPU's exception stack: switch to that stack and enter the
// guest through it. Thread code never comes back here.
    .global enter_guest
enter_guest:
    msr     spsel, #1
    mov     sp, x0
    msr     sp_el0, xzr             // from here on SP_EL0 is the guest's
    b       guest_resume
"#,
    frame = const FRAME_SIZE,
);

const ORIGIN: [&str; 4] = ["EL2 with SP_EL0", "EL2 with SP_EL2", "lower EL (AArch64)", "lower EL (AArch32)"];
const KIND: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];

#[no_mangle]
extern "C" fn el2_unexpected_exception(kind: u64, frame: &TrapFrame) -> ! {
    let origin = ORIGIN[(kind as usize / 4) % 4];
    let what = KIND[kind as usize % 4];
    let esr = Syndrome(frame.esr);
    let line = super::console::emergency_line;
    line(format_args!("unexpected {what} exception from {origin}"));
    line(format_args!(
        "  EC {:#04x} ({}), ESR {:#018x}, ISS {:#09x}",
        esr.class(),
        esr.class_name(),
        frame.esr,
        esr.iss(),
    ));
    if let Some(fsc) = esr.fault_status_name() {
        line(format_args!("  fault: {fsc}"));
    }
    line(format_args!("  FAR {:#018x}  ELR {:#018x}  SPSR {:#018x}", frame.far, frame.elr, frame.spsr));
    for row in 0..8 {
        let r = row * 4;
        let reg = |i: usize| frame.x.get(i).copied();
        match (reg(r), reg(r + 1), reg(r + 2), reg(r + 3)) {
            (Some(a), Some(b), Some(c), Some(d)) => line(format_args!(
                "  x{:<2} {a:#018x}  x{:<2} {b:#018x}  x{:<2} {c:#018x}  x{:<2} {d:#018x}",
                r,
                r + 1,
                r + 2,
                r + 3
            )),
            (Some(a), Some(b), Some(c), None) => {
                line(format_args!("  x{:<2} {a:#018x}  x{:<2} {b:#018x}  x{:<2} {c:#018x}", r, r + 1, r + 2))
            }
            _ => {}
        }
    }
    super::power::power_off()
}
