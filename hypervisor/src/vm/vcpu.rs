//! What one physical CPU owns of the vCPU it runs: its index in the guest, the CPU's frame
//! pool handle, its counters, its emulated physical timer and the state of its timer lines
//! at the host GIC. Only that CPU touches it; what the guest's vCPUs share is [`Vm`].
//!
//! It also says what a vCPU needs of the CPU under it ([`VcpuHw`]) and of the registers a trap
//! saved ([`GuestRegs`]): the exit handling in `vm::exit` is written against those two traits,
//! so it runs on the host in tests over fakes, and at EL2 over the arch's implementations.

use super::guest::Vm;
use super::vtimer::PhysTimer;
use crate::frame::CpuFrames;
use crate::stage2::FaultCache;

/// The general-purpose registers and PC of a vCPU stopped by a trap.
pub trait GuestRegs {
    /// Register `r` (0-30); 31 is XZR and reads 0.
    fn x(&self, r: u8) -> u64;
    /// Writes register `r` (0-30); 31 (XZR) ignores it.
    fn set_x(&mut self, r: u8, value: u64);
    /// Where the guest resumes.
    fn pc(&self) -> u64;
    /// Resumes after the trapped instruction (every trapped instruction is 4 bytes).
    fn skip_instruction(&mut self);
}

/// What exit handling needs of the CPU it runs on. Implemented by the arch over system
/// registers and the host GIC; by tests over fakes. It never calls back into `vm`.
pub trait VcpuHw {
    type Regs: GuestRegs;
    /// A synchronous external abort on the access that trapped (syndrome `esr`).
    fn inject_external_abort(&mut self, regs: &mut Self::Regs, instruction: bool, esr: u64);
    fn inject_undefined(&mut self, regs: &mut Self::Regs);
    /// Acknowledges the highest-priority physical interrupt: `None` if none is pending.
    fn ack(&mut self) -> Option<u32>;
    fn eoi(&mut self, intid: u32);
    /// The list registers this CPU offers (at most 16).
    fn lr_count(&self) -> usize;
    fn read_lrs(&mut self, lrs: &mut [u64]);
    fn write_lrs(&mut self, lrs: &[u64]);
    /// Asks for a maintenance interrupt when the list registers (nearly) empty.
    fn set_underflow(&mut self, on: bool);
    /// Enables or disables one of this CPU's PPIs at the host GIC.
    fn set_ppi_enabled(&mut self, intid: u32, on: bool);
    /// The system counter, as the guest reads it.
    fn counter(&self) -> u64;
    /// The guest's EL1 virtual timer: (`CNTV_CTL_EL0`, `CNTV_CVAL_EL0`).
    fn vtimer_registers(&self) -> (u64, u64);
    /// Arms this CPU's EL2 timer (PPI [`host_irq::HYP_TIMER`]) for `deadline`, or turns it off.
    fn set_hyp_timer(&mut self, deadline: Option<u64>);
    /// Sends the kick SGI to physical CPU `cpu`.
    fn kick(&mut self, cpu: usize);
    /// Wakes CPUs waiting for a vCPU to be started.
    fn wake_waiters(&mut self);
    /// One line of guest console output, tagged with the guest's name.
    fn console_line(&mut self, guest: &str, line: &[u8]);
    /// Streamed console output of `guest`: its line so far, or whole when `ended` (see
    /// `VPl011::set_streaming`).
    fn console_part(&mut self, guest: &str, line: &[u8], ended: bool) {
        let _ = (guest, line, ended);
    }
    /// The physical interrupt of the host console's receiver, if this CPU takes it.
    fn console_intid(&self) -> Option<u32> {
        None
    }
}

/// The physical interrupts a CPU running a vCPU takes at EL2.
pub mod host_irq {
    /// Another CPU takes this vCPU out of the guest (a stop, a reset, new virtual interrupts).
    pub const KICK: u32 = 8;
    /// The virtual CPU interface's maintenance interrupt.
    pub const MAINTENANCE: u32 = 25;
    /// The EL2 physical timer: stands for the guest's emulated EL1 physical timer.
    pub const HYP_TIMER: u32 = 26;
    /// The EL1 virtual timer.
    pub const VTIMER: u32 = 27;
    /// INTIDs from here on are special (1023: nothing pending).
    pub const SPURIOUS: u32 = 1020;
}

