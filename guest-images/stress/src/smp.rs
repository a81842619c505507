//! The multi-CPU passes (`stress.mode=`, or more than one CPU in the device tree): every CPU
//! touches pages of one region of free RAM and stamps each page it touches in its own word
//! (word `i` of the page = [`stamp`]`(i, page)`, written only by CPU `i`); after a barrier
//! every CPU checks every CPU's stamp word on every page of the region. A write lost by the
//! hypervisor, or two frames behind one IPA (each CPU then sees only its own stamps), fails.
//!
//! Modes, each on its own region (free RAM split evenly between the modes asked for):
//! - `partitioned`: CPU `i` touches pages `[i*P/N, (i+1)*P/N)` of the region's `P`;
//! - `overlapped`: every CPU touches every page, in the same order;
//! - `staggered`: every CPU touches every page, CPU `i` starting at page `i*P/N` (wrapping).
//!
//! Each CPU's touch pass is timed and run twice (first touch, then the same code over mapped
//! pages) like the 4 KiB pass. CPU 0 prints every result, in CPU order, after the CPUs met.

use core::ptr::{read_volatile, write_volatile};

use guest_rt::smp::{self, Barrier};
use guest_rt::timer::{now, ticks_to_ns_per};
use guest_rt::{exception, println, psci, Global, PerCpu, PAGE};

use crate::{Touched, WORDS};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Partitioned,
    Overlapped,
    Staggered,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "partitioned" => Some(Mode::Partitioned),
            "overlapped" => Some(Mode::Overlapped),
            "staggered" => Some(Mode::Staggered),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Partitioned => "partitioned",
            Mode::Overlapped => "overlapped",
            Mode::Staggered => "staggered",
        }
    }
}

pub const MAX_MODES: usize = 3;

/// What CPU 0 decided before starting the others; read-only once they run.
pub struct Plan {
    pub pages: Touched,
    pub modes: [Mode; MAX_MODES],
    pub n_modes: usize,
    pub cpus: usize,
    /// Barrier timeout, counter ticks.
    pub timeout: u64,
    /// `stress.sabotage`: the last CPU clears its own stamp on its first page after the touch
    /// passes, as a lost write would, so that the verdict's failure line can be seen.
    pub sabotage: bool,
    /// `stress.interleave`: a `YIELD` after every page touched. Under -icount QEMU runs one
    /// CPU until it waits (or for 100 ms of virtual time), so without it the CPUs' passes do
    /// not overlap at all; with it QEMU moves to the next CPU after every page.
    pub interleave: bool,
}

impl Plan {
    /// Region of mode number `k`: (first page index, page count).
    fn region(&self, k: usize) -> (u64, u64) {
        let total = self.pages.pages();
        let m = self.n_modes as u64;
        let a = total * k as u64 / m;
        let b = total * (k as u64 + 1) / m;
        (a, b - a)
    }
}

static PLAN: Global<*const Plan> = Global::new(core::ptr::null());
static BARRIER: Barrier = Barrier::new();

// Per-CPU results of the current mode (each written only by its CPU, read by CPU 0 after a
// barrier).
static TOUCHED: PerCpu<u64> = PerCpu::new(0);
static FIRST: PerCpu<u64> = PerCpu::new(0);
static SECOND: PerCpu<u64> = PerCpu::new(0);
/// CPU 0's view of the whole machine: from leaving the start barrier to leaving the barrier
/// after everyone's first pass, and from there to leaving the one after the second pass.
static MACHINE_FIRST: Global<u64> = Global::new(0);
static MACHINE_SECOND: Global<u64> = Global::new(0);
/// Moved on by CPU 0 once it has read the clock at a timed barrier: the others wait for it, so
/// no CPU's work can fall on the wrong side of CPU 0's reading (under -icount QEMU may run one
/// CPU until it waits, and the first one out of a barrier would otherwise run on alone).
static GO: Global<u64> = Global::new(0);
/// Words found not zero on first touch: this CPU's own word, or a word no CPU stamps.
static NONZERO: PerCpu<u64> = PerCpu::new(0);
static BAD_WORDS: PerCpu<u64> = PerCpu::new(0);
static CHECKED: PerCpu<u64> = PerCpu::new(0);
static BAD_ADDR: PerCpu<u64> = PerCpu::new(0);
static BAD_WANT: PerCpu<u64> = PerCpu::new(0);
static BAD_GOT: PerCpu<u64> = PerCpu::new(0);

