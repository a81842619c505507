//! The Labyrinth binary: boot, the aarch64 edge (`arch`), and the wiring of the core.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
mod arch;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("labyrinth runs at EL2 on aarch64: build it with scripts/build.sh");
    std::process::exit(2);
}
