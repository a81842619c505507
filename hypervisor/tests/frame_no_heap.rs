//! The crate edge "FrameAllocator needs the heap" and our immunity: a counting global
//! allocator shows the crate allocating on every split and the atomic path never allocating.
//! (Its own binary, because it installs a global allocator.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use buddy_system_allocator::FrameAllocator;
use labyrinth::frame::{FrameDb, FrameManager, FrameScrubber, Owner, Pfn, PoolConfig, TagCell, VmId};

struct Counting;

thread_local! {
    /// Heap allocations made by this thread (tests run on several threads at once).
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

struct NoMemory;

impl FrameScrubber for NoMemory {
    fn scrub(&self, _: Pfn, _: usize) {}
    fn reads_zero(&self, _: Pfn) -> bool {
        true
    }
}

// Crate edge: FrameAllocator keeps its free lists in BTreeSets, so adding frames and
// splitting blocks allocate from the heap: it is no tool for a trap handler.
#[test]
fn crate_frame_allocator_allocates_from_the_heap() {
    let mut fa = FrameAllocator::<32>::new();
    assert!(allocations_during(|| fa.add_frame(0x40000, 0x40400)) > 0);
    assert!(
        allocations_during(|| {
            fa.alloc(1).unwrap();
        }) > 0
    );
}

// Ours: the atomic path (page, block, return) never touches the heap.
#[test]
fn atomic_path_never_allocates() {
    let banks = [(0x4000_0000, 0x4000_0000 + 2048 * 4096)];
    let storage: &'static [TagCell] = Vec::leak((0..2048).map(|_| TagCell::new(0)).collect());
    let db = FrameDb::new(storage, Pfn(0x40000), &banks).unwrap();
    let frames = FrameManager::<32>::new(db, &banks, 1, PoolConfig::default(), &NoMemory).unwrap();
    frames.refill(0).unwrap();
    let owner = Owner::page_table(VmId::new(3).unwrap());
    let heap_use = allocations_during(|| {
        for _ in 0..50 {
            let page = frames.alloc_page_atomic_exclusive(0, owner).unwrap();
            frames.return_unused_page_atomic(0, page, owner).unwrap();
        }
        // Blocks are guest memory only: a table owner is refused before anything is popped.
        assert!(frames.alloc_block_atomic_exclusive(0, owner).is_err());
        let guest = Owner::guest(VmId::new(3).unwrap());
        frames.alloc_block_atomic_exclusive(0, guest).unwrap();
        let _ = frames.alloc_block_atomic_exclusive(0, guest); // empty now: an error, still no heap
    });
    assert_eq!(heap_use, 0);
}
