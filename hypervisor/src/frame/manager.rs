//! The frame manager: the frame database, the buddy allocator and the per-CPU pools together,
//! and every way a frame is handed out or given back after boot.
//!
//! It owns the rule that a frame changes hands only through the database's transitions, and
//! the split between paths:
//! - atomic (trap handlers, interrupts masked), through a CPU's handle [`CpuFrames`] (or the
//!   `FrameManager` methods of the same names taking a CPU index): allocate a page, allocate a
//!   2 MiB block, return an unused page. They touch only pools and tags: no lock, no heap, no
//!   zeroing, no cache maintenance, a bounded number of steps, and an error instead of waiting.
//! - slow (boot, VM creation and teardown, and a trap's general path around, never inside,
//!   its atomic allocation, as KVM tops up its memory cache before it takes `mmu_lock`):
//!   refill, drain, contiguous allocation, release (which scrubs), heap growth, audit. They
//!   take the buddy allocator's lock, which the atomic path never takes. EL2 runs with
//!   interrupts masked, so nothing interrupts a slow path on its own CPU; it waits at most for
//!   another CPU's critical section.
//!
//! Pooled frames are tagged Free, like frames in the buddy allocator: "free" means zeroed,
//! clean, owned by nobody and held by exactly one of the buddy allocator or one pool. Nobody
//! can claim a free frame by number after boot (the database's boot marking needs `&mut`, and
//! the manager owns the database), so a pooled frame cannot be taken behind its pool's back.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::audit::{audit, AuditReport};
use super::buddy::BuddyFrames;
use super::claimed::{ClaimedBlock, ClaimedPage};
use super::db::{unexpected, FrameDb};
use super::error::{AtomicError, FrameError};
use super::heap::HeapSink;
use super::pool::FramePool;
use super::promise::Promise;
use super::scrub::FrameScrubber;
use super::sync::{AtomicBool, Ordering};
use super::tag::{Owner, VmId, TAG_FREE, TAG_HYPERVISOR, TAG_SCRUBBING};
use super::unpromised::Unpromised;
use super::{frames_of, Pfn, BLOCK_FRAMES};

/// Slots in each CPU's page pool: the most 4 KiB frames it can hold (8 MiB worth).
pub const PAGE_POOL_SLOTS: usize = 2048;
/// Slots in each CPU's block pool: the most 2 MiB blocks it can hold.
pub const BLOCK_POOL_SLOTS: usize = 16;
/// Compare-and-swap attempts on the own pool before the atomic path looks at other CPUs'.
/// Only other CPUs taking surplus can make an attempt fail, so this is rarely reached.
const POP_ATTEMPTS: u32 = 4;

/// Sizes and watermarks of each CPU's pools. A pool below its low watermark is refilled up to
/// its high watermark; another CPU may take from it only while it is above its low watermark.
/// The room between high and capacity takes frames given back on the atomic path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PoolConfig {
    /// 4 KiB frames each CPU's page pool can hold (at most [`PAGE_POOL_SLOTS`]).
    pub page_capacity: usize,
    pub page_low: usize,
    pub page_high: usize,
    /// 2 MiB blocks each CPU's block pool can hold (at most [`BLOCK_POOL_SLOTS`]; 0 disables).
    pub block_capacity: usize,
    pub block_low: usize,
    pub block_high: usize,
    /// Other CPUs' pools the atomic path tries, one attempt each, when its own pool fails.
    pub steal_victims: usize,
}

impl Default for PoolConfig {
    /// 512 KiB of pages per CPU at most, refilled below 128 KiB, and one 2 MiB block.
    fn default() -> Self {
        PoolConfig {
            page_capacity: 128,
            page_low: 32,
            page_high: 96,
            block_capacity: 2,
            block_low: 1,
            block_high: 1,
            steal_victims: 3,
        }
    }
}

impl PoolConfig {
    fn check(&self) -> Result<(), FrameError> {
        if self.page_low > self.page_high || self.block_low > self.block_high {
            return Err(FrameError::BadConfig("low watermark above high"));
        }
        if self.page_high > self.page_capacity || self.block_high > self.block_capacity {
            return Err(FrameError::BadConfig("high watermark above capacity"));
        }
        if self.page_capacity > PAGE_POOL_SLOTS || self.block_capacity > BLOCK_POOL_SLOTS {
            return Err(FrameError::BadConfig("capacity above the pool's slots"));
        }
        Ok(())
    }
}

