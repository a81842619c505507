//! The free frames nobody is promised: what a guest draws from, best effort, once its own
//! promise is used up.
//!
//! It owns one count and one rule: the count never goes below zero, so two guests drawing at
//! once can never both take the last frames, and a frame counted here is never also part of
//! some guest's unused promise. It is one atomic, taken by compare-and-swap on the fault path
//! (no lock); it never allocates or frees a frame itself: a holder counts here first, then
//! takes its frames from the allocator, and gives the count back only after its frames are
//! back in the allocator.

// Core's atomics, not loom's: the count is a plain CAS counter (its race is tested with
// threads below), and guests' budgets must be able to name a `static` one.
use core::sync::atomic::{AtomicUsize, Ordering};

/// How many free frames no promise covers.
#[derive(Debug, Default)]
pub struct Unpromised {
    frames: AtomicUsize,
}

impl Unpromised {
    /// None yet: nothing can be drawn beyond a promise until [`Unpromised::set`].
    pub const fn new() -> Self {
        Unpromised { frames: AtomicUsize::new(0) }
    }

    /// Frames that can be drawn now.
    pub fn available(&self) -> usize {
        self.frames.load(Ordering::Relaxed)
    }

    /// Counts `frames` as drawn if that many are there; `false` changes nothing.
    #[inline]
    pub fn draw(&self, frames: usize) -> bool {
        take_if_there(&self.frames, frames)
    }

    /// `frames` more are free and unpromised: drawn ones given back, or a promise withdrawn.
    pub fn give(&self, frames: usize) {
        self.frames.fetch_add(frames, Ordering::Relaxed);
    }

    /// Starts the count at `frames` (once the promises are made).
    pub(super) fn set(&self, frames: usize) {
        self.frames.store(frames, Ordering::Relaxed);
    }
}

/// Takes `n` from `count` if it holds that many (compare-and-swap, lock-free, never below
/// zero); `false` changes nothing. Relaxed: a count orders nothing else, the frames' own
/// claims publish them. The one rule of this count and of each guest's own budget.
#[inline(always)]
pub fn take_if_there(count: &AtomicUsize, n: usize) -> bool {
    let mut left = count.load(Ordering::Relaxed);
    loop {
        if n > left {
            return false;
        }
        match count.compare_exchange_weak(left, left - n, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => left = now,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn draws_never_take_more_than_is_there() {
        let u = Unpromised::new();
        assert!(!u.draw(1), "nothing before the count is set");
        u.set(10);
        assert!(u.draw(4));
        assert!(!u.draw(7), "6 left");
        assert_eq!(u.available(), 6, "a refused draw changes nothing");
        assert!(u.draw(6));
        assert!(!u.draw(1));
        u.give(3);
        assert!(u.draw(3));
        assert_eq!(u.available(), 0);
    }

    #[test]
    fn racing_drawers_take_exactly_what_was_there() {
        let u = std::sync::Arc::new(Unpromised::new());
        u.set(10_000);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let u = u.clone();
                std::thread::spawn(move || (0..5_000).filter(|_| u.draw(1)).count())
            })
            .collect();
        let drawn: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(drawn, 10_000);
        assert_eq!(u.available(), 0);
    }
}
