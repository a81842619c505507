//! The fault path's side of a guest's stage-2 tables: the per-vCPU cache of the tables the
//! last faults went into ([`FaultCache`], owned by the vCPU, never by the space), the entries
//! found through it ([`PageSlot`], [`VacantBlock`]), the general fault forms that walk and
//! install ([`Stage2::fault_page`], [`Stage2::fault_block`]), what a fault that wrote nothing
//! hands back ([`Declined`]), and the exclusive forms the loader, the tests and the fuzzer use.
//!
//! Every vCPU form takes the space by shared reference: the vCPUs of one guest fault into it at
//! once, with no lock. Each installs with one compare-and-swap from 0 and never writes a valid
//! or locked entry: the loser of a race, or a fault meeting a structural change, gets its claim
//! back untouched and re-enters the guest, whose access then finds the winner's mapping (or
//! faults again). Nothing shared is written but the entry (and, by the caller, the frame's tag).
//!
//! A cached table is used only while the space's epoch is the one it was found under: the
//! epoch moves whenever a table page leaves the tree, and a page that left is freed only after
//! that and after every vCPU passed a quiescent point, so a cache never reaches a freed page.

use core::marker::PhantomData;

use crate::frame::{Claimed, ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

use super::desc::{is_locked, Attrs, Entry, MemType};
use super::env::Stage2Env;
use super::table::{index, level_size, Blocked, Install, Placed, Stage2, PAGE_SIZE};
use super::Stage2Error;

/// No region cached: a base no aligned IPA equals.
const NO_BASE: u64 = u64::MAX;

/// The tables one vCPU's last faults went into: the level-3 table of the last page and the
/// level-2 table of the last 2 MiB, each with the region it covers, and the space's epoch they
/// were found under. Demand faults come in runs, so most skip the walk. It belongs to the vCPU
/// (its per-CPU data); the space keeps none for it.
///
/// A level-3 table is remembered only when its whole 2 MiB lies in the cache's window (the
/// guest's RAM, [`FaultCache::serving`]): so a [`Stage2::page_slot`] hit alone tells the fast
/// path the page is demand-faulted RAM, with no range check of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultCache {
    epoch: u64,
    l3_base: u64,
    l3: Pfn,
    l2_base: u64,
    l2: Pfn,
    window: Window,
}

/// The IPAs `[base, base + size)` whose level-3 tables a cache may remember.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    base: u64,
    size: u64,
}

impl Window {
    const ALL: Window = Window { base: 0, size: u64::MAX };

    /// Whether the 2 MiB at `l3_base` (aligned) lies wholly inside.
    fn holds_l3(self, l3_base: u64) -> bool {
        let off = l3_base.wrapping_sub(self.base);
        off < self.size && self.size - off >= level_size(2)
    }
}

impl Default for FaultCache {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultCache {
    /// Caches nothing, and may remember a level-3 table anywhere.
    pub const fn new() -> Self {
        Self::within(Window::ALL)
    }

    /// Caches nothing, and remembers only the level-3 tables whose 2 MiB lies wholly in
    /// `[base, base + size)` (a vCPU's: its guest's RAM).
    pub const fn serving(base: u64, size: u64) -> Self {
        Self::within(Window { base, size })
    }

    const fn within(window: Window) -> Self {
        FaultCache { epoch: u64::MAX, l3_base: NO_BASE, l3: Pfn(0), l2_base: NO_BASE, l2: Pfn(0), window }
    }

    /// Forgets every table (the vCPU moves to another space, or just to be sure); keeps its
    /// window.
    pub fn forget(&mut self) {
        *self = Self::within(self.window);
    }

    /// Remembers where a page went, found under `epoch` (read before the walk). A cache found
    /// under another epoch than its other table forgets that one.
    fn remember_page(&mut self, ipa: u64, placed: Placed, epoch: u64) {
        self.resync(epoch);
        let l3_base = ipa & !(level_size(2) - 1);
        if self.window.holds_l3(l3_base) {
            self.l3_base = l3_base;
            self.l3 = placed.table;
        }
        if let Some(l2) = placed.l2 {
            self.l2_base = ipa & !(level_size(1) - 1);
            self.l2 = l2;
        }
    }