/// What a refill did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RefillReport {
    pub pages_added: usize,
    pub blocks_added: usize,
    /// The buddy allocator ran out before the pools reached their high watermarks.
    pub exhausted: bool,
}

/// One CPU's pools, on their own cache lines so CPUs popping their own pools never share one.
/// The page pool's head comes first (`repr(C)`), at the address the handle points to.
#[repr(C, align(128))]
pub(crate) struct CpuPools {
    pub(crate) pages: FramePool<PAGE_POOL_SLOTS>,
    pub(crate) blocks: FramePool<BLOCK_POOL_SLOTS>,
    cpu: usize,
    /// Set by [`FrameManager::retire`]: the CPU will never allocate, its pools stay empty.
    retired: AtomicBool,
}

/// Every host frame, owned: the database, the buddy allocator and the per-CPU pools.
/// `Sync`: one instance serves every CPU.
pub struct FrameManager<'a, const ORDER: usize = 32> {
    db: FrameDb<'a>,
    pools: Box<[CpuPools]>,
    config: PoolConfig,
    buddy: spin::Mutex<BuddyFrames<ORDER>>,
    /// Frames promised to guests by [`FrameManager::commit`]. Locked after `buddy`, never alone
    /// around a buddy operation.
    committed: spin::Mutex<usize>,
    /// Free frames no promise covers, once the promises are made: what guests draw beyond
    /// their own (lock-free).
    unpromised: Unpromised,
    /// [`FrameManager::open_unpromised`] ran: a pool retired after it frees its capacity.
    unpromised_open: AtomicBool,
    /// The pools' capacity `open_unpromised` set aside: all of it, or what was free beyond the
    /// promises if that was less. Locked after `buddy`.
    set_aside: spin::Mutex<usize>,
}

