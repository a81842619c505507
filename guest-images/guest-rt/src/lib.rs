//! Runtime of Labyrinth's guest test kernels (EL1, MMU and caches off, one or more CPUs).
//!
//! - [`boot`]: the Linux arm64 Image header and the entry code (vectors, stack, bss), which
//!   reads the device tree and calls the kernel's `main` (see [`entry!`]); the secondary CPUs'
//!   entry code.
//! - [`smp`]: starting secondary CPUs (PSCI CPU_ON), barriers and per-CPU data with plain
//!   loads and stores.
//! - [`console`]: the PL011 at 0x0900_0000, aligned 32-bit accesses only; [`print!`], [`println!`]
//!   (one CPU at a time, per call).
//! - [`psci`]: PSCI over the device tree's conduit (SMCCC).
//! - [`labyrinth`]: Labyrinth's own calls (memory figures, giving pages back).
//! - [`exception`]: VBAR_EL1 vectors that record ESR/FAR and recover from aborts, and the probes
//!   (read, write, execute, hvc, smc) built on them; IRQs go to [`gic`].
//! - [`gic`]: the GICv3 CPU interface (ICC_* system registers), redistributor and distributor
//!   setup, SGIs, and the IRQ handler hook.
//! - [`timer`]: CNTVCT_EL0 / CNTFRQ_EL0, the EL1 virtual and physical timers.
//! - [`dt`]: what the kernels need from the device tree (the `fdt` crate).
//! - [`shm`]: a data exchange between two guests through a static shared memory region.
//! - [`bootargs`], [`ranges`]: pure helpers, tested on the host (`cargo test -p guest-rt`).
//!
//! With the MMU off every data access is to Device memory: nothing here (nor in the kernels) may
//! make an unaligned access, use `DC ZVA`, or use exclusives/atomics. The build enforces
//! `+strict-align`; the rest is by construction (no atomics anywhere, plain loops for memory).
#![cfg_attr(not(test), no_std)]

pub mod bootargs;
pub mod dt;
pub mod ranges;

#[cfg(target_os = "none")]
pub mod boot;
#[cfg(target_os = "none")]
pub mod console;
#[cfg(target_os = "none")]
pub mod exception;
#[cfg(target_os = "none")]
pub mod gic;
#[cfg(target_os = "none")]
pub mod labyrinth;
#[cfg(target_os = "none")]
pub mod psci;
#[cfg(target_os = "none")]
pub mod shm;
#[cfg(target_os = "none")]
pub mod smp;
#[cfg(target_os = "none")]
pub mod timer;

mod global;
pub use global::{Global, PerCpu};

/// 4 KiB.
pub const PAGE: u64 = 4096;

/// MPIDR_EL1's affinity fields (Aff3, Aff2, Aff1, Aff0) on the target; 0 on the host (tests).
pub fn mpidr_affinity() -> u64 {
    #[cfg(target_os = "none")]
    {
        let m: u64;
        // SAFETY: reads an identification register.
        unsafe {
            core::arch::asm!("mrs {m}, mpidr_el1", m = out(reg) m, options(nomem, nostack, preserves_flags))
        };
        m & dt::MPIDR_AFFINITY_MASK
    }
    #[cfg(not(target_os = "none"))]
    0
}

pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest: panic: {}", info);
    psci::system_off()
}
