//! PSCI 1.0 (Arm DEN 0022) as a guest sees it, through HVC or a trapped SMC: the decoding of
//! each call, its answer, and the power state of the guest's vCPUs ([`VcpuPowerStates`]).
//!
//! The vCPUs of one guest run on their own physical CPUs at the same time and share one
//! [`VcpuPowerStates`]; every transition is a single atomic operation on the target's state, so
//! two vCPUs racing `CPU_ON` for the same target cannot both win, and `AFFINITY_INFO` reads a
//! state that really was. This module decides; the vCPU code carries out what needs the machine
//! (starting, stopping, resetting a vCPU) from the [`PsciAction`] it returns. It never blocks,
//! takes a lock or allocates, and no argument a guest passes can make it panic.
//! docs/guests.md ("PSCI") has the calls, the errors and the state machine.

use core::ops::Range;

#[cfg(not(all(loom, test)))]
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
#[cfg(all(loom, test))]
use loom::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::dt::MAX_VCPUS;
use crate::psci::{self, PsciError};

/// What a PSCI call asks of the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciAction {
    /// Return this value in x0 and resume the guest.
    Return(u64),
    /// vCPU `vcpu` was Off and is now OnPending: start its CPU, which takes `entry` and
    /// `context` from [`VcpuPowerStates::enter`]; the caller gets SUCCESS (0).
    CpuOn {
        vcpu: usize,
        entry: u64,
        context: u64,
    },
    /// The calling vCPU is now Off: it leaves the guest and waits to be started again.
    CpuOff,
    SystemOff,
    SystemReset,
}

/// A vCPU's power state, as `AFFINITY_INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    Off,
    /// A `CPU_ON` won; the vCPU has not entered the guest yet.
    OnPending,
    On,
}

impl PowerState {
    /// The `AFFINITY_INFO` return value.
    pub fn affinity_info(self) -> u64 {
        match self {
            PowerState::On => AFFINITY_ON,
            PowerState::Off => AFFINITY_OFF,
            PowerState::OnPending => AFFINITY_ON_PENDING,
        }
    }
}

const AFFINITY_ON: u64 = 0;
const AFFINITY_OFF: u64 = 1;
const AFFINITY_ON_PENDING: u64 = 2;
/// PSCI 1.0.
const VERSION_1_0: u64 = 0x0001_0000;
/// `MIGRATE_INFO_TYPE`: no Trusted OS that needs migrating.
const NO_TRUSTED_OS: u64 = 2;
/// `PSCI_FEATURES(CPU_SUSPEND)` flags: the original power_state format, platform-coordinated.
const CPU_SUSPEND_FEATURES: u64 = 0;
const SUCCESS: u64 = 0;

/// MPIDR Aff0, the vCPU index; every other bit of a target MPIDR must be zero.
const MPIDR_AFF0: u64 = 0xff;
/// power_state (original format): StateID [15:0], StateType [16], PowerLevel [25:24]; the
/// other bits are reserved, zero.
const POWER_STATE_VALID: u32 = 0x0301_ffff;
const POWER_STATE_POWERDOWN: u32 = 1 << 16;

// A vCPU's state word. OnPending is two values: CLAIMED while the CPU_ON winner writes the
// entry point and context, PENDING once they are published for the target.
const OFF: u8 = 0;
const CLAIMED: u8 = 1;
const PENDING: u8 = 2;
const ON: u8 = 3;

/// A PSCI call, decoded from x0-x3; SMC32 arguments are truncated to their w registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciCall {
    Version,
    Features {
        fid: u32,
    },
    CpuSuspend {
        power_state: u32,
        entry: u64,
        context: u64,
    },
    CpuOff,
    CpuOn {
        target: u64,
        entry: u64,
        context: u64,
    },
    AffinityInfo {
        target: u64,
        level: u32,
    },
    MigrateInfoType,
    SystemOff,
    SystemReset,
    /// Any function ID Labyrinth does not implement (other PSCI calls, SMCCC discovery, junk).
    NotSupported,
}