impl<'a, const ORDER: usize> FrameManager<'a, ORDER> {
    /// Takes over the database after boot marking and builds the buddy allocator from
    /// `free_ranges` (physical `(start, end)`, frame-aligned): they must be disjoint and cover
    /// exactly the frames tagged Free. Scrubs every free frame once, so "free" means zeroed
    /// and clean from here on. Needs a working heap (the buddy allocator's free lists live
    /// there): a bootstrap heap in the image until [`FrameManager::grow_heap`] extends it.
    pub fn new(
        db: FrameDb<'a>,
        free_ranges: &[(u64, u64)],
        cpus: usize,
        config: PoolConfig,
        scrubber: &impl FrameScrubber,
    ) -> Result<Self, FrameError> {
        config.check()?;
        if cpus == 0 {
            return Err(FrameError::BadConfig("no CPUs"));
        }
        let mut buddy = BuddyFrames::new(db.base(), db.end())?;

        let mut ranges = free_ranges.iter().map(|&r| frames_of(r)).collect::<Result<Vec<_>, _>>()?;
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(FrameError::Overlap(pair[1].0));
            }
        }
        let mut in_ranges = 0;
        for &(first, end) in &ranges {
            let frames = (end.0 - first.0) as usize;
            for (i, cell) in db.cells(first, frames)?.iter().enumerate() {
                let tag = cell.load(Ordering::Acquire);
                if tag != TAG_FREE {
                    return Err(unexpected(first.add(i as u64), TAG_FREE, tag));
                }
            }
            in_ranges += frames;
        }
        let tagged_free = db.tags().iter().filter(|c| c.load(Ordering::Acquire) == TAG_FREE).count();
        if tagged_free != in_ranges {
            return Err(FrameError::FreeRangesMismatch { tagged_free, in_ranges });
        }

        for &(first, end) in &ranges {
            let frames = (end.0 - first.0) as usize;
            scrubber.scrub(first, frames);
            buddy.give_back(first, frames)?;
            // Every whole 2 MiB block starts out as one unit: a block refill or fault then
            // claims it with one tag change; a page refill splits it (once per 512 pages).
            let mut head = first.0.next_multiple_of(BLOCK_FRAMES as u64);
            while head + BLOCK_FRAMES as u64 <= end.0 {
                db.compound_free(Pfn(head))?;
                head += BLOCK_FRAMES as u64;
            }
        }
        let pools = (0..cpus)
            .map(|cpu| CpuPools {
                pages: FramePool::new(config.page_capacity),
                blocks: FramePool::new(config.block_capacity),
                cpu,
                retired: AtomicBool::new(false),
            })
            .collect();
        Ok(FrameManager {
            db,
            pools,
            config,
            buddy: spin::Mutex::new(buddy),
            committed: spin::Mutex::new(0),
            unpromised: Unpromised::new(),
            unpromised_open: AtomicBool::new(false),
            set_aside: spin::Mutex::new(0),
        })
    }

    /// The database, read-only: [`FrameDb::state`] tells who owns a frame.
    pub fn db(&self) -> &FrameDb<'a> {
        &self.db
    }

    /// The pool sizes and watermarks it was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Number of CPUs (pools).
    pub fn cpus(&self) -> usize {
        self.pools.len()
    }

    // ---- The atomic path: trap-safe, lock-free, bounded. ----

    /// `cpu`'s handle to the atomic path: get it once when the CPU comes up and keep it in the
    /// CPU's own data, so a trap goes straight to its pool (no CPU index check on the way).
    pub fn cpu(&self, cpu: usize) -> Option<CpuFrames<'_, 'a, ORDER>> {
        self.pools.get(cpu).map(|pools| CpuFrames { frames: self, pools })
    }

    /// [`CpuFrames::alloc_page_atomic_exclusive`] for CPU `cpu`.
    #[inline]
    pub fn alloc_page_atomic_exclusive(&self, cpu: usize, owner: Owner) -> Result<Pfn, AtomicError> {
        self.cpu(cpu).ok_or(AtomicError::InvalidCpu)?.alloc_page_atomic_exclusive(owner)
    }

    /// [`CpuFrames::alloc_block_atomic_exclusive`] for CPU `cpu`.
    pub fn alloc_block_atomic_exclusive(&self, cpu: usize, owner: Owner) -> Result<Pfn, AtomicError> {
        self.cpu(cpu).ok_or(AtomicError::InvalidCpu)?.alloc_block_atomic_exclusive(owner)
    }

    /// [`CpuFrames::return_unused_page_atomic`] for CPU `cpu`.
    pub fn return_unused_page_atomic(&self, cpu: usize, pfn: Pfn, owner: Owner) -> Result<(), AtomicError> {
        self.cpu(cpu).ok_or(AtomicError::InvalidCpu)?.return_unused_page_atomic(pfn, owner)
    }

    /// Whether `cpu`'s pools are below a low watermark: call [`FrameManager::refill`] soon,
    /// outside the trap. Lock-free. False for an unknown CPU.
    pub fn needs_refill(&self, cpu: usize) -> bool {
        self.cpu(cpu).is_some_and(CpuFrames::needs_refill)
    }

    /// One pop attempt on each of up to `steal_victims` other CPUs' pools that are above their
    /// low watermark (their surplus), then give up.
    fn pop_from_other_cpus<const N: usize>(
        &self,
        cpu: usize,
        pool_of: impl Fn(&CpuPools) -> &FramePool<N>,
        low: usize,
    ) -> Result<u64, AtomicError> {
        let cpus = self.pools.len();
        for step in 1..cpus.min(self.config.steal_victims.saturating_add(1)) {
            let Some(victim) = self.pools.get((cpu + step) % cpus) else { break };
            let pool = pool_of(victim);
            if pool.len() > low {
                if let Some(value) = pool.pop(1) {
                    return Ok(value);
                }
            }
        }
        Err(AtomicError::Empty)
    }

    // ---- The slow paths: never inside the atomic section. ----

    /// Tops `cpu`'s pools up from the buddy allocator if they are below their low watermarks,
    /// to their high watermarks. Slow path: takes the buddy lock and may use the heap. Frames
    /// come from the buddy allocator already zeroed and clean, so no scrubbing here.
    pub fn refill(&self, cpu: usize) -> Result<RefillReport, FrameError> {
        let pools = self.active_pools(cpu)?;
        let pages = pools.pages.filler().ok_or(FrameError::PoolBusy)?;
        let blocks = pools.blocks.filler().ok_or(FrameError::PoolBusy)?;
        let mut buddy = self.buddy.lock();
        let mut report = RefillReport::default();

        if pools.pages.len() < self.config.page_low {
            'fill: while pools.pages.len() < self.config.page_high {
                // Take the largest chunk still wanted, so one CPU's frames (and tags) sit together.
                let mut chunk = prev_power_of_two(self.config.page_high - pools.pages.len());
                let first = loop {
                    match buddy.alloc(chunk) {
                        Ok(first) => break first,
                        Err(_) if chunk > 1 => chunk /= 2,
                        Err(_) => {
                            report.exhausted = true;
                            break 'fill;
                        }
                    }
                };
                // Pages are claimed one by one: the block they come from gets per-frame tags.
                if let Err(e) = self.db.split_free_blocks(first, chunk) {
                    buddy.give_back(first, chunk)?;
                    return Err(e);
                }
                // One publication for the whole chunk (one head CAS, not one per frame).
                let pushed = pages.push_run(first.0, 1, chunk);
                report.pages_added += pushed;
                if pushed < chunk {
                    // Cannot happen (we are the only pusher, below capacity); keep the rest.
                    buddy.give_back(first.add(pushed as u64), chunk - pushed)?;
                    break 'fill;
                }
            }
        }
        if pools.blocks.len() < self.config.block_low {
            'blocks: while pools.blocks.len() < self.config.block_high {
                // As for pages: the largest run of blocks still wanted, from one buddy call.
                let mut chunk = prev_power_of_two(self.config.block_high - pools.blocks.len());
                let first = loop {
                    match buddy.alloc(chunk * BLOCK_FRAMES) {
                        Ok(first) => break first,
                        Err(_) if chunk > 1 => chunk /= 2,
                        Err(_) => {
                            report.exhausted = true;
                            break 'blocks;
                        }
                    }
                };
                // Each block as one unit (already one if it was never split): one CAS to claim.
                for b in 0..chunk as u64 {
                    let head = first.add(b * BLOCK_FRAMES as u64);
                    // Most blocks were never split: one load says so, without the call.
                    if self.db.is_block_in(head, super::FrameState::Free) {
                        continue;
                    }
                    if let Err(e) = self.db.compound_free(head) {
                        self.db.split_free_blocks(first, chunk * BLOCK_FRAMES)?;
                        buddy.give_back(first, chunk * BLOCK_FRAMES)?;
                        return Err(e);
                    }
                }
                let pushed = blocks.push_run(first.0, BLOCK_FRAMES as u64, chunk);
                report.blocks_added += pushed;
                if pushed < chunk {
                    let rest = first.add((pushed * BLOCK_FRAMES) as u64);
                    buddy.give_back(rest, (chunk - pushed) * BLOCK_FRAMES)?;
                    break;
                }
            }
        }
        Ok(report)
    }

    /// `cpu`'s pools, unless it is retired (a retired CPU has none: `InvalidCpu`).
    fn active_pools(&self, cpu: usize) -> Result<&CpuPools, FrameError> {
        match self.pools.get(cpu) {
            Some(pools) if !pools.retired.load(Ordering::Acquire) => Ok(pools),
            _ => Err(FrameError::InvalidCpu(cpu)),
        }
    }

    /// Empties `cpu`'s pools for good: a CPU that will never allocate (no guest runs there, or
    /// its guest stopped) then holds no free frames out of reach, refills refuse it, and
    /// promises ([`FrameManager::commit`]) no longer set its pools' capacity aside. Once the
    /// unpromised frames are open (which counted them without that capacity), what was set
    /// aside for it joins them. Slow path.
    pub fn retire(&self, cpu: usize) -> Result<usize, FrameError> {
        let pools = self.active_pools(cpu)?;
        // Retired first, so no refill starts after the drain below.
        pools.retired.store(true, Ordering::Release);
        let drained = self.drain(cpu)?;
        if self.unpromised_open.load(Ordering::Acquire) {
            // What was set aside beyond what the remaining pools can hold: this pool's capacity,
            // unless fewer frames than every pool's capacity were free to set aside at opening
            // (the whole capacity would count frames that do not exist).
            let _buddy = self.buddy.lock();
            let mut aside = self.set_aside.lock();
            let kept = (*aside).min(self.pool_capacity_frames());
            self.unpromised.give(*aside - kept);
            *aside = kept;
        }
        Ok(drained)
    }

    /// Empties `cpu`'s pools back into the buddy allocator (CPU going offline, memory
    /// pressure, tests). Returns the number of frames moved.
    pub fn drain(&self, cpu: usize) -> Result<usize, FrameError> {
        let pools = self.pools.get(cpu).ok_or(FrameError::InvalidCpu(cpu))?;
        // Holding both tokens keeps refills of this CPU out while we empty it.
        let _pages = pools.pages.filler().ok_or(FrameError::PoolBusy)?;
        let _blocks = pools.blocks.filler().ok_or(FrameError::PoolBusy)?;
        let mut buddy = self.buddy.lock();
        let pages = drain_pool(&pools.pages, 1, &mut buddy)?;
        Ok(pages + drain_pool(&pools.blocks, BLOCK_FRAMES, &mut buddy)?)
    }

    /// Allocates `frames` contiguous frames (a power of two, aligned to it) for `owner` from
    /// the buddy allocator: stage-2 root tables, guest images at VM creation. Slow path.
    pub fn alloc_contiguous(&self, frames: usize, owner: Owner) -> Result<Pfn, FrameError> {
        let mut buddy = self.buddy.lock();
        let first = buddy.alloc(frames)?;
        if let Err(err) = self
            .db
            .split_free_blocks(first, frames)
            .and_then(|()| self.db.transition(first, frames, TAG_FREE, owner.tag()))
        {
            buddy.give_back(first, frames)?;
            return Err(err);
        }
        Ok(first)
    }

    /// Gives back `frames` frames from `first`, owned by `owner`: checks every frame is
    /// `owner`'s (a wrong owner, a double free, a hole or a frame outside the database is an
    /// error that changes nothing), marks them Scrubbing, zeroes and cleans them, then frees
    /// them into the buddy allocator. The caller has already unmapped them (and invalidated
    /// the TLBs). Slow path.
    pub fn release(
        &self,
        first: Pfn,
        frames: usize,
        owner: Owner,
        scrubber: &impl FrameScrubber,
    ) -> Result<(), FrameError> {
        // Check all first (a refusal changes nothing), then give blocks owned as one unit but
        // released only in part per-frame tags; a block released whole stays one unit.
        self.db.check(first, frames, owner.tag())?;
        self.db.split_partial_blocks(first, frames, owner.tag())?;
        self.db.transition(first, frames, owner.tag(), TAG_SCRUBBING)?;
        scrubber.scrub(first, frames);
        // Free them under the buddy lock, so an audit (which holds it) never sees them free
        // but held by no one.
        let mut buddy = self.buddy.lock();
        self.db.transition(first, frames, TAG_SCRUBBING, TAG_FREE)?;
        buddy.give_back(first, frames)
    }

    /// The share transition: `frames` frames from `first`, memory of guest `vm` that no one
    /// else maps, become shared memory lent by `vm` (`Guest(vm) -> SharedOwned(vm)`), as pKVM's
    /// host-share transition: every frame is checked first, then each is committed by CAS, so
    /// a refusal (a frame not `vm`'s, a hole, a frame outside the database) changes nothing.
    /// Blocks `vm` owns as one unit get per-frame tags first (shared frames are single frames).
    /// VM 0 stands for Labyrinth itself (a region no guest owns); it never runs. Slow path.
    /// Shared frames go back through [`FrameManager::release`] with `Owner::shared(vm)`.
    pub fn share(&self, first: Pfn, frames: usize, vm: VmId) -> Result<(), FrameError> {
        let (from, to) = (Owner::guest(vm).tag(), Owner::shared(vm).tag());
        self.db.check(first, frames, from)?;
        let mut head = first.0 & !(BLOCK_FRAMES as u64 - 1);
        while head < first.0 + frames as u64 {
            self.db.split_block(Pfn(head), from)?;
            head += BLOCK_FRAMES as u64;
        }
        self.db.transition(first, frames, from, to)
    }

    /// Gives the 2 MiB block around `pfn`, if `owner` owns it as one unit, per-frame tags (its
    /// 4 KiB pages are about to be mapped or released on their own: a stage-2 split). `Ok(false)`
    /// if it was not one unit. Slow path.
    pub fn split_block(&self, pfn: Pfn, owner: Owner) -> Result<bool, FrameError> {
        self.db.split_block(pfn, owner.tag())
    }

    /// Carves `frames` contiguous frames (a power of two) from the buddy allocator, tags them
    /// Hypervisor and hands them to the heap through `heap`. Returns the physical range.
    /// Slow path; never from inside the heap's own allocation path (see [`HeapSink`]).
    pub fn grow_heap(&self, frames: usize, heap: &mut impl HeapSink) -> Result<(u64, u64), FrameError> {
        let first = {
            let mut buddy = self.buddy.lock();
            let first = buddy.alloc(frames)?;
            if let Err(err) = self
                .db
                .split_free_blocks(first, frames)
                .and_then(|()| self.db.transition(first, frames, TAG_FREE, TAG_HYPERVISOR))
            {
                buddy.give_back(first, frames)?;
                return Err(err);
            }
            first
        };
        let range = (first.phys(), first.add(frames as u64).phys());
        heap.add_region(range.0, range.1);
        Ok(range)
    }

    /// Promises up to `wanted` frames to one holder (a guest, a shared region) and returns the
    /// promise of as many as it got ([`Promise::frames`]), for [`FrameManager::withdraw`] when
    /// the holder is gone: the free frames not yet promised, less what the pools could ever hold (their capacity), so
    /// the buddy allocator always keeps enough for every holder's unused promise however the
    /// pools happen to be filled. A guest holding a promise of `n` can then always draw `n`
    /// frames, whatever other guests do, provided every holder draws no more than it was
    /// promised (the holder counts; the manager does not) and nothing else takes free frames
    /// while promises stand (the heap grows at boot only). Call it before the holder draws
    /// anything: promises are made against the frames free now. Slow path.
    pub fn commit(&self, wanted: usize) -> Promise {
        let buddy = self.buddy.lock();
        let mut committed = self.committed.lock();
        let free = buddy.free_frames() + self.pooled_frames();
        let available = free.saturating_sub(*committed + self.pool_capacity_frames());
        let granted = wanted.min(available);
        *committed += granted;
        Promise::new(granted)
    }

    /// Withdraws `promise` (its holder is gone and every frame it drew is back in the
    /// allocator): the first time, its frames are no longer promised and, once the unpromised
    /// frames are open ([`FrameManager::open_unpromised`], which counts the frames no promise
    /// covers then), they join them, for any guest to draw. Returns the frames withdrawn: 0
    /// for a promise withdrawn already, so no path gives the same frames back twice. Slow path.
    pub fn withdraw(&self, promise: &Promise) -> usize {
        if !promise.withdraw() {
            return 0;
        }
        let _buddy = self.buddy.lock();
        let mut committed = self.committed.lock();
        // Never more than is promised: the unpromised count gets only what left the promises.
        let frames = promise.frames().min(*committed);
        *committed -= frames;
        if self.unpromised_open.load(Ordering::Acquire) {
            self.unpromised.give(frames);
        }
        frames
    }

    /// Opens the free frames no promise covers to every holder, once every promise is made:
    /// the frames free now, less what the pools could ever hold, less `reserved`, the part of
    /// each promise its holder has not drawn yet. From here on holders count frames beyond
    /// their promise with [`Unpromised::draw`] and give them back with [`Unpromised::give`],
    /// as they give back a withdrawn promise. Slow path.
    pub fn open_unpromised(&self, reserved: usize) -> usize {
        let buddy = self.buddy.lock();
        let free = buddy.free_frames() + self.pooled_frames();
        let beyond = free.saturating_sub(reserved);
        // What the pools could hold is set aside, as far as anything is free to set aside.
        let aside = beyond.min(self.pool_capacity_frames());
        *self.set_aside.lock() = aside;
        let frames = beyond - aside;
        self.unpromised.set(frames);
        self.unpromised_open.store(true, Ordering::Release);
        frames
    }

    /// The free frames no promise covers (zero until [`FrameManager::open_unpromised`]).
    pub fn unpromised(&self) -> &Unpromised {
        &self.unpromised
    }

    /// Frames promised and not withdrawn.
    pub fn committed_frames(&self) -> usize {
        let _buddy = self.buddy.lock();
        *self.committed.lock()
    }

    /// Frames all pools together can hold when full.
    fn pool_capacity_frames(&self) -> usize {
        let active = self.pools.iter().filter(|p| !p.retired.load(Ordering::Acquire)).count();
        active * (self.config.page_capacity + self.config.block_capacity * BLOCK_FRAMES)
    }

    fn pooled_frames(&self) -> usize {
        self.pools.iter().map(|p| p.pages.len() + p.blocks.len() * BLOCK_FRAMES).sum()
    }

    /// Free frames held by the buddy allocator and all pools.
    pub fn free_frames(&self) -> usize {
        let buddy = self.buddy.lock().free_frames();
        buddy + self.pooled_frames()
    }

    /// The buddy allocator's lock, for tests that must hold it.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn buddy_for_test(&self) -> spin::MutexGuard<'_, BuddyFrames<ORDER>> {
        self.buddy.lock()
    }

    /// Holds `cpu`'s page pool fill token, as an interrupted refill would.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn pool_filler_for_test(&self, cpu: usize) -> super::pool::Filler<'_, PAGE_POOL_SLOTS> {
        self.pools[cpu].pages.filler().unwrap()
    }

    /// The entries of `cpu`'s page (or block) pool, bottom to top.
    #[cfg(all(any(test, feature = "model"), not(loom)))]
    pub(crate) fn pool_snapshot_for_test(&self, cpu: usize, blocks: bool, out: &mut Vec<u64>) {
        let pools = &self.pools[cpu];
        let _ = if blocks { pools.blocks.snapshot(out) } else { pools.pages.snapshot(out) };
    }

    /// Gives frames to the buddy allocator with their tags as they are: the frame exercise's
    /// planted bug (a release that skips its transitions), never a path of the manager.
    #[cfg(all(any(test, feature = "model"), not(loom)))]
    pub(crate) fn give_back_untagged_for_test(&self, first: Pfn, frames: usize) -> Result<(), FrameError> {
        self.buddy.lock().give_back(first, frames)
    }

    /// Walks the database, the buddy allocator and every pool and checks that each frame has
    /// exactly one state and that everything held as free is tagged free; with a scrubber,
    /// also that held free frames read zero. Slow path (takes the buddy lock, uses the heap).
    /// Exact when no other CPU is allocating; see [`AuditReport::is_exact`].
    pub fn audit(&self, scrubber: Option<&dyn FrameScrubber>) -> AuditReport {
        let mut buddy = self.buddy.lock();
        audit(&self.db, &mut buddy, &self.pools, scrubber)
    }
}

