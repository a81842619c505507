//! The virtual counter: CNTVCT_EL0, at CNTFRQ_EL0 Hz (never assumed: 62.5 MHz on QEMU 7.2's
//! virt, 1 GHz on QEMU 10's `-cpu max`). Under QEMU `-icount shift=0` one instruction is 1 ns,
//! so [`ticks_to_ns`] of an interval is the number of instructions executed in it, at every EL.

use core::arch::asm;

/// CNTVCT_EL0, after an `isb` (not read early).
#[inline(always)]
pub fn now() -> u64 {
    let t: u64;
    // SAFETY: reads a counter register.
    unsafe { asm!("isb", "mrs {t}, cntvct_el0", t = out(reg) t, options(nomem, nostack, preserves_flags)) };
    t
}

/// CNTFRQ_EL0 in Hz.
pub fn frequency() -> u64 {
    let f: u64;
    // SAFETY: reads a counter register.
    unsafe { asm!("mrs {f}, cntfrq_el0", f = out(reg) f, options(nomem, nostack, preserves_flags)) };
    f
}

/// `ticks` in nanoseconds (= instructions under `-icount shift=0`); signed for differences.
pub fn ticks_to_ns(ticks: i64) -> i64 {
    let f = frequency().max(1) as i128;
    (ticks as i128 * 1_000_000_000 / f) as i64
}

/// `ticks` in nanoseconds divided by `n`, rounded to nearest (0 when `n` is 0).
pub fn ticks_to_ns_per(ticks: i64, n: u64) -> i64 {
    if n == 0 {
        return 0;
    }
    let f = frequency().max(1) as i128;
    let num = ticks as i128 * 1_000_000_000;
    let den = f * n as i128;
    let q = (num.abs() + den / 2) / den;
    (if num < 0 { -q } else { q }) as i64
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = now() + frequency() * us / 1_000_000;
    while now() < end {}
}

/// CNTV_CTL_EL0 / CNTP_CTL_EL0 bits.
pub const CTL_ENABLE: u64 = 1 << 0;
pub const CTL_IMASK: u64 = 1 << 1;
pub const CTL_ISTATUS: u64 = 1 << 2;
/// The EL1 virtual timer's PPI (INTID 27) and the EL1 physical timer's (non-secure, 30).
pub const VIRTUAL_TIMER_INTID: u32 = 27;
pub const PHYSICAL_TIMER_INTID: u32 = 30;

/// CNTV_CTL_EL0.
pub fn virt_ctl() -> u64 {
    let v: u64;
    // SAFETY: reads the virtual timer's control.
    unsafe { asm!("isb", "mrs {v}, cntv_ctl_el0", v = out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CNTV_CTL_EL0.
pub fn set_virt_ctl(v: u64) {
    // SAFETY: the virtual timer's control; its interrupt is the kernel's to handle.
    unsafe { asm!("msr cntv_ctl_el0, {v}", "isb", v = in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes CNTV_CVAL_EL0 (the virtual timer fires when CNTVCT >= it).
pub fn set_virt_cval(v: u64) {
    // SAFETY: the virtual timer's compare value.
    unsafe { asm!("msr cntv_cval_el0, {v}", "isb", v = in(reg) v, options(nostack, preserves_flags)) };
}

/// CNTP_CTL_EL0: one `mrs`, so that [`crate::exception::probe_insn`] can skip it if UNDEFINED.
#[inline(always)]
pub fn phys_ctl() -> u64 {
    let v: u64;
    // SAFETY: reads the EL1 physical timer's control.
    unsafe { asm!("mrs {v}, cntp_ctl_el0", v = out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CNTP_CTL_EL0 (one `msr`).
#[inline(always)]
pub fn set_phys_ctl(v: u64) {
    // SAFETY: the EL1 physical timer's control.
    unsafe { asm!("msr cntp_ctl_el0, {v}", v = in(reg) v, options(nostack, preserves_flags)) };
}

/// CNTP_TVAL_EL0, sign-extended (one `mrs`).
#[inline(always)]
pub fn phys_tval() -> i64 {
    let v: u64;
    // SAFETY: reads the EL1 physical timer's down-counter view.
    unsafe { asm!("mrs {v}, cntp_tval_el0", v = out(reg) v, options(nomem, nostack, preserves_flags)) };
    v as u32 as i32 as i64
}

/// Writes CNTP_TVAL_EL0 (one `msr`).
#[inline(always)]
pub fn set_phys_tval(v: u32) {
    // SAFETY: the EL1 physical timer's compare value, relative to now.
    unsafe { asm!("msr cntp_tval_el0, {v}", v = in(reg) v as u64, options(nostack, preserves_flags)) };
}
