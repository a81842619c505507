//! Model checks (loom) of the lock-free paths: the pool's pop/push/steal, the atomic
//! allocation and return paths over the real database, multi-frame transitions, and the
//! audit's snapshot running against an allocation. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p labyrinth --lib frame::loom`.
//!
//! Only one thread per model ever takes the buddy lock: it is a spin lock on core atomics,
//! which loom cannot schedule around.

use std::collections::BTreeSet;
use std::vec::Vec;

use loom::sync::Arc;
use loom::thread;

use super::pool::FramePool;
use super::sync::Ordering;
use super::tag::TAG_FREE;
use super::testing::{guest, leak_tags, FakeRam, RAM_BASE};
use super::*;

fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

/// Eight free frames, two CPUs, pools of up to four pages (CPU 0's filled to `page_high`,
/// which is its surplus above the low watermark of 1), no blocks.
fn tiny(page_high: usize) -> (Arc<FrameManager<'static>>, FakeRam) {
    let banks = [(RAM_BASE, RAM_BASE + 8 * FRAME_SIZE)];
    let base = Pfn(RAM_BASE >> 12);
    let db = FrameDb::new(leak_tags(8), base, &banks).unwrap();
    let ram = FakeRam::new(base, 8);
    let config = PoolConfig {
        page_capacity: 4,
        page_low: 1,
        page_high,
        block_capacity: 0,
        block_low: 0,
        block_high: 0,
        steal_victims: 1,
    };
    let frames = FrameManager::new(db, &banks, 2, config, &ram).unwrap();
    frames.refill(0).unwrap();
    (Arc::new(frames), ram)
}

// One pusher and two poppers: every value ends up popped once or still in the pool.
#[test]
fn pool_push_and_pops_never_duplicate_or_lose() {
    check(|| {
        let pool = Arc::new(FramePool::<3>::new(3));
        pool.filler().unwrap().push(1).unwrap();
        let pushing = {
            let pool = pool.clone();
            thread::spawn(move || {
                let filler = pool.filler().unwrap();
                filler.push(2).unwrap();
                filler.push(3).unwrap();
            })
        };
        let popping = {
            let pool = pool.clone();
            thread::spawn(move || pool.pop(2))
        };
        let mut got: Vec<u64> = pool.pop(2).into_iter().collect();
        pushing.join().unwrap();
        got.extend(popping.join().unwrap());
        while let Some(v) = pool.pop(1) {
            got.push(v);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3]);
    });
}

// A bulk push (one publication for several entries, as a refill does) racing two poppers:
// every value ends up popped once or still in the pool. Catches a publication without Release.
#[test]
fn bulk_push_and_pops_never_duplicate_or_lose() {
    check(|| {
        let pool = Arc::new(FramePool::<4>::new(4));
        pool.filler().unwrap().push(1).unwrap();
        let pushing = {
            let pool = pool.clone();
            thread::spawn(move || assert_eq!(pool.filler().unwrap().push_run(2, 1, 3), 3))
        };
        let popping = {
            let pool = pool.clone();
            thread::spawn(move || pool.pop(2))
        };
        let mut got: Vec<u64> = pool.pop(2).into_iter().collect();
        pushing.join().unwrap();
        got.extend(popping.join().unwrap());
        while let Some(v) = pool.pop(1) {
            got.push(v);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4]);
    });
}

// The audit's snapshot against a pop followed by a bulk push that reuses the popped slot: a
// snapshot the head still validates afterwards is exactly the pool at that head (never the
// new value under the old head). (Loom did not produce the stale slot read that dropping the
// Release fence would allow, so that ordering is argued in `push_run`, not model-checked.)
#[test]
fn snapshot_never_mixes_a_bulk_push_into_an_old_head() {
    check(|| {
        let pool = Arc::new(FramePool::<2>::new(2));
        pool.filler().unwrap().push(1).unwrap();
        let h0 = pool.head();
        let churn = {
            let pool = pool.clone();
            thread::spawn(move || {
                assert_eq!(pool.pop(1), Some(1));
                assert_eq!(pool.filler().unwrap().push_run(7, 1, 1), 1);
            })
        };
        let mut out = Vec::new();
        let head = pool.snapshot(&mut out);
        if pool.head() == head {
            let want: &[u64] = match head.wrapping_sub(h0) {
                0 => &[1],
                d if d == (1 << 12) - 1 => &[],
                _ => &[7],
            };
            assert_eq!(out, want, "snapshot under head {head:#x}");
        }
        churn.join().unwrap();
    });
}

