//! The ownership audit: one pass over the database, the buddy allocator and every pool that
//! checks each frame has exactly one state and that everything held as free is tagged free.
//!
//! It owns nothing and changes nothing (the buddy allocator's blocks are borrowed and put
//! back under its lock). It is a slow path: it takes the buddy lock, allocates a bitmap of one
//! bit per frame and walks every tag. Against concurrent atomic allocation it stays sound:
//! pool snapshots are re-validated against the pool head and retried, and a frame caught
//! between a pool and its new owner is counted as "free, held by no one", not as an error.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::buddy::BuddyFrames;
use super::db::FrameDb;
use super::error::FrameError;
use super::manager::CpuPools;
use super::pool::FramePool;
use super::scrub::FrameScrubber;
use super::sync::Ordering;
use super::tag::{FrameState, Shape, VmId, TAG_FREE, TAG_FREE_HEAD};
use super::{Pfn, BLOCK_FRAMES};

/// Examples kept in a report; the rest are only counted.
const KEPT_PROBLEMS: usize = 8;
/// Snapshots tried per pool before the audit gives up on a pool that keeps changing.
const SNAPSHOT_TRIES: usize = 4;

/// Who holds a free frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Holder {
    Buddy,
    PagePool(usize),
    BlockPool(usize),
}

/// A broken invariant the audit found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuditProblem {
    /// A tag no transition writes.
    CorruptTag { pfn: Pfn, tag: u16 },
    /// The buddy allocator or a pool holds a frame that is not tagged free.
    HeldNotFree { pfn: Pfn, holder: Holder, found: FrameState },
    /// A frame is held twice (by two pools, or twice by the buddy allocator...).
    HeldTwice { pfn: Pfn, holder: Holder },
    /// A holder has a frame outside the database.
    HeldOutside { pfn: Pfn, holder: Holder },
    /// A held free frame does not read zero.
    Dirty { pfn: Pfn, holder: Holder },
    /// The buddy allocator's blocks do not add up to the free count the wrapper keeps.
    BuddyCount { in_blocks: usize, recorded: usize },
    /// A block pool holds a block that is not one compound free block (its claim would fail).
    NotOneUnit { pfn: Pfn, holder: Holder },
    /// A compound block out of shape: a tail whose head is no head, a head not 2 MiB-aligned
    /// or running past the database, or a frame inside a block in another state than its head.
    BrokenBlock { pfn: Pfn, tag: u16 },
}

/// Frames of one guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestFrames {
    pub vm: VmId,
    pub memory: usize,
    pub page_tables: usize,
    /// Shared memory it owns (lent to borrowers); VM 0 is Labyrinth, for regions no guest owns.
    pub shared: usize,
}

/// Counts per owner, where the free frames are, and what is wrong. `Display` prints it for the
/// log.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct AuditReport {
    /// Entries in the database (RAM and holes).
    pub frames: usize,
    pub absent: usize,
    pub free: usize,
    pub reserved: usize,
    pub hypervisor: usize,
    pub scrubbing: usize,
    /// Shared memory frames (each with its one owner in its tag; per owner in `guests`).
    pub shared: usize,
    /// 2 MiB blocks held or owned as one unit (their frames are counted in their state too).
    pub compound_blocks: usize,
    /// Per guest, by VM id.
    pub guests: Vec<GuestFrames>,
    pub free_in_buddy: usize,
    pub free_in_page_pools: usize,
    pub free_in_block_pools: usize,
    /// Tagged free but held by nobody: in flight on another CPU's atomic path, else leaked.
    pub free_unheld: usize,
    /// Pools skipped because they changed under every snapshot (their frames count as unheld).
    pub pools_unsettled: usize,
    /// Number of problems found; the first few are in `examples`.
    pub problems: usize,
    pub examples: Vec<AuditProblem>,
}

impl AuditReport {
    /// No invariant is broken.
    pub fn is_consistent(&self) -> bool {
        self.problems == 0
    }

    /// Consistent, and nothing was in flight: every free frame is held by exactly one holder
    /// and no release is half done. What a quiescent system (tests, all CPUs parked) must show.
    pub fn is_exact(&self) -> bool {
        self.is_consistent() && self.free_unheld == 0 && self.scrubbing == 0 && self.pools_unsettled == 0
    }

