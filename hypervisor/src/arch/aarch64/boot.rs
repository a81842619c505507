//! Entry: the Linux arm64 Image header, self-relocation, bss, per-CPU stacks, the boot map and
//! the MMU, for the boot CPU (from the bootloader) and for secondaries (from PSCI CPU_ON).
//!
//! Entry state (arm64 boot protocol): EL2, MMU off, x0 = the device tree's physical address.
//! Until the MMU is on nothing here may use atomics or unaligned accesses, which Device memory
//! (all memory, with the MMU off) does not allow.

use core::arch::global_asm;

use super::cpu::{CPU_LOCAL_SIZE, EXCEPTION_STACK_TOP, MAIN_STACK_TOP, MAX_CPUS, STACKS_STRIDE};

/// Image header flags: little-endian, 4 KiB pages, may be placed anywhere in RAM.
const IMAGE_FLAGS: u64 = (1 << 1) | (1 << 3);
/// ELF relocation type of position-independent pointers.
const R_AARCH64_RELATIVE: u64 = 0x403;

global_asm!(
    r#"
    .section .text.head, "ax"
    .global _start
_start:
    b       primary_entry           // code0
    .long   0                       // code1
    .quad   0                       // text_offset: any 2 MiB-aligned base
    .quad   __image_size            // image_size, bss and stacks included
    .quad   {flags}
    .quad   0, 0, 0
    .ascii  "ARM\x64"
    .long   0

primary_entry:
    msr     daifset, #0xf
    mov     x19, x0                 // device tree
    adr     x20, _start             // load base: we are linked at 0

    // Apply R_AARCH64_RELATIVE relocations: *(base + offset) = base + addend.
    adrp    x1, __rela_start
    add     x1, x1, :lo12:__rela_start
    adrp    x2, __rela_end
    add     x2, x2, :lo12:__rela_end
1:  cmp     x1, x2
    b.hs    2f
    ldp     x3, x4, [x1], #16
    ldr     x5, [x1], #8
    cmp     x4, #{rel}
    b.ne    .Lhalt                  // no console yet: nothing sane to do
    add     x5, x5, x20
    str     x5, [x20, x3]
    b       1b

2:  adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b

4:  mov     x0, #0
    bl      cpu_setup
    mov     x0, x19
    bl      early_map
    mov     x21, x0                 // mapped device-tree size, 0 if unusable
    bl      invalidate_image
    bl      enable_mmu
    mov     x0, x19
    mov     x1, x21
    bl      arch_primary_entry
    b       .Lhalt

    .global secondary_entry
secondary_entry:                    // x0 = CPU index (PSCI context id)
    msr     daifset, #0xf
    mov     x19, x0
    cmp     x0, #{max_cpus}
    b.hs    .Lhalt
    bl      cpu_setup
    bl      enable_mmu
    mov     x0, x19
    bl      secondary_main
.Lhalt:
    wfe
    b       .Lhalt

// x0 = CPU index: its stacks, TPIDR_EL2 (its CPU_LOCAL record), vectors. Clobbers x1-x3.
cpu_setup:
    adrp    x1, STACKS
    add     x1, x1, :lo12:STACKS
    ldr     x2, ={stride}
    madd    x1, x0, x2, x1
    ldr     x2, ={exc_top}
    add     x3, x1, x2
    msr     spsel, #1
    mov     sp, x3                  // SP_EL2: exceptions taken at EL2
    ldr     x2, ={main_top}
    add     x3, x1, x2
    msr     spsel, #0
    mov     sp, x3                  // SP_EL0: thread code
    adrp    x1, CPU_LOCAL
    add     x1, x1, :lo12:CPU_LOCAL
    mov     x2, #{local_size}
    madd    x1, x0, x2, x1
    msr     tpidr_el2, x1
    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    isb
    ret

// Everything the MMU-off code wrote (relocations, bss, page tables) went straight to memory;
// drop any stale cache lines over the image so cacheable reads see it. The protocol has the
// bootloader clean the image to the point of coherency, so no dirty line is lost.
invalidate_image:
    adrp    x0, __image_start
    add     x0, x0, :lo12:__image_start
    adrp    x1, __image_end
    add     x1, x1, :lo12:__image_end
    mrs     x3, ctr_el0
    ubfx    x3, x3, #16, #4         // DminLine: log2 of words per line
    mov     x2, #4
    lsl     x2, x2, x3
    sub     x3, x2, #1
    bic     x0, x0, x3
5:  dc      ivac, x0
    add     x0, x0, x2
    cmp     x0, x1
    b.lo    5b
    dsb     sy
    ret
"#,
    flags = const IMAGE_FLAGS,
    rel = const R_AARCH64_RELATIVE,
    max_cpus = const MAX_CPUS,
    stride = const STACKS_STRIDE,
    exc_top = const EXCEPTION_STACK_TOP,
    main_top = const MAIN_STACK_TOP,
    local_size = const CPU_LOCAL_SIZE,
);

extern "C" {
    fn secondary_entry();
}

/// The boot CPU's first Rust with the MMU on: the boot map goes under its lock, then the
/// portable boot sequence runs.
#[no_mangle]
extern "C" fn arch_primary_entry(dtb: u64, dtb_size: u64) -> ! {
    super::mmu::adopt_early_map();
    crate::primary_main(dtb, dtb_size)
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// `[start, end)` of the loaded image, bss and stacks included.
pub fn image_range() -> (u64, u64) {
    // SAFETY: linker-defined symbols; only their addresses are taken.
    unsafe { (&__image_start as *const u8 as u64, &__image_end as *const u8 as u64) }
}

/// Physical address at which PSCI CPU_ON starts a secondary CPU (identity map: VA = PA).
pub fn secondary_entry_address() -> u64 {
    secondary_entry as *const () as u64
}
