//! Labyrinth's own hypercalls (SMCCC vendor-specific hypervisor service range, over HVC):
//! the memory figures and giving pages back. Numbers and meanings: the hypervisor's
//! `vm/hypercall.rs`.

use core::arch::asm;

const MEMORY_INFO: u64 = 0xc600_0001;
const GIVE_BACK: u64 = 0xc600_0002;

/// SMCCC's INVALID_PARAMETER.
pub const INVALID_PARAMETER: i64 = -3;

/// `hvc #0` with x0-x2 in, x0-x3 out.
fn call(fid: u64, a1: u64, a2: u64) -> [u64; 4] {
    let (r0, r1, r2, r3): (u64, u64, u64, u64);
    // SAFETY: a hypervisor call; registers per SMCCC (x4-x17 may be clobbered).
    unsafe {
        asm!("hvc #0",
            inlateout("x0") fid => r0, inlateout("x1") a1 => r1, inlateout("x2") a2 => r2,
            inlateout("x3") 0u64 => r3,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack));
    }
    [r0, r1, r2, r3]
}

/// This guest's memory, in 4 KiB pages.
#[derive(Clone, Copy, Debug)]
pub struct MemoryInfo {
    /// Promised at creation: always there for it.
    pub promised: u64,
    /// Held now, within the promise and beyond it.
    pub held: u64,
    /// Free and promised to nobody: what it could draw beyond its promise now.
    pub drawable: u64,
}

impl MemoryInfo {
    /// Pages it could still draw now.
    pub fn available(&self) -> u64 {
        self.promised.saturating_sub(self.held) + self.drawable
    }
}

/// The memory figures, or the error code (not running on Labyrinth).
pub fn memory_info() -> Result<MemoryInfo, i64> {
    match call(MEMORY_INFO, 0, 0) {
        [0, promised, held, drawable] => Ok(MemoryInfo { promised, held, drawable }),
        [e, ..] => Err(e as i64),
    }
}

/// Gives back `[ipa, ipa + len)`: the frames freed, or the error code.
pub fn give_back(ipa: u64, len: u64) -> Result<u64, i64> {
    match call(GIVE_BACK, ipa, len) {
        [0, freed, ..] => Ok(freed),
        [e, ..] => Err(e as i64),
    }
}
