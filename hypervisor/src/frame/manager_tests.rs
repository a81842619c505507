//! Unit tests of the frame manager: one behaviour each, over the standard rig (fake RAM).

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::Duration;
use std::vec::Vec;

use super::sync::Ordering;
use super::tag::{TAG_FREE, TAG_HYPERVISOR};
use super::testing::*;
use super::*;

fn filled(total: usize, cpus: usize) -> Rig {
    let rig = rig(total, cpus, small());
    for cpu in 0..cpus {
        rig.frames.refill(cpu).unwrap();
    }
    rig
}

fn state(rig: &Rig, pfn: Pfn) -> FrameState {
    rig.frames.db().state(pfn).unwrap()
}

fn hypervisor_image() -> std::ops::Range<u64> {
    RAM_BASE >> 12..(RAM_BASE >> 12) + HYP_FRAMES as u64
}

// ---- Construction ----

// Boot scrubs every free frame and nothing else: the image and firmware keep their contents.
#[test]
fn new_scrubs_every_free_frame_only() {
    let rig = rig(64, 1, small());
    assert_eq!(rig.ram.scrubbed(), 64 - HYP_FRAMES - RESERVED_FRAMES);
    assert!(rig.ram.reads_zero(FIRST_FREE));
    assert!(rig.ram.reads_zero(FIRST_FREE.add(53)));
    assert_eq!(rig.ram.read(Pfn(RAM_BASE >> 12)), GARBAGE);
}

fn boot_db(total: usize) -> (FrameDb<'static>, FakeRam, u64) {
    let end = RAM_BASE + total as u64 * FRAME_SIZE;
    let mut db = FrameDb::new(leak_tags(total), Pfn(RAM_BASE >> 12), &[(RAM_BASE, end)]).unwrap();
    db.mark_hypervisor((RAM_BASE, RAM_BASE + 0x1000)).unwrap();
    (db, FakeRam::new(Pfn(RAM_BASE >> 12), total), end)
}

// A free range covering a hypervisor frame is refused.
#[test]
fn new_rejects_free_range_over_hypervisor_frame() {
    let (db, ram, end) = boot_db(16);
    let err = FrameManager::<32>::new(db, &[(RAM_BASE, end)], 1, small(), &ram).err();
    assert_eq!(
        err,
        Some(FrameError::WrongState {
            pfn: Pfn(RAM_BASE >> 12),
            expected: FrameState::Free,
            found: FrameState::Hypervisor
        })
    );
}

// Overlapping free ranges are refused (the allocator would hold frames twice).
#[test]
fn new_rejects_overlapping_free_ranges() {
    let (db, ram, end) = boot_db(16);
    let ranges = [(RAM_BASE + 0x1000, RAM_BASE + 0x5000), (RAM_BASE + 0x4000, end)];
    let err = FrameManager::<32>::new(db, &ranges, 1, small(), &ram).err();
    assert_eq!(err, Some(FrameError::Overlap(Pfn((RAM_BASE >> 12) + 4))));
}

// Free ranges that leave a free-tagged frame out are refused (it would be free and unheld).
#[test]
fn new_rejects_free_ranges_missing_free_frames() {
    let (db, ram, end) = boot_db(16);
    let err = FrameManager::<32>::new(db, &[(RAM_BASE + 0x2000, end)], 1, small(), &ram).err();
    assert_eq!(err, Some(FrameError::FreeRangesMismatch { tagged_free: 15, in_ranges: 14 }));
}

// A database too large for the allocator's ORDER is refused rather than risking lost blocks.
#[test]
fn new_rejects_span_too_large_for_order() {
    let (db, ram, end) = boot_db(1024);
    let err = FrameManager::<10>::new(db, &[(RAM_BASE + 0x1000, end)], 1, small(), &ram).err();
    assert_eq!(err, Some(FrameError::SpanTooLarge { frames: 1024, max: 512 }));
}

// Inconsistent watermarks and zero CPUs are refused.
#[test]
fn new_rejects_bad_config() {
    for config in [
        PoolConfig { page_low: 7, page_high: 6, ..small() },
        PoolConfig { page_high: 9, ..small() },
        PoolConfig { block_high: 2, ..small() },
        PoolConfig { page_capacity: PAGE_POOL_SLOTS + 1, ..small() },
        PoolConfig { block_capacity: BLOCK_POOL_SLOTS + 1, ..small() },
    ] {
        let (db, ram, end) = boot_db(16);
        let err = FrameManager::<32>::new(db, &[(RAM_BASE + 0x1000, end)], 1, config, &ram).err();
        assert!(matches!(err, Some(FrameError::BadConfig(_))), "{config:?}: {err:?}");
    }
    let (db, ram, end) = boot_db(16);
    let err = FrameManager::<32>::new(db, &[(RAM_BASE + 0x1000, end)], 0, small(), &ram).err();
    assert_eq!(err, Some(FrameError::BadConfig("no CPUs")));
}

// ---- The atomic page path ----

// A handed-out frame is tagged for its owner, reads zero, and is not the hypervisor's.
#[test]
fn atomic_alloc_hands_out_zeroed_frame_for_owner() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(3)).unwrap();
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(3)));
    assert!(rig.ram.reads_zero(pfn));
    assert!(!hypervisor_image().contains(&pfn.0));
}

// An empty pool (never refilled, no other CPU) is an error, not a panic or a wait.
#[test]
fn atomic_alloc_on_empty_pool_is_an_error() {
    let rig = rig(64, 1, small());
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
}

// An unknown CPU index is an error.
#[test]
fn atomic_alloc_rejects_unknown_cpu() {
    let rig = filled(64, 2);
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(2, guest(1)), Err(AtomicError::InvalidCpu));
    assert_eq!(rig.frames.alloc_block_atomic_exclusive(9, guest(1)), Err(AtomicError::InvalidCpu));
}

// The pool runs dry after exactly its high watermark, with distinct frames.
#[test]
fn atomic_alloc_hands_out_each_pooled_frame_once() {
    let rig = rig(64, 1, small());
    rig.frames.refill(0).unwrap();
    let got: Vec<Pfn> =
        (0..6).map(|_| rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap()).collect();
    assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), 6);
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
}

