//! One guest's stage-2 translation tables: the walk, the install by compare-and-swap that every
//! fault and map goes through, the structural changes (unmap, protect, split, collapse,
//! teardown), the table pages waiting to be freed, and a software walker.
//!
//! Several vCPUs install into one space at once, through `&Stage2` and no lock. Rules this
//! module keeps (the checking model, the loom models and the fuzzer check them):
//! - Invalid to valid is one compare-and-swap from 0 per entry: a page, a block, or a new table
//!   page, linked empty, top-down. No TLB maintenance, only `DSB ISHST`. A lost CAS wrote
//!   nothing; table pages that lost go back unused, still zero.
//! - Valid to anything else is a structural change, one at a time (the space's maintenance
//!   lock, which no fault takes), through one break-before-make primitive, [`Stage2::commit`]:
//!   the entry is held [`LOCKED`] (invalid: a fault's CAS from 0 fails on it and the fault
//!   re-enters the guest), `DSB ISHST`, `TLBI IPAS2E1IS` per entry (or `VMALLS12E1IS`), `DSB
//!   ISH`, `TLBI VMALLE1IS`, `DSB ISH`, `ISB`, and only then the new entry (or 0).
//! - A table page leaves the tree only with no entry at 0 (each locked or valid), so no late CAS
//!   through a stale pointer lands in it; the space's epoch moves after it left. The exclusive
//!   (`&mut self`) forms free it at once; the live forms retire it until every vCPU has passed
//!   a quiescent point ([`Stage2::drain_retired`]).
//! - Frames and table pages are handed back only after the invalidation that makes them
//!   unreachable is complete.
//! - Prepare, then commit: every table page an operation needs is taken before the first entry
//!   changes, so running out of memory leaves the address space exactly as it was.
//! - A RAM frame is mapped only if the frame database says this guest owns it (or the atomic
//!   path's claim says so), and every output address is derived from the entry's own IPA.
//!   Shared memory is the exception the frame's tag and the leaf's software bits both state:
//!   a shared-owned leaf maps a frame tagged shared-owned by this guest, a shared-borrowed leaf
//!   one tagged shared-owned by another (or by Labyrinth). Neither is reported released by an
//!   unmap, an `empty` or a teardown: they are not this guest's to free.

use core::sync::atomic::{AtomicU64 as SpaceIds, Ordering as IdOrdering};

use crate::frame::{FrameState, Pfn, VmId};

use super::desc::{
    is_locked, is_shared_leaf, locked_payload, locked_with, Attrs, Entry, MemType, PageState, LOCKED,
};
use super::env::Stage2Env;
use super::fault::FaultCache;
use super::sync::{AtomicU64, AtomicUsize, Ordering};
use super::vmid::VmidInvalidated;
use super::{Geometry, Stage2Error};

pub const ENTRIES: usize = 512;
pub const PAGE_SIZE: u64 = 4096;
/// Changes committed together; a larger operation commits in several batches.
const BATCH: usize = 32;
/// More TLBIs than this in one flush and the whole VMID is invalidated instead.
const TLBI_LIMIT: usize = 16;
/// Each space's epochs start at a distinct multiple of this, so a vCPU's cache filled from one
/// space never matches another (the new space of a reset, a VMID reused).
const EPOCH_SPAN: u64 = 1 << 32;
static NEXT_EPOCH_BASE: SpaceIds = SpaceIds::new(0);

pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (3 - level as u32)
}

pub const fn level_size(level: usize) -> u64 {
    1u64 << level_shift(level)
}

