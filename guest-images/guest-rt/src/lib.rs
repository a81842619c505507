//! Runtime of Labyrinth's guest test kernels (EL1, MMU and caches off, one CPU).
//!
//! - [`boot`]: the Linux arm64 Image header and the entry code (vectors, stack, bss), which
//!   reads the device tree and calls the kernel's `main` (see [`entry!`]).
//! - [`console`]: the PL011 at 0x0900_0000, aligned 32-bit accesses only; [`print!`], [`println!`].
//! - [`psci`]: PSCI over `hvc #0` (SMCCC).
//! - [`exception`]: VBAR_EL1 vectors that record ESR/FAR and recover from aborts, and the probes
//!   (read, write, execute, hvc, smc) built on them.
//! - [`timer`]: CNTVCT_EL0 / CNTFRQ_EL0.
//! - [`dt`]: what the kernels need from the device tree (the `fdt` crate).
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
pub mod psci;
#[cfg(target_os = "none")]
pub mod timer;

mod global;
pub use global::Global;

/// 4 KiB.
pub const PAGE: u64 = 4096;

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
