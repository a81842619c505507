//! The frame database: one atomic 16-bit ownership tag per 4 KiB frame, from the lowest RAM
//! frame to the highest, holes included (tagged absent).
//!
//! It owns the tags and the rules for changing them. It never allocates, never touches the
//! frames themselves, and never writes a tag without a compare-and-swap from the state the
//! caller expects: a frame cannot silently change owner. Multi-frame transitions check every
//! frame first and only then commit (pKVM's check-then-commit), so a refused transition
//! leaves every tag as it was.
//!
//! Transitions (the whole state machine; see `docs/memory.md`):
//! - boot, `&mut self` only: Free -> Hypervisor, Free -> Reserved ([`FrameDb::mark_hypervisor`],
//!   [`FrameDb::mark_reserved`]); once the database is inside a `FrameManager` nobody has
//!   `&mut` any more, so no one can take a free frame by number behind the allocator's back;
//! - claim: Free -> owner, only by the allocator for a frame it holds exclusively;
//! - release: owner -> Scrubbing -> Free, only by the manager, which scrubs in between;
//! - return of an untouched frame: owner -> Free, only on the atomic path.
//!
//! A 2 MiB-aligned block can also be held or owned as one unit (a compound block, see `tag.rs`):
//! one head tag and 511 tails. It is formed from free frames under the buddy lock
//! ([`FrameDb::compound_free`]), claimed with one CAS on the head ([`FrameDb::claim_block_held`]),
//! released as a unit by the same transitions (a head in range counts for its 512 frames), and
//! turned back into per-frame tags on the slow path ([`FrameDb::split_block`]) when part of it
//! goes its own way. Order keeps every frame's owner exact while that happens: forming writes
//! the head first, splitting rewrites the tails first, so a tail's head is always a head.
//!
//! Absent and Reserved frames take part in no transition.

use super::error::FrameError;
use super::sync::{fence, AtomicU16, Ordering};
use super::tag::{
    head_form, state_of, FrameState, Owner, Shape, HEAD, TAG_ABSENT, TAG_FREE, TAG_FREE_HEAD, TAG_HYPERVISOR,
    TAG_RESERVED, TAG_TAIL,
};
use super::{frames_of, Pfn, BLOCK_FRAMES};

/// Frame-number bits below a 2 MiB block's head.
const BLOCK_MASK: u64 = BLOCK_FRAMES as u64 - 1;

/// One frame's entry. On the target the boot code carves an array of these out of RAM
/// (see [`FrameDb::span_of`]) and hands it over as `&'static [TagCell]`.
pub type TagCell = AtomicU16;

// The database promises 2 bytes per frame; the loom build swaps in bigger model atomics.
#[cfg(not(all(loom, test)))]
const _: () = assert!(core::mem::size_of::<TagCell>() == 2);
// Frame numbers index the database as `usize`; Labyrinth is 64-bit only.
const _: () = assert!(usize::BITS == 64);

/// The ownership tags of every frame between the lowest and the highest RAM frame.
pub struct FrameDb<'a> {
    tags: &'a [TagCell],
    base: u64,
}

impl<'a> FrameDb<'a> {
    /// Bytes of database per 4 KiB frame of the span it covers (holes included).
    pub const BYTES_PER_FRAME: usize = 2;

    /// Bytes of database per 4 KiB frame of the span it covers (holes included).
    pub const fn bytes_per_frame() -> usize {
        Self::BYTES_PER_FRAME
    }

    /// The first frame and the number of entries a database over `ram_banks` (physical
    /// `(start, end)` byte ranges, frame-aligned) needs: the boot code carves
    /// `entries * BYTES_PER_FRAME` bytes for it.
    pub fn span_of(ram_banks: &[(u64, u64)]) -> Result<(Pfn, usize), FrameError> {
        let mut span: Option<(Pfn, Pfn)> = None;
        for &bank in ram_banks {
            let (first, end) = frames_of(bank)?;
            span = Some(match span {
                None => (first, end),
                Some((lo, hi)) => (lo.min(first), hi.max(end)),
            });
        }
        let (lo, hi) = span.ok_or(FrameError::EmptyRange { start: 0, end: 0 })?;
        Ok((lo, (hi.0 - lo.0) as usize))
    }