#[inline(always)]
pub(super) fn index(ipa: u64, level: usize) -> usize {
    ((ipa >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// The deepest level an address boundary needs: 1 for a 1 GiB boundary, 2 for 2 MiB, else 3.
fn boundary_level(addr: u64) -> usize {
    if addr.is_multiple_of(level_size(1)) {
        1
    } else if addr.is_multiple_of(level_size(2)) {
        2
    } else {
        3
    }
}

/// Where an entry lives and what it held when found.
#[derive(Clone, Copy, Debug)]
struct Slot {
    table: Pfn,
    index: usize,
    level: usize,
    /// IPA of the first byte the entry covers.
    base: u64,
    raw: u64,
}

/// One entry change, committed by [`Stage2::commit`].
#[derive(Clone, Copy, Debug)]
struct Change {
    table: Pfn,
    index: usize,
    level: usize,
    ipa: u64,
    old: u64,
    /// 0 to leave the entry invalid.
    new: u64,
    /// The old entry is a table whose subtree may still hold valid leaves: only invalidating
    /// the whole VMID removes all of them from the TLBs.
    live_subtree: bool,
}

impl Change {
    const NONE: Change =
        Change { table: Pfn(0), index: 0, level: 0, ipa: 0, old: 0, new: 0, live_subtree: false };
}

struct Batch {
    items: [Change; BATCH],
    len: usize,
}

impl Batch {
    fn new() -> Self {
        Batch { items: [Change::NONE; BATCH], len: 0 }
    }
    fn as_slice(&self) -> &[Change] {
        &self.items[..self.len]
    }
}

/// Why an install wrote nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Blocked {
    /// A valid entry is in the way, at `level` in `table`: a leaf (the IPA is mapped already),
    /// or a table where a block was to go.
    Occupied {
        level: usize,
        table: Pfn,
        raw: u64,
    },
    /// A structural change holds an entry on the path (or emptied the path under the walk).
    Busy,
    OutOfMemory,
}

impl Blocked {
    fn error(self, ipa: u64) -> Stage2Error {
        match self {
            Blocked::Occupied { .. } => Stage2Error::AlreadyMapped { ipa },
            Blocked::Busy => Stage2Error::Busy { ipa },
            Blocked::OutOfMemory => Stage2Error::OutOfMemory,
        }
    }
}

/// What a failed CAS (or a walk) met where it wanted 0.
fn blocked(raw: u64, level: usize, table: Pfn) -> Blocked {
    if raw & 1 != 0 {
        Blocked::Occupied { level, table, raw }
    } else {
        Blocked::Busy
    }
}

/// Where an installed leaf went: its table, and the level-2 table on its path, if any.
#[derive(Clone, Copy, Debug)]
pub(super) struct Placed {
    pub(super) table: Pfn,
    pub(super) l2: Option<Pfn>,
}

/// One install in progress, one access to shared table memory per [`Install::step`]: the walk
/// reads an entry per step down to the first invalid one (where the tables missing below are
/// taken, all or none), then each missing table is linked empty with one CAS from 0 (or the
/// one another CPU linked first is followed), and the leaf goes in with one more CAS. A table
/// page that lost its race, or that the walk turned out not to need, goes back unused in the
/// last step. [`Stage2::install`] runs the steps back to back; the fuzzer interleaves two
/// vCPUs' steps with each other and with structural changes. Holds no borrow of the space.
#[derive(Debug)]
pub(super) struct Install {
    ipa: u64,
    leaf: u64,
    /// The leaf's level.
    level: usize,
    /// The table the next step reads or writes, and its level.
    table: Pfn,
    lvl: usize,
    l2: Option<Pfn>,
    /// Walking (reads) until an invalid entry was found; linking (CAS) after.
    linking: bool,
    spare: [Pfn; 3],
    needed: usize,
    used: usize,
}

impl Install {
    pub(super) fn new(s2: &Stage2, ipa: u64, level: usize, leaf: u64) -> Install {
        let lvl = s2.geo.start_level;
        Install {
            ipa,
            leaf,
            level,
            table: s2.root,
            lvl,
            l2: (lvl == 2).then_some(s2.root),
            linking: false,
            spare: [Pfn(0); 3],
            needed: 0,
            used: 0,
        }
    }

    #[cfg(any(test, feature = "model"))]
    /// The entry the next step reads or compares-and-swaps (the fuzzer checks what it finds).
    pub(super) fn next_entry(&self) -> (Pfn, usize) {
        (self.table, index(self.ipa, self.lvl))
    }

    #[cfg(any(test, feature = "model"))]
    /// Table pages taken and neither linked nor given back yet.
    pub(super) fn tables_held(&self) -> usize {
        self.needed - self.used
    }

    /// The IPA and level of the leaf being installed.
    pub(super) fn target(&self) -> (u64, usize) {
        (self.ipa, self.level)
    }

    /// One access to the entry [`Install::next_entry`] names; the outcome once it is known.
    #[inline(always)]
    pub(super) fn step(&mut self, s2: &Stage2, env: &mut impl Stage2Env) -> Option<Result<Placed, Blocked>> {
        let (table, lvl) = (self.table, self.lvl);
        let idx = index(self.ipa, lvl);
        if !self.linking {
            let raw = env.read(table, idx);
            if raw == 0 {
                // Everything from here down is missing: take it now, before the first write.
                self.needed = self.level - lvl;
                if env.take_tables(s2.vm, &mut self.spare[..self.needed]).is_err() {
                    self.needed = 0;
                    return Some(Err(Blocked::OutOfMemory));
                }
                self.linking = true;
                return None;
            }
            if lvl < self.level {
                if let Entry::Table(next) = Entry::decode(raw, lvl) {
                    self.descend(next);
                    return None;
                }
            }
            return Some(Err(blocked(raw, lvl, table)));
        }
        let result = if lvl == self.level {
            match env.cas(table, idx, 0, self.leaf) {
                Ok(()) => Ok(Placed { table, l2: self.l2 }),
                Err(cur) => Err(blocked(cur, lvl, table)),
            }
        } else {
            // A table is missing here (or was when the walk looked): link a spare, or follow
            // the one another CPU linked first.
            let raw = if self.used < self.needed {
                let new = Entry::Table(self.spare[self.used]).encode(lvl);
                match env.cas(table, idx, 0, new) {
                    Ok(()) => {
                        // Counted as it joins the tree: a structural change may unlink it (and
                        // count it out) before this install ends.
                        s2.tables.fetch_add(1, Ordering::Relaxed);
                        self.used += 1;
                        new
                    }
                    Err(cur) => cur,
                }
            } else {
                env.read(table, idx)
            };
            match Entry::decode(raw, lvl) {
                Entry::Table(next) => {
                    self.descend(next);
                    return None;
                }
                Entry::Leaf { .. } => Err(Blocked::Occupied { level: lvl, table, raw }),
                // Locked, or a table emptied and unlinked since the walk (no spare left).
                Entry::Invalid => Err(Blocked::Busy),
            }
        };
        Some(self.finish(s2, env, result))
    }

    #[inline(always)]
    fn descend(&mut self, next: Pfn) {
        self.table = next;
        self.lvl += 1;
        if self.lvl == 2 {
            self.l2 = Some(next);
        }
    }

    /// Gives back the table pages not linked, publishes what was written.
    #[inline(always)]
    fn finish(
        &mut self,
        s2: &Stage2,
        env: &mut impl Stage2Env,
        result: Result<Placed, Blocked>,
    ) -> Result<Placed, Blocked> {
        for &t in &self.spare[self.used..self.needed] {
            env.return_unused_table(s2.vm, t);
        }
        if self.used > 0 || result.is_ok() {
            env.dsb_ishst();
        }
        self.needed = self.used;
        result
    }
}

/// Table pages that left the tree and wait for every vCPU to pass a quiescent point. Linked
/// through the pages themselves, newest first: entry 0 holds the next page, entry 1 the
/// epoch it was retired at (both [`locked_with`], so every entry stays non-zero).
#[derive(Debug, Default)]
struct Retired {
    head: Option<Pfn>,
    count: usize,
}

/// A structural change's hold on the space: the retired list, and whether the caller holds
/// the space exclusively (no fault can be running: unlinked table pages are freed at once).
struct Maint<'r> {
    retired: &'r mut Retired,
    exclusive: bool,
}

/// A mapping as the walker finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub ipa: u64,
    pub pa: u64,
    pub size: u64,
    pub attrs: Attrs,
}

