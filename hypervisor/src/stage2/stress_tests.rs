//! Multi-threaded stress: vCPUs (threads) faulting into one `Stage2` at once through the real
//! `FrameManager` (pages and blocks from their own pools, losers returned through the atomic
//! path), first all over the same pages with every access stamped, then beside a thread making
//! structural changes (unmap, protect, split, collapse) and draining retired table pages at
//! quiescent points. Afterwards the ownership audit: guest-tagged frames equal the mapped
//! leaves, table-tagged frames the tree's table pages, none leaked, none mapped twice, every free
//! frame zero. Bounded iterations, no timing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::vec::Vec;

use super::*;
use crate::frame::{
    AtomicError, ClaimedBlock, ClaimedPage, FrameDb, FrameManager, FrameScrubber, FrameState, Owner, Pfn,
    PoolConfig, TagCell, VmId, BLOCK_FRAMES,
};

const RAM_BASE: u64 = 0x4000_0000;
/// 24 MiB of host RAM: 12 blocks, enough for the window, its tables and the pools.
const FRAMES: usize = 6144;
const VCPUS: usize = 3;
/// The guest's window: 8 MiB at 1 GiB, the first half open to blocks, the rest pages only.
const WINDOW: u64 = 0x4000_0000;
const WINDOW_PAGES: u64 = 2048;
const BLOCK_PAGES: u64 = 1024;
const WORDS: usize = 512;
const ROUNDS: usize = 1500;

fn vm() -> VmId {
    VmId::new(3).unwrap()
}

/// Host RAM as words: guest frames and table pages alike (table entries are its words).
struct Ram {
    words: Vec<AtomicU64>,
}

impl Ram {
    fn word(&self, pfn: Pfn, i: usize) -> &AtomicU64 {
        &self.words[(pfn.0 - (RAM_BASE >> 12)) as usize * WORDS + i]
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

/// One vCPU's machine: the shared RAM and frame manager, its own CPU index.
struct HostEnv<'a> {
    ram: &'a Ram,
    frames: &'a FrameManager<'static>,
    cpu: usize,
}

impl Stage2Env for HostEnv<'_> {
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
        let owner = Owner::page_table(vm);
        for i in 0..out.len() {
            match alloc_page(self.frames, self.cpu, owner) {
                Some(p) => out[i] = p,
                None => {
                    for &p in &out[..i] {
                        self.return_unused_table(vm, p);
                    }
                    return Err(Stage2Error::OutOfMemory);
                }
            }
        }
        Ok(())
    }
    fn free_table(&mut self, vm: VmId, table: Pfn) {
        self.frames.release(table, 1, Owner::page_table(vm), self.ram).unwrap();
    }
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        assert!(self.ram.reads_zero(table), "{table} returned unused but written");
        give_back_page(self.frames, self.ram, self.cpu, table, Owner::page_table(vm));
    }
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.frames.db().state(pfn).ok()
    }
    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        match self.frames.db().unit(pfn) {
            Ok((state, run)) => (Some(state), run),
            Err(_) => (None, 1),
        }
    }
    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        self.frames.split_block(head, Owner::guest(vm)).unwrap();
    }
    fn dsb_ishst(&mut self) {}
    fn dsb_ish(&mut self) {}
    fn isb(&mut self) {}
    fn tlbi_ipas2e1is(&mut self, _: u16, _: u64, _: usize) {}
    fn tlbi_vmalle1is(&mut self, _: u16) {}
    fn tlbi_vmalls12e1is(&mut self, _: u16) {}
}

/// A page from the atomic path, refilling once when it runs dry.
fn alloc_page(frames: &FrameManager<'static>, cpu: usize, owner: Owner) -> Option<Pfn> {
    match frames.alloc_page_atomic_exclusive(cpu, owner) {
        Err(AtomicError::Empty) => {
            frames.refill(cpu).ok()?;
            frames.alloc_page_atomic_exclusive(cpu, owner).ok()
        }
        r => r.ok(),
    }
}

