//! Raw memory at EL2: the heap, frame scrubbing (zero with `DC ZVA`, clean with `DC CVAC`), and
//! the frame database's storage. Everything here works through the identity map of free RAM
//! that the boot sequence installs, so a physical address is a pointer.

use buddy_system_allocator::LockedHeap;
use core::ptr::addr_of_mut;
use labyrinth::frame::{FrameScrubber, HeapSink, Pfn, TagCell, FRAME_SIZE};

/// The heap that `alloc` uses. It starts on a small region in the image (the buddy allocator
/// itself needs a heap to exist) and grows with frames from the frame manager.
#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

const BOOTSTRAP_HEAP: usize = 256 * 1024;

#[repr(C, align(4096))]
struct BootstrapHeap([u8; BOOTSTRAP_HEAP]);

#[link_section = ".bss.heap"]
static mut BOOTSTRAP: BootstrapHeap = BootstrapHeap([0; BOOTSTRAP_HEAP]);

/// Gives the heap its bootstrap region. Boot CPU, once.
pub fn init_heap() {
    let start = addr_of_mut!(BOOTSTRAP) as usize;
    // SAFETY: the bootstrap region is in bss, mapped read-write, used by nothing else, and
    // handed over once (the heap never gives memory back).
    unsafe { HEAP.lock().add_to_heap(start, start + BOOTSTRAP_HEAP) };
}

/// Bytes the heap manages in total.
pub fn heap_bytes() -> usize {
    HEAP.lock().stats_total_bytes()
}

/// Feeds frames from the frame manager to the heap.
pub struct Heap;

impl HeapSink for Heap {
    fn add_region(&mut self, start: u64, end: u64) {
        // SAFETY: the frame manager tagged `[start, end)` Hypervisor and hands it over for good;
        // it is free RAM, identity-mapped read-write at EL2.
        unsafe { HEAP.lock().add_to_heap(start as usize, end as usize) };
    }
}

/// Zeroes frames with `DC ZVA` and cleans them to the point of coherency, so a guest running
/// with its MMU off (non-cacheable accesses) reads zeros too.
pub struct Scrubber;

fn dc_zva_bytes() -> Option<u64> {
    let dczid: u64;
    // SAFETY: reads an identification register.
    unsafe { core::arch::asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack)) };
    // DZP (bit 4) set: DC ZVA is prohibited.
    (dczid & 0x10 == 0).then(|| 4u64 << (dczid & 0xf))
}

fn dcache_line() -> u64 {
    let ctr: u64;
    // SAFETY: reads an identification register.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    4 << ((ctr >> 16) & 0xf)
}

impl FrameScrubber for Scrubber {
    fn scrub(&self, first: Pfn, frames: usize) {
        let start = first.phys();
        let end = start + frames as u64 * FRAME_SIZE;
        match dc_zva_bytes() {
            Some(step) => {
                let mut a = start;
                while a < end {
                    // SAFETY: `a` is inside frames the frame manager hands us to scrub: free
                    // RAM, identity-mapped read-write, owned by no one else.
                    unsafe { core::arch::asm!("dc zva, {}", in(reg) a, options(nostack)) };
                    a += step;
                }
            }
            None => {
                let mut a = start;
                while a < end {
                    // SAFETY: as above.
                    unsafe { core::ptr::write_volatile(a as *mut u64, 0) };
                    a += 8;
                }
            }
        }
        let line = dcache_line();
        let mut a = start;
        while a < end {
            // SAFETY: cache maintenance by address on the same mapped frames.
            unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack)) };
            a += line;
        }
        // SAFETY: a barrier: the zeros reach the point of coherency before we return.
        unsafe { core::arch::asm!("dsb sy", options(nostack)) };
    }

    fn reads_zero(&self, pfn: Pfn) -> bool {
        let base = pfn.phys();
        (0..FRAME_SIZE / 8).all(|i| {
            // SAFETY: reads a frame of free RAM through the identity map.
            unsafe { core::ptr::read_volatile((base + i * 8) as *const u64) == 0 }
        })
    }
}

/// Cleans `[start, start + len)` to the point of coherency: what EL2 wrote through its
/// cacheable map must reach memory before a guest with its MMU off (uncached) reads it.
pub fn clean_to_poc(start: u64, len: u64) {
    let line = dcache_line();
    let mut a = start & !(line - 1);
    while a < start + len {
        // SAFETY: cache maintenance by address over memory mapped at EL2.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack)) };
        a += line;
    }
    // SAFETY: a barrier.
    unsafe { core::arch::asm!("dsb sy", options(nostack)) };
}

/// Copies `len` bytes from physical `src` to physical `dst` (both mapped at EL2).
///
/// # Safety
/// Both ranges must be mapped at EL2 (`src` readable, `dst` writable), must not overlap, and
/// `dst` must be a frame the caller owns.
pub unsafe fn copy_phys(dst: u64, src: u64, len: usize) {
    // SAFETY: per the contract.
    unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
}

/// The frame database's storage at `[start, start + entries * 2)`.
///
/// # Safety
/// The range must be free RAM, identity-mapped read-write, 2-byte aligned, and used for
/// nothing else for the rest of the run.
pub unsafe fn frame_db_storage(start: u64, entries: usize) -> &'static [TagCell] {
    // SAFETY: per the contract; any bit pattern is a valid AtomicU16, and FrameDb::new writes
    // every entry before reading one.
    unsafe { core::slice::from_raw_parts(start as *const TagCell, entries) }
}
