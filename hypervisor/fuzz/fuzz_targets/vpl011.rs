//! Arbitrary register access sequences on the emulated PL011, checked against a reference UART:
//! reads, refusals and every line emitted, lines bounded (see labyrinth::vm::exercise::pl011). Any
//! divergence panics; see docs/fuzzing.md for turning the input into a regression.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = labyrinth::vm::exercise::pl011(data) {
        panic!("vpl011: {e}");
    }
});
