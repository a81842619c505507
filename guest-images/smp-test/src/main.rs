//! `smp-test`: the SMP behaviour a hypervisor owes a guest, one case after another
//! (`smptest.case=a,b,...`, default `ptimer,timer,sgi,race,cpu-on`), each ending in one verdict
//! line with `(ok)` or `FAILED`.
//!
//! - `ptimer`: the EL1 physical timer (CNTP_CTL_EL0, CNTP_TVAL_EL0) is readable, writable and
//!   its TVAL counts down.
//! - `timer`: the virtual timer's PPI 27: masked in the redistributor while the timer fires,
//!   then the timer disabled (or re-armed later) and the PPI unmasked: no interrupt may be
//!   taken; enabled and firing: taken once.
//! - `sgi`: a flood of SGIs from CPU 0 to CPU 1 through ICC_SGI1R_EL1, then pings answered one
//!   by one, then one broadcast (IRM) reaching every other running CPU once.
//! - `sgi-rtt` (not in the default list; a benchmark): an SGI to self and its handler, then
//!   SGI round trips cpu 0 -> cpu 1 -> cpu 0 (cpu 1's handler answers), each timed with CNTVCT
//!   against the same loop without the SGI; every wait is a `WFI` (see README.md for why).
//! - `race` (3 CPUs or more): two CPUs call CPU_ON for the same OFF CPU at once, many rounds:
//!   exactly one SUCCESS each round, the other ALREADY_ON or ON_PENDING, the target started once.
//! - `cpu-on`: PSCI_FEATURES, AFFINITY_INFO of each CPU and of an unknown one, CPU_ON of
//!   itself, of an unknown MPIDR, and with entry points outside RAM (the target must stay OFF).
//!   Last, because a hypervisor that accepts a wild entry leaves that CPU running it.
//! - `sysoff-secondary`: CPU 1 calls SYSTEM_OFF while CPU 0 spins: the guest must stop; CPU 0
//!   reports if it is still running after the timeout. Ends the run.
//! - `trap-scaling` (a benchmark, for multi-threaded TCG): loops of HVCs, of emulated MMIO
//!   reads, of first touches of fresh pages (a 4 KiB demand fault each, in a guest without block
//!   mappings) and of no trap, each alone on CPU 0 and then on CPUs 0 and 1 at once.
//!
//! Secondaries wait for commands from CPU 0 in a mailbox (one command word per CPU written by
//! CPU 0, one acknowledgement word written by that CPU). At the end every secondary calls
//! CPU_OFF, CPU 0 waits until AFFINITY_INFO says OFF for each, prints `smp-test: done` and
//! calls SYSTEM_OFF.
#![no_std]
#![no_main]

use guest_rt::bootargs::parse_u64;
use guest_rt::dt::BootInfo;
use guest_rt::smp::{self, dsb, sev, this_cpu, wait_until};
use guest_rt::timer::{self, now, ticks_to_ns_per};
use guest_rt::{exception, gic, println, psci, Global, PerCpu, PAGE};

guest_rt::entry!(main);

/// SGIs: the flood, the pings, the broadcast.
const SGI_FLOOD: u32 = 1;
const SGI_PING: u32 = 2;
const SGI_BROADCAST: u32 = 3;
const DEFAULT_FLOOD: u64 = 20_000;
const PINGS: u64 = 100;
const DEFAULT_ROUNDS: u64 = 20;
/// Timed SGIs of the `sgi-rtt` case (to self, and round trips).
const DEFAULT_RTT_ROUNDS: u64 = 200;
/// Pages each `trap-scaling` fault loop touches (three loops' worth must be free).
const DEFAULT_FAULT_PAGES: u64 = 8192;

// Mailbox commands (low byte of CMD; the sequence number above it).
const OP_RACE: u64 = 1;
const OP_SYSTEM_OFF: u64 = 2;
const OP_CPU_OFF: u64 = 3;
/// Wait in WFI (answering SGI_FLOOD with SGI_PING to CPU 0 while ECHO is set) until this CPU's
/// ECHO_STOP reaches this command.
const OP_ECHO: u64 = 4;
/// Run the `trap-scaling` loop (`STORM_KIND`, `STORM_N` iterations) and record its ticks.
const OP_STORM: u64 = 5;

