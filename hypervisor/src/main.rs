//! The Labyrinth binary: the boot sequence that wires the portable core (`labyrinth`) to the
//! aarch64 edge (`arch`). It decides nothing itself that the core could decide and test.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod frames;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod vmm;

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
use boot::primary_main;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("labyrinth runs at EL2 on aarch64: build it with scripts/build.sh");
    std::process::exit(2);
}
