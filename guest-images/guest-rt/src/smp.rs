//! Several CPUs in one guest, with plain loads and stores only (the MMU is off: no exclusives,
//! no atomics). Every shared word has one writer; readers order their reads after the writer's
//! `DSB` with a `DMB`.
//!
//! - Secondary CPUs are started with PSCI CPU_ON at [`secondary_entry_address`], context id =
//!   their index (the device tree's cpu nodes, sorted by MPIDR). The entry code gives each its
//!   own 16 KiB stack (`__secondary_stacks` in `guest.ld`) and calls the kernel's secondary main
//!   with the index.
//! - [`Barrier`]: each CPU writes its own arrival generation, `DSB`, `SEV`, then waits (`WFE`,
//!   woken at least every 2^11 counter ticks by the event stream this module enables) until
//!   every other CPU has reached it, or a deadline passes.
//! - [`this_cpu`]: the index of the running CPU, from MPIDR_EL1.

use core::arch::asm;

use crate::dt::{BootInfo, MAX_CPUS};
use crate::global::{Global, PerCpu};
use crate::{psci, timer};

/// Bytes of stack per secondary CPU (`guest.ld` reserves MAX_CPUS - 1 of them).
pub const SECONDARY_STACK: u64 = 0x4000;

/// Every CPU's MPIDR (affinity fields), by index; set by CPU 0 from the device tree before any
/// other CPU starts.
static MPIDRS: PerCpu<u64> = PerCpu::new(u64::MAX);
static CPU_COUNT: Global<usize> = Global::new(1);
/// The kernel's secondary main; set before any CPU_ON.
static SECONDARY_MAIN: Global<Option<fn(usize) -> !>> = Global::new(None);
/// How many times each CPU has entered through the secondary entry (written by that CPU).
static STARTS: PerCpu<u64> = PerCpu::new(0);