static CMD: PerCpu<u64> = PerCpu::new(0);
/// `trap-scaling`: what the loop does (0: HVCs, 1: no trap) and how many times (CPU 0 writes).
static STORM_KIND: Global<u64> = Global::new(0);
static STORM_N: Global<u64> = Global::new(0);
/// `trap-scaling`'s fault loop: the first of the fresh pages each CPU touches (CPU 0 writes).
static STORM_PAGES: PerCpu<u64> = PerCpu::new(0);
/// Each CPU's ticks for its last loop.
static STORM_TICKS: PerCpu<u64> = PerCpu::new(0);
/// The last sequence number each CPU finished (written by that CPU).
static ACK: PerCpu<u64> = PerCpu::new(0);
/// Race round a racer is ready for (written by the racer).
static READY: PerCpu<u64> = PerCpu::new(0);
/// A racer's CPU_ON result (written by the racer).
static RESULT: PerCpu<i64> = PerCpu::new(0);
/// The race round that may start (written by CPU 0).
static GO: Global<u64> = Global::new(0);
/// The CPU the racers start: it stays on until CPU 0 releases its round, so that the losing
/// CPU_ON always finds it on (written by CPU 0).
static RACE_TARGET: Global<usize> = Global::new(usize::MAX);
/// The race round whose target may power off (written by CPU 0).
static RELEASE: Global<u64> = Global::new(0);
/// A CPU that accepted a CPU_ON to a wild entry and runs it (written by CPU 0).
static WILD: Global<usize> = Global::new(usize::MAX);
/// Interrupts taken, per CPU (written by that CPU's handler).
static FLOODS: PerCpu<u64> = PerCpu::new(0);
static PINGED: PerCpu<u64> = PerCpu::new(0);
static BROADCASTS: PerCpu<u64> = PerCpu::new(0);
static TIMER_IRQS: PerCpu<u64> = PerCpu::new(0);
static OTHER_IRQS: PerCpu<u64> = PerCpu::new(0);
/// While set, a secondary's handler answers each SGI_FLOOD with an SGI_PING to CPU 0 (written
/// by CPU 0).
static ECHO: Global<bool> = Global::new(false);
/// Per CPU, the OP_ECHO command (sequence number) whose WFI loop may end (written by CPU 0).
static ECHO_STOP: PerCpu<u64> = PerCpu::new(0);
/// The OP_ECHO command a CPU is waiting in (written by that CPU, just before its first WFI).
static ECHO_READY: PerCpu<u64> = PerCpu::new(0);
/// Whether the device tree has a GICv3 (set by CPU 0 before starting others).
static HAVE_GIC: Global<bool> = Global::new(false);
/// Wait bound for everything that waits on another CPU or the hypervisor, in counter ticks.
static TIMEOUT: Global<u64> = Global::new(0);

fn irq(intid: u32) {
    let me = this_cpu();
    let count = |c: &PerCpu<u64>| c.set(me, c.get(me) + 1);
    match intid {
        SGI_FLOOD => {
            count(&FLOODS);
            if me != 0 && ECHO.get() {
                gic::send_sgi(SGI_PING, smp::mpidr(0).unwrap_or(0));
            }
        }
        SGI_PING => count(&PINGED),
        SGI_BROADCAST => count(&BROADCASTS),
        timer::VIRTUAL_TIMER_INTID => {
            // Level-sensitive: turn the timer off so that its line drops before the EOI.
            timer::set_virt_ctl(0);
            count(&TIMER_IRQS)
        }
        _ => count(&OTHER_IRQS),
    }
    dsb();
    sev();
}

/// This CPU's GIC: redistributor, CPU interface, the three SGIs enabled. False without a GIC.
fn gic_this_cpu() -> bool {
    if !HAVE_GIC.get() {
        return false;
    }
    if let Err(e) = gic::init_cpu() {
        println!("smp-test: cpu {}: GIC setup FAILED: {}", this_cpu(), e);
        return false;
    }
    for s in [SGI_FLOOD, SGI_PING, SGI_BROADCAST] {
        gic::enable(s);
    }
    true
}

fn timeout() -> u64 {
    TIMEOUT.get()
}

fn secondary_main(me: usize) -> ! {
    if RACE_TARGET.get() == me {
        // Started by a racer (the start is counted by smp::starts): stay on until both racers
        // have called, then go off for the next round.
        let round = GO.get();
        wait_until(timeout(), || RELEASE.get() >= round);
        psci::cpu_off();
    }
    if gic_this_cpu() {
        gic::irqs_on();
    }
    let mut seen = ACK.get(me);
    loop {
        // A secondary waits for CPU 0 as long as the run may last; then it gives up.
        if !wait_until(timeout().saturating_mul(10), || CMD.get(me) >> 8 != seen) {
            println!("smp-test: cpu {} got no command from cpu 0, powering off", me);
            psci::cpu_off();
        }
        let cmd = CMD.get(me);
        seen = cmd >> 8;
        match cmd & 0xff {
            OP_RACE => race_as_racer(me, GO.get() + 1),
            OP_SYSTEM_OFF => {
                println!("smp-test: cpu {} calling SYSTEM_OFF while cpu 0 spins", me);
                psci::call(psci::SYSTEM_OFF, 0, 0, 0);
                println!("smp-test: sysoff-secondary FAILED: SYSTEM_OFF returned on cpu {}", me);
            }
            OP_ECHO => echo(me, seen),
            OP_STORM => STORM_TICKS.set(me, storm(STORM_KIND.get(), STORM_N.get(), STORM_PAGES.get(me))),
            OP_CPU_OFF => {
                gic::irqs_off();
                ACK.set(me, seen);
                dsb();
                sev();
                psci::cpu_off();
            }
            _ => {}
        }
        ACK.set(me, seen);
        dsb();
        sev();
    }
}

