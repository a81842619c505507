//! The stage-2 fuzz harness: a byte string becomes a sequence of map / unmap / protect /
//! fault-in / split / collapse / teardown operations on two guests, checked against a reference
//! model (what each guest must see, as runs of pages) and the checking machine model
//! ([`ModelEnv`]: TLBs, break-before-make, ownership). The `stage2_ops` fuzz target and the host
//! tests both run it; a divergence is an `Err` (the fuzz target panics on it).
//!
//! Checks are incremental, so that a sequence costs what its operations touch: after every
//! operation the machine model's verdict, the frame counts, the cached tables and the range the
//! operation touched (translations, owners, no frame mapped twice); every [`FULL_EVERY`]
//! operations and at the end, everything, through the table code's own walkers.

use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::vec::Vec;

use crate::frame::{ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

use super::model::{ModelEnv, Sabotage};
use super::{level_size, Attrs, Entry, Geometry, MemType, PageState, Stage2, Stage2Env, Stage2Error};

const RAM_BASE_PFN: u64 = 0x40000;
/// 24 MiB of host RAM: enough for both guests' windows and their tables, small enough to run out.
const RAM_FRAMES: usize = 6144;
/// Each guest's IPA window: 8 MiB (four 2 MiB blocks) at the virt machine's RAM base.
const WINDOW: u64 = 0x4000_0000;
const WINDOW_PAGES: u64 = 2048;
const WINDOW_END: u64 = WINDOW + WINDOW_PAGES * PAGE;
const PAGE: u64 = 0x1000;
/// Operations one input may encode; the rest is ignored (the mutator learns to stay short).
pub const MAX_OPS: usize = 64;
/// The full comparison runs after this many operations, and at the end.
pub const FULL_EVERY: usize = 32;

/// Fails the check with a message, like `assert!` but as an `Err`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Pages mapped contiguously: `pages` pages from `pa` on, with `attrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    pages: u64,
    pa: u64,
    attrs: Attrs,
}

/// Appends `run` at `ipa`, merging it into the last run when it continues it (IPA, PA, attrs),
/// so that both sides of a comparison reach the same canonical form.
fn push_merged(out: &mut Vec<(u64, Run)>, ipa: u64, run: Run) {
    if let Some((last_ipa, last)) = out.last_mut() {
        let len = last.pages * PAGE;
        if *last_ipa + len == ipa && last.pa + len == run.pa && last.attrs == run.attrs {
            last.pages += run.pages;
            return;
        }
    }
    out.push((ipa, run));
}

/// What one guest must see: IPA -> run, runs disjoint (not necessarily merged).
#[derive(Default)]
struct Reference {
    runs: BTreeMap<u64, Run>,
    pages: u64,
}

impl Reference {
    /// The run covering `ipa`, with its first IPA.
    fn run_at(&self, ipa: u64) -> Option<(u64, Run)> {
        let (&start, &run) = self.runs.range(..=ipa).next_back()?;
        (ipa < start + run.pages * PAGE).then_some((start, run))
    }

    fn get(&self, ipa: u64) -> Option<(u64, Attrs)> {
        self.run_at(ipa).map(|(start, run)| (run.pa + (ipa - start), run.attrs))
    }

    fn any_in(&self, start: u64, end: u64) -> bool {
        self.runs.range(..end).next_back().is_some_and(|(&s, r)| s + r.pages * PAGE > start)
    }

    /// Splits the run straddling `at`, if any, so that no run crosses it.
    fn cut(&mut self, at: u64) {
        if let Some((start, run)) = self.run_at(at) {
            if start < at {
                let head = (at - start) / PAGE;
                self.runs.insert(start, Run { pages: head, ..run });
                self.runs.insert(at, Run { pages: run.pages - head, pa: run.pa + head * PAGE, ..run });
            }
        }
    }

    fn insert(&mut self, ipa: u64, pages: u64, pa: u64) {
        self.runs.insert(ipa, Run { pages, pa, attrs: Attrs::RAM });
        self.pages += pages;
    }

