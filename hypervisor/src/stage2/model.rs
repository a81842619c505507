//! A checking model of the machine under the stage-2 code, for host tests and the fuzzer.
//!
//! [`ModelEnv`] implements [`Stage2Env`] over fake table memory and a small frame database, and
//! models the TLBs the way the architecture allows them to behave, at their worst:
//! - a walker may cache any translation (leaf) and any table descriptor (walk cache) it can
//!   reach, at any moment; a cached entry stays until an invalidation that covers it completes;
//! - `TLBI IPAS2E1IS` removes stage-2 leaf and walk entries containing the IPA, `TLBI
//!   VMALLS12E1IS` everything of the VMID, `TLBI VMALLE1IS` the combined (stage 1+2) entries,
//!   which may be refilled at once from whatever stage-2 entries were cached when it was issued;
//!   none of them takes effect before the next `DSB ISH`.
//!
//! It records a violation when the code changes a live entry without break-before-make, leaves a
//! cached translation that conflicts with the tables or outlives an operation, frees a table page
//! a walk cache may still use, lets a frame go while a TLB may still translate to it, maps a
//! frame the guest does not own, or leaves table writes unpublished (no DSB) when it returns.
//!
//! Everything reachable from a root may be cached, so the model only keeps what is cached and
//! *not* reachable any more: the stale entries, from the moment a write unlinks them until an
//! invalidation removes them. Each write then costs what it changes, not the size of the tables,
//! which is what lets the fuzzer run thousands of sequences a second.
//!
//! In fuzz builds (`cfg(fuzzing)`) every non-generic function here is exported as
//! `__sanitizer_labyrinth_*`: LLVM's SanitizerCoverage leaves functions so named alone, and the
//! model's edges are the checker's, not the code under test's, so they only cost the fuzzer time
//! (rustc offers no per-function or per-file way out of the instrumentation; docs/fuzzing.md).

use std::collections::{BTreeMap, BTreeSet};
use std::format;
use std::string::String;
use std::vec::Vec;

use crate::frame::{FrameState, Pfn, VmId};

use super::desc::{Attrs, Entry};
use super::env::Stage2Env;
use super::table::{level_size, ENTRIES};
use super::Stage2Error;

/// A translation a TLB may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CachedLeaf {
    pub vmid: u16,
    pub ipa: u64,
    pub size: u64,
    pub pa: u64,
    pub attrs: Attrs,
}

/// A table descriptor a walk cache may hold: `[ipa, ipa + size)` continues in `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CachedWalk {
    pub vmid: u16,
    pub ipa: u64,
    pub size: u64,
    pub table: Pfn,
}

/// A cached entry that a walk of the current tables would no longer find.
#[derive(Clone, Copy, Debug)]
enum Cached {
    Leaf(CachedLeaf),
    /// A table descriptor alone (what it led to is listed separately).
    Walk(CachedWalk),
    /// A table descriptor and everything below it, as the table pages hold it: a subtree
    /// unlinked in one write stays one entry until something needs its parts (an invalidation
    /// by address, a write into one of its tables, a check), then is expanded a level at a time.
    Tree(CachedWalk),
}

#[derive(Clone, Copy, Debug)]
struct Stale {
    entry: Cached,
    /// Held by the stage-2 TLB (leaves) and the walk cache (walks).
    s2: bool,
    /// Held as combined stage 1+2 entries (leaves).
    combined: bool,
    /// When it went stale: orders it against a pending `TLBI VMALLE1IS`.
    seq: u64,
    /// Which entry it is, for that invalidation's refill list (parts of a subtree went stale
    /// together but are refilled or not one by one).
    id: u64,
}

