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

use std::collections::{HashMap, HashSet};
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

#[derive(Clone, Debug)]
enum Pending {
    Ipa { vmid: u16, ipa: u64 },
    Stage1 { vmid: u16, refill: Vec<CachedLeaf> },
    All { vmid: u16 },
}

/// Which maintenance to drop, to prove the model catches it.
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
}

pub struct ModelEnv {
    tables: HashMap<u64, Box<[u64; ENTRIES]>>,
    /// Frame states from `ram_base` on.
    frames: Vec<FrameState>,
    /// Heads of 2 MiB blocks the frame database holds as one unit (claimed whole for a block
    /// fault): they must be split before any part of them is released on its own.
    compound: HashSet<u64>,
    ram_base: u64,
    free_list: Vec<u64>,
    /// Root table, start level and VMID of each live address space.
    roots: Vec<(u16, Pfn, usize)>,
    /// Every table reachable from a root: its VMID, level and the first IPA it covers.
    info: HashMap<u64, (u16, usize, u64)>,
    s2: HashSet<CachedLeaf>,
    combined: HashSet<CachedLeaf>,
    walks: HashSet<CachedWalk>,
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
    pub fn new(ram_base: u64, frames: usize) -> Self {
        ModelEnv {
            tables: HashMap::new(),
            frames: vec![FrameState::Free; frames],
            compound: HashSet::new(),
            ram_base,
            free_list: (ram_base..ram_base + frames as u64).rev().collect(),
            roots: Vec::new(),
            info: HashMap::new(),
            s2: HashSet::new(),
            combined: HashSet::new(),
            walks: HashSet::new(),
            pending: Vec::new(),
            unpublished: false,
            sabotage: Sabotage::None,
            violations: Vec::new(),
            fail_tables: false,
            tlbi_count: 0,
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    fn state_mut(&mut self, pfn: u64) -> Option<&mut FrameState> {
        let i = pfn.checked_sub(self.ram_base)? as usize;
        self.frames.get_mut(i)
    }

    /// Whether the block headed at `head` is still held as one unit (for tests).
    pub fn is_compound(&self, head: Pfn) -> bool {
        self.compound.contains(&head.0)
    }

    /// Registers an address space so the model knows which VMID a table belongs to.
    pub fn add_root(&mut self, vmid: u16, root: Pfn, start_level: usize) {
        self.roots.push((vmid, root, start_level));
        self.rebuild_info();
    }

    /// Forgets an address space after its teardown.
    pub fn remove_root(&mut self, vmid: u16) {
        self.roots.retain(|r| r.0 != vmid);
        self.rebuild_info();
    }

    /// Recomputes which tables are reachable, after a table entry appeared or went.
    fn rebuild_info(&mut self) {
        let mut info = HashMap::new();
        for &(vmid, root, level) in &self.roots {
            info.insert(root.0, (vmid, level, 0));
            let (_, walks) = self.reachable(vmid);
            for w in walks {
                info.insert(w.table.0, (vmid, child_level(&w), w.ipa));
            }
        }
        self.info = info;
    }

    /// Takes a free frame for `owner` (what the atomic path does for a fault), if any is left.
    pub fn claim_frame(&mut self, state: FrameState) -> Option<Pfn> {
        let pfn = self.free_list.pop()?;
        *self.state_mut(pfn)? = state;
        Some(Pfn(pfn))
    }

    /// Claims `count` contiguous, `align`-aligned free frames (a block), if there are any.
    pub fn claim_contiguous(&mut self, count: usize, align: u64, state: FrameState) -> Option<Pfn> {
        let n = self.frames.len();
        let mut start = 0;
        while start + count <= n {
            let pfn = self.ram_base + start as u64;
            if !pfn.is_multiple_of(align) {
                start += 1;
                continue;
            }
            if self.frames[start..start + count].iter().all(|s| *s == FrameState::Free) {
                for s in &mut self.frames[start..start + count] {
                    *s = state;
                }
                // A guest's 2 MiB block is owned as one unit, as the atomic path hands it out.
                if count == 512 && pfn.is_multiple_of(512) && matches!(state, FrameState::Guest(_)) {
                    self.compound.insert(pfn);
                }
                self.free_list.retain(|&f| f < pfn || f >= pfn + count as u64);
                return Some(Pfn(pfn));
            }
            start += 1;
        }
        None
    }

    /// The guest gave `[pa, pa + size)` back (after an unmap reported it): checks that no TLB can
    /// still translate to it, then frees it.
    pub fn release_frames(&mut self, pa: u64, size: u64) {
        let end = pa + size;
        let stale: Vec<CachedLeaf> = self
            .s2
            .iter()
            .chain(self.combined.iter())
            .filter(|c| c.pa < end && pa < c.pa + c.size)
            .copied()
            .collect();
        if let Some(c) = stale.first() {
            self.violation(format!(
                "frames {pa:#x}+{size:#x} released while VMID {} may still translate IPA {:#x} to {:#x}",
                c.vmid, c.ipa, c.pa
            ));
        }
        let partial: Vec<u64> =
            self.compound.iter().filter(|&&h| h < end >> 12 && pa >> 12 < h + 512).copied().collect();
        for head in partial {
            if head < pa >> 12 || head + 512 > end >> 12 {
                self.violation(format!(
                    "frames {pa:#x}+{size:#x} released out of the 2 MiB block at {:#x}, still owned as one unit",
                    head << 12
                ));
            }
            self.compound.remove(&head);
        }
        for pfn in pa >> 12..end >> 12 {
            if let Some(s) = self.state_mut(pfn) {
                *s = FrameState::Free;
                self.free_list.push(pfn);
            }
        }
    }

    /// Every leaf and table descriptor reachable from `vmid`'s root.
    fn reachable(&self, vmid: u16) -> (Vec<CachedLeaf>, Vec<CachedWalk>) {
        let mut leaves = Vec::new();
        let mut walks = Vec::new();
        if let Some(&(_, root, level)) = self.roots.iter().find(|r| r.0 == vmid) {
            self.collect(vmid, root, level, 0, &mut leaves, &mut walks);
        }
        (leaves, walks)
    }

    fn collect(
        &self,
        vmid: u16,
        table: Pfn,
        level: usize,
        base: u64,
        leaves: &mut Vec<CachedLeaf>,
        walks: &mut Vec<CachedWalk>,
    ) {
        let Some(t) = self.tables.get(&table.0) else { return };
        for (i, &raw) in t.iter().enumerate() {
            let ipa = base + i as u64 * level_size(level);
            match Entry::decode(raw, level) {
                Entry::Invalid => {}
                Entry::Leaf { pa, attrs } => {
                    leaves.push(CachedLeaf { vmid, ipa, size: level_size(level), pa, attrs })
                }
                Entry::Table(child) => {
                    walks.push(CachedWalk { vmid, ipa, size: level_size(level), table: child });
                    if level < 3 {
                        self.collect(vmid, child, level + 1, ipa, leaves, walks);
                    }
                }
            }
        }
    }

    /// Which VMID's tables `table` is reachable from, if any.
    fn owner_vmid(&self, table: Pfn) -> Option<u16> {
        self.info.get(&table.0).map(|i| i.0)
    }

    /// Adds a translation a walker can now reach, recording a conflict if a TLB may hold a
    /// different translation for an overlapping address.
    fn cache_leaf(&mut self, l: CachedLeaf) {
        let conflict = self
            .s2
            .iter()
            .chain(self.combined.iter())
            .find(|c| {
                c.vmid == l.vmid
                    && c.ipa < l.ipa + l.size
                    && l.ipa < c.ipa + c.size
                    && !same_translation(c, &l)
            })
            .copied();
        if let Some(c) = conflict {
            self.violation(format!(
                "VMID {}: IPA {:#x} now maps {:#x} (size {:#x}) while a TLB may hold {:#x} (size {:#x}) for {:#x}: changed without break-before-make or invalidation",
                l.vmid, l.ipa, l.pa, l.size, c.pa, c.size, c.ipa
            ));
        }
        self.s2.insert(l);
        self.combined.insert(l);
    }

    /// After an invalidation completes, the current tables may be cached again at once.
    fn cache_reachable(&mut self, vmid: u16) {
        let (leaves, walks) = self.reachable(vmid);
        for l in leaves {
            self.s2.insert(l);
            self.combined.insert(l);
        }
        self.walks.extend(walks);
    }

    /// After an operation, before the guest runs again: no TLB may hold anything the tables do
    /// not say, and every table write must have been published.
    pub fn check_quiescent(&mut self) {
        if self.unpublished {
            self.violation("table writes not published with a DSB before returning".into());
            self.unpublished = false;
        }
        if !self.pending.is_empty() {
            self.violation("TLB maintenance issued but not completed with DSB ISH".into());
        }
        let vmids: Vec<u16> = self.roots.iter().map(|r| r.0).collect();
        for vmid in vmids {
            let (leaves, walks) = self.reachable(vmid);
            let leaves: HashSet<CachedLeaf> = leaves.into_iter().collect();
            let walks: HashSet<CachedWalk> = walks.into_iter().collect();
            let stale_leaf = self
                .s2
                .iter()
                .chain(self.combined.iter())
                .find(|c| c.vmid == vmid && !leaves.contains(c))
                .copied();
            if let Some(c) = stale_leaf {
                self.violation(format!(
                    "VMID {vmid}: stale TLB entry IPA {:#x} -> {:#x} (size {:#x}) outlives the operation",
                    c.ipa, c.pa, c.size
                ));
            }
            let stale_walk = self.walks.iter().find(|w| w.vmid == vmid && !walks.contains(w)).copied();
            if let Some(w) = stale_walk {
                self.violation(format!(
                    "VMID {vmid}: stale walk-cache entry for IPA {:#x} -> table {} outlives the operation",
                    w.ipa, w.table
                ));
            }
        }
    }

    /// Cached entries (stage 2, combined, walk) still tagged with `vmid`.
    pub fn cached_for(&self, vmid: u16) -> usize {
        self.s2.iter().chain(self.combined.iter()).filter(|c| c.vmid == vmid).count()
            + self.walks.iter().filter(|w| w.vmid == vmid).count()
    }

    /// Frames currently in `state`.
    pub fn frames_in(&self, state: FrameState) -> usize {
        self.frames.iter().filter(|s| **s == state).count()
    }

    fn complete(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut whole = Vec::new();
        let mut paths = Vec::new();
        for p in pending {
            match p {
                Pending::Ipa { vmid, ipa } => {
                    self.s2.retain(|c| !(c.vmid == vmid && c.ipa <= ipa && ipa < c.ipa + c.size));
                    self.walks.retain(|w| !(w.vmid == vmid && w.ipa <= ipa && ipa < w.ipa + w.size));
                    paths.push((vmid, ipa));
                }
                Pending::Stage1 { vmid, refill } => {
                    self.combined.retain(|c| c.vmid != vmid);
                    // A walk may refill combined entries from stage-2 entries cached at issue
                    // (a superset of the current ones: nothing else to add back).
                    self.combined.extend(refill);
                }
                Pending::All { vmid } => {
                    self.s2.retain(|c| c.vmid != vmid);
                    self.combined.retain(|c| c.vmid != vmid);
                    self.walks.retain(|w| w.vmid != vmid);
                    whole.push(vmid);
                }
            }
        }
        // What the current tables say may be cached again at once: the whole space after a
        // VMID-wide invalidation, else the walk path of each invalidated address.
        whole.sort_unstable();
        whole.dedup();
        for &vmid in &whole {
            self.cache_reachable(vmid);
        }
        for (vmid, ipa) in paths {
            if !whole.contains(&vmid) {
                self.cache_path(vmid, ipa);
            }
        }
    }

    /// Caches what a walk of `ipa` under `vmid` reaches now: its table descriptors and leaf.
    fn cache_path(&mut self, vmid: u16, ipa: u64) {
        let Some(&(_, root, start)) = self.roots.iter().find(|r| r.0 == vmid) else { return };
        let (mut table, mut level) = (root, start);
        loop {
            let size = level_size(level);
            let base = ipa & !(size - 1);
            let raw =
                self.tables.get(&table.0).map_or(0, |t| t[((ipa >> (12 + 9 * (3 - level))) & 511) as usize]);
            match Entry::decode(raw, level) {
                Entry::Invalid => return,
                Entry::Leaf { pa, attrs } => {
                    let l = CachedLeaf { vmid, ipa: base, size, pa, attrs };
                    self.s2.insert(l);
                    self.combined.insert(l);
                    return;
                }
                Entry::Table(child) => {
                    self.walks.insert(CachedWalk { vmid, ipa: base, size, table: child });
                    if level >= 3 {
                        return;
                    }
                    table = child;
                    level += 1;
                }
            }
        }
    }
}

/// The level of the table a walk entry points to: one below the entry's.
fn child_level(w: &CachedWalk) -> usize {
    match w.size {
        s if s == level_size(0) => 1,
        s if s == level_size(1) => 2,
        _ => 3,
    }
}

fn same_translation(a: &CachedLeaf, b: &CachedLeaf) -> bool {
    a.ipa == b.ipa && a.size == b.size && a.pa == b.pa && a.attrs == b.attrs
}

impl Stage2Env for ModelEnv {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.tables.get(&table.0).map_or(0, |t| t[index])
    }

    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        // Only pages taken as tables and not yet freed are tables (a stale cached table is not).
        if !self.tables.contains_key(&table.0) {
            self.violation(format!("entry {index} written in {table}, which is not a live table page"));
        }
        let info = self.info.get(&table.0).copied();
        let t = self.tables.entry(table.0).or_insert_with(|| Box::new([0; ENTRIES]));
        let old = t[index];
        t[index] = value;
        self.unpublished = true;
        let Some((vmid, level, base)) = info else { return };
        if old & 1 != 0 && value & 1 != 0 && old != value {
            self.violation(format!(
                "VMID {vmid}: live entry {index} of table {table} changed {old:#x} -> {value:#x} without break-before-make"
            ));
        }
        let ipa = base + index as u64 * level_size(level);
        let old_was_table = matches!(Entry::decode(old, level), Entry::Table(_));
        match Entry::decode(value, level) {
            Entry::Leaf { pa, attrs } => {
                self.cache_leaf(CachedLeaf { vmid, ipa, size: level_size(level), pa, attrs });
                if old_was_table {
                    self.rebuild_info();
                }
            }
            Entry::Table(child) => {
                self.rebuild_info();
                let mut leaves = Vec::new();
                let mut walks = vec![CachedWalk { vmid, ipa, size: level_size(level), table: child }];
                self.collect(vmid, child, level + 1, ipa, &mut leaves, &mut walks);
                for l in leaves {
                    self.cache_leaf(l);
                }
                self.walks.extend(walks);
            }
            Entry::Invalid => {
                if old_was_table {
                    self.rebuild_info();
                }
            }
        }
    }

