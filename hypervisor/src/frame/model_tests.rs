//! Property tests: random sequences of allocations, releases, returns, shares, refills, drains
//! and audits, each result checked against a simple model (a map from frame to owner).

use std::collections::BTreeMap;
use std::vec::Vec;

use proptest::prelude::*;

use super::testing::*;
use super::*;

const TOTAL: usize = 2048;
const CPUS: usize = 2;

fn config() -> PoolConfig {
    PoolConfig { steal_victims: 1, ..small() }
}

#[derive(Clone, Debug)]
enum Op {
    AllocPage {
        cpu: usize,
        vm: u16,
        table: bool,
    },
    AllocBlock {
        cpu: usize,
        vm: u16,
    },
    AllocContiguous {
        order: u32,
        vm: u16,
    },
    /// Release a whole allocation as its owner.
    Release {
        pick: usize,
    },
    /// Release a whole allocation claiming to be guest `vm` (maybe the owner, maybe not).
    ReleaseAs {
        pick: usize,
        vm: u16,
    },
    /// Release any one frame of the database as guest `vm`.
    ReleaseFrame {
        offset: usize,
        vm: u16,
    },
    /// Give back an allocated, unwritten page on the atomic path.
    ReturnUnused {
        pick: usize,
        cpu: usize,
    },
    /// Share a whole allocation as guest `vm`'s shared memory (refused unless `vm` owns it).
    Share {
        pick: usize,
        vm: u16,
    },
    /// The owner writes into its frames.
    Write {
        pick: usize,
    },
    Refill {
        cpu: usize,
    },
    Drain {
        cpu: usize,
    },
    Audit,
}

fn op() -> impl Strategy<Value = Op> {
    let cpu = 0..CPUS;
    let vm = 0u16..3;
    prop_oneof![
        4 => (cpu.clone(), vm.clone(), any::<bool>()).prop_map(|(cpu, vm, table)| Op::AllocPage { cpu, vm, table }),
        1 => (cpu.clone(), vm.clone()).prop_map(|(cpu, vm)| Op::AllocBlock { cpu, vm }),
        2 => (0u32..4, vm.clone()).prop_map(|(order, vm)| Op::AllocContiguous { order, vm }),
        3 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (any::<usize>(), vm.clone()).prop_map(|(pick, vm)| Op::ReleaseAs { pick, vm }),
        1 => (0..TOTAL, vm).prop_map(|(offset, vm)| Op::ReleaseFrame { offset, vm }),
        2 => (any::<usize>(), cpu.clone()).prop_map(|(pick, cpu)| Op::ReturnUnused { pick, cpu }),
        2 => any::<usize>().prop_map(|pick| Op::Write { pick }),
        2 => (any::<usize>(), 0u16..3).prop_map(|(pick, vm)| Op::Share { pick, vm }),
        3 => cpu.clone().prop_map(|cpu| Op::Refill { cpu }),
        1 => cpu.prop_map(|cpu| Op::Drain { cpu }),
        1 => Just(Op::Audit),
    ]
}

/// One allocation as the model remembers it.
#[derive(Clone, Copy, Debug)]
struct Alloc {
    first: Pfn,
    frames: usize,
    owner: Owner,
    written: bool,
}

struct Model {
    allocs: Vec<Alloc>,
    /// Owner of every allocated frame.
    owned: BTreeMap<u64, Owner>,
}

impl Model {
    fn take(&mut self, rig: &Rig, first: Pfn, frames: usize, owner: Owner) {
        for i in 0..frames as u64 {
            let pfn = first.add(i);
            assert!(pfn.0 >= FIRST_FREE.0, "{pfn} is the hypervisor's or firmware's");
            assert!(self.owned.insert(pfn.0, owner).is_none(), "{pfn} handed out twice");
            assert_eq!(rig.frames.db().state(pfn), Ok(owner.state()));
            assert!(rig.ram.reads_zero(pfn), "{pfn} handed out dirty");
        }
        self.allocs.push(Alloc { first, frames, owner, written: false });
    }