/// `DSB SY`: every earlier access has completed (and is visible to every CPU).
#[inline(always)]
pub fn dsb() {
    // SAFETY: a barrier.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// `DMB SY`: earlier accesses are observed before later ones.
#[inline(always)]
pub fn dmb() {
    // SAFETY: a barrier.
    unsafe { asm!("dmb sy", options(nostack, preserves_flags)) };
}

/// `SEV`: wakes every CPU waiting in `WFE`.
#[inline(always)]
pub fn sev() {
    // SAFETY: sends an event.
    unsafe { asm!("sev", options(nomem, nostack, preserves_flags)) };
}

/// `WFE`: waits for an event (a `SEV`, the event stream, an interrupt), or returns at once if
/// one is latched.
#[inline(always)]
pub fn wfe() {
    // SAFETY: waits for an event.
    unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
}

/// Per-CPU setup every CPU does once: the counter's event stream (CNTKCTL_EL1.EVNTEN, an event
/// every 2^11 ticks of CNTVCT: ~33 us at 62.5 MHz), so that no `WFE` waits unboundedly.
pub fn init_this_cpu() {
    const EVNTDIR: u64 = 1 << 3;
    const EVNTEN: u64 = 1 << 2;
    const EVNTI_SHIFT: u64 = 4;
    const EVNTI_MASK: u64 = 0xf << EVNTI_SHIFT;
    const EVNTI: u64 = 10;
    let mut k: u64;
    // SAFETY: reads the EL1 counter control.
    unsafe { asm!("mrs {k}, cntkctl_el1", k = out(reg) k, options(nomem, nostack, preserves_flags)) };
    k = (k & !(EVNTDIR | EVNTEN | EVNTI_MASK)) | EVNTEN | (EVNTI << EVNTI_SHIFT);
    // SAFETY: only the event-stream fields changed.
    unsafe { asm!("msr cntkctl_el1, {k}", "isb", k = in(reg) k, options(nostack, preserves_flags)) };
}

/// Records the CPUs of the device tree (CPU 0 only, before starting any other).
pub fn init(boot: &BootInfo) {
    for (i, &m) in boot.cpu_mpidrs().iter().enumerate() {
        MPIDRS.set(i, m);
    }
    CPU_COUNT.set(boot.cpu_count);
    dsb();
}

/// CPUs in the device tree.
pub fn cpu_count() -> usize {
    CPU_COUNT.get()
}

/// CPU `i`'s MPIDR (affinity fields); `None` past the device tree's CPUs.
pub fn mpidr(i: usize) -> Option<u64> {
    (i < cpu_count()).then(|| MPIDRS.get(i))
}

/// The running CPU's index: its MPIDR's position among the device tree's CPUs (Aff0, if the
/// tree is not read yet or does not list it).
pub fn this_cpu() -> usize {
    let me = crate::mpidr_affinity();
    (0..cpu_count().min(MAX_CPUS)).find(|&i| MPIDRS.get(i) == me).unwrap_or((me & 0xff) as usize % MAX_CPUS)
}

/// How many times CPU `i` has entered the secondary entry since boot.
pub fn starts(i: usize) -> u64 {
    STARTS.get(i)
}

/// The physical (= intermediate physical) address secondaries start at.
pub fn secondary_entry_address() -> u64 {
    extern "C" {
        fn __guest_rt_secondary_entry();
    }
    __guest_rt_secondary_entry as *const () as u64
}

/// Sets the function secondaries run (with their index) once started.
pub fn set_secondary_main(f: fn(usize) -> !) {
    SECONDARY_MAIN.set(Some(f));
    dsb();
}

/// PSCI CPU_ON of CPU `i` at the secondary entry (context id = `i`); the PSCI result.
pub fn cpu_on(i: usize) -> i64 {
    match mpidr(i) {
        Some(m) => {
            dsb();
            psci::cpu_on(m, secondary_entry_address(), i as u64)
        }
        None => psci::INVALID_PARAMETERS,
    }
}

/// Counter ticks in `secs` seconds.
pub fn seconds(secs: u64) -> u64 {
    timer::frequency().saturating_mul(secs)
}

/// Waits (WFE) until `done()` or `timeout` counter ticks have passed; whether it is done.
pub fn wait_until(timeout: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = timer::now().saturating_add(timeout);
    loop {
        if done() {
            dmb();
            return true;
        }
        if timer::now() > deadline {
            return false;
        }
        wfe();
    }
}

/// Starts CPUs 1..cpu_count() with `main` and waits (up to `timeout` ticks each) until each has
/// entered; `Err((cpu, why))` for the first that did not.
pub fn start_secondaries(main: fn(usize) -> !, timeout: u64) -> Result<(), (usize, i64)> {
    set_secondary_main(main);
    for i in 1..cpu_count() {
        let before = starts(i);
        let r = cpu_on(i);
        if r != psci::SUCCESS {
            return Err((i, r));
        }
        if !wait_until(timeout, || starts(i) != before) {
            return Err((i, psci::SUCCESS));
        }
    }
    Ok(())
}

/// Waits until PSCI AFFINITY_INFO says every CPU but this one is OFF; the first still on.
pub fn wait_others_off(timeout: u64) -> Result<(), usize> {
    let me = this_cpu();
    for i in (0..cpu_count()).filter(|&i| i != me) {
        let m = MPIDRS.get(i);
        if !wait_until(timeout, || psci::affinity_info(m) == psci::AFFINITY_OFF) {
            return Err(i);
        }
    }
    Ok(())
}

/// A reusable barrier for the first `n` CPUs: one arrival generation per CPU.
pub struct Barrier {
    arrived: PerCpu<u64>,
}

impl Default for Barrier {
    fn default() -> Self {
        Self::new()
    }
}

impl Barrier {
    pub const fn new() -> Self {
        Barrier { arrived: PerCpu::new(0) }
    }

    /// Arrives and waits until CPUs 0..n have arrived here too, or `timeout` ticks have passed
    /// (`Err(first missing CPU)`). Everything this CPU wrote before is visible to them after.
    pub fn wait(&self, n: usize, timeout: u64) -> Result<(), usize> {
        let me = this_cpu();
        let generation = self.arrived.get(me) + 1;
        dsb();
        self.arrived.set(me, generation);
        dsb();
        sev();
        for j in 0..n.min(MAX_CPUS) {
            if !wait_until(timeout, || self.arrived.get(j) >= generation) {
                return Err(j);
            }
        }
        Ok(())
    }
}

/// Called by the secondary entry code (`boot.rs`) with the CPU's index.
#[no_mangle]
unsafe extern "C" fn __guest_rt_secondary_start(index: usize) -> ! {
    init_this_cpu();
    dmb();
    STARTS.set(index, STARTS.get(index) + 1);
    dsb();
    sev();
    match SECONDARY_MAIN.get() {
        Some(main) => main(index),
        None => {
            crate::println!("guest: cpu {} started with no secondary main", index);
            psci::cpu_off()
        }
    }
}
