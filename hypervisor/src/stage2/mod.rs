//! Stage-2 translation: each guest's IPA-to-PA tables, the VMIDs that tag their TLB entries,
//! and the narrow interface ([`Stage2Env`]) through which the table code reaches memory, the
//! frame database and TLB maintenance.
//!
//! This module owns guests' table pages (tagged as that guest's page tables) and decides every
//! entry in them. It never maps a frame the frame database does not give to the guest, never
//! changes a live entry except through break-before-make, never installs except by one
//! compare-and-swap from an invalid entry (the vCPUs of a guest fault into it at once, with no
//! lock), and never frees a table page or reports a frame unmapped before the invalidation that
//! makes it unreachable is complete and no vCPU can still hold a pointer to it.
//! It is plain Rust: the arch supplies the `Stage2Env` over real memory and instructions, tests
//! and the fuzzer supply [`model::ModelEnv`], which checks the rules as the code runs.

mod desc;
mod env;
#[cfg(any(test, feature = "model"))]
pub mod exercise;
mod fault;
#[cfg(any(test, feature = "model"))]
pub mod model;
mod quiesce;
mod sync;
mod table;
mod vmid;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod stress_tests;
#[cfg(all(test, not(loom)))]
mod tests;

pub use desc::{is_shared_leaf, Attrs, Entry, MemType, PageState, LOCKED};
pub use env::Stage2Env;
pub use fault::{Declined, FaultCache, PageSlot, VacantBlock};
pub use quiesce::Quiescence;
pub use table::{level_size, Mapping, Stage2, ENTRIES, PAGE_SIZE};
pub use vmid::{VmidAllocator, VmidInvalidated};

use crate::frame::{FrameState, Pfn};

/// The shape of a guest's IPA space: how many address bits, and the level the walk starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub ipa_bits: u32,
    pub start_level: usize,
}

impl Geometry {
    /// The IPA size for a CPU with `pa_bits` physical address bits (`ID_AA64MMFR0_EL1.PARange`):
    /// the same, between 32 and 48 bits. Up to 39 bits the walk starts at level 1, above at 0.
    pub fn for_pa_bits(pa_bits: u32) -> Geometry {
        let ipa_bits = pa_bits.clamp(32, 48);
        Geometry { ipa_bits, start_level: if ipa_bits > 39 { 0 } else { 1 } }
    }

    /// One past the highest IPA.
    pub fn ipa_limit(&self) -> u64 {
        1u64 << self.ipa_bits
    }

    /// Entries of the root table in use.
    pub fn root_entries(&self) -> usize {
        let covered = table::level_size(self.start_level);
        ((self.ipa_limit() / covered) as usize).clamp(1, ENTRIES)
    }

    /// The most table pages (root included) mapping every page of `[base, base + size)` can
    /// take: one table per level-`l - 1` region the range touches, for each level below the
    /// root. Callers reserve this many frames before a guest draws any.
    pub fn max_table_pages(&self, base: u64, size: u64) -> usize {
        if size == 0 {
            return 1;
        }
        let last = base + (size - 1);
        let below_root = (self.start_level + 1..=3)
            .map(|level| {
                let parent = table::level_size(level - 1);
                (last / parent - base / parent + 1) as usize
            })
            .sum::<usize>();
        1 + below_root
    }

    /// `VTCR_EL2.T0SZ`.
    pub fn t0sz(&self) -> u64 {
        64 - self.ipa_bits as u64
    }

    /// `VTCR_EL2.SL0` for a 4 KiB granule: 2 = start at level 0, 1 = level 1.
    pub fn sl0(&self) -> u64 {
        2 - self.start_level as u64
    }
}

/// Why a stage-2 operation was refused. A refused operation changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2Error {
    /// No frame was left for a table page.
    OutOfMemory,
    Unaligned {
        addr: u64,
    },
    OutOfRange {
        ipa: u64,
    },
    BadLevel {
        level: usize,
    },
    AlreadyMapped {
        ipa: u64,
    },
    /// A structural change holds an entry on the path (break-before-make in progress): retry.
    Busy {
        ipa: u64,
    },
    /// The frame is not this guest's (RAM) or is RAM (Device mapping).
    NotOwned {
        pfn: Pfn,
        state: Option<FrameState>,
    },
    NotABlock {
        ipa: u64,
        level: usize,
    },
    NotCollapsible {
        ipa: u64,
    },
}

impl core::fmt::Display for Stage2Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Stage2Error::OutOfMemory => f.write_str("no frame left for a stage-2 table page"),
            Stage2Error::Unaligned { addr } => write!(f, "{addr:#x} is not aligned for this mapping"),
            Stage2Error::OutOfRange { ipa } => write!(f, "IPA {ipa:#x} is beyond the guest's IPA space"),
            Stage2Error::BadLevel { level } => write!(f, "no mapping of level {level} here"),
            Stage2Error::AlreadyMapped { ipa } => write!(f, "IPA {ipa:#x} is already mapped"),
            Stage2Error::Busy { ipa } => write!(f, "IPA {ipa:#x} is being remapped: retry"),
            Stage2Error::NotOwned { pfn, state: Some(s) } => {
                write!(f, "{pfn} is {s}, not this guest's to map")
            }
            Stage2Error::NotOwned { pfn, state: None } => write!(f, "{pfn} is not RAM"),
            Stage2Error::NotABlock { ipa, level } => write!(f, "no block at level {level} maps {ipa:#x}"),
            Stage2Error::NotCollapsible { ipa } => {
                write!(f, "the table covering {ipa:#x} does not map one aligned contiguous block")
            }
        }
    }
}