// A CPU with an empty pool takes from another CPU's surplus.
#[test]
fn atomic_alloc_takes_other_cpus_surplus() {
    let rig = rig(64, 2, small());
    rig.frames.refill(1).unwrap();
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
    assert!(rig.frames.needs_refill(0));
}

// Another CPU's pool at or below its low watermark is left alone.
#[test]
fn atomic_alloc_leaves_others_low_pools_alone() {
    let rig = rig(64, 2, small());
    rig.frames.refill(1).unwrap();
    for _ in 0..4 {
        rig.frames.alloc_page_atomic_exclusive(1, guest(1)).unwrap(); // cpu 1 down to 2 = low
    }
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
    assert!(rig.frames.alloc_page_atomic_exclusive(1, guest(1)).is_ok());
}

// The atomic path never takes the buddy lock: it completes while another holder keeps it.
#[test]
fn atomic_paths_complete_while_buddy_lock_is_held() {
    let rig = filled(2048, 1);
    let _held = rig.frames.buddy_for_test();
    let (done, finished) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let page = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
            rig.frames.return_unused_page_atomic(0, page, guest(1)).unwrap();
            let block = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
            done.send(block).unwrap();
        });
        let result = finished.recv_timeout(Duration::from_secs(10));
        assert!(result.is_ok(), "the atomic path waited on the buddy lock");
    });
}

// A pooled frame someone took behind the pool's back is reported, and keeps its owner.
#[test]
fn atomic_alloc_reports_pooled_frame_that_is_not_free() {
    let rig = filled(64, 1);
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(0, false, &mut pooled);
    let top = Pfn(*pooled.last().unwrap());
    rig.frames.db().cell(top.0).unwrap().store(TAG_HYPERVISOR, Ordering::Relaxed);
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(1)), Err(AtomicError::Inconsistent));
    assert_eq!(state(&rig, top), FrameState::Hypervisor);
}

// ---- Returning untouched frames ----

// An unused frame goes back to the pool, free, and is the next one handed out.
#[test]
fn return_unused_puts_frame_back_on_top() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, page_table(2)).unwrap();
    rig.frames.return_unused_page_atomic(0, pfn, page_table(2)).unwrap();
    assert_eq!(state(&rig, pfn), FrameState::Free);
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(5)), Ok(pfn));
}

// Returning a frame one does not own is refused and changes nothing.
#[test]
fn return_unused_by_wrong_owner_is_refused() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    assert_eq!(rig.frames.return_unused_page_atomic(0, pfn, guest(2)), Err(AtomicError::NotOwner));
    assert_eq!(
        rig.frames.return_unused_page_atomic(0, Pfn(RAM_BASE >> 12), guest(1)),
        Err(AtomicError::NotOwner)
    );
    assert_eq!(rig.frames.return_unused_page_atomic(0, Pfn(1), guest(1)), Err(AtomicError::NotOwner));
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
}

// Returning twice is refused the second time.
#[test]
fn return_unused_twice_is_refused() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.frames.return_unused_page_atomic(0, pfn, guest(1)).unwrap();
    assert_eq!(rig.frames.return_unused_page_atomic(0, pfn, guest(1)), Err(AtomicError::NotOwner));
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
}

// A full pool refuses a returned frame, which stays with its owner.
#[test]
fn return_unused_to_full_pool_is_refused() {
    let rig = rig(64, 1, PoolConfig { page_high: 8, ..small() });
    let pfn = rig.frames.alloc_contiguous(1, guest(1)).unwrap();
    rig.frames.refill(0).unwrap();
    assert_eq!(rig.frames.return_unused_page_atomic(0, pfn, guest(1)), Err(AtomicError::Full));
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
}

// While a refill of the pool is under way (the trap interrupted it), returning is refused.
#[test]
fn return_unused_during_refill_is_busy() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    let _refilling = rig.frames.pool_filler_for_test(0);
    assert_eq!(rig.frames.return_unused_page_atomic(0, pfn, guest(1)), Err(AtomicError::Busy));
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
}

// ---- 2 MiB blocks ----

// A block is 512 aligned frames, all tagged for the owner, all zero.
#[test]
fn atomic_block_is_aligned_owned_and_zero() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(4)).unwrap();
    assert_eq!(first.0 % BLOCK_FRAMES as u64, 0);
    for i in 0..BLOCK_FRAMES as u64 {
        assert_eq!(state(&rig, first.add(i)), FrameState::Guest(vm(4)));
        assert!(rig.ram.reads_zero(first.add(i)));
    }
}