/// CPU `cpu`'s stamp on `page`: never 0, different for every (CPU, page).
pub fn stamp(cpu: usize, page: u64) -> u64 {
    0x5354_4d50_0000_0000 ^ ((cpu as u64 + 1) << 40) ^ (page >> 12)
}

/// The CPUs' slices of a partitioned region of `p` pages: CPU `i` owns `[first(i), first(i+1))`.
fn first(i: usize, n: usize, p: u64) -> u64 {
    p * i as u64 / n as u64
}

/// Reads every word but the CPUs' stamp words (any non-zero one counts), checks this CPU's own
/// word holds `old`, stamps it. Returns (non-zero unstamped words, own word not `old`).
#[inline(always)]
unsafe fn touch(page: u64, me: usize, n: usize, old: u64) -> (u64, u64) {
    let p = page as *mut u64;
    let mut acc = 0;
    for w in n..WORDS as usize {
        acc |= read_volatile(p.add(w));
    }
    let own = p.add(me);
    let was = read_volatile(own);
    write_volatile(own, stamp(me, page));
    ((acc != 0) as u64, (was != old) as u64)
}

/// One pass: `count` pages of the region from page `start`, wrapping. `second`: the pages were
/// touched by this CPU already (its own words must hold its stamps). The same instructions
/// either way.
#[inline(never)]
fn pass(plan: &Plan, region: (u64, u64), start: u64, count: u64, me: usize, second: bool) -> (u64, u64) {
    let (base, p) = region;
    let keep = if second { u64::MAX } else { 0 };
    let (mut nonzero, mut wrong) = (0, 0);
    let mut j = start;
    for _ in 0..count {
        let page = plan.pages.page(base + j);
        // SAFETY: free guest RAM (see main).
        let (a, b) = unsafe { touch(page, me, plan.cpus, stamp(me, page) & keep) };
        nonzero += a;
        wrong += b;
        if plan.interleave {
            // SAFETY: a hint; it touches nothing.
            unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) };
        }
        j += 1;
        if j == p {
            j = 0;
        }
    }
    (nonzero, wrong)
}

/// Checks every page of the region: each CPU's stamp word where that CPU touched the page, 0 in
/// every other word. Records the first mismatch.
fn verify(plan: &Plan, mode: Mode, region: (u64, u64), me: usize) {
    let (base, p) = region;
    let n = plan.cpus;
    let (mut bad, mut checked) = (0u64, 0u64);
    let mut owner = 0;
    for j in 0..p {
        while mode == Mode::Partitioned && owner + 1 < n && j >= first(owner + 1, n, p) {
            owner += 1;
        }
        let page = plan.pages.page(base + j);
        for w in 0..WORDS as usize {
            let touched_by_w = w < n && (mode != Mode::Partitioned || w == owner);
            let want = if touched_by_w { stamp(w, page) } else { 0 };
            let a = page + 8 * w as u64;
            // SAFETY: a touched page.
            let got = unsafe { read_volatile(a as *const u64) };
            if got != want {
                if bad == 0 {
                    BAD_ADDR.set(me, a);
                    BAD_WANT.set(me, want);
                    BAD_GOT.set(me, got);
                }
                bad += 1;
            }
        }
        checked += WORDS;
    }
    BAD_WORDS.set(me, bad);
    CHECKED.set(me, checked);
}

