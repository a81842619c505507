//! Every call and every error, table-driven; the fast path against the general one; the
//! power-state transitions; a multi-threaded CPU_ON race.

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::sync::{Arc, Barrier};
use std::vec::Vec;

use super::*;

const NOT_SUPPORTED: u64 = -1i64 as u64;
const INVALID_PARAMETERS: u64 = -2i64 as u64;
const ALREADY_ON: u64 = -4i64 as u64;
const ON_PENDING: u64 = -5i64 as u64;
const INVALID_ADDRESS: u64 = -9i64 as u64;

const RAM: Range<u64> = 0x4000_0000..0x4400_0000;
const ENTRY: u64 = 0x4008_0000;

const SMCCC_VERSION: u64 = 0x8000_0000;
const SMCCC_ARCH_FEATURES: u64 = 0x8000_0001;
const CPU_FREEZE: u64 = 0x8400_000b;
const SYSTEM_RESET2_64: u64 = 0xc400_0012;
const MEM_PROTECT: u64 = 0x8400_0013;

/// Four vCPUs: 0 On (the caller), 1 Off, 2 OnPending, 3 On.
fn four() -> VcpuPowerStates {
    let p = VcpuPowerStates::new(4).unwrap();
    p.cpu_on(2, ENTRY, 0).unwrap();
    p.cpu_on(3, ENTRY, 0).unwrap();
    p.enter(3).unwrap();
    p
}

fn ret(v: u64) -> PsciAction {
    PsciAction::Return(v)
}

fn fid(f: u32) -> u64 {
    u64::from(f)
}