// No block at hand is an error the caller can act on (map pages instead).
#[test]
fn atomic_block_without_blocks_is_empty() {
    let small_ram = filled(256, 1); // too small for any 2 MiB block
    assert_eq!(small_ram.frames.alloc_block_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
    let rig = rig(2048, 1, PoolConfig { block_capacity: 0, block_low: 0, block_high: 0, ..small() });
    rig.frames.refill(0).unwrap();
    assert_eq!(rig.frames.alloc_block_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
}

// A pooled block whose head is not a free block's (a bug elsewhere took it) is refused whole:
// none of its frames change owner.
#[test]
fn atomic_block_is_all_or_nothing() {
    let rig = filled(2048, 1);
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(0, true, &mut pooled);
    let first = Pfn(pooled[0]);
    rig.frames.db().cell(first.0).unwrap().store(TAG_HYPERVISOR, Ordering::Relaxed);
    assert_eq!(rig.frames.alloc_block_atomic_exclusive(0, guest(1)), Err(AtomicError::Inconsistent));
    assert_eq!(state(&rig, first), FrameState::Hypervisor);
    for i in 1..BLOCK_FRAMES as u64 {
        assert_eq!(
            rig.frames.db().state(first.add(i)),
            Err(FrameError::CorruptTag { pfn: first.add(i), tag: 0x7000 })
        );
    }
}

// A pooled block is claimed with one CAS on its head and then owned whole; a tail that is not
// a tail (the claim does not read 511 tags) is the audit's to find.
#[test]
fn pooled_block_is_one_unit_and_a_broken_tail_is_audited() {
    let rig = filled(2048, 1);
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(0, true, &mut pooled);
    let first = Pfn(pooled[0]);
    assert_eq!(rig.frames.db().cell(first.0).unwrap().load(Ordering::Relaxed), 0x9000);
    assert_eq!(rig.frames.db().unit(first.add(7)), Ok((FrameState::Free, BLOCK_FRAMES as u64 - 7)));
    let last = first.add(BLOCK_FRAMES as u64 - 1);
    rig.frames.db().cell(last.0).unwrap().store(TAG_HYPERVISOR, Ordering::Relaxed);
    let report = rig.frames.audit(None);
    assert!(
        report.examples.contains(&AuditProblem::BrokenBlock { pfn: last, tag: TAG_HYPERVISOR }),
        "{report}"
    );
    rig.frames.db().cell(last.0).unwrap().store(0x7000, Ordering::Relaxed);
    assert_eq!(rig.frames.alloc_block_atomic_exclusive(0, guest(1)), Ok(first));
    for i in 0..BLOCK_FRAMES as u64 {
        assert_eq!(state(&rig, first.add(i)), FrameState::Guest(vm(1)));
    }
}

// A CPU without a block takes another CPU's surplus block.
#[test]
fn atomic_block_takes_other_cpus_surplus() {
    let rig = rig(4096, 2, PoolConfig { block_capacity: 2, block_high: 2, ..small() });
    rig.frames.refill(1).unwrap();
    assert!(rig.frames.alloc_block_atomic_exclusive(0, guest(1)).is_ok());
    assert_eq!(rig.frames.alloc_block_atomic_exclusive(0, guest(1)), Err(AtomicError::Empty));
}

// ---- Release ----

// Released frames are scrubbed before they are free: the next owner reads zero.
#[test]
fn release_scrubs_before_freeing() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.ram.write(pfn, 0xdead);
    let free_before = rig.frames.free_frames();
    rig.frames.release(pfn, 1, guest(1), &rig.ram).unwrap();
    assert_eq!(state(&rig, pfn), FrameState::Free);
    assert!(rig.ram.reads_zero(pfn));
    assert_eq!(rig.frames.free_frames(), free_before + 1);
}

// Releasing someone else's frame is refused, and neither the tag nor the data change.
#[test]
fn release_by_wrong_owner_changes_nothing() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.ram.write(pfn, 0xdead);
    let err = rig.frames.release(pfn, 1, guest(2), &rig.ram).err();
    assert_eq!(
        err,
        Some(FrameError::WrongState {
            pfn,
            expected: FrameState::Guest(vm(2)),
            found: FrameState::Guest(vm(1))
        })
    );
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
    assert_eq!(rig.ram.read(pfn), 0xdead);
}

// A double free is refused the second time.
#[test]
fn double_release_is_refused() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.frames.release(pfn, 1, guest(1), &rig.ram).unwrap();
    let free = rig.frames.free_frames();
    let err = rig.frames.release(pfn, 1, guest(1), &rig.ram).err();
    assert_eq!(
        err,
        Some(FrameError::WrongState { pfn, expected: FrameState::Guest(vm(1)), found: FrameState::Free })
    );
    assert_eq!(rig.frames.free_frames(), free);
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
}

// After a refused double free the frame is still handed out only once.
#[test]
fn double_release_never_duplicates_a_frame() {
    let rig = rig(64, 1, small());
    let pfn = rig.frames.alloc_contiguous(1, guest(1)).unwrap();
    rig.frames.release(pfn, 1, guest(1), &rig.ram).unwrap();
    let _ = rig.frames.release(pfn, 1, guest(1), &rig.ram);
    let mut seen = BTreeSet::new();
    while let Ok(p) = rig.frames.alloc_contiguous(1, guest(2)) {
        assert!(seen.insert(p), "{p} handed out twice");
    }
    assert_eq!(seen.len(), 64 - HYP_FRAMES - RESERVED_FRAMES);
}

// Frames outside the database, in holes, or firmware/hypervisor frames cannot be released.
#[test]
fn release_of_foreign_frames_is_refused() {
    let rig = filled(64, 1);
    let end = FIRST_FREE.add(64);
    assert_eq!(rig.frames.release(end, 1, guest(1), &rig.ram), Err(FrameError::OutOfRange(end)));
    let image = Pfn(RAM_BASE >> 12);
    assert!(matches!(rig.frames.release(image, 1, guest(1), &rig.ram), Err(FrameError::WrongState { .. })));
    let firmware = Pfn((RAM_BASE >> 12) + HYP_FRAMES as u64);
    assert!(matches!(
        rig.frames.release(firmware, 1, Owner::HYPERVISOR, &rig.ram),
        Err(FrameError::WrongState { .. })
    ));
    assert_eq!(rig.ram.read(image), GARBAGE, "refused release must not scrub");
}

// A hole between banks is not RAM for release either.
#[test]
fn release_in_hole_is_not_ram() {
    let banks = [(RAM_BASE, RAM_BASE + 0x10_000), (RAM_BASE + 0x20_000, RAM_BASE + 0x30_000)];
    let (base, len) = FrameDb::span_of(&banks).unwrap();
    let db = FrameDb::new(leak_tags(len), base, &banks).unwrap();
    let ram = FakeRam::new(base, len);
    let frames = FrameManager::<32>::new(db, &banks, 1, small(), &ram).unwrap();
    let hole = base.add(0x18);
    assert_eq!(frames.release(hole, 1, guest(1), &ram), Err(FrameError::NotRam(hole)));
}