/// CPU 0's side of the mailbox: the sequence number of the last command to each CPU.
static SEQ: PerCpu<u64> = PerCpu::new(0);

fn post(cpu: usize, op: u64) -> u64 {
    let seq = SEQ.get(cpu) + 1;
    SEQ.set(cpu, seq);
    dsb();
    CMD.set(cpu, (seq << 8) | op);
    dsb();
    sev();
    seq
}

fn wait_ack(cpu: usize, seq: u64) -> bool {
    wait_until(timeout(), || ACK.get(cpu) >= seq)
}

fn is_off(cpu: usize) -> bool {
    smp::mpidr(cpu).is_some_and(|m| psci::affinity_info(m) == psci::AFFINITY_OFF)
}

/// Makes CPU `cpu` run the command loop (CPU_ON if it is off).
fn ensure_on(cpu: usize) -> bool {
    if !is_off(cpu) {
        return true;
    }
    let before = smp::starts(cpu);
    let r = smp::cpu_on(cpu);
    if r != psci::SUCCESS {
        println!("smp-test: CPU_ON of cpu {} returned {} {}", cpu, r, psci::error_name(r));
        return false;
    }
    if !wait_until(timeout(), || smp::starts(cpu) != before) {
        println!("smp-test: cpu {} did not start after CPU_ON", cpu);
        return false;
    }
    true
}

/// Makes CPU `cpu` power itself off and waits until AFFINITY_INFO says OFF.
fn ensure_off(cpu: usize) -> bool {
    if is_off(cpu) {
        return true;
    }
    let seq = post(cpu, OP_CPU_OFF);
    if !wait_ack(cpu, seq) || !wait_until(timeout(), || is_off(cpu)) {
        println!("smp-test: cpu {} did not power off after CPU_OFF", cpu);
        return false;
    }
    true
}

// ------------------------------------------------------------------ ptimer

fn case_ptimer() {
    const TVAL: u32 = 1 << 30;
    let step = |what: &str, r: Result<(), exception::Fault>| {
        if let Err(f) = r {
            println!("smp-test: physical timer FAILED: {} raised {}", what, f);
            false
        } else {
            true
        }
    };
    let ctl = exception::probe_insn(timer::phys_ctl);
    if !step("cntp_ctl_el0 read", ctl.map(|_| ())) {
        return;
    }
    if !step(
        "cntp_ctl_el0 write",
        exception::probe_insn(|| timer::set_phys_ctl(timer::CTL_ENABLE | timer::CTL_IMASK)),
    ) {
        return;
    }
    if !step("cntp_tval_el0 write", exception::probe_insn(|| timer::set_phys_tval(TVAL))) {
        return;
    }
    let t1 = exception::probe_insn(timer::phys_tval);
    let ctl_on = exception::probe_insn(timer::phys_ctl);
    timer::delay_us(1000);
    let t2 = exception::probe_insn(timer::phys_tval);
    let off = exception::probe_insn(|| timer::set_phys_ctl(0));
    match (t1, t2, ctl_on, off) {
        (Ok(t1), Ok(t2), Ok(c), Ok(())) => {
            let on = c & (timer::CTL_ENABLE | timer::CTL_IMASK) == timer::CTL_ENABLE | timer::CTL_IMASK;
            let down = t1 <= TVAL as i64 && t2 < t1;
            let verdict = if on && down { "(ok)" } else { "FAILED" };
            println!(
                "smp-test: physical timer: cntp_ctl_el0 read 0x{:x}, wrote 0x3 read 0x{:x}; cntp_tval_el0 set {} read {} then {}: {} {}",
                ctl.unwrap_or(0),
                c,
                TVAL,
                t1,
                t2,
                if down { "counts down" } else { "does NOT count down" },
                verdict
            );
        }
        (t1, t2, c, off) => {
            let f = [t1.err(), t2.err(), c.err(), off.err()].into_iter().flatten().next();
            println!("smp-test: physical timer FAILED: {:?}", f.map(|f| f.esr));
        }
    }
}

// ------------------------------------------------------------------ timer

/// Spins `ms` milliseconds of counter time with IRQs unmasked (an interrupt pending for this
/// CPU is taken at once).
fn irq_window(ms: u64) {
    gic::irqs_on();
    timer::delay_us(ms * 1000);
    gic::irqs_off();
}

