//! The boot device tree: checking it, walking it, and reading the [`Platform`] from it.
//!
//! This module owns everything Labyrinth believes about the machine from the flattened device
//! tree its bootloader passed in x0. The blob is untrusted input: no device tree, however
//! malformed, may ever panic Labyrinth, loop without end or exhaust its stack. So:
//!
//! - [`check`] validates the whole blob first (header, block placement, memory reservations,
//!   the full token grammar of the structure block, string termination and UTF-8, a depth
//!   limit). Nothing reads a node before that.
//! - The walker ([`Tree`], [`Node`]) and the property readers only ever use checked `get`s and
//!   checked arithmetic; iteration is bounded and never recursive.
//! - [`parse`] reads the [`Platform`] into fixed-size tables (no heap), and every malformed
//!   property is a [`DtError`] whose `Display` names the node, the property and the fault.
//!
//! It must never hand the blob to the `fdt` crate (0.1.5): that crate panics on malformed input
//! (slice indexing, `expect`, `assert_eq!`), even on some blobs that pass [`check`]: it loops
//! forever on an alias pointing at itself (`find_node` falls back to aliases recursively),
//! panics in `skip_current_node` when a NOP sits between properties or child nodes (which the
//! specification allows), panics in `Fdt::chosen`/`cpus`/`memory`/`root` when the node is
//! absent, in `CpuIds::first` for `#address-cells` other than 1 or 2, in `Chosen::bootargs` on an
//! empty value, in `Compatible::first`, `Root::model`, and `Cpu::clock_frequency` on ordinary
//! missing or odd-sized properties, and its `all_nodes` indexes a 64-entry array by depth. It
//! also uses 5 for FDT_END (the specification says 9). Reading the checked structure ourselves
//! is simpler than fencing all of that.
//!
//! The fuzz target `hypervisor/fuzz/fuzz_targets/dt_parse.rs` drives [`parse`] and the memory
//! map built from its result; docs/fuzzing.md says how to run it.

mod check;
mod error;
mod guest;
mod list;
mod platform;
mod prop;
mod region;
mod token;
mod tree;

/// Whole-path exerciser shared by the fuzz target and the host corpus replay.
#[cfg(any(test, fuzzing))]
pub mod exercise;
#[cfg(test)]
mod testutil;
#[cfg(test)]
mod tests;

pub use check::{check, total_size, Checked, HEADER_SIZE, MAGIC, MAX_DEPTH};
pub use error::{Block, DtError, NodePath, Problem, MAX_PATH_PARTS};
pub use guest::{GuestConfig, GuestError, GuestProblem, Module, ModuleKind, MAX_GUESTS, MAX_MODULES};
pub use list::{FixedList, Full};
pub use platform::{
    parse, read, Conduit, Cpu, Gic, GicVersion, Platform, Psci, PsciVersion, ReservedMemory, Uart,
    MAX_CPUS, MAX_MEMORY, MAX_MEMRESERVE, MAX_REDISTRIBUTORS, MAX_RESERVED_MEMORY,
    MPIDR_AFFINITY_MASK, PSCI_CPU_ON_64,
};
pub use prop::{Cells, Property};
pub use region::Region;
pub use tree::{Children, Node, Nodes, Properties, Tree};
