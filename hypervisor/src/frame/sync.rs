//! The atomics the frame module is built on: `core`'s on the target and in ordinary tests,
//! loom's when the pool and database races are model-checked (`--cfg loom` in a test build).
//!
//! Everything in `frame` that is shared between CPUs goes through these names, so the loom
//! model checks the very code that runs at EL2. Never import atomics from elsewhere in `frame`.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};

#[cfg(not(all(loom, test)))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