impl PsciCall {
    pub fn decode(x0: u64, x1: u64, x2: u64, x3: u64) -> PsciCall {
        let w = |x: u64| x & 0xffff_ffff;
        // The function ID is w0 in both calling conventions.
        match x0 as u32 {
            psci::PSCI_VERSION => PsciCall::Version,
            psci::PSCI_FEATURES => PsciCall::Features { fid: x1 as u32 },
            psci::CPU_SUSPEND_32 => {
                PsciCall::CpuSuspend { power_state: x1 as u32, entry: w(x2), context: w(x3) }
            }
            psci::CPU_SUSPEND_64 => PsciCall::CpuSuspend { power_state: x1 as u32, entry: x2, context: x3 },
            psci::CPU_OFF => PsciCall::CpuOff,
            psci::CPU_ON_32 => PsciCall::CpuOn { target: w(x1), entry: w(x2), context: w(x3) },
            psci::CPU_ON_64 => PsciCall::CpuOn { target: x1, entry: x2, context: x3 },
            psci::AFFINITY_INFO_32 => PsciCall::AffinityInfo { target: w(x1), level: x2 as u32 },
            psci::AFFINITY_INFO_64 => PsciCall::AffinityInfo { target: x1, level: x2 as u32 },
            psci::MIGRATE_INFO_TYPE => PsciCall::MigrateInfoType,
            psci::SYSTEM_OFF => PsciCall::SystemOff,
            psci::SYSTEM_RESET => PsciCall::SystemReset,
            _ => PsciCall::NotSupported,
        }
    }
}

/// The calls `PSCI_FEATURES` reports: exactly those [`PsciCall::decode`] implements.
fn implemented(fid: u32) -> bool {
    PsciCall::decode(u64::from(fid), 0, 0, 0) != PsciCall::NotSupported
}

fn code(e: PsciError) -> u64 {
    e.code() as u64
}

/// The vCPU a target MPIDR names: Aff0 is the vCPU index, every other bit zero.
fn vcpu_of(mpidr: u64, vcpus: usize) -> Option<usize> {
    let vcpu = (mpidr & MPIDR_AFF0) as usize;
    (mpidr & !MPIDR_AFF0 == 0 && vcpu < vcpus).then_some(vcpu)
}

/// An entry point a vCPU can start at: an aligned instruction inside guest RAM.
fn entry_ok(entry: u64, ram: &Range<u64>) -> bool {
    entry.is_multiple_of(4) && ram.contains(&entry)
}

/// Where a call reads the vCPUs' power states from.
trait PowerView {
    fn vcpus(&self) -> usize;
    fn state(&self, vcpu: usize) -> Option<PowerState>;
}

/// The answer to a call whose whole effect is its return value; `None` for those that change
/// a state (a `CPU_ON` whose target is Off, `CPU_OFF`, `SYSTEM_OFF`, `SYSTEM_RESET`).
fn answer(call: &PsciCall, power: &(impl PowerView + ?Sized), ram: &Range<u64>) -> Option<u64> {
    Some(match *call {
        PsciCall::Version => VERSION_1_0,
        PsciCall::Features { fid } if fid == psci::CPU_SUSPEND_32 || fid == psci::CPU_SUSPEND_64 => {
            CPU_SUSPEND_FEATURES
        }
        PsciCall::Features { fid } if implemented(fid) => SUCCESS,
        PsciCall::Features { .. } => code(PsciError::NotSupported),
        PsciCall::CpuSuspend { power_state, entry, .. } => {
            if power_state & !POWER_STATE_VALID != 0 {
                code(PsciError::InvalidParameters)
            } else if power_state & POWER_STATE_POWERDOWN != 0 && !entry_ok(entry, ram) {
                code(PsciError::InvalidAddress)
            } else {
                // Every state is entered as a standby that a wake-up event has already ended:
                // the vCPU owns its CPU, so there is nothing to give back while it waits.
                SUCCESS
            }
        }
        PsciCall::CpuOn { target, entry, .. } => {
            let Some(vcpu) = vcpu_of(target, power.vcpus()) else {
                return Some(code(PsciError::InvalidParameters));
            };
            if !entry_ok(entry, ram) {
                return Some(code(PsciError::InvalidAddress));
            }
            match power.state(vcpu)? {
                PowerState::On => code(PsciError::AlreadyOn),
                PowerState::OnPending => code(PsciError::OnPending),
                PowerState::Off => return None,
            }
        }
        PsciCall::AffinityInfo { target, level } => {
            // Affinity levels above 0 are optional from PSCI 1.0; every vCPU is its own node.
            match vcpu_of(target, power.vcpus()).filter(|_| level == 0).and_then(|v| power.state(v)) {
                Some(state) => state.affinity_info(),
                None => code(PsciError::InvalidParameters),
            }
        }
        PsciCall::MigrateInfoType => NO_TRUSTED_OS,
        PsciCall::NotSupported => code(PsciError::NotSupported),
        PsciCall::CpuOff | PsciCall::SystemOff | PsciCall::SystemReset => return None,
    })
}