    /// Removes `[start, end)`; returns the frames it mapped, as (PA, size).
    fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.cut(start);
        self.cut(end);
        let keys: Vec<u64> = self.runs.range(start..end).map(|(&k, _)| k).collect();
        let mut gone = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(run) = self.runs.remove(&k) {
                self.pages -= run.pages;
                gone.push((run.pa, run.pages * PAGE));
            }
        }
        gone
    }

    fn protect(&mut self, start: u64, end: u64, attrs: Attrs) {
        self.cut(start);
        self.cut(end);
        for (_, run) in self.runs.range_mut(start..end) {
            run.attrs = attrs;
        }
    }

    /// The runs inside `[start, end)`, clipped and merged.
    fn runs_in(&self, start: u64, end: u64) -> Vec<(u64, Run)> {
        let mut out = Vec::new();
        let first = self.run_at(start).map_or(start, |(s, _)| s);
        for (&s, &run) in self.runs.range(first..end) {
            let (a, b) = (s.max(start), (s + run.pages * PAGE).min(end));
            push_merged(&mut out, a, Run { pages: (b - a) / PAGE, pa: run.pa + (a - s), attrs: run.attrs });
        }
        out
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.pages = 0;
    }
}

struct Guest {
    s2: Option<Stage2>,
    vm: VmId,
    vmid: u16,
    expect: Reference,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) | u16::from(self.byte()?) << 8)
    }
}

fn attrs_from(bits: u8) -> Attrs {
    Attrs {
        mem: MemType::Normal,
        read: bits & 1 != 0,
        write: bits & 2 != 0,
        exec: bits & 4 != 0,
        state: PageState::Owned,
    }
}

/// The IPA range of one guest an operation may have changed.
#[derive(Clone, Copy)]
struct Touched {
    gi: usize,
    start: u64,
    end: u64,
}

impl Touched {
    /// The aligned `size` region around `[start, end)`, inside the window.
    fn around(gi: usize, start: u64, end: u64, size: u64) -> Touched {
        let (a, b) = (start & !(size - 1), end.next_multiple_of(size));
        Touched { gi, start: a.max(WINDOW), end: b.min(WINDOW_END) }
    }
}

pub struct Exercise {
    env: ModelEnv,
    guests: [Guest; 2],
    geo: Geometry,
    /// A hypervisor-owned frame: mapping it must always be refused.
    hyp_frame: Pfn,
    /// Shared memory lent by the first guest: neither guest may map it on the wrong side.
    shared_frame: Pfn,
}

impl Default for Exercise {
    fn default() -> Self {
        Self::new()
    }
}

impl Exercise {
    pub fn new() -> Self {
        let mut env = ModelEnv::new(RAM_BASE_PFN, RAM_FRAMES);
        let hyp_frame = env.claim_frame(FrameState::Hypervisor).expect("fresh RAM");
        let shared_frame =
            env.claim_frame(FrameState::SharedOwned(VmId::new(1).expect("small id"))).expect("fresh RAM");
        let geo = Geometry::for_pa_bits(40);
        let mut guests = [1u16, 2].map(|n| Guest {
            s2: None,
            vm: VmId::new(n).expect("small id"),
            vmid: n,
            expect: Reference::default(),
        });
        for g in &mut guests {
            let s2 = Stage2::new(&mut env, g.vm, g.vmid, geo).expect("RAM for two roots");
            env.add_root(g.vmid, root_of(&s2), geo.start_level);
            g.s2 = Some(s2);
        }
        Exercise { env, guests, geo, hyp_frame, shared_frame }
    }

    /// Runs the operations `data` encodes, checking as it goes; panics on the first divergence.
    pub fn run(data: &[u8]) {
        if let Err(e) = Self::run_checked(data, Sabotage::None) {
            panic!("stage-2 exercise: {e}");
        }
    }

    /// Runs the operations `data` encodes on a machine model with `sabotage` planted (after
    /// the set-up); the first divergence found, if any.
    pub fn run_checked(data: &[u8], sabotage: Sabotage) -> Result<(), String> {
        let mut ex = Exercise::new();
        ex.env.sabotage = sabotage;
        let mut r = Reader { data };
        for n in 1..=MAX_OPS {
            let Some(op) = r.byte() else { break };
            let Some(touched) = ex.step(op, &mut r)? else { break };
            ex.check_step(touched)?;
            if n % FULL_EVERY == 0 {
                ex.check_full()?;
                ex.check_walkers()?;
            }
        }
        ex.check_full()?;
        ex.finish()
    }