/// A vCPU's counters, added into its guest's report when it leaves the guest.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// 4 KiB pages mapped by faults. A vCPU does not count them on its own: its credit does
    /// (see [`Vcpu::stats`]), so its `stats` field keeps this 0.
    pub page_faults: u64,
    pub block_faults: u64,
    /// Faults that found another vCPU's mapping already installed (the access just retried).
    pub lost_races: u64,
    /// Frames the guest gave back through the give-back call.
    pub given_back: u64,
    pub aborts_injected: u64,
    pub undefs_injected: u64,
    pub mmio: u64,
    pub hvc: u64,
    pub smc: u64,
    pub sysreg: u64,
    /// Physical interrupts taken while it ran.
    pub irqs: u64,
    /// Virtual timer interrupts taken (each holds the line off until the guest deals with it).
    pub vtimer: u64,
    /// SGIs it sent.
    pub sgis: u64,
    pub vgic_mmio: u64,
    /// Kicks taken: another CPU took this vCPU out of the guest.
    pub kicks: u64,
    /// vGIC maintenance interrupts (a level interrupt completed, list registers emptied).
    pub maintenance: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.page_faults += o.page_faults;
        self.block_faults += o.block_faults;
        self.lost_races += o.lost_races;
        self.given_back += o.given_back;
        self.aborts_injected += o.aborts_injected;
        self.undefs_injected += o.undefs_injected;
        self.mmio += o.mmio;
        self.hvc += o.hvc;
        self.smc += o.smc;
        self.sysreg += o.sysreg;
        self.irqs += o.irqs;
        self.vtimer += o.vtimer;
        self.sgis += o.sgis;
        self.vgic_mmio += o.vgic_mmio;
        self.kicks += o.kicks;
        self.maintenance += o.maintenance;
    }
}

/// One vCPU of `vm`, on the CPU that runs it (`'static` at EL2: guests live for the run).
pub struct Vcpu<'a> {
    pub vm: &'a Vm,
    pub index: usize,
    /// The atomic path of this CPU.
    pub pool: Option<CpuFrames<'static, 'static>>,
    pub stats: Stats,
    /// Aborts and undefined instructions are logged for the first few only.
    pub logged: u32,
    /// Shared memory nodes (bit per node) whose revoked region this vCPU was told about in
    /// the log: one line per node and vCPU, whatever else was logged.
    pub revoked_logged: u8,
    /// Its emulated EL1 physical timer.
    pub ptimer: PhysTimer,
    /// The virtual timer's PPI is disabled at the host GIC until the guest has dealt with its
    /// interrupt (its line is resampled low).
    pub vtimer_held: bool,
    /// The stage-2 tables its last faults went through: the fast paths' shortcut.
    pub cache: FaultCache,
    /// Guest pages counted against the guest's promise and not yet used: drawn from the
    /// shared budget [`PAGE_CREDIT_BATCH`] at a time, so most page faults count theirs with a
    /// plain decrement (see [`Vcpu::take_pages`]).
    credit: usize,
    /// Pages drawn into the credit and not given up since the counters were last taken: less
    /// the credit, the pages this vCPU's faults mapped. So the fast path counts nothing.
    drawn: u64,
}

/// Pages a vCPU draws from its guest's budget at once when its credit runs out. Another
/// vCPU's credit counts as drawn: the promise of a guest with several vCPUs has room for it
/// (`vmm::promise_memory`), so a credit never runs a covered guest out of memory.
pub const PAGE_CREDIT_BATCH: usize = 16;

/// Warnings about one vCPU's refused accesses stop after this many.
pub const LOG_LIMIT: u32 = 8;

