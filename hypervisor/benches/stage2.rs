//! Stage-2 table throughput on the host: map then unmap 4 KiB pages and 2 MiB blocks over a
//! plain in-memory machine (no checking model: this measures the table code itself); and N
//! threads (vCPUs) demand-faulting 4 KiB pages into one space at once, through the real frame
//! manager's atomic path, partitioned (each its own pages) or overlapped (all the same pages,
//! in the same order: every page raced).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use labyrinth::frame::{
    AtomicError, ClaimedPage, FrameDb, FrameManager, FrameScrubber, FrameState, Owner, Pfn, PoolConfig,
    TagCell, VmId,
};
use labyrinth::stage2::{Attrs, Declined, FaultCache, Geometry, Stage2, Stage2Env, Stage2Error, ENTRIES};

/// Table pages in a vector, frame ownership in another, barriers and TLBIs as no-ops.
struct Plain {
    base: u64,
    tables: Vec<Option<Box<[u64; ENTRIES]>>>,
    free_tables: Vec<u64>,
    vm: VmId,
}

impl Plain {
    fn new(vm: VmId, frames: usize) -> Self {
        let base = 0x40000;
        Plain {
            base,
            tables: (0..frames).map(|_| None).collect(),
            free_tables: (base..base + frames as u64).rev().collect(),
            vm,
        }
    }
}

impl Stage2Env for Plain {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.tables[(table.0 - self.base) as usize].as_ref().map_or(0, |t| t[index])
    }
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        self.tables[(table.0 - self.base) as usize].get_or_insert_with(|| Box::new([0; ENTRIES]))[index] =
            value;
    }
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        let cur = self.read(table, index);
        if cur != old {
            return Err(cur);
        }
        self.write(table, index, new);
        Ok(())
    }
    fn take_tables(&mut self, _vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        for slot in out {
            let pfn = self.free_tables.pop().ok_or(Stage2Error::OutOfMemory)?;
            self.tables[(pfn - self.base) as usize] = Some(Box::new([0; ENTRIES]));
            *slot = Pfn(pfn);
        }
        Ok(())
    }
    fn free_table(&mut self, _vm: VmId, table: Pfn) {
        self.tables[(table.0 - self.base) as usize] = None;
        self.free_tables.push(table.0);
    }
    fn frame_state(&self, _pfn: Pfn) -> Option<FrameState> {
        // Every guest frame here belongs to the benchmark's guest.
        Some(FrameState::Guest(self.vm))
    }
    fn split_frames(&mut self, _vm: VmId, _head: Pfn) {
        // Ownership is not tracked per frame here: a split changes nothing to record.
    }
    fn dsb_ishst(&mut self) {}
    fn dsb_ish(&mut self) {}
    fn isb(&mut self) {}
    fn tlbi_ipas2e1is(&mut self, _: u16, _: u64, _: usize) {}
    fn tlbi_vmalle1is(&mut self, _: u16) {}
    fn tlbi_vmalls12e1is(&mut self, _: u16) {}
}

const RAM: u64 = 0x4000_0000;
const PAGES: u64 = 512;
const BLOCKS: u64 = 64;

fn bench(c: &mut Criterion) {
    let vm = VmId::new(1).unwrap();
    let mut g = c.benchmark_group("stage2");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("map+unmap 512 x 4 KiB pages", |b| {
        let mut env = Plain::new(vm, 64);
        let mut s2 = Stage2::new(&mut env, vm, 1, Geometry::for_pa_bits(40)).unwrap();
        b.iter(|| {
            for i in 0..PAGES {
                s2.map_page(&mut env, RAM + i * 4096, 0x8000_0000 + i * 4096, Attrs::RAM).unwrap();
            }
            s2.unmap(&mut env, RAM, PAGES * 4096, &mut |pa, _| {
                black_box(pa);
            })
            .unwrap();
        });
    });
    g.throughput(Throughput::Elements(BLOCKS));
    g.bench_function("map+unmap 64 x 2 MiB blocks", |b| {
        let mut env = Plain::new(vm, 64);
        let mut s2 = Stage2::new(&mut env, vm, 1, Geometry::for_pa_bits(40)).unwrap();
        b.iter(|| {
            for i in 0..BLOCKS {
                s2.map(&mut env, RAM + i * (2 << 20), 0x8000_0000 + i * (2 << 20), 2, Attrs::RAM).unwrap();
            }
            s2.unmap(&mut env, RAM, BLOCKS * (2 << 20), &mut |pa, _| {
                black_box(pa);
            })
            .unwrap();
        });
    });
    g.finish();
}

