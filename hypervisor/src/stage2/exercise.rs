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
//!
//! Two vCPUs per guest fault beside all this, a step at a time ([`Vcpu`]): the input starts a
//! fault (a claim, then the fast path's slot or the general path's walk), moves it on by a few
//! accesses to shared table memory (reads, compare-and-swaps), hands a declined claim back, and
//! lets the guest's access re-execute (it stamps the frame behind the IPA), in whatever order it
//! chooses, between other operations and inside structural ones (at their first TLB
//! invalidation, while break-before-make holds entries locked, or at the locking of a table
//! about to be unlinked). While a fault is under way, structural changes take their `_live`
//! forms and unlinked tables wait for every vCPU's quiescent point.
//!
//! The checks and the reference model are exported as `__sanitizer_labyrinth_*` in fuzz builds,
//! as `model.rs` explains: out of the coverage instrumentation. What drives the operations
//! (`step`, the vCPUs' steps, which inline the fault code under test) stays instrumented.

use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::vec::Vec;

use std::collections::BTreeSet;

use crate::frame::{Claimed, ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

use super::desc::is_locked;
use super::fault::{FaultSteps, Progress};
use super::model::{ModelEnv, Sabotage};
use super::{
    level_size, Attrs, Declined, Entry, FaultCache, Geometry, MemType, PageState, Quiescence, Stage2,
    Stage2Env, Stage2Error,
};

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
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_push_merged")]
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_run_at")]
    fn run_at(&self, ipa: u64) -> Option<(u64, Run)> {
        let (&start, &run) = self.runs.range(..=ipa).next_back()?;
        (ipa < start + run.pages * PAGE).then_some((start, run))
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_get")]
    fn get(&self, ipa: u64) -> Option<(u64, Attrs)> {
        self.run_at(ipa).map(|(start, run)| (run.pa + (ipa - start), run.attrs))
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_any_in")]
    fn any_in(&self, start: u64, end: u64) -> bool {
        self.runs.range(..end).next_back().is_some_and(|(&s, r)| s + r.pages * PAGE > start)
    }

    /// Splits the run straddling `at`, if any, so that no run crosses it.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_cut")]
    fn cut(&mut self, at: u64) {
        if let Some((start, run)) = self.run_at(at) {
            if start < at {
                let head = (at - start) / PAGE;
                self.runs.insert(start, Run { pages: head, ..run });
                self.runs.insert(at, Run { pages: run.pages - head, pa: run.pa + head * PAGE, ..run });
            }
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_insert")]
    fn insert(&mut self, ipa: u64, pages: u64, pa: u64) {
        self.insert_with(ipa, pages, pa, Attrs::RAM);
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_insert_with")]
    fn insert_with(&mut self, ipa: u64, pages: u64, pa: u64, attrs: Attrs) {
        self.runs.insert(ipa, Run { pages, pa, attrs });
        self.pages += pages;
    }

    /// Removes `[start, end)`; returns the frames it mapped, as (PA, size).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_remove")]
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

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_protect")]
    fn protect(&mut self, start: u64, end: u64, attrs: Attrs) {
        self.cut(start);
        self.cut(end);
        for (_, run) in self.runs.range_mut(start..end) {
            run.attrs = attrs;
        }
    }

    /// The runs inside `[start, end)`, clipped and merged.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_runs_in")]
    fn runs_in(&self, start: u64, end: u64) -> Vec<(u64, Run)> {
        let mut out = Vec::new();
        let first = self.run_at(start).map_or(start, |(s, _)| s);
        for (&s, &run) in self.runs.range(first..end) {
            let (a, b) = (s.max(start), (s + run.pages * PAGE).min(end));
            push_merged(&mut out, a, Run { pages: (b - a) / PAGE, pa: run.pa + (a - s), attrs: run.attrs });
        }
        out
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Reference_clear")]
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
    vcpus: Vcpus,
}

/// vCPUs per guest that fault a step at a time.
const VCPUS: usize = 2;

/// Where one vCPU's fault is.
enum Phase {
    /// In the guest: no fault under way.
    Idle,
    /// The fast path found the page's slot through its cache (no read); the CAS is next.
    PageSlot {
        entry: (Pfn, usize),
        ipa: u64,
        claim: ClaimedPage,
    },
    /// The same for a block's level-2 slot.
    BlockSlot {
        entry: (Pfn, usize),
        ipa: u64,
        claim: ClaimedBlock,
    },
    /// The general path's install, an access at a time.
    Page(FaultSteps<1>),
    Block(FaultSteps<512>),
    /// Declined: the claim goes back through the atomic path, untouched.
    GiveBack {
        pa: u64,
        size: u64,
        ipa: u64,
    },
    /// The guest's access re-executes: it writes into the frame behind `ipa`, if any (else it
    /// faults again, a new fault).
    Access {
        ipa: u64,
    },
}

impl Phase {
    /// The frames claimed and not mapped yet (the guest owns them, nothing maps them).
    fn claimed(&self) -> u64 {
        match self {
            Phase::PageSlot { .. } => 1,
            Phase::BlockSlot { .. } => 512,
            Phase::Page(_) => 1,
            Phase::Block(_) => 512,
            Phase::GiveBack { size, .. } => size / PAGE,
            Phase::Idle | Phase::Access { .. } => 0,
        }
    }

    /// Table pages taken by an install and neither linked nor given back yet.
    fn tables_held(&self) -> usize {
        match self {
            Phase::Page(f) => f.install().tables_held(),
            Phase::Block(f) => f.install().tables_held(),
            _ => 0,
        }
    }

    /// The region the fault is in (for the checks of what a step touched).
    fn region(&self) -> Option<(u64, u64)> {
        match self {
            Phase::Idle => None,
            Phase::PageSlot { ipa, .. } | Phase::Access { ipa } => Some((*ipa, PAGE)),
            Phase::BlockSlot { ipa, .. } => Some((*ipa, level_size(2))),
            Phase::Page(f) => Some((f.install().target().0, PAGE)),
            Phase::Block(f) => Some((f.install().target().0, level_size(2))),
            Phase::GiveBack { ipa, size, .. } => Some((*ipa, (*size).max(PAGE))),
        }
    }
}

/// A fault that mapped its claim: the reference follows.
#[derive(Clone, Copy, Debug)]
struct Installed {
    ipa: u64,
    pa: u64,
    pages: u64,
}

/// One guest's stepping vCPUs: their caches and faults, their quiescent points, the frames
/// their accesses wrote into, and the installs the reference has not taken in yet.
struct Vcpus {
    caches: [FaultCache; VCPUS],
    /// The cache of the single-operation faults through the vCPU forms (`map_cached`,
    /// `fault_block`).
    general: FaultCache,
    phases: [Phase; VCPUS],
    /// Whether each vCPU wrote table memory it has not published with a `DSB` yet (a fault
    /// publishes before it returns to the guest).
    unpublished: [bool; VCPUS],
    quiescence: Quiescence<VCPUS>,
    stamped: BTreeSet<u64>,
    installed: Vec<Installed>,
    /// A race planted in the next structural change of this guest.
    armed: Option<Armed>,
    /// Faults that lost a race or met a held entry (handed their claim back to retry), and of
    /// those the ones that met a held entry.
    retried: usize,
    held: usize,
    /// Whether a vCPU ever faulted here (empty tables may be left linked since).
    started: bool,
}

impl Vcpus {
    fn new() -> Vcpus {
        Vcpus {
            caches: [FaultCache::new(); VCPUS],
            general: FaultCache::new(),
            phases: [const { Phase::Idle }; VCPUS],
            unpublished: [false; VCPUS],
            quiescence: Quiescence::new(),
            stamped: BTreeSet::new(),
            installed: Vec::new(),
            armed: None,
            retried: 0,
            held: 0,
            started: false,
        }
    }

    /// The vCPUs start running in (a new) space `s2`; their caches stay (a cache from an old
    /// space must never match the new one).
    fn online(&mut self, s2: &Stage2) {
        self.quiescence = Quiescence::new();
        for v in 0..VCPUS {
            self.quiescence.online(v, s2);
        }
    }

    /// Frames claimed by faults under way and not mapped.
    fn claimed(&self) -> u64 {
        self.phases.iter().map(Phase::claimed).sum()
    }

    /// Table pages taken by installs under way and not linked yet.
    fn tables_held(&self) -> usize {
        self.phases.iter().map(Phase::tables_held).sum()
    }

    /// Frees the table pages unlinked before every vCPU's last quiescent point (the idle ones,
    /// in the guest, pass one now).
    fn drain(&mut self, s2: &Stage2, env: &mut ModelEnv) {
        if s2.retired_pages() == 0 {
            return;
        }
        for v in 0..VCPUS {
            if matches!(self.phases[v], Phase::Idle) {
                self.quiescence.pass(v, s2);
            }
        }
        s2.drain_retired(env, self.quiescence.oldest());
    }

    fn busy(&self) -> bool {
        self.phases.iter().any(|p| !matches!(p, Phase::Idle))
    }

    /// Whether a guest access wrote into any frame of `[pa, pa + size)`.
    fn stamped_in(&self, pa: u64, size: u64) -> bool {
        self.stamped.range(pa >> 12..(pa + size) >> 12).next().is_some()
    }

    /// The frames left the guest: what was written in them goes with them.
    fn forget_stamps(&mut self, pa: u64, size: u64) {
        if self.stamped.is_empty() {
            return;
        }
        let gone: Vec<u64> = self.stamped.range(pa >> 12..(pa + size) >> 12).copied().collect();
        for f in gone {
            self.stamped.remove(&f);
        }
    }

    /// Moves vCPU `v`'s fault on by one step, on its own CPU.
    fn step(&mut self, v: usize, s2: &Stage2, env: &mut ModelEnv) -> Result<(), String> {
        let others = env.switch_cpu(self.unpublished[v]);
        let r = self.step_on_cpu(v, s2, env);
        self.unpublished[v] = env.switch_cpu(others);
        r?;
        if matches!(self.phases[v], Phase::Access { .. }) {
            // The fault is over: its writes must be visible to walkers before the access.
            ensure!(!self.unpublished[v], "vCPU {v}'s fault returned with table writes not published");
        }
        Ok(())
    }

    fn step_on_cpu(&mut self, v: usize, s2: &Stage2, env: &mut ModelEnv) -> Result<(), String> {
        let phase = core::mem::replace(&mut self.phases[v], Phase::Idle);
        self.phases[v] = match phase {
            Phase::Idle => Phase::Idle,
            Phase::PageSlot { entry, ipa, claim } => {
                let before = env.read(entry.0, entry.1);
                let pa = claim.pfn().phys();
                let r = s2.page_slot_at(entry).install(env, claim);
                self.cas_outcome(env, entry, before, ipa, pa, r)?
            }
            Phase::BlockSlot { entry, ipa, claim } => {
                let before = env.read(entry.0, entry.1);
                let pa = claim.pfn().phys();
                let r = s2.block_slot_at(entry, ipa).install(env, claim);
                self.cas_outcome(env, entry, before, ipa, pa, r)?
            }
            Phase::Page(f) => self.fault_step(v, s2, env, f, Phase::Page)?,
            Phase::Block(f) => self.fault_step(v, s2, env, f, Phase::Block)?,
            Phase::GiveBack { pa, size, ipa } => {
                // Untouched: no access wrote into it, nothing maps it, and it is still only the
                // claim's (the guest's, not yet anyone else's); then back, no TLB holding it.
                ensure!(
                    !self.stamped_in(pa, size),
                    "a claim handed back at {pa:#x} was written by the guest"
                );
                let first = Pfn(pa >> 12);
                if let Some(f) = env.first_not_unmapped(first, size / PAGE, FrameState::Guest(s2.vm())) {
                    return Err(format!(
                        "a claim handed back holds {f}, which is {:?} and mapped {} times",
                        env.frame_state(f),
                        env.leaves_mapping(f)
                    ));
                }
                env.release_frames(pa, size);
                Phase::Access { ipa }
            }
            Phase::Access { ipa } => {
                if let Some(pa) = walk_pa(env, s2, ipa) {
                    self.stamped.insert(pa >> 12);
                }
                self.quiescence.pass(v, s2);
                Phase::Idle
            }
        };
        Ok(())
    }

    /// After a fast path's CAS on `entry`, which held `before`: a mapped claim is installed, a
    /// declined one goes back. An entry held by a structural change (or mapped) is never
    /// written: the fault retries.
    fn cas_outcome<const N: usize>(
        &mut self,
        env: &ModelEnv,
        entry: (Pfn, usize),
        before: u64,
        ipa: u64,
        pa: u64,
        r: Result<(), Declined<Claimed<N>>>,
    ) -> Result<Phase, String> {
        let after = env.read(entry.0, entry.1);
        if before != 0 {
            ensure!(
                after == before && r.is_err(),
                "a fault's CAS at {ipa:#x} on an entry holding {before:#x} left {after:#x} ({:?})",
                r.as_ref().map_err(|d| matches!(d, Declined::Retry(_)))
            );
        }
        if is_locked(before) {
            ensure!(
                matches!(r, Err(Declined::Retry(_))),
                "a fault meeting a held entry at {ipa:#x} did not retry"
            );
            self.held += 1;
        }
        self.retried += usize::from(matches!(r, Err(Declined::Retry(_))));
        self.outcome(ipa, pa, N as u64, r.map_err(Declined::into_claim).map_err(|c| c.pfn()))
    }

    /// One step of a general fault; `wrap` puts it back into its phase while it goes on.
    fn fault_step<const N: usize>(
        &mut self,
        v: usize,
        s2: &Stage2,
        env: &mut ModelEnv,
        f: FaultSteps<N>,
        wrap: fn(FaultSteps<N>) -> Phase,
    ) -> Result<Phase, String> {
        let entry = f.install().next_entry();
        let before = env.read(entry.0, entry.1);
        let (ipa, pa) = (f.install().target().0, f.claim().pfn().phys());
        match f.step(s2, env, &mut self.caches[v]) {
            Progress::Pending(f) => {
                ensure!(!is_locked(before), "a fault went on past a held entry at {ipa:#x}");
                Ok(wrap(f))
            }
            Progress::Done(r) => {
                if is_locked(before) {
                    let after = env.read(entry.0, entry.1);
                    ensure!(
                        after == before && matches!(r, Err(Declined::Retry(_))),
                        "a fault meeting a held entry at {ipa:#x} did not retry, or wrote {after:#x}"
                    );
                    self.held += 1;
                }
                self.retried += usize::from(matches!(r, Err(Declined::Retry(_))));
                self.outcome(ipa, pa, N as u64, r.map_err(Declined::into_claim).map_err(|c| c.pfn()))
            }
        }
    }

    /// A fault's end: mapped (the reference takes it in) or declined (the claim goes back).
    fn outcome(&mut self, ipa: u64, pa: u64, pages: u64, r: Result<(), Pfn>) -> Result<Phase, String> {
        match r {
            Ok(()) => {
                ensure!(
                    !self.stamped_in(pa, pages * PAGE),
                    "a fresh claim at {pa:#x} mapped with data in it"
                );
                self.installed.push(Installed { ipa, pa, pages });
                Ok(Phase::Access { ipa })
            }
            Err(first) => Ok(Phase::GiveBack { pa: first.phys(), size: pages * PAGE, ipa }),
        }
    }

    /// Runs every vCPU's fault to its end (they leave the fault path: a teardown, the end).
    fn settle(&mut self, s2: &Stage2, env: &mut ModelEnv) -> Result<(), String> {
        for v in 0..VCPUS {
            // An install takes at most a read and a CAS per level, then the hand-back and the access.
            for _ in 0..16 {
                if matches!(self.phases[v], Phase::Idle) {
                    break;
                }
                self.step(v, s2, env)?;
            }
            ensure!(matches!(self.phases[v], Phase::Idle), "vCPU {v}'s fault did not end");
        }
        Ok(())
    }
}

/// What the guest's access to `ipa` reaches now, walking the tables in memory (not through
/// the code under test); between operations no TLB holds anything else.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_walk_pa")]
fn walk_pa(env: &ModelEnv, s2: &Stage2, ipa: u64) -> Option<u64> {
    walk_leaf(env, s2, ipa).map(|(pa, _)| pa)
}

/// Whether the entry a walk to `ipa` finds at `level` is a table.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_walk_table")]
fn walk_table(env: &ModelEnv, s2: &Stage2, ipa: u64, level: usize) -> bool {
    let (mut table, mut at) = (root_of(s2), s2.geometry().start_level);
    loop {
        let idx = ((ipa >> (12 + 9 * (3 - at))) & 511) as usize;
        match Entry::decode(env.read(table, idx), at) {
            Entry::Table(_) if at == level => return true,
            Entry::Table(next) if at < 3 => {
                table = next;
                at += 1;
            }
            _ => return false,
        }
    }
}

/// The frame and attributes [`walk_pa`] finds.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_walk_leaf")]
fn walk_leaf(env: &ModelEnv, s2: &Stage2, ipa: u64) -> Option<(u64, Attrs)> {
    let (mut table, mut level) = (root_of(s2), s2.geometry().start_level);
    loop {
        let idx = ((ipa >> (12 + 9 * (3 - level))) & 511) as usize;
        match Entry::decode(env.read(table, idx), level) {
            Entry::Table(next) if level < 3 => {
                table = next;
                level += 1;
            }
            Entry::Leaf { pa, attrs } => {
                return Some((pa + (ipa & (level_size(level) - 1) & !(PAGE - 1)), attrs))
            }
            _ => return None,
        }
    }
}

/// When a race planted in a structural change runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// At the first TLB invalidation: break-before-make holds its entries locked.
    FirstTlbi,
    /// At the second (a later batch, or the change after an edge's split).
    SecondTlbi,
    /// At the first compare-and-swap locking an empty table before it leaves the tree.
    LockingCas,
}

/// vCPU `vcpu` takes `steps` steps when `at` comes, in the middle of the next structural change.
#[derive(Clone, Copy, Debug)]
struct Armed {
    at: Trigger,
    vcpu: usize,
    steps: usize,
}

/// The model, with a guest's vCPUs stepping at a planted point of a structural change.
struct Racing<'a> {
    env: &'a mut ModelEnv,
    s2: &'a Stage2,
    vcpus: &'a mut Vcpus,
    plan: Option<Armed>,
    tlbis: usize,
    error: Option<String>,
}

impl Racing<'_> {
    fn fire(&mut self, at: Trigger) {
        let Some(plan) = self.plan.filter(|p| p.at == at) else { return };
        self.plan = None;
        for _ in 0..plan.steps {
            if let Err(e) = self.vcpus.step(plan.vcpu, self.s2, self.env) {
                self.error.get_or_insert(e);
                return;
            }
        }
    }

    fn tlbi(&mut self) {
        self.tlbis += 1;
        self.fire(if self.tlbis == 1 { Trigger::FirstTlbi } else { Trigger::SecondTlbi });
    }
}

impl Stage2Env for Racing<'_> {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.env.read(table, index)
    }
    fn read_run(&self, table: Pfn, index: usize, out: &mut [u64]) {
        self.env.read_run(table, index, out)
    }
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        self.env.write(table, index, value)
    }
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        if new == super::LOCKED {
            self.fire(Trigger::LockingCas);
        }
        self.env.cas(table, index, old, new)
    }
    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        self.env.take_tables(vm, out)
    }
    fn free_table(&mut self, vm: VmId, table: Pfn) {
        self.env.free_table(vm, table)
    }
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        self.env.return_unused_table(vm, table)
    }
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.env.frame_state(pfn)
    }
    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        self.env.frame_unit(pfn)
    }
    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        self.env.split_frames(vm, head)
    }
    fn dsb_ishst(&mut self) {
        self.env.dsb_ishst()
    }
    fn dsb_ish(&mut self) {
        self.env.dsb_ish()
    }
    fn isb(&mut self) {
        self.env.isb()
    }
    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, level: usize) {
        self.env.tlbi_ipas2e1is(vmid, ipa, level);
        self.tlbi();
    }
    fn tlbi_vmalle1is(&mut self, vmid: u16) {
        self.env.tlbi_vmalle1is(vmid)
    }
    fn tlbi_vmalls12e1is(&mut self, vmid: u16) {
        self.env.tlbi_vmalls12e1is(vmid);
        self.tlbi();
    }
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
            vcpus: Vcpus::new(),
        });
        for g in &mut guests {
            let s2 = Stage2::new(&mut env, g.vm, g.vmid, geo).expect("RAM for two roots");
            env.add_root(g.vmid, root_of(&s2), geo.start_level);
            g.vcpus.online(&s2);
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
        Self::run_counting(data, sabotage).map(|_| ())
    }

    /// [`Exercise::run_checked`], also counting the vCPUs' faults that retried, and of those
    /// the ones that met an entry held by a structural change.
    pub fn run_counting(data: &[u8], sabotage: Sabotage) -> Result<(usize, usize), String> {
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
                // Whether it applies depends on the table shape; translations must not change
                // either way.
                let split = op & 0x0f == 8;
                if self.is_live(gi) {
                    let (_, during) = self.live(gi, |s2, env| {
                        if split {
                            s2.split_live(env, ipa, level)
                        } else {
                            s2.collapse_live(env, ipa, level)
                        }
                    })?;
                    let g = &mut self.guests[gi];
                    for d in &during {
                        g.expect.insert(d.ipa, d.pages, d.pa);
                    }
                    if !during.is_empty() {
                        return Ok(Some(Some(Touched { gi, start: WINDOW, end: WINDOW_END })));
                    }
                } else {
                    let (s2, env) = self.s2(gi);
                    let _ = if split { s2.split(env, ipa, level) } else { s2.collapse(env, ipa, level) };
                }
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
            13 => {
                let (Some(b), Some(p)) = (r.byte(), r.u16()) else { return Ok(None) };
                let ipa = page(u64::from(p) % WINDOW_PAGES);
                let Some((start, size)) = self.begin(gi, usize::from(b & 1), ipa, b & 2 != 0, b & 4 != 0)
                else {
                    return Ok(Some(None));
                };
                Touched::around(gi, start, start + size, size)
            }
            14 => {
                let Some(b) = r.byte() else { return Ok(None) };
                match self.advance(gi, usize::from(b & 1), 1 + usize::from(b >> 1 & 7))? {
                    Some((start, size)) => Touched::around(gi, start, start + size, size),
                    None => return Ok(Some(None)),
                }
            }
            _ => {
                let Some(b) = r.byte() else { return Ok(None) };
                let at = match b >> 1 & 3 {
                    1 => Trigger::SecondTlbi,
                    2 => Trigger::LockingCas,
                    _ => Trigger::FirstTlbi,
                };
                let armed = Armed { at, vcpu: usize::from(b & 1), steps: 1 + usize::from(b >> 3 & 7) };
                self.guests[gi].vcpus.armed = Some(armed);
                return Ok(Some(None));
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
        let g = &mut self.guests[gi];
        let (s2, env) = (g.s2.as_mut().expect("live space"), &mut self.env);
        // Page faults take the general path, the demand-fault path, its claimed-page form, or the
        // vCPU fault path's general form (a map by frame number through a vCPU's cache).
        let r = match (ipa / PAGE) % 4 {
            0 => s2.map(env, ipa, pfn.phys(), 3, Attrs::RAM),
            3 => s2.map_cached(env, &mut g.vcpus.general, ipa, pfn.phys(), 3, Attrs::RAM),
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
        let g = &mut self.guests[gi];
        let (s2, env) = (g.s2.as_ref().expect("live space"), &mut self.env);
        // Half the time the vCPU fault path's general block form, with the claim's proof.
        let r = if (ipa / level_size(2)).is_multiple_of(2) {
            s2.map(env, ipa, first.phys(), 2, Attrs::RAM)
        } else {
            let claim = ClaimedBlock::assume(first, vm);
            s2.fault_block(env, &mut g.vcpus.general, ipa, claim).map_err(|d| match d {
                Declined::Refused(_, e) => e,
                // Another block there, or a held entry (none between operations).
                Declined::Retry(_) => Stage2Error::AlreadyMapped { ipa },
            })
        };
        match r {
            Ok(()) => {
                ensure!(!any_mapped, "block mapped over live pages at {ipa:#x}");
                self.guests[gi].expect.insert(ipa, 512, first.phys());
            }
            Err(e) => {
                // An empty level-3 table left by a vCPU's fault (linked, then the race lost or
                // the page unmapped) refuses a block as pages would.
                let g = &self.guests[gi];
                let pages_or_table = any_mapped
                    || g.vcpus.started && walk_table(&self.env, g.s2.as_ref().expect("live space"), ipa, 2);
                ensure!(
                    matches!(e, Stage2Error::AlreadyMapped { .. }) && pages_or_table
                        || e == Stage2Error::OutOfMemory && !any_mapped,
                    "block fault at {ipa:#x} (pages mapped: {any_mapped}) refused with {e:?}"
                );
                self.env.release_frames(first.phys(), level_size(2));
            }
        }
        Ok(())
    }

    /// Whether a structural change of guest `gi` must take its `_live` form: a fault is under
    /// way, or a race is planted in it.
    fn is_live(&self, gi: usize) -> bool {
        let v = &self.guests[gi].vcpus;
        v.busy() || v.armed.is_some()
    }

    /// Runs a `_live` structural change of guest `gi` beside its vCPUs, the planted race (if
    /// any) firing inside it; then frees what no vCPU can still hold. The installs made meanwhile
    /// are returned for the caller to reconcile with the change.
    fn live<R>(
        &mut self,
        gi: usize,
        op: impl FnOnce(&Stage2, &mut Racing<'_>) -> R,
    ) -> Result<(R, Vec<Installed>), String> {
        self.apply_installed_to(gi)?;
        let g = &mut self.guests[gi];
        let s2 = g.s2.as_ref().expect("live space");
        let plan = g.vcpus.armed.take();
        let mut racing = Racing { env: &mut self.env, s2, vcpus: &mut g.vcpus, plan, tlbis: 0, error: None };
        let r = op(s2, &mut racing);
        if let Some(e) = racing.error {
            return Err(e);
        }
        let during = core::mem::take(&mut g.vcpus.installed);
        g.vcpus.drain(s2, &mut self.env);
        Ok((r, during))
    }

    /// Takes the installs the vCPUs made into guest `gi`'s reference.
    fn apply_installed_to(&mut self, gi: usize) -> Result<(), String> {
        let g = &mut self.guests[gi];
        for d in core::mem::take(&mut g.vcpus.installed) {
            ensure!(
                !g.expect.any_in(d.ipa, d.ipa + d.pages * PAGE),
                "VM {}: a vCPU's fault mapped {:#x} over a live mapping",
                g.vmid,
                d.ipa
            );
            g.expect.insert(d.ipa, d.pages, d.pa);
        }
        Ok(())
    }

    /// vCPU `v` of guest `gi` faults at `ipa` (a page, or the block around it): claims, then
    /// finds its slot through its cache (`fast`, if the cache covers it) or starts the walk.
    /// The region it is in; `None` if it is busy already or no frame is left.
    fn begin(&mut self, gi: usize, v: usize, ipa: u64, block: bool, fast: bool) -> Option<(u64, u64)> {
        let g = &mut self.guests[gi];
        if !matches!(g.vcpus.phases[v], Phase::Idle) {
            return None;
        }
        let (vm, s2) = (g.vm, g.s2.as_ref().expect("live space"));
        // A fault is a quiescent point: the vCPU holds no table pointer when it traps.
        g.vcpus.quiescence.pass(v, s2);
        g.vcpus.started = true;
        let cache = &g.vcpus.caches[v];
        let phase = if block {
            let ipa = ipa & !(level_size(2) - 1);
            let first = self.env.claim_contiguous(512, 512, FrameState::Guest(vm))?;
            let claim = ClaimedBlock::assume(first, vm);
            match s2.block_slot(cache, ipa).filter(|_| fast) {
                Some(slot) => Phase::BlockSlot { entry: slot.entry(), ipa, claim },
                None => match s2.begin_fault(ipa, claim) {
                    Ok(f) => Phase::Block(f),
                    Err(d) => Phase::GiveBack { pa: d.into_claim().pfn().phys(), size: level_size(2), ipa },
                },
            }
        } else {
            let claim = ClaimedPage::assume(self.env.claim_frame(FrameState::Guest(vm))?, vm);
            match s2.page_slot(cache, ipa).filter(|_| fast) {
                Some(slot) => Phase::PageSlot { entry: slot.entry(), ipa, claim },
                None => match s2.begin_fault(ipa, claim) {
                    Ok(f) => Phase::Page(f),
                    Err(d) => Phase::GiveBack { pa: d.into_claim().pfn().phys(), size: PAGE, ipa },
                },
            }
        };
        let region = phase.region();
        g.vcpus.phases[v] = phase;
        region
    }

    /// vCPU `v` of guest `gi` takes up to `steps` steps; the region its fault is in.
    fn advance(&mut self, gi: usize, v: usize, steps: usize) -> Result<Option<(u64, u64)>, String> {
        let g = &mut self.guests[gi];
        let region = g.vcpus.phases[v].region();
        let s2 = g.s2.as_ref().expect("live space");
        for _ in 0..steps {
            g.vcpus.step(v, s2, &mut self.env)?;
        }
        g.vcpus.drain(s2, &mut self.env);
        self.apply_installed_to(gi)?;
        Ok(region)
    }

    fn unmap(&mut self, gi: usize, ipa: u64, end: u64) -> Result<(), String> {
        let mut released = Vec::new();
        let (result, during) = if self.is_live(gi) {
            self.live(gi, |s2, env| {
                s2.unmap_live(env, ipa, end - ipa, &mut |pa, size| released.push((pa, size)))
            })?
        } else {
            let (s2, env) = self.s2(gi);
            (s2.unmap(env, ipa, end - ipa, &mut |pa, size| released.push((pa, size))), Vec::new())
        };
        // A vCPU's install during the unmap came before its entry was locked (unmapped with
        // it, reported) or after (still mapped).
        let mut kept = Vec::new();
        let mut gone = Vec::new();
        for d in during {
            match released.iter().position(|&r| r == (d.pa, d.pages * PAGE)) {
                Some(k) => gone.push(released.swap_remove(k)),
                None => kept.push(d),
            }
        }
        match result {
            Ok(()) => {
                let mut want = self.guests[gi].expect.remove(ipa, end);
                let (got, want) = (merge_frames(&mut released.clone()), merge_frames(&mut want));
                ensure!(got == want, "unmap {ipa:#x}-{end:#x} released {got:x?}, not {want:x?}");
            }
            Err(e) => {
                ensure!(e == Stage2Error::OutOfMemory, "unmap refused with {e:?}");
                ensure!(released.is_empty() && gone.is_empty(), "a refused unmap released frames");
            }
        }
        let g = &mut self.guests[gi];
        for d in kept {
            g.expect.insert(d.ipa, d.pages, d.pa);
        }
        for (pa, size) in released.into_iter().chain(gone) {
            g.vcpus.forget_stamps(pa, size);
            self.env.release_frames(pa, size);
        }
        Ok(())
    }

    fn protect(&mut self, gi: usize, ipa: u64, end: u64, attrs: Attrs) -> Result<(), String> {
        let (result, during) = if self.is_live(gi) {
            self.live(gi, |s2, env| s2.protect_live(env, ipa, end - ipa, attrs))?
        } else {
            let (s2, env) = self.s2(gi);
            (s2.protect(env, ipa, end - ipa, attrs), Vec::new())
        };
        match result {
            Ok(()) => self.guests[gi].expect.protect(ipa, end, attrs),
            Err(e) => ensure!(e == Stage2Error::OutOfMemory, "protect refused with {e:?}"),
        }
        // A vCPU's install during the change came before it (and took the new attributes, if
        // inside the range) or after (and kept its own).
        let g = &mut self.guests[gi];
        for d in during {
            let s2 = g.s2.as_ref().expect("live space");
            let now = walk_leaf(&self.env, s2, d.ipa).map_or(Attrs::RAM, |(_, a)| a);
            let inside = ipa <= d.ipa && d.ipa + d.pages * PAGE <= end && result.is_ok();
            g.expect.insert_with(
                d.ipa,
                d.pages,
                d.pa,
                if inside && now == attrs { attrs } else { Attrs::RAM },
            );
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
        self.settle(gi)?;
        let s2 = self.guests[gi].s2.take().expect("live space");
        let (vm, vmid) = (self.guests[gi].vm, self.guests[gi].vmid);
        let mut released = Vec::new();
        let proof = s2.teardown(&mut self.env, &mut |pa, size| released.push((pa, size)));
        let mut want = self.guests[gi].expect.remove(WINDOW, WINDOW_END);
        let (got, want) = (merge_frames(&mut released.clone()), merge_frames(&mut want));
        ensure!(got == want, "teardown released {got:x?}, not {want:x?}");
        // Everything goes: released as merged runs (a frame reported twice stays twice).
        for (pa, size) in got {
            self.guests[gi].vcpus.forget_stamps(pa, size);
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
        self.guests[gi].vcpus.online(&s2);
        self.guests[gi].s2 = Some(s2);
        Ok(())
    }

    /// Runs guest `gi`'s faults under way to their end, takes their installs in and frees
    /// every retired table page (every vCPU leaves the fault path).
    fn settle(&mut self, gi: usize) -> Result<(), String> {
        let g = &mut self.guests[gi];
        let s2 = g.s2.as_ref().expect("live space");
        g.vcpus.settle(s2, &mut self.env)?;
        g.vcpus.armed = None;
        g.vcpus.drain(s2, &mut self.env);
        ensure!(s2.retired_pages() == 0, "VM {}: table pages still retired with every vCPU idle", g.vmid);
        self.apply_installed_to(gi)
    }

    /// The machine model's verdict.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_model", inline(never))]
    fn check_model(&mut self) -> Result<(), String> {
        self.env.check_quiescent();
        ensure!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        Ok(())
    }

    /// What holds after every operation: the model's verdict, frame and table counts, cached
    /// tables, and the translations of the range the operation touched.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_step", inline(never))]
    fn check_step(&mut self, touched: Option<Touched>) -> Result<(), String> {
        self.check_model()?;
        if let Some(t) = touched {
            self.check_range(t)?;
        }
        for g in &self.guests {
            let s2 = g.s2.as_ref().expect("live space");
            ensure!(s2.caches_agree(&self.env), "VM {}: a cached table is not the one a walk finds", g.vmid);
            ensure!(
                g.vcpus.general.agrees(s2, &self.env),
                "VM {}: a vCPU cache is not the one a walk finds",
                g.vmid
            );
            for (v, cache) in g.vcpus.caches.iter().enumerate() {
                ensure!(
                    cache.agrees(s2, &self.env),
                    "VM {}: vCPU {v}'s cached table is not the one a walk finds",
                    g.vmid
                );
            }
            // Table pages: in the tree, retired (waiting for quiescent points), or taken by an
            // install under way.
            let tables = self.env.frames_in(FrameState::PageTable(g.vm));
            let (held, retired) = (g.vcpus.tables_held(), s2.retired_pages());
            ensure!(
                tables == s2.table_pages() + retired + held,
                "VM {}: {tables} table pages, it counts {} (+{retired} retired, +{held} held by faults)",
                g.vmid,
                s2.table_pages()
            );
            // A guest owns exactly the frames it maps and those its faults claimed: one left
            // over is a leak, one missing was handed out twice.
            let owned = self.env.frames_in(FrameState::Guest(g.vm)) as u64;
            let claimed = g.vcpus.claimed();
            ensure!(
                owned == g.expect.pages + claimed,
                "VM {}: owns {owned} frames but maps {} (+{claimed} claimed by faults under way)",
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_range")]
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_frames")]
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

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_translate")]
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_full", inline(never))]
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_walkers", inline(never))]
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
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_check_tables")]
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

    /// Tears both guests down; afterwards every frame but the hypervisor's is free. Returns the
    /// faults that retried and those that met a held entry.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_Exercise_finish", inline(never))]
    fn finish(mut self) -> Result<(usize, usize), String> {
        if self.guests.iter().any(|g| g.vcpus.busy()) {
            for gi in 0..2 {
                self.settle(gi)?;
            }
            self.check_full()?;
        }
        for gi in 0..2 {
            let s2 = self.guests[gi].s2.take().expect("live space");
            // Runs merged as they come (frames are handed out in runs, up or down): fewer to sort.
            let mut released: Vec<(u64, u64)> = Vec::new();
            let _ = s2.teardown(&mut self.env, &mut |pa, size| match released.last_mut() {
                Some(last) if last.0 + last.1 == pa => last.1 += size,
                Some(last) if pa + size == last.0 => *last = (pa, last.1 + size),
                _ => released.push((pa, size)),
            });
            for (pa, size) in merge_frames(&mut released) {
                self.env.release_frames(pa, size);
            }
        }
        // The shared frame was never mapped: its owner gives it back.
        self.env.release_frames(self.shared_frame.phys(), PAGE);
        ensure!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        let free = self.env.frames_in(FrameState::Free);
        ensure!(free == RAM_FRAMES - 1, "{} frames leaked", RAM_FRAMES - 1 - free);
        let count = |f: fn(&Vcpus) -> usize| self.guests.iter().map(|g| f(&g.vcpus)).sum();
        Ok((count(|v| v.retried), count(|v| v.held)))
    }
}

/// Sorts frame ranges and merges adjacent ones: the same frames, whatever the pieces.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_merge_frames")]
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
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_table_runs")]
fn table_runs(env: &ModelEnv, s2: &Stage2, start: u64, end: u64) -> Vec<(u64, Run)> {
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2check_fn_visit")]
    fn visit(
        env: &ModelEnv,
        table: Pfn,
        level: usize,
        base: u64,
        range: (u64, u64),
        out: &mut Vec<(u64, Run)>,
    ) {
        let Some(entries) = env.table_entries(table) else { return };
        let size = level_size(level);
        let first = (range.0.saturating_sub(base) / size) as usize;
        let end = (range.1.saturating_sub(base).div_ceil(size) as usize).min(super::ENTRIES);
        // Runs of 8 invalid entries are skipped at once (most of a sparse table).
        let mut idx = first;
        while idx < end {
            if idx.is_multiple_of(8)
                && idx + 8 <= end
                && entries[idx..idx + 8].iter().fold(0, |a, e| a | e) & 1 == 0
            {
                idx += 8;
                continue;
            }
            let eb = base + idx as u64 * size;
            match Entry::decode(entries[idx], level) {
                Entry::Invalid => {}
                Entry::Table(next) => {
                    if level < 3 {
                        visit(env, next, level + 1, eb, range, out);
                    }
                }
                Entry::Leaf { pa, attrs } => {
                    // Page entries that continue this one (the same bits, the next frame) join
                    // it here, in one compare each, before the merge.
                    let mut last = idx;
                    if level == 3 {
                        while last + 1 < end && entries[last + 1] == entries[last].wrapping_add(PAGE) {
                            last += 1;
                        }
                    }
                    let (a, b) = (eb.max(range.0), (base + (last as u64 + 1) * size).min(range.1));
                    push_merged(out, a, Run { pages: (b - a) / PAGE, pa: pa + (a - eb), attrs });
                    idx = last;
                }
            }
            idx += 1;
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

    /// Two vCPUs fault on the same page (VM1, page 6, tables there from page 5): each walks
    /// (four reads), then vCPU 0's CAS wins and vCPU 1's loses; the loser hands its frame back
    /// and both accesses re-execute.
    const RACE: &[u8] = &[
        0x00, 0x05, 0x00, // VM1 maps page 5
        0x0d, 0x00, 0x06, 0x00, // vCPU 0 starts a fault at page 6 (general path)
        0x0d, 0x01, 0x06, 0x00, // vCPU 1 too
        0x0e, 0x06, // vCPU 0: 4 steps (the walk's reads)
        0x0e, 0x07, // vCPU 1: 4 steps
        0x0e, 0x00, // vCPU 0: the CAS
        0x0e, 0x01, // vCPU 1: the CAS, lost
        0x0e, 0x03, // vCPU 1: hands its frame back, re-executes its access
        0x0e, 0x00, // vCPU 0: re-executes its access
    ];

    /// vCPU 0 maps page 7, then its fast path finds page 7's slot again (no read) just as an
    /// unmap of page 7 holds the entry locked: the CAS, run at the unmap's first TLBI, retries.
    const HELD_BY_BBM: &[u8] = &[
        0x0d, 0x00, 0x07, 0x00, 0x0e, 0x0e, // vCPU 0 maps page 7 (general path; its cache fills)
        0x0d, 0x04, 0x07, 0x00, // vCPU 0, fast path: page 7's slot through the cache
        0x0f, 0x00, // in the next structural change, vCPU 0 takes 1 step at the first TLBI
        0x05, 0x07, 0x00, 0x00, 0x00, // unmap page 7
        0x0e, 0x0e, // vCPU 0 hands its frame back and re-executes
    ];

    /// vCPU 0's fast path holds page 8's slot while an unmap of page 7 empties that level-3
    /// table, which is locked and retired (vCPU 0 has not passed a quiescent point): the CAS
    /// meets a locked entry of a table no longer in the tree, and retries.
    const HELD_BY_RETIREMENT: &[u8] = &[
        0x0d, 0x00, 0x07, 0x00, 0x0e, 0x0e, // vCPU 0 maps page 7
        0x0d, 0x04, 0x08, 0x00, // vCPU 0, fast path: page 8's slot
        0x05, 0x07, 0x00, 0x00, 0x00, // unmap page 7 (the live form: a fault is under way)
        0x0e, 0x0e, // vCPU 0's CAS, then the hand-back and the access
    ];

    #[test]
    fn two_vcpus_race_and_the_loser_hands_its_frame_back() {
        assert_eq!(Exercise::run_counting(RACE, Sabotage::None), Ok((1, 0)));
        assert_eq!(Exercise::run_counting(HELD_BY_BBM, Sabotage::None), Ok((1, 1)));
        assert_eq!(Exercise::run_counting(HELD_BY_RETIREMENT, Sabotage::None), Ok((1, 1)));
    }

    #[test]
    fn an_install_by_plain_store_is_caught_only_with_two_vcpus() {
        // The loser's store replaces the winner's live entry.
        caught(Sabotage::StoreNotCas, RACE, "over a live mapping");
        // A store into an entry break-before-make holds, or into a retired table.
        caught(Sabotage::StoreNotCas, HELD_BY_BBM, "on an entry holding");
        caught(Sabotage::StoreNotCas, HELD_BY_RETIREMENT, "on an entry holding");
        // One caller at a time, every install finds its entry free: the bug does not show.
        assert_eq!(Exercise::run_checked(SCRIPT, Sabotage::StoreNotCas), Ok(()));
    }

    #[test]
    fn the_planted_bugs_are_caught_with_two_vcpus_too() {
        // The loser is handed the winner's frame: the guest owns one frame too few.
        caught(Sabotage::HandOutTwice, RACE, "claimed by faults under way");
        // The unmap's break dropped: the page stays mapped while its frame is released.
        caught(Sabotage::DropBreak, HELD_BY_BBM, "live mapping");
        for bug in [Sabotage::DropIpaTlbi, Sabotage::DropStage1Tlbi, Sabotage::DropDsbIsh] {
            caught(bug, HELD_BY_BBM, "machine-model violations");
        }
    }

    /// Sequences built from two vCPUs' steps and structural changes over a few pages and a
    /// block, so that races are frequent.
    fn racing_ops() -> impl Strategy<Value = Vec<u8>> {
        let page = prop_oneof![Just(5u16), Just(6), Just(7), Just(8), Just(512 + 3), Just(1023)];
        let op = prop_oneof![
            4 => (any::<u8>(), page.clone()).prop_map(|(b, p)| vec![0x0d | b & 0x80, b & 7, p as u8, (p >> 8) as u8]),
            6 => any::<u8>().prop_map(|b| vec![0x0e | b & 0x80, b & 0x0f]),
            2 => any::<u8>().prop_map(|b| vec![0x0f, b]),
            2 => page.clone().prop_map(|p| vec![0x00, p as u8, (p >> 8) as u8]),
            1 => any::<u8>().prop_map(|b| vec![0x04, b & 3]),
            2 => (page.clone(), 0u16..600).prop_map(|(p, n)| vec![0x05, p as u8, (p >> 8) as u8, n as u8, (n >> 8) as u8]),
            1 => (page.clone(), any::<u8>()).prop_map(|(p, a)| vec![0x07, p as u8, (p >> 8) as u8, 3, 0, a]),
            1 => (page, any::<bool>()).prop_map(|(p, c)| vec![0x08 | u8::from(c), p as u8, (p >> 8) as u8, 1]),
            1 => Just(vec![0x0b]),
        ];
        proptest::collection::vec(op, 0..48).prop_map(|ops| ops.concat())
    }

    #[test]
    fn racing_sequences_race_and_meet_held_entries() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut retried, mut held) = (0, 0);
        for _ in 0..300 {
            let data = racing_ops().new_tree(&mut runner).expect("a sequence").current();
            let (r, h) = Exercise::run_counting(&data, Sabotage::None).expect("no divergence");
            retried += r;
            held += h;
        }
        eprintln!("300 racing sequences: {retried} faults retried, {held} of them on a held entry");
        assert!(retried >= 30 && held >= 3, "{retried} retried, {held} held");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn random_sequences_keep_every_invariant(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            Exercise::run(&data);
        }

        #[test]
        fn racing_vcpus_keep_every_invariant(data in racing_ops()) {
            Exercise::run(&data);
        }
    }
}
