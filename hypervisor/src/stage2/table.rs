//! One guest's stage-2 translation tables: map, unmap, protect, split, collapse, teardown, and a
//! software walker.
//!
//! Rules this module keeps (and the fuzzer's model checks):
//! - Invalid to valid needs no TLB maintenance, only `DSB ISHST` before the guest can see it.
//! - Every change of a valid entry (remove, new attributes, block to table, table to block) goes
//!   through one break-before-make primitive, [`Stage2::commit`]: write invalid, `DSB ISHST`,
//!   `TLBI IPAS2E1IS` per entry (or `VMALLS12E1IS` when a live subtree goes), `DSB ISH`,
//!   `TLBI VMALLE1IS`, `DSB ISH`, `ISB`, and only then the new entry.
//! - Frames and table pages are handed back only after that invalidation is complete.
//! - Prepare, then commit: every table page an operation needs is taken before the first entry
//!   changes, so running out of memory leaves the address space exactly as it was.
//! - A RAM frame is mapped only if the frame database says this guest owns it.

use crate::frame::{ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

use super::desc::{Attrs, Entry, MemType};
use super::env::Stage2Env;
use super::vmid::VmidInvalidated;
use super::{Geometry, Stage2Error};

pub const ENTRIES: usize = 512;
pub const PAGE_SIZE: u64 = 4096;
/// Changes committed together; a larger operation commits in several batches.
const BATCH: usize = 32;
/// More TLBIs than this in one flush and the whole VMID is invalidated instead.
const TLBI_LIMIT: usize = 16;

pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (3 - level as u32)
}

pub const fn level_size(level: usize) -> u64 {
    1u64 << level_shift(level)
}

fn index(ipa: u64, level: usize) -> usize {
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

impl VacantBlock<'_> {
    /// The first IPA of the 2 MiB it would map.
    pub fn ipa(&self) -> u64 {
        self.ipa
    }

    /// Second half: maps the 2 MiB at `pa` (2 MiB-aligned) here with one block entry, if the
    /// frame database holds it as one unit owned by this guest (one tag: the block head's).
    /// RAM only. On error nothing changed.
    #[inline(always)]
    pub fn map(self, env: &mut impl Stage2Env, pa: u64, attrs: Attrs) -> Result<(), Stage2Error> {
        if !pa.is_multiple_of(level_size(2)) || pa >= 1 << 48 {
            return Err(Stage2Error::Unaligned { addr: pa });
        }
        let head = Pfn(pa >> 12);
        if attrs.mem != MemType::Normal || !env.block_is(head, FrameState::Guest(self.s2.vm)) {
            return Err(Stage2Error::NotOwned { pfn: head, state: env.frame_state(head) });
        }
        // Invalid to valid: no TLB maintenance, only the publishing barrier.
        env.write(self.table, self.index, Entry::Leaf { pa, attrs }.encode(2));
        env.dsb_ishst();
        Ok(())
    }
}

impl VacantBlock<'_> {
    /// [`VacantBlock::map`] for a block the atomic path has just claimed for this guest: the
    /// claim stands for the owner check (see [`ClaimedBlock`]); a claim for another guest is
    /// handed back, nothing written.
    #[inline(always)]
    pub fn fill(self, env: &mut impl Stage2Env, block: ClaimedBlock) -> Result<(), ClaimedBlock> {
        if block.vm() != self.s2.vm {
            return Err(block);
        }
        env.write(
            self.table,
            self.index,
            Entry::Leaf { pa: block.pfn().phys(), attrs: Attrs::RAM }.encode(2),
        );
        env.dsb_ishst();
        Ok(())
    }
}

/// A mapping as the walker finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub ipa: u64,
    pub pa: u64,
    pub size: u64,
    pub attrs: Attrs,
}

/// A free level-3 entry of one guest's space, found by [`Stage2::cached_page_slot`] and
/// holding the space's borrow until it is filled.
pub struct PageSlot<'s> {
    vm: VmId,
    table: Pfn,
    index: usize,
    _space: core::marker::PhantomData<&'s mut Stage2>,
}