/// The fast path: answers call `fid` (x0) with arguments x1-x3 when its whole effect is the
/// return value (VERSION, FEATURES, AFFINITY_INFO, CPU_SUSPEND, MIGRATE_INFO_TYPE, every
/// error, unknown calls but Labyrinth's own); `None` sends it to [`call`]. Reads only; `ram` is guest RAM's IPAs.
#[inline]
pub fn query(fid: u64, x1: u64, x2: u64, x3: u64, power: &VcpuPowerStates, ram: Range<u64>) -> Option<u64> {
    match PsciCall::decode(fid, x1, x2, x3) {
        // Labyrinth's own calls are not PSCI's to refuse.
        PsciCall::NotSupported if super::hypercall::is_ours(fid) => None,
        call => answer(&call, power, &ram),
    }
}

/// Carries out call `fid` (x0) with arguments x1-x3 from vCPU `caller`: the state changes happen
/// here (a `CPU_ON` claims its target by compare-and-swap, `CPU_OFF` turns the caller Off);
/// what needs the machine is the returned action. `ram` is guest RAM's IPAs.
pub fn call(
    fid: u64,
    x1: u64,
    x2: u64,
    x3: u64,
    caller: usize,
    power: &VcpuPowerStates,
    ram: Range<u64>,
) -> PsciAction {
    let call = PsciCall::decode(fid, x1, x2, x3);
    if let Some(v) = answer(&call, power, &ram) {
        return PsciAction::Return(v);
    }
    match call {
        PsciCall::CpuOn { target, entry, context } => {
            let Some(vcpu) = vcpu_of(target, power.vcpus()) else {
                return PsciAction::Return(code(PsciError::InvalidParameters));
            };
            // The target was Off when `answer` looked; the CAS decides whether it still is.
            match power.cpu_on(vcpu, entry, context) {
                Ok(()) => PsciAction::CpuOn { vcpu, entry, context },
                Err(e) => PsciAction::Return(code(e)),
            }
        }
        PsciCall::CpuOff => {
            power.cpu_off(caller);
            PsciAction::CpuOff
        }
        PsciCall::SystemOff => PsciAction::SystemOff,
        PsciCall::SystemReset => PsciAction::SystemReset,
        _ => PsciAction::Return(code(PsciError::NotSupported)),
    }
}

/// Where a started vCPU begins: the `CPU_ON` arguments of the call that won.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartRequest {
    pub entry: u64,
    /// Goes to the vCPU's x0.
    pub context: u64,
}

struct Slot {
    state: AtomicU8,
    // Written only by the CPU_ON winner between CLAIMED and PENDING, read only by the target
    // after it moved PENDING to ON: never two writers, never a reader during a write.
    entry: AtomicU64,
    context: AtomicU64,
}

