//! Why a frame operation was refused. Every error leaves the frame database as it was.

use super::{FrameState, Pfn};

/// Errors of the boot-time and slow paths (database, buddy, release, refill, audit).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FrameError {
    /// The frame is outside the range the database covers.
    OutOfRange(Pfn),
    /// The frame is in a hole between RAM banks.
    NotRam(Pfn),
    /// The frame was not in the state the transition expects (wrong owner, double free...).
    WrongState { pfn: Pfn, expected: FrameState, found: FrameState },
    /// The tag holds a value no transition writes.
    CorruptTag { pfn: Pfn, tag: u16 },
    /// A physical range edge is not frame-aligned.
    Misaligned { start: u64, end: u64 },
    /// A physical range is empty or reversed.
    EmptyRange { start: u64, end: u64 },
    /// Two RAM banks or two free ranges overlap.
    Overlap(Pfn),
    /// The caller's storage for the database has fewer entries than the RAM span needs.
    StorageTooSmall { needed: usize, provided: usize },
    /// The free ranges and the frames tagged free in the database disagree.
    FreeRangesMismatch { tagged_free: usize, in_ranges: usize },
    /// The database spans more frames than the buddy allocator's `ORDER` can hold safely.
    SpanTooLarge { frames: usize, max: usize },
    /// A frame count that must be a power of two (1..=max block) is not.
    BadFrameCount(usize),
    /// A block of frames does not start at a multiple of its size.
    Unaligned(Pfn),
    /// No CPU with this index.
    InvalidCpu(usize),
    /// The pool configuration is inconsistent.
    BadConfig(&'static str),
    /// The buddy allocator has no block of the size asked for.
    OutOfFrames,
    /// Another caller is filling this CPU's pool right now; try again later.
    PoolBusy,
    /// A frame changed under a multi-frame transition after it was checked; the frames already
    /// changed were put back.
    Race(Pfn),
    /// The range covers only part of a 2 MiB block held or owned as one unit (split it first).
    PartialBlock(Pfn),
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::OutOfRange(pfn) => write!(f, "{pfn} is outside the frame database"),
            FrameError::NotRam(pfn) => write!(f, "{pfn} is not RAM"),
            FrameError::WrongState { pfn, expected, found } => {
                write!(f, "{pfn} is {found}, expected {expected}")
            }
            FrameError::CorruptTag { pfn, tag } => write!(f, "{pfn} has corrupt tag {tag:#06x}"),
            FrameError::Misaligned { start, end } => {
                write!(f, "range {start:#x}..{end:#x} is not frame-aligned")
            }
            FrameError::EmptyRange { start, end } => write!(f, "range {start:#x}..{end:#x} is empty"),
            FrameError::Overlap(pfn) => write!(f, "ranges overlap at {pfn}"),
            FrameError::StorageTooSmall { needed, provided } => {
                write!(f, "frame database needs {needed} entries, got {provided}")
            }
            FrameError::FreeRangesMismatch { tagged_free, in_ranges } => {
                write!(f, "{tagged_free} frames are tagged free but the free ranges hold {in_ranges}")
            }
            FrameError::SpanTooLarge { frames, max } => {
                write!(f, "{frames} frames exceed the buddy allocator's safe span of {max}")
            }
            FrameError::BadFrameCount(n) => write!(f, "{n} is not a valid power-of-two frame count"),
            FrameError::Unaligned(pfn) => write!(f, "{pfn} is not aligned to its block size"),
            FrameError::InvalidCpu(cpu) => write!(f, "no CPU {cpu}"),
            FrameError::BadConfig(why) => write!(f, "bad pool configuration: {why}"),
            FrameError::OutOfFrames => f.write_str("out of frames"),
            FrameError::PoolBusy => f.write_str("pool is being filled"),
            FrameError::Race(pfn) => write!(f, "{pfn} changed during a transition"),
            FrameError::PartialBlock(pfn) => write!(f, "{pfn} is part of a 2 MiB block owned as one unit"),
        }
    }
}

/// Errors of the atomic path: one byte, so a `Result<Pfn, AtomicError>` comes back in two
/// registers and the fast path stores no error record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum AtomicError {
    /// This CPU's pool is empty (or kept losing races) and no other CPU had a surplus:
    /// leave the trap, refill, retry.
    Empty,
    /// No CPU with this index.
    InvalidCpu,
    /// The frame is not owned by the caller, or is not RAM in the database: nothing changed.
    NotOwner,
    /// The pool is being filled on this CPU (the trap interrupted a refill): nothing changed.
    Busy,
    /// The pool has no room for a returned frame: nothing changed.
    Full,
    /// A pooled frame was not tagged free: a bug elsewhere took it; it was dropped from the
    /// pool and left to its current owner (the audit reports it).
    Inconsistent,
}