/// One guest's stage-2 address space. Faults install through `&Stage2` from every vCPU at once
/// (see `stage2::fault`); structural changes take `&mut self` (every vCPU out of the guest's
/// fault path: table pages freed at once) or `&self` (the `*_live` forms: serialized among
/// themselves, racing faults safely, table pages retired for [`Stage2::drain_retired`]).
pub struct Stage2 {
    pub(super) vm: VmId,
    vmid: u16,
    geo: Geometry,
    root: Pfn,
    /// Table pages in the tree, root included (not the retired ones).
    tables: AtomicUsize,
    /// Moves (SeqCst) after every table page leaves the tree; from `epoch_base` on.
    epoch: AtomicU64,
    epoch_base: u64,
    /// Held by structural changes (never by a fault); guards the retired list.
    maint: spin::Mutex<Retired>,
    /// The cache of the exclusive fault forms (`map_page`, `vacant_block`...: the loader, the
    /// tests and the fuzzer). vCPUs keep their own [`FaultCache`].
    pub(super) own: FaultCache,
}

impl core::fmt::Debug for Stage2 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stage2")
            .field("vm", &self.vm)
            .field("vmid", &self.vmid)
            .field("root", &self.root)
            .field("tables", &self.table_pages())
            .finish_non_exhaustive()
    }
}

impl Stage2 {
    /// An empty address space for `vm`, translated under hardware VMID `vmid`.
    pub fn new(env: &mut impl Stage2Env, vm: VmId, vmid: u16, geo: Geometry) -> Result<Self, Stage2Error> {
        let mut root = [Pfn(0)];
        env.take_tables(vm, &mut root)?;
        let base = NEXT_EPOCH_BASE.fetch_add(EPOCH_SPAN, IdOrdering::Relaxed);
        Ok(Stage2 {
            vm,
            vmid,
            geo,
            root: root[0],
            tables: AtomicUsize::new(1),
            epoch: AtomicU64::new(base),
            epoch_base: base,
            maint: spin::Mutex::new(Retired::default()),
            own: FaultCache::new(),
        })
    }

    pub fn vm(&self) -> VmId {
        self.vm
    }

    pub fn vmid(&self) -> u16 {
        self.vmid
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The `VTTBR_EL2` value: root table address and VMID.
    pub fn vttbr(&self) -> u64 {
        ((self.vmid as u64) << 48) | self.root.phys()
    }

    /// Table pages in the tree, root included.
    pub fn table_pages(&self) -> usize {
        self.tables.load(Ordering::Relaxed)
    }

    /// Table pages that left the tree and wait for [`Stage2::drain_retired`].
    pub fn retired_pages(&self) -> usize {
        self.maint.lock().count
    }

    /// The space's epoch: it moves after every table page leaves the tree. A vCPU publishes
    /// it at each quiescent point (see [`super::Quiescence`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The epoch for a cache check on the fault path: a plain load. A vCPU's earlier quiescent
    /// point read it with SeqCst, and a table page is freed only after every vCPU passed one
    /// since it left (its own later loads cannot see an older value), or by an exclusive form,
    /// which no fault runs beside.
    #[inline(always)]
    pub(super) fn epoch_now(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The entry on `ipa`'s path at `stop_level`, or the first above it that is not a table.
    fn find(&self, env: &impl Stage2Env, ipa: u64, stop_level: usize) -> Slot {
        let mut table = self.root;
        let mut level = self.geo.start_level;
        loop {
            let idx = index(ipa, level);
            let raw = env.read(table, idx);
            // The entry on `ipa`'s path covers `ipa` rounded down to the level's size.
            let slot = Slot { table, index: idx, level, base: ipa & !(level_size(level) - 1), raw };
            if level >= stop_level {
                return slot;
            }
            match Entry::decode(raw, level) {
                Entry::Table(next) => {
                    table = next;
                    level += 1;
                }
                _ => return slot,
            }
        }
    }

    fn check_range(&self, ipa: u64, len: u64) -> Result<u64, Stage2Error> {
        let end = ipa.checked_add(len).ok_or(Stage2Error::OutOfRange { ipa })?;
        if len == 0 || !ipa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Stage2Error::Unaligned { addr: ipa });
        }
        if end > self.geo.ipa_limit() {
            return Err(Stage2Error::OutOfRange { ipa: end - 1 });
        }
        Ok(end)
    }