    fn forget(&mut self, index: usize) -> Alloc {
        let alloc = self.allocs.swap_remove(index);
        for i in 0..alloc.frames as u64 {
            self.owned.remove(&alloc.first.add(i).0);
        }
        alloc
    }

    fn pick(&self, pick: usize) -> Option<usize> {
        (!self.allocs.is_empty()).then(|| pick % self.allocs.len())
    }
}

fn check_freed(rig: &Rig, first: Pfn, frames: usize) {
    for i in 0..frames as u64 {
        assert_eq!(rig.frames.db().state(first.add(i)), Ok(FrameState::Free));
        assert!(rig.ram.reads_zero(first.add(i)));
    }
}

fn check_unchanged(rig: &Rig, alloc: &Alloc) {
    for i in 0..alloc.frames as u64 {
        assert_eq!(rig.frames.db().state(alloc.first.add(i)), Ok(alloc.owner.state()));
    }
    if alloc.written {
        assert_eq!(rig.ram.read(alloc.first), 0xfeed, "a refused release scrubbed");
    }
}

fn run(ops: &[Op]) {
    let rig = rig(TOTAL, CPUS, config());
    let boot_free = rig.frames.free_frames();
    let mut model = Model { allocs: Vec::new(), owned: BTreeMap::new() };

    for op in ops {
        match *op {
            Op::AllocPage { cpu, vm: id, table } => {
                let owner = if table { page_table(id) } else { guest(id) };
                match rig.frames.alloc_page_atomic_exclusive(cpu, owner) {
                    Ok(pfn) => model.take(&rig, pfn, 1, owner),
                    Err(AtomicError::Empty) => assert!(rig.frames.needs_refill(cpu)),
                    Err(e) => panic!("{op:?}: {e:?}"),
                }
            }
            Op::AllocBlock { cpu, vm: id } => match rig.frames.alloc_block_atomic_exclusive(cpu, guest(id)) {
                Ok(first) => {
                    assert_eq!(first.0 % BLOCK_FRAMES as u64, 0);
                    model.take(&rig, first, BLOCK_FRAMES, guest(id));
                }
                Err(AtomicError::Empty) => {}
                Err(e) => panic!("{op:?}: {e:?}"),
            },
            Op::AllocContiguous { order, vm: id } => match rig.frames.alloc_contiguous(1 << order, guest(id))
            {
                Ok(first) => {
                    assert_eq!(first.0 % (1 << order), 0);
                    model.take(&rig, first, 1 << order, guest(id));
                }
                Err(FrameError::OutOfFrames) => {}
                Err(e) => panic!("{op:?}: {e:?}"),
            },
            Op::Release { pick } => {
                let Some(i) = model.pick(pick) else { continue };
                let alloc = model.forget(i);
                rig.frames.release(alloc.first, alloc.frames, alloc.owner, &rig.ram).unwrap();
                check_freed(&rig, alloc.first, alloc.frames);
            }
            Op::ReleaseAs { pick, vm: id } => {
                let Some(i) = model.pick(pick) else { continue };
                let alloc = model.allocs[i];
                let result = rig.frames.release(alloc.first, alloc.frames, guest(id), &rig.ram);
                if alloc.owner == guest(id) {
                    result.unwrap();
                    model.forget(i);
                    check_freed(&rig, alloc.first, alloc.frames);
                } else {
                    assert!(matches!(result, Err(FrameError::WrongState { .. })), "{result:?}");
                    check_unchanged(&rig, &alloc);
                }
            }
            Op::ReleaseFrame { offset, vm: id } => {
                let pfn = Pfn((RAM_BASE >> 12) + offset as u64);
                let before = rig.frames.db().state(pfn).unwrap();
                let result = rig.frames.release(pfn, 1, guest(id), &rig.ram);
                if model.owned.get(&pfn.0) == Some(&guest(id)) {
                    result.unwrap();
                    // Split the allocation around the released frame.
                    let i = model
                        .allocs
                        .iter()
                        .position(|a| a.first.0 <= pfn.0 && pfn.0 < a.first.0 + a.frames as u64)
                        .unwrap();
                    let alloc = model.forget(i);
                    let before_len = (pfn.0 - alloc.first.0) as usize;
                    for (first, frames) in
                        [(alloc.first, before_len), (pfn.add(1), alloc.frames - before_len - 1)]
                    {
                        if frames > 0 {
                            for f in 0..frames as u64 {
                                model.owned.insert(first.add(f).0, alloc.owner);
                            }
                            model.allocs.push(Alloc { first, frames, ..alloc });
                        }
                    }
                    check_freed(&rig, pfn, 1);
                } else {
                    assert!(result.is_err(), "{op:?} released a frame guest {id} does not own");
                    assert_eq!(rig.frames.db().state(pfn), Ok(before));
                }
            }
            Op::ReturnUnused { pick, cpu } => {
                let Some(i) = model.pick(pick) else { continue };
                let alloc = model.allocs[i];
                if alloc.frames != 1
                    || alloc.written
                    || matches!(alloc.owner.state(), FrameState::SharedOwned(_))
                {
                    continue; // only untouched single frames of guests or tables take this path
                }
                match rig.frames.return_unused_page_atomic(cpu, alloc.first, alloc.owner) {
                    Ok(()) => {
                        model.forget(i);
                        assert_eq!(rig.frames.db().state(alloc.first), Ok(FrameState::Free));
                    }
                    Err(AtomicError::Full) => check_unchanged(&rig, &alloc),
                    Err(e) => panic!("{op:?}: {e:?}"),
                }
            }
            Op::Share { pick, vm: id } => {
                let Some(i) = model.pick(pick) else { continue };
                let alloc = model.allocs[i];
                let vm = VmId::new(id).unwrap();
                let result = rig.frames.share(alloc.first, alloc.frames, vm);
                if alloc.owner == guest(id) {
                    result.unwrap();
                    let shared = Owner::shared(vm);
                    model.allocs[i].owner = shared;
                    for f in 0..alloc.frames as u64 {
                        model.owned.insert(alloc.first.add(f).0, shared);
                        assert_eq!(
                            rig.frames.db().state(alloc.first.add(f)),
                            Ok(FrameState::SharedOwned(vm))
                        );
                    }
                } else {
                    assert!(result.is_err(), "{op:?} shared frames guest {id} does not own");
                    check_unchanged(&rig, &alloc);
                }
            }
            Op::Write { pick } => {
                let Some(i) = model.pick(pick) else { continue };
                let alloc = &mut model.allocs[i];
                for f in 0..alloc.frames as u64 {
                    rig.ram.write(alloc.first.add(f), 0xfeed);
                }
                alloc.written = true;
            }
            Op::Refill { cpu } => {
                rig.frames.refill(cpu).unwrap();
            }
            Op::Drain { cpu } => {
                rig.frames.drain(cpu).unwrap();
            }
            Op::Audit => {
                let report = rig.frames.audit(Some(&rig.ram));
                assert!(report.is_exact(), "{report}");
                let owned_by_guests: usize =
                    report.guests.iter().map(|g| g.memory + g.page_tables + g.shared).sum();
                assert_eq!(owned_by_guests, model.owned.len());
                let shared =
                    model.owned.values().filter(|o| matches!(o.state(), FrameState::SharedOwned(_))).count();
                assert_eq!(report.shared, shared);
            }
        }
        // Conservation: every frame free at boot is either still free or owned, never both.
        assert_eq!(rig.frames.free_frames() + model.owned.len(), boot_free, "after {op:?}");
    }

    while !model.allocs.is_empty() {
        let alloc = model.forget(0);
        rig.frames.release(alloc.first, alloc.frames, alloc.owner, &rig.ram).unwrap();
    }
    for cpu in 0..CPUS {
        rig.frames.drain(cpu).unwrap();
    }
    let report = rig.frames.audit(Some(&rig.ram));
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.free_in_buddy, boot_free);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    // Any sequence of operations keeps the database, the pools, the buddy allocator and the
    // model in agreement: no frame twice, nothing lost, refusals change nothing.
    #[test]
    fn random_operations_agree_with_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops);
    }
}
