//! The whole exit path of a 2-vCPU guest with a virtual GIC (MMIO, PSCI, system registers,
//! interrupts, timers, the guest's acknowledgements), checked after every step: no panic, an
//! interrupt in one place, only the registers the architecture says changed (see
//! labyrinth::vm::exercise::exit_path). Any divergence panics; see docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = labyrinth::vm::exercise::exit_path(data) {
        panic!("exit_path: {e}");
    }
});