// Two CPUs allocate at once, one from its own pool and one taking the other's surplus: never
// the same frame, each tagged for its owner, and nothing lost.
#[test]
fn own_pop_and_steal_never_share_a_frame() {
    check(|| {
        let (frames, _ram) = tiny(2);
        let stealer = {
            let frames = frames.clone();
            thread::spawn(move || frames.alloc_page_atomic_exclusive(1, guest(1)))
        };
        let own = frames.alloc_page_atomic_exclusive(0, guest(0));
        let stolen = stealer.join().unwrap();
        let mut got = BTreeSet::new();
        for (result, owner) in [(own, guest(0)), (stolen, guest(1))] {
            if let Ok(pfn) = result {
                assert!(got.insert(pfn), "{pfn} handed out twice");
                assert_eq!(frames.db().state(pfn), Ok(owner.state()));
            }
        }
        assert!(own.is_ok(), "the own pool had two frames and one competitor");
        let report = frames.audit(None);
        assert!(report.is_exact(), "{report}");
        assert_eq!(report.free_in_page_pools, 2 - got.len());
    });
}

// A CPU returning an unused frame while another CPU steals from the same pool: the frame is
// handed out at most once and the pool stays consistent.
#[test]
fn return_unused_races_with_steal() {
    check(|| {
        let (frames, _ram) = tiny(3);
        let mine = frames.alloc_page_atomic_exclusive(0, guest(0)).unwrap();
        let stealer = {
            let frames = frames.clone();
            thread::spawn(move || frames.alloc_page_atomic_exclusive(1, guest(1)))
        };
        frames.return_unused_page_atomic(0, mine, guest(0)).unwrap();
        let stolen = stealer.join().unwrap();
        if let Ok(pfn) = stolen {
            assert_eq!(frames.db().state(pfn), Ok(guest(1).state()));
        }
        let report = frames.audit(None);
        assert!(report.is_exact(), "{report}");
        assert_eq!(report.free_in_page_pools, 3 - usize::from(stolen.is_ok()));
    });
}

// A CPU refilling its pool (the only pusher) while another CPU takes its surplus: every frame
// is handed out at most once and ends up owned or held, never lost.
#[test]
fn refill_races_with_steal() {
    check(|| {
        let (frames, ram) = tiny(2);
        let stealer = {
            let frames = frames.clone();
            thread::spawn(move || frames.alloc_page_atomic_exclusive(1, guest(1)))
        };
        let mut got = BTreeSet::new();
        while let Ok(pfn) = frames.alloc_page_atomic_exclusive(0, guest(0)) {
            got.insert(pfn);
        }
        frames.refill(0).unwrap();
        if let Ok(pfn) = stealer.join().unwrap() {
            assert!(got.insert(pfn), "{pfn} handed out twice");
            assert_eq!(frames.db().state(pfn), Ok(guest(1).state()));
        }
        let report = frames.audit(Some(&ram));
        assert!(report.is_exact(), "{report}");
        assert_eq!(report.free, 8 - got.len());
    });
}

// The audit running while a CPU pops and claims a frame never reports a broken invariant.
#[test]
fn audit_is_sound_against_a_concurrent_allocation() {
    check(|| {
        let (frames, _ram) = tiny(1);
        let allocating = {
            let frames = frames.clone();
            thread::spawn(move || frames.alloc_page_atomic_exclusive(0, guest(0)))
        };
        let report = frames.audit(None);
        assert!(report.is_consistent(), "{report}");
        assert!(allocating.join().unwrap().is_ok());
        assert!(frames.audit(None).is_exact());
    });
}

// Two overlapping multi-frame transitions: each frame ends with at most one of them, and a
// transition is either complete or left no trace.
#[test]
fn overlapping_transitions_are_all_or_nothing() {
    check(|| {
        let banks = [(RAM_BASE, RAM_BASE + 3 * FRAME_SIZE)];
        let db = Arc::new(FrameDb::new(leak_tags(3), Pfn(RAM_BASE >> 12), &banks).unwrap());
        let base = db.base();
        let other = {
            let db = db.clone();
            thread::spawn(move || db.transition(base.add(1), 2, TAG_FREE, guest(2).tag()).is_ok())
        };
        let mine = db.transition(base, 2, TAG_FREE, guest(1).tag()).is_ok();
        let theirs = other.join().unwrap();
        assert!(!(mine && theirs), "frame 1 granted to both");
        let tag = |i: u64| db.cell(base.add(i).0).unwrap().load(Ordering::Relaxed);
        let expect = |granted: bool, owner: Owner| if granted { owner.tag() } else { TAG_FREE };
        assert_eq!(tag(0), expect(mine, guest(1)));
        assert_eq!(tag(2), expect(theirs, guest(2)));
        assert!(tag(1) == expect(mine, guest(1)) || tag(1) == expect(theirs, guest(2)));
        if !mine && !theirs {
            assert_eq!(tag(1), TAG_FREE);
        }
    });
}
