//! Test doubles for the frame module: fake RAM behind the scrubber trait, tag storage, and a
//! standard rig (one RAM bank, a hypervisor image and firmware at its start, the rest free).
// The loom models use only part of this.
#![cfg_attr(loom, allow(dead_code))]

use std::boxed::Box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::vec::Vec;

use super::{FrameDb, FrameManager, FrameScrubber, Owner, Pfn, PoolConfig, TagCell, VmId, FRAME_SIZE};

/// Words of fake memory per frame: the whole 4 KiB, so "reads zero" means every byte.
const WORDS_PER_FRAME: usize = (FRAME_SIZE / 8) as usize;
/// What fake RAM holds before anyone zeroes it: memory as firmware left it.
pub(crate) const GARBAGE: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// Tag storage that lives for the rest of the test run (a few bytes per frame).
pub(crate) fn leak_tags(entries: usize) -> &'static [TagCell] {
    Box::leak((0..entries).map(|_| TagCell::new(0)).collect::<Vec<_>>().into_boxed_slice())
}

/// RAM for the tests: frames of real size that the scrubber zeroes and tests can dirty.
pub(crate) struct FakeRam {
    base: u64,
    words: Vec<AtomicU64>,
    scrubbed: AtomicUsize,
}

impl FakeRam {
    pub(crate) fn new(base: Pfn, frames: usize) -> FakeRam {
        let words = (0..frames * WORDS_PER_FRAME).map(|_| AtomicU64::new(GARBAGE)).collect();
        FakeRam { base: base.0, words, scrubbed: AtomicUsize::new(0) }
    }

    fn frame(&self, pfn: Pfn) -> &[AtomicU64] {
        let start = (pfn.0 - self.base) as usize * WORDS_PER_FRAME;
        &self.words[start..start + WORDS_PER_FRAME]
    }

    /// An owner writing to its frame: first, middle and last word.
    pub(crate) fn write(&self, pfn: Pfn, value: u64) {
        let frame = self.frame(pfn);
        for i in [0, WORDS_PER_FRAME / 2, WORDS_PER_FRAME - 1] {
            frame[i].store(value, Ordering::Relaxed);
        }
    }

    /// The first word of the frame (to see whether an owner's data is still there).
    pub(crate) fn read(&self, pfn: Pfn) -> u64 {
        self.frame(pfn)[0].load(Ordering::Relaxed)
    }

    /// Frames scrubbed so far.
    pub(crate) fn scrubbed(&self) -> usize {
        self.scrubbed.load(Ordering::Relaxed)
    }
}

impl FrameScrubber for FakeRam {
    fn scrub(&self, first: Pfn, frames: usize) {
        for i in 0..frames as u64 {
            for word in self.frame(first.add(i)) {
                word.store(0, Ordering::Relaxed);
            }
        }
        self.scrubbed.fetch_add(frames, Ordering::Relaxed);
    }

    fn reads_zero(&self, pfn: Pfn) -> bool {
        self.frame(pfn).iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }
}

/// Physical base of the rig's RAM bank (QEMU virt's).
pub(crate) const RAM_BASE: u64 = 0x4000_0000;
/// The rig's hypervisor image: the bank's first frames.
pub(crate) const HYP_FRAMES: usize = 8;
/// The rig's firmware frames, right after the image.
pub(crate) const RESERVED_FRAMES: usize = 2;
/// First frame the rig leaves free.
pub(crate) const FIRST_FREE: Pfn = Pfn((RAM_BASE >> 12) + (HYP_FRAMES + RESERVED_FRAMES) as u64);

pub(crate) struct Rig {
    pub(crate) ram: FakeRam,
    pub(crate) frames: FrameManager<'static>,
}

/// One bank of `total` frames at [`RAM_BASE`]: hypervisor image, firmware, then free frames
/// (scrubbed by the manager at construction).
pub(crate) fn rig(total: usize, cpus: usize, config: PoolConfig) -> Rig {
    let end = RAM_BASE + total as u64 * FRAME_SIZE;
    let banks = [(RAM_BASE, end)];
    let (base, len) = FrameDb::span_of(&banks).unwrap();
    let mut db = FrameDb::new(leak_tags(len), base, &banks).unwrap();
    let image_end = RAM_BASE + HYP_FRAMES as u64 * FRAME_SIZE;
    db.mark_hypervisor((RAM_BASE, image_end)).unwrap();
    db.mark_reserved((image_end, FIRST_FREE.phys())).unwrap();
    let ram = FakeRam::new(base, len);
    let frames = FrameManager::new(db, &[(FIRST_FREE.phys(), end)], cpus, config, &ram).unwrap();
    Rig { ram, frames }
}

pub(crate) fn vm(id: u16) -> VmId {
    VmId::new(id).unwrap()
}

pub(crate) fn guest(id: u16) -> Owner {
    Owner::guest(vm(id))
}

pub(crate) fn page_table(id: u16) -> Owner {
    Owner::page_table(vm(id))
}

/// Small pools: 8 pages (refill below 2, up to 6) and one block per CPU.
pub(crate) fn small() -> PoolConfig {
    PoolConfig {
        page_capacity: 8,
        page_low: 2,
        page_high: 6,
        block_capacity: 1,
        block_low: 1,
        block_high: 1,
        steal_victims: 3,
    }
}
