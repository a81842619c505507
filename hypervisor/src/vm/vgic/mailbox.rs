//! A vCPU's SGI mailbox: the SGIs other vCPUs sent it that it has not yet seen.
//!
//! The mailbox is in-flight state, outside the "one place" rule of the model: a bit here is an
//! edge that has happened and that only the target vCPU drains (into its redistributor's
//! pending state, when it syncs its list registers). Senders only set bits, with no lock, so a
//! vCPU sending an SGI never waits for the target, whatever the target is doing. A bit set
//! twice before a drain is one pending SGI, as on a GIC (pending is a state, not a count).

#[cfg(all(loom, test))]
use loom::sync::atomic::{AtomicU32, Ordering};

#[cfg(not(all(loom, test)))]
use core::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug)]
pub(super) struct Mailbox {
    /// One bit per SGI (INTIDs 0-15).
    sgis: AtomicU32,
}

impl Mailbox {
    pub fn new() -> Self {
        Mailbox { sgis: AtomicU32::new(0) }
    }

    /// Any vCPU: SGIs `bits` happened for the owner.
    pub fn post(&self, bits: u32) {
        // Release/Acquire pair with `take`: whatever the sender did before sending the SGI is
        // visible to the target once it sees the SGI, as a guest expects of a barrier + SGI.
        self.sgis.fetch_or(bits, Ordering::Release);
    }

    /// The owner only: the SGIs posted since the last call.
    pub fn take(&self) -> u32 {
        self.sgis.swap(0, Ordering::Acquire)
    }

    /// Whether SGIs wait (a hint: one may arrive just after).
    pub fn is_empty(&self) -> bool {
        self.sgis.load(Ordering::Relaxed) == 0
    }
}
