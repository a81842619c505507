//! Per-CPU identity and stacks.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use aarch64_cpu::registers::{CurrentEL, Readable, ID_AA64MMFR0_EL1, MIDR_EL1, MPIDR_EL1, TPIDR_EL2};

use super::exception::TrapFrame;

const GUEST_FRAME_SIZE: usize = core::mem::size_of::<TrapFrame>();

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

/// One CPU's own record, which `TPIDR_EL2` points at from its first instruction on (set by
/// `cpu_setup` in `boot`): the one word the fast trap path loads to find its vCPU, the CPU's
/// index, and where a guest's trap saves its registers.
#[repr(C, align(32))]
pub struct CpuLocal {
    /// What the layer above keeps for this CPU (its vCPU), null until it is set.
    local: AtomicPtr<()>,
    index: usize,
    /// The frame every trap from a guest on this CPU is saved in ([`guest_frame_address`]),
    /// set with `local`.
    guest_frame: AtomicU64,
}

/// The records, by CPU index; `boot`'s `cpu_setup` computes a CPU's from its index and this
/// size.
#[no_mangle]
pub static CPU_LOCAL: [CpuLocal; MAX_CPUS] = {
    let mut all = [const {
        CpuLocal { local: AtomicPtr::new(core::ptr::null_mut()), index: 0, guest_frame: AtomicU64::new(0) }
    }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        all[i].index = i;
        i += 1;
    }
    all
};

pub const CPU_LOCAL_SIZE: usize = core::mem::size_of::<CpuLocal>();

#[inline(always)]
fn this_cpu() -> &'static CpuLocal {
    // SAFETY: `cpu_setup` pointed TPIDR_EL2 at this CPU's entry of `CPU_LOCAL` (a static)
    // before any Rust ran on it, and nothing writes TPIDR_EL2 afterwards.
    unsafe { &*(TPIDR_EL2.get() as *const CpuLocal) }
}

/// This CPU's index (0 = the boot CPU).
#[inline(always)]
pub fn cpu_index() -> usize {
    this_cpu().index
}

/// Records `p` as CPU `cpu`'s own pointer (the boot CPU, before `cpu` runs anything that
/// reads it; Release: what `p` points at is written first).
pub fn set_cpu_local(cpu: usize, p: *mut ()) {
    if let Some(c) = CPU_LOCAL.get(cpu) {
        c.guest_frame.store(guest_frame_address(cpu), Ordering::Relaxed);
        c.local.store(p, Ordering::Release);
    }
}

/// Where CPU `cpu` saves a guest's registers on a trap: the top of its exception stack, where
/// `SP_EL2` stands whenever a guest runs on it (the stack is empty then).
pub fn guest_frame_address(cpu: usize) -> u64 {
    core::ptr::addr_of!(STACKS) as u64 + (cpu * STACKS_STRIDE + EXCEPTION_STACK_TOP - GUEST_FRAME_SIZE) as u64
}

/// This CPU's [`guest_frame_address`], for the fast trap path (set with its own pointer).
#[inline(always)]
pub fn guest_frame() -> u64 {
    this_cpu().guest_frame.load(Ordering::Relaxed)
}

/// This CPU's own pointer ([`set_cpu_local`]), null if none: one system-register read and
/// one load, for the fast trap path.
#[inline(always)]
pub fn cpu_local() -> *mut () {
    // Relaxed: the pointer was stored before this CPU was started (or before this CPU
    // itself ran a guest), which orders it and what it points at.
    this_cpu().local.load(Ordering::Relaxed)
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
