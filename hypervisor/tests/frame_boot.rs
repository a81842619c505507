//! The boot sequence as the arch glue will run it, through the public API only: a memory map
//! with two RAM banks and a hole, firmware and the image reserved, the frame database carved
//! out of RAM, the buddy allocator, the heap, the pools; then a trap-time allocation, a
//! release and an audit.

use std::collections::BTreeSet;
use std::sync::Mutex;

use labyrinth::frame::{
    AtomicError, FrameDb, FrameError, FrameManager, FrameScrubber, FrameState, HeapSink, Owner, Pfn,
    PoolConfig, TagCell, VmId, FRAME_SIZE,
};

/// Fake RAM that only remembers which frames hold data: enough to see that every frame
/// handed out was scrubbed since its last owner wrote to it.
#[derive(Default)]
struct DirtyFrames(Mutex<BTreeSet<u64>>);

impl DirtyFrames {
    fn write(&self, pfn: Pfn) {
        self.0.lock().unwrap().insert(pfn.0);
    }
}

impl FrameScrubber for DirtyFrames {
    fn scrub(&self, first: Pfn, frames: usize) {
        let mut dirty = self.0.lock().unwrap();
        for i in 0..frames as u64 {
            dirty.remove(&(first.0 + i));
        }
    }

    fn reads_zero(&self, pfn: Pfn) -> bool {
        !self.0.lock().unwrap().contains(&pfn.0)
    }
}

#[derive(Default)]
struct Heap(Vec<(u64, u64)>);

impl HeapSink for Heap {
    fn add_region(&mut self, start: u64, end: u64) {
        self.0.push((start, end));
    }
}

const MIB: u64 = 1 << 20;
// Two banks of 8 MiB with a 4 MiB hole between them.
const BANKS: [(u64, u64); 2] = [(0x4000_0000, 0x4080_0000), (0x40c0_0000, 0x4140_0000)];
const IMAGE: (u64, u64) = (0x4000_0000, 0x4000_0000 + 2 * MIB);
const FIRMWARE: (u64, u64) = (0x40c0_0000, 0x40c0_0000 + 64 * 1024);

// The whole boot order works from the outside and leaves an exact audit.
#[test]
fn boot_sequence_through_the_public_api() {
    let ram = DirtyFrames::default();
    for pfn in 0x40000..0x41400 {
        ram.write(Pfn(pfn)); // firmware left garbage everywhere
    }

    // 1. Size and carve the database: here, right after the image (the arch would build the
    //    slice over that RAM; the test uses the heap).
    let (base, entries) = FrameDb::span_of(&BANKS).unwrap();
    assert_eq!((base, entries), (Pfn(0x40000), 0x1400));
    let db_bytes = entries * FrameDb::bytes_per_frame();
    let db_range = (IMAGE.1, IMAGE.1 + (db_bytes as u64).div_ceil(FRAME_SIZE) * FRAME_SIZE);
    let storage: &'static [TagCell] = Vec::leak((0..entries).map(|_| TagCell::new(0)).collect());
    let mut db = FrameDb::new(storage, base, &BANKS).unwrap();

    // 2. Mark what is not free.
    db.mark_hypervisor(IMAGE).unwrap();
    db.mark_hypervisor(db_range).unwrap();
    db.mark_reserved(FIRMWARE).unwrap();
    assert_eq!(db.state(Pfn(0x40a00)), Ok(FrameState::Absent), "the hole");

    // 3. The buddy allocator from the memory map's free ranges.
    let free = [(db_range.1, BANKS[0].1), (FIRMWARE.1, BANKS[1].1)];
    let frames = FrameManager::<32>::new(db, &free, 2, PoolConfig::default(), &ram).unwrap();
    assert!(ram.reads_zero(Pfn::from_phys(db_range.1).unwrap()), "free frames scrubbed at boot");
    assert!(!ram.reads_zero(Pfn::from_phys(IMAGE.0).unwrap()), "the image is left alone");

    // 4. The heap.
    let mut heap = Heap::default();
    let (start, end) = frames.grow_heap(64, &mut heap).unwrap();
    assert_eq!(heap.0, [(start, end)]);
    assert_eq!(frames.db().state(Pfn::from_phys(start).unwrap()), Ok(FrameState::Hypervisor));

    // 5. The pools, one CPU at a time.
    for cpu in 0..frames.cpus() {
        let report = frames.refill(cpu).unwrap();
        assert!(report.pages_added > 0 && report.blocks_added == 1, "{report:?}");
    }

    // Trap time: a page and a block for guest 1.
    let vm = VmId::new(1).unwrap();
    let page = frames.alloc_page_atomic_exclusive(0, Owner::guest(vm)).unwrap();
    let block = frames.alloc_block_atomic_exclusive(1, Owner::guest(vm)).unwrap();
    assert!(ram.reads_zero(page) && ram.reads_zero(block));
    assert_eq!(block.phys() % (2 * MIB), 0);

    // The guest writes, is torn down, its frames come back scrubbed.
    ram.write(page);
    frames.release(page, 1, Owner::guest(vm), &ram).unwrap();
    frames.release(block, 512, Owner::guest(vm), &ram).unwrap();
    assert!(ram.reads_zero(page));
    assert!(matches!(
        frames.release(page, 1, Owner::guest(vm), &ram),
        Err(FrameError::WrongState { found: FrameState::Free, .. })
    ));

    let report = frames.audit(Some(&ram));
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.absent, 0x400);
    assert_eq!(report.reserved, 16);
    assert_eq!(report.hypervisor, 512 + 3 + 64);
    let log = report.to_string();
    assert!(log.starts_with("frames 5120: absent 1024, reserved 16, hypervisor 579"), "{log}");
}

// The atomic path's errors are plain values: an empty pool never panics or blocks.
#[test]
fn empty_pools_are_reported_not_waited_on() {
    let banks = [(0x4000_0000, 0x4000_0000 + 16 * FRAME_SIZE)];
    let storage: &'static [TagCell] = Vec::leak((0..16).map(|_| TagCell::new(0)).collect());
    let db = FrameDb::new(storage, Pfn(0x40000), &banks).unwrap();
    let ram = DirtyFrames::default();
    let frames = FrameManager::<32>::new(db, &banks, 1, PoolConfig::default(), &ram).unwrap();
    let owner = Owner::HYPERVISOR;
    assert_eq!(frames.alloc_page_atomic_exclusive(0, owner), Err(AtomicError::Empty));
    // Blocks are for guests (a hypervisor request is refused as such, before the pool).
    assert_eq!(frames.alloc_block_atomic_exclusive(0, owner), Err(AtomicError::NotOwner));
    let guest = Owner::guest(labyrinth::frame::VmId::new(1).unwrap());
    assert_eq!(frames.alloc_block_atomic_exclusive(0, guest), Err(AtomicError::Empty));
    assert!(frames.needs_refill(0));
    let report = frames.refill(0).unwrap();
    assert!(report.exhausted && report.pages_added == 16, "{report:?}");
    for _ in 0..16 {
        frames.alloc_page_atomic_exclusive(0, owner).unwrap();
    }
    assert_eq!(frames.alloc_page_atomic_exclusive(0, owner), Err(AtomicError::Empty));
}
