//! aarch64 at EL2 (non-VHE): boot, the EL2 stage-1 map, exception vectors, PSCI, console.
pub mod boot;
pub mod console;
pub mod cpu;
pub mod exception;
pub mod gic;
pub mod memory;
pub mod mmu;
pub mod power;
pub mod stage2_hw;
pub mod timer;
pub mod vcpu;

use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};

pub use boot::{image_range, secondary_entry_address};

/// The generic timer's count, for bounded waits and path-length measurement.
pub fn time_now_ticks() -> u64 {
    // The ISB keeps the read from being taken early, ahead of the code being measured.
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    CNTPCT_EL0.get()
}

pub fn ticks_per_second() -> u64 {
    CNTFRQ_EL0.get().max(1)
}
