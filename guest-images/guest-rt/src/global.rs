use core::cell::UnsafeCell;

/// A global the kernel and its exception handler share. One CPU, interrupts masked: every
/// access is a plain volatile load or store (no atomics: they are not allowed on Device memory).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: the guests run on one CPU; the only concurrency is the synchronous exception handler,
// which interrupts the kernel at a known instruction, and accesses are volatile.
unsafe impl<T> Sync for Global<T> {}

impl<T: Copy> Global<T> {
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }

    pub fn get(&self) -> T {
        // SAFETY: see the Sync impl.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }

    pub fn set(&self, v: T) {
        // SAFETY: see the Sync impl.
        unsafe { core::ptr::write_volatile(self.0.get(), v) }
    }
}