    /// Installs `leaf` (encoded for `level`) as the entry for `ipa` at `level`, racing other
    /// installers safely: an [`Install`] run to its end (see there). On an error, nothing was
    /// written except tables linked on the way (empty, now part of the tree).
    #[inline]
    pub(super) fn install(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        level: usize,
        leaf: u64,
    ) -> Result<Placed, Blocked> {
        let mut op = Install::new(self, ipa, level, leaf);
        loop {
            if let Some(result) = op.step(self, env) {
                return result;
            }
        }
    }

    /// Maps `[ipa, ipa + size of level)` to `pa` with one page (level 3) or block (levels 1, 2)
    /// entry. The target must be unmapped (`AlreadyMapped`; `Busy` while a structural change
    /// holds it). RAM frames must all belong to this guest; a Device mapping must not cover RAM.
    pub fn map(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        level: usize,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        self.map_placed(env, ipa, pa, level, attrs).map(|_| ())
    }

    /// `map`, saying where the entry went.
    pub(super) fn map_placed(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        level: usize,
        attrs: Attrs,
    ) -> Result<Placed, Stage2Error> {
        if !(1..=3).contains(&level) || level < self.geo.start_level.max(1) {
            return Err(Stage2Error::BadLevel { level });
        }
        let size = level_size(level);
        self.check_range(ipa, size)?;
        if !ipa.is_multiple_of(size) {
            return Err(Stage2Error::Unaligned { addr: ipa });
        }
        if !pa.is_multiple_of(size) || pa.checked_add(size).is_none_or(|e| e > 1 << 48) {
            return Err(Stage2Error::Unaligned { addr: pa });
        }
        self.check_owner(env, pa, size, attrs)?;
        self.install(env, ipa, level, Entry::Leaf { pa, attrs }.encode(level)).map_err(|b| b.error(ipa))
    }

    pub(super) fn check_owner(
        &self,
        env: &impl Stage2Env,
        pa: u64,
        size: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        let (first, end) = (pa >> 12, (pa + size) >> 12);
        let mut pfn = first;
        while pfn < end {
            // A block owned as one unit answers for all its frames at once.
            let (state, run) = env.frame_unit(Pfn(pfn));
            let ok = match (attrs.mem, attrs.state) {
                (MemType::Normal, PageState::Owned) => state == Some(FrameState::Guest(self.vm)),
                (MemType::Normal, PageState::SharedOwned) => state == Some(FrameState::SharedOwned(self.vm)),
                (MemType::Normal, PageState::SharedBorrowed) => {
                    matches!(state, Some(FrameState::SharedOwned(owner)) if owner != self.vm)
                }
                (MemType::Device, _) => matches!(state, None | Some(FrameState::Absent)),
            };
            if !ok {
                return Err(Stage2Error::NotOwned { pfn: Pfn(pfn), state });
            }
            pfn += run.max(1);
        }
        Ok(())
    }

    /// The level-2 table covering `ipa`, if the walk reaches one (for the exclusive block form).
    pub(super) fn l2_table(&self, env: &impl Stage2Env, ipa: u64) -> Option<Pfn> {
        if ipa >= self.geo.ipa_limit() {
            return None;
        }
        let slot = self.find(env, ipa, 2);
        (slot.level == 2).then_some(slot.table)
    }

    /// The table a walk of `base` finds at `level`, if it gets there (for cache checks).
    pub(super) fn table_at(&self, env: &impl Stage2Env, base: u64, level: usize) -> Option<Pfn> {
        let slot = self.find(env, base, level);
        (slot.level == level).then_some(slot.table)
    }

    /// The break-before-make primitive: every change of a valid entry comes through here,
    /// under the maintenance lock. Each entry is held locked until the invalidation is
    /// complete: a fault meeting it re-enters the guest.
    fn commit(&self, env: &mut impl Stage2Env, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        // Only the lock holder writes a valid entry (a fault's CAS expects 0), so the old
        // values stand and plain stores suffice.
        for c in changes {
            env.write(c.table, c.index, LOCKED);
        }
        env.dsb_ishst();
        if changes.len() > TLBI_LIMIT || changes.iter().any(|c| c.live_subtree) {
            env.tlbi_vmalls12e1is(self.vmid);
        } else {
            for c in changes {
                env.tlbi_ipas2e1is(self.vmid, c.ipa, c.level);
            }
        }
        env.dsb_ish();
        env.tlbi_vmalle1is(self.vmid);
        env.dsb_ish();
        env.isb();
        for c in changes {
            env.write(c.table, c.index, c.new);
        }
        env.dsb_ishst();
    }

    /// A table page was unlinked by a completed [`Stage2::commit`]: move the epoch (any
    /// cache holding it is stale from now on), then free it at once (exclusive) or retire it.
    fn unlinked(&self, env: &mut impl Stage2Env, m: &mut Maint<'_>, table: Pfn) {
        let stamp = self.epoch.fetch_add(1, Ordering::SeqCst);
        self.tables.fetch_sub(1, Ordering::Relaxed);
        if m.exclusive {
            env.free_table(self.vm, table);
            return;
        }
        let next = m.retired.head.map_or(0, |p| p.0 + 1);
        env.write(table, 0, locked_with(next));
        env.write(table, 1, locked_with(stamp - self.epoch_base));
        env.dsb_ishst();
        m.retired.head = Some(table);
        m.retired.count += 1;
    }

    /// Frees the retired table pages no vCPU can still hold: those retired before epoch
    /// `oldest_seen`, the oldest epoch any vCPU of the guest published at its last quiescent
    /// point ([`super::Quiescence::oldest`]). Returns how many were freed.
    pub fn drain_retired(&self, env: &mut impl Stage2Env, oldest_seen: u64) -> usize {
        let mut retired = self.maint.lock();
        self.drain(env, &mut retired, oldest_seen)
    }

