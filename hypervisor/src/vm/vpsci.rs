//! PSCI as a guest sees it (through HVC, or a trapped SMC): the answer to each call, given the
//! guest's vCPUs. It decides; the vCPU code carries out what needs the machine (stopping,
//! resetting, starting a vCPU).

use crate::psci::{self, PsciError};

/// What a PSCI call asks of the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciAction {
    /// Return this value in x0 and resume the guest.
    Return(u64),
    /// Start vCPU `vcpu` at `entry` with x0 = `context`.
    CpuOn {
        vcpu: usize,
        entry: u64,
        context: u64,
    },
    /// Stop the calling vCPU.
    CpuOff,
    SystemOff,
    SystemReset,
}

const CPU_ON_32: u32 = 0x8400_0003;
const AFFINITY_INFO_32: u32 = 0x8400_0004;
/// PSCI 1.0.
const VERSION_1_0: u64 = 0x0001_0000;
const AFFINITY_ON: u64 = 0;
const AFFINITY_OFF: u64 = 1;

fn err(e: PsciError) -> PsciAction {
    PsciAction::Return(e.code() as u64)
}

/// The vCPU a target MPIDR names: Aff0 is the vCPU index, higher affinity fields are zero.
fn vcpu_of(mpidr: u64, vcpus: usize) -> Option<usize> {
    let idx = (mpidr & 0xff) as usize;
    (mpidr & 0xff_00ff_ff00 == 0 && idx < vcpus).then_some(idx)
}

/// Answers PSCI call `fid` (x0) with arguments x1-x3 from vCPU `caller` of a guest whose vCPUs
/// are on where `online[i]` is true.
pub fn handle(fid: u64, x1: u64, x2: u64, x3: u64, caller: usize, online: &[bool]) -> PsciAction {
    // SMC32 calls carry their arguments in w registers.
    let fid = fid as u32;
    match fid {
        psci::PSCI_VERSION => PsciAction::Return(VERSION_1_0),
        psci::PSCI_FEATURES => match x1 as u32 {
            psci::PSCI_VERSION
            | psci::PSCI_FEATURES
            | psci::CPU_OFF
            | psci::CPU_ON_64
            | CPU_ON_32
            | psci::AFFINITY_INFO_64
            | AFFINITY_INFO_32
            | psci::SYSTEM_OFF
            | psci::SYSTEM_RESET => PsciAction::Return(0),
            _ => err(PsciError::NotSupported),
        },
        psci::CPU_ON_64 | CPU_ON_32 => {
            let (target, entry, context) = if fid == CPU_ON_32 {
                (x1 & 0xffff_ffff, x2 & 0xffff_ffff, x3 & 0xffff_ffff)
            } else {
                (x1, x2, x3)
            };
            match vcpu_of(target, online.len()) {
                None => err(PsciError::InvalidParameters),
                Some(v) if online.get(v) == Some(&true) || v == caller => err(PsciError::AlreadyOn),
                Some(vcpu) => PsciAction::CpuOn { vcpu, entry, context },
            }
        }
        psci::CPU_OFF => PsciAction::CpuOff,
        psci::AFFINITY_INFO_64 | AFFINITY_INFO_32 => {
            if x2 != 0 {
                return err(PsciError::InvalidParameters);
            }
            match vcpu_of(x1, online.len()) {
                None => err(PsciError::InvalidParameters),
                Some(v) if online.get(v) == Some(&true) => PsciAction::Return(AFFINITY_ON),
                Some(_) => PsciAction::Return(AFFINITY_OFF),
            }
        }
        psci::SYSTEM_OFF => PsciAction::SystemOff,
        psci::SYSTEM_RESET => PsciAction::SystemReset,
        _ => err(PsciError::NotSupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_SUPPORTED: u64 = -1i64 as u64;
    const INVALID: u64 = -2i64 as u64;
    const ALREADY_ON: u64 = -4i64 as u64;

    #[test]
    fn version_and_features() {
        assert_eq!(handle(0x8400_0000, 0, 0, 0, 0, &[true]), PsciAction::Return(0x1_0000));
        assert_eq!(handle(0x8400_000a, 0x8400_0008, 0, 0, 0, &[true]), PsciAction::Return(0));
        assert_eq!(handle(0x8400_000a, 0xdead, 0, 0, 0, &[true]), PsciAction::Return(NOT_SUPPORTED));
    }

    /// SMCCC 1.0 semantics, on purpose: SMCCC_VERSION and SMCCC_ARCH_FEATURES are not
    /// supported, and neither is asking PSCI_FEATURES about them, so Linux assumes SMCCC 1.0
    /// ("SMC Calling Convention v1.0") and never probes the Spectre workaround calls.
    #[test]
    fn smccc_discovery_is_not_supported() {
        for fid in [0x8000_0000u64, 0x8000_0001, 0x8000_7fff, 0x8600_ff01] {
            assert_eq!(
                handle(fid, 0x8000_8000, 0, 0, 0, &[true]),
                PsciAction::Return(NOT_SUPPORTED),
                "{fid:#x}"
            );
        }
        assert_eq!(handle(0x8400_000a, 0x8000_0000, 0, 0, 0, &[true]), PsciAction::Return(NOT_SUPPORTED));
    }

    #[test]
    fn wild_function_ids_are_not_supported() {
        for fid in [0, 0xdead_beef, 0xc400_0005, 0x8600_0000, u64::MAX] {
            assert_eq!(handle(fid, 1, 2, 3, 0, &[true]), PsciAction::Return(NOT_SUPPORTED), "{fid:#x}");
        }
    }

    #[test]
    fn cpu_on_only_for_the_guests_own_offline_vcpus() {
        let online = [true, false];
        assert_eq!(
            handle(0xc400_0003, 1, 0x4008_0000, 7, 0, &online),
            PsciAction::CpuOn { vcpu: 1, entry: 0x4008_0000, context: 7 }
        );
        assert_eq!(handle(0xc400_0003, 0, 0, 0, 0, &online), PsciAction::Return(ALREADY_ON));
        assert_eq!(handle(0xc400_0003, 2, 0, 0, 0, &online), PsciAction::Return(INVALID));
        assert_eq!(handle(0xc400_0003, 0x100, 0, 0, 0, &online), PsciAction::Return(INVALID));
        // SMC32 form truncates its arguments.
        assert_eq!(
            handle(0x8400_0003, 0xffff_ffff_0000_0001, 0x1_4008_0000, 0, 0, &online),
            PsciAction::CpuOn { vcpu: 1, entry: 0x4008_0000, context: 0 }
        );
    }

    #[test]
    fn affinity_info_and_power() {
        assert_eq!(handle(0xc400_0004, 0, 0, 0, 0, &[true, false]), PsciAction::Return(0));
        assert_eq!(handle(0xc400_0004, 1, 0, 0, 0, &[true, false]), PsciAction::Return(1));
        assert_eq!(handle(0xc400_0004, 5, 0, 0, 0, &[true]), PsciAction::Return(INVALID));
        assert_eq!(handle(0x8400_0008, 0, 0, 0, 0, &[true]), PsciAction::SystemOff);
        assert_eq!(handle(0x8400_0009, 0, 0, 0, 0, &[true]), PsciAction::SystemReset);
        assert_eq!(handle(0x8400_0002, 0, 0, 0, 0, &[true]), PsciAction::CpuOff);
    }
}
