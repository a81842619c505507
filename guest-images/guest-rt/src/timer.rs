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