fn meet(what: &str, mode: &str) {
    // SAFETY: PLAN is set before any secondary starts and never changes after.
    let plan = unsafe { &*PLAN.get() };
    if let Err(missing) = BARRIER.wait(plan.cpus, plan.timeout) {
        let me = smp::this_cpu();
        println!(
            "stress: {} FAILED: cpu {} waited for cpu {} at the {} barrier past the timeout",
            mode, me, missing, what
        );
        if me == 0 {
            psci::system_off();
        }
        psci::cpu_off();
    }
}

/// A barrier at which CPU 0 reads the clock before anyone goes on: its reading (CPU 0), 0
/// for the others.
fn meet_timed(what: &str, mode: &str, me: usize) -> u64 {
    meet(what, mode);
    // SAFETY: as in meet.
    let plan = unsafe { &*PLAN.get() };
    if me == 0 {
        let t = now();
        GO.set(GO.get() + 1);
        smp::dsb();
        smp::sev();
        return t;
    }
    let next = TIMED.get(me) + 1;
    TIMED.set(me, next);
    if !smp::wait_until(plan.timeout, || GO.get() >= next) {
        println!("stress: {} FAILED: cpu {} was not let go after the {} barrier", mode, me, what);
        psci::cpu_off();
    }
    0
}

/// Timed barriers each CPU but 0 has passed.
static TIMED: PerCpu<u64> = PerCpu::new(0);

/// Every CPU's part of mode number `k`.
fn run_mode(plan: &Plan, k: usize, me: usize) {
    let mode = plan.modes[k];
    let region = plan.region(k);
    let (n, p) = (plan.cpus, region.1);
    let (start, count) = match mode {
        Mode::Partitioned => (first(me, n, p), first(me + 1, n, p) - first(me, n, p)),
        Mode::Overlapped => (0, p),
        Mode::Staggered => (first(me, n, p), p),
    };
    // Between timed barriers CPU 0's clock times the whole machine (under -icount, every CPU's
    // instructions): everyone's first pass, then everyone's second.
    let m0 = meet_timed("start", mode.name(), me);
    let t0 = now();
    let (nonzero, wrong) = pass(plan, region, start, count, me, false);
    let t1 = now();
    let m1 = meet_timed("first pass", mode.name(), me);
    let t1b = now();
    let (_, lost) = pass(plan, region, start, count, me, true);
    let t2 = now();
    let m2 = meet_timed("second pass", mode.name(), me);
    TOUCHED.set(me, count);
    FIRST.set(me, t1 - t0);
    SECOND.set(me, t2 - t1b);
    if me == 0 {
        MACHINE_FIRST.set(m1 - m0);
        MACHINE_SECOND.set(m2 - m1);
    }
    NONZERO.set(me, nonzero + wrong);
    if plan.sabotage && me == n - 1 && count > 0 {
        let page = plan.pages.page(region.0 + start);
        // SAFETY: this CPU's own stamp word of a page it touched.
        unsafe { write_volatile((page as *mut u64).add(me), 0) };
    }
    meet("touched", mode.name());
    verify(plan, mode, region, me);
    // A lost own write between the passes counts too.
    BAD_WORDS.set(me, BAD_WORDS.get(me) + lost);
    meet("verified", mode.name());
    if me == 0 {
        report(plan, mode, p);
    }
    meet("reported", mode.name());
}

