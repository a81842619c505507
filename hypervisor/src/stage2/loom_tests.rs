//! Model checks (loom) of the stage-2 install protocol: two vCPUs racing the same leaf, the
//! same missing table, a block against pages in the same 2 MiB, and break-before-make (an
//! unmap, an unmap that empties a table, a split) against a fault. Each model checks that
//! exactly one frame ends behind the IPA, that every access lands in it, that a loser's frame
//! and table pages come back untouched, and that no table page is leaked or linked twice. Run
//! with `RUSTFLAGS="--cfg loom" cargo test --release -p labyrinth --lib stage2::loom
//! --target-dir target/loom`.
//!
//! The machine: table pages whose first [`HOT`] entries are loom atomics (every entry the
//! models' faults touch) and whose other entries are plain atomics no two threads race on
//! (only the structural thread sweeps them), so loom schedules around every access that can
//! race without exploring the sweeps' 512 steps; guest frames of two words, one stamp per
//! vCPU's access. Only one thread per model takes the space's maintenance lock (a spin lock
//! on core atomics, which loom cannot schedule around). Every actor is a spawned thread and the
//! model's own thread only sets up and joins: with the model thread racing a spawned one, loom
//! explored a single interleaving of the split model (316 with both spawned).

use std::collections::BTreeSet;
use std::vec::Vec;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::frame::{ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

/// Entries per table page that loom schedules around.
const HOT: usize = 4;
const TABLE_PAGES: usize = 10;
const TABLE_BASE: u64 = 0x40000;
/// Guest page frames, then the words of a 2 MiB block's frames the models touch.
const PAGE_BASE: u64 = 0x41000;
const PAGES: usize = 4;
const BLOCK_HEAD: u64 = 0x80000;
const BLOCK_TOUCHED: [u64; 2] = [3, 5];
/// IPA 1 GiB: level-1 index 1, level-2 index 0, level-3 index 0 (36-bit space, start level 1).
const IPA: u64 = 0x4000_0000;
const MIB: u64 = 1 << 20;

fn vm() -> VmId {
    VmId::new(1).unwrap()
}

struct Mem {
    hot: Vec<[AtomicU64; HOT]>,
    cold: Vec<Vec<std::sync::atomic::AtomicU64>>,
    /// (frame, its two words: the stamps of vCPU 0 and vCPU 1).
    ram: Vec<(Pfn, [AtomicU64; 2])>,
}

impl Mem {
    fn new() -> Arc<Mem> {
        let words = || [AtomicU64::new(0), AtomicU64::new(0)];
        let mut ram: Vec<(Pfn, [AtomicU64; 2])> =
            (0..PAGES as u64).map(|i| (Pfn(PAGE_BASE + i), words())).collect();
        ram.extend(BLOCK_TOUCHED.iter().map(|&i| (Pfn(BLOCK_HEAD + i), words())));
        Arc::new(Mem {
            hot: (0..TABLE_PAGES).map(|_| core::array::from_fn(|_| AtomicU64::new(0))).collect(),
            cold: (0..TABLE_PAGES)
                .map(|_| (HOT..ENTRIES).map(|_| std::sync::atomic::AtomicU64::new(0)).collect())
                .collect(),
            ram,
        })
    }

    fn word(&self, table: Pfn, index: usize) -> Word<'_> {
        let t = (table.0 - TABLE_BASE) as usize;
        if index < HOT {
            Word::Hot(&self.hot[t][index])
        } else {
            Word::Cold(&self.cold[t][index - HOT])
        }
    }

    fn frame(&self, pfn: Pfn) -> &[AtomicU64; 2] {
        &self.ram.iter().find(|(p, _)| *p == pfn).expect("a modelled frame").1
    }

    /// The guest's access after its fault, won or lost: through the translation (once there
    /// is one: a held entry faults again until the structural change is done), it stamps its
    /// word.
    fn access(&self, s2: &Stage2, env: &Env, ipa: u64, vcpu: usize) -> Pfn {
        let m = loop {
            match s2.translate(env, ipa) {
                Some(m) => break m,
                None => thread::yield_now(),
            }
        };
        let pfn = Pfn(m.pa >> 12);
        self.frame(pfn)[vcpu].store(vcpu as u64 + 1, Ordering::Relaxed);
        pfn
    }

    fn untouched(&self, pfn: Pfn) -> bool {
        self.frame(pfn).iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    fn table_is_zero(&self, table: Pfn) -> bool {
        (0..ENTRIES).all(|i| self.word(table, i).load() == 0)
    }
}

enum Word<'m> {
    Hot(&'m AtomicU64),
    Cold(&'m std::sync::atomic::AtomicU64),
}

impl Word<'_> {
    fn load(&self) -> u64 {
        match self {
            Word::Hot(w) => w.load(Ordering::Acquire),
            Word::Cold(w) => w.load(std::sync::atomic::Ordering::Acquire),
        }
    }
    fn store(&self, v: u64) {
        match self {
            Word::Hot(w) => w.store(v, Ordering::Release),
            Word::Cold(w) => w.store(v, std::sync::atomic::Ordering::Release),
        }
    }
    fn cas(&self, old: u64, new: u64) -> Result<u64, u64> {
        match self {
            Word::Hot(w) => w.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire),
            Word::Cold(w) => w.compare_exchange(
                old,
                new,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            ),
        }
    }
}