impl PageSlot<'_> {
    /// Maps `page` here as guest RAM. The claim stands for the owner check (see
    /// [`ClaimedPage`]); a claim for another guest is handed back, nothing written.
    #[inline(always)]
    pub fn fill(self, env: &mut impl Stage2Env, page: ClaimedPage) -> Result<(), ClaimedPage> {
        if page.vm() != self.vm {
            return Err(page);
        }
        env.write(self.table, self.index, Entry::Leaf { pa: page.pfn().phys(), attrs: Attrs::RAM }.encode(3));
        env.dsb_ishst();
        Ok(())
    }
}

/// One guest's stage-2 address space.
#[derive(Debug)]
pub struct Stage2 {
    vm: VmId,
    vmid: u16,
    geo: Geometry,
    root: Pfn,
    tables: usize,
    /// The level-3 table the last page went into, and the 2 MiB it covers: demand faults come
    /// in runs, so most skip the walk. Forgotten whenever a table page is freed.
    last_l3: Option<(u64, Pfn)>,
    /// The level-2 table the last block fault looked in, and the 1 GiB it covers: block faults
    /// come in runs too. Forgotten, like `last_l3`, whenever a table page is freed (the only
    /// way a level-1 entry stops pointing at it); teardown consumes the whole space.
    last_l2: Option<(u64, Pfn)>,
}

/// An invalid level-2 entry found by [`Stage2::vacant_block`]: nothing is mapped in its 2 MiB
/// and no table hangs there. It borrows the space mutably, so no other operation can change
/// the tables before [`VacantBlock::map`] fills it.
#[derive(Debug)]
pub struct VacantBlock<'a> {
    s2: &'a mut Stage2,
    table: Pfn,
    index: usize,
    ipa: u64,
}

