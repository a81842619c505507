//! The generic timer as Labyrinth uses it for a guest: the EL1 virtual timer's registers (read
//! to learn its output line), and the EL2 physical timer (`CNTHP_*`), which stands in for the
//! guest's emulated EL1 physical timer: armed at that timer's deadline, its PPI 26 tells
//! Labyrinth when the guest's PPI 30 must rise.
//!
//! It decides nothing: the levels and deadlines come from `vm::vtimer`.

use aarch64_cpu::registers::{Readable, Writeable, CNTHP_CTL_EL2, CNTPCT_EL0, CNTV_CTL_EL0, CNTV_CVAL_EL0};

/// The EL2 physical timer's PPI.
pub const HYP_TIMER_PPI: u32 = 26;

/// The physical count, which the guest reads too (`CNTVOFF_EL2` is 0).
pub fn counter() -> u64 {
    CNTPCT_EL0.get()
}

/// The EL1 virtual timer's control and compare registers (`CNTV_CTL_EL0`, `CNTV_CVAL_EL0`), as
/// the guest left them.
pub fn vtimer_registers() -> (u64, u64) {
    (CNTV_CTL_EL0.get(), CNTV_CVAL_EL0.get())
}

/// Arms the EL2 physical timer to fire at count `deadline`, or turns it off.
pub fn set_hyp_timer(deadline: Option<u64>) {
    match deadline {
        Some(cval) => {
            // SAFETY: CNTHP_CVAL_EL2 is EL2's own timer compare value; no memory is touched.
            unsafe { core::arch::asm!("msr cnthp_cval_el2, {}", in(reg) cval, options(nomem, nostack)) };
            CNTHP_CTL_EL2.write(CNTHP_CTL_EL2::ENABLE::SET);
        }
        None => CNTHP_CTL_EL2.set(0),
    }
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}