/// One CPU's view: the shared memory, its own spare table pages, what it gave back.
struct Env {
    mem: Arc<Mem>,
    spare: Vec<Pfn>,
    returned: Vec<Pfn>,
    freed: Vec<Pfn>,
    /// The protocol broken on purpose: a plain read then store instead of the CAS.
    plain_store: bool,
}

impl Env {
    fn new(mem: &Arc<Mem>, spare: &[u64]) -> Env {
        Env {
            mem: mem.clone(),
            spare: spare.iter().map(|&i| Pfn(TABLE_BASE + i)).collect(),
            returned: Vec::new(),
            freed: Vec::new(),
            plain_store: false,
        }
    }
}

impl Stage2Env for Env {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.mem.word(table, index).load()
    }
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        self.mem.word(table, index).store(value)
    }
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        let w = self.mem.word(table, index);
        if self.plain_store {
            let cur = w.load();
            if cur != old {
                return Err(cur);
            }
            w.store(new);
            return Ok(());
        }
        w.cas(old, new).map(|_| ())
    }
    fn take_tables(&mut self, _vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        if self.spare.len() < out.len() {
            return Err(Stage2Error::OutOfMemory);
        }
        for slot in out {
            *slot = self.spare.pop().unwrap();
        }
        Ok(())
    }
    fn free_table(&mut self, _vm: VmId, table: Pfn) {
        self.freed.push(table);
    }
    fn return_unused_table(&mut self, _vm: VmId, table: Pfn) {
        assert!(self.mem.table_is_zero(table), "{table} returned unused but written");
        self.returned.push(table);
    }
    fn frame_state(&self, _pfn: Pfn) -> Option<FrameState> {
        Some(FrameState::Guest(vm()))
    }
    fn split_frames(&mut self, _vm: VmId, _head: Pfn) {}
    fn dsb_ishst(&mut self) {}
    fn dsb_ish(&mut self) {}
    fn isb(&mut self) {}
    fn tlbi_ipas2e1is(&mut self, _: u16, _: u64, _: usize) {}
    fn tlbi_vmalle1is(&mut self, _: u16) {}
    fn tlbi_vmalls12e1is(&mut self, _: u16) {}
}

fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

fn page(i: u64) -> ClaimedPage {
    ClaimedPage::assume(Pfn(PAGE_BASE + i), vm())
}

fn block() -> ClaimedBlock {
    ClaimedBlock::assume(Pfn(BLOCK_HEAD), vm())
}

/// A space (root: table page 0) and the setup CPU's env with table pages `setup` to spare.
fn space(mem: &Arc<Mem>, setup: &[u64]) -> (Arc<Stage2>, Env) {
    let mut env = Env::new(mem, &[0]);
    let s2 = Stage2::new(&mut env, vm(), 1, Geometry::for_pa_bits(36)).unwrap();
    env.spare = setup.iter().map(|&i| Pfn(TABLE_BASE + i)).collect();
    (Arc::new(s2), env)
}