/// (what, x0, x1, x2, x3, answer) for vCPU 0 of [`four`] with RAM [`RAM`].
#[rustfmt::skip]
fn table() -> Vec<(&'static str, u64, u64, u64, u64, PsciAction)> {
    use crate::psci::*;
    let on = |vcpu, entry, context| PsciAction::CpuOn { vcpu, entry, context };
    let mut t = vec![
        ("version", fid(PSCI_VERSION), 0, 0, 0, ret(0x1_0000)),
        ("version, x0's upper half ignored", 0xffff_ffff_8400_0000, 0, 0, 0, ret(0x1_0000)),
        ("features of CPU_SUSPEND: original format, no OSI", fid(PSCI_FEATURES), fid(CPU_SUSPEND_64), 0, 0, ret(0)),
        ("features, x1's upper half ignored", fid(PSCI_FEATURES), 0xffff_ffff_8400_0000, 0, 0, ret(0)),
        ("suspend, standby", fid(CPU_SUSPEND_64), 0x0000_0001, 0, 0, ret(0)),
        ("suspend, powerdown, cluster level", fid(CPU_SUSPEND_64), 0x0101_0002, ENTRY, 9, ret(0)),
        ("suspend, SMC32 entry truncated", fid(CPU_SUSPEND_32), 0x0001_0000, 0x1_0000_0000 | ENTRY, 0, ret(0)),
        ("suspend, reserved bit 17", fid(CPU_SUSPEND_64), 1 << 17, 0, 0, ret(INVALID_PARAMETERS)),
        ("suspend, reserved bit 30", fid(CPU_SUSPEND_32), 1 << 30, 0, 0, ret(INVALID_PARAMETERS)),
        ("suspend, powerdown outside RAM", fid(CPU_SUSPEND_64), 0x0001_0000, 0x1000, 0, ret(INVALID_ADDRESS)),
        ("suspend, powerdown misaligned", fid(CPU_SUSPEND_64), 0x0001_0000, ENTRY + 2, 0, ret(INVALID_ADDRESS)),
        ("suspend, standby ignores the entry", fid(CPU_SUSPEND_64), 0, 0x1000, 0, ret(0)),
        ("cpu_on of an Off vCPU", fid(CPU_ON_64), 1, ENTRY, 7, on(1, ENTRY, 7)),
        ("cpu_on at RAM's first byte", fid(CPU_ON_64), 1, RAM.start, 0, on(1, RAM.start, 0)),
        ("cpu_on at RAM's last word", fid(CPU_ON_64), 1, RAM.end - 4, 0, on(1, RAM.end - 4, 0)),
        ("cpu_on, SMC32 arguments truncated", fid(CPU_ON_32), 0xffff_ffff_0000_0001, 0x1_0000_0000 | ENTRY,
            0xdead_0000_0000_0007, on(1, ENTRY, 7)),
        ("cpu_on, SMC64 context kept whole", fid(CPU_ON_64), 1, ENTRY, u64::MAX, on(1, ENTRY, u64::MAX)),
        ("cpu_on of the caller", fid(CPU_ON_64), 0, ENTRY, 0, ret(ALREADY_ON)),
        ("cpu_on of an On vCPU", fid(CPU_ON_32), 3, ENTRY, 0, ret(ALREADY_ON)),
        ("cpu_on of an OnPending vCPU", fid(CPU_ON_64), 2, ENTRY, 0, ret(ON_PENDING)),
        ("cpu_on of vCPU 4 of 4", fid(CPU_ON_64), 4, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on of Aff0 255", fid(CPU_ON_64), 0xff, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with Aff1", fid(CPU_ON_64), 0x101, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with Aff2", fid(CPU_ON_64), 0x1_0001, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with Aff3", fid(CPU_ON_64), 0x1_0000_0001, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with MPIDR bit 31", fid(CPU_ON_64), 0x8000_0001, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with MPIDR bit 24", fid(CPU_ON_32), 0x100_0001, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on with bits above Aff3", fid(CPU_ON_64), 1 << 40 | 1, ENTRY, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on entry below RAM", fid(CPU_ON_64), 1, RAM.start - 4, 0, ret(INVALID_ADDRESS)),
        ("cpu_on entry at RAM's end", fid(CPU_ON_64), 1, RAM.end, 0, ret(INVALID_ADDRESS)),
        ("cpu_on entry misaligned", fid(CPU_ON_64), 1, ENTRY + 1, 0, ret(INVALID_ADDRESS)),
        ("cpu_on entry 0", fid(CPU_ON_32), 1, 0, 0, ret(INVALID_ADDRESS)),
        ("cpu_on entry past 4 GiB for SMC32 wraps below RAM", fid(CPU_ON_32), 1, 0x1_0000_1000, 0,
            ret(INVALID_ADDRESS)),
        ("cpu_on: a bad target is reported before a bad entry", fid(CPU_ON_64), 9, 0, 0, ret(INVALID_PARAMETERS)),
        ("cpu_on: a bad entry is reported before ALREADY_ON", fid(CPU_ON_64), 3, 0, 0, ret(INVALID_ADDRESS)),
        ("affinity_info of an On vCPU", fid(AFFINITY_INFO_64), 0, 0, 0, ret(0)),
        ("affinity_info of an Off vCPU", fid(AFFINITY_INFO_64), 1, 0, 0, ret(1)),
        ("affinity_info of an OnPending vCPU", fid(AFFINITY_INFO_32), 2, 0, 0, ret(2)),
        ("affinity_info of a started vCPU", fid(AFFINITY_INFO_32), 3, 0, 0, ret(0)),
        ("affinity_info, SMC32 target truncated", fid(AFFINITY_INFO_32), 0xffff_ffff_0000_0001, 0, 0, ret(1)),
        ("affinity_info, level's upper half ignored", fid(AFFINITY_INFO_64), 1, 0xffff_ffff_0000_0000, 0, ret(1)),
        ("affinity_info of vCPU 4 of 4", fid(AFFINITY_INFO_64), 4, 0, 0, ret(INVALID_PARAMETERS)),
        ("affinity_info with Aff1", fid(AFFINITY_INFO_64), 0x100, 0, 0, ret(INVALID_PARAMETERS)),
        ("affinity_info at level 1", fid(AFFINITY_INFO_64), 0, 1, 0, ret(INVALID_PARAMETERS)),
        ("affinity_info at level 3", fid(AFFINITY_INFO_32), 0, 3, 0, ret(INVALID_PARAMETERS)),
        ("migrate_info_type: no Trusted OS", fid(MIGRATE_INFO_TYPE), 0, 0, 0, ret(2)),
        ("cpu_off", fid(CPU_OFF), 0, 0, 0, PsciAction::CpuOff),
        ("system_off", fid(SYSTEM_OFF), 0, 0, 0, PsciAction::SystemOff),
        ("system_reset", fid(SYSTEM_RESET), 0, 0, 0, PsciAction::SystemReset),
    ];
    // PSCI_FEATURES reports every call implemented, and nothing else.
    for f in [PSCI_VERSION, PSCI_FEATURES, CPU_SUSPEND_32, CPU_OFF, CPU_ON_32, CPU_ON_64, AFFINITY_INFO_32,
              AFFINITY_INFO_64, MIGRATE_INFO_TYPE, SYSTEM_OFF, SYSTEM_RESET] {
        t.push(("features of an implemented call", fid(PSCI_FEATURES), fid(f), 0, 0, ret(0)));
    }
    let unsupported = [fid(MIGRATE_32), fid(MIGRATE_64), fid(MIGRATE_INFO_UP_CPU_32), fid(MIGRATE_INFO_UP_CPU_64),
        fid(SYSTEM_SUSPEND_32), fid(SYSTEM_SUSPEND_64), CPU_FREEZE, SYSTEM_RESET2_64, MEM_PROTECT,
        SMCCC_VERSION, SMCCC_ARCH_FEATURES, 0xc400_0002, 0xc400_0006, 0xc400_0008, 0xc400_000a, 0x8400_0100,
        0x8600_ff01, 0, 0xdead_beef, u64::MAX];
    for f in unsupported {
        t.push(("an unimplemented call", f, 1, ENTRY, 0, ret(NOT_SUPPORTED)));
        t.push(("features of an unimplemented call", fid(PSCI_FEATURES), f, 0, 0, ret(NOT_SUPPORTED)));
    }
    t
}

