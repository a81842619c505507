//! Labyrinth's portable core: everything that decides (device-tree checking, the physical
//! memory map, frame ownership, exception decoding, logging) lives here as plain Rust that
//! builds for `aarch64-unknown-none-softfloat` and for the host, where it is tested.
//!
//! This crate never touches a system register, an MMIO address or raw physical memory itself:
//! the binary's `arch` module owns those edges and hands the core what it needs.
#![cfg_attr(not(any(test, feature = "model")), no_std)]

extern crate alloc;

pub mod drivers;
pub mod dt;
pub mod esr;
pub mod frame;
pub mod hostmem;
pub mod hyp_map;
pub mod logger;
pub mod memmap;
pub mod psci;
pub mod stage2;
pub mod vm;