// A range only partly owned by the caller is refused whole.
#[test]
fn release_of_partly_owned_range_changes_nothing() {
    let rig = filled(64, 1);
    let first = rig.frames.alloc_contiguous(4, guest(1)).unwrap();
    rig.frames.release(first.add(2), 1, guest(1), &rig.ram).unwrap();
    rig.ram.write(first, 0xbeef);
    assert!(rig.frames.release(first, 4, guest(1), &rig.ram).is_err());
    for i in [0, 1, 3] {
        assert_eq!(state(&rig, first.add(i)), FrameState::Guest(vm(1)));
    }
    assert_eq!(rig.ram.read(first), 0xbeef);
}

// A released block comes back whole: it can be handed out as a block again.
#[test]
fn released_block_is_a_block_again() {
    let rig = rig(1024 + 16, 1, PoolConfig { block_capacity: 1, ..small() });
    rig.frames.refill(0).unwrap();
    let block = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    rig.ram.write(block.add(7), 1);
    rig.frames.release(block, BLOCK_FRAMES, guest(1), &rig.ram).unwrap();
    rig.frames.refill(0).unwrap();
    let again = rig.frames.alloc_block_atomic_exclusive(0, guest(2)).unwrap();
    assert_eq!(again, block);
    assert!(rig.ram.reads_zero(block.add(7)));
}

// ---- Promises ----

/// Draws one page for `owner` on `cpu` the way the fault path does: the atomic path, and on
/// failure one refill and a second try.
fn draw_page(rig: &Rig, cpu: usize, owner: Owner) -> Option<Pfn> {
    rig.frames.alloc_page_atomic_exclusive(cpu, owner).ok().or_else(|| {
        rig.frames.refill(cpu).ok()?;
        rig.frames.alloc_page_atomic_exclusive(cpu, owner).ok()
    })
}

// Promises never exceed the free frames less what the pools can hold, and run out cleanly.
#[test]
fn commit_grants_free_frames_less_pool_capacity() {
    let rig = filled(2048, 2);
    let free = rig.frames.free_frames();
    let pools = 2 * (small().page_capacity + small().block_capacity * BLOCK_FRAMES);
    let first = rig.frames.commit(100);
    assert_eq!(first.frames(), 100);
    let second = rig.frames.commit(usize::MAX);
    assert_eq!(first.frames() + second.frames(), free - pools);
    assert_eq!(rig.frames.commit(1).frames(), 0, "nothing is left to promise");
    assert_eq!(rig.frames.committed_frames(), free - pools);
    assert_eq!(rig.frames.withdraw(&first), 100);
    assert_eq!(rig.frames.commit(usize::MAX).frames(), 100, "a withdrawn promise can be made again");
}

// A promise is withdrawn once: the second withdrawal of the same promise changes nothing,
// before the unpromised frames are open (nothing joins them: opening counts the frames no
// promise covers) and after (its frames join them, once).
#[test]
fn a_promise_is_withdrawn_once() {
    let rig = filled(2048, 2);
    let early = rig.frames.commit(100);
    let late = rig.frames.commit(200);
    let kept = rig.frames.commit(50);
    assert_eq!(rig.frames.withdraw(&early), 100);
    assert!(early.is_withdrawn() && !late.is_withdrawn());
    assert_eq!(rig.frames.withdraw(&early), 0, "withdrawn already");
    assert_eq!(rig.frames.unpromised().available(), 0, "nothing is unpromised before opening");
    assert_eq!(rig.frames.committed_frames(), 250);
    let open = rig.frames.open_unpromised(250);
    assert_eq!(rig.frames.withdraw(&late), 200);
    assert_eq!(rig.frames.unpromised().available(), open + 200, "its frames are unpromised now");
    assert_eq!(rig.frames.withdraw(&late), 0, "and only once");
    assert_eq!(rig.frames.unpromised().available(), open + 200);
    assert_eq!(rig.frames.committed_frames(), 50, "the promise still held is untouched");
    assert_eq!(kept.frames(), 50);
    // Every frame the unpromised count and the promise left claim is there to be drawn.
    let pools = 2 * (small().page_capacity + small().block_capacity * BLOCK_FRAMES);
    assert!(open + 200 + 50 <= rig.frames.free_frames() - pools);
}

// A promise no manager counted (a holder's test double) cannot make the unpromised count
// exceed what the promises held.
#[test]
fn withdrawing_never_gives_more_than_was_promised() {
    let rig = filled(2048, 1);
    let real = rig.frames.commit(10);
    let open = rig.frames.open_unpromised(10);
    assert_eq!(rig.frames.withdraw(&Promise::unbacked(1_000_000)), 10);
    assert_eq!(rig.frames.withdraw(&real), 0, "its frames were counted already");
    assert_eq!(rig.frames.unpromised().available(), open + 10);
    assert_eq!(rig.frames.committed_frames(), 0);
}

// A retired CPU (no guest there) holds nothing, refills refuse it, and promises stop setting
// its pools' capacity aside; retiring twice is refused.
#[test]
fn retired_pools_are_empty_and_leave_the_promise_margin() {
    let rig = filled(4096, 2);
    let free = rig.frames.free_frames();
    let pool = small().page_capacity + small().block_capacity * BLOCK_FRAMES;
    let moved = rig.frames.retire(1).unwrap();
    assert!(moved > 0, "CPU 1's filled pools were emptied");
    assert_eq!(rig.frames.free_frames(), free, "nothing lost in the drain");
    assert_eq!(rig.frames.refill(1), Err(FrameError::InvalidCpu(1)));
    assert_eq!(rig.frames.retire(1), Err(FrameError::InvalidCpu(1)));
    assert_eq!(rig.frames.commit(usize::MAX).frames(), free - pool, "only CPU 0's pools set aside");
    let mut held = Vec::new();
    rig.frames.pool_snapshot_for_test(1, false, &mut held);
    rig.frames.pool_snapshot_for_test(1, true, &mut held);
    assert!(held.is_empty());
    assert!(rig.frames.audit(None).is_consistent());
}

