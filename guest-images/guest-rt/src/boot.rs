//! The Linux arm64 Image header and the entry code.
//!
//! Entry state (arm64 boot protocol, what Labyrinth and QEMU provide): EL1h, MMU and caches
//! off, DAIF masked, x0 = the device tree's address, the image at 0x4008_0000 (RAM base
//! 0x4000_0000 + text_offset 0x80000). The entry code masks DAIF, selects SP_EL1, checks
//! that it runs where it is linked (else PSCI SYSTEM_OFF at once: nothing sane to do), enables
//! FP/SIMD (CPACR_EL1.FPEN: the compiler may use SIMD registers), sets SCTLR_EL1.A (alignment
//! checking, see [`set_alignment_check`]), installs VBAR_EL1, sets the stack, zeroes bss with
//! plain `str xzr` (never `DC ZVA`), then calls [`__guest_rt_start`].
//!
//! Secondary CPUs enter at `__guest_rt_secondary_entry` (PSCI CPU_ON, context id = the CPU's
//! index, 1..MAX_CPUS): the same register setup, then their own stack (slot `index - 1` of
//! `__secondary_stacks`, [`crate::smp::SECONDARY_STACK`] bytes each) and
//! `__guest_rt_secondary_start(index)` (in `smp`). Any other index: PSCI CPU_OFF at once.

use core::arch::global_asm;

use crate::dt::BootInfo;
use crate::ranges::Range;

/// Where the image is linked and must be loaded.
pub const LOAD_ADDRESS: u64 = 0x4008_0000;
/// The Image header's text_offset.
pub const TEXT_OFFSET: u64 = 0x8_0000;

global_asm!(
    r#"
    .section .text.head, "ax"
    .global _start
_start:
    b       1f                      // code0: branch to the entry code
    .long   0                       // code1
    .quad   {text_offset}           // text_offset
    .quad   __image_size            // image_size: text, data, bss and stack
    .quad   0xa                     // flags: little-endian, 4 KiB pages
    .quad   0, 0, 0                 // res2, res3, res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5

1:  msr     daifset, #0xf
    msr     spsel, #1
    mov     x19, x0                 // device tree
    adr     x1, _start
    ldr     x2, ={load}
    cmp     x1, x2
    b.ne    3f
    mov     x1, #(3 << 20)          // CPACR_EL1.FPEN: no FP/SIMD traps at EL1
    msr     cpacr_el1, x1
    mrs     x1, sctlr_el1           // SCTLR_EL1.A: alignment checks on every access, as
    orr     x1, x1, #(1 << 1)       // Device memory has anyway (QEMU 7.2 does not check
    msr     sctlr_el1, x1           // Device alignment with the MMU off; it does check A)
    ldr     x1, =__guest_rt_vectors
    msr     vbar_el1, x1
    isb
    ldr     x1, =__stack_top
    mov     sp, x1
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
2:  cmp     x1, x2
    b.hs    4f
    str     xzr, [x1], #8
    b       2b
4:  mov     x29, #0
    mov     x30, #0
    mov     x0, x19
    bl      __guest_rt_start
3:  mov     w0, #0x0008
    movk    w0, #0x8400, lsl #16    // PSCI SYSTEM_OFF
    hvc     #0
5:  wfi
    b       5b
    .ltorg

    .section .text, "ax"
    .global __guest_rt_secondary_entry
    .balign 4
__guest_rt_secondary_entry:
    msr     daifset, #0xf
    msr     spsel, #1
    mov     x19, x0                 // context id: this CPU's index
    cbz     x19, 3f
    cmp     x19, #{max_cpus}
    b.hs    3f
    mov     x1, #(3 << 20)          // CPACR_EL1.FPEN, SCTLR_EL1.A and VBAR_EL1: as above
    msr     cpacr_el1, x1
    mrs     x1, sctlr_el1
    orr     x1, x1, #(1 << 1)
    msr     sctlr_el1, x1
    ldr     x1, =__guest_rt_vectors
    msr     vbar_el1, x1
    isb
    ldr     x1, =__secondary_stacks
    mov     x2, #{stack_size}
    madd    x1, x19, x2, x1         // top of slot index - 1
    mov     sp, x1
    mov     x29, #0
    mov     x30, #0
    mov     x0, x19
    bl      __guest_rt_secondary_start
3:  mov     w0, #0x0002
    movk    w0, #0x8400, lsl #16    // PSCI CPU_OFF
    hvc     #0
5:  wfi
    b       5b
    .ltorg
"#,
    text_offset = const TEXT_OFFSET,
    load = const LOAD_ADDRESS,
    max_cpus = const crate::dt::MAX_CPUS,
    stack_size = const crate::smp::SECONDARY_STACK,
);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __stack_bottom: u8;
    static __stack_top: u8;
}

/// The whole image in memory: text to the end of the stack (= the header's image_size).
pub fn image() -> Range {
    // Linker symbols: only their addresses are used.
    Range::new(core::ptr::addr_of!(__image_start) as u64, core::ptr::addr_of!(__image_end) as u64)
}

/// The boot stack (inside [`image`]).
pub fn stack() -> Range {
    // Linker symbols: only their addresses are used.
    Range::new(core::ptr::addr_of!(__stack_bottom) as u64, core::ptr::addr_of!(__stack_top) as u64)
}

/// Sets or clears SCTLR_EL1.A. The entry code sets it: with the MMU off every access is to
/// Device memory, where an unaligned access faults on hardware whatever A says, but QEMU 7.2
/// only checks A; with A set QEMU catches what hardware would. Cleared only around a probe that
/// makes an unaligned access on purpose.
pub fn set_alignment_check(on: bool) {
    // SAFETY: read-modify-write of one SCTLR_EL1 bit; the MMU stays off.
    unsafe {
        core::arch::asm!(
            "mrs {t}, sctlr_el1",
            "bic {t}, {t}, #2",
            "orr {t}, {t}, {a}",
            "msr sctlr_el1, {t}",
            "isb",
            t = out(reg) _, a = in(reg) (on as u64) << 1,
            options(nostack));
    }
}

/// Called by the entry code: reads the device tree and calls the kernel's main (see
/// [`crate::entry!`]); a device tree it cannot read is reported and the guest powers off.
#[no_mangle]
unsafe extern "C" fn __guest_rt_start(dtb: usize) -> ! {
    extern "Rust" {
        fn __guest_main(boot: &BootInfo) -> !;
    }
    crate::smp::init_this_cpu();
    match crate::dt::read(dtb) {
        Ok(info) => {
            crate::psci::set_conduit(info.conduit);
            crate::smp::init(&info);
            if let Some(gic) = &info.gic {
                crate::gic::init(gic);
            }
            __guest_main(&info)
        }
        Err(e) => {
            crate::println!("guest: unusable device tree at {:#x}: {}", dtb, e);
            crate::psci::system_off()
        }
    }
}

/// Declares the kernel's main: `guest_rt::entry!(main);` with `fn main(boot: &BootInfo) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn __guest_main(boot: &$crate::dt::BootInfo) -> ! {
            let f: fn(&$crate::dt::BootInfo) -> ! = $main;
            f(boot)
        }
    };
}