impl Stale {
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stale_range")]
    fn range(&self) -> (u16, u64, u64) {
        match self.entry {
            Cached::Leaf(l) => (l.vmid, l.ipa, l.size),
            Cached::Walk(w) | Cached::Tree(w) => (w.vmid, w.ipa, w.size),
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stale_vmid")]
    fn vmid(&self) -> u16 {
        self.range().0
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stale_covers")]
    fn covers(&self, ipa: u64) -> bool {
        let (_, base, size) = self.range();
        base <= ipa && ipa < base + size
    }
}

#[derive(Clone, Debug)]
enum Pending {
    Ipa {
        vmid: u16,
        ipa: u64,
    },
    /// `issued`: the stale sequence number at issue; `refill`: the ids of the stale leaves then
    /// in the stage-2 TLB (with everything reachable at issue, what combined entries may refill
    /// from).
    Stage1 {
        vmid: u16,
        issued: u64,
        refill: Vec<u64>,
    },
    All {
        vmid: u16,
    },
}

/// Which maintenance to drop (or which bug to plant), to prove the model and the fuzz harness
/// catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sabotage {
    #[default]
    None,
    /// Every `TLBI IPAS2E1IS` is dropped.
    DropIpaTlbi,
    /// Every `TLBI VMALLE1IS` is dropped.
    DropStage1Tlbi,
    /// Every `DSB ISH` is dropped.
    DropDsbIsh,
    /// Every `TLBI VMALLS12E1IS` is dropped.
    DropVmidTlbi,
    /// The frame database is never told a 2 MiB block was split (blocks stay one unit).
    KeepBlocksWhole,
    /// Break-before-make broken: the "break" (an invalid entry written over a valid one in a
    /// live table) is dropped, so the "make" changes a live entry in place.
    DropBreak,
    /// The frame allocator hands a guest the frame it handed out last, again.
    HandOutTwice,
    /// An install's compare-and-swap is a plain store: a valid entry goes in whatever the
    /// entry holds, so the loser of a race overwrites the winner (or a held entry).
    StoreNotCas,
}

/// Where a live table sits: its VMID, level and the first IPA it covers.
#[derive(Clone, Copy, Debug)]
struct TableInfo {
    vmid: u16,
    level: usize,
    base: u64,
}

type Table = Box<[u64; ENTRIES]>;

const FREE: u16 = FrameState::Free.tag();

pub struct ModelEnv {
    mem: TableMemory,
    /// Frame states from `ram_base` on, as frame database tags (compared a slice at a time).
    frames: Vec<u16>,
    /// How many frames are in each state, by tag.
    counts: Vec<(u16, usize)>,
    /// How many reachable leaves translate to each frame (a TLB may hold any of them).
    mapped: Vec<u16>,
    /// Pages each VMID's reachable leaves map, in all.
    pages_mapped: Vec<(u16, u64)>,
    /// Heads of 2 MiB blocks the frame database holds as one unit (claimed whole for a block
    /// fault): they must be split before any part of them is released on its own.
    compound: BTreeSet<u64>,
    ram_base: u64,
    /// Frames given back, most recent last (handed out first), then frames never handed out
    /// from `fresh` on; entries that were claimed since are skipped.
    /// As runs `(first frame, count)`, handed out from the end of the last run.
    freed: Vec<(u64, u64)>,
    fresh: usize,
    last_guest_frame: Option<u64>,
    /// Root table, start level and VMID of each live address space.
    roots: Vec<(u16, Pfn, usize)>,
    /// Every table reachable from a root.
    info: BTreeMap<u64, TableInfo>,
    /// Cached entries no walk reaches any more, oldest first.
    stale: Vec<Stale>,
    /// How many of them are whole subtrees (every table write checks whether one holds it).
    trees: usize,
    /// The last table `write` looked up in `info`, and what it found (cleared whenever `info`
    /// changes): writes come in runs into one table.
    info_last: core::cell::Cell<Option<(u64, Option<TableInfo>)>>,
    seq: u64,
    ids: u64,
    pending: Vec<Pending>,
    unpublished: bool,
    pub sabotage: Sabotage,
    pub violations: Vec<String>,
    /// When set, `take_tables` fails (memory exhaustion on demand).
    pub fail_tables: bool,
    pub tlbi_count: usize,
}

impl ModelEnv {
    /// RAM of `frames` frames starting at frame `ram_base`, all free.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_new")]
    pub fn new(ram_base: u64, frames: usize) -> Self {
        ModelEnv {
            mem: TableMemory {
                ram_base,
                slot: vec![0; frames],
                pages: Vec::new(),
                spare: Vec::new(),
                last: core::cell::Cell::new((0, 0)),
            },
            frames: vec![FREE; frames],
            counts: vec![(FREE, frames)],
            mapped: vec![0; frames],
            pages_mapped: Vec::new(),
            compound: BTreeSet::new(),
            ram_base,
            freed: Vec::new(),
            fresh: 0,
            last_guest_frame: None,
            roots: Vec::new(),
            info: BTreeMap::new(),
            stale: Vec::new(),
            trees: 0,
            info_last: core::cell::Cell::new(None),
            seq: 0,
            ids: 0,
            pending: Vec::new(),
            unpublished: false,
            sabotage: Sabotage::None,
            violations: Vec::new(),
            fail_tables: false,
            tlbi_count: 0,
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_violation")]
    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_index_of")]
    fn index_of(&self, pfn: u64) -> Option<usize> {
        let i = pfn.checked_sub(self.ram_base)?;
        (i < self.frames.len() as u64).then_some(i as usize)
    }

    /// The live table in frame `pfn`, if it is one.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_table")]
    fn table(&self, pfn: u64) -> Option<&Table> {
        self.mem.get(pfn)
    }

    /// The entries of the live table in `table`, if it is one (for the harness's own walks,
    /// which read whole tables).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_table_entries")]
    pub fn table_entries(&self, table: Pfn) -> Option<&[u64; ENTRIES]> {
        self.table(table.0).map(|t| &**t)
    }

    /// The valid entries of the table in frame `pfn`, as (index, raw).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_valid")]
    fn valid(&self, pfn: u64) -> Vec<(usize, u64)> {
        self.table(pfn).map_or(Vec::new(), |t| {
            let mut v = Vec::new();
            for_valid(t, |i, raw| v.push((i, raw)));
            v
        })
    }

    /// A copy of the table in frame `pfn` (zeroes if it is none), to walk while changing the
    /// model.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_entries")]
    fn entries(&self, pfn: u64) -> [u64; ENTRIES] {
        self.table(pfn).map_or([0; ENTRIES], |t| **t)
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_count_mut")]
    fn count_mut(&mut self, state: u16) -> &mut usize {
        let at = match self.counts.iter().position(|c| c.0 == state) {
            Some(at) => at,
            None => {
                self.counts.push((state, 0));
                self.counts.len() - 1
            }
        };
        &mut self.counts[at].1
    }

    /// Gives frames `[first, end)` (indices) the state `to`, keeping the counts.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_retag")]
    fn retag(&mut self, first: usize, end: usize, to: FrameState) {
        let to = to.tag();
        if end == first + 1 {
            let from = core::mem::replace(&mut self.frames[first], to);
            if from != to {
                *self.count_mut(from) -= 1;
                *self.count_mut(to) += 1;
            }
            return;
        }
        if first < end && all_eq(&self.frames[first..end], self.frames[first]) {
            let from = self.frames[first];
            self.frames[first..end].fill(to);
            *self.count_mut(from) -= end - first;
            *self.count_mut(to) += end - first;
            return;
        }
        let mut i = first;
        while i < end {
            let from = self.frames[i];
            let run = self.frames[i..end].iter().take_while(|s| **s == from).count();
            self.frames[i..i + run].fill(to);
            *self.count_mut(from) -= run;
            *self.count_mut(to) += run;
            i += run;
        }
    }

    /// Switches to another CPU's view of what is written and not yet published by a `DSB`
    /// (each CPU's barrier orders its own writes): `unpublished` becomes the current CPU's,
    /// the previous one's is returned.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_switch_cpu")]
    pub fn switch_cpu(&mut self, unpublished: bool) -> bool {
        core::mem::replace(&mut self.unpublished, unpublished)
    }

    /// Whether the block headed at `head` is still held as one unit (for tests).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_is_compound")]
    pub fn is_compound(&self, head: Pfn) -> bool {
        self.compound.contains(&head.0)
    }

    /// How many reachable leaves, in every address space, translate to `pfn`: a frame mapped
    /// twice shows as 2.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_leaves_mapping")]
    pub fn leaves_mapping(&self, pfn: Pfn) -> u16 {
        self.index_of(pfn.0).map_or(0, |i| self.mapped[i])
    }

    /// The first of the `count` frames from `pfn` on that is not in `state`, or that a reachable
    /// leaf maps (a claim not mapped yet, or given back, must be neither).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_first_not_unmapped")]
    pub fn first_not_unmapped(&self, pfn: Pfn, count: u64, state: FrameState) -> Option<Pfn> {
        let (Some(first), Some(last)) = (self.index_of(pfn.0), self.index_of(pfn.0 + count.max(1) - 1))
        else {
            return Some(pfn);
        };
        let (frames, state) = (&self.frames[first..=last], state.tag());
        let mapped = &self.mapped[first..=last];
        if all_eq(frames, state) & all_eq(mapped, 0) {
            return None;
        }
        let bad = (0..frames.len()).find(|&i| frames[i] != state || mapped[i] != 0)?;
        Some(Pfn(pfn.0 + bad as u64))
    }

    /// The first of the `count` frames from `pfn` on that is not in `state`, or not mapped by
    /// exactly one reachable leaf (a frame outside RAM is neither).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_first_not_mapped_once")]
    pub fn first_not_mapped_once(&self, pfn: Pfn, count: u64, state: FrameState) -> Option<Pfn> {
        let (Some(first), Some(last)) = (self.index_of(pfn.0), self.index_of(pfn.0 + count.max(1) - 1))
        else {
            return Some(pfn);
        };
        let (frames, state) = (&self.frames[first..=last], state.tag());
        let mapped = &self.mapped[first..=last];
        if all_eq(frames, state) & all_eq(mapped, 1) {
            return None;
        }
        let bad = (0..frames.len()).find(|&i| frames[i] != state || mapped[i] != 1)?;
        Some(Pfn(pfn.0 + bad as u64))
    }

    /// The `n`th (modulo their number) table page reachable in `vmid`'s space, root included.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_table_of")]
    pub fn table_of(&self, vmid: u16, n: usize) -> Option<Pfn> {
        let count = self.info.values().filter(|t| t.vmid == vmid).count();
        let (&pfn, _) = self.info.iter().filter(|t| t.1.vmid == vmid).nth(n.checked_rem(count)?)?;
        Some(Pfn(pfn))
    }

    /// Registers an address space so the model knows which VMID a table belongs to.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_add_root")]
    pub fn add_root(&mut self, vmid: u16, root: Pfn, start_level: usize) {
        self.roots.push((vmid, root, start_level));
        self.info_last.set(None);
        self.info.insert(root.0, TableInfo { vmid, level: start_level, base: 0 });
        for (i, raw) in self.valid(root.0) {
            self.reach(vmid, start_level, i as u64 * level_size(start_level), raw);
        }
    }

    /// Forgets an address space after its teardown; what it still mapped stays cached until
    /// invalidated.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_remove_root")]
    pub fn remove_root(&mut self, vmid: u16) {
        let Some(&(_, root, level)) = self.roots.iter().find(|r| r.0 == vmid) else { return };
        for (i, raw) in self.valid(root.0) {
            self.unreach(vmid, level, i as u64 * level_size(level), raw);
        }
        self.roots.retain(|r| r.0 != vmid);
        self.info.retain(|_, t| t.vmid != vmid);
        self.info_last.set(None);
    }

    /// Takes a free frame for `owner` (what the atomic path does for a fault), if any is left.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_claim_frame")]
    pub fn claim_frame(&mut self, state: FrameState) -> Option<Pfn> {
        if self.sabotage == Sabotage::HandOutTwice && matches!(state, FrameState::Guest(_)) {
            if let Some(pfn) = self.last_guest_frame {
                if let Some(i) = self.index_of(pfn) {
                    self.retag(i, i + 1, state);
                    return Some(Pfn(pfn));
                }
            }
        }
        let i = loop {
            let i = match self.freed.last_mut() {
                Some(run) => {
                    run.1 -= 1;
                    let pfn = run.0 + run.1;
                    if run.1 == 0 {
                        self.freed.pop();
                    }
                    self.index_of(pfn)?
                }
                None => {
                    while self.fresh < self.frames.len() && self.frames[self.fresh] != FREE {
                        self.fresh += 1;
                    }
                    if self.fresh == self.frames.len() {
                        return None;
                    }
                    self.fresh += 1;
                    self.fresh - 1
                }
            };
            if self.frames[i] == FREE {
                break i;
            }
        };
        self.retag(i, i + 1, state);
        let pfn = self.ram_base + i as u64;
        if matches!(state, FrameState::Guest(_)) {
            self.last_guest_frame = Some(pfn);
        }
        Some(Pfn(pfn))
    }

    /// Claims `count` contiguous, `align`-aligned free frames (a block), if there are any.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_claim_contiguous")]
    pub fn claim_contiguous(&mut self, count: usize, align: u64, state: FrameState) -> Option<Pfn> {
        let align = align.max(1);
        let n = self.frames.len();
        let mut start = ((align - self.ram_base % align) % align) as usize;
        while start + count <= n {
            if all_eq(&self.frames[start..start + count], FREE) {
                self.retag(start, start + count, state);
                let pfn = self.ram_base + start as u64;
                // A guest's 2 MiB block is owned as one unit, as the atomic path hands it out.
                if count == 512 && pfn.is_multiple_of(512) && matches!(state, FrameState::Guest(_)) {
                    self.compound.insert(pfn);
                }
                return Some(Pfn(pfn));
            }
            start += align as usize;
        }
        None
    }

    /// The guest gave `[pa, pa + size)` back (after an unmap reported it): checks that no TLB can
    /// still translate to it, then frees it.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_release_frames")]
    pub fn release_frames(&mut self, pa: u64, size: u64) {
        let end = pa + size;
        let mut stale = None;
        for s in &self.stale {
            let mut check = |c: CachedLeaf| {
                if stale.is_none() && c.pa < end && pa < c.pa + c.size {
                    stale = Some(c);
                }
            };
            match s.entry {
                Cached::Leaf(c) => check(c),
                Cached::Walk(_) => {}
                Cached::Tree(w) => self.tree_leaves(&w, 0, u64::MAX, &mut check),
            }
        }
        if let Some(c) = stale {
            self.violation(format!(
                "frames {pa:#x}+{size:#x} released while VMID {} may still translate IPA {:#x} to {:#x}",
                c.vmid, c.ipa, c.pa
            ));
        }
        let (first, last) = (self.index_of(pa >> 12), self.index_of((end >> 12).saturating_sub(1)));
        if let (Some(first), Some(last)) = (first, last) {
            if !all_eq(&self.mapped[first..=last], 0) {
                let live = (first..=last).find(|&i| self.mapped[i] != 0).unwrap_or(first);
                let frame = (self.ram_base + live as u64) << 12;
                self.violation(format!(
                    "frames {pa:#x}+{size:#x} released while a live mapping still translates to {frame:#x}"
                ));
            }
        }
        let partial: Vec<u64> =
            self.compound.range((pa >> 12).saturating_sub(511)..end >> 12).copied().collect();
        for head in partial {
            if head < pa >> 12 || head + 512 > end >> 12 {
                self.violation(format!(
                    "frames {pa:#x}+{size:#x} released out of the 2 MiB block at {:#x}, still owned as one unit",
                    head << 12
                ));
            }
            self.compound.remove(&head);
        }
        if let (Some(first), Some(last)) = (first, last) {
            if any_eq(&self.frames[first..=last], FREE) {
                let free = (first..=last).find(|&i| self.frames[i] == FREE).unwrap_or(first);
                let frame = (self.ram_base + free as u64) << 12;
                self.violation(format!("frames {pa:#x}+{size:#x} released, but {frame:#x} was free already"));
            }
            self.retag(first, last + 1, FrameState::Free);
            self.freed.push((self.ram_base + first as u64, (last + 1 - first) as u64));
        }
    }

    /// Table `table` at `level`, covering from `base`, became reachable in `vmid`'s space
    /// (`add`) or stopped being reachable: its tables join or leave `info`, and the frames its
    /// leaves translate to gain or lose a mapping.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_account")]
    fn account(&mut self, vmid: u16, table: Pfn, level: usize, base: u64, add: bool) {
        self.info_last.set(None);
        let mut todo = vec![(table, level, base)];
        let mut pages = 0;
        while let Some((table, level, base)) = todo.pop() {
            if add {
                self.info.insert(table.0, TableInfo { vmid, level, base });
                // A space's tables are all pages of the same kind and VM as its root.
                let root = self.roots.iter().find(|r| r.0 == vmid).map(|r| r.1);
                let (state, own) = (self.frame_state(table), root.and_then(|r| self.frame_state(r)));
                if state != own {
                    self.violation(format!(
                        "VMID {vmid} links {table} at IPA {base:#x}, which is {state:?}, not {own:?} like its root"
                    ));
                }
            } else {
                self.info.remove(&table.0);
            }
            let Some(t) = self.mem.get(table.0) else { continue };
            let size = level_size(level);
            let (mapped, ram_base) = (&mut self.mapped, self.ram_base);
            for_valid(t, |i, raw| match Entry::decode(raw, level) {
                Entry::Invalid => {}
                Entry::Leaf { pa, .. } => {
                    pages += size >> 12;
                    count_mapped(mapped, ram_base, pa, size, add);
                }
                Entry::Table(child) if level < 3 => todo.push((child, level + 1, base + i as u64 * size)),
                Entry::Table(_) => {}
            });
        }
        self.count_pages(vmid, pages, add);
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_count_pages")]
    fn count_pages(&mut self, vmid: u16, pages: u64, add: bool) {
        let at = match self.pages_mapped.iter().position(|c| c.0 == vmid) {
            Some(at) => at,
            None => {
                self.pages_mapped.push((vmid, 0));
                self.pages_mapped.len() - 1
            }
        };
        let n = &mut self.pages_mapped[at].1;
        *n = if add { *n + pages } else { n.saturating_sub(pages) };
    }

    /// How many pages `vmid`'s reachable leaves map, in all.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_pages_mapped")]
    pub fn pages_mapped(&self, vmid: u16) -> u64 {
        self.pages_mapped.iter().find(|c| c.0 == vmid).map_or(0, |c| c.1)
    }

    /// The entry `raw` at `level`, covering from `ipa` in `vmid`'s space, just became
    /// reachable: what it maps must not conflict with what a TLB still holds.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_reach")]
    fn reach(&mut self, vmid: u16, level: usize, ipa: u64, raw: u64) {
        let size = level_size(level);
        let mut leaves = Vec::new();
        match Entry::decode(raw, level) {
            Entry::Invalid => return,
            Entry::Leaf { pa, attrs } => {
                count_mapped(&mut self.mapped, self.ram_base, pa, size, true);
                self.count_pages(vmid, size >> 12, true);
                leaves.push(CachedLeaf { vmid, ipa, size, pa, attrs });
            }
            Entry::Table(child) => {
                self.account(vmid, child, level + 1, ipa, true);
                if !self.stale.iter().any(|s| s.vmid() == vmid) {
                    return;
                }
                self.tree_leaves(&CachedWalk { vmid, ipa, size, table: child }, ipa, ipa + size, &mut |l| {
                    leaves.push(l)
                });
            }
        }
        if !self.stale.iter().any(|s| s.vmid() == vmid) {
            return;
        }
        for l in leaves {
            let mut conflict = None;
            self.stale_leaves(vmid, l.ipa, l.ipa + l.size, &mut |c| {
                if conflict.is_none() && !same_translation(&c, &l) {
                    conflict = Some(c);
                }
            });
            if let Some(c) = conflict {
                self.violation(format!(
                    "VMID {}: IPA {:#x} now maps {:#x} (size {:#x}) while a TLB may hold {:#x} (size {:#x}) for {:#x}: changed without break-before-make or invalidation",
                    l.vmid, l.ipa, l.pa, l.size, c.pa, c.size, c.ipa
                ));
            }
        }
    }

    /// The entry `raw` at `level`, covering from `ipa` in `vmid`'s space, just became
    /// unreachable: what it led to stays cached until an invalidation removes it.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_unreach")]
    fn unreach(&mut self, vmid: u16, level: usize, ipa: u64, raw: u64) {
        let size = level_size(level);
        let entry = match Entry::decode(raw, level) {
            Entry::Invalid => return,
            Entry::Leaf { pa, attrs } => {
                count_mapped(&mut self.mapped, self.ram_base, pa, size, false);
                self.count_pages(vmid, size >> 12, false);
                Cached::Leaf(CachedLeaf { vmid, ipa, size, pa, attrs })
            }
            Entry::Table(child) => {
                self.account(vmid, child, level + 1, ipa, false);
                Cached::Tree(CachedWalk { vmid, ipa, size, table: child })
            }
        };
        self.seq += 1;
        self.ids += 1;
        self.trees += usize::from(matches!(entry, Cached::Tree(_)));
        self.stale.push(Stale { entry, s2: true, combined: true, seq: self.seq, id: self.ids });
    }

    /// Calls `f` with every leaf below `w` (a stale subtree) that overlaps `[start, end)`.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_tree_leaves")]
    fn tree_leaves(&self, w: &CachedWalk, start: u64, end: u64, f: &mut dyn FnMut(CachedLeaf)) {
        let level = child_level(w);
        let size = level_size(level);
        let Some(t) = self.table(w.table.0) else { return };
        for (i, &raw) in t.iter().enumerate() {
            let ipa = w.ipa + i as u64 * size;
            if ipa >= end || ipa + size <= start {
                continue;
            }
            match Entry::decode(raw, level) {
                Entry::Invalid => {}
                Entry::Leaf { pa, attrs } => f(CachedLeaf { vmid: w.vmid, ipa, size, pa, attrs }),
                Entry::Table(child) if level < 3 => {
                    self.tree_leaves(&CachedWalk { vmid: w.vmid, ipa, size, table: child }, start, end, f)
                }
                Entry::Table(_) => {}
            }
        }
    }

    /// Calls `f` with every stale leaf of `vmid` (subtrees included) overlapping `[start, end)`.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_stale_leaves")]
    fn stale_leaves(&self, vmid: u16, start: u64, end: u64, f: &mut dyn FnMut(CachedLeaf)) {
        for s in self.stale.iter().filter(|s| s.vmid() == vmid) {
            let (_, base, size) = s.range();
            if base >= end || base + size <= start {
                continue;
            }
            match s.entry {
                Cached::Leaf(l) => f(l),
                Cached::Walk(_) => {}
                Cached::Tree(w) => self.tree_leaves(&w, start, end, f),
            }
        }
    }

    /// Whether the subtree below `w` contains table page `table` (its own included).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_tree_holds")]
    fn tree_holds(&self, w: &CachedWalk, table: Pfn) -> bool {
        if w.table == table {
            return true;
        }
        let level = child_level(w);
        if level >= 3 {
            return false;
        }
        let size = level_size(level);
        let Some(t) = self.table(w.table.0) else { return false };
        t.iter().enumerate().any(|(i, &raw)| match Entry::decode(raw, level) {
            Entry::Table(child) => self.tree_holds(
                &CachedWalk { vmid: w.vmid, ipa: w.ipa + i as u64 * size, size, table: child },
                table,
            ),
            _ => false,
        })
    }

    /// Replaces stale subtree `k` with its descriptor and its table's entries, one level down.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_expand")]
    fn expand(&mut self, k: usize) {
        let s = self.stale[k];
        let Cached::Tree(w) = s.entry else { return };
        self.stale[k] = Stale { entry: Cached::Walk(w), combined: false, ..s };
        self.trees -= 1;
        let level = child_level(&w);
        let size = level_size(level);
        for (i, raw) in self.entries(w.table.0).into_iter().enumerate() {
            let ipa = w.ipa + i as u64 * size;
            let entry = match Entry::decode(raw, level) {
                Entry::Invalid => continue,
                Entry::Leaf { pa, attrs } => Cached::Leaf(CachedLeaf { vmid: w.vmid, ipa, size, pa, attrs }),
                Entry::Table(child) if level < 3 => {
                    Cached::Tree(CachedWalk { vmid: w.vmid, ipa, size, table: child })
                }
                Entry::Table(_) => continue,
            };
            self.ids += 1;
            self.trees += usize::from(matches!(entry, Cached::Tree(_)));
            self.stale.push(Stale { entry, id: self.ids, ..s });
        }
    }

    /// Expands every stale subtree matching `which` until none is left.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_expand_where")]
    fn expand_where(&mut self, which: &dyn Fn(&Self, &Stale) -> bool) {
        while let Some(k) =
            self.stale.iter().position(|s| matches!(s.entry, Cached::Tree(_)) && which(self, s))
        {
            self.expand(k);
        }
    }

    /// Whether a walk of the current tables finds `entry` (a leaf or a walk).
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_reachable")]
    fn reachable(&self, entry: &Cached) -> bool {
        let (vmid, ipa, size) = match *entry {
            Cached::Leaf(l) => (l.vmid, l.ipa, l.size),
            Cached::Walk(w) | Cached::Tree(w) => (w.vmid, w.ipa, w.size),
        };
        let Some(&(_, root, start)) = self.roots.iter().find(|r| r.0 == vmid) else { return false };
        let (mut table, mut level) = (root, start);
        loop {
            let raw = self.read(table, ((ipa >> (12 + 9 * (3 - level))) & 511) as usize);
            let here = level_size(level) == size;
            match (Entry::decode(raw, level), entry) {
                (Entry::Leaf { pa, attrs }, Cached::Leaf(l)) if here => {
                    return ipa.is_multiple_of(size) && pa == l.pa && attrs == l.attrs
                }
                (Entry::Table(t), Cached::Walk(w)) if here => {
                    return ipa.is_multiple_of(size) && t == w.table
                }
                (Entry::Table(t), _) if level < 3 && !here => {
                    table = t;
                    level += 1;
                }
                _ => return false,
            }
        }
    }

    /// After an operation, before the guest runs again: no TLB may hold anything the tables do
    /// not say, and every table write must have been published.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_check_quiescent")]
    pub fn check_quiescent(&mut self) {
        if self.unpublished {
            self.violation("table writes not published with a DSB before returning".into());
            self.unpublished = false;
        }
        if !self.pending.is_empty() {
            self.violation("TLB maintenance issued but not completed with DSB ISH".into());
        }
        // A stale entry the tables reach again is just cached; one of a live space that they do
        // not is a violation (reported once per kind and VMID).
        self.expand_where(&|env, s| env.roots.iter().any(|r| r.0 == s.vmid()));
        let stale = std::mem::take(&mut self.stale);
        let mut reported: Vec<(u16, bool)> = Vec::new();
        let mut kept = Vec::with_capacity(stale.len());
        for s in stale {
            let vmid = s.vmid();
            if !self.roots.iter().any(|r| r.0 == vmid) {
                kept.push(s);
                continue;
            }
            if self.reachable(&s.entry) {
                continue;
            }
            let leaf = matches!(s.entry, Cached::Leaf(_));
            if !reported.contains(&(vmid, leaf)) {
                reported.push((vmid, leaf));
                self.violation(match s.entry {
                    Cached::Leaf(c) => format!(
                        "VMID {vmid}: stale TLB entry IPA {:#x} -> {:#x} (size {:#x}) outlives the operation",
                        c.ipa, c.pa, c.size
                    ),
                    Cached::Walk(w) | Cached::Tree(w) => format!(
                        "VMID {vmid}: stale walk-cache entry for IPA {:#x} -> table {} outlives the operation",
                        w.ipa, w.table
                    ),
                });
            }
            kept.push(s);
        }
        self.stale = kept;
        self.recount_trees();
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_recount_trees")]
    fn recount_trees(&mut self) {
        self.trees = self.stale.iter().filter(|s| matches!(s.entry, Cached::Tree(_))).count();
    }

    /// Cached entries (stage 2, combined, walk) still tagged with `vmid`.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_cached_for")]
    pub fn cached_for(&self, vmid: u16) -> usize {
        let mut n = 0;
        for s in self.stale.iter().filter(|s| s.vmid() == vmid) {
            let leaf = usize::from(s.s2) + usize::from(s.combined);
            n += match s.entry {
                Cached::Leaf(_) => leaf,
                Cached::Walk(_) => 1,
                Cached::Tree(w) => 1 + self.count_below(w.table, child_level(&w), leaf),
            };
        }
        if let Some(&(_, root, level)) = self.roots.iter().find(|r| r.0 == vmid) {
            n += self.count_below(root, level, 2);
        }
        n
    }

    /// Entries a walk from `table` reaches, each leaf counted `leaf` times (the caches holding
    /// it), each table descriptor once.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_count_below")]
    fn count_below(&self, table: Pfn, level: usize, leaf: usize) -> usize {
        let Some(t) = self.table(table.0) else { return 0 };
        t.iter()
            .map(|&raw| match Entry::decode(raw, level) {
                Entry::Invalid => 0,
                Entry::Leaf { .. } => leaf,
                Entry::Table(child) if level < 3 => 1 + self.count_below(child, level + 1, leaf),
                Entry::Table(_) => 1,
            })
            .sum()
    }

    /// Frames currently in `state`.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_frames_in")]
    pub fn frames_in(&self, state: FrameState) -> usize {
        let tag = state.tag();
        self.counts.iter().find(|c| c.0 == tag).map_or(0, |c| c.1)
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_ModelEnv_complete")]
    fn complete(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Ipa { vmid, ipa } => {
                    // Only the path to `ipa` goes: the subtrees on it come apart.
                    self.expand_where(&|_, s| s.vmid() == vmid && s.covers(ipa));
                    for s in self.stale.iter_mut().filter(|s| s.vmid() == vmid && s.covers(ipa)) {
                        s.s2 = false;
                    }
                }
                Pending::Stage1 { vmid, issued, refill } => {
                    // A walk may refill combined entries from stage-2 entries cached at issue:
                    // the stale ones then, and whatever was reachable then and went stale since.
                    for s in self.stale.iter_mut().filter(|s| s.vmid() == vmid) {
                        if !matches!(s.entry, Cached::Walk(_)) {
                            s.combined = s.seq > issued || refill.binary_search(&s.id).is_ok();
                        }
                    }
                }
                Pending::All { vmid } => self.stale.retain(|s| s.vmid() != vmid),
            }
            self.stale.retain(|s| s.s2 || s.combined);
        }
        self.recount_trees();
    }
}

/// Whether every element of `s` is `v`: no early exit, so the loop has no branch to count and
/// compiles to vector compares (the fuzzer's instrumentation would otherwise cost per element).
fn all_eq<T: Copy + PartialEq>(s: &[T], v: T) -> bool {
    s.iter().fold(true, |acc, x| acc & (*x == v))
}

fn any_eq<T: Copy + PartialEq>(s: &[T], v: T) -> bool {
    s.iter().fold(false, |acc, x| acc | (*x == v))
}

/// Calls `f` with the index and value of every valid entry of `t`, skipping empty stretches
/// a chunk at a time (most tables are sparse).
fn for_valid(t: &Table, mut f: impl FnMut(usize, u64)) {
    for (c, chunk) in t.chunks_exact(16).enumerate() {
        if chunk.iter().fold(0, |acc, e| acc | e) & 1 == 0 {
            continue;
        }
        for (i, &raw) in chunk.iter().enumerate() {
            if raw & 1 != 0 {
                f(c * 16 + i, raw);
            }
        }
    }
}

/// `[pa, pa + size)` gained (`add`) or lost a reachable leaf: the per-frame counts of RAM
/// from frame `ram_base` on follow.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_fn_count_mapped")]
fn count_mapped(mapped: &mut [u16], ram_base: u64, pa: u64, size: u64, add: bool) {
    let n = mapped.len() as u64;
    let first = (pa >> 12).saturating_sub(ram_base).min(n) as usize;
    let end = ((pa + size) >> 12).saturating_sub(ram_base).min(n) as usize;
    for m in &mut mapped[first..end] {
        *m = if add { m.saturating_add(1) } else { m.saturating_sub(1) };
    }
}

/// Table pages by frame: a slot per RAM frame pointing into a pool of page contents.
struct TableMemory {
    ram_base: u64,
    /// Per frame index: 1 + where its table is in `pages`, 0 if it is not a live table page.
    slot: Vec<u32>,
    pages: Vec<Table>,
    /// Slots of `pages` freed, for reuse.
    spare: Vec<u32>,
    /// The last frame looked up and its slot: walks read one table many times in a row.
    last: core::cell::Cell<(u64, u32)>,
}

impl TableMemory {
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_TableMemory_index_of")]
    fn index_of(&self, pfn: u64) -> Option<usize> {
        let i = pfn.checked_sub(self.ram_base)?;
        (i < self.slot.len() as u64).then_some(i as usize)
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_TableMemory_get")]
    fn get(&self, pfn: u64) -> Option<&Table> {
        let (last, slot) = self.last.get();
        if last == pfn && slot != 0 {
            return self.pages.get(slot as usize - 1);
        }
        let slot = *self.slot.get(self.index_of(pfn)?)?;
        self.last.set((pfn, slot));
        self.pages.get((slot as usize).checked_sub(1)?)
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_TableMemory_get_mut")]
    fn get_mut(&mut self, pfn: u64) -> Option<&mut Table> {
        let slot = *self.slot.get(self.index_of(pfn)?)?;
        self.pages.get_mut((slot as usize).checked_sub(1)?)
    }

    /// Makes frame `pfn` (RAM) a live, zeroed table page.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_TableMemory_make")]
    fn make(&mut self, pfn: u64) {
        let Some(i) = self.index_of(pfn) else { return };
        let slot = match self.spare.pop() {
            Some(slot) => {
                self.pages[slot as usize].fill(0);
                slot
            }
            None => {
                self.pages.push(Box::new([0; ENTRIES]));
                (self.pages.len() - 1) as u32
            }
        };
        self.slot[i] = slot + 1;
        self.last.set((0, 0));
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_TableMemory_free")]
    fn free(&mut self, pfn: u64) {
        if let Some(i) = self.index_of(pfn) {
            if self.slot[i] != 0 {
                self.spare.push(self.slot[i] - 1);
                self.slot[i] = 0;
                self.last.set((0, 0));
            }
        }
    }
}

/// The level of the table a walk entry points to: one below the entry's.
#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_fn_child_level")]
fn child_level(w: &CachedWalk) -> usize {
    match w.size {
        s if s == level_size(0) => 1,
        s if s == level_size(1) => 2,
        _ => 3,
    }
}

#[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_fn_same_translation")]
fn same_translation(a: &CachedLeaf, b: &CachedLeaf) -> bool {
    a.ipa == b.ipa && a.size == b.size && a.pa == b.pa && a.attrs == b.attrs
}

impl Stage2Env for ModelEnv {
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_read")]
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.table(table.0).map_or(0, |t| t[index])
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_read_run")]
    fn read_run(&self, table: Pfn, index: usize, out: &mut [u64]) {
        match self.table(table.0) {
            Some(t) => out.copy_from_slice(&t[index..index + out.len()]),
            None => out.fill(0),
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_write")]
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        let info = match self.info_last.get() {
            Some((pfn, info)) if pfn == table.0 => info,
            _ => {
                let info = self.info.get(&table.0).copied();
                self.info_last.set(Some((table.0, info)));
                info
            }
        };
        let old = self.read(table, index);
        // A break is any write that makes a valid entry invalid (zero, or locked for a change).
        if self.sabotage == Sabotage::DropBreak && info.is_some() && old & 1 != 0 && value & 1 == 0 {
            return;
        }
        // A table a stale subtree holds keeps what the walk caches may have read from it: take
        // the subtree apart down to this table first.
        if self.trees > 0 {
            self.expand_where(&|env, s| match s.entry {
                Cached::Tree(w) => env.tree_holds(&w, table),
                _ => false,
            });
        }
        // Only pages taken as tables and not yet freed are tables (a stale cached table is not).
        if self.index_of(table.0).is_none() {
            self.violation(format!("entry {index} written in {table}, which is not RAM"));
            return;
        }
        if self.mem.get(table.0).is_none() {
            self.violation(format!("entry {index} written in {table}, which is not a live table page"));
            self.mem.make(table.0);
        }
        if let Some(t) = self.mem.get_mut(table.0) {
            t[index] = value;
        }
        self.unpublished = true;
        let Some(TableInfo { vmid, level, base }) = info else { return };
        if old == value {
            return;
        }
        if old & 1 != 0 && value & 1 != 0 {
            self.violation(format!(
                "VMID {vmid}: live entry {index} of table {table} changed {old:#x} -> {value:#x} without break-before-make"
            ));
        }
        let ipa = base + index as u64 * level_size(level);
        self.unreach(vmid, level, ipa, old);
        self.reach(vmid, level, ipa, value);
    }

    /// One caller at a time here: the compare and the write cannot be split by another CPU.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_cas")]
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        let cur = self.read(table, index);
        if cur != old && !(self.sabotage == Sabotage::StoreNotCas && new & 1 != 0) {
            return Err(cur);
        }
        self.write(table, index, new);
        Ok(())
    }

    /// A table page never linked must come back as it was taken: zero, reachable from nowhere.
    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_return_unused_table")]
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        if self.mem.get(table.0).is_some_and(|t| t.iter().any(|&e| e != 0)) {
            self.violation(format!("{table} returned unused but written"));
        }
        self.free_table(vm, table);
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_take_tables")]
    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        if out.is_empty() {
            return Ok(());
        }
        if self.fail_tables || self.frames_in(FrameState::Free) < out.len() {
            return Err(Stage2Error::OutOfMemory);
        }
        for slot in out.iter_mut() {
            let pfn = self.claim_frame(FrameState::PageTable(vm)).ok_or(Stage2Error::OutOfMemory)?;
            self.mem.make(pfn.0);
            *slot = pfn;
        }
        Ok(())
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_free_table")]
    fn free_table(&mut self, vm: VmId, table: Pfn) {
        let state = self.frame_state(table);
        if state != Some(FrameState::PageTable(vm)) {
            self.violation(format!("{table} freed as VM {}'s table but is {state:?}", vm.get()));
            return;
        }
        // Freeing a root ends its address space: it must be empty by then.
        if let Some(&(vmid, _, _)) = self.roots.iter().find(|r| r.1 == table) {
            if self.table(table.0).is_some_and(|t| t.iter().any(|e| e & 1 != 0)) {
                self.violation(format!("root {table} of VMID {vmid} freed with live entries"));
            }
            self.remove_root(vmid);
        } else if let Some(t) = self.info.get(&table.0) {
            let vmid = t.vmid;
            self.violation(format!("{table} freed while still linked into VMID {vmid}'s tables"));
        }
        let walk = self.stale.iter().filter(|s| s.s2).find_map(|s| match s.entry {
            Cached::Walk(w) if w.table == table => Some(w),
            Cached::Tree(w) if self.tree_holds(&w, table) => Some(w),
            _ => None,
        });
        if let Some(w) = walk {
            self.violation(format!(
                "{table} freed while VMID {}'s walk cache may still use it for IPA {:#x}",
                w.vmid, w.ipa
            ));
        }
        self.mem.free(table.0);
        if let Some(i) = self.index_of(table.0) {
            self.retag(i, i + 1, FrameState::Free);
            self.freed.push((table.0, 1));
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_frame_state")]
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.index_of(pfn.0).and_then(|i| FrameState::from_tag(self.frames[i]))
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_frame_unit")]
    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        let head = pfn.0 & !511;
        let run = if self.compound.contains(&head) { 512 - (pfn.0 - head) } else { 1 };
        (self.frame_state(pfn), run)
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_split_frames")]
    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        if self.sabotage == Sabotage::KeepBlocksWhole || !self.compound.contains(&head.0) {
            return;
        }
        if self.frame_state(head) != Some(FrameState::Guest(vm)) {
            self.violation(format!("VM {} split the block at {head}, which is not its own", vm.get()));
            return;
        }
        self.compound.remove(&head.0);
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_dsb_ishst")]
    fn dsb_ishst(&mut self) {
        self.unpublished = false;
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_dsb_ish")]
    fn dsb_ish(&mut self) {
        self.unpublished = false;
        if self.sabotage != Sabotage::DropDsbIsh {
            self.complete();
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_isb")]
    fn isb(&mut self) {}

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_tlbi_ipas2e1is")]
    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, _level: usize) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropIpaTlbi {
            self.pending.push(Pending::Ipa { vmid, ipa });
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_tlbi_vmalle1is")]
    fn tlbi_vmalle1is(&mut self, vmid: u16) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropStage1Tlbi {
            let refill = self
                .stale
                .iter()
                .filter(|s| s.vmid() == vmid && s.s2 && matches!(s.entry, Cached::Leaf(_)))
                .map(|s| s.id)
                .collect::<Vec<u64>>();
            let mut refill = refill;
            refill.sort_unstable();
            self.pending.push(Pending::Stage1 { vmid, issued: self.seq, refill });
        }
    }

    #[cfg_attr(fuzzing, export_name = "__sanitizer_labyrinth_s2model_Stage2EnvModelEnv_tlbi_vmalls12e1is")]
    fn tlbi_vmalls12e1is(&mut self, vmid: u16) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropVmidTlbi {
            self.pending.push(Pending::All { vmid });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMID: u16 = 1;
    const PAGE: u64 = 0x1000;

    fn vm(n: u16) -> VmId {
        VmId::new(n).expect("small id")
    }

    /// A space built by hand (start level 1): root -> level-2 table -> level-3 table mapping
    /// two pages at IPA 0 and 0x1000. Returns the model, the level-2 table and the two frames.
    fn two_pages() -> (ModelEnv, Pfn, [u64; 2]) {
        let mut env = ModelEnv::new(0x40000, 64);
        let mut t = [Pfn(0); 3];
        env.take_tables(vm(1), &mut t).expect("free frames");
        let pages = [0, 1].map(|_| env.claim_frame(FrameState::Guest(vm(1))).expect("free frame").phys());
        env.add_root(VMID, t[0], 1);
        for (i, &pa) in pages.iter().enumerate() {
            env.write(t[2], i, Entry::Leaf { pa, attrs: Attrs::RAM }.encode(3));
        }
        env.write(t[1], 0, Entry::Table(t[2]).encode(2));
        env.write(t[0], 0, Entry::Table(t[1]).encode(1));
        env.dsb_ishst();
        env.check_quiescent();
        assert!(env.violations.is_empty(), "{:?}", env.violations);
        assert_eq!(env.pages_mapped(VMID), 2);
        (env, t[1], pages)
    }

    /// Unlinks the level-3 table (break of break-before-make) without any invalidation yet.
    fn unlink(env: &mut ModelEnv, l2: Pfn) {
        env.write(l2, 0, 0);
        env.dsb_ishst();
        assert_eq!(env.pages_mapped(VMID), 0);
    }

    #[test]
    fn an_unlinked_table_needs_more_than_one_address_invalidated() {
        let (mut env, l2, _) = two_pages();
        unlink(&mut env, l2);
        env.tlbi_ipas2e1is(VMID, 0, 2);
        env.dsb_ish();
        env.tlbi_vmalle1is(VMID);
        env.dsb_ish();
        env.check_quiescent();
        // The second page's translation was cached through the table and nothing removed it.
        assert!(
            env.violations.iter().any(|v| v.contains("stale TLB entry IPA 0x1000")),
            "{:?}",
            env.violations
        );
    }

    #[test]
    fn an_unlinked_table_goes_with_its_vmid() {
        let (mut env, l2, pages) = two_pages();
        unlink(&mut env, l2);
        env.tlbi_vmalls12e1is(VMID);
        env.dsb_ish();
        env.tlbi_vmalle1is(VMID);
        env.dsb_ish();
        env.check_quiescent();
        for pa in pages {
            env.release_frames(pa, PAGE);
        }
        assert!(env.violations.is_empty(), "{:?}", env.violations);
        assert_eq!(env.cached_for(VMID), 1, "only the root's descriptor of the level-2 table remains");
    }

    #[test]
    fn a_write_into_an_unlinked_table_keeps_what_walks_may_have_cached() {
        let (mut env, l2, pages) = two_pages();
        let Entry::Table(l3) = Entry::decode(env.read(l2, 0), 2) else { panic!("no level-3 table") };
        unlink(&mut env, l2);
        // The unlinked table is reused before any invalidation: the old translation of IPA 0 is
        // still what a TLB may hold, whatever the table says now.
        env.write(l3, 0, 0);
        env.release_frames(pages[0], PAGE);
        assert!(
            env.violations.iter().any(|v| v.contains("may still translate IPA 0x0")),
            "{:?}",
            env.violations
        );
    }

    #[test]
    fn releasing_a_frame_still_mapped_is_caught() {
        let (mut env, _, pages) = two_pages();
        env.release_frames(pages[1], PAGE);
        assert!(env.violations.iter().any(|v| v.contains("live mapping")), "{:?}", env.violations);
    }

    #[test]
    fn linking_another_vms_table_page_is_caught() {
        let (mut env, l2, _) = two_pages();
        let mut other = [Pfn(0)];
        env.take_tables(vm(2), &mut other).expect("a free frame");
        env.write(l2, 5, Entry::Table(other[0]).encode(2));
        assert!(env.violations.iter().any(|v| v.contains("like its root")), "{:?}", env.violations);
    }

    #[test]
    fn a_frame_mapped_twice_counts_twice() {
        let (mut env, l2, pages) = two_pages();
        let mut t = [Pfn(0)];
        env.take_tables(vm(1), &mut t).expect("a free frame");
        env.write(t[0], 0, Entry::Leaf { pa: pages[0], attrs: Attrs::RAM }.encode(3));
        env.write(l2, 1, Entry::Table(t[0]).encode(2));
        assert_eq!(env.leaves_mapping(Pfn(pages[0] >> 12)), 2);
        assert_eq!(
            env.first_not_mapped_once(Pfn(pages[0] >> 12), 2, FrameState::Guest(vm(1))),
            Some(Pfn(pages[0] >> 12))
        );
    }
}
