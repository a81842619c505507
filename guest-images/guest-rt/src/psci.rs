//! PSCI over the device tree's conduit (`hvc #0` unless `/psci` says `smc`; SMCCC: function id
//! in w0, arguments in x1-x3, result in x0; x0-x17 treated as clobbered, as SMCCC 1.0 allows).

use core::arch::asm;

use crate::dt::Conduit;
use crate::Global;

pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON_64: u32 = 0xc400_0003;
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000a;

pub const SUCCESS: i64 = 0;
pub const NOT_SUPPORTED: i64 = -1;
pub const INVALID_PARAMETERS: i64 = -2;
pub const ALREADY_ON: i64 = -4;
pub const ON_PENDING: i64 = -5;
pub const INVALID_ADDRESS: i64 = -9;

/// AFFINITY_INFO results.
pub const AFFINITY_ON: i64 = 0;
pub const AFFINITY_OFF: i64 = 1;
pub const AFFINITY_ON_PENDING: i64 = 2;

static CONDUIT: Global<Conduit> = Global::new(Conduit::Hvc);

/// Sets the conduit (from the device tree, before any other CPU starts).
pub fn set_conduit(c: Conduit) {
    CONDUIT.set(c);
}

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

/// The name of an AFFINITY_INFO result.
pub fn affinity_name(r: i64) -> &'static str {
    match r {
        AFFINITY_ON => "ON",
        AFFINITY_OFF => "OFF",
        AFFINITY_ON_PENDING => "ON_PENDING",
        e => error_name(e),
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

/// `smc #0` with SMCCC arguments; returns x0.
pub fn smc(fid: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    let r: u64;
    // SAFETY: a firmware call; registers per SMCCC.
    unsafe {
        asm!("smc #0",
            inlateout("x0") fid as u64 => r,
            inlateout("x1") a1 => _, inlateout("x2") a2 => _, inlateout("x3") a3 => _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack));
    }
    r
}

/// A PSCI call over the conduit.
pub fn call(fid: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    match CONDUIT.get() {
        Conduit::Hvc => hvc(fid, a1, a2, a3),
        Conduit::Smc => smc(fid, a1, a2, a3),
    }
}

pub fn version() -> u64 {
    call(PSCI_VERSION, 0, 0, 0)
}

/// CPU_ON (64-bit): start `target_mpidr` at `entry` with x0 = `context`.
pub fn cpu_on(target_mpidr: u64, entry: u64, context: u64) -> i64 {
    call(CPU_ON_64, target_mpidr, entry, context) as i64
}

/// AFFINITY_INFO (64-bit) of one CPU (lowest affinity level 0).
pub fn affinity_info(target_mpidr: u64) -> i64 {
    call(AFFINITY_INFO_64, target_mpidr, 0, 0) as i64
}

/// PSCI_FEATURES of function `fid`: a negative error if not implemented.
pub fn features(fid: u32) -> i64 {
    call(PSCI_FEATURES, fid as u64, 0, 0) as i64
}

/// CPU_OFF; if that returns (it must not), reports it and waits forever.
pub fn cpu_off() -> ! {
    let r = call(CPU_OFF, 0, 0, 0) as i64;
    crate::println!("guest: PSCI CPU_OFF returned {} {}", r, error_name(r));
    halt()
}

/// PSCI SYSTEM_OFF; if that returns, waits for interrupts forever (they are masked).
pub fn system_off() -> ! {
    call(SYSTEM_OFF, 0, 0, 0);
    halt()
}

/// PSCI SYSTEM_RESET; if that returns, powers off.
pub fn system_reset() -> ! {
    call(SYSTEM_RESET, 0, 0, 0);
    system_off()
}

pub fn halt() -> ! {
    // SAFETY: masks interrupts so that the wait below only sleeps.
    unsafe { asm!("msr daifset, #0xf", options(nomem, nostack)) };
    loop {
        // SAFETY: waits; interrupts are masked, so this only sleeps.
        unsafe { asm!("wfi", options(nomem, nostack)) };
    }
}