fn case_timer() {
    const PPI: u32 = timer::VIRTUAL_TIMER_INTID;
    let ticks_ms = timer::frequency() / 1000;
    let fire_while_masked = |what: &str| -> bool {
        gic::disable(PPI);
        timer::set_virt_cval(now());
        timer::set_virt_ctl(timer::CTL_ENABLE);
        if !wait_until(timeout(), || timer::virt_ctl() & timer::CTL_ISTATUS != 0) {
            println!("smp-test: timer {} FAILED: CNTV_CTL_EL0.ISTATUS never set", what);
            timer::set_virt_ctl(0);
            return false;
        }
        true
    };

    let before = TIMER_IRQS.get(0);
    let what = "masked, fired, disabled, unmasked";
    if fire_while_masked(what) {
        timer::set_virt_ctl(0);
        gic::enable(PPI);
        irq_window(100);
        let n = TIMER_IRQS.get(0) - before;
        if n == 0 {
            println!("smp-test: timer {}: no interrupt (ok)", what);
        } else {
            println!(
                "smp-test: timer {}: interrupt {} taken {} times FAILED (the timer was off)",
                what, PPI, n
            );
        }
    }

    let before = TIMER_IRQS.get(0);
    let what = "masked, fired, re-armed later, unmasked";
    if fire_while_masked(what) {
        timer::set_virt_cval(now() + 1000 * 1000 * ticks_ms);
        gic::enable(PPI);
        irq_window(100);
        timer::set_virt_ctl(0);
        let n = TIMER_IRQS.get(0) - before;
        if n == 0 {
            println!("smp-test: timer {}: no interrupt (ok)", what);
        } else {
            println!(
                "smp-test: timer {}: interrupt {} taken {} times FAILED (the timer no longer fired)",
                what, PPI, n
            );
        }
    }

    let before = TIMER_IRQS.get(0);
    gic::enable(PPI);
    timer::set_virt_cval(now() + ticks_ms);
    timer::set_virt_ctl(timer::CTL_ENABLE);
    gic::irqs_on();
    let taken = wait_until(timeout(), || TIMER_IRQS.get(0) != before);
    // Anything more would be pending now: the handler turned the timer off.
    timer::delay_us(10_000);
    gic::irqs_off();
    timer::set_virt_ctl(0);
    let n = TIMER_IRQS.get(0) - before;
    if taken && n == 1 {
        println!("smp-test: timer enabled and firing: interrupt {} taken once (ok)", PPI);
    } else {
        println!(
            "smp-test: timer enabled and firing: interrupt {} taken {} times FAILED (want once)",
            PPI, n
        );
    }
}

// ------------------------------------------------------------------ sgi

fn case_sgi(flood: u64) {
    if smp::cpu_count() < 2 || !ensure_on(1) {
        println!("smp-test: sgi skipped: needs cpu 1 running");
        return;
    }
    let target = smp::mpidr(1).unwrap_or(0);
    let (floods0, pings0) = (FLOODS.get(1), PINGED.get(1));
    for _ in 0..flood {
        gic::send_sgi(SGI_FLOOD, target);
    }
    // The flood is over when a ping gets through: SGIs of one source are not reordered past
    // each other's delivery here, but pending floods may coalesce (edge-triggered, one pending
    // bit): the count is between 1 and the number sent.
    let mut answered = 0;
    for k in 1..=PINGS {
        gic::send_sgi(SGI_PING, target);
        if !wait_until(timeout(), || PINGED.get(1) - pings0 >= k) {
            break;
        }
        answered = k;
    }
    let floods = FLOODS.get(1) - floods0;
    let ok = answered == PINGS && (1..=flood).contains(&floods) && PINGED.get(1) - pings0 == PINGS;
    println!(
        "smp-test: sgi flood: {} sent cpu 0 -> cpu 1, {} taken (pending SGIs coalesce), then {} of {} pings answered one by one {}",
        flood,
        floods,
        answered,
        PINGS,
        if ok { "(ok)" } else { "FAILED" }
    );

    // Broadcast: every other CPU running the command loop.
    let running: [bool; 8] = core::array::from_fn(|i| i > 0 && i < smp::cpu_count() && !is_off(i));
    let before: [u64; 8] = core::array::from_fn(|i| BROADCASTS.get(i));
    gic::write_sgi1r(((SGI_BROADCAST as u64) << 24) | gic::SGI1R_IRM_ALL_BUT_SELF);
    let all = wait_until(timeout(), || (1..8).all(|i| !running[i] || BROADCASTS.get(i) > before[i]));
    // Give a wrongly doubled delivery time to show.
    timer::delay_us(10_000);
    let once = (1..8).all(|i| !running[i] || BROADCASTS.get(i) == before[i] + 1);
    let self_hit = BROADCASTS.get(0) != before[0];
    let reached = (1..8).filter(|&i| running[i]).count();
    println!(
        "smp-test: sgi broadcast (IRM, all but self) from cpu 0: {} of {} other running cpus took it once{} {}",
        if all && once { reached } else { (1..8).filter(|&i| running[i] && BROADCASTS.get(i) == before[i] + 1).count() },
        reached,
        if self_hit { ", and cpu 0 took it too" } else { "" },
        if all && once && !self_hit { "(ok)" } else { "FAILED" }
    );
}

// ------------------------------------------------------------------ sgi-rtt

/// Arms this CPU's virtual timer `ticks` from now, its PPI enabled: the interrupt that ends a
/// `WFI` nothing else ends, so that every wait has a deadline.
fn arm_wake(ticks: u64) {
    gic::enable(timer::VIRTUAL_TIMER_INTID);
    timer::set_virt_cval(now().saturating_add(ticks));
    timer::set_virt_ctl(timer::CTL_ENABLE);
}

