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
//! It must never hand the blob to the `fdt` crate (0.1.5, a dependency): that crate checks only
//! the magic and `totalsize`, then panics on malformed input (slice indexing, `expect`,
//! `assert_eq!`), and some of its panics survive even a blob that passes [`check`]:
//! - `Fdt::find_node` (and `Chosen::stdout`, `Aliases::resolve_node`) falls back to /aliases
//!   and recurses without bound when an alias names itself: a stack overflow;
//! - `skip_current_node` (used by `find_node` and `children`) asserts END_NODE when a NOP sits
//!   between properties or between child nodes, which the specification allows;
//! - `Fdt::chosen`, `cpus`, `memory` and `root` `expect` their node; `Memory::regions` unwraps
//!   `reg`; `Cpu::ids` expects `reg`, and `CpuIds::first`/`all` panic for `#address-cells` other
//!   than 1 or 2 or a `reg` shorter than a cell;
//! - `FdtNode::cell_sizes` (behind `reg`, `Cpu::ids`) expects `#address-cells`/`#size-cells` to
//!   hold 4 bytes; `Chosen::bootargs`/`stdout`/`stdin` slice `value[..len - 1]`, which panics on
//!   an empty value; `Compatible::first` expects a NUL and UTF-8; `Root::model` and
//!   `Root::compatible` unwrap; `Cpu::clock_frequency`/`timebase_frequency` hit `unreachable!`
//!   unless the value is 4 or 8 bytes; `Memory::initial_mapped_area` expects 20 bytes;
//! - `all_nodes` indexes a 64-entry parent array by depth and decrements it on every END_NODE.
//!   It also uses 5 for FDT_END (the specification says 9).
//!
//! Reading the checked structure ourselves is simpler and safer than fencing all of that; the
//! crate only serves as a test oracle on well-formed blobs.
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
mod shm;
mod token;
mod tree;

/// Whole-path exerciser shared by the fuzz target and the host corpus replay.
#[cfg(any(test, fuzzing))]
pub mod exercise;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use check::{check, total_size, Checked, HEADER_SIZE, MAGIC, MAX_DEPTH};
pub use error::{Block, DtError, Problem};
pub use guest::{
    GuestConfig, GuestError, GuestProblem, Module, ModuleKind, MAX_GUESTS, MAX_MODULES, MAX_VCPUS,
};
pub use list::{FixedList, Full};
pub use platform::{
    parse, read, Conduit, Cpu, Gic, GicVersion, Platform, Psci, PsciVersion, ReservedMemory, Uart, MAX_CPUS,
    MAX_MEMORY, MAX_MEMRESERVE, MAX_REDISTRIBUTORS, MAX_RESERVED_MEMORY, MPIDR_AFFINITY_MASK, PSCI_CPU_ON_64,
};
pub use prop::{Cells, Property};
pub use region::Region;
pub use shm::{SharedMem, ShmProblem, ShmRole, MAX_SHARED, SHM_COMPATIBLE, SHM_ID_MAX};
pub use tree::{Children, Node, NodePath, Nodes, Properties, Tree};