/// CPU 0: every CPU's results for `mode`, then the verdict.
fn report(plan: &Plan, mode: Mode, p: u64) {
    let n = plan.cpus;
    let mut touches = 0;
    let mut nonzero = 0;
    let mut checked = 0;
    for i in 0..n {
        let (c, f, s) = (TOUCHED.get(i), FIRST.get(i), SECOND.get(i));
        println!(
            "stress: cpu {} {} first-touch pages={} first={} second={} ticks, fault={} instructions/page",
            i,
            mode.name(),
            c,
            f,
            s,
            ticks_to_ns_per(f as i64 - s as i64, c)
        );
        touches += c;
        nonzero += NONZERO.get(i);
        checked += CHECKED.get(i);
    }
    // The machine's extra time for the first pass, per page of the region (each mapped once):
    // under -icount every CPU's instructions count, so this is what a fault costs the whole
    // machine, races and retries included.
    let (mf, ms) = (MACHINE_FIRST.get(), MACHINE_SECOND.get());
    println!(
        "stress: {} cpus={} machine first={} second={} ticks, fault={} instructions/page",
        mode.name(),
        n,
        mf,
        ms,
        ticks_to_ns_per(mf as i64 - ms as i64, p)
    );
    println!("stress: {} fresh words not zero: {}", mode.name(), nonzero);
    let mut failed = false;
    for i in 0..n {
        let bad = BAD_WORDS.get(i);
        if bad > 0 {
            failed = true;
            let (a, want, got) = (BAD_ADDR.get(i), BAD_WANT.get(i), BAD_GOT.get(i));
            let word = (a & (PAGE - 1)) / 8;
            let why = if word as usize >= n {
                "a word no cpu writes is not 0"
            } else if got == 0 {
                "lost write, or a second frame behind this IPA"
            } else if want == 0 {
                "a stamp where none was written"
            } else {
                "wrong stamp"
            };
            println!(
                "stress: {} verify FAILED on cpu {}: {} bad words, first at 0x{:x} (page 0x{:x} word {}) want 0x{:x} got 0x{:x}: {}",
                mode.name(),
                i,
                bad,
                a,
                a & !(PAGE - 1),
                word,
                want,
                got,
                why
            );
        }
    }
    if !failed {
        println!(
            "stress: {} cpus={} pages={} touches={} words checked={} verify=ok",
            mode.name(),
            n,
            p,
            touches,
            checked
        );
    }
}

fn secondary_main(me: usize) -> ! {
    // SAFETY: as in meet.
    let plan = unsafe { &*PLAN.get() };
    for k in 0..plan.n_modes {
        run_mode(plan, k, me);
    }
    psci::cpu_off()
}

/// CPU 0: starts the others, runs every mode, and waits until the others are off. Returns the
/// stray aborts of all CPUs, or `None` when the run failed (reported).
pub fn run(plan: &Plan) -> Option<u64> {
    PLAN.set(plan as *const Plan);
    smp::dsb();
    let names = plan.modes[..plan.n_modes].iter().map(|m| m.name());
    let mut list = [0u8; 40];
    let mut len = 0;
    for (i, name) in names.enumerate() {
        let sep: &[u8] = if i > 0 { b"," } else { b"" };
        for &b in sep.iter().chain(name.as_bytes()) {
            list[len] = b;
            len += 1;
        }
    }
    println!(
        "stress: smp cpus={} modes={} pages={} (each mode {})",
        plan.cpus,
        core::str::from_utf8(&list[..len]).unwrap_or("?"),
        plan.pages.pages(),
        plan.pages.pages() / plan.n_modes as u64
    );
    if let Err((cpu, r)) = smp::start_secondaries(secondary_main, plan.timeout) {
        if r == psci::SUCCESS {
            println!("stress: smp FAILED: cpu {} did not reach its entry after CPU_ON", cpu);
        } else {
            println!("stress: smp FAILED: CPU_ON of cpu {} returned {} {}", cpu, r, psci::error_name(r));
        }
        return None;
    }
    for k in 0..plan.n_modes {
        run_mode(plan, k, 0);
    }
    if let Err(cpu) = smp::wait_others_off(plan.timeout) {
        println!("stress: smp FAILED: cpu {} still on after its CPU_OFF", cpu);
        return None;
    }
    if plan.cpus > 1 {
        println!("stress: {} secondary cpus off", plan.cpus - 1);
    }
    Some((0..plan.cpus).map(exception::stray_faults_of).sum())
}
