//! PSCI over `hvc #0` (SMCCC: function id in w0, arguments in x1-x3, result in x0; x0-x17
//! treated as clobbered, as SMCCC 1.0 allows).

use core::arch::asm;

pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const CPU_ON_64: u32 = 0xc400_0003;

pub const NOT_SUPPORTED: i64 = -1;
pub const INVALID_PARAMETERS: i64 = -2;

/// The PSCI error name of a (negative) return value.
pub fn error_name(r: i64) -> &'static str {
    match r {
        0 => "SUCCESS",
        -1 => "NOT_SUPPORTED",
        -2 => "INVALID_PARAMETERS",
        -3 => "DENIED",
        -4 => "ALREADY_ON",
        -5 => "ON_PENDING",
        -6 => "INTERNAL_FAILURE",
        -7 => "NOT_PRESENT",
        -8 => "DISABLED",
        -9 => "INVALID_ADDRESS",
        _ => "unknown",
    }
}

/// `hvc #0` with SMCCC arguments; returns x0.
pub fn hvc(fid: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    let r: u64;
    // SAFETY: a hypervisor call; registers per SMCCC.
    unsafe {
        asm!("hvc #0",
            inlateout("x0") fid as u64 => r,
            inlateout("x1") a1 => _, inlateout("x2") a2 => _, inlateout("x3") a3 => _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack));
    }
    r
}

pub fn version() -> u64 {
    hvc(PSCI_VERSION, 0, 0, 0)
}

/// PSCI SYSTEM_OFF; if that returns, waits for interrupts forever (they are masked).
pub fn system_off() -> ! {
    hvc(SYSTEM_OFF, 0, 0, 0);
    halt()
}

/// PSCI SYSTEM_RESET; if that returns, powers off.
pub fn system_reset() -> ! {
    hvc(SYSTEM_RESET, 0, 0, 0);
    system_off()
}

pub fn halt() -> ! {
    loop {
        // SAFETY: waits; interrupts are masked, so this only sleeps.
        unsafe { asm!("wfi", options(nomem, nostack)) };
    }
}