    /// One operation; `None` when the input ran out in the middle of it.
    fn step(&mut self, op: u8, r: &mut Reader<'_>) -> Result<Option<Option<Touched>>, String> {
        let gi = (op >> 7) as usize;
        let page = |p: u64| WINDOW + p * PAGE;
        let range = |r: &mut Reader<'_>| -> Option<(u64, u64)> {
            let start = u64::from(r.u16()?) % WINDOW_PAGES;
            let len = 1 + u64::from(r.u16()?) % (WINDOW_PAGES - start);
            Some((page(start), page(start + len)))
        };
        let touched = match op & 0x0f {
            0..=3 => {
                let Some(p) = r.u16() else { return Ok(None) };
                let ipa = page(u64::from(p) % WINDOW_PAGES);
                self.fault_page(gi, ipa)?;
                Touched::around(gi, ipa, ipa + PAGE, PAGE)
            }
            4 => {
                let Some(b) = r.byte() else { return Ok(None) };
                // Odd bytes take the block fault's fast form first, as the fast trap does.
                let ipa = WINDOW + u64::from(b >> 1) % (WINDOW_PAGES / 512) * level_size(2);
                self.fault_block(gi, ipa, b & 1 != 0)?;
                Touched::around(gi, ipa, ipa + 1, level_size(2))
            }
            5 | 6 => {
                let Some((start, end)) = range(r) else { return Ok(None) };
                self.unmap(gi, start, end)?;
                Touched::around(gi, start, end, level_size(2))
            }
            7 => {
                let Some((start, end)) = range(r) else { return Ok(None) };
                let Some(bits) = r.byte() else { return Ok(None) };
                self.protect(gi, start, end, attrs_from(bits))?;
                Touched::around(gi, start, end, level_size(2))
            }
            8 | 9 => {
                let (Some(p), Some(l)) = (r.u16(), r.byte()) else { return Ok(None) };
                let (ipa, level) = (page(u64::from(p) % WINDOW_PAGES), 1 + (l % 2) as usize);
                let (s2, env) = self.s2(gi);
                // Whether it applies depends on the table shape; translations must not change
                // either way.
                let _ = if op & 0x0f == 8 { s2.split(env, ipa, level) } else { s2.collapse(env, ipa, level) };
                Touched::around(gi, ipa, ipa + 1, level_size(level))
            }
            10 => {
                let (Some(p), Some(which)) = (r.u16(), r.byte()) else { return Ok(None) };
                let ipa = page(u64::from(p) % WINDOW_PAGES);
                self.map_foreign(gi, ipa, which)?;
                Touched::around(gi, ipa, ipa + 1, level_size(2))
            }
            11 => {
                self.teardown_and_recreate(gi)?;
                Touched { gi, start: WINDOW, end: WINDOW_END }
            }
            12 => {
                let Some(b) = r.byte() else { return Ok(None) };
                self.env.fail_tables = b & 1 != 0;
                return Ok(Some(None));
            }
            _ => {
                let Some(p) = r.byte() else { return Ok(None) };
                let ipa = page(u64::from(p) % WINDOW_PAGES);
                self.fault_page(gi, ipa)?;
                Touched::around(gi, ipa, ipa + PAGE, PAGE)
            }
        };
        Ok(Some(Some(touched)))
    }

    fn s2(&mut self, gi: usize) -> (&mut Stage2, &mut ModelEnv) {
        let g = &mut self.guests[gi];
        (g.s2.as_mut().expect("guests always have a space"), &mut self.env)
    }

    fn fault_page(&mut self, gi: usize, ipa: u64) -> Result<(), String> {
        let vm = self.guests[gi].vm;
        let mapped = self.guests[gi].expect.any_in(ipa, ipa + PAGE);
        let Some(pfn) = self.env.claim_frame(FrameState::Guest(vm)) else { return Ok(()) };
        let (s2, env) = self.s2(gi);
        // Page faults take the general path, the demand-fault path, or its claimed-page form.
        let r = match (ipa / PAGE) % 3 {
            0 => s2.map(env, ipa, pfn.phys(), 3, Attrs::RAM),
            1 => s2.map_page(env, ipa, pfn.phys(), Attrs::RAM),
            _ => match s2.cached_page_slot(env, ipa) {
                Some(slot) => slot
                    .fill(env, ClaimedPage::assume(pfn, vm))
                    .map_err(|_| Stage2Error::NotOwned { pfn, state: None }),
                None => s2.map_page(env, ipa, pfn.phys(), Attrs::RAM),
            },
        };
        match r {
            Ok(()) => {
                ensure!(!mapped, "mapped over the live page at {ipa:#x}");
                self.guests[gi].expect.insert(ipa, 1, pfn.phys());
            }
            Err(e) => {
                ensure!(
                    matches!(e, Stage2Error::AlreadyMapped { .. }) && mapped
                        || e == Stage2Error::OutOfMemory && !mapped,
                    "fault at {ipa:#x} (mapped: {mapped}) refused with {e:?}"
                );
                self.env.release_frames(pfn.phys(), PAGE);
            }
        }
        Ok(())
    }

    fn fault_block(&mut self, gi: usize, ipa: u64, fast: bool) -> Result<(), String> {
        let vm = self.guests[gi].vm;
        let any_mapped = self.guests[gi].expect.any_in(ipa, ipa + level_size(2));
        if fast {
            let (s2, env) = self.s2(gi);
            if s2.vacant_block(env, ipa).is_some() {
                ensure!(!any_mapped, "block at {ipa:#x} offered as vacant over live pages");
                // The fast path claims its block only once the entry is known to be vacant.
                let Some(first) = self.env.claim_contiguous(512, 512, FrameState::Guest(vm)) else {
                    return Ok(());
                };
                let (s2, env) = self.s2(gi);
                // Asked again: the claim above needed the environment (the fast path's pool does
                // not); a hit in the cached level-2 table this time.
                let Some(vacant) = s2.vacant_block(env, ipa) else {
                    return Err(format!("block at {ipa:#x} no longer vacant after a claim"));
                };
                // Half the time as the fault path does it: with the claim's proof.
                if (ipa / level_size(2)).is_multiple_of(2) {
                    let r = vacant.map(env, first.phys(), Attrs::RAM);
                    ensure!(r.is_ok(), "an own, whole block refused by a vacant entry: {r:?}");
                } else {
                    let r = vacant.fill(env, ClaimedBlock::assume(first, vm));
                    ensure!(r.is_ok(), "an own claimed block refused by a vacant entry");
                }
                self.guests[gi].expect.insert(ipa, 512, first.phys());
                return Ok(());
            }
            // Declined (something mapped, or no level-2 table yet): the general path follows.
        }
        let Some(first) = self.env.claim_contiguous(512, 512, FrameState::Guest(vm)) else { return Ok(()) };
        let (s2, env) = self.s2(gi);
        match s2.map(env, ipa, first.phys(), 2, Attrs::RAM) {
            Ok(()) => {
                ensure!(!any_mapped, "block mapped over live pages at {ipa:#x}");
                self.guests[gi].expect.insert(ipa, 512, first.phys());
            }
            Err(e) => {
                ensure!(
                    matches!(e, Stage2Error::AlreadyMapped { .. }) && any_mapped
                        || e == Stage2Error::OutOfMemory && !any_mapped,
                    "block fault at {ipa:#x} (pages mapped: {any_mapped}) refused with {e:?}"
                );
                self.env.release_frames(first.phys(), level_size(2));
            }
        }
        Ok(())
    }

    fn unmap(&mut self, gi: usize, ipa: u64, end: u64) -> Result<(), String> {
        let mut released = Vec::new();
        let (s2, env) = self.s2(gi);
        let result = s2.unmap(env, ipa, end - ipa, &mut |pa, size| released.push((pa, size)));
        match result {
            Ok(()) => {
                let mut want = self.guests[gi].expect.remove(ipa, end);
                let (got, want) = (merge_frames(&mut released.clone()), merge_frames(&mut want));
                ensure!(got == want, "unmap {ipa:#x}-{end:#x} released {got:x?}, not {want:x?}");
            }
            Err(e) => {
                ensure!(e == Stage2Error::OutOfMemory, "unmap refused with {e:?}");
                ensure!(released.is_empty(), "a refused unmap released frames");
            }
        }
        for (pa, size) in released {
            self.env.release_frames(pa, size);
        }
        Ok(())
    }

    fn protect(&mut self, gi: usize, ipa: u64, end: u64, attrs: Attrs) -> Result<(), String> {
        let (s2, env) = self.s2(gi);
        match s2.protect(env, ipa, end - ipa, attrs) {
            Ok(()) => self.guests[gi].expect.protect(ipa, end, attrs),
            Err(e) => ensure!(e == Stage2Error::OutOfMemory, "protect refused with {e:?}"),
        }
        Ok(())
    }

    fn map_foreign(&mut self, gi: usize, ipa: u64, which: u8) -> Result<(), String> {
        if which % 4 == 3 {
            return self.map_shared_wrong_side(gi, ipa);
        }
        let other = &self.guests[1 - gi];
        let foreign = match which % 4 {
            0 => other.expect.runs.values().next().map(|r| r.pa),
            1 => Some(self.hyp_frame.phys()),
            _ => self.env.table_of(other.vmid, usize::from(which / 3)).map(|t| t.phys()),
        };
        let Some(pa) = foreign else { return Ok(()) };
        let (s2, env) = self.s2(gi);
        // Neither as RAM nor as shared memory on either side: none of them is shared memory.
        for attrs in [Attrs::RAM, Attrs::SHARED_OWNED, Attrs::SHARED_BORROWED] {
            let r = s2.map(env, ipa, pa, 3, attrs);
            ensure!(matches!(r, Err(Stage2Error::NotOwned { .. })), "mapped a foreign frame {pa:#x}: {r:?}");
        }
        // The block fault's fast form refuses the 2 MiB it heads, too (never this guest's).
        if pa.is_multiple_of(level_size(2)) {
            if let Some(vacant) = s2.vacant_block(env, ipa) {
                let r = vacant.map(env, pa, Attrs::RAM);
                ensure!(
                    matches!(r, Err(Stage2Error::NotOwned { .. })),
                    "mapped a foreign block {pa:#x}: {r:?}"
                );
            }
        }
        Ok(())
    }

    /// The first guest's shared frame, mapped on the side the guest is not on (and as plain
    /// RAM by either): always refused, nothing changes.
    fn map_shared_wrong_side(&mut self, gi: usize, ipa: u64) -> Result<(), String> {
        let pa = self.shared_frame.phys();
        let wrong = if gi == 0 { Attrs::SHARED_BORROWED } else { Attrs::SHARED_OWNED };
        let (s2, env) = self.s2(gi);
        for attrs in [Attrs::RAM, wrong] {
            let r = s2.map(env, ipa, pa, 3, attrs);
            ensure!(
                matches!(r, Err(Stage2Error::NotOwned { .. })),
                "guest {gi} mapped the shared frame {pa:#x} as {attrs:?}: {r:?}"
            );
        }
        Ok(())
    }

    fn teardown_and_recreate(&mut self, gi: usize) -> Result<(), String> {
        let s2 = self.guests[gi].s2.take().expect("live space");
        let (vm, vmid) = (self.guests[gi].vm, self.guests[gi].vmid);
        let mut released = Vec::new();
        let proof = s2.teardown(&mut self.env, &mut |pa, size| released.push((pa, size)));
        let mut want = self.guests[gi].expect.remove(WINDOW, WINDOW_END);
        let (got, want) = (merge_frames(&mut released.clone()), merge_frames(&mut want));
        ensure!(got == want, "teardown released {got:x?}, not {want:x?}");
        for (pa, size) in released {
            self.env.release_frames(pa, size);
        }
        ensure!(proof.vmid() == vmid, "teardown's proof is for VMID {}, not {vmid}", proof.vmid());
        ensure!(self.env.frames_in(FrameState::Guest(vm)) == 0, "guest frames left after teardown");
        ensure!(self.env.frames_in(FrameState::PageTable(vm)) == 0, "table pages left after teardown");
        ensure!(self.env.cached_for(vmid) == 0, "TLB entries left for VMID {vmid}: it cannot be reused");
        self.guests[gi].expect.clear();
        let fail = core::mem::replace(&mut self.env.fail_tables, false);
        let s2 = Stage2::new(&mut self.env, vm, vmid, self.geo).map_err(|e| format!("recreate: {e:?}"))?;
        self.env.fail_tables = fail;
        self.env.add_root(vmid, root_of(&s2), self.geo.start_level);
        self.guests[gi].s2 = Some(s2);
        Ok(())
    }

    /// The machine model's verdict.
    fn check_model(&mut self) -> Result<(), String> {
        self.env.check_quiescent();
        ensure!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        Ok(())
    }

    /// What holds after every operation: the model's verdict, frame and table counts, cached
    /// tables, and the translations of the range the operation touched.
    fn check_step(&mut self, touched: Option<Touched>) -> Result<(), String> {
        self.check_model()?;
        if let Some(t) = touched {
            self.check_range(t)?;
        }
        for g in &self.guests {
            let s2 = g.s2.as_ref().expect("live space");
            ensure!(s2.caches_agree(&self.env), "VM {}: a cached table is not the one a walk finds", g.vmid);
            let tables = self.env.frames_in(FrameState::PageTable(g.vm));
            ensure!(
                tables == s2.table_pages(),
                "VM {}: {tables} table pages, it counts {}",
                g.vmid,
                s2.table_pages()
            );
            // A guest owns exactly the frames it maps: one left over is a leak, one missing was
            // handed out twice.
            let owned = self.env.frames_in(FrameState::Guest(g.vm)) as u64;
            ensure!(
                owned == g.expect.pages,
                "VM {}: owns {owned} frames but maps {}",
                g.vmid,
                g.expect.pages
            );
            // Nothing mapped outside the range checked below.
            let pages = self.env.pages_mapped(g.vmid);
            ensure!(
                pages == g.expect.pages,
                "VM {}: maps {pages} pages, the reference {}",
                g.vmid,
                g.expect.pages
            );
        }
        Ok(())
    }

    /// The touched range, read from table memory, against the reference; its frames; the
    /// table code's walker at its edges.
    fn check_range(&self, t: Touched) -> Result<(), String> {
        let g = &self.guests[t.gi];
        let s2 = g.s2.as_ref().expect("live space");
        let got = table_runs(&self.env, s2, t.start, t.end);
        let want = g.expect.runs_in(t.start, t.end);
        ensure!(
            got == want,
            "VM {}: {:#x}-{:#x} maps {got:x?}, the reference {want:x?}",
            g.vmid,
            t.start,
            t.end
        );
        self.check_frames(t.gi, &got)?;
        for ipa in [t.start, t.end - PAGE] {
            self.check_translate(t.gi, ipa)?;
        }
        Ok(())
    }

    /// Every frame of `runs` is the guest's and mapped once, in all guests together.
    fn check_frames(&self, gi: usize, runs: &[(u64, Run)]) -> Result<(), String> {
        let g = &self.guests[gi];
        for &(ipa, run) in runs {
            let first = Pfn(run.pa >> 12);
            if let Some(pfn) = self.env.first_not_mapped_once(first, run.pages, FrameState::Guest(g.vm)) {
                let at = ipa + (pfn.0 - first.0) * PAGE;
                return Err(format!(
                    "VM {}: IPA {at:#x} maps {pfn}, which is {:?} and mapped {} times: not its own, once",
                    g.vmid,
                    self.env.frame_state(pfn),
                    self.env.leaves_mapping(pfn)
                ));
            }
        }
        Ok(())
    }

    fn check_translate(&self, gi: usize, ipa: u64) -> Result<(), String> {
        let g = &self.guests[gi];
        let got = g.s2.as_ref().expect("live space").translate(&self.env, ipa).map(|m| (m.pa, m.attrs));
        let want = g.expect.get(ipa);
        ensure!(got == want, "VM {}: IPA {ipa:#x} translates to {got:x?}, not {want:x?}", g.vmid);
        Ok(())
    }

    /// Everything: each guest's window, read from table memory, against the reference, with
    /// its frames owned and mapped once, and nothing mapped outside it (the model counts every
    /// page a guest's leaves map).
    fn check_full(&mut self) -> Result<(), String> {
        self.check_model()?;
        for gi in 0..2 {
            self.check_range(Touched { gi, start: WINDOW, end: WINDOW_END })?;
            let g = &self.guests[gi];
            let pages = self.env.pages_mapped(g.vmid);
            ensure!(
                pages == g.expect.pages,
                "VM {}: maps {pages} pages, the reference {}",
                g.vmid,
                g.expect.pages
            );
        }
        Ok(())
    }

    /// The table code's own walkers agree: every leaf it reports against the reference, a
    /// spread of translations, and its list of table pages (each one of the guest's, as many
    /// as it counts).
    fn check_walkers(&self) -> Result<(), String> {
        for gi in 0..2 {
            let g = &self.guests[gi];
            let s2 = g.s2.as_ref().expect("live space");
            let mut got = Vec::new();
            s2.for_each_mapping(&self.env, &mut |m| {
                push_merged(&mut got, m.ipa, Run { pages: m.size / PAGE, pa: m.pa, attrs: m.attrs })
            });
            let want = g.expect.runs_in(0, u64::MAX);
            ensure!(got == want, "VM {}: the walker finds {got:x?}, the reference {want:x?}", g.vmid);
            for page in (0..WINDOW_PAGES).step_by(127) {
                self.check_translate(gi, WINDOW + page * PAGE)?;
            }
        }
        self.check_tables()
    }

    /// The table code's own list of table pages: each one of the guest's, as many as it counts.
    fn check_tables(&self) -> Result<(), String> {
        for g in &self.guests {
            let s2 = g.s2.as_ref().expect("live space");
            let mut tables = 0;
            let mut foreign = None;
            s2.for_each_table(&self.env, &mut |t| {
                if self.env.frame_state(t) != Some(FrameState::PageTable(g.vm)) {
                    foreign = Some(t);
                }
                tables += 1;
            });
            ensure!(foreign.is_none(), "VM {}: table {foreign:?} is not its table page", g.vmid);
            ensure!(
                tables == s2.table_pages(),
                "VM {}: {tables} tables found, it counts {}",
                g.vmid,
                s2.table_pages()
            );
        }
        Ok(())
    }

    /// Tears both guests down; afterwards every frame but the hypervisor's is free.
    fn finish(mut self) -> Result<(), String> {
        for gi in 0..2 {
            let s2 = self.guests[gi].s2.take().expect("live space");
            let mut released = Vec::new();
            let _ = s2.teardown(&mut self.env, &mut |pa, size| released.push((pa, size)));
            for (pa, size) in released {
                self.env.release_frames(pa, size);
            }
        }
        // The shared frame was never mapped: its owner gives it back.
        self.env.release_frames(self.shared_frame.phys(), PAGE);
        ensure!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        let free = self.env.frames_in(FrameState::Free);
        ensure!(free == RAM_FRAMES - 1, "{} frames leaked", RAM_FRAMES - 1 - free);
        Ok(())
    }
}