fn disarm_wake() {
    timer::set_virt_ctl(0);
    gic::disable(timer::VIRTUAL_TIMER_INTID);
}

/// With IRQs masked: waits (`WFI`, which a pending interrupt ends even while masked) until
/// `done()`, taking each interrupt as it comes; false once the counter passes `deadline` (an
/// armed [`arm_wake`] ends the last `WFI`).
fn wfi_until(deadline: u64, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if now() >= deadline {
            return false;
        }
        smp::wfi();
        gic::take_pending_irqs();
    }
}

/// Ticks for `rounds` SGIs `intid` to `target`, each waited for until CPU 0 has taken one more
/// SGI_PING (CPU 0, IRQs masked: the answer, or the SGI itself when sent to self); with `send`
/// false the same loop, each wait over at once (the loop's own cost). `Err(round)` if a wait
/// passed `deadline`.
#[inline(never)]
fn sgi_loop(intid: u32, target: u64, rounds: u64, send: bool, deadline: u64) -> Result<u64, u64> {
    let base = PINGED.get(0);
    let t0 = now();
    for k in 1..=rounds {
        let want = if send {
            gic::send_sgi(intid, target);
            base + k
        } else {
            base
        };
        if !wfi_until(deadline, || PINGED.get(0) >= want) {
            return Err(k);
        }
    }
    Ok(now() - t0)
}

/// Instructions per SGI: the timed loop minus the loop without SGIs.
fn per_sgi(with: u64, without: u64, rounds: u64) -> i64 {
    ticks_to_ns_per(with as i64 - without as i64, rounds)
}

/// A secondary's OP_ECHO: IRQs masked, waits in `WFI` (its handler answers the SGIs while
/// ECHO is set) until CPU 0 ends the command.
fn echo(me: usize, seq: u64) {
    gic::irqs_off();
    let wait = timeout().saturating_mul(2);
    let deadline = now().saturating_add(wait);
    arm_wake(wait);
    ECHO_READY.set(me, seq);
    dsb();
    sev();
    let stopped = wfi_until(deadline, || ECHO_STOP.get(me) >= seq);
    disarm_wake();
    if !stopped {
        println!("smp-test: sgi round trip FAILED: cpu {} waited past the timeout for the end", me);
    }
    gic::irqs_on();
}

fn case_sgi_rtt(rounds: u64) {
    let rounds = rounds.max(1);
    gic::irqs_off();
    // Every other running CPU goes to the WFI loop first (CPU 1 started if need be), for both
    // figures: in its command loop a CPU waits with WFE, which under -icount keeps it runnable,
    // and its loop would count in CPU 0's time.
    let n = smp::cpu_count().min(8);
    let have_1 = n >= 2 && ensure_on(1);
    let parked: [Option<u64>; 8] = core::array::from_fn(|c| {
        (c > 0 && c < n && (c == 1 && have_1 || c > 1 && !is_off(c))).then(|| post(c, OP_ECHO))
    });
    ECHO.set(true);
    dsb();
    let ready =
        (1..n).all(|c| parked[c].is_none_or(|seq| wait_until(timeout(), || ECHO_READY.get(c) >= seq)));
    let echo = have_1.then_some(ready);
    let deadline = now().saturating_add(timeout());
    arm_wake(timeout());

    let me = smp::mpidr(0).unwrap_or(0);
    let to_self = sgi_loop(SGI_PING, me, rounds, true, deadline)
        .and_then(|with| Ok(per_sgi(with, sgi_loop(SGI_PING, me, rounds, false, deadline)?, rounds)));
    // Err(None): a CPU never got to its WFI loop; Err(Some(k)): round trip k went unanswered.
    let target = smp::mpidr(1).unwrap_or(0);
    let round_trip = echo.map(|ready| {
        if !ready {
            return Err(None);
        }
        // One untimed round trip first: both CPUs are in their WFI loops when the timing starts.
        sgi_loop(SGI_FLOOD, target, 1, true, deadline)
            .and_then(|_| {
                let with = sgi_loop(SGI_FLOOD, target, rounds, true, deadline)?;
                Ok(per_sgi(with, sgi_loop(SGI_FLOOD, target, rounds, false, deadline)?, rounds))
            })
            .map_err(Some)
    });
    disarm_wake();
    ECHO.set(false);
    dsb();
    // Ends the parked CPUs' WFIs (not answered: ECHO is off).
    for (c, seq) in (1..n).filter_map(|c| parked[c].map(|seq| (c, seq))) {
        ECHO_STOP.set(c, seq);
        gic::send_sgi(SGI_FLOOD, smp::mpidr(c).unwrap_or(0));
    }
    let ended = (1..n).all(|c| parked[c].is_none_or(|seq| wait_ack(c, seq)));

    match to_self {
        Ok(f) => println!("smp-test: sgi to self={} instructions, cpu 0, {} rounds (ok)", f, rounds),
        Err(k) => {
            println!("smp-test: sgi to self FAILED: round {} of {} not taken within the timeout", k, rounds)
        }
    }
    match round_trip {
        None => println!("smp-test: sgi round trip skipped: needs cpu 1 running"),
        Some(Ok(f)) if ended => println!(
            "smp-test: sgi round trip={} instructions, cpu 0 -> cpu 1 -> cpu 0, {} rounds (ok)",
            f, rounds
        ),
        Some(Ok(_)) => println!("smp-test: sgi round trip FAILED: a cpu did not leave its WFI loop"),
        Some(Err(Some(k))) => println!(
            "smp-test: sgi round trip FAILED: round trip {} of {} not answered within the timeout",
            k, rounds
        ),
        Some(Err(None)) => println!("smp-test: sgi round trip FAILED: a cpu did not reach its WFI loop"),
    }
}

