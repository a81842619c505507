//! Random sequences of allocations (atomic pages and blocks, the fast path's own-pool claims,
//! contiguous runs, heap growth), releases, returns, shares, block splits, pool refills, drains
//! and retirements, promises and guests' budget draws on the real frame manager, checked after
//! every step against a model and by the ownership audit at the end (see
//! `labyrinth::frame::exercise`). Any divergence panics; see docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    labyrinth::frame::exercise::run(data);
});