// A CPU retired after the unpromised frames are open (its guest stopped) sets nothing aside
// any more: what its pools could hold joins the unpromised frames, and every frame counted
// there can then be drawn through another CPU.
#[test]
fn a_pool_retired_after_opening_gives_its_capacity_to_the_unpromised() {
    let rig = filled(4096, 2);
    let pool = small().page_capacity + small().block_capacity * BLOCK_FRAMES;
    let open = rig.frames.open_unpromised(0);
    assert_eq!(open, rig.frames.free_frames() - 2 * pool, "both CPUs' pools set aside at opening");
    rig.frames.retire(1).unwrap();
    let now = rig.frames.unpromised().available();
    assert_eq!(now, open + pool, "CPU 1's capacity is unpromised now");
    assert!(rig.frames.unpromised().draw(now));
    for i in 0..now {
        assert!(draw_page(&rig, 0, guest(2)).is_some(), "unpromised frame {i} of {now} could not be drawn");
    }
    assert_eq!(rig.frames.retire(1), Err(FrameError::InvalidCpu(1)), "and only once");
    assert_eq!(rig.frames.unpromised().available(), 0);
    assert!(rig.frames.audit(None).is_consistent());
}

// Fewer frames free at opening than every pool could hold: only those were set aside, so a
// retired pool gives the unpromised frames only what the remaining pools no longer need (its
// whole capacity would count frames that do not exist; found by the frame_ops fuzz target).
#[test]
fn a_pool_retired_after_a_short_opening_gives_only_what_was_set_aside() {
    let rig = rig(4096, 3, small());
    let pool = small().page_capacity + small().block_capacity * BLOCK_FRAMES;
    for frames in [2048, 1024, 256, 64] {
        rig.frames.alloc_contiguous(frames, guest(1)).unwrap();
    }
    let free = rig.frames.free_frames();
    assert!(free < 2 * pool, "{free} free: less than two pools' capacity");
    assert_eq!(rig.frames.open_unpromised(0), 0, "all of it set aside");
    rig.frames.retire(2).unwrap();
    assert_eq!(rig.frames.unpromised().available(), 0, "two pools can still hold all {free}");
    rig.frames.retire(1).unwrap();
    let now = rig.frames.unpromised().available();
    assert_eq!(now, free - pool, "what CPU 0's pools cannot hold");
    for i in 0..now {
        assert!(draw_page(&rig, 0, guest(2)).is_some(), "unpromised frame {i} of {now} could not be drawn");
    }
}

// The point of a promise: a guest that draws exactly its promise always gets it, even after
// another guest drew all of its own and the pools were left in the worst state (the other
// CPU's pool full of frames nobody will use).
#[test]
fn promise_holds_whatever_the_other_holder_draws() {
    let rig = filled(4096, 2);
    let small_promise = rig.frames.commit(300).frames();
    let greedy_promise = rig.frames.commit(usize::MAX).frames();
    assert_eq!(small_promise, 300);
    for _ in 0..greedy_promise {
        draw_page(&rig, 1, guest(2)).expect("the greedy guest gets its own promise");
    }
    rig.frames.refill(1).unwrap();
    let mut seen = BTreeSet::new();
    for i in 0..small_promise {
        let pfn = draw_page(&rig, 0, guest(1)).unwrap_or_else(|| panic!("frame {i} of the promise missing"));
        assert!(seen.insert(pfn));
    }
    assert!(rig.frames.audit(None).is_consistent());
}

// ---- Refill and drain ----

// A pool above its low watermark is left alone; one below is filled to its high watermark.
#[test]
fn refill_follows_watermarks() {
    let rig = rig(2048, 1, small());
    assert!(rig.frames.needs_refill(0));
    let report = rig.frames.refill(0).unwrap();
    assert_eq!(report, RefillReport { pages_added: 6, blocks_added: 1, exhausted: false });
    assert!(!rig.frames.needs_refill(0));
    for _ in 0..3 {
        rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap(); // 3 left, low is 2
    }
    assert_eq!(rig.frames.refill(0).unwrap(), RefillReport::default());
    rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap(); // 2 left: not below low
    assert_eq!(rig.frames.refill(0).unwrap().pages_added, 0);
    rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap(); // 1 left: below low
    assert_eq!(rig.frames.refill(0).unwrap().pages_added, 5);
}

// A refill the buddy allocator cannot satisfy says so and keeps what it got.
#[test]
fn refill_reports_exhaustion() {
    let rig = rig(HYP_FRAMES + RESERVED_FRAMES + 4, 1, small());
    let report = rig.frames.refill(0).unwrap();
    assert_eq!(report, RefillReport { pages_added: 4, blocks_added: 0, exhausted: true });
    assert_eq!(rig.frames.free_frames(), 4);
}

// Two fillers never run on one pool: a refill during another's is refused.
#[test]
fn refill_while_pool_is_being_filled_is_busy() {
    let rig = rig(64, 1, small());
    let _filling = rig.frames.pool_filler_for_test(0);
    assert_eq!(rig.frames.refill(0), Err(FrameError::PoolBusy));
    assert_eq!(rig.frames.drain(0), Err(FrameError::PoolBusy));
}

// Draining moves every pooled frame back into the buddy allocator; nothing is lost.
#[test]
fn drain_returns_everything() {
    let rig = filled(2048, 2);
    let free = rig.frames.free_frames();
    assert_eq!(rig.frames.drain(0).unwrap(), 6 + BLOCK_FRAMES);
    assert_eq!(rig.frames.free_frames(), free);
    assert_eq!(rig.frames.alloc_page_atomic_exclusive(0, guest(1)).map(|_| ()), Ok(()), "from cpu 1");
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
}

// Unknown CPUs are refused by the slow paths too.
#[test]
fn slow_paths_reject_unknown_cpu() {
    let rig = rig(64, 1, small());
    assert_eq!(rig.frames.refill(1), Err(FrameError::InvalidCpu(1)));
    assert_eq!(rig.frames.drain(1), Err(FrameError::InvalidCpu(1)));
    assert!(!rig.frames.needs_refill(1));
}

// ---- Contiguous allocation and the heap ----

