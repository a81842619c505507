//! Where the hypervisor's heap gets its memory: frames carved from the buddy allocator,
//! tagged Hypervisor, then handed to the heap through [`HeapSink`].
//!
//! The frame module never touches the heap's internals or the frames' contents: the arch
//! implements the sink (translating the physical range to its EL2 mapping and calling
//! `buddy_system_allocator::LockedHeap::add_to_heap`, its one `unsafe`). Carving happens on
//! the slow path only, and never from inside the heap's own out-of-memory path: the buddy
//! allocator itself allocates from the heap, so that would deadlock on the heap's lock.

/// Receives physical ranges of hypervisor-owned, zeroed frames for the heap.
pub trait HeapSink {
    /// Add the physical range `start..end` (frame-aligned) to the heap. The frames now belong
    /// to the heap for good: the heap never gives memory back.
    fn add_region(&mut self, start: u64, end: u64);
}
