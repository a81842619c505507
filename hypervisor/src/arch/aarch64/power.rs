//! Calls into PSCI firmware: power off, start a CPU. The conduit comes from the device tree.
//! At EL2 only SMC reaches firmware (an HVC would trap to Labyrinth itself), so the boot
//! sequence refuses a device tree that names HVC for starting CPUs.

use labyrinth::psci::{self, PsciError};

fn smc(fid: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    let mut x0 = fid as u64;
    // SAFETY: an SMC Calling Convention call: firmware may clobber x0-x17, nothing else.
    unsafe {
        core::arch::asm!(
            "smc #0",
            inout("x0") x0,
            inout("x1") a1 => _, inout("x2") a2 => _, inout("x3") a3 => _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    x0
}

/// Starts CPU `mpidr` at physical address `entry` with x0 = `context`, through firmware's
/// CPU_ON function `fid` (PSCI 0.1 firmware names its own).
pub fn cpu_on(fid: u32, mpidr: u64, entry: u64, context: u64) -> Result<(), PsciError> {
    psci::result(smc(fid, mpidr, entry, context)).map(|_| ())
}

/// Powers this CPU off through PSCI CPU_OFF; a later CPU_ON starts it again at the entry
/// point. Returns only if firmware refuses.
pub fn cpu_off() {
    smc(psci::CPU_OFF, 0, 0, 0);
}

/// Powers the machine off through PSCI SYSTEM_OFF; if firmware returns, parks this CPU.
pub fn power_off() -> ! {
    smc(psci::SYSTEM_OFF, 0, 0, 0);
    super::console::emergency_line(format_args!("PSCI SYSTEM_OFF returned: halting this CPU"));
    park()
}

/// Parks this CPU for good. WFI, not WFE: QEMU treats WFE as a mere yield, so a CPU parked
/// in a WFE loop would spin a host core; WFI halts it until an interrupt, and none is enabled.
/// Waits for an event (a `SEV` from another CPU, or any interrupt becoming pending): the
/// caller re-checks what it waits for, since a wake-up may be spurious.
pub fn wait_for_event() {
    aarch64_cpu::asm::wfe();
}

/// Wakes every CPU waiting in [`wait_for_event`], after the stores before it are visible.
pub fn send_event() {
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::ISH);
    aarch64_cpu::asm::sev();
}

pub fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfi();
    }
}
