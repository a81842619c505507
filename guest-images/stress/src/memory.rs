//! The memory modes, which talk to Labyrinth's own calls (`guest_rt::labyrinth`):
//! - `stress.wait-memory`: before the passes, wait until the pages they touch can be drawn
//!   (the guest is overcommitted and another guest's memory comes free when it stops);
//! - `stress.secret=<hex>`: fill every free page, every word, with a secret, then power off
//!   (a later guest given those frames must read only zeros);
//! - `stress.giveback`: give pages back (single pages, part of a 2 MiB block, a whole block)
//!   and arguments that must be refused, then check what reads zero and what kept its data.
//!   With a second CPU, that CPU reads both blocks over and over while CPU 0 gives back: a
//!   page kept must read its pattern at every moment (the split of its block happens under
//!   its feet), a page given back its pattern or zero.

use core::ptr::{read_volatile, write_volatile};

use guest_rt::labyrinth::{self, INVALID_PARAMETER};
use guest_rt::ranges::{Range, RangeSet};
use guest_rt::smp::{self, Barrier};
use guest_rt::timer::{delay_us, now, ticks_to_ns_per};
use guest_rt::{println, Global, PAGE};

use crate::{pattern, BLOCK, WORDS};

/// Waits (up to `timeout` ticks) until `pages` more pages can be drawn; says what it saw.
pub fn wait_for(pages: u64, timeout: u64) {
    let Ok(first) = labyrinth::memory_info() else {
        println!("stress: wait-memory: no memory figures from the hypervisor");
        return;
    };
    println!(
        "stress: wait-memory: need {} pages; promised {}, held {}, drawable beyond {}",
        pages, first.promised, first.held, first.drawable
    );
    let t0 = now();
    loop {
        match labyrinth::memory_info() {
            Ok(i) if i.available() >= pages => {
                println!("stress: wait-memory: {} pages available", i.available());
                return;
            }
            Ok(i) if now() - t0 > timeout => {
                println!("stress: wait-memory: gave up with {} pages available", i.available());
                return;
            }
            Ok(_) => delay_us(10_000),
            Err(e) => {
                println!("stress: wait-memory: memory figures failed ({})", e);
                return;
            }
        }
    }
}

/// Writes `secret` to every word of every free page.
pub fn fill_secret(free: &RangeSet<16>, secret: u64) -> u64 {
    let mut pages = 0;
    for r in free.as_slice() {
        let mut a = r.start;
        while a + PAGE <= r.end {
            for w in 0..WORDS {
                // SAFETY: free guest RAM.
                unsafe { write_volatile((a + w * 8) as *mut u64, secret) };
            }
            pages += 1;
            a += PAGE;
        }
    }
    pages
}

fn fill(page: u64) {
    for w in 0..WORDS {
        let a = page + w * 8;
        // SAFETY: free guest RAM (callers pick pages from the free set).
        unsafe { write_volatile(a as *mut u64, pattern(a)) };
    }
}