const RAM_BASE: u64 = 0x4000_0000;
/// Pages every run maps: 256 MiB of guest RAM, 128 level-3 tables; long enough (about 1.5 ms
/// for one thread) that the threads' start skew is a small part of the clock.
const FAULT_PAGES: u64 = 65536;
/// 320 MiB of host RAM: the guest's pages, its tables, four CPUs' full pools.
const HOST_FRAMES: usize = 81920;
const WORDS: usize = 512;

/// Host RAM as words: guest frames and table pages (whose entries are its words).
struct Ram(Vec<AtomicU64>);

impl Ram {
    fn word(&self, pfn: Pfn, i: usize) -> &AtomicU64 {
        &self.0[(pfn.0 - (RAM_BASE >> 12)) as usize * WORDS + i]
    }
}

impl FrameScrubber for Ram {
    fn scrub(&self, first: Pfn, frames: usize) {
        for f in 0..frames as u64 {
            for i in 0..WORDS {
                self.word(first.add(f), i).store(0, Ordering::Relaxed);
            }
        }
    }
    fn reads_zero(&self, pfn: Pfn) -> bool {
        (0..WORDS).all(|i| self.word(pfn, i).load(Ordering::Relaxed) == 0)
    }
}

/// One host thread's machine: table memory as atomics, frames from its CPU's pool.
struct Shared<'a> {
    ram: &'a Ram,
    frames: &'a FrameManager<'static>,
    cpu: usize,
}

impl Stage2Env for Shared<'_> {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.ram.word(table, index).load(Ordering::Acquire)
    }
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        self.ram.word(table, index).store(value, Ordering::Release)
    }
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        self.ram
            .word(table, index)
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }
    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        for slot in out {
            *slot = alloc(self.frames, self.cpu, Owner::page_table(vm)).ok_or(Stage2Error::OutOfMemory)?;
        }
        Ok(())
    }
    fn free_table(&mut self, vm: VmId, table: Pfn) {
        self.frames.release(table, 1, Owner::page_table(vm), self.ram).unwrap();
    }
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        if self.frames.return_unused_page_atomic(self.cpu, table, Owner::page_table(vm)).is_err() {
            self.free_table(vm, table);
        }
    }
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.frames.db().state(pfn).ok()
    }
    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        let _ = self.frames.split_block(head, Owner::guest(vm));
    }
    fn dsb_ishst(&mut self) {}
    fn dsb_ish(&mut self) {}
    fn isb(&mut self) {}
    fn tlbi_ipas2e1is(&mut self, _: u16, _: u64, _: usize) {}
    fn tlbi_vmalle1is(&mut self, _: u16) {}
    fn tlbi_vmalls12e1is(&mut self, _: u16) {}
}

fn alloc(frames: &FrameManager<'static>, cpu: usize, owner: Owner) -> Option<Pfn> {
    match frames.alloc_page_atomic_exclusive(cpu, owner) {
        Err(AtomicError::Empty) => {
            frames.refill(cpu).ok()?;
            frames.alloc_page_atomic_exclusive(cpu, owner).ok()
        }
        r => r.ok(),
    }
}

fn claim(frames: &FrameManager<'static>, cpu: usize, vm: VmId) -> ClaimedPage {
    let pool = frames.cpu(cpu).unwrap();
    match pool.alloc_guest_page_own_pool(vm) {
        Err(AtomicError::Empty) => {
            frames.refill(cpu).unwrap();
            pool.alloc_guest_page_own_pool(vm).unwrap()
        }
        r => r.unwrap(),
    }
}

/// One vCPU's faults: each page of `pages` not mapped yet, through the cached level-3 table
/// when it covers it, else the walk; a lost race hands its page back to the pool.
fn fault_pages(s2: &Stage2, env: &mut Shared<'_>, pages: impl Iterator<Item = u64>) {
    let vm = s2.vm();
    let mut cache = FaultCache::new();
    for p in pages {
        let ipa = RAM_BASE + p * 4096;
        if s2.translate(env, ipa).is_some() {
            continue;
        }
        let page = claim(env.frames, env.cpu, vm);
        let r = match s2.page_slot(&cache, ipa) {
            Some(slot) => slot.install(env, page),
            None => s2.fault_page(env, &mut cache, ipa, page),
        };
        if let Err(Declined::Retry(page)) = r {
            let _ = env.frames.return_unused_page_atomic(env.cpu, page.pfn(), Owner::guest(vm));
        }
    }
}

