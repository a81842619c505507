//! A guest's share of host memory: the frames promised to it when it was created
//! (`FrameManager::commit`) and how many of them it has drawn.
//!
//! It owns one rule: a guest never draws past its promise, so no guest's appetite can take
//! frames promised to another. Stage-2 table pages are set aside whole, at their bound for the
//! guest's RAM (`Geometry::max_table_pages`), so only guest pages are counted as they are
//! drawn. It never allocates, maps or frees anything itself.
//!
//! The vCPUs of one guest draw from it at once, each on its own CPU and with no lock: the
//! count is one atomic, taken by compare-and-swap, so it never goes below zero and two vCPUs
//! can never both take the last frames. A vCPU counts its frames before it knows whether it
//! wins the entry, and gives them back if another vCPU mapped the same IPA first; the promise
//! a guest with several vCPUs is given (`vmm::promise_memory`) includes room for one such
//! unit (a page, or a block) per other vCPU, so a transient count never runs it out.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Frames promised to one guest, and drawn so far.
#[derive(Debug)]
pub struct MemoryBudget {
    promised: usize,
    tables: usize,
    /// Guest pages the promise still covers: what the fault path tests and decrements.
    left: AtomicUsize,
}

impl MemoryBudget {
    /// `promised` frames, of which `tables` are kept for stage-2 tables. `None` when nothing
    /// would be left for the guest's own pages.
    pub fn new(promised: usize, tables: usize) -> Option<Self> {
        (promised > tables).then(|| MemoryBudget {
            promised,
            tables,
            left: AtomicUsize::new(promised - tables),
        })
    }

    /// Frames promised in all (the figure to withdraw when the guest is gone).
    pub fn promised(&self) -> usize {
        self.promised
    }

    /// Guest pages the promise covers.
    pub fn pages(&self) -> usize {
        self.promised - self.tables
    }

    /// Guest pages drawn and not given back.
    pub fn used(&self) -> usize {
        self.pages() - self.left.load(Ordering::Relaxed)
    }

    /// Counts `frames` more guest pages if the promise covers them; `false` changes nothing.
    #[inline(always)]
    pub fn take(&self, frames: usize) -> bool {
        // Relaxed: the count orders nothing else; the frame's claim CAS publishes the frame.
        let mut left = self.left.load(Ordering::Relaxed);
        loop {
            if frames > left {
                return false;
            }
            match self.left.compare_exchange_weak(left, left - frames, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => left = now,
            }
        }
    }

    /// Uncounts `frames` pages taken but never used (handed straight back).
    pub fn untake(&self, frames: usize) {
        let pages = self.pages();
        let _ =
            self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some((l + frames).min(pages)));
    }

    /// Every page is back (the guest's memory was reclaimed).
    pub fn reclaimed(&self) {
        self.left.store(self.pages(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_left_for_pages_is_refused() {
        assert!(MemoryBudget::new(4, 4).is_none());
        assert!(MemoryBudget::new(3, 4).is_none());
        assert_eq!(MemoryBudget::new(5, 4).map(|b| b.pages()), Some(1));
    }

    #[test]
    fn takes_up_to_the_promise_and_no_further() {
        let b = MemoryBudget::new(520 + 3, 3).unwrap();
        assert!(b.take(512));
        assert!(!b.take(9), "a block past the promise is refused whole");
        assert_eq!(b.used(), 512);
        for _ in 0..8 {
            assert!(b.take(1));
        }
        assert!(!b.take(1));
        assert_eq!(b.used(), 520);
        b.untake(1);
        assert!(b.take(1));
        b.reclaimed();
        assert_eq!(b.used(), 0);
        assert!(b.take(520));
        assert_eq!(b.promised(), 523);
    }

    #[test]
    fn vcpus_drawing_at_once_never_take_more_than_promised() {
        let b = MemoryBudget::new(10_000 + 1, 1).unwrap();
        // Four vCPUs ask for about 25,000 frames in pages and 3-frame runs: the promise runs out.
        let drawn: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..5_000)
                            .map(|i| if i % 7 == 0 { 3 } else { 1 })
                            .filter(|&n| b.take(n))
                            .sum::<usize>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(b.used(), drawn, "every frame drawn is counted once");
        assert!((10_000 - 2..=10_000).contains(&drawn), "drew {drawn} of 10000");
        assert!(!b.take(b.pages() - b.used() + 1), "one more than is left is refused");
    }
}