/// Sorts frame ranges and merges adjacent ones: the same frames, whatever the pieces.
fn merge_frames(ranges: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(pa, size) in ranges.iter() {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == pa => last.1 += size,
            _ => out.push((pa, size)),
        }
    }
    out
}

/// The leaves of `s2` inside `[start, end)`, clipped and merged, read straight from table
/// memory (not through the code under test).
fn table_runs(env: &ModelEnv, s2: &Stage2, start: u64, end: u64) -> Vec<(u64, Run)> {
    fn visit(
        env: &ModelEnv,
        table: Pfn,
        level: usize,
        base: u64,
        range: (u64, u64),
        out: &mut Vec<(u64, Run)>,
    ) {
        let size = level_size(level);
        let first = range.0.saturating_sub(base) / size;
        for idx in first..super::ENTRIES as u64 {
            let eb = base + idx * size;
            if eb >= range.1 {
                break;
            }
            match Entry::decode(env.read(table, idx as usize), level) {
                Entry::Invalid => {}
                Entry::Table(next) => {
                    if level < 3 {
                        visit(env, next, level + 1, eb, range, out);
                    }
                }
                Entry::Leaf { pa, attrs } => {
                    let (a, b) = (eb.max(range.0), (eb + size).min(range.1));
                    push_merged(out, a, Run { pages: (b - a) / PAGE, pa: pa + (a - eb), attrs });
                }
            }
        }
    }
    let mut out = Vec::new();
    visit(env, root_of(s2), s2.geometry().start_level, 0, (start, end), &mut out);
    out
}