    fn remember_l2(&mut self, ipa: u64, table: Pfn, epoch: u64) {
        self.resync(epoch);
        self.l2_base = ipa & !(level_size(1) - 1);
        self.l2 = table;
    }

    fn resync(&mut self, epoch: u64) {
        if self.epoch != epoch {
            self.forget();
            self.epoch = epoch;
        }
    }

    /// Whether every table it would use is the one a walk of `s2` finds now (tests, fuzzer).
    /// A cache from an older epoch is never used, so it agrees.
    pub fn agrees(&self, s2: &Stage2, env: &impl Stage2Env) -> bool {
        if self.epoch != s2.epoch() {
            return true;
        }
        let l3 = self.l3_base == NO_BASE || s2.table_at(env, self.l3_base, 3) == Some(self.l3);
        let l2 = self.l2_base == NO_BASE || s2.table_at(env, self.l2_base, 2) == Some(self.l2);
        l3 && l2
    }
}

/// A claim a fault could not map, handed back untouched (still zero) for the caller to return
/// through the atomic path.
#[derive(Debug, PartialEq, Eq)]
pub enum Declined<C> {
    /// The entry was not free: another vCPU mapped it first, or a structural change holds it.
    /// Re-enter the guest: the access retries and finds the mapping (or faults again).
    Retry(C),
    /// It cannot go there, and why: a block where pages are mapped (`AlreadyMapped`: map a
    /// page instead), no frame for a table page, an IPA outside the space, a claim for another
    /// guest (`NotOwned`).
    Refused(C, Stage2Error),
}

impl<C> Declined<C> {
    /// The claim, whatever the reason.
    pub fn into_claim(self) -> C {
        match self {
            Declined::Retry(c) | Declined::Refused(c, _) => c,
        }
    }
}

/// A claim for another guest than the space's: a caller bug, refused without a write.
#[cold]
#[inline(never)]
fn foreign<const N: usize>(c: crate::frame::Claimed<N>) -> Declined<crate::frame::Claimed<N>> {
    let (pfn, vm) = (c.pfn(), c.vm());
    Declined::Refused(c, Stage2Error::NotOwned { pfn, state: Some(FrameState::Guest(vm)) })
}

/// The level-3 entry of one page, found through a vCPU's cached table (free when found, or
/// not: the install says). Borrows the space, which keeps the table alive.
pub struct PageSlot<'s> {
    vm: VmId,
    table: Pfn,
    index: usize,
    _space: PhantomData<&'s Stage2>,
}

impl PageSlot<'_> {
    /// The guest whose space this is: claim the page for it, and the install's owner check is
    /// known to pass.
    #[inline(always)]
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Maps `page` here as guest RAM with one compare-and-swap from 0. The claim stands for
    /// the owner check (see [`ClaimedPage`]). A lost race or a held entry hands it back as
    /// [`Declined::Retry`]; a claim for another guest as `Refused`; nothing written either way.
    #[inline(always)]
    pub fn install(self, env: &mut impl Stage2Env, page: ClaimedPage) -> Result<(), Declined<ClaimedPage>> {
        if page.vm() != self.vm {
            return Err(foreign(page));
        }
        let leaf = Entry::Leaf { pa: page.pfn().phys(), attrs: Attrs::RAM }.encode(3);
        match env.cas(self.table, self.index, 0, leaf) {
            Ok(()) => {
                env.dsb_ishst();
                Ok(())
            }
            Err(_) => Err(Declined::Retry(page)),
        }
    }

    /// [`PageSlot::install`] that hands back the bare claim (the single-vCPU callers').
    #[inline(always)]
    pub fn fill(self, env: &mut impl Stage2Env, page: ClaimedPage) -> Result<(), ClaimedPage> {
        self.install(env, page).map_err(Declined::into_claim)
    }
}

/// The level-2 entry of one 2 MiB, found through a cached level-2 table (free when found, for
/// the exclusive forms; maybe not, through [`Stage2::block_slot`]). Borrows the space.
#[derive(Debug)]
pub struct VacantBlock<'a> {
    vm: VmId,
    table: Pfn,
    index: usize,
    ipa: u64,
    _space: PhantomData<&'a Stage2>,
}