    /// Builds the database over caller-provided storage whose first entry is frame `base`.
    /// Every entry becomes Absent, then every frame of `ram_banks` Free. Banks must be
    /// frame-aligned, disjoint and inside the storage.
    pub fn new(tags: &'a [TagCell], base: Pfn, ram_banks: &[(u64, u64)]) -> Result<Self, FrameError> {
        // Relaxed: nobody else can see the database before the boot code publishes it.
        for cell in tags {
            cell.store(TAG_ABSENT, Ordering::Relaxed);
        }
        let db = FrameDb { tags, base: base.0 };
        for &bank in ram_banks {
            let (first, end) = frames_of(bank)?;
            if first.0 < db.base {
                return Err(FrameError::OutOfRange(first));
            }
            let needed = (end.0 - db.base) as usize;
            if needed > tags.len() {
                return Err(FrameError::StorageTooSmall { needed, provided: tags.len() });
            }
            let cells = db.cells(first, (end.0 - first.0) as usize)?;
            if let Some(i) = cells.iter().position(|c| c.load(Ordering::Relaxed) != TAG_ABSENT) {
                return Err(FrameError::Overlap(first.add(i as u64)));
            }
            for cell in cells {
                cell.store(TAG_FREE, Ordering::Relaxed);
            }
        }
        Ok(db)
    }

    /// The first frame the database covers.
    pub fn base(&self) -> Pfn {
        Pfn(self.base)
    }

    /// One past the last frame the database covers.
    pub fn end(&self) -> Pfn {
        Pfn(self.base + self.tags.len() as u64)
    }

    /// Number of entries (frames of the span, holes included).
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The current state of one frame (a compound block's tail answers with its head's state).
    /// Acquire: a caller that sees a frame's new owner also sees what was published before the
    /// owner took it.
    pub fn state(&self, pfn: Pfn) -> Result<FrameState, FrameError> {
        self.unit(pfn).map(|(state, _)| state)
    }

    /// The state of `pfn` and how many frames from it on are sure to share it as one unit: the
    /// rest of its compound block, or 1. Lets a 2 MiB owner check read one tag, not 512.
    pub fn unit(&self, pfn: Pfn) -> Result<(FrameState, u64), FrameError> {
        let tag = self.cell(pfn.0).ok_or(FrameError::OutOfRange(pfn))?.load(Ordering::Acquire);
        match Shape::of(tag) {
            Some(Shape::Frame(state)) => Ok((state, 1)),
            Some(Shape::Head(state)) => Ok((state, BLOCK_FRAMES as u64)),
            Some(Shape::Tail) => {
                let head = Pfn(pfn.0 & !BLOCK_MASK);
                let left = BLOCK_FRAMES as u64 - (pfn.0 & BLOCK_MASK);
                match self.cell(head.0).map(|c| c.load(Ordering::Acquire)).and_then(Shape::of) {
                    Some(Shape::Head(state)) => Ok((state, left)),
                    // A tail without a head: no transition leaves one.
                    _ => Err(FrameError::CorruptTag { pfn, tag }),
                }
            }
            None => Err(FrameError::CorruptTag { pfn, tag }),
        }
    }

    /// Whether `pfn` is in `state` right now: one load and one compare for a frame tagged on its
    /// own (the fault path's owner check), one more load for a compound block's tail.
    #[inline(always)]
    pub fn is_in(&self, pfn: Pfn, state: FrameState) -> bool {
        match self.cell(pfn.0) {
            Some(c) => c.load(Ordering::Acquire) == state.tag() || self.is_in_block(pfn, state),
            None => false,
        }
    }