// ------------------------------------------------------------------ race

fn race_as_racer(me: usize, round: u64) {
    READY.set(me, round);
    dsb();
    sev();
    // A tight spin (no WFE): both racers leave it as close together as they can.
    let deadline = now() + timeout();
    while GO.get() < round {
        if now() > deadline {
            RESULT.set(me, i64::MIN);
            return;
        }
    }
    let target = RACE_TARGET.get();
    let r = smp::mpidr(target)
        .map_or(psci::INVALID_PARAMETERS, |m| psci::cpu_on(m, smp::secondary_entry_address(), target as u64));
    RESULT.set(me, r);
}

fn case_race(rounds: u64) {
    let n = smp::cpu_count();
    if n < 3 {
        println!("smp-test: cpu_on race skipped: needs 3 cpus, have {}", n);
        return;
    }
    let target = n - 1;
    let (a, b) = (n - 3, n - 2);
    if !(ensure_on(a) && ensure_on(b) && ensure_off(target)) {
        println!("smp-test: cpu_on race FAILED: could not set up cpus {} and {} on, {} off", a, b, target);
        return;
    }
    RACE_TARGET.set(target);
    dsb();
    let (mut wins, mut already, mut pending) = ([0u64; 2], 0, 0);
    let starts0 = smp::starts(target);
    let mut failure = None;
    for round in 1..=rounds {
        if !wait_until(timeout(), || is_off(target)) {
            failure = Some("the target did not go OFF after its CPU_OFF");
            break;
        }
        let expect = GO.get() + 1;
        let seqs = [a, b].map(|c| if c != 0 { post(c, OP_RACE) } else { 0 });
        if !wait_until(timeout(), || [a, b].iter().all(|&c| c == 0 || READY.get(c) == expect)) {
            failure = Some("a racer never got ready");
            break;
        }
        let before = smp::starts(target);
        GO.set(expect);
        dsb();
        sev();
        if a == 0 {
            race_as_racer(0, expect);
        }
        if ![a, b].iter().zip(seqs).all(|(&c, s)| c == 0 || wait_ack(c, s)) {
            failure = Some("a racer did not finish");
            break;
        }
        let r = [RESULT.get(a), RESULT.get(b)];
        let winners = r.iter().filter(|&&x| x == psci::SUCCESS).count();
        let loser_ok = r.iter().all(|&x| matches!(x, psci::SUCCESS | psci::ALREADY_ON | psci::ON_PENDING));
        if winners != 1 || !loser_ok {
            println!(
                "smp-test: cpu_on race round {} FAILED: cpu {} got {} {}, cpu {} got {} {}",
                round,
                a,
                r[0],
                psci::error_name(r[0]),
                b,
                r[1],
                psci::error_name(r[1])
            );
            failure = Some("not exactly one SUCCESS");
            break;
        }
        for (k, &x) in r.iter().enumerate() {
            match x {
                psci::SUCCESS => wins[k] += 1,
                psci::ALREADY_ON => already += 1,
                _ => pending += 1,
            }
        }
        let started = wait_until(timeout(), || smp::starts(target) != before);
        RELEASE.set(expect);
        dsb();
        sev();
        if !started {
            failure = Some("the target did not start after the winning CPU_ON");
            break;
        }
    }
    let _ = wait_until(timeout(), || is_off(target));
    RACE_TARGET.set(usize::MAX);
    dsb();
    let started = smp::starts(target) - starts0;
    match failure {
        None if started == rounds => println!(
            "smp-test: cpu_on race: {} rounds, cpus {} and {} racing for cpu {}: one SUCCESS each round (cpu {} won {}, cpu {} won {}), losers ALREADY_ON {}, ON_PENDING {}; target started {} times (ok)",
            rounds, a, b, target, a, wins[0], b, wins[1], already, pending, started
        ),
        None => println!(
            "smp-test: cpu_on race FAILED: {} rounds won but the target started {} times",
            rounds, started
        ),
        Some(why) => println!("smp-test: cpu_on race FAILED: {}", why),
    }
}

// ------------------------------------------------------------------ cpu-on

fn expect(what: &str, got: i64, ok: &[i64], name: fn(i64) -> &'static str) -> bool {
    let good = ok.contains(&got);
    println!("smp-test: {}: {} {} {}", what, got, name(got), if good { "(ok)" } else { "FAILED" });
    good
}