impl VacantBlock<'_> {
    /// The guest whose space this is (as [`PageSlot::vm`]).
    #[inline(always)]
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The first IPA of the 2 MiB it would map.
    pub fn ipa(&self) -> u64 {
        self.ipa
    }

    /// Maps the 2 MiB at `pa` (2 MiB-aligned) here with one block entry, if the frame database
    /// holds it as one unit owned by this guest (one tag: the block head's). RAM only. On error
    /// nothing changed (`AlreadyMapped` or `Busy` if the entry is no longer free).
    #[inline(always)]
    pub fn map(self, env: &mut impl Stage2Env, pa: u64, attrs: Attrs) -> Result<(), Stage2Error> {
        if !pa.is_multiple_of(level_size(2)) || pa >= 1 << 48 {
            return Err(Stage2Error::Unaligned { addr: pa });
        }
        let head = Pfn(pa >> 12);
        if attrs.mem != MemType::Normal || !env.block_is(head, FrameState::Guest(self.vm)) {
            return Err(Stage2Error::NotOwned { pfn: head, state: env.frame_state(head) });
        }
        match env.cas(self.table, self.index, 0, Entry::Leaf { pa, attrs }.encode(2)) {
            Ok(()) => {
                env.dsb_ishst();
                Ok(())
            }
            Err(cur) if is_locked(cur) => Err(Stage2Error::Busy { ipa: self.ipa }),
            Err(_) => Err(Stage2Error::AlreadyMapped { ipa: self.ipa }),
        }
    }

    /// Maps a block the atomic path has just claimed for this guest with one compare-and-swap
    /// from 0: the claim stands for the owner check (see [`ClaimedBlock`]). Pages mapped there
    /// already (a level-3 table) refuse it with `AlreadyMapped` (map a page instead); a lost
    /// race or a held entry hands it back as [`Declined::Retry`]; nothing written either way.
    #[inline(always)]
    pub fn install(
        self,
        env: &mut impl Stage2Env,
        block: ClaimedBlock,
    ) -> Result<(), Declined<ClaimedBlock>> {
        if block.vm() != self.vm {
            return Err(foreign(block));
        }
        let leaf = Entry::Leaf { pa: block.pfn().phys(), attrs: Attrs::RAM }.encode(2);
        match env.cas(self.table, self.index, 0, leaf) {
            Ok(()) => {
                env.dsb_ishst();
                Ok(())
            }
            Err(cur) => Err(declined_block(block, cur, self.ipa)),
        }
    }

    /// [`VacantBlock::install`] that hands back the bare claim (the single-vCPU callers').
    #[inline(always)]
    pub fn fill(self, env: &mut impl Stage2Env, block: ClaimedBlock) -> Result<(), ClaimedBlock> {
        self.install(env, block).map_err(Declined::into_claim)
    }
}

/// Why a block's CAS at level 2 failed on `cur`: a table there (pages) refuses it, anything
/// else (another block, a held entry) is a race to retry. Inlined (on the failure branch): a
/// call would cost the fast path a stack frame.
#[inline(always)]
fn declined_block(block: ClaimedBlock, cur: u64, ipa: u64) -> Declined<ClaimedBlock> {
    declined_at(block, cur, 2, ipa)
}

/// Why a leaf's CAS at `level` failed on `cur`: a table there (pages where a block was to go)
/// refuses it, anything else (the same leaf mapped, a held entry) is a race to retry.
#[cold]
fn declined_at<const N: usize>(claim: Claimed<N>, cur: u64, level: usize, ipa: u64) -> Declined<Claimed<N>> {
    match Entry::decode(cur, level) {
        Entry::Table(_) if level < 3 => Declined::Refused(claim, Stage2Error::AlreadyMapped { ipa }),
        _ => Declined::Retry(claim),
    }
}

/// A step machine's state after a step: more to do, or the outcome.
#[derive(Debug)]
pub(super) enum Progress<S, R> {
    Pending(S),
    Done(R),
}