/// A never-written frame back through the atomic path, else the scrubbing release.
fn give_back_page(frames: &FrameManager<'static>, ram: &Ram, cpu: usize, pfn: Pfn, owner: Owner) {
    if frames.return_unused_page_atomic(cpu, pfn, owner).is_err() {
        frames.release(pfn, 1, owner, ram).unwrap();
    }
}

fn claim_page(frames: &FrameManager<'static>, cpu: usize) -> Option<ClaimedPage> {
    let pool = frames.cpu(cpu)?;
    match pool.alloc_guest_page_own_pool(vm()) {
        Err(AtomicError::Empty) => {
            frames.refill(cpu).ok()?;
            pool.alloc_guest_page_own_pool(vm()).ok()
        }
        r => r.ok(),
    }
}

fn claim_block(frames: &FrameManager<'static>, cpu: usize) -> Option<ClaimedBlock> {
    let pool = frames.cpu(cpu)?;
    match pool.alloc_guest_block_own_pool(vm()) {
        Err(AtomicError::Empty) => {
            frames.refill(cpu).ok()?;
            pool.alloc_guest_block_own_pool(vm()).ok()
        }
        r => r.ok(),
    }
}

/// A small xorshift: each thread's sequence is fixed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the faults of one vCPU did.
#[derive(Default)]
struct Counts {
    faults: usize,
    lost: usize,
}

/// One fault at `ipa`, as the vmm's paths take it: a block where allowed (through the cached
/// level-2 table, else the walk), else a page (cached level-3 table, else the walk). Frames that
/// did not map go back. Returns whether it lost a race (the guest retries).
fn fault(s2: &Stage2, env: &mut HostEnv<'_>, cache: &mut FaultCache, ipa: u64, try_block: bool) -> bool {
    let (frames, ram, cpu) = (env.frames, env.ram, env.cpu);
    if try_block {
        if let Some(block) = claim_block(frames, cpu) {
            let r = match s2.block_slot(cache, ipa) {
                Some(slot) => slot.install(env, block),
                None => s2.fault_block(env, cache, ipa, block),
            };
            match r {
                Ok(()) => return false,
                // No atomic return for a block: the scrubbing release.
                Err(Declined::Retry(b)) => {
                    frames.release(b.pfn(), BLOCK_FRAMES, Owner::guest(vm()), ram).unwrap();
                    return true;
                }
                Err(d) => {
                    frames.release(d.into_claim().pfn(), BLOCK_FRAMES, Owner::guest(vm()), ram).unwrap()
                }
            }
        }
    }
    let page = claim_page(frames, cpu).expect("the window fits in RAM");
    let r = match s2.page_slot(cache, ipa) {
        Some(slot) => slot.install(env, page),
        None => s2.fault_page(env, cache, ipa, page),
    };
    match r {
        Ok(()) => false,
        Err(Declined::Retry(p)) => {
            assert!(ram.reads_zero(p.pfn()), "a lost page was written");
            give_back_page(frames, ram, cpu, p.pfn(), Owner::guest(vm()));
            true
        }
        Err(Declined::Refused(p, e)) => panic!("fault at {ipa:#x} refused: {e} ({})", p.pfn()),
    }
}

/// Faults `ipa` until it translates (the guest re-executing its access), then returns the frame.
fn touch(s2: &Stage2, env: &mut HostEnv<'_>, cache: &mut FaultCache, ipa: u64, n: &mut Counts) -> Pfn {
    let try_block = ipa < WINDOW + BLOCK_PAGES * 0x1000;
    loop {
        if let Some(m) = s2.translate(env, ipa) {
            return Pfn(m.pa >> 12);
        }
        n.faults += 1;
        if fault(s2, env, cache, ipa, try_block && n.faults.is_multiple_of(3)) {
            n.lost += 1;
        }
    }
}

struct Rig {
    ram: Ram,
    frames: FrameManager<'static>,
}