#[test]
fn every_call_and_error() {
    for (what, x0, x1, x2, x3, want) in table() {
        let p = four();
        assert_eq!(call(x0, x1, x2, x3, 0, &p, RAM), want, "{what}: {x0:#x}({x1:#x}, {x2:#x}, {x3:#x})");
    }
}

/// The fast path answers exactly the calls whose whole effect is the return value, with the
/// same value, and changes no state; everything else goes to `call`.
#[test]
fn the_fast_path_agrees_with_the_general_one() {
    for (what, x0, x1, x2, x3, want) in table() {
        let p = four();
        let before: Vec<_> = (0..4).map(|v| p.state(v)).collect();
        let fast = query(x0, x1, x2, x3, &p, RAM);
        match want {
            // Labyrinth's own range is left to the general path, which answers it.
            PsciAction::Return(_) if crate::vm::hypercall::is_ours(x0) => assert_eq!(fast, None, "{what}"),
            PsciAction::Return(v) => assert_eq!(fast, Some(v), "{what}"),
            _ => assert_eq!(fast, None, "{what}"),
        }
        let after: Vec<_> = (0..4).map(|v| p.state(v)).collect();
        assert_eq!(before, after, "{what}: the fast path changed a state");
    }
}

/// Whatever a function ID, PSCI_FEATURES says NOT_SUPPORTED exactly when calling it does.
#[test]
fn features_tells_the_truth_for_every_function_id() {
    let ranges = [0x8400_0000u32..0x8400_0040, 0xc400_0000..0xc400_0040, 0x8000_0000..0x8000_0010];
    for f in ranges.into_iter().flatten() {
        let p = four();
        let feature = query(fid(psci::PSCI_FEATURES), fid(f), 0, 0, &p, RAM);
        // Benign arguments: vCPU 1 (Off), an entry in RAM, level 0, a standby state; for
        // PSCI_FEATURES itself, a call it knows.
        let x1 = if f == psci::PSCI_FEATURES { fid(psci::PSCI_VERSION) } else { 1 };
        let result = call(fid(f), x1, ENTRY, 0, 0, &p, RAM);
        let supported = result != ret(NOT_SUPPORTED);
        assert_eq!(
            feature != Some(NOT_SUPPORTED),
            supported,
            "{f:#x}: features {feature:?}, call {result:?}"
        );
    }
}