// Contiguous frames are aligned to their count, owned, zero, and can be released.
#[test]
fn contiguous_allocation_is_aligned_and_owned() {
    let rig = rig(256, 1, small());
    let first = rig.frames.alloc_contiguous(4, page_table(1)).unwrap();
    assert_eq!(first.0 % 4, 0);
    for i in 0..4 {
        assert_eq!(state(&rig, first.add(i)), FrameState::PageTable(vm(1)));
        assert!(rig.ram.reads_zero(first.add(i)));
    }
    assert_eq!(rig.frames.alloc_contiguous(3, guest(1)), Err(FrameError::BadFrameCount(3)));
    rig.frames.release(first, 4, page_table(1), &rig.ram).unwrap();
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
}

struct Regions(Vec<(u64, u64)>);

impl HeapSink for Regions {
    fn add_region(&mut self, start: u64, end: u64) {
        self.0.push((start, end));
    }
}

// The heap gets a contiguous range tagged hypervisor; guests can never be handed it.
#[test]
fn grow_heap_hands_hypervisor_frames_to_the_heap() {
    let rig = rig(256, 1, small());
    let mut heap = Regions(Vec::new());
    let (start, end) = rig.frames.grow_heap(16, &mut heap).unwrap();
    assert_eq!(heap.0, [(start, end)]);
    assert_eq!(end - start, 16 * FRAME_SIZE);
    let first = Pfn::from_phys(start).unwrap();
    for i in 0..16 {
        assert_eq!(state(&rig, first.add(i)), FrameState::Hypervisor);
    }
    assert!(matches!(rig.frames.release(first, 1, guest(1), &rig.ram), Err(FrameError::WrongState { .. })));
}

// A heap growth the allocator cannot satisfy hands nothing to the heap.
#[test]
fn grow_heap_failure_hands_nothing() {
    let rig = rig(64, 1, small());
    let mut heap = Regions(Vec::new());
    assert_eq!(rig.frames.grow_heap(64, &mut heap), Err(FrameError::OutOfFrames));
    assert_eq!(rig.frames.grow_heap(6, &mut heap), Err(FrameError::BadFrameCount(6)));
    assert!(heap.0.is_empty());
}

// The hypervisor's own frames are never handed out, whatever is asked.
#[test]
fn hypervisor_frames_are_never_handed_out() {
    let rig = rig(256, 2, small());
    let mut got = Vec::new();
    loop {
        rig.frames.refill(0).unwrap();
        match rig.frames.alloc_page_atomic_exclusive(0, guest(1)) {
            Ok(p) => got.push(p),
            Err(_) => break,
        }
    }
    while let Ok(p) = rig.frames.alloc_contiguous(1, guest(1)) {
        got.push(p);
    }
    assert_eq!(got.len(), 256 - HYP_FRAMES - RESERVED_FRAMES);
    assert!(got.iter().all(|p| p.0 >= FIRST_FREE.0));
}

// ---- Audit ----

// A fresh system audits exact, with the right count per owner.
#[test]
fn audit_of_fresh_system_is_exact() {
    let rig = filled(2048, 2);
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.frames, 2048);
    assert_eq!(report.hypervisor, HYP_FRAMES);
    assert_eq!(report.reserved, RESERVED_FRAMES);
    assert_eq!(report.free, 2048 - HYP_FRAMES - RESERVED_FRAMES);
    assert_eq!(report.free_in_page_pools, 12);
    assert_eq!(report.free_in_block_pools, 2 * BLOCK_FRAMES);
    assert_eq!(report.free_in_buddy + 12 + 2 * BLOCK_FRAMES, report.free);
}

// The audit counts frames per guest and prints them.
#[test]
fn audit_counts_per_guest() {
    let rig = filled(256, 1);
    rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.frames.alloc_page_atomic_exclusive(0, page_table(1)).unwrap();
    rig.frames.alloc_contiguous(2, guest(7)).unwrap();
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    assert_eq!(
        report.guests,
        [
            GuestFrames { vm: vm(1), memory: 2, page_tables: 1, shared: 0 },
            GuestFrames { vm: vm(7), memory: 2, page_tables: 0, shared: 0 },
        ]
    );
    let text = report.to_string();
    assert!(text.contains("guest 1: memory 2, page tables 1"), "{text}");
    assert!(text.contains("problems 0"), "{text}");
}

// A pooled frame tagged as owned is caught, with its holder.
#[test]
fn audit_catches_pooled_frame_with_owner() {
    let rig = filled(64, 1);
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(0, false, &mut pooled);
    let pfn = Pfn(pooled[0]);
    rig.frames.db().cell(pfn.0).unwrap().store(guest(1).tag(), Ordering::Relaxed);
    let report = rig.frames.audit(None);
    assert!(!report.is_consistent());
    assert_eq!(
        report.examples,
        [AuditProblem::HeldNotFree { pfn, holder: Holder::PagePool(0), found: FrameState::Guest(vm(1)) }]
    );
}

// A frame owned by a guest while the buddy allocator also holds it is caught.
#[test]
fn audit_catches_buddy_frame_with_owner() {
    let rig = rig(64, 1, small());
    let pfn = FIRST_FREE.add(20);
    rig.frames.db().cell(pfn.0).unwrap().store(guest(1).tag(), Ordering::Relaxed);
    let report = rig.frames.audit(None);
    assert_eq!(report.problems, 1);
    assert!(matches!(report.examples[0], AuditProblem::HeldNotFree { holder: Holder::Buddy, .. }));
}

// A free frame nobody holds (leaked) makes the audit inexact.
#[test]
fn audit_catches_leaked_free_frame() {
    let rig = filled(64, 1);
    let pfn = rig.frames.alloc_page_atomic_exclusive(0, guest(1)).unwrap();
    rig.frames.db().cell(pfn.0).unwrap().store(TAG_FREE, Ordering::Relaxed);
    let report = rig.frames.audit(None);
    assert!(report.is_consistent());
    assert!(!report.is_exact());
    assert_eq!(report.free_unheld, 1);
}

// A held free frame that does not read zero is caught.
#[test]
fn audit_catches_dirty_free_frame() {
    let rig = filled(64, 1);
    let pfn = FIRST_FREE.add(40);
    rig.ram.write(pfn, 7);
    let report = rig.frames.audit(Some(&rig.ram));
    assert_eq!(report.examples, [AuditProblem::Dirty { pfn, holder: Holder::Buddy }]);
}

