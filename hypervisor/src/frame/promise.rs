//! One promise of frames ([`FrameManager::commit`](super::FrameManager::commit)) to one
//! holder: a guest's RAM and tables, or a shared region's frames and the tables mapping it.
//!
//! It owns one rule: a promise is withdrawn once. [`FrameManager::withdraw`](super::FrameManager::withdraw)
//! gives its frames back to the unpromised count the first time and nothing after, so no
//! path that takes a holder down (a stop, a release, a creation that failed half-way) can hand
//! the same frames to other guests twice. Not `Clone`: a copy could be withdrawn again.

use core::sync::atomic::{AtomicBool, Ordering};

/// Frames promised to one holder, until withdrawn.
#[derive(Debug)]
pub struct Promise {
    frames: usize,
    withdrawn: AtomicBool,
}

impl Promise {
    /// Only the manager makes one, for frames it counted as promised.
    pub(super) const fn new(frames: usize) -> Self {
        Promise { frames, withdrawn: AtomicBool::new(false) }
    }

    /// A promise no manager made, for the tests and harnesses of its holders (budgets,
    /// regions) that never withdraw it from a manager.
    #[cfg(any(test, feature = "model"))]
    pub(crate) const fn unbacked(frames: usize) -> Self {
        Promise::new(frames)
    }

    /// Frames promised (the figure stays after the promise is withdrawn).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Whether the promise was withdrawn.
    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Acquire)
    }

    /// Marks it withdrawn: `true` the first time only.
    pub(super) fn withdraw(&self) -> bool {
        !self.withdrawn.swap(true, Ordering::AcqRel)
    }
}
