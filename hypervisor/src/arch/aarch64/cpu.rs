//! Per-CPU identity and stacks.

use aarch64_cpu::registers::{CurrentEL, Readable, ID_AA64MMFR0_EL1, MIDR_EL1, MPIDR_EL1, TPIDR_EL2};

/// CPUs Labyrinth will bring up; further CPUs in the device tree are left off.
pub const MAX_CPUS: usize = 8;
pub const MAIN_STACK_SIZE: usize = 64 * 1024;
/// Guests' traps run here, teardown and reports included: not a small stack.
pub const EXCEPTION_STACK_SIZE: usize = 32 * 1024;
const PAGE: usize = 4096;

/// One CPU's stacks. Thread code runs on `main` (SP_EL0); exceptions taken at EL2 switch to
/// `exception` (SP_EL2), so a main-stack overflow is reported instead of recursing. The guard
/// pages stay unmapped: running off either stack faults.
#[repr(C, align(4096))]
pub struct CpuStacks {
    guard_main: [u8; PAGE],
    pub main: [u8; MAIN_STACK_SIZE],
    guard_exception: [u8; PAGE],
    pub exception: [u8; EXCEPTION_STACK_SIZE],
}

#[no_mangle]
#[link_section = ".bss.stacks"]
pub static mut STACKS: [CpuStacks; MAX_CPUS] = [const {
    CpuStacks {
        guard_main: [0; PAGE],
        main: [0; MAIN_STACK_SIZE],
        guard_exception: [0; PAGE],
        exception: [0; EXCEPTION_STACK_SIZE],
    }
}; MAX_CPUS];

pub const STACKS_STRIDE: usize = core::mem::size_of::<CpuStacks>();
pub const MAIN_STACK_TOP: usize = core::mem::offset_of!(CpuStacks, main) + MAIN_STACK_SIZE;
pub const EXCEPTION_STACK_TOP: usize = core::mem::offset_of!(CpuStacks, exception) + EXCEPTION_STACK_SIZE;

/// The stacks of `cpu` as `(main, exception)` address ranges, for the EL2 map.
pub fn stack_ranges(cpu: usize) -> [(u64, u64); 2] {
    let base = core::ptr::addr_of!(STACKS) as u64 + (cpu * STACKS_STRIDE) as u64;
    let main = core::mem::offset_of!(CpuStacks, main) as u64;
    let exc = core::mem::offset_of!(CpuStacks, exception) as u64;
    [
        (base + main, base + main + MAIN_STACK_SIZE as u64),
        (base + exc, base + exc + EXCEPTION_STACK_SIZE as u64),
    ]
}

/// This CPU's index (0 = the boot CPU), set from `TPIDR_EL2` at entry.
pub fn cpu_index() -> usize {
    TPIDR_EL2.get() as usize
}

/// The MPIDR of each CPU by Labyrinth's index (0: not started), recorded as they are started.
static MPIDRS: [core::sync::atomic::AtomicU64; MAX_CPUS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MAX_CPUS];

/// Records that CPU `index` has MPIDR affinity `mpidr` (boot CPU, as it starts the others).
pub fn record_mpidr(index: usize, mpidr: u64) {
    if let Some(slot) = MPIDRS.get(index) {
        slot.store(mpidr | 1 << 63, core::sync::atomic::Ordering::Release);
    }
}

/// The MPIDR affinity of CPU `index`, if it was started.
pub fn mpidr_of(index: usize) -> Option<u64> {
    let v = MPIDRS.get(index)?.load(core::sync::atomic::Ordering::Acquire);
    (v != 0).then_some(v & !(1 << 63))
}

/// This CPU's MPIDR affinity fields (Aff3..Aff0), the form the device tree and PSCI use.
pub fn mpidr() -> u64 {
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

/// Identification a boot log wants.
pub struct CpuInfo {
    pub current_el: u64,
    pub midr: u64,
    pub pa_bits: u32,
}

pub fn read_cpu_info() -> CpuInfo {
    let pa_bits = match ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange) {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    };
    CpuInfo { current_el: CurrentEL.read(CurrentEL::EL), midr: MIDR_EL1.get(), pa_bits }
}