/// `Some(true)` if every word holds its pattern, `Some(false)` if every word is 0, else None.
fn state(page: u64) -> Option<bool> {
    let (mut kept, mut zero) = (true, true);
    for w in 0..WORDS {
        let a = page + w * 8;
        // SAFETY: as in `fill`.
        let v = unsafe { read_volatile(a as *const u64) };
        kept &= v == pattern(a);
        zero &= v == 0;
    }
    match (kept, zero) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// The blocks CPU 1 reads while CPU 0 gives back (set before it starts).
static CHURN_BLOCKS: Global<[u64; 2]> = Global::new([0; 2]);
static CHURN_STOP: Global<bool> = Global::new(false);
/// CPU 1's rounds over both blocks, and the kept pages it saw wrong.
static CHURN_ROUNDS: Global<u64> = Global::new(0);
static CHURN_WRONG: Global<u64> = Global::new(0);
static CHURN_READY: Barrier = Barrier::new();

/// Whether page `i` of block `b` (0 or 1) is one the checks give back.
fn given_back(b: usize, i: u64) -> bool {
    b == 1 || (10..13).contains(&i)
}

fn churn_main(_: usize) -> ! {
    let _ = CHURN_READY.wait(2, smp::seconds(10));
    let blocks = CHURN_BLOCKS.get();
    let (mut rounds, mut wrong) = (0u64, 0u64);
    while !CHURN_STOP.get() {
        for (b, &base) in blocks.iter().enumerate() {
            for i in 0..BLOCK / PAGE {
                let page = base + i * PAGE;
                match state(page) {
                    Some(true) => {}
                    // Given back: zero, or its pattern before the unmap, or a mix mid-read.
                    _ if given_back(b, i) => {}
                    _ => wrong += 1,
                }
            }
        }
        rounds += 1;
    }
    CHURN_ROUNDS.set(rounds);
    CHURN_WRONG.set(wrong);
    smp::dsb();
    guest_rt::psci::cpu_off()
}

/// The give-back checks; `ram` is the guest's RAM span, `cpus` its CPUs. `true` if all held.
pub fn give_back(free: &RangeSet<16>, ram: Range, cpus: usize) -> bool {
    // Two free, aligned 2 MiB blocks, and eight free pages outside them.
    let mut blocks = [0u64; 2];
    let mut n = 0;
    for r in free.as_slice() {
        let mut b = (r.start + BLOCK - 1) & !(BLOCK - 1);
        while n < 2 && b + BLOCK <= r.end {
            blocks[n] = b;
            n += 1;
            b += BLOCK;
        }
    }
    let mut pages = [0u64; 8];
    let mut m = 0;
    'outer: for r in free.as_slice() {
        let mut a = r.start;
        while a + PAGE <= r.end {
            if m == 8 {
                break 'outer;
            }
            if !blocks[..n].iter().any(|&b| (b..b + BLOCK).contains(&a)) {
                pages[m] = a;
                m += 1;
            }
            a += PAGE;
        }
    }
    if n < 2 || m < 8 {
        println!("stress: give-back: not enough free RAM ({} blocks, {} pages)", n, m);
        return false;
    }
    let [b1, b2] = blocks;
    for &p in &pages {
        fill(p);
    }
    for b in [b1, b2] {
        for i in 0..BLOCK / PAGE {
            fill(b + i * PAGE);
        }
    }
    let churn = cpus > 1;
    if churn {
        CHURN_BLOCKS.set([b1, b2]);
        smp::dsb();
        if let Err((cpu, r)) = smp::start_secondaries(churn_main, smp::seconds(10)) {
            println!("stress: give-back: cpu {} did not start ({})", cpu, r);
            return false;
        }
        let _ = CHURN_READY.wait(2, smp::seconds(10));
    }
    let before = labyrinth::memory_info();

    // Refused, changing nothing: unaligned, not a whole page, empty, MMIO, past RAM, wrapping.
    let bad = [
        (pages[0] + 8, PAGE),
        (pages[0], 100),
        (pages[0], 0),
        (0x0900_0000, PAGE),
        (ram.end, PAGE),
        (ram.end - PAGE, 2 * PAGE),
        (u64::MAX & !(PAGE - 1), 2 * PAGE),
    ];
    let refused = bad.iter().filter(|&&(a, l)| labyrinth::give_back(a, l) == Err(INVALID_PARAMETER)).count();
    println!("stress: give-back bad arguments refused={} of {}", refused, bad.len());

    // Timed: under -icount shift=0 the counter gives instructions (the scrub included).
    let t0 = now();
    let first = labyrinth::give_back(pages[1], PAGE);
    let t1 = now();
    let single = [first, labyrinth::give_back(pages[2], PAGE)];
    let partial = labyrinth::give_back(b1 + 10 * PAGE, 3 * PAGE);
    let t2 = now();
    let whole = labyrinth::give_back(b2, BLOCK);
    let t3 = now();
    println!(
        "stress: give-back cost page={} block={} instructions",
        ticks_to_ns_per((t1 - t0) as i64, 1),
        ticks_to_ns_per((t3 - t2) as i64, 1)
    );
    let after = labyrinth::memory_info();
    println!(
        "stress: give-back pages={:?},{:?} partial-block={:?} block={:?}",
        single[0], single[1], partial, whole
    );
    let freed_ok = single == [Ok(1), Ok(1)] && partial == Ok(3) && whole == Ok(BLOCK / PAGE);
    let churned = if churn {
        CHURN_STOP.set(true);
        smp::dsb();
        let off = smp::wait_others_off(smp::seconds(10)).is_ok();
        smp::dmb();
        let (rounds, wrong) = (CHURN_ROUNDS.get(), CHURN_WRONG.get());
        println!("stress: give-back churn rounds={} wrong={}", rounds, wrong);
        off && rounds > 0 && wrong == 0
    } else {
        true
    };
    let held_ok = match (before, after) {
        (Ok(b), Ok(a)) => {
            println!("stress: give-back held before={} after={}", b.held, a.held);
            // With CPU 1 reading, a page given back may be faulted in again at once (and each
            // vCPU holds a batch of page credit): only the single-CPU figure is exact.
            churn || b.held - a.held == 2 + 3 + BLOCK / PAGE
        }
        _ => false,
    };

    // Given back: zero on the next touch. Kept: every word still its pattern.
    let mut wrong = 0u64;
    let mut expect = |page: u64, kept: bool| {
        if state(page) != Some(kept) {
            if wrong == 0 {
                println!(
                    "stress: give-back page {:#x} should be {}",
                    page,
                    if kept { "kept" } else { "zero" }
                );
            }
            wrong += 1;
        }
    };
    for (i, &p) in pages.iter().enumerate() {
        expect(p, !(1..=2).contains(&i));
    }
    for i in 0..BLOCK / PAGE {
        expect(b1 + i * PAGE, !(10..13).contains(&i));
        expect(b2 + i * PAGE, false);
    }
    let ok = refused == bad.len() && freed_ok && held_ok && churned && wrong == 0;
    println!("stress: give-back verify={} (wrong pages {})", if ok { "ok" } else { "FAILED" }, wrong);
    ok
}