impl Stage2 {
    /// An empty address space for `vm`, translated under hardware VMID `vmid`.
    pub fn new(env: &mut impl Stage2Env, vm: VmId, vmid: u16, geo: Geometry) -> Result<Self, Stage2Error> {
        let mut root = [Pfn(0)];
        env.take_tables(vm, &mut root)?;
        Ok(Stage2 { vm, vmid, geo, root: root[0], tables: 1, last_l3: None, last_l2: None })
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

    /// Table pages in use, root included.
    pub fn table_pages(&self) -> usize {
        self.tables
    }

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

    /// Maps `[ipa, ipa + size of level)` to `pa` with one page (level 3) or block (levels 1, 2)
    /// entry. The target must be unmapped. RAM frames must all belong to this guest; a Device
    /// mapping must not cover RAM.
    pub fn map(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        level: usize,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
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
        self.check_owner(env, pa, size, attrs.mem)?;

        // Prepare: how many new tables between the deepest existing entry and `level`.
        let slot = self.find(env, ipa, level);
        if slot.raw & 1 != 0 {
            return Err(Stage2Error::AlreadyMapped { ipa });
        }
        let needed = level - slot.level;
        let mut fresh = [Pfn(0); 3];
        env.take_tables(self.vm, &mut fresh[..needed])?;

        // Commit: fill the unreachable new tables bottom-up, then publish with one write.
        let leaf = Entry::Leaf { pa, attrs }.encode(level);
        if needed == 0 {
            env.write(slot.table, slot.index, leaf);
        } else {
            env.write(fresh[needed - 1], index(ipa, level), leaf);
            for i in (1..needed).rev() {
                let lvl = slot.level + i;
                env.write(fresh[i - 1], index(ipa, lvl), Entry::Table(fresh[i]).encode(lvl));
            }
            env.dsb_ishst();
            env.write(slot.table, slot.index, Entry::Table(fresh[0]).encode(slot.level));
            self.tables += needed;
        }
        env.dsb_ishst();
        Ok(())
    }

    /// Maps one 4 KiB page (the demand-fault path): like `map` at level 3, with a shortcut when
    /// the page's level-3 table is the one the previous page went into.
    #[inline(always)]
    pub fn map_page(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        if pa.is_multiple_of(PAGE_SIZE) {
            if let Some(slot) = self.cached_l3_slot(env, ipa) {
                let (table, idx) = slot?;
                // One frame: its owner, checked inline (a block's tail answers through its head).
                let pfn = Pfn(pa >> 12);
                if attrs.mem != MemType::Normal || !env.frame_is(pfn, FrameState::Guest(self.vm)) {
                    let state = env.frame_state(pfn);
                    if attrs.mem != MemType::Normal || state != Some(FrameState::Guest(self.vm)) {
                        return Err(Stage2Error::NotOwned { pfn, state });
                    }
                }
                env.write(table, idx, Entry::Leaf { pa, attrs }.encode(3));
                env.dsb_ishst();
                return Ok(());
            }
        }
        self.map_page_walk(env, ipa, pa, attrs)
    }

    /// The demand-fault fast path's first step: the free level-3 slot of page `ipa` when it
    /// lies in the table the previous page went into, or `None` (walk, already mapped: the
    /// general path's business). The slot borrows the space, so no table can change before
    /// [`PageSlot::fill`] writes it.
    #[inline(always)]
    pub fn cached_page_slot(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<PageSlot<'_>> {
        let (table, index) = self.cached_l3_slot(env, ipa)?.ok()?;
        Some(PageSlot { vm: self.vm, table, index, _space: core::marker::PhantomData })
    }

    /// The free level-3 slot of page `ipa` when it lies in the table the previous page went
    /// into (`None`: walk), or why it cannot be mapped.
    #[inline(always)]
    fn cached_l3_slot(&self, env: &impl Stage2Env, ipa: u64) -> Option<Result<(Pfn, usize), Stage2Error>> {
        let (base, table) = self.last_l3?;
        if ipa & !(level_size(2) - 1) != base || !ipa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let idx = index(ipa, 3);
        Some(if env.read(table, idx) & 1 != 0 {
            Err(Stage2Error::AlreadyMapped { ipa })
        } else {
            Ok((table, idx))
        })
    }

    /// `map_page` without the shortcut: the general map, then remember the level-3 table.
    #[inline(never)]
    fn map_page_walk(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        self.map(env, ipa, pa, 3, attrs)?;
        let slot = self.find(env, ipa, 3);
        if slot.level == 3 {
            self.last_l3 = Some((ipa & !(level_size(2) - 1), slot.table));
        }
        Ok(())
    }

    /// The block-fault form of a 2 MiB map, first half: the invalid level-2 entry for the
    /// aligned 2 MiB around `ipa`, found through the cached level-2 table (one read when the
    /// fault is in the same 1 GiB as the last one). `None` when something is mapped there, when
    /// no level-2 table covers it yet (the general `map` builds one), or when `ipa` is outside
    /// the IPA space. Takes and changes nothing, so the caller can decline after it for free.
    #[inline(always)]
    pub fn vacant_block(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<VacantBlock<'_>> {
        if !self.l2_cached_for(ipa) {
            self.find_l2(env, ipa)?;
        }
        self.cached_vacant_block(env, ipa)
    }

    /// [`Stage2::vacant_block`] through the cached level-2 table only: `None` on a miss too
    /// (the fast path then declines rather than walk, so it makes no call; the general path's
    /// [`Stage2::map_block`] remembers the table for the next fault).
    #[inline(always)]
    pub fn cached_vacant_block(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<VacantBlock<'_>> {
        let table = match self.last_l2 {
            Some((base, table)) if ipa & !(level_size(1) - 1) == base => table,
            _ => return None,
        };
        let index = index(ipa, 2);
        if env.read(table, index) & 1 != 0 {
            return None;
        }
        Some(VacantBlock { s2: self, table, index, ipa: ipa & !(level_size(2) - 1) })
    }

    /// Whether the cached level-2 table covers `ipa`'s 1 GiB.
    #[inline(always)]
    fn l2_cached_for(&self, ipa: u64) -> bool {
        matches!(self.last_l2, Some((base, _)) if ipa & !(level_size(1) - 1) == base)
    }

    /// `map` of a 2 MiB block (the general block-fault path), then remember its level-2 table
    /// for [`Stage2::cached_vacant_block`].
    pub fn map_block(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        self.map(env, ipa, pa, 2, attrs)?;
        self.find_l2(env, ipa);
        Ok(())
    }

    /// `vacant_block`'s walk: the level-2 table covering `ipa`, if there is one, remembered.
    #[inline(never)]
    fn find_l2(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<Pfn> {
        if ipa >= self.geo.ipa_limit() {
            return None;
        }
        let slot = self.find(env, ipa, 2);
        if slot.level != 2 {
            return None;
        }
        self.last_l2 = Some((ipa & !(level_size(1) - 1), slot.table));
        Some(slot.table)
    }

    /// A table page is about to be freed: no cached table may outlive it.
    fn forget_cached_tables(&mut self) {
        self.last_l3 = None;
        self.last_l2 = None;
    }

    /// Whether the cached tables are the ones a walk finds now (for tests and the fuzzer).
    pub fn caches_agree(&self, env: &impl Stage2Env) -> bool {
        let l3 = self.last_l3.is_none_or(|(base, t)| {
            let slot = self.find(env, base, 3);
            slot.level == 3 && slot.table == t
        });
        let l2 = self.last_l2.is_none_or(|(base, t)| {
            let slot = self.find(env, base, 2);
            slot.level == 2 && slot.table == t
        });
        l3 && l2
    }

    fn check_owner(&self, env: &impl Stage2Env, pa: u64, size: u64, mem: MemType) -> Result<(), Stage2Error> {
        let (first, end) = (pa >> 12, (pa + size) >> 12);
        let mut pfn = first;
        while pfn < end {
            // A block owned as one unit answers for all its frames at once.
            let (state, run) = env.frame_unit(Pfn(pfn));
            let ok = match mem {
                MemType::Normal => state == Some(FrameState::Guest(self.vm)),
                MemType::Device => matches!(state, None | Some(FrameState::Absent)),
            };
            if !ok {
                return Err(Stage2Error::NotOwned { pfn: Pfn(pfn), state });
            }
            pfn += run.max(1);
        }
        Ok(())
    }

    /// The break-before-make primitive: every change of a valid entry comes through here.
    fn commit(&mut self, env: &mut impl Stage2Env, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        for c in changes {
            env.write(c.table, c.index, 0);
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
        let mut made = false;
        for c in changes.iter().filter(|c| c.new != 0) {
            env.write(c.table, c.index, c.new);
            made = true;
        }
        if made {
            env.dsb_ishst();
        }
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
    fn split_at(&mut self, env: &mut impl Stage2Env, addr: u64, spare: &mut &[Pfn]) {
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
    fn split_slot(&mut self, env: &mut impl Stage2Env, slot: Slot, table: Pfn) {
        let Entry::Leaf { pa, attrs } = Entry::decode(slot.raw, slot.level) else { return };
        let child = slot.level + 1;
        let step = level_size(child);
        // A 2 MiB block becomes 512 pages that may go their own ways: the frame database stops
        // holding its frames as one unit (a 1 GiB split keeps 2 MiB blocks, which stay units).
        if child == 3 && attrs.mem == MemType::Normal {
            env.split_frames(self.vm, Pfn(pa >> 12));
        }
        for i in 0..ENTRIES {
            env.write(table, i, Entry::Leaf { pa: pa + i as u64 * step, attrs }.encode(child));
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
        self.tables += 1;
    }

    /// Takes the tables that splitting at both ends of `[ipa, end)` needs: all, or none.
    fn prepare_edges(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        end: u64,
        spare: &mut [Pfn; 4],
    ) -> Result<usize, Stage2Error> {
        let n = self.splits_needed(env, ipa) + self.splits_needed(env, end);
        env.take_tables(self.vm, &mut spare[..n])?;
        Ok(n)
    }

    fn split_edges(&mut self, env: &mut impl Stage2Env, ipa: u64, end: u64, spare: &[Pfn]) {
        let mut left = spare;
        self.split_at(env, ipa, &mut left);
        self.split_at(env, end, &mut left);
        // Both edges in one block take fewer tables than counted: give the rest back unused.
        for &t in left {
            env.free_table(self.vm, t);
        }
    }

    /// Splits the block mapping `ipa` at `level` into a table of next-level entries.
    pub fn split(&mut self, env: &mut impl Stage2Env, ipa: u64, level: usize) -> Result<(), Stage2Error> {
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
        self.forget_cached_tables();
        env.free_table(self.vm, child);
        self.tables -= 1;
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
    /// sees each change once its invalidation is complete.
    fn change_leaves(
        &mut self,
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
    /// pages left empty are freed.
    pub fn unmap(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        len: u64,
        released: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Stage2Error> {
        let end = self.check_range(ipa, len)?;
        let mut spare = [Pfn(0); 4];
        let n = self.prepare_edges(env, ipa, end, &mut spare)?;
        self.split_edges(env, ipa, end, &spare[..n]);
        self.change_leaves(env, ipa, end, &|_| Some(0), &mut |c| {
            if let Entry::Leaf { pa, .. } = Entry::decode(c.old, c.level) {
                released(pa, level_size(c.level));
            }
        });
        self.reclaim_empty(env, ipa, end);
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

    /// Unlinks and frees every table under `[start, end)` that holds no valid entry.
    fn reclaim_empty(&mut self, env: &mut impl Stage2Env, start: u64, end: u64) {
        let (root, level) = (self.root, self.geo.start_level);
        self.reclaim_in(env, root, level, 0, start, end);
    }

    /// Returns whether `table` is empty afterwards.
    fn reclaim_in(
        &mut self,
        env: &mut impl Stage2Env,
        table: Pfn,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
    ) -> bool {
        let size = level_size(level);
        for idx in 0..ENTRIES {
            let eb = base + idx as u64 * size;
            if eb >= end || eb + size <= start {
                continue;
            }
            let raw = env.read(table, idx);
            if let Entry::Table(child) = Entry::decode(raw, level) {
                if self.reclaim_in(env, child, level + 1, eb, start, end) {
                    let change =
                        Change { table, index: idx, level, ipa: eb, old: raw, new: 0, live_subtree: false };
                    self.commit(env, &[change]);
                    self.forget_cached_tables();
                    env.free_table(self.vm, child);
                    self.tables -= 1;
                }
            }
        }
        (0..ENTRIES).all(|i| env.read(table, i) & 1 == 0)
    }

    /// Destroys the address space: every entry goes, the VMID's TLB entries are invalidated,
    /// then `released` gets every mapped range and every table page (root included) is freed.
    /// The returned proof lets the VMID be reused.
    pub fn teardown(self, env: &mut impl Stage2Env, released: &mut dyn FnMut(u64, u64)) -> VmidInvalidated {
        let (start, entries) = (self.geo.start_level, self.geo.root_entries());
        let mut live = [0u64; ENTRIES];
        for (i, slot) in live.iter_mut().enumerate().take(entries) {
            *slot = env.read(self.root, i);
            if *slot & 1 != 0 {
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
            Entry::Leaf { pa, .. } => released(pa, level_size(level)),
            Entry::Table(child) => {
                for i in 0..ENTRIES {
                    let r = env.read(child, i);
                    self.release_subtree(env, r, level + 1, released);
                }
                env.free_table(self.vm, child);
            }
        }
    }

    /// Whether nothing is mapped in the `level`-sized, aligned region containing `ipa` (no leaf
    /// and no table there): a block could be mapped without touching any entry.
    #[inline]
    pub fn is_unmapped(&self, env: &impl Stage2Env, ipa: u64, level: usize) -> bool {
        self.find(env, ipa, level).raw & 1 == 0
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

    /// Every table page, root first (for the audit and the fuzzer).
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
