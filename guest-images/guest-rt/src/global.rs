use core::cell::UnsafeCell;

use crate::dt::MAX_CPUS;

/// A global the kernel, its exception handler and its other CPUs share. Every access is a plain
/// volatile load or store (no atomics: they are not allowed on Device memory, which is all
/// memory with the MMU off). Device memory is not cached, so a store is visible to every CPU
/// once a `DSB` has completed it; whoever shares a `Global` between CPUs orders its accesses
/// with [`crate::barrier`] functions and keeps one writer per value (see `smp`).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: accesses are single volatile loads and stores of `Copy` values; values shared between
// CPUs have one writer each and are ordered by explicit barriers (see the type's docs).
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

/// One value per CPU (index < [`MAX_CPUS`]), each written only by its own CPU, read by any.
pub struct PerCpu<T>(UnsafeCell<[T; MAX_CPUS]>);

// SAFETY: as for Global: volatile accesses of Copy values, one writer per slot.
unsafe impl<T> Sync for PerCpu<T> {}

impl<T: Copy> PerCpu<T> {
    pub const fn new(v: T) -> Self {
        PerCpu(UnsafeCell::new([v; MAX_CPUS]))
    }

    fn slot(&self, cpu: usize) -> *mut T {
        assert!(cpu < MAX_CPUS, "cpu index {} out of range", cpu);
        // SAFETY: in bounds (checked above).
        unsafe { self.0.get().cast::<T>().add(cpu) }
    }

    pub fn get(&self, cpu: usize) -> T {
        // SAFETY: an in-bounds slot; see the Sync impl.
        unsafe { core::ptr::read_volatile(self.slot(cpu)) }
    }

    pub fn set(&self, cpu: usize, v: T) {
        // SAFETY: as get.
        unsafe { core::ptr::write_volatile(self.slot(cpu), v) }
    }
}