fn case_cpu_on(boot: &BootInfo) {
    let n = smp::cpu_count();
    let me = smp::mpidr(0).unwrap_or(0);
    for (name, fid) in [
        ("cpu_on", psci::CPU_ON_64),
        ("cpu_off", psci::CPU_OFF),
        ("affinity_info", psci::AFFINITY_INFO_64),
        ("system_off", psci::SYSTEM_OFF),
    ] {
        let r = psci::features(fid);
        println!("smp-test: psci_features {}: {} {}", name, r, if r >= 0 { "(ok)" } else { "FAILED" });
    }
    expect("affinity_info cpu 0 (self)", psci::affinity_info(me), &[psci::AFFINITY_ON], psci::affinity_name);
    // An MPIDR no cpu node has: Aff0 = the number of CPUs.
    let unknown = n as u64;
    expect(
        "affinity_info unknown mpidr",
        psci::affinity_info(unknown),
        &[psci::INVALID_PARAMETERS],
        psci::affinity_name,
    );
    let entry = smp::secondary_entry_address();
    expect("cpu_on self", psci::cpu_on(me, entry, 0), &[psci::ALREADY_ON], psci::error_name);
    expect(
        "cpu_on unknown mpidr",
        psci::cpu_on(unknown, entry, unknown),
        &[psci::INVALID_PARAMETERS],
        psci::error_name,
    );
    if n < 2 {
        println!("smp-test: cpu_on with a bad entry skipped: needs 2 cpus");
        return;
    }
    let target = n - 1;
    if !ensure_on(target) {
        return;
    }
    let tm = smp::mpidr(target).unwrap_or(0);
    expect("affinity_info running cpu", psci::affinity_info(tm), &[psci::AFFINITY_ON], psci::affinity_name);
    expect(
        "cpu_on running cpu",
        psci::cpu_on(tm, entry, target as u64),
        &[psci::ALREADY_ON],
        psci::error_name,
    );
    if !ensure_off(target) {
        return;
    }
    expect(
        "affinity_info cpu after CPU_OFF",
        psci::affinity_info(tm),
        &[psci::AFFINITY_OFF],
        psci::affinity_name,
    );
    let bad = [psci::INVALID_PARAMETERS, psci::INVALID_ADDRESS];
    for (what, addr) in [("cpu_on entry past the end of RAM", boot.ram_span().end), ("cpu_on entry 0x0", 0)] {
        let r = psci::cpu_on(tm, addr, target as u64);
        let ok = expect(what, r, &bad, psci::error_name);
        let state = psci::affinity_info(tm);
        let off = state == psci::AFFINITY_OFF;
        println!(
            "smp-test: affinity_info after {}: {} {}",
            what,
            psci::affinity_name(state),
            if off { "(ok)" } else { "FAILED" }
        );
        if !ok && !off {
            // The target now runs whatever is at that address: nothing more to learn from it.
            println!("smp-test: cpu {} left running the bad entry", target);
            WILD.set(target);
            break;
        }
    }
}

// ------------------------------------------------------------------ sysoff-secondary