/// The power state of each vCPU of one guest (Off, OnPending, On), shared by its vCPUs.
///
/// Transitions: `CPU_ON` moves Off to OnPending by compare-and-swap (one winner), the target's
/// CPU moves OnPending to On as it enters the guest ([`enter`](Self::enter)), `CPU_OFF` moves
/// the caller from On to Off, and [`reset`](Self::reset) puts vCPU 0 On and the others Off.
pub struct VcpuPowerStates {
    vcpus: usize,
    slots: [Slot; MAX_VCPUS],
}

impl VcpuPowerStates {
    /// `vcpus` vCPUs (1 to [`MAX_VCPUS`]), vCPU 0 On and the others Off, as at boot.
    pub fn new(vcpus: usize) -> Option<VcpuPowerStates> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return None;
        }
        let slots = core::array::from_fn(|i| Slot {
            state: AtomicU8::new(if i == 0 { ON } else { OFF }),
            entry: AtomicU64::new(0),
            context: AtomicU64::new(0),
        });
        Some(VcpuPowerStates { vcpus, slots })
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn slot(&self, vcpu: usize) -> Option<&Slot> {
        self.slots.get(..self.vcpus)?.get(vcpu)
    }

    /// vCPU `vcpu`'s state, `None` past the last vCPU.
    pub fn state(&self, vcpu: usize) -> Option<PowerState> {
        Some(match self.slot(vcpu)?.state.load(Ordering::Acquire) {
            OFF => PowerState::Off,
            ON => PowerState::On,
            _ => PowerState::OnPending,
        })
    }

    /// Claims vCPU `vcpu` for a start at `entry` with x0 = `context`: Off becomes OnPending for
    /// exactly one caller; the others get `AlreadyOn` or `OnPending` (`InvalidParameters` past
    /// the last vCPU). Checks no address: [`call`] does.
    pub fn cpu_on(&self, vcpu: usize, entry: u64, context: u64) -> Result<(), PsciError> {
        let slot = self.slot(vcpu).ok_or(PsciError::InvalidParameters)?;
        match slot.state.compare_exchange(OFF, CLAIMED, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => {
                slot.entry.store(entry, Ordering::Relaxed);
                slot.context.store(context, Ordering::Relaxed);
                // Publishes the request: `enter` acquires it.
                slot.state.store(PENDING, Ordering::Release);
                Ok(())
            }
            Err(ON) => Err(PsciError::AlreadyOn),
            Err(_) => Err(PsciError::OnPending),
        }
    }

    /// vCPU `vcpu`'s CPU enters the guest: OnPending becomes On and the request is returned,
    /// once per `CPU_ON`. `None` when no request is published for it (yet).
    pub fn enter(&self, vcpu: usize) -> Option<StartRequest> {
        let slot = self.slot(vcpu)?;
        slot.state.compare_exchange(PENDING, ON, Ordering::Acquire, Ordering::Relaxed).ok()?;
        Some(StartRequest {
            entry: slot.entry.load(Ordering::Relaxed),
            context: slot.context.load(Ordering::Relaxed),
        })
    }

    /// `CPU_OFF` by vCPU `vcpu`: On becomes Off. False (and nothing changes) if it was not On.
    pub fn cpu_off(&self, vcpu: usize) -> bool {
        self.slot(vcpu)
            .is_some_and(|s| s.state.compare_exchange(ON, OFF, Ordering::Release, Ordering::Relaxed).is_ok())
    }

    /// True when no vCPU is On or OnPending: nothing of the guest runs or can be started.
    pub fn all_off(&self) -> bool {
        (0..self.vcpus).all(|v| self.state(v) == Some(PowerState::Off))
    }

    /// After a system reset: vCPU 0 On, every other vCPU Off. Only while no other vCPU of the
    /// guest runs (they were brought out of the guest first), so no `CPU_ON` is half-done.
    pub fn reset(&self) {
        for (i, slot) in self.slots.iter().enumerate().take(self.vcpus) {
            slot.state.store(if i == 0 { ON } else { OFF }, Ordering::Release);
        }
    }
}

impl PowerView for VcpuPowerStates {
    fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn state(&self, vcpu: usize) -> Option<PowerState> {
        VcpuPowerStates::state(self, vcpu)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
