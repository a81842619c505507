//! A guest's share of host memory: the frames promised to it when it was created
//! (`FrameManager::commit`), how many of them it has drawn, and what it drew beyond them.
//!
//! It owns two rules. A promise is a floor: the guest can always draw what it was promised,
//! whatever other guests do, because no other guest draws from it. It is not a ceiling: past
//! its promise a guest draws, best effort, from the free frames nobody is promised
//! ([`Unpromised`]), which grow when guests stop, reset or give pages back; only when both
//! are used up is the guest out of memory. Stage-2 table pages are set aside whole, at their
//! bound for the guest's RAM (`Geometry::max_table_pages`), so only guest pages are counted as
//! they are drawn. It never allocates, maps or frees anything itself. It holds the guest's
//! [`Promise`], withdrawn once, when the guest is gone ([`MemoryBudget::withdraw`]).
//!
//! The vCPUs of one guest draw from it at once, each on its own CPU and with no lock: each
//! count is one atomic taken by compare-and-swap, so none goes below zero and two vCPUs can
//! never both take the last frames. A vCPU counts its frames before it knows whether it wins
//! the entry, and gives them back if another vCPU mapped the same IPA first; the promise a
//! guest with several vCPUs is given (`vmm::promise_memory`) includes room for one such unit
//! (a page, or a block) per other vCPU, so a transient count never runs it out. Pages given
//! back pay off what was drawn beyond the promise first, so freed frames reach other guests.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::frame::{take_if_there, FrameManager, Promise, Unpromised};

/// Frames promised to one guest, drawn so far, and drawn beyond the promise.
#[derive(Debug)]
pub struct MemoryBudget {
    promise: Promise,
    tables: usize,
    /// Guest pages the promise still covers: what the fault path tests and decrements.
    left: AtomicUsize,
    /// Guest pages held beyond the promise, counted in `unpromised` when drawn.
    beyond: AtomicUsize,
    unpromised: &'static Unpromised,
}

impl MemoryBudget {
    /// `promise`'s frames, of which `tables` are kept for stage-2 tables; pages beyond them are
    /// drawn from `unpromised`. The promise back when nothing would be left for the guest's
    /// own pages (for its maker to withdraw).
    pub fn new(promise: Promise, tables: usize, unpromised: &'static Unpromised) -> Result<Self, Promise> {
        let promised = promise.frames();
        if promised <= tables {
            return Err(promise);
        }
        Ok(MemoryBudget {
            promise,
            tables,
            left: AtomicUsize::new(promised - tables),
            beyond: AtomicUsize::new(0),
            unpromised,
        })
    }

    /// Frames promised in all (the figure stays after the promise is withdrawn).
    pub fn promised(&self) -> usize {
        self.promise.frames()
    }

    /// Guest pages the promise covers.
    pub fn pages(&self) -> usize {
        self.promised() - self.tables
    }

    /// Guest pages drawn within the promise and not given back.
    pub fn used(&self) -> usize {
        self.pages() - self.left.load(Ordering::Relaxed)
    }

    /// Guest pages drawn beyond the promise and not given back.
    pub fn beyond(&self) -> usize {
        self.beyond.load(Ordering::Relaxed)
    }

    /// Frames this guest (or any other) could draw beyond its promise now.
    pub fn drawable_beyond(&self) -> usize {
        self.unpromised.available()
    }

    /// Counts `frames` more guest pages, from the promise if it covers them, else from the
    /// unpromised frames; `false` changes nothing (the guest is out of memory).
    #[inline(always)]
    pub fn take(&self, frames: usize) -> bool {
        self.take_promised(frames) || self.take_beyond(frames)
    }

    /// [`MemoryBudget::take`] within the promise only, with no call on its way (the fast
    /// paths make none): `false` changes nothing and leaves a draw beyond the promise to a
    /// caller that may call out.
    #[inline(always)]
    pub fn take_promised(&self, frames: usize) -> bool {
        take_if_there(&self.left, frames)
    }

    #[cold]
    #[inline(never)]
    fn take_beyond(&self, frames: usize) -> bool {
        if !self.unpromised.draw(frames) {
            return false;
        }
        self.beyond.fetch_add(frames, Ordering::Relaxed);
        true
    }

