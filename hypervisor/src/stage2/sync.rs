//! The atomics shared between CPUs in `stage2` (a space's table count and retire epoch, the
//! vCPUs' quiescent points): `core`'s on the target and in ordinary tests, loom's when the
//! install protocol is model-checked (`--cfg loom` in a test build). Table memory itself is
//! reached only through `Stage2Env`, whose implementations choose their atomics.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[cfg(not(all(loom, test)))]
pub(crate) use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