#[test]
fn cpu_on_claims_once_and_the_target_enters_once() {
    let p = VcpuPowerStates::new(2).unwrap();
    assert_eq!(p.state(0), Some(PowerState::On));
    assert_eq!(p.state(1), Some(PowerState::Off));
    assert_eq!(
        call(fid(psci::CPU_ON_64), 1, ENTRY, 0x55, 0, &p, RAM),
        PsciAction::CpuOn { vcpu: 1, entry: ENTRY, context: 0x55 }
    );
    assert_eq!(p.state(1), Some(PowerState::OnPending));
    assert_eq!(call(fid(psci::CPU_ON_64), 1, ENTRY + 4, 0, 0, &p, RAM), ret(ON_PENDING));
    assert_eq!(p.enter(1), Some(StartRequest { entry: ENTRY, context: 0x55 }), "the winner's arguments");
    assert_eq!(p.enter(1), None, "once per CPU_ON");
    assert_eq!(p.state(1), Some(PowerState::On));
    assert_eq!(call(fid(psci::CPU_ON_64), 1, ENTRY, 0, 0, &p, RAM), ret(ALREADY_ON));

    // vCPU 1 turns itself off; it can be started again, at a new entry.
    assert_eq!(call(fid(psci::CPU_OFF), 0, 0, 0, 1, &p, RAM), PsciAction::CpuOff);
    assert_eq!(query(fid(psci::AFFINITY_INFO_64), 1, 0, 0, &p, RAM), Some(1));
    assert_eq!(p.enter(1), None, "an Off vCPU has no request");
    assert_eq!(
        call(fid(psci::CPU_ON_32), 1, ENTRY + 8, 3, 0, &p, RAM),
        PsciAction::CpuOn { vcpu: 1, entry: ENTRY + 8, context: 3 }
    );
    assert_eq!(p.enter(1), Some(StartRequest { entry: ENTRY + 8, context: 3 }));
}

#[test]
fn cpu_off_leaves_only_an_on_vcpu_and_the_guest_goes_on() {
    let p = VcpuPowerStates::new(3).unwrap();
    assert!(!p.cpu_off(1), "vCPU 1 is Off already");
    p.cpu_on(2, ENTRY, 0).unwrap();
    assert!(!p.cpu_off(2), "OnPending is not On");
    assert_eq!(p.state(2), Some(PowerState::OnPending));
    assert!(!p.cpu_off(3), "no vCPU 3");
    assert!(p.cpu_off(0));
    assert!(!p.all_off(), "vCPU 2 is pending");
    p.enter(2).unwrap();
    assert!(p.cpu_off(2));
    assert!(p.all_off());
}

#[test]
fn reset_puts_vcpu_0_on_and_the_others_off() {
    let p = VcpuPowerStates::new(4).unwrap();
    p.cpu_on(1, ENTRY, 0).unwrap();
    p.enter(1).unwrap();
    p.cpu_on(2, ENTRY, 0).unwrap();
    assert!(p.cpu_off(0));
    p.reset();
    let states: Vec<_> = (0..4).map(|v| p.state(v).unwrap()).collect();
    assert_eq!(states, [PowerState::On, PowerState::Off, PowerState::Off, PowerState::Off]);
    assert_eq!(p.enter(2), None, "a request from before the reset is gone");
}