    /// Whether `head` heads a 2 MiB block held as one unit in `state`: one load and one
    /// compare (the block fault's owner check for all 512 frames).
    #[inline(always)]
    pub fn is_block_in(&self, head: Pfn, state: FrameState) -> bool {
        match (self.cell(head.0), head_form(state.tag())) {
            (Some(c), Some(tag)) if head.0 & BLOCK_MASK == 0 => c.load(Ordering::Acquire) == tag,
            _ => false,
        }
    }

    #[cold]
    #[inline(never)]
    fn is_in_block(&self, pfn: Pfn, state: FrameState) -> bool {
        self.state(pfn) == Ok(state)
    }

    /// Boot only: tags the hypervisor's own frames (image, stacks, this database, the bootstrap
    /// heap) so no path can ever hand them to a guest. All frames must be free.
    pub fn mark_hypervisor(&mut self, range: (u64, u64)) -> Result<(), FrameError> {
        let (first, end) = frames_of(range)?;
        self.transition(first, (end.0 - first.0) as usize, TAG_FREE, TAG_HYPERVISOR)
    }

    /// Boot only: tags firmware and reserved memory (PSCI firmware, the device tree,
    /// `/reserved-memory`, `/memreserve/`) as never allocatable. All frames must be free.
    pub fn mark_reserved(&mut self, range: (u64, u64)) -> Result<(), FrameError> {
        let (first, end) = frames_of(range)?;
        self.transition(first, (end.0 - first.0) as usize, TAG_FREE, TAG_RESERVED)
    }

    /// The cell of frame `pfn`, or `None` outside the database. A frame below the base wraps
    /// to a huge index, so one bounds check covers both ends.
    #[inline(always)]
    pub(crate) fn cell(&self, pfn: u64) -> Option<&TagCell> {
        self.tags.get(pfn.wrapping_sub(self.base) as usize)
    }

    /// The cells of `frames` frames from `first`, all inside the database.
    pub(crate) fn cells(&self, first: Pfn, frames: usize) -> Result<&[TagCell], FrameError> {
        let start = first.0.wrapping_sub(self.base) as usize;
        if start >= self.tags.len() {
            return Err(FrameError::OutOfRange(first));
        }
        let end = start.checked_add(frames).filter(|&e| e <= self.tags.len());
        match end {
            Some(end) => Ok(&self.tags[start..end]),
            None => Err(FrameError::OutOfRange(self.end())),
        }
    }

    /// Atomic path: takes a frame the caller holds exclusively (popped from a pool) from Free
    /// to `owner`. Release on success: an audit that reads the new tag (Acquire) also sees the
    /// pool pop that came before it, so it never counts the frame as pooled and owned at once.
    /// The frame's zeroed contents were already acquired through the pool.
    #[inline(always)]
    pub(crate) fn claim_held(&self, pfn: u64, owner: Owner) -> bool {
        match self.cell(pfn) {
            Some(cell) => {
                cell.compare_exchange(TAG_FREE, owner.tag(), Ordering::Release, Ordering::Relaxed).is_ok()
            }
            None => false,
        }
    }

    /// Atomic path: takes a compound free block the caller holds exclusively (popped from a
    /// block pool) for `owner` with one CAS on its head (Release, as [`FrameDb::claim_held`]).
    /// The tails say "as my head" and need no change. `false` if it is not a compound free
    /// block, or `owner` cannot own blocks.
    #[inline(always)]
    pub(crate) fn claim_block_held(&self, head: u64, owner: Owner) -> bool {
        match (self.cell(head), owner.block_tag()) {
            (Some(cell), Some(to)) if head & BLOCK_MASK == 0 => {
                cell.compare_exchange(TAG_FREE_HEAD, to, Ordering::Release, Ordering::Relaxed).is_ok()
            }
            _ => false,
        }
    }

