//! trap::decode over arbitrary ESR_EL2, FAR_EL2 and HPFAR_EL2, every decoded field checked against
//! the register layouts (see labyrinth::vm::exercise::trap). Any divergence panics; see
//! docs/fuzzing.md for turning the input into a regression.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = labyrinth::vm::exercise::trap(data) {
        panic!("trap_decode: {e}");
    }
});