/// The frame manager over fresh RAM, its page pools as Labyrinth sizes them at EL2
/// (`frames.rs`): a refill, under the buddy allocator's lock, once per 2048 pages.
fn machine(cpus: usize) -> (&'static Ram, FrameManager<'static>) {
    let end = RAM_BASE + HOST_FRAMES as u64 * 4096;
    let banks = [(RAM_BASE, end)];
    let (base, len) = FrameDb::span_of(&banks).unwrap();
    let tags: &'static [TagCell] =
        Box::leak((0..len).map(|_| TagCell::new(0)).collect::<Vec<_>>().into_boxed_slice());
    let db = FrameDb::new(tags, base, &banks).unwrap();
    let ram: &'static Ram =
        Box::leak(Box::new(Ram((0..HOST_FRAMES * WORDS).map(|_| AtomicU64::new(0)).collect())));
    let config = PoolConfig {
        page_capacity: 2048,
        page_low: 64,
        page_high: 2048,
        block_capacity: 0,
        block_low: 0,
        block_high: 0,
        steal_victims: 1,
    };
    let frames = FrameManager::new(db, &banks, cpus, config, ram).unwrap();
    (ram, frames)
}

/// Pins the calling thread to core `index` modulo the cores there are, as a vCPU is pinned to
/// its CPU (best effort: a refusal leaves the thread where it is).
fn pin_to_core(index: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity get valid
    // pointers to it and its size, and 0 names the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Time for `threads` vCPUs to fault `FAULT_PAGES` pages into one fresh space, `iters` times
/// (space creation, thread start and teardown outside the clock).
fn concurrent_faults(
    ram: &'static Ram,
    frames: &FrameManager<'static>,
    threads: usize,
    overlapped: bool,
    iters: u64,
) -> Duration {
    let vm = VmId::new(1).unwrap();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut env0 = Shared { ram, frames, cpu: 0 };
        let s2 = Stage2::new(&mut env0, vm, 1, Geometry::for_pa_bits(40)).unwrap();
        // A spinning start, not a blocking barrier: on this virtual machine an idle core takes
        // about a millisecond to wake, so a thread woken from a barrier often started only as
        // the other finished, and the clock measured the wake-up, not the faults.
        let ready = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let vcpus: Vec<_> = (0..threads)
                .map(|cpu| {
                    let (s2, ready) = (&s2, &ready);
                    s.spawn(move || {
                        let mut env = Shared { ram, frames, cpu };
                        let share = FAULT_PAGES / threads as u64;
                        pin_to_core(cpu);
                        ready.fetch_add(1, Ordering::AcqRel);
                        while ready.load(Ordering::Acquire) < threads {
                            std::hint::spin_loop();
                        }
                        let began = Instant::now();
                        if overlapped {
                            fault_pages(s2, &mut env, 0..FAULT_PAGES);
                        } else {
                            fault_pages(s2, &mut env, cpu as u64 * share..(cpu as u64 + 1) * share);
                        }
                        (began, Instant::now())
                    })
                })
                .collect();
            // From the first vCPU's start to the last one's end (the clock of whichever thread
            // the host runs last would start late on an oversubscribed machine).
            let spans: Vec<_> = vcpus.into_iter().map(|v| v.join().unwrap()).collect();
            let first = spans.iter().map(|s| s.0).min().unwrap();
            let last = spans.iter().map(|s| s.1).max().unwrap();
            total += last - first;
        });
        let mut mapped = 0;
        s2.for_each_mapping(&env0, &mut |m| mapped += m.size >> 12);
        assert_eq!(mapped, FAULT_PAGES, "every page mapped once");
        let _ = s2.teardown(&mut env0, &mut |pa, size| {
            frames.release(Pfn(pa >> 12), (size >> 12) as usize, Owner::guest(vm), ram).unwrap();
        });
    }
    total
}

fn bench_concurrent(c: &mut Criterion) {
    let mut g = c.benchmark_group("stage2 concurrent 4 KiB faults");
    g.sample_size(10);
    g.throughput(Throughput::Elements(FAULT_PAGES));
    let (ram, frames) = machine(4);
    for (name, overlapped) in [("partitioned", false), ("overlapped", true)] {
        for threads in [1, 2, 4] {
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| concurrent_faults(ram, &frames, threads, overlapped, iters))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench, bench_concurrent);
criterion_main!(benches);
