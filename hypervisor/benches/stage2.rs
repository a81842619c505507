//! Stage-2 table throughput on the host: map then unmap 4 KiB pages and 2 MiB blocks over a
//! plain in-memory machine (no checking model: this measures the table code itself).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use labyrinth::frame::{FrameState, Pfn, VmId};
use labyrinth::stage2::{Attrs, Geometry, Stage2, Stage2Env, Stage2Error, ENTRIES};

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

criterion_group!(benches, bench);
criterion_main!(benches);
