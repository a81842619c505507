//! The architecture edge. Everything that executes a system instruction, touches a system
//! register or MMIO, or runs before the MMU is on lives below here; the rest of Labyrinth calls
//! only what this module re-exports.
mod aarch64;

pub use aarch64::{
    console::{emergency_line, init_console, install_fallback_console},
    cpu::{mpidr, read_cpu_info, MAX_CPUS},
    memory::{frame_db_storage, heap_bytes, init_heap, Heap, Scrubber},
    mmu::{map_range, MapKind},
    power::{cpu_on, park, power_off},
    image_range, secondary_entry_address, time_now_ticks, ticks_per_second,
};