/// A vCPU's general fault in progress (a page for `Claimed<1>`, a block for `Claimed<512>`):
/// the [`Install`] of its leaf, one access to shared table memory per step, with the claim it
/// maps and the epoch read before the walk. [`Stage2::fault_page`] and
/// [`Stage2::fault_block`] run it to the end at once; the fuzzer interleaves two vCPUs' steps.
#[derive(Debug)]
pub(super) struct FaultSteps<const N: usize> {
    install: Install,
    epoch: u64,
    claim: Claimed<N>,
}

impl<const N: usize> FaultSteps<N> {
    /// The leaf's level: a page (one frame) at 3, a block at 2.
    const LEVEL: usize = if N == 1 { 3 } else { 2 };

    #[cfg(any(test, feature = "model"))]
    /// The install under way (what the next step touches, the table pages it holds).
    pub(super) fn install(&self) -> &Install {
        &self.install
    }

    #[cfg(any(test, feature = "model"))]
    /// The frames it maps.
    pub(super) fn claim(&self) -> &Claimed<N> {
        &self.claim
    }

    /// One step of the install; at the end the tables it went through are remembered in the
    /// vCPU's `cache` and the claim is handed back if it was not mapped.
    #[inline(always)]
    pub(super) fn step(
        mut self,
        s2: &Stage2,
        env: &mut impl Stage2Env,
        cache: &mut FaultCache,
    ) -> Progress<Self, Result<(), Declined<Claimed<N>>>> {
        let Some(result) = self.install.step(s2, env) else { return Progress::Pending(self) };
        let ((ipa, level), epoch) = (self.install.target(), self.epoch);
        let remember = |cache: &mut FaultCache, table: Pfn, l2: Option<Pfn>| {
            if level == 3 {
                cache.remember_page(ipa, Placed { table, l2 }, epoch);
            } else {
                cache.remember_l2(ipa, table, epoch);
            }
        };
        Progress::Done(match result {
            Ok(placed) => {
                remember(cache, placed.table, placed.l2);
                Ok(())
            }
            Err(Blocked::OutOfMemory) => Err(Declined::Refused(self.claim, Stage2Error::OutOfMemory)),
            Err(Blocked::Occupied { level: at, table, raw }) if at == level => {
                remember(cache, table, None);
                Err(declined_at(self.claim, raw, level, ipa))
            }
            Err(_) => Err(Declined::Retry(self.claim)),
        })
    }
}

impl Stage2 {
    /// The general fault's first step, which touches nothing shared: checks the claim and the
    /// IPA (its low bits below the leaf's size ignored), reads the epoch.
    #[inline(always)]
    pub(super) fn begin_fault<const N: usize>(
        &self,
        ipa: u64,
        claim: Claimed<N>,
    ) -> Result<FaultSteps<N>, Declined<Claimed<N>>> {
        if claim.vm() != self.vm {
            return Err(foreign(claim));
        }
        let level = FaultSteps::<N>::LEVEL;
        let ipa = ipa & !(level_size(level) - 1);
        if ipa >= self.geometry().ipa_limit() {
            return Err(Declined::Refused(claim, Stage2Error::OutOfRange { ipa }));
        }
        // Read before the walk: a table unlinked after the walk found it moves the epoch past it.
        let epoch = self.epoch();
        let leaf = Entry::Leaf { pa: claim.pfn().phys(), attrs: Attrs::RAM }.encode(level);
        Ok(FaultSteps { install: Install::new(self, ipa, level, leaf), epoch, claim })
    }

    /// Runs a general fault to its end.
    #[inline(always)]
    fn run_fault<const N: usize>(
        &self,
        env: &mut impl Stage2Env,
        cache: &mut FaultCache,
        ipa: u64,
        claim: Claimed<N>,
    ) -> Result<(), Declined<Claimed<N>>> {
        let mut fault = self.begin_fault(ipa, claim)?;
        loop {
            match fault.step(self, env, cache) {
                Progress::Pending(next) => fault = next,
                Progress::Done(result) => return result,
            }
        }
    }

