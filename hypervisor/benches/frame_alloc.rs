//! Allocation throughput on the host: the atomic per-CPU pool path (alloc + return of an
//! untouched page) against `buddy_system_allocator::FrameAllocator` behind a `spin::Mutex`
//! (alloc + dealloc of one frame), with 1 and 2 threads. Each thread allocates for its own CPU.
//!
//! `cargo bench -p labyrinth --bench frame_alloc` (figures in docs/memory.md).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use buddy_system_allocator::FrameAllocator;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use labyrinth::frame::{
    CpuFrames, FrameDb, FrameManager, FrameScrubber, Owner, Pfn, PoolConfig, TagCell, VmId,
};

/// 64 MiB of RAM at QEMU virt's base.
const RAM: (u64, u64) = (0x4000_0000, 0x4400_0000);
const FRAMES: usize = ((RAM.1 - RAM.0) >> 12) as usize;

/// The benchmark never writes to a frame, so there is nothing to zero.
struct Untouched;

impl FrameScrubber for Untouched {
    fn scrub(&self, _: Pfn, _: usize) {}
    fn reads_zero(&self, _: Pfn) -> bool {
        true
    }
}

fn frame_manager(cpus: usize) -> FrameManager<'static> {
    let storage: &'static [TagCell] = Vec::leak((0..FRAMES).map(|_| TagCell::new(0)).collect());
    let db = FrameDb::new(storage, Pfn(RAM.0 >> 12), &[RAM]).unwrap();
    let config = PoolConfig { page_capacity: 256, page_low: 64, page_high: 192, ..PoolConfig::default() };
    let frames = FrameManager::new(db, &[RAM], cpus, config, &Untouched).unwrap();
    for cpu in 0..cpus {
        frames.refill(cpu).unwrap();
    }
    frames
}

fn locked_buddy() -> spin::Mutex<FrameAllocator<32>> {
    let mut fa = FrameAllocator::<32>::new();
    fa.add_frame((RAM.0 >> 12) as usize, (RAM.1 >> 12) as usize);
    spin::Mutex::new(fa)
}

/// What a trap handler does with its CPU's handle, plus the give-back of an unused page.
fn atomic_cycle(cpu: CpuFrames<'_, 'static>, owner: Owner) {
    let page = cpu.alloc_page_atomic_exclusive(owner).unwrap();
    cpu.return_unused_page_atomic(black_box(page), owner).unwrap();
}

fn locked_cycle(buddy: &spin::Mutex<FrameAllocator<32>>) {
    let frame = buddy.lock().alloc(1).unwrap();
    buddy.lock().dealloc(black_box(frame), 1);
}

/// Runs `cycle(thread)` `iters` times on each of `threads` threads at once; the wall time.
fn parallel(threads: usize, iters: u64, cycle: &(dyn Fn(usize) + Sync)) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let start = &start;
            s.spawn(move || {
                start.wait();
                for _ in 0..iters {
                    cycle(t);
                }
            });
        }
        start.wait();
        let began = Instant::now();
        // Leaving the scope joins every thread.
        began
    })
    .elapsed()
}

fn bench(c: &mut Criterion) {
    let owner = Owner::guest(VmId::new(1).unwrap());
    let frames = frame_manager(2);
    let handles = [frames.cpu(0).unwrap(), frames.cpu(1).unwrap()];
    let buddy = locked_buddy();

    for threads in [1, 2] {
        let mut group =
            c.benchmark_group(format!("alloc+free/{threads} thread{}", if threads > 1 { "s" } else { "" }));
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function("atomic per-CPU pool", |b| {
            b.iter_custom(|iters| parallel(threads, iters, &|cpu| atomic_cycle(handles[cpu], owner)))
        });
        group.bench_function("FrameAllocator in spin::Mutex", |b| {
            b.iter_custom(|iters| parallel(threads, iters, &|_| locked_cycle(&buddy)))
        });
        group.finish();
    }
    assert!(frames.audit(None).is_exact());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = bench
}
criterion_main!(benches);