fn root_of(s2: &Stage2) -> Pfn {
    Pfn((s2.vttbr() & 0x0000_ffff_ffff_f000) >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fault pages and a block in both guests, split, protect, unmap across the split, collapse,
    /// tear down and recreate one guest.
    const SCRIPT: &[u8] = &[
        0x00, 0x05, 0x00, // VM1 fault page 5
        0x80, 0x05, 0x00, // VM2 fault page 5
        0x04, 0x02, // VM1 fault block 1
        0x04, 0x05, // VM1 fault block 2, fast form
        0x04, 0x07, // VM1 fault block 3, fast form
        0x08, 0x00, 0x02, 0x01, // VM1 split page 512 at level 2
        0x07, 0x10, 0x02, 0x20, 0x00, 0x01, // VM1 protect 528..560 read-only
        0x05, 0x00, 0x02, 0x10, 0x00, // VM1 unmap 512..528
        0x09, 0x00, 0x02, 0x01, // VM1 collapse (must refuse now)
        0x0a, 0x07, 0x00, 0x00, // VM1 map VM2's frame: refused
        0x0a, 0x07, 0x00, 0x01, // VM1 map the hypervisor's frame: refused
        0x0a, 0x07, 0x00, 0x02, // VM1 map VM2's table page: refused
        0x8b, // VM2 teardown and recreate
        0x0c, 0x01, // exhaust table memory
        0x00, 0x00, 0x04, // VM1 fault page 1024: out of memory, nothing changes
    ];

    #[test]
    fn a_scripted_sequence_passes() {
        Exercise::run(SCRIPT);
    }

    #[test]
    fn replays_the_checked_in_corpus_and_regressions() {
        for dir in ["corpus", "regressions"] {
            let dir = format!("{}/fuzz/{dir}/stage2_ops", env!("CARGO_MANIFEST_DIR"));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("readable corpus file");
                if let Err(err) = Exercise::run_checked(&data, Sabotage::None) {
                    panic!("{}: {err}", e.path().display());
                }
            }
        }
    }

    /// Runs `ops` with `bug` planted and expects a finding mentioning `what`.
    fn caught(bug: Sabotage, ops: &[u8], what: &str) {
        let err = Exercise::run_checked(ops, bug).expect_err("the planted bug went unnoticed");
        assert!(err.contains(what), "{bug:?} caught, but as: {err}");
    }

    #[test]
    fn a_broken_break_before_make_is_caught() {
        // VM1 faults page 5, then makes it read-only: the entry changes in place.
        caught(
            Sabotage::DropBreak,
            &[0x00, 0x05, 0x00, 0x07, 0x05, 0x00, 0x00, 0x00, 0x01],
            "break-before-make",
        );
        // Splitting the block VM1 faulted: the block entry becomes a table in place.
        caught(Sabotage::DropBreak, &[0x04, 0x02, 0x08, 0x00, 0x02, 0x01], "break-before-make");
        // An unmap that does not break leaves the page mapped.
        caught(Sabotage::DropBreak, &[0x00, 0x05, 0x00, 0x05, 0x05, 0x00, 0x00, 0x00], "live mapping");
    }

    #[test]
    fn a_missing_tlb_invalidation_is_caught() {
        // VM1 faults pages 5 and 6, then unmaps page 5.
        let unmap = [0x00, 0x05, 0x00, 0x00, 0x06, 0x00, 0x05, 0x05, 0x00, 0x00, 0x00];
        for bug in [Sabotage::DropIpaTlbi, Sabotage::DropStage1Tlbi, Sabotage::DropDsbIsh] {
            caught(bug, &unmap, "machine-model violations");
        }
        // VM2 faults a page, then is torn down without its VMID invalidated.
        caught(Sabotage::DropVmidTlbi, &[0x80, 0x05, 0x00, 0x8b], "TLB entries left");
        // The whole script, each way.
        for bug in
            [Sabotage::DropIpaTlbi, Sabotage::DropStage1Tlbi, Sabotage::DropDsbIsh, Sabotage::DropVmidTlbi]
        {
            assert!(Exercise::run_checked(SCRIPT, bug).is_err(), "{bug:?} went unnoticed");
        }
    }

    #[test]
    fn a_frame_mapped_twice_is_caught() {
        // VM1 faults pages 5 and 6 and is given the same frame for both.
        caught(Sabotage::HandOutTwice, &[0x00, 0x05, 0x00, 0x00, 0x06, 0x00], "mapped 2 times");
        // VM1 then VM2 fault a page and are given the same frame.
        caught(Sabotage::HandOutTwice, &[0x00, 0x05, 0x00, 0x80, 0x06, 0x00], "mapped 2 times");
    }

    #[test]
    fn a_block_split_without_its_frames_is_caught() {
        // VM1 faults a block, then unmaps one page of it.
        caught(Sabotage::KeepBlocksWhole, &[0x04, 0x02, 0x05, 0x00, 0x02, 0x00, 0x00], "one unit");
    }

    #[test]
    fn operations_past_the_bound_are_ignored() {
        // Two faults that catch a frame handed out twice, after `fillers` operations that change
        // nothing (table exhaustion off): found inside the bound, never run past it.
        let ops = |fillers: usize| {
            let mut ops = [0x0c, 0x00].repeat(fillers);
            ops.extend_from_slice(&[0x00, 0x05, 0x00, 0x00, 0x06, 0x00]);
            ops
        };
        assert!(Exercise::run_checked(&ops(MAX_OPS - 2), Sabotage::HandOutTwice).is_err());
        assert!(Exercise::run_checked(&ops(MAX_OPS - 1), Sabotage::HandOutTwice).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn random_sequences_keep_every_invariant(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            Exercise::run(&data);
        }
    }
}