/// `n` PSCI_VERSION calls through HVC (`kind` 0: a trap each), `n` loads of the UART's flag
/// register (`kind` 2: a stage-2 data abort each, emulated on the fast path), or `n` rounds
/// of a loop that traps never (`kind` 1), or first touches of `n` fresh pages from `pages` on
/// (`kind` 3: a demand fault each); its ticks.
#[inline(never)]
fn storm(kind: u64, n: u64, pages: u64) -> u64 {
    let t0 = now();
    for i in 0..n {
        if kind == 0 {
            psci::version();
        } else if kind == 3 {
            // SAFETY: a page of free guest RAM set aside for this CPU's loop (`case_trap_scaling`).
            unsafe { core::ptr::write_volatile((pages + i * PAGE) as *mut u64, i) };
        } else if kind == 2 {
            // SAFETY: the emulated PL011's flag register, a read without side effects.
            core::hint::black_box(unsafe {
                core::ptr::read_volatile((guest_rt::console::UART_BASE + 0x18) as *const u32)
            });
        } else {
            let mut x = i;
            for _ in 0..40 {
                x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            core::hint::black_box(x);
        }
    }
    now() - t0
}

/// Wall-clock scaling of traps (multi-threaded TCG, no -icount): each loop alone on CPU 0, then
/// on CPUs 0 and 1 at once. A loop that traps and scales worse than one that does not points at
/// what a trap costs the host (QEMU), not at the guest's work.
fn case_trap_scaling(boot: &BootInfo, n: u64, fault_pages: u64) {
    if smp::cpu_count() < 2 || !ensure_on(1) {
        println!("smp-test: trap-scaling FAILED: needs cpu 1 running");
        return;
    }
    // Three slices of fresh pages: CPU 0's alone, then CPU 0's and CPU 1's together.
    let free = boot.free_ram(guest_rt::boot::image());
    let Some(room) = free.as_slice().iter().max_by_key(|r| r.len()).copied() else {
        println!("smp-test: trap-scaling FAILED: no free RAM");
        return;
    };
    let fault_pages = fault_pages.min(room.len() / PAGE / 3);
    let slice = |k: u64| room.start + k * fault_pages * PAGE;
    for (kind, name) in [(0, "hvc"), (2, "mmio-abort"), (3, "fault-4k"), (1, "no-trap")] {
        let n = if kind == 3 { fault_pages } else { n };
        STORM_KIND.set(kind);
        STORM_N.set(n);
        STORM_PAGES.set(1, slice(2));
        let solo = storm(kind, n, slice(0));
        let seq = post(1, OP_STORM);
        let together = storm(kind, n, slice(1));
        if !wait_ack(1, seq) {
            println!("smp-test: trap-scaling FAILED: cpu 1 did not finish its loop");
            return;
        }
        let other = STORM_TICKS.get(1);
        // Aggregate throughput of two CPUs against one: 2 * solo / the longer of the two.
        let scaling = 200 * solo / together.max(other).max(1);
        println!(
            "smp-test: trap-scaling {} n={} solo={} together={} and {} ticks, two cpus do {}.{:02}x the work of one",
            name,
            n,
            solo,
            together,
            other,
            scaling / 100,
            scaling % 100
        );
    }
}

fn case_sysoff_secondary() -> ! {
    if smp::cpu_count() < 2 || !ensure_on(1) {
        println!("smp-test: sysoff-secondary FAILED: needs cpu 1 running");
        psci::system_off();
    }
    post(1, OP_SYSTEM_OFF);
    let deadline = now() + timeout();
    // Spin (no WFE, no WFI): the hypervisor must take this CPU out of the guest.
    while now() < deadline {}
    println!("smp-test: sysoff-secondary FAILED: cpu 0 still running after cpu 1's SYSTEM_OFF");
    psci::system_off()
}

fn main(boot: &BootInfo) -> ! {
    let args = boot.bootargs();
    let secs = args.value("smptest.timeout").and_then(parse_u64).filter(|&s| s > 0).unwrap_or(30);
    TIMEOUT.set(smp::seconds(secs));
    let cases = args.value("smptest.case").unwrap_or("ptimer,timer,sgi,race,cpu-on");
    let v = psci::version();
    println!(
        "smp-test: cpus={} gic={} psci {}.{} cntfrq={} Hz cases={}",
        boot.cpu_count,
        if boot.gic.is_some() { "v3" } else { "none" },
        v >> 16,
        v & 0xffff,
        timer::frequency(),
        cases
    );
    HAVE_GIC.set(boot.gic.is_some());
    gic::set_handler(irq);
    if boot.gic.is_some() {
        if let Err(e) = gic::init_distributor() {
            println!("smp-test: GIC distributor setup FAILED: {}", e);
        }
    }
    let gic0 = gic_this_cpu();
    dsb();
    if let Err((cpu, r)) = smp::start_secondaries(secondary_main, timeout()) {
        println!("smp-test: starting cpu {} FAILED: {} {}", cpu, r, psci::error_name(r));
        psci::system_off();
    }
    println!("smp-test: {} cpus running", boot.cpu_count);
    let needs_gic = |case: &str| {
        if !gic0 {
            println!("smp-test: {} skipped: no GICv3", case);
        }
        gic0
    };
    for case in cases.split(',') {
        match case {
            "ptimer" => case_ptimer(),
            "timer" if needs_gic(case) => case_timer(),
            "sgi" if needs_gic(case) => {
                let flood = args.value("smptest.flood").and_then(parse_u64).unwrap_or(DEFAULT_FLOOD);
                case_sgi(flood)
            }
            "sgi-rtt" if needs_gic(case) => {
                case_sgi_rtt(args.value("smptest.rtt").and_then(parse_u64).unwrap_or(DEFAULT_RTT_ROUNDS))
            }
            "race" => case_race(args.value("smptest.rounds").and_then(parse_u64).unwrap_or(DEFAULT_ROUNDS)),
            "cpu-on" => case_cpu_on(boot),
            "sysoff-secondary" => case_sysoff_secondary(),
            "trap-scaling" => case_trap_scaling(
                boot,
                args.value("smptest.storm").and_then(parse_u64).unwrap_or(20_000),
                args.value("smptest.fault-pages").and_then(parse_u64).unwrap_or(DEFAULT_FAULT_PAGES),
            ),
            "timer" | "sgi" | "sgi-rtt" => {}
            other => println!("smp-test: unknown case \"{}\" ignored", other),
        }
    }
    let others = OTHER_IRQS.get(0);
    if others > 0 {
        println!("smp-test: cpu 0 took {} unexpected interrupts", others);
    }
    for cpu in (1..smp::cpu_count()).filter(|&c| c != WILD.get()) {
        if !is_off(cpu) && !ensure_off(cpu) {
            println!("smp-test: cpu {} still on at the end FAILED", cpu);
        }
    }
    let stray: u64 = (0..smp::cpu_count()).map(exception::stray_faults_of).sum();
    if stray > 0 {
        println!("smp-test: unexpected aborts: {}", stray);
    }
    println!("smp-test: done");
    psci::system_off()
}
