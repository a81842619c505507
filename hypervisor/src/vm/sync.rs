//! The atomics the vm module's shared state is built on: `core`'s on the target and in
//! ordinary tests, loom's when the protocols between vCPUs are model-checked (`--cfg loom`).
//! Everything in `vm` that is shared between CPUs goes through these names.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};

#[cfg(not(all(loom, test)))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
