//! Model checks (loom) of the vCPU power states: two vCPUs racing `CPU_ON` for the same target
//! while the target's CPU tries to enter the guest, and `CPU_OFF` racing `CPU_ON`. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p labyrinth --lib vm::vpsci::loom`.

use loom::sync::Arc;
use loom::thread;

use super::*;

const RAM: Range<u64> = 0x4000_0000..0x4400_0000;
const ENTRY_A: u64 = 0x4008_0000;
const ENTRY_B: u64 = 0x4010_0000;
const TARGET: usize = 2;

fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

fn cpu_on(p: &VcpuPowerStates, caller: usize, entry: u64) -> PsciAction {
    call(u64::from(psci::CPU_ON_64), TARGET as u64, entry, entry + 1, caller, p, RAM)
}

fn affinity_info(p: &VcpuPowerStates) -> u64 {
    query(u64::from(psci::AFFINITY_INFO_64), TARGET as u64, 0, 0, p, RAM).unwrap()
}

/// Where a state may be seen after another: Off, then OnPending, then On, never back.
fn rank(affinity: u64) -> u32 {
    match affinity {
        AFFINITY_OFF => 0,
        AFFINITY_ON_PENDING => 1,
        AFFINITY_ON => 2,
        other => panic!("AFFINITY_INFO returned {other:#x}"),
    }
}

/// vCPUs 0 and 1 both call CPU_ON for vCPU 2 while vCPU 2's CPU tries once to enter and reads
/// AFFINITY_INFO around it: exactly one caller wins, the other is told ON_PENDING or ALREADY_ON,
/// the target starts with the winner's entry and context (never a half-written request), and
/// AFFINITY_INFO only ever moves forward.
#[test]
fn two_vcpus_race_cpu_on_for_one_target() {
    check(|| {
        let p = Arc::new(VcpuPowerStates::new(3).unwrap());
        let racer = |caller: usize, entry: u64| {
            let p = p.clone();
            thread::spawn(move || cpu_on(&p, caller, entry))
        };
        let a = racer(0, ENTRY_A);
        let b = racer(1, ENTRY_B);

        let first = affinity_info(&p);
        let entered = p.enter(TARGET);
        let second = affinity_info(&p);
        assert!(rank(first) <= rank(second), "AFFINITY_INFO went from {first} back to {second}");
        if entered.is_some() {
            assert_eq!(second, AFFINITY_ON);
        }

        let results = [a.join().unwrap(), b.join().unwrap()];
        let wins: Vec<_> = results.iter().filter(|r| matches!(r, PsciAction::CpuOn { .. })).collect();
        assert_eq!(wins.len(), 1, "{results:?}");
        let PsciAction::CpuOn { vcpu, entry, context } = *wins[0] else { unreachable!() };
        assert_eq!(vcpu, TARGET);
        for r in &results {
            if let PsciAction::Return(code) = *r {
                assert!(
                    code == super::code(PsciError::OnPending) || code == super::code(PsciError::AlreadyOn)
                );
            }
        }
        // Whether the target entered during the race or enters now, it gets the winner's request.
        let request = entered.or_else(|| p.enter(TARGET)).expect("the winner's request is published");
        assert_eq!(request, StartRequest { entry, context });
        assert_eq!(p.state(TARGET), Some(PowerState::On));
    });
}

/// vCPU 2 (On) calls CPU_OFF while vCPU 0 calls CPU_ON for it: either CPU_ON came first and
/// is told ALREADY_ON (vCPU 2 ends Off), or it came after and wins (vCPU 2 ends OnPending).
#[test]
fn cpu_off_races_cpu_on() {
    check(|| {
        let p = Arc::new(VcpuPowerStates::new(3).unwrap());
        p.cpu_on(TARGET, ENTRY_A, 0).unwrap();
        p.enter(TARGET).unwrap();
        let off = {
            let p = p.clone();
            thread::spawn(move || call(u64::from(psci::CPU_OFF), 0, 0, 0, TARGET, &p, RAM))
        };
        let on = cpu_on(&p, 0, ENTRY_B);
        assert_eq!(off.join().unwrap(), PsciAction::CpuOff);
        match on {
            PsciAction::Return(code) => {
                assert_eq!(code, super::code(PsciError::AlreadyOn));
                assert_eq!(p.state(TARGET), Some(PowerState::Off));
            }
            PsciAction::CpuOn { entry, .. } => {
                assert_eq!(entry, ENTRY_B);
                assert_eq!(p.state(TARGET), Some(PowerState::OnPending));
                assert_eq!(p.enter(TARGET).map(|r| r.entry), Some(ENTRY_B));
            }
            other => panic!("{other:?}"),
        }
    });
}