/// Every table page handed to the envs (`given`, root included) is in exactly one place: the
/// tree, freed, returned unused, or still spare; and the space counts the tree right.
fn tables_accounted(s2: &Stage2, envs: &[&Env], given: usize) {
    let mut seen = BTreeSet::new();
    let mut in_tree = 0;
    s2.for_each_table(envs[0], &mut |t| {
        in_tree += 1;
        assert!(seen.insert(t), "{t} linked twice");
    });
    assert_eq!(in_tree, s2.table_pages());
    for e in envs {
        for &t in e.freed.iter().chain(&e.returned).chain(&e.spare) {
            assert!(seen.insert(t), "{t} in two places");
        }
    }
    assert_eq!(seen.len(), given, "a table page leaked");
}

fn same_leaf(plain_store: bool) {
    check(move || {
        let mem = Mem::new();
        let (s2, mut env) = space(&mem, &[1, 2]);
        // The path exists (a page beside it); vCPU 1's cache holds its level-3 table.
        let mut cache = FaultCache::new();
        s2.fault_page(&mut env, &mut cache, IPA + 0x1000, page(3)).unwrap();
        let racer = |vcpu: usize, mut cache: FaultCache| {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut env = Env::new(&mem, &[]);
                env.plain_store = plain_store;
                let r = match s2.page_slot(&cache, IPA) {
                    Some(slot) => slot.install(&mut env, page(vcpu as u64)),
                    None => s2.fault_page(&mut env, &mut cache, IPA, page(vcpu as u64)),
                };
                let got = mem.access(&s2, &env, IPA, vcpu);
                (r, got)
            })
        };
        let a = racer(0, FaultCache::new());
        let b = racer(1, cache);
        let (ra, ga) = a.join().unwrap();
        let (rb, gb) = b.join().unwrap();
        assert_eq!(ra.is_ok() as u32 + rb.is_ok() as u32, 1, "exactly one install wins: {ra:?} {rb:?}");
        let (winner, loser) = if ra.is_ok() { (0, 1) } else { (1, 0) };
        let lost = if ra.is_ok() { rb } else { ra };
        assert_eq!(lost, Err(Declined::Retry(page(loser))), "the loser's frame comes back");
        let behind = Pfn(s2.translate(&env, IPA).unwrap().pa >> 12);
        assert_eq!(behind, page(winner).pfn());
        assert_eq!((ga, gb), (behind, behind), "both accesses land in the one frame");
        assert!(mem.frame(behind).iter().all(|w| w.load(Ordering::Relaxed) != 0), "a write was lost");
        assert!(mem.untouched(page(loser).pfn()));
        assert_eq!(s2.table_pages(), 3);
    });
}

// Two vCPUs fault the same page, one through its cache, one by the walk: one frame behind it,
// both writes in it, the other frame handed back untouched.
#[test]
fn two_vcpus_racing_the_same_leaf() {
    same_leaf(false);
}

// The same race with the CAS replaced by a read and a store: the model sees two frames.
#[test]
#[should_panic]
fn the_leaf_race_is_caught_without_the_cas() {
    same_leaf(true);
}

