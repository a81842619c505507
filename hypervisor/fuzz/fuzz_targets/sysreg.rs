//! Trapped MSR/MRS encodings through decoding and the system-register classifiers, checked against
//! the Arm ARM's encodings (see labyrinth::vm::exercise::sysreg). Any divergence panics; see
//! docs/fuzzing.md for turning the input into a regression.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = labyrinth::vm::exercise::sysreg(data) {
        panic!("sysreg: {e}");
    }
});