impl<'a> Vcpu<'a> {
    pub fn new(vm: &'a Vm, index: usize, pool: Option<CpuFrames<'static, 'static>>) -> Vcpu<'a> {
        Vcpu {
            vm,
            index,
            pool,
            stats: Stats::default(),
            logged: 0,
            revoked_logged: 0,
            ptimer: PhysTimer::new(),
            vtimer_held: false,
            // Only tables wholly in RAM: a cache hit is then a demand fault with no range check.
            cache: FaultCache::serving(vm.layout.ram_base, vm.layout.ram_size),
            credit: 0,
            drawn: 0,
        }
    }

    /// Its counters, with the pages its faults mapped: drawn into the credit, less what the
    /// credit still holds.
    pub fn stats(&self) -> Stats {
        Stats { page_faults: self.drawn - self.credit as u64, ..self.stats }
    }

    /// Its counters ([`Vcpu::stats`]), now reset to zero.
    pub fn take_stats(&mut self) -> Stats {
        let taken = self.stats();
        self.stats = Stats::default();
        self.drawn = self.credit as u64;
        taken
    }

    /// Counts `n` guest pages against the guest's promise: from this vCPU's credit (no shared
    /// write) when it holds them, else from the budget with [`PAGE_CREDIT_BATCH`] more for the
    /// next faults, or just what is missing when the promise has no batch left. `false`
    /// changes nothing: the promise is used up.
    #[inline(always)]
    pub fn take_pages(&mut self, n: usize) -> bool {
        if let Some(left) = self.credit.checked_sub(n) {
            self.credit = left;
            return true;
        }
        let missing = n - self.credit;
        let budget = &self.vm.budget;
        if budget.take(missing + PAGE_CREDIT_BATCH) {
            self.credit = PAGE_CREDIT_BATCH;
            self.drawn += (missing + PAGE_CREDIT_BATCH) as u64;
            true
        } else if budget.take(missing) {
            self.credit = 0;
            self.drawn += missing as u64;
            true
        } else {
            false
        }
    }

    /// One page as [`Vcpu::take_pages`] counts it, for the fast paths, which make no call:
    /// from the credit, or with a batch from the guest's promise. `false` changes nothing and
    /// leaves the fault to the general path: the credit is out and the promise has no batch
    /// left, so the page (and the next batch) come from beyond the promise, or the guest is
    /// out of memory.
    #[inline(always)]
    pub fn take_page_without_call(&mut self) -> bool {
        if self.credit == 0 {
            if !self.vm.budget.take_promised(1 + PAGE_CREDIT_BATCH) {
                return false;
            }
            self.credit = 1 + PAGE_CREDIT_BATCH;
            self.drawn += 1 + PAGE_CREDIT_BATCH as u64;
        }
        self.credit -= 1;
        true
    }

    /// Gives back `n` pages taken with [`Vcpu::take_pages`] and not used (a lost race, no
    /// frame): they stay this vCPU's credit.
    #[inline(always)]
    pub fn untake_pages(&mut self, n: usize) {
        self.credit += n;
    }

    /// Pages counted and not used, now given up (they go back to the budget, or the budget is
    /// reset after a reclaim): the vCPU leaves the guest.
    pub fn drop_credit(&mut self) -> usize {
        let dropped = core::mem::take(&mut self.credit);
        self.drawn -= dropped as u64;
        dropped
    }

    /// Pages this vCPU holds counted and unused.
    pub fn credit(&self) -> usize {
        self.credit
    }

    /// The vCPU as a fresh start finds it (boot, CPU_ON, reset): timers idle, nothing held.
    pub fn restart(&mut self) {
        self.ptimer = PhysTimer::new();
        self.vtimer_held = false;
        self.cache.forget();
        // Whatever it held was given back when it left, or reset with the guest's budget.
        self.drop_credit();
    }
}

#[cfg(test)]
mod tests {
    use std::boxed::Box;

    use super::*;
    use crate::vm::exercise::test_guest;

    fn guest() -> &'static Vm {
        Box::leak(Box::new(test_guest(2, false)))
    }