    fn drain(&self, env: &mut impl Stage2Env, retired: &mut Retired, oldest_seen: u64) -> usize {
        let link = |raw: u64| match locked_payload(raw) {
            0 => None,
            n => Some(Pfn(n - 1)),
        };
        // Newest first: once one is old enough, so is every page after it.
        let (mut prev, mut cur) = (None, retired.head);
        while let Some(t) = cur {
            if self.epoch_base + locked_payload(env.read(t, 1)) < oldest_seen {
                break;
            }
            prev = Some(t);
            cur = link(env.read(t, 0));
        }
        if cur.is_none() {
            return 0;
        }
        match prev {
            Some(p) => {
                env.write(p, 0, locked_with(0));
                env.dsb_ishst();
            }
            None => retired.head = None,
        }
        let mut freed = 0;
        while let Some(t) = cur {
            cur = link(env.read(t, 0));
            env.free_table(self.vm, t);
            freed += 1;
        }
        retired.count -= freed;
        freed
    }

    /// Runs a structural change under the maintenance lock. Exclusive: unlinked table pages
    /// are freed at once, and so is everything retired before.
    fn structural<E: Stage2Env, R>(
        &self,
        env: &mut E,
        exclusive: bool,
        change: impl FnOnce(&Self, &mut E, &mut Maint<'_>) -> R,
    ) -> R {
        let mut retired = self.maint.lock();
        let mut m = Maint { retired: &mut retired, exclusive };
        let r = change(self, env, &mut m);
        if exclusive {
            self.drain(env, &mut retired, u64::MAX);
        }
        r
    }

    /// Tables needed to split the leaves around boundary `addr` down to what it needs.
    fn splits_needed(&self, env: &impl Stage2Env, addr: u64) -> usize {
        if addr == 0 || addr >= self.geo.ipa_limit() {
            return 0;
        }
        let want = boundary_level(addr);
        let slot = self.find(env, addr, want);
        match Entry::decode(slot.raw, slot.level) {
            Entry::Leaf { .. } if slot.level < want => want - slot.level,
            _ => 0,
        }
    }

    /// Splits blocks so that no leaf straddles `addr`, taking tables from `spare`.
    fn split_at(&self, env: &mut impl Stage2Env, addr: u64, spare: &mut &[Pfn]) {
        if addr == 0 || addr >= self.geo.ipa_limit() {
            return;
        }
        let want = boundary_level(addr);
        loop {
            let slot = self.find(env, addr, want);
            let Entry::Leaf { .. } = Entry::decode(slot.raw, slot.level) else { return };
            if slot.level >= want {
                return;
            }
            let Some((&table, rest)) = spare.split_first() else { return };
            *spare = rest;
            self.split_slot(env, slot, table);
        }
    }

    /// Replaces the block in `slot` with a table of `table` mapping the same memory.
    fn split_slot(&self, env: &mut impl Stage2Env, slot: Slot, table: Pfn) {
        let Entry::Leaf { pa, attrs } = Entry::decode(slot.raw, slot.level) else { return };
        let child = slot.level + 1;
        let step = level_size(child);
        // A 2 MiB block becomes 512 pages that may go their own ways: the frame database stops
        // holding its frames as one unit (a 1 GiB split keeps 2 MiB blocks, which stay units).
        if child == 3 && attrs.mem == MemType::Normal {
            env.split_frames(self.vm, Pfn(pa >> 12));
        }
        // The new table is unreachable until the commit: plain writes, each entry's output
        // address derived from its own IPA's offset in the block.
        for i in 0..ENTRIES {
            let ipa = slot.base + i as u64 * step;
            env.write(table, i, Entry::Leaf { pa: pa + (ipa - slot.base), attrs }.encode(child));
        }
        let change = Change {
            table: slot.table,
            index: slot.index,
            level: slot.level,
            ipa: slot.base,
            old: slot.raw,
            new: Entry::Table(table).encode(slot.level),
            live_subtree: false,
        };
        self.commit(env, &[change]);
        self.tables.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the tables that splitting at both ends of `[ipa, end)` needs: all, or none.
    fn prepare_edges(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        end: u64,
        spare: &mut [Pfn; 4],
    ) -> Result<usize, Stage2Error> {
        let n = self.splits_needed(env, ipa) + self.splits_needed(env, end);
        env.take_tables(self.vm, &mut spare[..n])?;
        Ok(n)
    }

    fn split_edges(&self, env: &mut impl Stage2Env, ipa: u64, end: u64, spare: &[Pfn]) {
        let mut left = spare;
        self.split_at(env, ipa, &mut left);
        self.split_at(env, end, &mut left);
        // Both edges in one block take fewer tables than counted: give the rest back unused.
        for &t in left {
            env.return_unused_table(self.vm, t);
        }
    }

    /// Splits the block mapping `ipa` at `level` into a table of next-level entries (every vCPU
    /// out of the fault path).
    pub fn split(&mut self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
        self.structural(env, true, |s2, env, _| s2.split_block(env, ipa, level))
    }

    /// [`Stage2::split`] while vCPUs fault: a fault into the block's 2 MiB meanwhile finds its
    /// entry locked and re-enters the guest.
    pub fn split_live(&self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
        self.structural(env, false, |s2, env, _| s2.split_block(env, ipa, level))
    }

    fn split_block(&self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
        self.check_range(ipa & !(PAGE_SIZE - 1), PAGE_SIZE)?;
        let slot = self.find(env, ipa, level);
        match Entry::decode(slot.raw, slot.level) {
            Entry::Leaf { .. } if slot.level == level && level < 3 => {}
            _ => return Err(Stage2Error::NotABlock { ipa, level }),
        }
        let mut t = [Pfn(0)];
        env.take_tables(self.vm, &mut t)?;
        self.split_slot(env, slot, t[0]);
        Ok(())
    }

    /// Replaces the table at `level` covering `ipa` with one block, if its entries map one
    /// aligned, contiguous range with identical attributes; the table page is freed.
    pub fn collapse(&mut self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
        self.structural(env, true, |s2, env, m| s2.collapse_table(env, m, ipa, level))
    }

    /// [`Stage2::collapse`] while vCPUs fault: the table page is retired, not freed.
    pub fn collapse_live(&self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
        self.structural(env, false, |s2, env, m| s2.collapse_table(env, m, ipa, level))
    }

    fn collapse_table(
        &self,
        env: &mut impl Stage2Env,
        m: &mut Maint<'_>,
        ipa: u64,
        level: usize,
    ) -> Result<(), Stage2Error> {
        if !(1..=2).contains(&level) || level < self.geo.start_level.max(1) {
            return Err(Stage2Error::BadLevel { level });
        }
        self.check_range(ipa & !(PAGE_SIZE - 1), PAGE_SIZE)?;
        let slot = self.find(env, ipa, level);
        let Entry::Table(child) = Entry::decode(slot.raw, slot.level) else {
            return Err(Stage2Error::NotCollapsible { ipa });
        };
        if slot.level != level {
            return Err(Stage2Error::NotCollapsible { ipa });
        }
        // Every entry valid (faults only fill invalid ones, so that stays true): no late CAS
        // can land in the table once it is unlinked.
        let step = level_size(level + 1);
        let (base, attrs) = match Entry::decode(env.read(child, 0), level + 1) {
            Entry::Leaf { pa, attrs } if pa % level_size(level) == 0 => (pa, attrs),
            _ => return Err(Stage2Error::NotCollapsible { ipa }),
        };
        for i in 1..ENTRIES {
            let want = Entry::Leaf { pa: base + i as u64 * step, attrs };
            if Entry::decode(env.read(child, i), level + 1) != want {
                return Err(Stage2Error::NotCollapsible { ipa });
            }
        }
        let change = Change {
            table: slot.table,
            index: slot.index,
            level,
            ipa: slot.base,
            old: slot.raw,
            new: Entry::Leaf { pa: base, attrs }.encode(level),
            live_subtree: true,
        };
        self.commit(env, &[change]);
        self.unlinked(env, m, child);
        Ok(())
    }

    /// Visits the leaves inside `[start, end)` (which no leaf straddles), post-order over tables.
    fn visit_leaves(
        &self,
        env: &impl Stage2Env,
        table: Pfn,
        level: usize,
        base: u64,
        range: &core::ops::Range<u64>,
        f: &mut dyn FnMut(Slot),
    ) {
        let (start, end) = (range.start, range.end);
        let size = level_size(level);
        let first = if start > base { ((start - base) / size) as usize } else { 0 };
        for idx in first..ENTRIES {
            let eb = base + idx as u64 * size;
            if eb >= end {
                break;
            }
            let raw = env.read(table, idx);
            match Entry::decode(raw, level) {
                Entry::Invalid => {}
                Entry::Table(next) => self.visit_leaves(env, next, level + 1, eb, range, f),
                Entry::Leaf { .. } => f(Slot { table, index: idx, level, base: eb, raw }),
            }
        }
    }

    /// Applies `make` to every leaf in `[ipa, end)` in batches through the primitive; `after`
    /// sees each change once its invalidation is complete. A leaf straddling an end (a fault
    /// mapped a block there after the edges were split) is left alone: that fault comes after
    /// this change.
    fn change_leaves(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        end: u64,
        make: &dyn Fn(&Slot) -> Option<u64>,
        after: &mut dyn FnMut(&Change),
    ) {
        // Collect in batches; entries are re-found per batch because committing changes them.
        let mut cursor = ipa;
        while cursor < end {
            let mut batch = Batch::new();
            let mut next = end;
            {
                let (root, start_level) = (self.root, self.geo.start_level);
                let items = &mut batch;
                self.visit_leaves(env, root, start_level, 0, &(cursor..end), &mut |s: Slot| {
                    if s.base < ipa || s.base + level_size(s.level) > end {
                        return;
                    }
                    if items.len == BATCH {
                        if s.base < next {
                            next = s.base;
                        }
                        return;
                    }
                    if let Some(new) = make(&s) {
                        items.items[items.len] = Change {
                            table: s.table,
                            index: s.index,
                            level: s.level,
                            ipa: s.base,
                            old: s.raw,
                            new,
                            live_subtree: false,
                        };
                        items.len += 1;
                    }
                });
            }
            self.commit(env, batch.as_slice());
            for c in batch.as_slice() {
                after(c);
            }
            cursor = next;
        }
    }

    /// Unmaps every page in `[ipa, ipa + len)`, splitting blocks that straddle its ends.
    /// `released(pa, size)` gets each unmapped range once no TLB can translate to it; table
    /// pages left empty are freed. Every vCPU out of the fault path.
    pub fn unmap(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        released: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Stage2Error> {
        self.structural(env, true, |s2, env, m| s2.unmap_range(env, m, ipa, len, released))
    }

    /// [`Stage2::unmap`] while vCPUs fault: table pages left empty are retired for
    /// [`Stage2::drain_retired`]. A fault into the range meanwhile either lands before its
    /// entry is locked (and is unmapped with it) or after (and stays mapped).
    pub fn unmap_live(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        released: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Stage2Error> {
        self.structural(env, false, |s2, env, m| s2.unmap_range(env, m, ipa, len, released))
    }

    fn unmap_range(
        &self,
        env: &mut impl Stage2Env,
        m: &mut Maint<'_>,
        ipa: u64,
        len: u64,
        released: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Stage2Error> {
        let end = self.check_range(ipa, len)?;
        let mut spare = [Pfn(0); 4];
        let n = self.prepare_edges(env, ipa, end, &mut spare)?;
        self.split_edges(env, ipa, end, &spare[..n]);
        self.change_leaves(env, ipa, end, &|_| Some(0), &mut |c| {
            if let Entry::Leaf { pa, attrs } = Entry::decode(c.old, c.level) {
                // Shared memory is unmapped, never freed by this guest.
                if !attrs.is_shared() {
                    released(pa, level_size(c.level));
                }
            }
        });
        let (root, level) = (self.root, self.geo.start_level);
        self.reclaim_in(env, m, root, level, 0, ipa, end);
        Ok(())
    }

    /// Gives every mapped page in `[ipa, ipa + len)` the attributes `attrs` (output addresses
    /// stay), splitting blocks that straddle its ends. Unmapped pages stay unmapped.
    pub fn protect(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        self.structural(env, true, |s2, env, _| s2.protect_range(env, ipa, len, attrs))
    }

    /// [`Stage2::protect`] while vCPUs fault.
    pub fn protect_live(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        self.structural(env, false, |s2, env, _| s2.protect_range(env, ipa, len, attrs))
    }

    fn protect_range(
        &self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        let end = self.check_range(ipa, len)?;
        let mut spare = [Pfn(0); 4];
        let n = self.prepare_edges(env, ipa, end, &mut spare)?;
        self.split_edges(env, ipa, end, &spare[..n]);
        self.change_leaves(
            env,
            ipa,
            end,
            &|s| match Entry::decode(s.raw, s.level) {
                Entry::Leaf { pa, attrs: old } if old != attrs => {
                    Some(Entry::Leaf { pa, attrs }.encode(s.level))
                }
                _ => None,
            },
            &mut |_| {},
        );
        Ok(())
    }

    /// Unlinks every table under `[start, end)` that holds no valid entry; returns whether
    /// `table` holds none afterwards.
    #[allow(clippy::too_many_arguments)]
    fn reclaim_in(
        &self,
        env: &mut impl Stage2Env,
        m: &mut Maint<'_>,
        table: Pfn,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
    ) -> bool {
        let size = level_size(level);
        // Only the entries the range touches: a give-back of one page visits one per level.
        let first = (start.saturating_sub(base) / size) as usize;
        let last = (end.saturating_sub(base).div_ceil(size) as usize).min(ENTRIES);
        for idx in first..last {
            let eb = base + idx as u64 * size;
            let raw = env.read(table, idx);
            if let Entry::Table(child) = Entry::decode(raw, level) {
                if self.reclaim_in(env, m, child, level + 1, eb, start, end) && self.hold_empty(env, m, child)
                {
                    let change =
                        Change { table, index: idx, level, ipa: eb, old: raw, new: 0, live_subtree: false };
                    self.commit(env, &[change]);
                    self.unlinked(env, m, child);
                }
            }
        }
        (0..ENTRIES).all(|i| env.read(table, i) == 0)
    }

    /// Locks every entry of the empty `table` before it is unlinked, so that no fault can
    /// install into it through a pointer it already holds; `false` (nothing left locked) if a
    /// fault got an entry in first. Exclusive callers race no fault.
    fn hold_empty(&self, env: &mut impl Stage2Env, m: &Maint<'_>, table: Pfn) -> bool {
        if m.exclusive {
            return true;
        }
        for i in 0..ENTRIES {
            if env.cas(table, i, 0, LOCKED).is_err() {
                for j in 0..i {
                    env.write(table, j, 0);
                }
                env.dsb_ishst();
                return false;
            }
        }
        true
    }

    /// Destroys the address space: every entry goes, the VMID's TLB entries are invalidated,
    /// then `released` gets every mapped range and every table page (root and retired ones
    /// included) is freed. Every vCPU of the guest must be out of it (the space is consumed).
    /// The returned proof lets the VMID be reused.
    pub fn teardown(self, env: &mut impl Stage2Env, released: &mut dyn FnMut(u64, u64)) -> VmidInvalidated {
        self.destroy(env, released)
    }

    /// Empties the space in place (a guest's reset): every entry under the root goes, the
    /// VMID's TLB entries are invalidated, `released` gets every mapped range, every table page
    /// but the root is freed, and the epoch moves so that no vCPU's cache matches any more.
    /// Every vCPU of the guest must be out of it and stay out until this returns.
    pub fn empty(&self, env: &mut impl Stage2Env, released: &mut dyn FnMut(u64, u64)) {
        let (start, entries) = (self.geo.start_level, self.geo.root_entries());
        let mut live = [0u64; ENTRIES];
        for (i, slot) in live.iter_mut().enumerate().take(entries) {
            *slot = env.read(self.root, i);
            if *slot != 0 {
                env.write(self.root, i, 0);
            }
        }
        env.dsb_ishst();
        env.tlbi_vmalls12e1is(self.vmid);
        env.dsb_ish();
        env.isb();
        for &raw in live.iter().take(entries) {
            self.release_subtree(env, raw, start, released);
        }
        let mut retired = self.maint.lock();
        self.drain(env, &mut retired, u64::MAX);
        self.tables.store(1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Destroys the address space in place (a guest that stopped for good): [`Stage2::empty`],
    /// then the root page is freed too. The space must never be used again (its guest's vCPUs
    /// never re-enter); the returned proof lets the VMID be reused.
    pub fn destroy(&self, env: &mut impl Stage2Env, released: &mut dyn FnMut(u64, u64)) -> VmidInvalidated {
        self.empty(env, released);
        self.tables.store(0, Ordering::SeqCst);
        env.free_table(self.vm, self.root);
        VmidInvalidated(self.vmid)
    }

    fn release_subtree(
        &self,
        env: &mut impl Stage2Env,
        raw: u64,
        level: usize,
        released: &mut dyn FnMut(u64, u64),
    ) {
        match Entry::decode(raw, level) {
            Entry::Invalid => {}
            // Shared memory (lent or borrowed) is not this guest's to free.
            Entry::Leaf { attrs, .. } if attrs.is_shared() => {}
            Entry::Leaf { pa, .. } => released(pa, level_size(level)),
            Entry::Table(child) => {
                // Eight entries a read: most of a table is empty, skipped a run at a time.
                let mut run = [0u64; 8];
                for first in (0..ENTRIES).step_by(run.len()) {
                    env.read_run(child, first, &mut run);
                    if run.iter().fold(0, |a, e| a | e) == 0 {
                        continue;
                    }
                    for &r in run.iter().filter(|&&r| r != 0) {
                        self.release_subtree(env, r, level + 1, released);
                    }
                }
                env.free_table(self.vm, child);
            }
        }
    }

    /// Whether nothing is mapped in the `level`-sized, aligned region containing `ipa` (no leaf
    /// and no table there, nor a structural change holding it): a block could be mapped
    /// without touching any entry.
    #[inline]
    pub fn is_unmapped(&self, env: &impl Stage2Env, ipa: u64, level: usize) -> bool {
        self.find(env, ipa, level).raw == 0
    }

    /// Whether `ipa` is mapped to shared memory (lent or borrowed): such a page is not this
    /// guest's to give back. One walk, no lock.
    pub fn is_shared(&self, env: &impl Stage2Env, ipa: u64) -> bool {
        ipa < self.geo.ipa_limit() && is_shared_leaf(self.find(env, ipa, 3).raw)
    }

    /// Whether a structural change holds the entry on `ipa`'s path (for tests).
    pub fn is_held(&self, env: &impl Stage2Env, ipa: u64) -> bool {
        is_locked(self.find(env, ipa, 3).raw)
    }

    /// Translates `ipa` as the MMU would.
    pub fn translate(&self, env: &impl Stage2Env, ipa: u64) -> Option<Mapping> {
        if ipa >= self.geo.ipa_limit() {
            return None;
        }
        let slot = self.find(env, ipa, 3);
        match Entry::decode(slot.raw, slot.level) {
            Entry::Leaf { pa, attrs } => {
                let size = level_size(slot.level);
                Some(Mapping {
                    ipa: ipa & !(PAGE_SIZE - 1),
                    pa: pa + ((ipa & (size - 1)) & !(PAGE_SIZE - 1)),
                    size: PAGE_SIZE,
                    attrs,
                })
            }
            _ => None,
        }
    }

    /// Every leaf mapping in IPA order (for tests, the fuzzer and the debug dump).
    pub fn for_each_mapping(&self, env: &impl Stage2Env, f: &mut dyn FnMut(Mapping)) {
        self.visit_leaves(env, self.root, self.geo.start_level, 0, &(0..self.geo.ipa_limit()), &mut |s| {
            if let Entry::Leaf { pa, attrs } = Entry::decode(s.raw, s.level) {
                f(Mapping { ipa: s.base, pa, size: level_size(s.level), attrs });
            }
        });
    }

    /// The mappings as runs: consecutive leaves that continue each other (contiguous IPA and PA,
    /// same attributes) are reported once, as `(first mapping, total size)`; for a debug log.
    pub fn for_each_run(&self, env: &impl Stage2Env, f: &mut dyn FnMut(Mapping)) {
        let mut run: Option<Mapping> = None;
        self.for_each_mapping(env, &mut |m| match run.as_mut() {
            Some(r) if r.ipa + r.size == m.ipa && r.pa + r.size == m.pa && r.attrs == m.attrs => {
                r.size += m.size
            }
            _ => {
                if let Some(r) = run.take() {
                    f(r);
                }
                run = Some(m);
            }
        });
        if let Some(r) = run {
            f(r);
        }
    }

    /// Every table page in the tree, root first (for the audit and the fuzzer).
    pub fn for_each_table(&self, env: &impl Stage2Env, f: &mut dyn FnMut(Pfn)) {
        f(self.root);
        self.tables_under(env, self.root, self.geo.start_level, f);
    }

    fn tables_under(&self, env: &impl Stage2Env, table: Pfn, level: usize, f: &mut dyn FnMut(Pfn)) {
        if level >= 3 {
            return;
        }
        for i in 0..ENTRIES {
            if let Entry::Table(child) = Entry::decode(env.read(table, i), level) {
                f(child);
                self.tables_under(env, child, level + 1, f);
            }
        }
    }
}