/// One CPU's way into the atomic path: its own pool and the database, two pointers, `Copy`.
/// Everything here is trap-safe: lock-free, no heap, no zeroing or cache maintenance, a bounded
/// number of steps, and an error instead of waiting.
pub struct CpuFrames<'m, 'a, const ORDER: usize = 32> {
    frames: &'m FrameManager<'a, ORDER>,
    pools: &'m CpuPools,
}

impl<const ORDER: usize> Clone for CpuFrames<'_, '_, ORDER> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<const ORDER: usize> Copy for CpuFrames<'_, '_, ORDER> {}

impl<'m, 'a, const ORDER: usize> CpuFrames<'m, 'a, ORDER> {
    /// The CPU this handle belongs to.
    pub fn index(self) -> usize {
        self.pools.cpu
    }

    /// Hands one zeroed, clean 4 KiB frame to `owner`, from this CPU's pool (or, failing that,
    /// from another CPU's surplus). Callable from a trap handler with interrupts masked.
    /// [`AtomicError::Empty`] means: leave the trap, [`FrameManager::refill`], retry.
    /// Always inlined: on the demand-fault path the call itself would be a fifth of its cost.
    #[inline(always)]
    pub fn alloc_page_atomic_exclusive(self, owner: Owner) -> Result<Pfn, AtomicError> {
        match self.pools.pages.pop(POP_ATTEMPTS) {
            Some(pfn) => self.claim_popped_page(pfn, owner),
            None => self.alloc_page_from_other_cpus(owner),
        }
    }

