//! A guest's life as its vCPUs share it: running, being stopped (or reset) by one of them, and
//! stopped; and which vCPUs are inside the guest.
//!
//! It owns one rule: a guest's memory is taken apart (stop, reset) only once every other vCPU
//! is out of the guest and cannot go back in. Each vCPU announces itself before it enters and
//! then re-checks the life word; the vCPU stopping the guest changes the life word first and
//! then reads the announcements. A sequentially consistent fence stands between each side's
//! write and its read (`DMB ISH`), so at least one of them sees the other: either the entering
//! vCPU sees the stop and stays out, or the stopping vCPU sees it inside and kicks it out (its
//! caller sends a physical SGI and asks again). Fences, not SeqCst accesses: the pattern is
//! store-then-load on both sides, which is what the fences order (and what loom can check).
//! It never waits itself, kicks or touches a CPU: the caller does, with what [`inside`]
//! tells it.
//!
//! [`inside`]: Lifecycle::inside

use super::sync::{fence, AtomicBool, AtomicU8, Ordering};
use super::VcpuSet;
use crate::dt::MAX_VCPUS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    Running,
    /// One vCPU won the guest (stop or reset) and waits for the others to be out.
    Stopping,
    Stopped,
}

pub struct Lifecycle {
    life: AtomicU8,
    in_guest: [AtomicBool; MAX_VCPUS],
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    #[cfg(not(all(loom, test)))]
    pub const fn new() -> Self {
        Lifecycle { life: AtomicU8::new(0), in_guest: [const { AtomicBool::new(false) }; MAX_VCPUS] }
    }

    #[cfg(all(loom, test))]
    pub fn new() -> Self {
        Lifecycle { life: AtomicU8::new(0), in_guest: core::array::from_fn(|_| AtomicBool::new(false)) }
    }

    pub fn life(&self) -> Life {
        match self.life.load(Ordering::Acquire) {
            0 => Life::Running,
            1 => Life::Stopping,
            _ => Life::Stopped,
        }
    }

    /// vCPU `vcpu` is about to enter the guest: `true` if it may (it then counts as inside
    /// until [`Lifecycle::leave`]), `false` if the guest is not running (it stays out).
    pub fn try_enter(&self, vcpu: usize) -> bool {
        let Some(flag) = self.in_guest.get(vcpu) else { return false };
        flag.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.life() == Life::Running {
            return true;
        }
        flag.store(false, Ordering::Release);
        false
    }

    /// vCPU `vcpu` is out of the guest.
    pub fn leave(&self, vcpu: usize) {
        // Release: what the vCPU did inside happens before a stopper that sees it out.
        if let Some(flag) = self.in_guest.get(vcpu) {
            flag.store(false, Ordering::Release);
        }
    }

    /// vCPU `vcpu` asks to stop or reset a running guest: `true` for exactly one caller, which
    /// then counts as out of the guest; the others (and any later caller) get `false`.
    pub fn begin_stop(&self, vcpu: usize) -> bool {
        let won = self.life.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if won {
            self.leave(vcpu);
        }
        won
    }

    /// The vCPUs among the first `vcpus` that are still inside the guest.
    pub fn inside(&self, vcpus: usize) -> VcpuSet {
        // Between the stopper's change of the life word and these reads (see the module doc).
        fence(Ordering::SeqCst);
        let mut set = VcpuSet::EMPTY;
        for (i, flag) in self.in_guest.iter().enumerate().take(vcpus) {
            if flag.load(Ordering::Acquire) {
                set = set.with(i);
            }
        }
        set
    }

    /// The stopping vCPU is done: the guest runs again (after a reset) or is stopped for good.
    pub fn finish(&self, running_again: bool) {
        self.life.store(if running_again { 0 } else { 2 }, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_vcpu_wins_the_stop_and_nobody_enters_meanwhile() {
        let l = Lifecycle::new();
        assert!(l.try_enter(0) && l.try_enter(1));
        assert_eq!(l.inside(2), VcpuSet::first(2));
        assert!(l.begin_stop(1));
        assert!(!l.begin_stop(0), "a second stop loses");
        assert_eq!(l.life(), Life::Stopping);
        assert_eq!(l.inside(2), VcpuSet::only(0), "the winner is out, the other is still inside");
        l.leave(0);
        assert!(!l.try_enter(0), "nobody enters a guest being stopped");
        assert!(l.inside(2).is_empty());
        l.finish(true);
        assert!(l.try_enter(0), "a reset guest runs again");
        assert!(l.begin_stop(0));
        l.finish(false);
        assert_eq!(l.life(), Life::Stopped);
        assert!(!l.try_enter(0) && !l.begin_stop(0));
    }

    #[test]
    fn vcpus_beyond_the_limit_are_refused_not_a_panic() {
        let l = Lifecycle::new();
        assert!(!l.try_enter(MAX_VCPUS));
        l.leave(usize::MAX);
        assert!(l.inside(usize::MAX).is_empty());
    }
}

/// `RUSTFLAGS="--cfg loom" cargo test --release -p labyrinth --lib vm::lifecycle`
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// A vCPU entering (and touching guest memory while inside) races another vCPU stopping
    /// the guest and freeing its memory once nobody is inside: memory is never touched after
    /// it was freed, whichever order the two run in.
    #[test]
    fn entry_never_overlaps_teardown() {
        loom::model(|| {
            let life = Arc::new(Lifecycle::new());
            let freed = Arc::new(AtomicBool::new(false));
            let (l, f) = (life.clone(), freed.clone());
            let entering = thread::spawn(move || {
                if l.try_enter(0) {
                    assert!(!f.load(Ordering::SeqCst), "guest memory touched after teardown");
                    l.leave(0);
                }
            });
            assert!(life.begin_stop(1));
            while !life.inside(2).is_empty() {
                thread::yield_now();
            }
            freed.store(true, Ordering::SeqCst);
            life.finish(false);
            entering.join().unwrap();
            assert!(!life.try_enter(0));
        });
    }

    /// Two vCPUs ask to stop at once: exactly one wins.
    #[test]
    fn exactly_one_stop_wins() {
        loom::model(|| {
            let life = Arc::new(Lifecycle::new());
            let l = life.clone();
            let other = thread::spawn(move || l.begin_stop(0));
            let mine = life.begin_stop(1);
            let theirs = other.join().unwrap();
            assert!(mine ^ theirs, "exactly one stop wins: {mine} {theirs}");
        });
    }
}
