//! Fuzz target `dt_parse`: every input is a boot device tree candidate. It goes through the
//! whole boot path for device trees (check, node walk, `dt::parse`, every accessor and error
//! message, guest validation, reservations, memory map) via `dt::exercise`, which also asserts
//! the memory map's invariants. Any panic is a bug; see docs/fuzzing.md for turning the crash
//! file into a regression test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    labyrinth::dt::exercise::exercise(data);
});
