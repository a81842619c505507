//! Model checks (loom) of SGI delivery between vCPUs: senders post to a mailbox with no lock
//! while the target drains it in `sync_lrs`. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p labyrinth --lib vgic::loom --target-dir target/loom`.
//!
//! Only the target ever takes its redistributor's and the distributor's spin locks here: loom
//! cannot schedule around a spin lock on core atomics, and the send path takes none.

use loom::sync::Arc;
use loom::thread;

use super::*;

fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

/// vCPU 1 ready to take SGIs 0-15 (group 1, enabled, distributor group 1 on).
fn ready(vcpus: usize) -> Arc<VGic> {
    let g = VGic::new(vcpus).unwrap();
    g.write(Frame::Distributor, 0, 4, u64::from(regs::CTLR_ENABLE_G1)).unwrap();
    g.write(Frame::Sgi { vcpu: 1 }, 0x80, 4, 0xffff).unwrap();
    g.write(Frame::Sgi { vcpu: 1 }, 0x100, 4, 0xffff).unwrap();
    Arc::new(g)
}

/// The target's guest takes everything pending in its list registers: returns the SGIs seen
/// (one bit each) and how many LRs carried them.
fn take(g: &VGic, lrs: &mut [u64; 4]) -> (u32, usize) {
    g.sync_lrs(1, lrs);
    let (mut seen, mut n) = (0, 0);
    for lr in lrs.iter_mut().filter(|l| **l & LR_PENDING != 0) {
        seen |= 1 << (*lr & 0xf);
        n += 1;
        *lr = 0;
    }
    (seen, n)
}

fn sgi_to(intid: u64, vcpu: usize) -> u64 {
    (intid << 24) | (1 << vcpu)
}

// One sender, the target syncing at the same time: the SGI is seen exactly once, by the sync
// that races with it or by the next one.
#[test]
fn a_sent_sgi_is_never_lost() {
    check(|| {
        let g = ready(2);
        let sender = {
            let g = g.clone();
            thread::spawn(move || assert_eq!(g.send_sgi(0, sgi_to(3, 1)), VcpuSet::only(1)))
        };
        let mut lrs = [0u64; 4];
        let (first, n1) = take(&g, &mut lrs);
        sender.join().unwrap();
        let (second, n2) = take(&g, &mut lrs);
        assert_eq!(first | second, 1 << 3, "SGI 3 lost");
        assert_eq!(n1 + n2, 1, "one send, one SGI taken");
        assert!(!g.has_mail(1));
    });
}

// Two senders, the same SGI and different ones, against a target that syncs twice meanwhile:
// every SGI is seen; the same SGI sent twice is seen once or twice (pending is a state), never
// more; nothing stays behind.
#[test]
fn concurrent_senders_and_drains_lose_nothing() {
    check(|| {
        let g = ready(3);
        let senders: Vec<_> = [(0usize, [5u64, 7]), (2, [5, 9])]
            .into_iter()
            .map(|(me, sgis)| {
                let g = g.clone();
                thread::spawn(move || {
                    for s in sgis {
                        g.send_sgi(me, sgi_to(s, 1));
                    }
                })
            })
            .collect();
        let mut lrs = [0u64; 4];
        let mut counts = [0usize; 16];
        let mut seen = 0;
        let mut tally = |(s, _): (u32, usize)| {
            seen |= s;
            for (i, c) in counts.iter_mut().enumerate() {
                *c += (s >> i) as usize & 1;
            }
        };
        tally(take(&g, &mut lrs));
        tally(take(&g, &mut lrs));
        for s in senders {
            s.join().unwrap();
        }
        tally(take(&g, &mut lrs));
        assert_eq!(seen, (1 << 5) | (1 << 7) | (1 << 9));
        assert!((1..=2).contains(&counts[5]));
        assert_eq!((counts[7], counts[9]), (1, 1));
        assert!(!g.has_mail(1) && !g.is_pending(1, 5));
    });
}
