//! Multi-threaded stress: CPUs (threads) allocating, returning, releasing and refilling at
//! once, with a shadow table that catches any frame handed to two owners at the same time,
//! and an auditor running alongside.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::vec::Vec;

use super::testing::*;
use super::*;

const TOTAL: usize = 4096;
const CPUS: usize = 3;
const ROUNDS: usize = 3000;

/// A small xorshift, so each thread's sequence is fixed and the test needs no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// No frame is ever held by two owners at once, whatever the interleaving, and at the end
// every frame is back and the audit is exact.
#[test]
fn concurrent_cpus_never_share_a_frame() {
    let config = PoolConfig {
        page_capacity: 32,
        page_low: 8,
        page_high: 24,
        block_capacity: 1,
        block_low: 1,
        block_high: 1,
        steal_victims: 2,
    };
    let rig = rig(TOTAL, CPUS, config);
    let boot_free = rig.frames.free_frames();
    // Shadow ownership: 0 = nobody, else the thread id + 1 that holds the frame.
    let shadow: Vec<AtomicU32> = (0..TOTAL).map(|_| AtomicU32::new(0)).collect();
    let base = RAM_BASE >> 12;
    let running = AtomicBool::new(true);

    let take = |pfn: Pfn, frames: usize, me: u32| {
        for i in 0..frames as u64 {
            let cell = &shadow[(pfn.0 + i - base) as usize];
            let prev = cell.swap(me, Ordering::AcqRel);
            assert_eq!(prev, 0, "frame {:#x} handed to {me} while {prev} holds it", pfn.0 + i);
            assert!(rig.ram.reads_zero(pfn.add(i)), "frame {:#x} handed out dirty", pfn.0 + i);
        }
    };
    let drop_shadow = |pfn: Pfn, frames: usize, me: u32| {
        for i in 0..frames as u64 {
            let prev = shadow[(pfn.0 + i - base) as usize].swap(0, Ordering::AcqRel);
            assert_eq!(prev, me);
        }
    };

    std::thread::scope(|s| {
        s.spawn(|| {
            // A live audit never finds a broken invariant (it may see frames in flight).
            while running.load(Ordering::Relaxed) {
                let report = rig.frames.audit(None);
                assert!(report.is_consistent(), "{report}");
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..CPUS)
            .map(|cpu| {
                let (take, drop_shadow) = (&take, &drop_shadow);
                let rig = &rig;
                s.spawn(move || {
                    let me = cpu as u32 + 1;
                    let owner = guest(cpu as u16);
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (cpu as u64 + 1));
                    let mut held: Vec<(Pfn, usize)> = Vec::new();
                    for _ in 0..ROUNDS {
                        match rng.next() % 8 {
                            0..=3 => {
                                if let Ok(pfn) = rig.frames.alloc_page_atomic_exclusive(cpu, owner) {
                                    take(pfn, 1, me);
                                    rig.ram.write(pfn, me as u64);
                                    held.push((pfn, 1));
                                }
                            }
                            4 => {
                                if let Ok(pfn) = rig.frames.alloc_page_atomic_exclusive(cpu, owner) {
                                    take(pfn, 1, me);
                                    drop_shadow(pfn, 1, me);
                                    // Busy/Full are legitimate; the frame is then released.
                                    if rig.frames.return_unused_page_atomic(cpu, pfn, owner).is_err() {
                                        take(pfn, 1, me);
                                        held.push((pfn, 1));
                                    }
                                }
                            }
                            5 if rng.next().is_multiple_of(8) => {
                                if let Ok(first) = rig.frames.alloc_block_atomic_exclusive(cpu, owner) {
                                    take(first, BLOCK_FRAMES, me);
                                    held.push((first, BLOCK_FRAMES));
                                }
                            }
                            6 => {
                                if !held.is_empty() {
                                    let (pfn, frames) = held.swap_remove(rng.next() as usize % held.len());
                                    drop_shadow(pfn, frames, me);
                                    rig.frames.release(pfn, frames, owner, &rig.ram).unwrap();
                                }
                            }
                            _ => {
                                if rig.frames.needs_refill(cpu) {
                                    let _ = rig.frames.refill(cpu);
                                }
                            }
                        }
                    }
                    for (pfn, frames) in held {
                        drop_shadow(pfn, frames, me);
                        rig.frames.release(pfn, frames, owner, &rig.ram).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        running.store(false, Ordering::Relaxed);
    });

    for cpu in 0..CPUS {
        rig.frames.drain(cpu).unwrap();
    }
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.free_in_buddy, boot_free);
}