    fn problem(&mut self, problem: AuditProblem) {
        self.problems += 1;
        if self.examples.len() < KEPT_PROBLEMS {
            self.examples.push(problem);
        }
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "frames {}: absent {}, reserved {}, hypervisor {}, scrubbing {}, shared {}, free {} \
             (buddy {}, page pools {}, block pools {}, unheld {}); 2 MiB blocks as one unit {}",
            self.frames,
            self.absent,
            self.reserved,
            self.hypervisor,
            self.scrubbing,
            self.shared,
            self.free,
            self.free_in_buddy,
            self.free_in_page_pools,
            self.free_in_block_pools,
            self.free_unheld,
            self.compound_blocks,
        )?;
        for g in &self.guests {
            writeln!(
                f,
                "  guest {}: memory {}, page tables {}, shared {}",
                g.vm.get(),
                g.memory,
                g.page_tables,
                g.shared
            )?;
        }
        write!(f, "problems {}", self.problems)?;
        for p in &self.examples {
            write!(f, "\n  {p:?}")?;
        }
        Ok(())
    }
}

/// Frames marked as held so far: one bit per database entry.
struct Held {
    base: u64,
    bits: Vec<u64>,
    len: usize,
}

impl Held {
    /// Marks `pfn` held; `Err` if it was already.
    fn mark(&mut self, pfn: Pfn) -> Result<bool, ()> {
        let i = pfn.0.wrapping_sub(self.base) as usize;
        if i >= self.len {
            return Ok(false);
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.bits[word] & bit != 0 {
            return Err(());
        }
        self.bits[word] |= bit;
        Ok(true)
    }

    fn is_held(&self, i: usize) -> bool {
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }
}

/// Checks a frame a holder claims to hold free (its tag was read as `tag`).
fn check_held(
    report: &mut AuditReport,
    held: &mut Held,
    pfn: Pfn,
    tag: Option<u16>,
    holder: Holder,
    scrubber: Option<&dyn FrameScrubber>,
) {
    match (held.mark(pfn), tag) {
        (Ok(false), _) | (_, None) => report.problem(AuditProblem::HeldOutside { pfn, holder }),
        (Err(()), _) => report.problem(AuditProblem::HeldTwice { pfn, holder }),
        (Ok(true), Some(TAG_FREE)) => {
            if scrubber.is_some_and(|s| !s.reads_zero(pfn)) {
                report.problem(AuditProblem::Dirty { pfn, holder });
            }
        }
        (Ok(true), Some(tag)) => match FrameState::from_tag(tag) {
            Some(found) => report.problem(AuditProblem::HeldNotFree { pfn, holder, found }),
            None => report.problem(AuditProblem::CorruptTag { pfn, tag }),
        },
    }
}

/// The audit proper; the caller holds the buddy lock (that is the `&mut`).
pub(crate) fn audit<const ORDER: usize>(
    db: &FrameDb<'_>,
    buddy: &mut BuddyFrames<ORDER>,
    pools: &[CpuPools],
    scrubber: Option<&dyn FrameScrubber>,
) -> AuditReport {
    let mut report = AuditReport { frames: db.len(), ..AuditReport::default() };
    let mut held = Held { base: db.base().0, bits: vec![0; db.len().div_ceil(64)], len: db.len() };
    // A frame's tag as a single frame's: a compound block's frames read as their head's state,
    // so "held free" means the same for pooled pages, pooled blocks and the buddy's frames.
    let tag_of = |pfn: Pfn| match db.unit(pfn) {
        Ok((state, _)) => Some(state.tag()),
        Err(FrameError::CorruptTag { tag, .. }) => Some(tag),
        Err(_) => None,
    };

    buddy.for_each_block(|first, frames| {
        for i in 0..frames as u64 {
            let pfn = first.add(i);
            check_held(&mut report, &mut held, pfn, tag_of(pfn), Holder::Buddy, scrubber);
        }
        report.free_in_buddy += frames;
    });
    if report.free_in_buddy != buddy.free_frames() {
        let recorded = buddy.free_frames();
        report.problem(AuditProblem::BuddyCount { in_blocks: report.free_in_buddy, recorded });
    }

    let mut scratch = (Vec::new(), Vec::new());
    for (cpu, cpu_pools) in pools.iter().enumerate() {
        let mut pool_audit =
            PoolAudit { report: &mut report, held: &mut held, scrubber, scratch: &mut scratch };
        let pages = pool_audit.pool(&cpu_pools.pages, 1, Holder::PagePool(cpu), &tag_of);
        let blocks = pool_audit.pool(&cpu_pools.blocks, BLOCK_FRAMES, Holder::BlockPool(cpu), &tag_of);
        // A pooled block is claimed with one CAS on its head: it must be one unit.
        for &first in scratch.0.iter().take(blocks / BLOCK_FRAMES) {
            if db.cell(first).map(|c| c.load(Ordering::Acquire)) != Some(TAG_FREE_HEAD) {
                report.problem(AuditProblem::NotOneUnit { pfn: Pfn(first), holder: Holder::BlockPool(cpu) });
            }
        }
        report.free_in_page_pools += pages;
        report.free_in_block_pools += blocks;
    }

    let mut guests: BTreeMap<VmId, GuestFrames> = BTreeMap::new();
    for (i, cell) in db.tags().iter().enumerate() {
        let tag = cell.load(Ordering::Acquire);
        let pfn = db.base().add(i as u64);
        let state = match Shape::of(tag) {
            Some(Shape::Frame(state)) => {
                // Inside a compound block only a split in progress leaves per-frame tags, and
                // those carry the head's state.
                if let Ok((head_state, _)) = db.unit(Pfn(pfn.0 & !(BLOCK_FRAMES as u64 - 1))) {
                    let head_tag =
                        db.cell(pfn.0 & !(BLOCK_FRAMES as u64 - 1)).map(|c| c.load(Ordering::Acquire));
                    if head_tag.and_then(Shape::of).is_some_and(|s| matches!(s, Shape::Head(_)))
                        && head_state != state
                    {
                        report.problem(AuditProblem::BrokenBlock { pfn, tag });
                    }
                }
                Some(state)
            }
            Some(Shape::Head(state)) => {
                report.compound_blocks += 1;
                if !pfn.0.is_multiple_of(BLOCK_FRAMES as u64) || db.cells(pfn, BLOCK_FRAMES).is_err() {
                    report.problem(AuditProblem::BrokenBlock { pfn, tag });
                }
                Some(state)
            }
            Some(Shape::Tail) => match db.unit(pfn) {
                Ok((state, _)) => Some(state),
                Err(_) => {
                    report.problem(AuditProblem::BrokenBlock { pfn, tag });
                    continue;
                }
            },
            None => None,
        };
        match state {
            Some(FrameState::Absent) => report.absent += 1,
            Some(FrameState::Free) => {
                report.free += 1;
                if !held.is_held(i) {
                    report.free_unheld += 1;
                }
            }
            Some(FrameState::Reserved) => report.reserved += 1,
            Some(FrameState::Hypervisor) => report.hypervisor += 1,
            Some(FrameState::Scrubbing) => report.scrubbing += 1,
            Some(FrameState::Guest(vm)) => guest(&mut guests, vm).memory += 1,
            Some(FrameState::PageTable(vm)) => guest(&mut guests, vm).page_tables += 1,
            Some(FrameState::SharedOwned(vm)) => {
                report.shared += 1;
                guest(&mut guests, vm).shared += 1;
            }
            None => report.problem(AuditProblem::CorruptTag { pfn: db.base().add(i as u64), tag }),
        }
    }
    report.guests = guests.into_values().collect();
    report
}

/// The counts of VM `vm`, made on first use.
fn guest(guests: &mut BTreeMap<VmId, GuestFrames>, vm: VmId) -> &mut GuestFrames {
    guests.entry(vm).or_insert(GuestFrames { vm, memory: 0, page_tables: 0, shared: 0 })
}

/// Checks pools against the database, marking their frames held.
struct PoolAudit<'r> {
    report: &'r mut AuditReport,
    held: &'r mut Held,
    scrubber: Option<&'r dyn FrameScrubber>,
    scratch: &'r mut (Vec<u64>, Vec<Option<u16>>),
}