// A corrupt tag is caught.
#[test]
fn audit_catches_corrupt_tag() {
    let rig = filled(64, 1);
    let pfn = Pfn(RAM_BASE >> 12);
    rig.frames.db().cell(pfn.0).unwrap().store(0x7abc, Ordering::Relaxed);
    let report = rig.frames.audit(None);
    assert_eq!(report.examples, [AuditProblem::CorruptTag { pfn, tag: 0x7abc }]);
}

// A frame both pooled and in the buddy allocator is caught as held twice.
#[test]
fn audit_catches_frame_held_twice() {
    let rig = filled(64, 1);
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(0, false, &mut pooled);
    let pfn = Pfn(pooled[0]);
    rig.frames.buddy_for_test().give_back(pfn, 1).unwrap();
    let report = rig.frames.audit(None);
    assert!(
        report.examples.iter().any(|p| matches!(p, AuditProblem::HeldTwice { pfn: f, .. } if *f == pfn)),
        "{report}"
    );
}

// ---- Per-CPU handles ----

// A CPU's handle exists only for real CPUs and allocates from that CPU's pool.
#[test]
fn cpu_handle_allocates_from_its_own_pool() {
    let rig = rig(2048, 2, small());
    assert!(rig.frames.cpu(2).is_none());
    rig.frames.refill(1).unwrap();
    let cpu1 = rig.frames.cpu(1).unwrap();
    assert_eq!(cpu1.index(), 1);
    assert!(!cpu1.needs_refill());
    let pfn = cpu1.alloc_page_atomic_exclusive(guest(1)).unwrap();
    assert_eq!(state(&rig, pfn), FrameState::Guest(vm(1)));
    let mut pooled = Vec::new();
    rig.frames.pool_snapshot_for_test(1, false, &mut pooled);
    assert_eq!(pooled.len(), 5);
    cpu1.return_unused_page_atomic(pfn, guest(1)).unwrap();
    rig.frames.pool_snapshot_for_test(1, false, &mut pooled);
    assert_eq!(pooled.last(), Some(&pfn.0));
}

// ---- 2 MiB blocks owned as one unit ----

fn raw(rig: &Rig, pfn: Pfn) -> u16 {
    rig.frames.db().cell(pfn.0).unwrap().load(Ordering::Relaxed)
}

// Releasing a guest's block whole keeps it one unit (one head change each way) and hands it
// back to the buddy allocator as a compound free block.
#[test]
fn block_released_whole_stays_one_unit() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    assert_eq!(raw(&rig, first), 0xd001);
    assert_eq!(raw(&rig, first.add(3)), 0x7000);
    rig.frames.release(first, BLOCK_FRAMES, guest(1), &rig.ram).unwrap();
    assert_eq!(raw(&rig, first), 0x9000);
    assert_eq!(raw(&rig, first.add(3)), 0x7000);
    assert!((0..BLOCK_FRAMES as u64).all(|i| rig.ram.reads_zero(first.add(i))));
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
}

// Releasing part of a block gives its frames per-frame tags first: the rest stays the guest's,
// frame by frame, and a second release of the same part is refused.
#[test]
fn block_released_in_part_goes_back_to_per_frame_tags() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    let part = first.add(16);
    rig.frames.release(part, 16, guest(1), &rig.ram).unwrap();
    assert_eq!(raw(&rig, first), guest(1).tag());
    assert_eq!(raw(&rig, first.add(300)), guest(1).tag());
    assert_eq!(state(&rig, part.add(3)), FrameState::Free);
    assert!(matches!(rig.frames.release(part, 16, guest(1), &rig.ram), Err(FrameError::WrongState { .. })));
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
}

// A release as someone else, or of a range running past a block into free frames, changes
// no tag, not even the block's shape.
#[test]
fn refused_release_leaves_a_block_whole() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    assert!(rig.frames.release(first.add(8), 8, guest(2), &rig.ram).is_err());
    assert!(rig.frames.release(first.add(500), 16, guest(1), &rig.ram).is_err());
    assert_eq!(raw(&rig, first), 0xd001);
    assert!((1..BLOCK_FRAMES as u64).all(|i| raw(&rig, first.add(i)) == 0x7000));
}

// A transition over part of a block is refused as such (callers split first).
#[test]
fn transition_over_part_of_a_block_is_refused() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    let err = rig.frames.db().transition(first.add(1), 4, guest(1).tag(), TAG_FREE).err();
    assert_eq!(err, Some(FrameError::PartialBlock(first.add(1))));
}

// A stage-2 split turns a block back into per-frame tags, once; nobody else's block splits.
#[test]
fn split_block_converts_once_and_only_for_its_owner() {
    let rig = filled(2048, 1);
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    assert!(rig.frames.split_block(first.add(9), guest(2)).is_err());
    assert_eq!(raw(&rig, first), 0xd001);
    assert_eq!(rig.frames.split_block(first.add(9), guest(1)), Ok(true));
    assert_eq!(rig.frames.split_block(first, guest(1)), Ok(false));
    assert!((0..BLOCK_FRAMES as u64).all(|i| raw(&rig, first.add(i)) == guest(1).tag()));
    assert!(rig.frames.audit(None).is_consistent());
}

// Free RAM starts as whole blocks; a page refill splits the one it takes pages from, so pooled
// pages are claimable one by one.
#[test]
fn page_refill_splits_the_block_it_takes_from() {
    let rig = rig(2048, 1, small());
    let report = rig.frames.audit(None);
    assert!(report.compound_blocks >= 2, "{report}");
    rig.frames.refill(0).unwrap();
    let mut pages = Vec::new();
    rig.frames.pool_snapshot_for_test(0, false, &mut pages);
    for &p in &pages {
        assert_eq!(raw(&rig, Pfn(p)), TAG_FREE);
    }
    assert!(rig.frames.audit(None).is_exact());
}