    /// The demand-fault fast path's allocation: a page for guest `vm` from this CPU's own pool
    /// only, with the claim's proof ([`ClaimedPage`]) so the stage-2 code need not check the
    /// frame again. [`AtomicError::Empty`] as soon as the own pool is: the caller's general
    /// path then tries other CPUs' surplus and refills. No call on its way, so it fits a trap
    /// handler that saved only the caller-saved registers.
    #[inline(always)]
    pub fn alloc_guest_page_own_pool(self, vm: VmId) -> Result<ClaimedPage, AtomicError> {
        let pfn = self.pools.pages.pop(POP_ATTEMPTS).ok_or(AtomicError::Empty)?;
        self.claim_popped_page(pfn, Owner::guest(vm)).map(|pfn| ClaimedPage::new(pfn, vm))
    }

    /// Hands one zeroed, clean, 2 MiB-aligned block of 512 frames to `owner` (a guest), owned as
    /// one unit: claimed with one CAS on its head tag. [`AtomicError::Empty`] means no block
    /// was at hand (map 4 KiB pages instead, or refill and retry). The general path's form (the
    /// fast path's is [`CpuFrames::alloc_guest_block_own_pool`]); taking another CPU's surplus
    /// is out of line.
    #[inline(always)]
    pub fn alloc_block_atomic_exclusive(self, owner: Owner) -> Result<Pfn, AtomicError> {
        // Only guests own blocks; refuse others before a block leaves the pool.
        if owner.block_tag().is_none() {
            return Err(AtomicError::NotOwner);
        }
        let first = match self.pools.blocks.pop(POP_ATTEMPTS) {
            Some(first) => first,
            None => self.pop_block_from_other_cpus()?,
        };
        self.claim_popped_block(first, owner)
    }

