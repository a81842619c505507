//! Deliberate faults, chosen by `labyrinth.selftest=` in the boot arguments, so the boot tests
//! can prove that an unexpected exception or a panic at EL2 is reported and powers off instead
//! of hanging: `data-abort`, `stack-overflow`, `panic`, `write-text`.

use labyrinth::frame::FrameManager;
use log::warn;

/// An address nothing maps: reading it must fault.
const UNMAPPED: u64 = 0xdead_0000;

/// The value of `key=` in the boot arguments (the last one wins).
pub fn bootarg<'a>(bootargs: Option<&'a str>, key: &str) -> Option<&'a str> {
    bootargs
        .into_iter()
        .flat_map(str::split_ascii_whitespace)
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .last()
}

pub fn run(bootargs: Option<&str>, frames: &FrameManager<'_>) {
    if let Some(which) = bootarg(bootargs, "labyrinth.bench") {
        crate::bench::run(which, frames);
    }
    let Some(which) = bootarg(bootargs, "labyrinth.selftest") else {
        return;
    };
    warn!("selftest {which}: faulting on purpose");
    match which {
        // SAFETY: a deliberate read of unmapped memory; it faults before anything is read.
        "data-abort" => unsafe {
            core::ptr::read_volatile(UNMAPPED as *const u64);
        },
        "stack-overflow" => {
            recurse(0);
        }
        "panic" => panic!("selftest: deliberate panic"),
        // SAFETY: a deliberate write to the hypervisor's read-only code; the MMU refuses it.
        "write-text" => unsafe {
            core::ptr::write_volatile(run as *const () as *mut u32, 0);
        },
        other => warn!("unknown selftest {other:?}: ignored"),
    }
}

/// Eats stack until it runs into the guard page below it.
#[allow(unconditional_recursion)] // the point: it ends in the guard-page fault
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    recurse(depth + 1).wrapping_add(frame[(depth % 64) as usize])
}