fn rig() -> Rig {
    let end = RAM_BASE + FRAMES as u64 * 0x1000;
    let banks = [(RAM_BASE, end)];
    let (base, len) = FrameDb::span_of(&banks).unwrap();
    let tags: &'static [TagCell] =
        Box::leak((0..len).map(|_| TagCell::new(0)).collect::<Vec<_>>().into_boxed_slice());
    let db = FrameDb::new(tags, base, &banks).unwrap();
    let ram = Ram { words: (0..FRAMES * WORDS).map(|_| AtomicU64::new(0x5a5a)).collect() };
    let config = PoolConfig {
        page_capacity: 64,
        page_low: 16,
        page_high: 48,
        block_capacity: 2,
        block_low: 1,
        block_high: 1,
        steal_victims: 2,
    };
    let frames = FrameManager::new(db, &banks, VCPUS, config, &ram).unwrap();
    Rig { ram, frames }
}

/// The audit against the tables: guest frames = mapped leaves, table frames = the tree's
/// tables, each mapped frame once, every free frame zero and held once.
fn audit(rig: &Rig, s2: &Stage2, env: &HostEnv<'_>) -> usize {
    let mut mapped = BTreeSet::new();
    s2.for_each_mapping(env, &mut |m| {
        for i in 0..m.size >> 12 {
            let pfn = Pfn((m.pa >> 12) + i);
            assert!(mapped.insert(pfn), "{pfn} mapped twice");
            assert_eq!(env.frame_state(pfn), Some(FrameState::Guest(vm())));
        }
    });
    let mut tables = 0;
    s2.for_each_table(env, &mut |t| {
        tables += 1;
        assert_eq!(env.frame_state(t), Some(FrameState::PageTable(vm())));
    });
    assert_eq!(tables, s2.table_pages());
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    let g = report.guests.iter().find(|g| g.vm == vm()).copied();
    let (memory, page_tables) = g.map_or((0, 0), |g| (g.memory, g.page_tables));
    assert_eq!(memory, mapped.len(), "guest frames not mapped (leaked) or mapped without a tag");
    assert_eq!(page_tables, tables + s2.retired_pages(), "table pages leaked");
    mapped.len()
}