// Two vCPUs fault pages of the same 2 MiB, whose level-3 table is missing, each with a table
// page to link: one table linked, the other page returned zero, both pages (or, on the same
// IPA, one) behind the one table.
#[test]
fn two_vcpus_racing_the_same_missing_table() {
    for same_ipa in [false, true] {
        check(move || {
            let mem = Mem::new();
            let (s2, mut env) = space(&mem, &[1, 2]);
            // The level-2 table exists (a page in the next 2 MiB); the level-3 one does not.
            s2.fault_page(&mut env, &mut FaultCache::new(), IPA + 2 * MIB, page(3)).unwrap();
            let racer = |vcpu: usize, table: u64| {
                let (s2, mem) = (s2.clone(), mem.clone());
                let ipa = if same_ipa { IPA } else { IPA + vcpu as u64 * 0x1000 };
                thread::spawn(move || {
                    let mut env = Env::new(&mem, &[table]);
                    let r = s2.fault_page(&mut env, &mut FaultCache::new(), ipa, page(vcpu as u64));
                    let got = mem.access(&s2, &env, ipa, vcpu);
                    (r, got, env)
                })
            };
            let a = racer(0, 4);
            let b = racer(1, 5);
            let (ra, ga, ea) = a.join().unwrap();
            let (rb, gb, eb) = b.join().unwrap();
            assert_eq!(s2.table_pages(), 4, "one level-3 table linked");
            // The other table page went back, or was never taken (the walk found the table).
            let unused = ea.returned.len() + eb.returned.len() + ea.spare.len() + eb.spare.len();
            assert_eq!(unused, 1, "one table page linked, the other unused");
            tables_accounted(&s2, &[&env, &ea, &eb], 5);
            if same_ipa {
                assert_eq!(ra.is_ok() as u32 + rb.is_ok() as u32, 1);
                let loser = if ra.is_ok() { 1 } else { 0 };
                assert_eq!(ga, gb);
                assert!(mem.frame(ga).iter().all(|w| w.load(Ordering::Relaxed) != 0));
                assert!(mem.untouched(page(loser).pfn()));
            } else {
                assert!(ra.is_ok() && rb.is_ok(), "{ra:?} {rb:?}");
                assert_eq!((ga, gb), (page(0).pfn(), page(1).pfn()));
            }
        });
    }
}

// A block fault and a page fault in the same 2 MiB: exactly one wins; behind the IPA is either
// the block or the page, never both; the loser's frames and table page come back untouched.
#[test]
fn a_block_against_pages_in_the_same_2mib() {
    check(|| {
        let mem = Mem::new();
        let (s2, mut env) = space(&mem, &[1, 2]);
        s2.fault_page(&mut env, &mut FaultCache::new(), IPA + 2 * MIB, page(3)).unwrap();
        let blocker = {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut env = Env::new(&mem, &[]);
                let r = s2.fault_block(&mut env, &mut FaultCache::new(), IPA, block());
                let got = mem.access(&s2, &env, IPA + 0x3000, 0);
                (r, got, env)
            })
        };
        let paging = {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut env = Env::new(&mem, &[4]);
                let r = s2.fault_page(&mut env, &mut FaultCache::new(), IPA + 0x3000, page(1));
                let got = mem.access(&s2, &env, IPA + 0x3000, 1);
                (r, got, env)
            })
        };
        let (rk, gk, ek) = blocker.join().unwrap();
        let (rp, gp, ep) = paging.join().unwrap();
        assert_eq!(gk, gp, "both accesses land in the one frame");
        match (rk, rp) {
            (Ok(()), Err(Declined::Retry(p))) => {
                assert_eq!(gk, Pfn(BLOCK_HEAD + 3));
                assert!(mem.untouched(p.pfn()));
                assert_eq!(s2.table_pages(), 3);
            }
            (Err(Declined::Refused(b, Stage2Error::AlreadyMapped { .. })), Ok(())) => {
                assert_eq!(gp, page(1).pfn());
                assert!(mem.untouched(Pfn(b.pfn().0 + 3)));
                assert_eq!(s2.table_pages(), 4);
            }
            other => panic!("not exactly one winner: {other:?}"),
        }
        tables_accounted(&s2, &[&env, &ek, &ep], 4);
    });
}

// An unmap of one page (break-before-make) against a fault on it through a vCPU's cache: the
// old frame is released once; the fault either lands after the unmap (mapped) or retries
// (unmapped, its frame untouched), never into a held entry.
#[test]
fn an_unmap_against_a_fault_on_the_same_page() {
    check(|| {
        let mem = Mem::new();
        let (s2, mut env) = space(&mem, &[1, 2]);
        let mut cache = FaultCache::new();
        s2.fault_page(&mut env, &mut cache, IPA, page(2)).unwrap();
        s2.fault_page(&mut env, &mut cache, IPA + 0x1000, page(3)).unwrap();
        let unmapping = {
            let s2 = s2.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                s2.unmap_live(&mut env, IPA, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
                (got, env)
            })
        };
        let faulting = {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut fenv = Env::new(&mem, &[]);
                s2.page_slot(&cache, IPA).expect("the cached table").install(&mut fenv, page(0))
            })
        };
        let (got, env) = unmapping.join().unwrap();
        let r = faulting.join().unwrap();
        assert_eq!(got, vec![(page(2).pfn().phys(), 0x1000)], "the old frame released once");
        match r {
            Ok(()) => assert_eq!(s2.translate(&env, IPA).unwrap().pa, page(0).pfn().phys()),
            Err(Declined::Retry(p)) => {
                assert_eq!(s2.translate(&env, IPA), None);
                assert!(mem.untouched(p.pfn()));
            }
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(s2.translate(&env, IPA + 0x1000).unwrap().pa, page(3).pfn().phys());
        assert_eq!((s2.table_pages(), s2.retired_pages()), (3, 0));
    });
}