    /// Uncounts `frames` pages: taken but never used (handed straight back), or given back by
    /// the guest. What was drawn beyond the promise is paid off first.
    pub fn untake(&self, frames: usize) {
        let mut rest = frames;
        let mut beyond = self.beyond.load(Ordering::Relaxed);
        while beyond > 0 && rest > 0 {
            let k = rest.min(beyond);
            match self.beyond.compare_exchange_weak(beyond, beyond - k, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.unpromised.give(k);
                    rest -= k;
                    break;
                }
                Err(now) => beyond = now,
            }
        }
        if rest > 0 {
            let pages = self.pages();
            let _ =
                self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some((l + rest).min(pages)));
        }
    }

    /// Every page is back (the guest's memory was reclaimed): the promise is whole again and
    /// what was drawn beyond it is unpromised again. Call it once the frames are free.
    pub fn reclaimed(&self) {
        self.unpromised.give(self.beyond.swap(0, Ordering::Relaxed));
        self.left.store(self.pages(), Ordering::Relaxed);
    }

    /// The guest is gone and its memory reclaimed ([`MemoryBudget::reclaimed`]): its whole
    /// promise is withdrawn from `frames` ([`FrameManager::withdraw`]), unpromised for other
    /// guests to draw, and nothing is drawn from it any more. Returns the frames withdrawn: 0
    /// the second time. Every vCPU of the guest out for good.
    pub fn withdraw<const ORDER: usize>(&self, frames: &FrameManager<'_, ORDER>) -> usize {
        self.left.store(0, Ordering::Relaxed);
        frames.withdraw(&self.promise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpromised(frames: usize) -> &'static Unpromised {
        let u = Box::leak(Box::new(Unpromised::new()));
        u.give(frames);
        u
    }

    /// A budget of `promised` frames, `tables` of them for tables, whose promise no manager
    /// made (these tests never withdraw it).
    fn budget(promised: usize, tables: usize, u: &'static Unpromised) -> MemoryBudget {
        MemoryBudget::new(Promise::unbacked(promised), tables, u).unwrap()
    }

    #[test]
    fn nothing_left_for_pages_is_refused() {
        let u = unpromised(0);
        let refused = MemoryBudget::new(Promise::unbacked(4), 4, u).map(|b| b.pages());
        assert_eq!(refused.map_err(|p| p.frames()), Err(4), "the promise comes back, to withdraw");
        assert!(MemoryBudget::new(Promise::unbacked(3), 4, u).is_err());
        assert_eq!(budget(5, 4, u).pages(), 1);
    }

    #[test]
    fn takes_up_to_the_promise_and_no_further_when_nothing_is_unpromised() {
        let b = budget(520 + 3, 3, unpromised(0));
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
    fn past_the_promise_it_draws_unpromised_frames_and_pays_them_back_first() {
        let u = unpromised(100);
        let b = budget(10 + 1, 1, u);
        assert!(b.take(10));
        assert!(b.take(60), "beyond the promise, from the unpromised frames");
        assert_eq!((b.used(), b.beyond(), u.available()), (10, 60, 40));
        assert!(!b.take(41), "more than is unpromised is refused");
        assert_eq!(u.available(), 40, "a refused take changes nothing");
        b.untake(65);
        assert_eq!((b.used(), b.beyond(), u.available()), (5, 0, 100), "the 60 beyond went back first");
        assert!(b.take(50));
        b.reclaimed();
        assert_eq!((b.used(), b.beyond(), u.available()), (0, 0, 100));
    }

    // A stopped guest's promise goes back to the unpromised frames exactly once, whatever it
    // drew beyond it; the other guest's promise and draws are untouched, and a withdrawn
    // budget draws nothing more from its promise.
    #[test]
    fn a_stopped_guests_promise_is_unpromised_once() {
        use crate::frame::testing::{rig, small};
        let config = small();
        let rig = Box::leak(Box::new(rig(4096, 1, config)));
        let frames = &rig.frames;
        let (stopping, staying) = (frames.commit(300), frames.commit(200));
        let (stopping, staying) = (
            MemoryBudget::new(stopping, 20, frames.unpromised()).unwrap(),
            MemoryBudget::new(staying, 20, frames.unpromised()).unwrap(),
        );
        let open = frames.open_unpromised(500);
        assert!(stopping.take(280) && stopping.take(40), "its promise and 40 frames beyond it");
        assert!(staying.take(100));
        assert_eq!(frames.unpromised().available(), open - 40);
        // The guest stops: its memory is reclaimed, then its promise withdrawn.
        stopping.reclaimed();
        assert_eq!(frames.unpromised().available(), open, "what it drew beyond is back");
        assert_eq!(stopping.withdraw(frames), 300);
        assert_eq!(frames.unpromised().available(), open + 300, "its whole promise is unpromised");
        assert_eq!(frames.committed_frames(), 200, "only the other guest's promise stands");
        assert_eq!(stopping.withdraw(frames), 0, "a second withdrawal gives nothing back");
        assert_eq!(frames.unpromised().available(), open + 300);
        assert_eq!(frames.committed_frames(), 200);
        assert!(!stopping.take_promised(1), "nothing is drawn from a withdrawn promise");
        assert_eq!((staying.used(), staying.promised()), (100, 200));
        // No frame was drawn for real: the counts cover the free frames exactly, none twice.
        let pools = config.page_capacity + config.block_capacity * crate::frame::BLOCK_FRAMES;
        assert_eq!(frames.unpromised().available() + 200, frames.free_frames() - pools);
    }

    #[test]
    fn a_guest_never_takes_another_guests_promise() {
        // Both guests promised 10 pages; 5 unpromised. The greedy one can have 15, the other
        // still has its 10.
        let u = unpromised(5);
        let greedy = budget(11, 1, u);
        let modest = budget(11, 1, u);
        assert_eq!((0..100).filter(|_| greedy.take(1)).count(), 15);
        assert_eq!((0..100).filter(|_| modest.take(1)).count(), 10);
    }

    #[test]
    fn vcpus_drawing_at_once_never_take_more_than_promised_and_unpromised() {
        let u = unpromised(3_000);
        let b = budget(10_000 + 1, 1, u);
        // Four vCPUs ask for about 25,000 frames in pages and 3-frame runs, and give some back.
        let drawn: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut held = 0;
                        for i in 0..5_000 {
                            let n = if i % 7 == 0 { 3 } else { 1 };
                            if b.take(n) {
                                held += n;
                            }
                            if i % 11 == 0 && held > 0 {
                                b.untake(1);
                                held -= 1;
                            }
                        }
                        held
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(b.used() + b.beyond(), drawn, "every frame held is counted once");
        assert_eq!(u.available() + b.beyond(), 3_000, "what is beyond came from the unpromised frames");
        // A 3-frame run finds 1 or 2 left in each source: up to 4 frames stay undrawn.
        assert!((13_000 - 4..=13_000).contains(&drawn), "drew {drawn} of 13000");
        assert!(!b.take(b.pages() - b.used() + u.available() + 1), "more than both sources hold");
    }
}