#[test]
fn vcpus_fault_into_one_space_and_every_frame_is_accounted_for() {
    let rig = rig();
    let boot_free = rig.frames.free_frames();
    let mut env0 = HostEnv { ram: &rig.ram, frames: &rig.frames, cpu: 0 };
    let s2 = Stage2::new(&mut env0, vm(), 3, Geometry::for_pa_bits(40)).unwrap();
    let q = Quiescence::<VCPUS>::new();
    let lost = AtomicUsize::new(0);

    // Phase 1: every vCPU touches every page of the window, each from another starting point,
    // and stamps its word in the frame behind it.
    std::thread::scope(|s| {
        for cpu in 0..VCPUS {
            let (rig, s2, lost) = (&rig, &s2, &lost);
            s.spawn(move || {
                let mut env = HostEnv { ram: &rig.ram, frames: &rig.frames, cpu };
                let mut cache = FaultCache::new();
                let mut n = Counts::default();
                for k in 0..WINDOW_PAGES {
                    let ipa =
                        WINDOW + ((k + cpu as u64 * WINDOW_PAGES / VCPUS as u64) % WINDOW_PAGES) * 0x1000;
                    let pfn = touch(s2, &mut env, &mut cache, ipa, &mut n);
                    rig.ram.word(pfn, 1 + cpu).store(cpu as u64 + 1, Ordering::Relaxed);
                }
                lost.fetch_add(n.lost, Ordering::Relaxed);
            });
        }
    });
    // One frame behind every IPA, holding every vCPU's stamp: no write went to a second frame.
    for k in 0..WINDOW_PAGES {
        let pfn = Pfn(s2.translate(&env0, WINDOW + k * 0x1000).unwrap().pa >> 12);
        for cpu in 0..VCPUS {
            assert_eq!(rig.ram.word(pfn, 1 + cpu).load(Ordering::Relaxed), cpu as u64 + 1, "lost write");
        }
    }
    assert_eq!(audit(&rig, &s2, &env0), WINDOW_PAGES as usize);

    // Phase 2: vCPUs 1.. fault random pages while vCPU 0 unmaps, protects, splits and
    // collapses, and drains retired table pages once every vCPU passed a quiescent point.
    let done = AtomicUsize::new(0);
    for cpu in 0..VCPUS {
        q.online(cpu, &s2);
    }
    std::thread::scope(|s| {
        for cpu in 1..VCPUS {
            let (rig, s2, q, done, lost) = (&rig, &s2, &q, &done, &lost);
            s.spawn(move || {
                let mut env = HostEnv { ram: &rig.ram, frames: &rig.frames, cpu };
                let mut cache = FaultCache::new();
                let mut n = Counts::default();
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ cpu as u64);
                for _ in 0..ROUNDS {
                    let ipa = WINDOW + rng.next() % WINDOW_PAGES * 0x1000;
                    let try_block = ipa < WINDOW + BLOCK_PAGES * 0x1000 && rng.next().is_multiple_of(4);
                    n.faults += 1;
                    if fault(s2, &mut env, &mut cache, ipa, try_block) {
                        n.lost += 1;
                    }
                    // Back into the guest: a quiescent point.
                    q.pass(cpu, s2);
                }
                q.offline(cpu);
                lost.fetch_add(n.lost, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Release);
            });
        }
        let mut env = HostEnv { ram: &rig.ram, frames: &rig.frames, cpu: 0 };
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut drained = 0;
        while done.load(Ordering::Acquire) < VCPUS - 1 {
            let page = rng.next() % WINDOW_PAGES;
            let ipa = WINDOW + page * 0x1000;
            match rng.next() % 8 {
                0..=2 => {
                    // Small ranges, or a whole 2 MiB (its level-3 table emptied and retired).
                    let (ipa, len) = match rng.next() % 3 {
                        0 => (ipa & !(level_size(2) - 1), level_size(2)),
                        _ => (ipa, (1 + rng.next() % 64).min(WINDOW_PAGES - page) * 0x1000),
                    };
                    let mut got = Vec::new();
                    s2.unmap_live(&mut env, ipa, len, &mut |pa, size| got.push((pa, size))).unwrap();
                    for (pa, size) in got {
                        rig.frames
                            .release(Pfn(pa >> 12), (size >> 12) as usize, Owner::guest(vm()), &rig.ram)
                            .unwrap();
                    }
                }
                3 => {
                    let ro = Attrs { write: rng.next().is_multiple_of(2), ..Attrs::RAM };
                    s2.protect_live(&mut env, ipa, 0x4000.min((WINDOW_PAGES - page) * 0x1000), ro).unwrap();
                }
                4 => {
                    let _ = s2.split_live(&mut env, ipa, 2);
                }
                5 => {
                    // A block split and at once collapsed again: its level-3 table retired.
                    if s2.split_live(&mut env, ipa, 2).is_ok() {
                        s2.collapse_live(&mut env, ipa, 2).unwrap();
                    }
                }
                _ => {
                    q.pass(0, &s2);
                    drained += s2.drain_retired(&mut env, q.oldest());
                }
            }
            std::thread::yield_now();
        }
        q.pass(0, &s2);
        drained += s2.drain_retired(&mut env, q.oldest());
        assert_eq!(s2.retired_pages(), 0, "every vCPU is out: nothing may stay retired");
        assert!(drained > 0, "no table page was retired: the phase did not test the drain");
    });
    audit(&rig, &s2, &env0);

    // Teardown gives everything back: no frame of the guest's is left, every frame is free.
    let mut got = Vec::new();
    let _ = s2.teardown(&mut env0, &mut |pa, size| got.push((pa, size)));
    for (pa, size) in got {
        rig.frames.release(Pfn(pa >> 12), (size >> 12) as usize, Owner::guest(vm()), &rig.ram).unwrap();
    }
    for cpu in 0..VCPUS {
        rig.frames.drain(cpu).unwrap();
    }
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    assert!(report.guests.iter().all(|g| g.vm != vm()), "{report}");
    assert_eq!(rig.frames.free_frames(), boot_free);
    assert!(lost.load(Ordering::Relaxed) > 0, "no race was lost: the overlap did not test the CAS");
}