    /// The fast path's first step for a 4 KiB fault: the level-3 entry of `ipa` (its low 12 bits
    /// ignored) when the vCPU's cached level-3 table covers it, else `None` (walk: the general
    /// path). Reads no entry: the install's CAS finds whether it is free.
    #[inline(always)]
    pub fn page_slot(&self, cache: &FaultCache, ipa: u64) -> Option<PageSlot<'_>> {
        if ipa & !(level_size(2) - 1) != cache.l3_base || cache.epoch != self.epoch_now() {
            return None;
        }
        Some(PageSlot { vm: self.vm, table: cache.l3, index: index(ipa, 3), _space: PhantomData })
    }

    /// The fast path's first step for a 2 MiB fault: the level-2 entry of the 2 MiB around
    /// `ipa` when the vCPU's cached level-2 table covers it, else `None`. Reads no entry.
    #[inline(always)]
    pub fn block_slot(&self, cache: &FaultCache, ipa: u64) -> Option<VacantBlock<'_>> {
        if ipa & !(level_size(1) - 1) != cache.l2_base || cache.epoch != self.epoch_now() {
            return None;
        }
        let ipa = ipa & !(level_size(2) - 1);
        Some(VacantBlock { vm: self.vm, table: cache.l2, index: index(ipa, 2), ipa, _space: PhantomData })
    }

    /// The general 4 KiB fault: walks to the page's entry, linking missing tables (each with one
    /// CAS; table pages from `env`, losers given back unused), then maps `page` there with one
    /// CAS, and remembers the tables in the vCPU's `cache`. `Retry` when the page (or a block
    /// over it) is mapped already or a structural change holds the path.
    pub fn fault_page(
        &self,
        env: &mut impl Stage2Env,
        cache: &mut FaultCache,
        ipa: u64,
        page: ClaimedPage,
    ) -> Result<(), Declined<ClaimedPage>> {
        self.run_fault(env, cache, ipa, page)
    }

    /// The general 2 MiB fault: like [`Stage2::fault_page`] for a block entry at level 2 (the
    /// 2 MiB around `ipa`). Pages mapped there already refuse it with `AlreadyMapped` (map a
    /// page instead); another block there, or a held entry, is a `Retry`.
    pub fn fault_block(
        &self,
        env: &mut impl Stage2Env,
        cache: &mut FaultCache,
        ipa: u64,
        block: ClaimedBlock,
    ) -> Result<(), Declined<ClaimedBlock>> {
        self.run_fault(env, cache, ipa, block)
    }

    /// The general path's map for a vCPU whose frame came from the atomic path by number (not
    /// as a claim): `map` at `level` (3 or 2) with the owner check, by compare-and-swap, then the
    /// tables it went into are remembered in the vCPU's `cache`. `AlreadyMapped` or `Busy`:
    /// another vCPU was first or a structural change holds the entry (give the frame back and
    /// re-enter the guest).
    pub fn map_cached(
        &self,
        env: &mut impl Stage2Env,
        cache: &mut FaultCache,
        ipa: u64,
        pa: u64,
        level: usize,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        let epoch = self.epoch();
        let placed = self.map_placed(env, ipa, pa, level, attrs)?;
        match level {
            3 => cache.remember_page(ipa, placed, epoch),
            2 => cache.remember_l2(ipa, placed.table, epoch),
            // A 1 GiB block's table is level 1: nothing for the cache.
            _ => {}
        }
        Ok(())
    }

    // The exclusive forms: one caller at a time (`&mut self`), the space's own cache.

    /// Maps one 4 KiB page (the single-vCPU demand-fault form): like `map` at level 3, through
    /// the space's own cached level-3 table when the page lies in it.
    #[inline(always)]
    pub fn map_page(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        if pa.is_multiple_of(PAGE_SIZE) && ipa.is_multiple_of(PAGE_SIZE) {
            if let Some(slot) = self.page_slot(&self.own, ipa) {
                // One frame: its owner, checked inline (a block's tail answers through its head).
                let pfn = Pfn(pa >> 12);
                if attrs.mem != MemType::Normal || !env.frame_is(pfn, FrameState::Guest(self.vm)) {
                    let state = env.frame_state(pfn);
                    if attrs.mem != MemType::Normal || state != Some(FrameState::Guest(self.vm)) {
                        return Err(Stage2Error::NotOwned { pfn, state });
                    }
                }
                return match env.cas(slot.table, slot.index, 0, Entry::Leaf { pa, attrs }.encode(3)) {
                    Ok(()) => {
                        env.dsb_ishst();
                        Ok(())
                    }
                    Err(cur) if is_locked(cur) => Err(Stage2Error::Busy { ipa }),
                    Err(_) => Err(Stage2Error::AlreadyMapped { ipa }),
                };
            }
        }
        self.map_page_walk(env, ipa, pa, attrs)
    }

    /// `map_page` without the shortcut: the general map, then remember its tables.
    #[inline(never)]
    fn map_page_walk(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        let epoch = self.epoch();
        let placed = self.map_placed(env, ipa, pa, 3, attrs)?;
        self.own.remember_page(ipa, placed, epoch);
        Ok(())
    }

    /// The free level-3 slot of page `ipa` when it lies in the space's own cached table, or
    /// `None` (walk, mapped already: the general path's business). Single-vCPU form.
    #[inline(always)]
    pub fn cached_page_slot(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<PageSlot<'_>> {
        if !ipa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let slot = self.page_slot(&self.own, ipa)?;
        (env.read(slot.table, slot.index) == 0).then_some(slot)
    }

    /// The invalid level-2 entry for the aligned 2 MiB around `ipa`, found through the space's
    /// own cached level-2 table (walking to it on a miss). `None` when something is mapped
    /// there, when no level-2 table covers it yet (the general `map` builds one), or when `ipa`
    /// is outside the IPA space. Takes and changes nothing, so the caller can decline after it.
    #[inline(always)]
    pub fn vacant_block(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<VacantBlock<'_>> {
        if self.block_slot(&self.own, ipa).is_none() {
            let epoch = self.epoch();
            let table = self.l2_table(env, ipa)?;
            self.own.remember_l2(ipa, table, epoch);
        }
        self.cached_vacant_block(env, ipa)
    }

    /// [`Stage2::vacant_block`] through the space's own cached level-2 table only: `None` on a
    /// miss too ([`Stage2::map_block`] remembers the table for the next fault).
    #[inline(always)]
    pub fn cached_vacant_block(&mut self, env: &impl Stage2Env, ipa: u64) -> Option<VacantBlock<'_>> {
        let vacant = self.block_slot(&self.own, ipa)?;
        (env.read(vacant.table, vacant.index) == 0).then_some(vacant)
    }

    /// `map` of a 2 MiB block (the single-vCPU general block path), then remember its level-2
    /// table for [`Stage2::cached_vacant_block`].
    pub fn map_block(
        &mut self,
        env: &mut impl Stage2Env,
        ipa: u64,
        pa: u64,
        attrs: Attrs,
    ) -> Result<(), Stage2Error> {
        let epoch = self.epoch();
        let placed = self.map_placed(env, ipa, pa, 2, attrs)?;
        self.own.remember_l2(ipa, placed.table, epoch);
        Ok(())
    }

    /// Whether the space's own cached tables are the ones a walk finds now (tests, fuzzer).
    pub fn caches_agree(&self, env: &impl Stage2Env) -> bool {
        self.own.agrees(self, env)
    }
}