    /// Slow path, under the buddy lock, for a 2 MiB-aligned block the caller holds: makes it
    /// one compound free block (head first, then the tails, so a tail always finds its head).
    /// A block that already is one is left alone. Every frame must be free.
    pub(crate) fn compound_free(&self, head: Pfn) -> Result<(), FrameError> {
        if head.0 & BLOCK_MASK != 0 {
            return Err(FrameError::Unaligned(head));
        }
        let cells = self.cells(head, BLOCK_FRAMES)?;
        if cells[0].load(Ordering::Acquire) == TAG_FREE_HEAD {
            return Ok(());
        }
        for (i, cell) in cells.iter().enumerate() {
            let found = cell.load(Ordering::Acquire);
            if found != TAG_FREE {
                return Err(unexpected(head.add(i as u64), TAG_FREE, found));
            }
        }
        commit(&cells[..1], head, TAG_FREE, TAG_FREE_HEAD)?;
        if let Err(e) = commit(&cells[1..], head.add(1), TAG_FREE, TAG_TAIL) {
            let _ = cells[0].compare_exchange(TAG_FREE_HEAD, TAG_FREE, Ordering::AcqRel, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    /// Slow path: if `head` heads a compound block in single-frame state `tag` (Free, Scrubbing
    /// or a guest's), gives its 512 frames per-frame tags `tag` again: tails first, then the head,
    /// so every tail reads as `tag` throughout. `Ok(false)` if it is not a compound block;
    /// `WrongState` (nothing changed) if it is one in another state. Idempotent if raced.
    pub(crate) fn split_block(&self, head: Pfn, tag: u16) -> Result<bool, FrameError> {
        let head = Pfn(head.0 & !BLOCK_MASK);
        // A block that does not fit the database was never formed.
        let Ok(cells) = self.cells(head, BLOCK_FRAMES) else { return Ok(false) };
        let found = cells[0].load(Ordering::Acquire);
        // Shared memory has bit 15 set without being a head: ask the decoder.
        if !matches!(Shape::of(found), Some(Shape::Head(_))) {
            return Ok(false);
        }
        if Some(found) != head_form(tag) {
            return Err(unexpected(head, tag | HEAD, found));
        }
        for cell in &cells[1..] {
            // AcqRel: as any transition. A tail already rewritten (a racing split) is left alone.
            let _ = cell.compare_exchange(TAG_TAIL, tag, Ordering::AcqRel, Ordering::Relaxed);
        }
        let _ = cells[0].compare_exchange(found, tag, Ordering::AcqRel, Ordering::Relaxed);
        Ok(true)
    }

    /// Slow path: splits every compound free block overlapping `frames` frames from `first`
    /// (just taken from the buddy allocator under its lock, for per-frame use). The caller holds
    /// those blocks' frames exclusively: they are all in the buddy allocator or just left it.
    pub(crate) fn split_free_blocks(&self, first: Pfn, frames: usize) -> Result<(), FrameError> {
        let mut head = first.0 & !BLOCK_MASK;
        while head < first.0 + frames as u64 {
            if let Ok(cells) = self.cells(Pfn(head), BLOCK_FRAMES) {
                if cells[0].load(Ordering::Acquire) == TAG_FREE_HEAD {
                    // The caller holds every frame of the block (buddy lock): nobody else
                    // changes these tags, so plain stores (tails first) do what CASes would,
                    // at a third of the cost on the page refill path. One Release fence
                    // orders them all after what came before, as a Release per store would;
                    // eight per step, so the loop's own cost is paid once per eight tags.
                    fence(Ordering::Release);
                    let (tails, rest) = cells[1..].split_at(BLOCK_FRAMES - 1 - (BLOCK_FRAMES - 1) % 8);
                    for eight in tails.chunks_exact(8) {
                        for cell in eight {
                            cell.store(TAG_FREE, Ordering::Relaxed);
                        }
                    }
                    for cell in rest {
                        cell.store(TAG_FREE, Ordering::Relaxed);
                    }
                    cells[0].store(TAG_FREE, Ordering::Release);
                }
            }
            head += BLOCK_FRAMES as u64;
        }
        Ok(())
    }

    /// Checks that every one of `frames` frames from `first` is in single-frame state `from`
    /// (compound blocks answer through their head), changing nothing.
    pub(crate) fn check(&self, first: Pfn, frames: usize, from: u16) -> Result<(), FrameError> {
        if frames == 0 {
            return Err(FrameError::BadFrameCount(0));
        }
        self.cells(first, frames)?;
        let mut pfn = first.0;
        let end = first.0 + frames as u64;
        while pfn < end {
            let (state, run) = self.unit(Pfn(pfn))?;
            if state.tag() != from {
                return Err(unexpected(Pfn(pfn), from, state.tag()));
            }
            pfn += run;
        }
        Ok(())
    }

    /// Slow path, for a range about to change hands per frame: the compound blocks it covers
    /// only in part (at most the two at its ends) go back to per-frame tags. Call it after
    /// [`FrameDb::check`] so a refused change leaves every tag as it was.
    pub(crate) fn split_partial_blocks(&self, first: Pfn, frames: usize, tag: u16) -> Result<(), FrameError> {
        let end = first.0 + frames as u64;
        for edge in [first.0, end] {
            if edge & BLOCK_MASK != 0 {
                self.split_block(Pfn(edge & !BLOCK_MASK), tag)?;
            }
        }
        Ok(())
    }

    /// Moves `frames` frames from `first` from tag `from` to tag `to`: checks every frame,
    /// then commits each by compare-and-swap. A compound block lying wholly in the range is one
    /// unit: its head moves between the head forms of `from` and `to`, its tails stay. A block
    /// only partly in the range is refused (`PartialBlock`; see [`FrameDb::split_partial_blocks`]).
    /// A wrong expectation changes nothing. A commit that loses a race undoes the frames already
    /// changed and reports [`FrameError::Race`]. AcqRel: the new owner sees what the previous
    /// owner published, and publishes its own writes (scrubbed zeros) to whoever takes it next.
    pub(crate) fn transition(&self, first: Pfn, frames: usize, from: u16, to: u16) -> Result<(), FrameError> {
        if frames == 0 {
            return Err(FrameError::BadFrameCount(0));
        }
        let cells = self.cells(first, frames)?;
        let heads = (head_form(from), head_form(to));
        let mut i = 0;
        while i < cells.len() {
            let found = cells[i].load(Ordering::Acquire);
            let pfn = first.add(i as u64);
            if found == from {
                i += 1;
            } else if found & HEAD != 0 && Some(found) == heads.0 {
                if pfn.0 & BLOCK_MASK != 0 || i + BLOCK_FRAMES > cells.len() || heads.1.is_none() {
                    return Err(FrameError::PartialBlock(pfn));
                }
                i += BLOCK_FRAMES;
            } else if found == TAG_TAIL && self.state(pfn).map(|s| s.tag()) == Ok(from) {
                return Err(FrameError::PartialBlock(pfn));
            } else {
                return Err(match self.state(pfn) {
                    Ok(state) => unexpected(pfn, from, state.tag()),
                    Err(e) => e,
                });
            }
        }
        commit_units(cells, first, (from, to), heads)
    }

    /// Raw tags of every entry, for the audit.
    pub(crate) fn tags(&self) -> &[TagCell] {
        self.tags
    }
}

/// The commit half of [`FrameDb::transition`]: CAS every frame from `from` to `to`, and every
/// compound head (with its tails: skipped) between the head forms; on a lost race, undo.
fn commit_units(
    cells: &[TagCell],
    first: Pfn,
    (from, to): (u16, u16),
    heads: (Option<u16>, Option<u16>),
) -> Result<(), FrameError> {
    let mut i = 0;
    while i < cells.len() {
        let (want, new, step) = match heads {
            (Some(hf), Some(ht)) if cells[i].load(Ordering::Acquire) == hf => (hf, ht, BLOCK_FRAMES),
            _ => (from, to, 1),
        };
        if cells[i].compare_exchange(want, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
            for done in &cells[..i] {
                // Only the same caller racing itself on the same frames could have moved these
                // on from `to`; then there is nothing right to restore anyway. Tails fail both.
                let _ = done.compare_exchange(to, from, Ordering::AcqRel, Ordering::Relaxed);
                if let (Some(hf), Some(ht)) = heads {
                    let _ = done.compare_exchange(ht, hf, Ordering::AcqRel, Ordering::Relaxed);
                }
            }
            return Err(FrameError::Race(first.add(i as u64)));
        }
        i += step;
    }
    Ok(())
}

/// CAS every cell from `from` to `to`; on a lost race, undo the cells already changed.
fn commit(cells: &[TagCell], first: Pfn, from: u16, to: u16) -> Result<(), FrameError> {
    for (i, cell) in cells.iter().enumerate() {
        if cell.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_err() {
            for done in &cells[..i] {
                // Only the same caller racing itself on the same frames could have moved these
                // on from `to`; then there is nothing right to restore anyway.
                let _ = done.compare_exchange(to, from, Ordering::AcqRel, Ordering::Relaxed);
            }
            return Err(FrameError::Race(first.add(i as u64)));
        }
    }
    Ok(())
}

/// The error for a frame found in tag `found` where the transition expected `from`.
pub(crate) fn unexpected(pfn: Pfn, from: u16, found: u16) -> FrameError {
    match Shape::of(found) {
        Some(Shape::Frame(FrameState::Absent)) => FrameError::NotRam(pfn),
        Some(Shape::Frame(found) | Shape::Head(found)) => {
            let expected = match Shape::of(from) {
                Some(Shape::Frame(s) | Shape::Head(s)) => s,
                _ => state_of(from),
            };
            FrameError::WrongState { pfn, expected, found }
        }
        Some(Shape::Tail) => FrameError::PartialBlock(pfn),
        None => FrameError::CorruptTag { pfn, tag: found },
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::frame::testing::leak_tags;
    use crate::frame::VmId;

    const MIB: u64 = 1 << 20;
    // Two banks with a 1 MiB hole: frames 0x40000..0x40100 and 0x40200..0x40300.
    const BANKS: [(u64, u64); 2] = [(0x4000_0000, 0x4010_0000), (0x4020_0000, 0x4030_0000)];

    fn db() -> FrameDb<'static> {
        let (base, len) = FrameDb::span_of(&BANKS).unwrap();
        FrameDb::new(leak_tags(len), base, &BANKS).unwrap()
    }

    fn guest(id: u16) -> Owner {
        Owner::guest(VmId::new(id).unwrap())
    }

    // The database costs two bytes per frame, and says so.
    #[test]
    fn reports_two_bytes_per_frame() {
        assert_eq!(FrameDb::bytes_per_frame(), 2);
        assert_eq!(core::mem::size_of::<TagCell>(), FrameDb::BYTES_PER_FRAME);
    }

    // The span runs from the lowest bank's first frame to the highest bank's end.
    #[test]
    fn span_covers_all_banks_and_holes() {
        assert_eq!(FrameDb::span_of(&BANKS), Ok((Pfn(0x40000), 0x300)));
        assert_eq!(FrameDb::span_of(&[]), Err(FrameError::EmptyRange { start: 0, end: 0 }));
    }

    // Bank frames start free, hole frames absent, and nothing outside is addressable.
    #[test]
    fn banks_are_free_and_holes_absent() {
        let db = db();
        assert_eq!(db.state(Pfn(0x40000)), Ok(FrameState::Free));
        assert_eq!(db.state(Pfn(0x400ff)), Ok(FrameState::Free));
        assert_eq!(db.state(Pfn(0x40100)), Ok(FrameState::Absent));
        assert_eq!(db.state(Pfn(0x402ff)), Ok(FrameState::Free));
        assert_eq!(db.state(Pfn(0x40300)), Err(FrameError::OutOfRange(Pfn(0x40300))));
        assert_eq!(db.state(Pfn(0x3ffff)), Err(FrameError::OutOfRange(Pfn(0x3ffff))));
    }

    // Storage dirty from a previous life does not leak into the new database.
    #[test]
    fn new_overwrites_stale_storage() {
        let tags = leak_tags(0x300);
        for cell in tags {
            cell.store(Owner::HYPERVISOR.tag(), Ordering::Relaxed);
        }
        let db = FrameDb::new(tags, Pfn(0x40000), &BANKS).unwrap();
        assert_eq!(db.state(Pfn(0x40150)), Ok(FrameState::Absent));
        assert_eq!(db.state(Pfn(0x40050)), Ok(FrameState::Free));
    }

    // Storage that cannot hold the last bank is refused.
    #[test]
    fn new_rejects_short_storage() {
        let err = FrameDb::new(leak_tags(0x2ff), Pfn(0x40000), &BANKS).err();
        assert_eq!(err, Some(FrameError::StorageTooSmall { needed: 0x300, provided: 0x2ff }));
    }

    // A bank below the base frame is refused.
    #[test]
    fn new_rejects_bank_below_base() {
        let err = FrameDb::new(leak_tags(0x300), Pfn(0x40001), &BANKS).err();
        assert_eq!(err, Some(FrameError::OutOfRange(Pfn(0x40000))));
    }

    // Overlapping banks are refused.
    #[test]
    fn new_rejects_overlapping_banks() {
        let banks = [(0x4000_0000, 0x4010_0000), (0x400f_f000, 0x4020_0000)];
        let err = FrameDb::new(leak_tags(0x200), Pfn(0x40000), &banks).err();
        assert_eq!(err, Some(FrameError::Overlap(Pfn(0x400ff))));
    }

    // Misaligned banks are refused.
    #[test]
    fn new_rejects_misaligned_bank() {
        let banks = [(0x4000_0000, 0x4000_0800)];
        let err = FrameDb::new(leak_tags(1), Pfn(0x40000), &banks).err();
        assert!(matches!(err, Some(FrameError::Misaligned { .. })));
    }

    // Boot marking tags a range hypervisor or reserved.
    #[test]
    fn boot_marks_hypervisor_and_reserved() {
        let mut db = db();
        db.mark_hypervisor((0x4000_0000, 0x4000_0000 + MIB / 2)).unwrap();
        db.mark_reserved((0x4020_0000, 0x4020_2000)).unwrap();
        assert_eq!(db.state(Pfn(0x4007f)), Ok(FrameState::Hypervisor));
        assert_eq!(db.state(Pfn(0x40080)), Ok(FrameState::Free));
        assert_eq!(db.state(Pfn(0x40201)), Ok(FrameState::Reserved));
        assert_eq!(db.state(Pfn(0x40202)), Ok(FrameState::Free));
    }

    // Marking a frame twice is refused and changes nothing, even for the part that was free.
    #[test]
    fn marking_overlap_is_all_or_nothing() {
        let mut db = db();
        db.mark_reserved((0x4000_4000, 0x4000_5000)).unwrap();
        let err = db.mark_hypervisor((0x4000_0000, 0x4000_8000)).err();
        assert_eq!(
            err,
            Some(FrameError::WrongState {
                pfn: Pfn(0x40004),
                expected: FrameState::Free,
                found: FrameState::Reserved
            })
        );
        assert_eq!(db.state(Pfn(0x40000)), Ok(FrameState::Free));
        assert_eq!(db.state(Pfn(0x40004)), Ok(FrameState::Reserved));
    }

    // A range running into a hole is refused as not RAM, and nothing changes.
    #[test]
    fn transition_into_hole_is_not_ram() {
        let mut db = db();
        let err = db.mark_hypervisor((0x400f_0000, 0x4011_0000)).err();
        assert_eq!(err, Some(FrameError::NotRam(Pfn(0x40100))));
        assert_eq!(db.state(Pfn(0x400f0)), Ok(FrameState::Free));
    }

    // A range running past the database is out of range, and nothing changes.
    #[test]
    fn transition_past_end_is_out_of_range() {
        let db = db();
        let err = db.transition(Pfn(0x402f0), 0x20, TAG_FREE, TAG_HYPERVISOR).err();
        assert_eq!(err, Some(FrameError::OutOfRange(Pfn(0x40300))));
        assert_eq!(db.state(Pfn(0x402f0)), Ok(FrameState::Free));
    }

    // A zero-frame transition is a caller bug, not a silent success.
    #[test]
    fn transition_of_zero_frames_is_refused() {
        let db = db();
        assert_eq!(
            db.transition(Pfn(0x40000), 0, TAG_FREE, TAG_HYPERVISOR),
            Err(FrameError::BadFrameCount(0))
        );
    }

    // A corrupt tag is reported as such, never treated as some state.
    #[test]
    fn corrupt_tag_is_reported() {
        let db = db();
        db.cell(0x40007).unwrap().store(0x7777, Ordering::Relaxed);
        assert_eq!(db.state(Pfn(0x40007)), Err(FrameError::CorruptTag { pfn: Pfn(0x40007), tag: 0x7777 }));
        let err = db.transition(Pfn(0x40007), 1, TAG_FREE, TAG_HYPERVISOR).err();
        assert_eq!(err, Some(FrameError::CorruptTag { pfn: Pfn(0x40007), tag: 0x7777 }));
    }

    // `is_in` agrees with `state`, and says no outside the database.
    #[test]
    fn is_in_matches_state() {
        let tags = crate::frame::testing::leak_tags(16);
        let mut db = FrameDb::new(tags, Pfn(0x40000), &[(0x4000_0000, 0x4001_0000)]).unwrap();
        db.mark_hypervisor((0x4000_0000, 0x4000_1000)).unwrap();
        assert!(db.is_in(Pfn(0x40000), FrameState::Hypervisor));
        assert!(!db.is_in(Pfn(0x40000), FrameState::Free));
        assert!(db.is_in(Pfn(0x40001), FrameState::Free));
        assert!(!db.is_in(Pfn(0x1), FrameState::Absent));
    }

    // The atomic claim takes only free frames, and only once.
    #[test]
    fn claim_held_takes_free_frames_once() {
        let db = db();
        assert!(db.claim_held(0x40010, guest(1)));
        assert!(!db.claim_held(0x40010, guest(2)));
        assert_eq!(db.state(Pfn(0x40010)), Ok(FrameState::Guest(VmId::new(1).unwrap())));
        assert!(!db.claim_held(0x40150, guest(1)), "hole");
        assert!(!db.claim_held(0x3ffff, guest(1)), "below base");
        assert!(!db.claim_held(0x40300, guest(1)), "past end");
    }

    // A commit that loses a race (a frame changed after the check) puts back the frames it
    // already changed and names the frame that moved.
    #[test]
    fn lost_commit_race_rolls_back() {
        let db = db();
        let cells = db.cells(Pfn(0x40000), 4).unwrap();
        cells[3].store(TAG_HYPERVISOR, Ordering::Relaxed);
        let err = commit(cells, Pfn(0x40000), TAG_FREE, guest(1).tag()).err();
        assert_eq!(err, Some(FrameError::Race(Pfn(0x40003))));
        assert!(cells[..3].iter().all(|c| c.load(Ordering::Relaxed) == TAG_FREE));
        assert_eq!(cells[3].load(Ordering::Relaxed), TAG_HYPERVISOR);
    }
}