    /// The block fault's fast path allocation: a block for guest `vm` from this CPU's own
    /// pool only, with the claim's proof ([`ClaimedBlock`]) so the stage-2 code need not check
    /// its head again. [`AtomicError::Empty`] as soon as the own pool is (the general path
    /// takes other CPUs' surplus and refills). No call on its way.
    #[inline(always)]
    pub fn alloc_guest_block_own_pool(self, vm: VmId) -> Result<ClaimedBlock, AtomicError> {
        let first = self.pools.blocks.pop(POP_ATTEMPTS).ok_or(AtomicError::Empty)?;
        self.claim_popped_block(first, Owner::guest(vm)).map(|head| ClaimedBlock::new(head, vm))
    }

    #[cold]
    #[inline(never)]
    fn pop_block_from_other_cpus(self) -> Result<u64, AtomicError> {
        self.frames.pop_from_other_cpus(self.pools.cpu, |p| &p.blocks, self.frames.config.block_low)
    }

    /// Gives back a frame `owner` got from the atomic path and never used (never mapped, never
    /// written: still zero and clean), e.g. a table page for a fault another CPU resolved
    /// first. It goes straight back into this CPU's pool. Frames that may have been written
    /// must go through [`FrameManager::release`], which scrubs. Nothing changes on error.
    pub fn return_unused_page_atomic(self, pfn: Pfn, owner: Owner) -> Result<(), AtomicError> {
        let pages = &self.pools.pages;
        let filler = pages.filler().ok_or(AtomicError::Busy)?;
        // Only pops can run while we hold the filler, so room now means room at the push.
        if pages.len() >= pages.capacity() {
            return Err(AtomicError::Full);
        }
        let cell = self.frames.db.cell(pfn.0).ok_or(AtomicError::NotOwner)?;
        // Acquire: the owner's use of the frame is over before it is free; the push publishes.
        cell.compare_exchange(owner.tag(), TAG_FREE, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| AtomicError::NotOwner)?;
        if filler.push(pfn.0).is_err() {
            let _ = cell.compare_exchange(TAG_FREE, owner.tag(), Ordering::Relaxed, Ordering::Relaxed);
            return Err(AtomicError::Full);
        }
        Ok(())
    }