impl PoolAudit<'_> {
    /// Checks one pool whose entries are `frames` frames each; returns the frames it holds.
    fn pool<const N: usize>(
        &mut self,
        pool: &FramePool<N>,
        frames: usize,
        holder: Holder,
        tag_of: &impl Fn(Pfn) -> Option<u16>,
    ) -> usize {
        let (entries, tags) = &mut *self.scratch;
        if !settled_snapshot(pool, frames, tag_of, entries, tags) {
            self.report.pools_unsettled += 1;
            return 0;
        }
        let mut next_tag = tags.iter();
        for &first in entries.iter() {
            for i in 0..frames as u64 {
                let tag = next_tag.next().copied().flatten();
                check_held(self.report, self.held, Pfn(first).add(i), tag, holder, self.scrubber);
            }
        }
        entries.len() * frames
    }
}

/// Reads a pool's entries and the tags of their frames under one unchanged pool head.
/// Poppers claim a frame only after their pop moved the head (and the claim is a Release
/// that our Acquire tag read pairs with), so an unchanged head means no entry we saw left.
fn settled_snapshot<const N: usize>(
    pool: &FramePool<N>,
    frames: usize,
    tag_of: &impl Fn(Pfn) -> Option<u16>,
    entries: &mut Vec<u64>,
    tags: &mut Vec<Option<u16>>,
) -> bool {
    for _ in 0..SNAPSHOT_TRIES {
        let head = pool.snapshot(entries);
        tags.clear();
        for &first in entries.iter() {
            tags.extend((0..frames as u64).map(|i| tag_of(Pfn(first).add(i))));
        }
        if pool.head() == head {
            return true;
        }
    }
    false
}