// An unmap empties a level-3 table (and the level-2 one above it) while a vCPU faults into it
// through its cache, or by the walk once its cache is stale: the fault's page is either
// reachable afterwards or handed back, never left in a table outside the tree; every table
// page ends in the tree, retired-then-freed, or returned.
#[test]
fn an_unmap_emptying_a_table_against_a_fault_into_it() {
    check(|| {
        let mem = Mem::new();
        let (s2, mut env) = space(&mem, &[1, 2]);
        let mut cache = FaultCache::new();
        s2.fault_page(&mut env, &mut cache, IPA, page(2)).unwrap();
        let unmapping = {
            let s2 = s2.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                s2.unmap_live(&mut env, IPA, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
                (got, env)
            })
        };
        let faulting = {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut fenv = Env::new(&mem, &[4, 5]);
                let r = match s2.page_slot(&cache, IPA + 0x1000) {
                    Some(slot) => slot.install(&mut fenv, page(0)),
                    None => s2.fault_page(&mut fenv, &mut cache, IPA + 0x1000, page(0)),
                };
                (r, fenv)
            })
        };
        let (got, mut env) = unmapping.join().unwrap();
        let (r, fenv) = faulting.join().unwrap();
        assert_eq!(got, vec![(page(2).pfn().phys(), 0x1000)]);
        match r {
            Ok(()) => assert_eq!(s2.translate(&env, IPA + 0x1000).unwrap().pa, page(0).pfn().phys()),
            Err(Declined::Retry(p)) => {
                assert_eq!(s2.translate(&env, IPA + 0x1000), None);
                assert!(mem.untouched(p.pfn()));
            }
            Err(e) => panic!("{e:?}"),
        }
        // Every vCPU is past its fault: whatever was retired can go.
        s2.drain_retired(&mut env, u64::MAX);
        assert_eq!(s2.retired_pages(), 0);
        tables_accounted(&s2, &[&env, &fenv], 5);
    });
}

// A split of a block (its level-2 entry held while the TLBs are invalidated) against a fault
// into the block's 2 MiB: the fault always retries (the memory is mapped throughout), and the
// pages map the block's frames.
#[test]
fn a_split_against_a_fault_in_the_block() {
    check(|| {
        let mem = Mem::new();
        let (s2, mut env) = space(&mem, &[1, 2]);
        s2.fault_block(&mut env, &mut FaultCache::new(), IPA, block()).unwrap();
        let splitting = {
            let s2 = s2.clone();
            thread::spawn(move || {
                s2.split_live(&mut env, IPA, 2).unwrap();
                env
            })
        };
        let faulting = {
            let (s2, mem) = (s2.clone(), mem.clone());
            thread::spawn(move || {
                let mut fenv = Env::new(&mem, &[4]);
                let r = s2.fault_page(&mut fenv, &mut FaultCache::new(), IPA + 0x5000, page(0));
                let got = mem.access(&s2, &fenv, IPA + 0x5000, 1);
                (r, got, fenv)
            })
        };
        let env = splitting.join().unwrap();
        let (r, got, fenv) = faulting.join().unwrap();
        assert_eq!(r, Err(Declined::Retry(page(0))));
        assert!(mem.untouched(page(0).pfn()));
        assert_eq!(got, Pfn(BLOCK_HEAD + 5));
        assert_eq!(s2.translate(&env, IPA + 0x3000).unwrap().pa, (BLOCK_HEAD + 3) << 12);
        assert_eq!(s2.table_pages(), 3);
        tables_accounted(&s2, &[&env, &fenv], 4);
    });
}
