//! Random map / unmap / protect / fault-in / split / collapse / teardown sequences on two
//! guests' stage-2 tables, checked after every step against a reference model and a model of
//! the TLBs (see `labyrinth::stage2::exercise`). Any violation panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    labyrinth::stage2::exercise::Exercise::run(data);
});