    /// Whether this CPU's block pool is below its low watermark (one load): the block fault's
    /// cue to call [`FrameManager::refill`] once for the next several blocks.
    #[inline(always)]
    pub fn needs_block_refill(self) -> bool {
        self.pools.blocks.len() < self.frames.config.block_low
    }

    /// The frame manager this handle belongs to (for the refill a handle cannot do itself).
    pub fn manager(self) -> &'m FrameManager<'a, ORDER> {
        self.frames
    }

    /// Whether this CPU's pools are below a low watermark: call [`FrameManager::refill`] soon,
    /// outside the trap.
    pub fn needs_refill(self) -> bool {
        let config = &self.frames.config;
        self.pools.pages.len() < config.page_low || self.pools.blocks.len() < config.block_low
    }

    #[inline(always)]
    fn claim_popped_page(self, pfn: u64, owner: Owner) -> Result<Pfn, AtomicError> {
        if self.frames.db.claim_held(pfn, owner) {
            Ok(Pfn(pfn))
        } else {
            Err(AtomicError::Inconsistent)
        }
    }

    /// Pooled blocks are compound: one CAS on the head claims all 512 frames.
    #[inline(always)]
    fn claim_popped_block(self, first: u64, owner: Owner) -> Result<Pfn, AtomicError> {
        if self.frames.db.claim_block_held(first, owner) {
            Ok(Pfn(first))
        } else {
            Err(AtomicError::Inconsistent)
        }
    }

    #[cold]
    #[inline(never)]
    fn alloc_page_from_other_cpus(self, owner: Owner) -> Result<Pfn, AtomicError> {
        let low = self.frames.config.page_low;
        let pfn = self.frames.pop_from_other_cpus(self.pools.cpu, |p| &p.pages, low)?;
        self.claim_popped_page(pfn, owner)
    }
}

/// Pops every entry of `pool` (each `frames` frames) into the buddy allocator.
fn drain_pool<const N: usize, const ORDER: usize>(
    pool: &FramePool<N>,
    frames: usize,
    buddy: &mut BuddyFrames<ORDER>,
) -> Result<usize, FrameError> {
    let mut moved = 0;
    while pool.len() > 0 {
        // Popped frames are ours alone and tagged Free: exactly what the buddy takes.
        if let Some(first) = pool.pop(u32::MAX) {
            buddy.give_back(Pfn(first), frames)?;
            moved += frames;
        }
    }
    Ok(moved)
}

fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}
