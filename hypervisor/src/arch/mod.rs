//! The architecture edge. Everything that executes a system instruction, touches a system
//! register or MMIO, or runs before the MMU is on lives below here; the rest of Labyrinth calls
//! only what this module re-exports.
mod aarch64;

pub use aarch64::{
    console::{
        emergency_line, enable_input, init_console, input_intid, install_fallback_console, read_input,
    },
    cpu::{cpu_index, cpu_local, mpidr, mpidr_of, read_cpu_info, record_mpidr, set_cpu_local, MAX_CPUS},
    exception::TrapFrame,
    gic, image_range,
    memory::{clean_to_poc, copy_phys, frame_db_storage, heap_bytes, init_heap, Heap, Scrubber},
    mmu::{map_range, MapKind},
    power::{cpu_off, cpu_on, park, power_off, send_event, wait_for_event},
    secondary_entry_address,
    stage2_hw::HwStage2,
    ticks_per_second, time_now_ticks,
    vcpu::{
        configure_el2, enter as enter_guest, fast_frame, fast_trap, fault_page_offset, trap_syndrome,
        FastRegs, FastTrap, Hw,
    },
};