#[test]
fn vcpu_counts_and_indices_are_bounded() {
    assert!(VcpuPowerStates::new(0).is_none());
    assert!(VcpuPowerStates::new(MAX_VCPUS + 1).is_none());
    let p = VcpuPowerStates::new(MAX_VCPUS).unwrap();
    assert_eq!(p.vcpus(), MAX_VCPUS);
    let last = MAX_VCPUS as u64 - 1;
    assert!(matches!(call(fid(psci::CPU_ON_64), last, ENTRY, 0, 0, &p, RAM), PsciAction::CpuOn { .. }));
    assert_eq!(call(fid(psci::CPU_ON_64), last + 1, ENTRY, 0, 0, &p, RAM), ret(INVALID_PARAMETERS));
    let two = VcpuPowerStates::new(2).unwrap();
    assert_eq!(two.state(2), None);
    assert_eq!(two.cpu_on(2, ENTRY, 0), Err(PsciError::InvalidParameters));
    assert_eq!(two.enter(2), None);
    assert_eq!(two.enter(usize::MAX), None);
    // An out-of-range caller of CPU_OFF changes nothing (the caller is the VMM's, not the guest's).
    assert_eq!(call(fid(psci::CPU_OFF), 0, 0, 0, 7, &two, RAM), PsciAction::CpuOff);
    assert_eq!(two.state(0), Some(PowerState::On));
}

/// Callers on their own threads race CPU_ON for one target, round after round, while the
/// target's thread enters and turns itself off again and an observer reads AFFINITY_INFO:
/// exactly one caller wins each round, the target starts with the winner's arguments, and the
/// observer never reads anything but ON, OFF or ON_PENDING.
#[test]
fn racing_cpu_on_has_one_winner_per_round() {
    const CALLERS: usize = 4;
    const ROUNDS: usize = 2000;
    const TARGET: usize = CALLERS;
    let p = Arc::new(VcpuPowerStates::new(CALLERS + 1).unwrap());
    for v in 1..CALLERS {
        p.cpu_on(v, ENTRY, 0).unwrap();
        p.enter(v).unwrap();
    }
    let start = Arc::new(Barrier::new(CALLERS + 1));
    let done = Arc::new(Barrier::new(CALLERS + 1));
    let winners = Arc::new(AtomicUsize::new(0));
    let winner_entry = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));

    let observer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = [0usize; 3];
            while stop.load(StdOrdering::Relaxed) == 0 {
                match query(fid(psci::AFFINITY_INFO_64), TARGET as u64, 0, 0, &p, RAM) {
                    Some(v @ 0..=2) => seen[v as usize] += 1,
                    other => panic!("AFFINITY_INFO returned {other:?}"),
                }
            }
            seen
        })
    };
    let callers: Vec<_> = (0..CALLERS)
        .map(|me| {
            let (p, start, done, winners, winner_entry) =
                (p.clone(), start.clone(), done.clone(), winners.clone(), winner_entry.clone());
            std::thread::spawn(move || {
                let entry = ENTRY + 4 * me as u64;
                for _ in 0..ROUNDS {
                    start.wait();
                    match call(fid(psci::CPU_ON_64), TARGET as u64, entry, me as u64, me, &p, RAM) {
                        PsciAction::CpuOn { vcpu, .. } => {
                            assert_eq!(vcpu, TARGET);
                            winners.fetch_add(1, StdOrdering::Relaxed);
                            winner_entry.store(entry as usize, StdOrdering::Relaxed);
                        }
                        PsciAction::Return(r) => assert!(r == ON_PENDING || r == ALREADY_ON, "{r:#x}"),
                        other => panic!("{other:?}"),
                    }
                    done.wait();
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        start.wait();
        // The target's CPU: waits for a request, then enters the guest.
        let request = loop {
            if let Some(r) = p.enter(TARGET) {
                break r;
            }
            std::hint::spin_loop();
        };
        done.wait();
        assert_eq!(winners.swap(0, StdOrdering::Relaxed), 1, "round {round}");
        assert_eq!(request.entry, winner_entry.load(StdOrdering::Relaxed) as u64, "round {round}");
        assert_eq!(request.context, (request.entry - ENTRY) / 4, "round {round}: the winner's context");
        assert!(p.cpu_off(TARGET));
    }
    for c in callers {
        c.join().unwrap();
    }
    stop.store(1, StdOrdering::Relaxed);
    let seen = observer.join().unwrap();
    assert!(seen.iter().sum::<usize>() > 0);
}