/// Slots held across other vCPUs' steps (the fuzzer's two-actor mode): a vCPU that found its
/// slot keeps using it, whatever happened to the table since, until its CAS.
#[cfg(any(test, feature = "model"))]
impl Stage2 {
    /// The level-3 entry `(table, index)` of [`PageSlot::entry`], found earlier.
    pub(super) fn page_slot_at(&self, (table, index): (Pfn, usize)) -> PageSlot<'_> {
        PageSlot { vm: self.vm, table, index, _space: PhantomData }
    }

    /// The level-2 entry of [`VacantBlock::entry`] for the 2 MiB at `ipa`, found earlier.
    pub(super) fn block_slot_at(&self, (table, index): (Pfn, usize), ipa: u64) -> VacantBlock<'_> {
        VacantBlock { vm: self.vm, table, index, ipa, _space: PhantomData }
    }
}

#[cfg(any(test, feature = "model"))]
impl PageSlot<'_> {
    /// The entry it names.
    pub(super) fn entry(&self) -> (Pfn, usize) {
        (self.table, self.index)
    }
}

#[cfg(any(test, feature = "model"))]
impl VacantBlock<'_> {
    /// The entry it names.
    pub(super) fn entry(&self) -> (Pfn, usize) {
        (self.table, self.index)
    }
}
