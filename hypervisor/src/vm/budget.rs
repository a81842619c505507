//! A guest's share of host memory: the frames promised to it when it was created
//! (`FrameManager::commit`) and how many of them it has drawn.
//!
//! It owns one rule: a guest never draws past its promise, so no guest's appetite can take
//! frames promised to another. Stage-2 table pages are set aside whole, at their bound for the
//! guest's RAM (`Geometry::max_table_pages`), so only guest pages are counted as they are
//! drawn. It never allocates, maps or frees anything itself.

/// Frames promised to one guest, and drawn so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    promised: usize,
    tables: usize,
    /// Guest pages the promise still covers: what the fault path tests and decrements.
    left: usize,
}

impl MemoryBudget {
    /// `promised` frames, of which `tables` are kept for stage-2 tables. `None` when nothing
    /// would be left for the guest's own pages.
    pub fn new(promised: usize, tables: usize) -> Option<Self> {
        (promised > tables).then(|| MemoryBudget { promised, tables, left: promised - tables })
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
        self.pages() - self.left
    }

    /// Counts `frames` more guest pages if the promise covers them; `false` changes nothing.
    #[inline(always)]
    pub fn take(&mut self, frames: usize) -> bool {
        if frames > self.left {
            return false;
        }
        self.left -= frames;
        true
    }

    /// Uncounts `frames` pages taken but never used (handed straight back).
    pub fn untake(&mut self, frames: usize) {
        self.left = (self.left + frames).min(self.pages());
    }

    /// Every page is back (the guest's memory was reclaimed).
    pub fn reclaimed(&mut self) {
        self.left = self.pages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_left_for_pages_is_refused() {
        assert_eq!(MemoryBudget::new(4, 4), None);
        assert_eq!(MemoryBudget::new(3, 4), None);
        assert_eq!(MemoryBudget::new(5, 4).map(|b| b.pages()), Some(1));
    }

    #[test]
    fn takes_up_to_the_promise_and_no_further() {
        let mut b = MemoryBudget::new(520 + 3, 3).unwrap();
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
}
