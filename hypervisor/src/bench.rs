//! In-QEMU path-length benchmarks, chosen by `labyrinth.bench=` in the boot arguments. Run
//! under `-icount shift=0` (`scripts/bench-qemu.sh`), where each instruction advances the
//! virtual clock by 1 ns: generic-timer ticks then count instructions exactly.
//!
//! `alloc`: instructions per `alloc_page_atomic_exclusive` and per `return_unused_page_atomic`
//! through the boot CPU's `CpuFrames` handle (as the fault path calls them), with the loop's
//! own cost measured and subtracted.

use core::hint::black_box;
use labyrinth::frame::{FrameManager, Owner, Pfn, VmId, BLOCK_FRAMES};
use log::{info, warn};

use crate::arch;

const BATCH: usize = 64;
const ROUNDS: usize = 16;

pub fn run(which: &str, frames: &FrameManager<'_>) {
    match which {
        "alloc" => {
            alloc(frames);
            block_refill(frames);
            page_refill(frames);
        }
        other => warn!("unknown benchmark {other:?}: ignored"),
    }
}

/// Nanoseconds (= instructions under `-icount shift=0`) between two timer readings.
fn ns(ticks: u64) -> u64 {
    ticks * 1_000_000_000 / arch::ticks_per_second()
}

fn alloc(frames: &FrameManager<'_>) {
    let Some(vm) = VmId::new(1) else { return };
    // The trap path's way in: the CPU's own handle (what a guest fault uses).
    let Some(cpu0) = frames.cpu(0) else { return };
    let owner = Owner::guest(vm);
    let mut got = [Pfn(0); BATCH];
    let (mut base_ns, mut alloc_ns, mut free_ns) = (0, 0, 0);
    for _ in 0..ROUNDS {
        if frames.refill(0).is_err() {
            warn!("bench alloc: cannot refill the pool");
            return;
        }
        // The loop itself: the same stores and branches, no allocation.
        let t0 = arch::time_now_ticks();
        for (i, slot) in got.iter_mut().enumerate() {
            *slot = black_box(Pfn(i as u64));
        }
        let t1 = arch::time_now_ticks();
        for slot in got.iter_mut() {
            match cpu0.alloc_page_atomic_exclusive(owner) {
                Ok(p) => *slot = black_box(p),
                Err(e) => {
                    warn!("bench alloc: pool ran dry ({e:?})");
                    return;
                }
            }
        }
        let t2 = arch::time_now_ticks();
        for &p in got.iter() {
            if cpu0.return_unused_page_atomic(black_box(p), owner).is_err() {
                warn!("bench alloc: could not return {p}");
                return;
            }
        }
        let t3 = arch::time_now_ticks();
        base_ns += ns(t1 - t0);
        alloc_ns += ns(t2 - t1);
        free_ns += ns(t3 - t2);
    }
    let n = (BATCH * ROUNDS) as u64;
    info!(
        "bench alloc: {n} atomic allocations, {} instructions each; {} per atomic return; loop overhead {} per iteration subtracted",
        alloc_ns.saturating_sub(base_ns) / n,
        free_ns.saturating_sub(base_ns) / n,
        base_ns / n
    );
}

/// Instructions per block refill (the boot CPU's block pool emptied, then refilled), and per
/// block it brings: what a block fault pays for refills, amortized.
fn block_refill(frames: &FrameManager<'_>) {
    let Some(vm) = VmId::new(1) else { return };
    let owner = Owner::guest(vm);
    let mut got = [Pfn(0); labyrinth::frame::BLOCK_POOL_SLOTS];
    let (mut refill_ns, mut blocks) = (0, 0);
    for _ in 0..ROUNDS {
        let mut n = 0;
        while n < got.len() {
            match frames.alloc_block_atomic_exclusive(0, owner) {
                Ok(p) => {
                    got[n] = p;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let t0 = arch::time_now_ticks();
        let report = frames.refill(0);
        let t1 = arch::time_now_ticks();
        refill_ns += ns(t1 - t0);
        blocks += report.map_or(0, |r| r.blocks_added);
        for &p in &got[..n] {
            let _ = frames.release(p, BLOCK_FRAMES, owner, &arch::Scrubber);
        }
    }
    info!(
        "bench refill: {ROUNDS} block refills, {} instructions each, {} blocks each",
        refill_ns / ROUNDS as u64,
        blocks / ROUNDS
    );
}

/// Instructions per page refill (the boot CPU's page pool emptied, then refilled), and per
/// page it brings: what a 4 KiB fault pays for refills, amortized.
fn page_refill(frames: &FrameManager<'_>) {
    let Some(vm) = VmId::new(1) else { return };
    let Some(cpu0) = frames.cpu(0) else { return };
    let owner = Owner::guest(vm);
    let mut got = alloc::vec::Vec::with_capacity(labyrinth::frame::PAGE_POOL_SLOTS);
    let (mut refill_ns, mut pages) = (0, 0);
    const PAGE_ROUNDS: usize = 4;
    for _ in 0..PAGE_ROUNDS {
        got.clear();
        // The own pool only: what a guest's faults empty before the refill.
        while let Ok(p) = cpu0.alloc_guest_page_own_pool(vm) {
            got.push(p.pfn());
        }
        let t0 = arch::time_now_ticks();
        let report = frames.refill(0);
        let t1 = arch::time_now_ticks();
        refill_ns += ns(t1 - t0);
        pages += report.map_or(0, |r| r.pages_added);
        for &p in &got {
            let _ = frames.release(p, 1, owner, &arch::Scrubber);
        }
    }
    info!(
        "bench refill: {PAGE_ROUNDS} page refills, {} instructions each, {} pages each",
        refill_ns / PAGE_ROUNDS as u64,
        pages / PAGE_ROUNDS
    );
}