    #[test]
    fn pages_come_from_the_credit_after_one_batch() {
        let vm = guest();
        let mut v = Vcpu::new(vm, 0, None);
        assert!(v.take_pages(1));
        assert_eq!(vm.budget.used(), 1 + PAGE_CREDIT_BATCH, "one draw: the page and a batch");
        assert_eq!(v.credit(), PAGE_CREDIT_BATCH);
        for _ in 0..PAGE_CREDIT_BATCH {
            assert!(v.take_pages(1));
        }
        assert_eq!(vm.budget.used(), 1 + PAGE_CREDIT_BATCH, "the batch served them: no shared draw");
        assert_eq!(v.credit(), 0);
        v.untake_pages(1);
        assert!(v.take_pages(1));
        assert_eq!(
            vm.budget.used(),
            1 + PAGE_CREDIT_BATCH,
            "a page given back is taken again from the credit"
        );
    }

    #[test]
    fn the_last_pages_of_a_promise_are_drawn_without_a_batch() {
        let vm = guest();
        let pages = vm.budget.pages();
        assert!(vm.budget.take(pages - 3), "all but 3 pages drawn elsewhere");
        let mut v = Vcpu::new(vm, 0, None);
        assert!(v.take_pages(2), "no batch left: exactly what is asked");
        assert_eq!(v.credit(), 0);
        assert!(v.take_pages(1));
        assert!(!v.take_pages(1), "the promise is used up");
        assert_eq!(vm.budget.used(), pages);
        assert_eq!(v.credit(), 0, "a refusal changes nothing");
    }

    #[test]
    fn the_call_free_take_draws_what_take_pages_does_and_stops_at_the_promise() {
        let vm = guest();
        let mut v = Vcpu::new(vm, 0, None);
        assert!(v.take_page_without_call());
        assert_eq!((vm.budget.used(), v.credit()), (1 + PAGE_CREDIT_BATCH, PAGE_CREDIT_BATCH));
        let left = vm.budget.pages() - vm.budget.used();
        assert!(vm.budget.take(left - PAGE_CREDIT_BATCH), "all but a batch drawn elsewhere");
        for _ in 0..PAGE_CREDIT_BATCH {
            assert!(v.take_page_without_call(), "the credit serves its batch");
        }
        assert!(!v.take_page_without_call(), "no batch of 17 left in a promise of 16");
        assert_eq!(
            (v.credit(), vm.budget.beyond()),
            (0, 0),
            "a refusal changes nothing, draws nothing beyond"
        );
        assert!(v.take_pages(1), "the general path takes what is left");
    }

    #[test]
    fn the_credit_counts_the_pages_mapped() {
        let vm = guest();
        let mut v = Vcpu::new(vm, 0, None);
        assert!(v.take_pages(1));
        for _ in 0..20 {
            assert!(v.take_page_without_call());
        }
        assert_eq!(v.stats().page_faults, 21, "across a second batch");
        v.untake_pages(2);
        assert_eq!(v.stats().page_faults, 19, "pages not mapped are not counted");
        v.stats.block_faults = 4;
        let held = v.credit();
        assert_eq!(vm.budget.used(), 19 + held, "every page drawn is mapped or held");
        assert_eq!(v.drop_credit(), held);
        assert_eq!(v.stats().page_faults, 19, "giving the credit up maps nothing");
        let taken = v.take_stats();
        assert_eq!((taken.page_faults, taken.block_faults), (19, 4));
        assert_eq!(v.stats(), Stats::default(), "taken: back to zero");
        assert!(v.take_page_without_call());
        v.restart();
        assert_eq!(v.take_stats().page_faults, 1, "a restart keeps what was mapped");
    }

    #[test]
    fn dropped_credit_is_what_was_held() {
        let vm = guest();
        let mut v = Vcpu::new(vm, 0, None);
        assert!(v.take_pages(3));
        assert_eq!(v.drop_credit(), PAGE_CREDIT_BATCH);
        assert_eq!(v.credit(), 0);
        assert!(v.take_pages(1));
        assert_eq!(vm.budget.used(), 3 + 2 * PAGE_CREDIT_BATCH + 1, "a fresh batch after the drop");
    }
}