    /// One caller at a time here: the compare and the write cannot be split by another CPU.
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        let cur = self.read(table, index);
        if cur != old {
            return Err(cur);
        }
        self.write(table, index, new);
        Ok(())
    }

    /// A table page never linked must come back as it was taken: zero, reachable from nowhere.
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        if self.tables.get(&table.0).is_some_and(|t| t.iter().any(|&e| e != 0)) {
            self.violation(format!("{table} returned unused but written"));
        }
        self.free_table(vm, table);
    }

    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        if out.is_empty() {
            return Ok(());
        }
        if self.fail_tables || self.free_list.len() < out.len() {
            return Err(Stage2Error::OutOfMemory);
        }
        for slot in out.iter_mut() {
            let pfn = self.claim_frame(FrameState::PageTable(vm)).ok_or(Stage2Error::OutOfMemory)?;
            self.tables.insert(pfn.0, Box::new([0; ENTRIES]));
            *slot = pfn;
        }
        Ok(())
    }

    fn free_table(&mut self, vm: VmId, table: Pfn) {
        let state = self.frame_state(table);
        if state != Some(FrameState::PageTable(vm)) {
            self.violation(format!("{table} freed as VM {}'s table but is {state:?}", vm.get()));
            return;
        }
        // Freeing a root ends its address space: it must be empty by then.
        if let Some(&(vmid, _, _)) = self.roots.iter().find(|r| r.1 == table) {
            if self.tables.get(&table.0).is_some_and(|t| t.iter().any(|e| e & 1 != 0)) {
                self.violation(format!("root {table} of VMID {vmid} freed with live entries"));
            }
            self.remove_root(vmid);
        } else if let Some(vmid) = self.owner_vmid(table) {
            self.violation(format!("{table} freed while still linked into VMID {vmid}'s tables"));
        }
        if let Some(w) = self.walks.iter().find(|w| w.table == table).copied() {
            self.violation(format!(
                "{table} freed while VMID {}'s walk cache may still use it for IPA {:#x}",
                w.vmid, w.ipa
            ));
        }
        self.tables.remove(&table.0);
        if let Some(s) = self.state_mut(table.0) {
            *s = FrameState::Free;
        }
        self.free_list.push(table.0);
    }

    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        let i = pfn.0.checked_sub(self.ram_base)? as usize;
        self.frames.get(i).copied()
    }

    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        let head = pfn.0 & !511;
        let run = if self.compound.contains(&head) { 512 - (pfn.0 - head) } else { 1 };
        (self.frame_state(pfn), run)
    }

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

    fn dsb_ishst(&mut self) {
        self.unpublished = false;
    }

    fn dsb_ish(&mut self) {
        self.unpublished = false;
        if self.sabotage != Sabotage::DropDsbIsh {
            self.complete();
        }
    }

    fn isb(&mut self) {}

    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, _level: usize) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropIpaTlbi {
            self.pending.push(Pending::Ipa { vmid, ipa });
        }
    }

    fn tlbi_vmalle1is(&mut self, vmid: u16) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropStage1Tlbi {
            let refill = self.s2.iter().filter(|c| c.vmid == vmid).copied().collect();
            self.pending.push(Pending::Stage1 { vmid, refill });
        }
    }

    fn tlbi_vmalls12e1is(&mut self, vmid: u16) {
        self.tlbi_count += 1;
        if self.sabotage != Sabotage::DropVmidTlbi {
            self.pending.push(Pending::All { vmid });
        }
    }
}