// The block fault's owner check reads one tag: only the head of a block held as one unit in
// that state says yes; a tail, a split block, another owner or an unaligned frame says no.
#[test]
fn is_block_in_answers_for_whole_blocks_only() {
    let rig = filled(4096, 1);
    let g1 = FrameState::Guest(VmId::new(1).unwrap());
    let first = rig.frames.alloc_block_atomic_exclusive(0, guest(1)).unwrap();
    assert!(rig.frames.db().is_block_in(first, g1));
    assert!(!rig.frames.db().is_block_in(first, FrameState::Guest(VmId::new(2).unwrap())));
    assert!(!rig.frames.db().is_block_in(first.add(1), g1), "a tail is not a head");
    rig.frames.split_block(first, guest(1)).unwrap();
    assert!(!rig.frames.db().is_block_in(first, g1), "split: its frames are tagged one by one");
    assert!(!rig.frames.db().is_block_in(Pfn(0x10), FrameState::Free), "outside the database");
}

// A block refill brings several blocks with one buddy call and only when the pool has run
// below its low watermark, so block faults do not refill after every block.
#[test]
fn block_refill_comes_once_per_several_blocks() {
    let config = PoolConfig { block_capacity: 4, block_low: 1, block_high: 4, ..small() };
    let rig = rig(8192, 1, config);
    assert_eq!(rig.frames.refill(0).unwrap().blocks_added, 4);
    let cpu = rig.frames.cpu(0).unwrap();
    for left in (0..4).rev() {
        assert!(!cpu.needs_block_refill(), "{left} blocks left: no refill yet");
        cpu.alloc_block_atomic_exclusive(guest(1)).unwrap();
    }
    assert!(cpu.needs_block_refill());
    assert_eq!(rig.frames.refill(0).unwrap().blocks_added, 4);
    assert!(!cpu.needs_block_refill());
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_consistent(), "{report}");
}

// ---- Shared memory ----

// The share transition moves a guest's frames to shared-owned, and the audit counts them with
// their one owner; they are released only as shared memory, then are free again.
#[test]
fn shared_frames_have_one_owner_and_release_as_shared() {
    let rig = filled(64, 1);
    let g = vm(3);
    let first = rig.frames.alloc_contiguous(4, Owner::guest(g)).unwrap();
    rig.frames.share(first, 4, g).unwrap();
    assert_eq!(state(&rig, first.add(3)), FrameState::SharedOwned(g));
    let audit = rig.frames.audit(Some(&rig.ram));
    assert!(audit.is_exact(), "{audit}");
    assert_eq!(audit.shared, 4);
    assert_eq!(audit.guests, vec![GuestFrames { vm: g, memory: 0, page_tables: 0, shared: 4 }]);
    // Not the guest's memory any more: a release as the guest is refused and changes nothing.
    let err = rig.frames.release(first, 4, Owner::guest(g), &rig.ram).unwrap_err();
    assert_eq!(
        err,
        FrameError::WrongState {
            pfn: first,
            expected: FrameState::Guest(g),
            found: FrameState::SharedOwned(g)
        }
    );
    // Nor another guest's shared memory.
    assert!(rig.frames.release(first, 4, Owner::shared(vm(4)), &rig.ram).is_err());
    assert_eq!(state(&rig, first), FrameState::SharedOwned(g));
    let free = rig.frames.free_frames();
    rig.frames.release(first, 4, Owner::shared(g), &rig.ram).unwrap();
    assert_eq!(rig.frames.free_frames(), free + 4);
    assert!(rig.frames.audit(Some(&rig.ram)).is_exact());
    assert_eq!(rig.frames.audit(None).shared, 0);
}

// Check, then commit: a range with one frame that is not the guest's is refused whole.
#[test]
fn share_of_a_range_not_all_the_guests_changes_nothing() {
    let rig = filled(64, 1);
    let first = rig.frames.alloc_contiguous(4, Owner::guest(vm(1))).unwrap();
    let other = rig.frames.alloc_contiguous(1, Owner::guest(vm(2))).unwrap();
    rig.frames.release(first.add(3), 1, Owner::guest(vm(1)), &rig.ram).unwrap();
    let err = rig.frames.share(first, 4, vm(1)).unwrap_err();
    assert!(matches!(err, FrameError::WrongState { found: FrameState::Free, .. }), "{err:?}");
    assert_eq!(state(&rig, first), FrameState::Guest(vm(1)));
    assert!(rig.frames.share(other, 1, vm(1)).is_err(), "another guest's frame");
    assert_eq!(state(&rig, other), FrameState::Guest(vm(2)));
    // Shared twice: the second is refused.
    rig.frames.share(first, 3, vm(1)).unwrap();
    assert!(rig.frames.share(first, 3, vm(1)).is_err());
    assert_eq!(rig.frames.audit(None).shared, 3);
}

// Part of a block the guest owns as one unit can be shared: the block is split, the rest stays
// the guest's; a shared frame at a block's head is not mistaken for a head later.
#[test]
fn share_of_part_of_a_block_splits_it() {
    let rig = rig(2048, 1, PoolConfig { block_capacity: 2, block_low: 1, block_high: 2, ..small() });
    rig.frames.refill(0).unwrap();
    let g = vm(5);
    let head = rig.frames.alloc_block_atomic_exclusive(0, Owner::guest(g)).unwrap();
    rig.frames.share(head, 2, g).unwrap();
    assert_eq!(state(&rig, head), FrameState::SharedOwned(g));
    assert_eq!(state(&rig, head.add(2)), FrameState::Guest(g));
    assert_eq!(state(&rig, head.add(511)), FrameState::Guest(g));
    // The rest of the block is released per frame; the shared head does not stop it.
    rig.frames.release(head.add(2), 510, Owner::guest(g), &rig.ram).unwrap();
    rig.frames.release(head, 2, Owner::shared(g), &rig.ram).unwrap();
    let audit = rig.frames.audit(Some(&rig.ram));
    assert!(audit.is_consistent(), "{audit}");
    assert_eq!((audit.shared, audit.guests.len()), (0, 0));
}
