//! The Power State Coordination Interface (Arm DEN 0022): function identifiers, return codes and
//! the conduit. Labyrinth calls PSCI firmware through this, and (later) emulates it for guests.
//! It performs no call itself: the arch code owns the `smc`/`hvc` instruction.

/// How PSCI calls reach the firmware, per the device tree's `/psci` `method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

// Function identifiers (SMCCC fast calls). `_64` ones are SMC64, the rest SMC32; PSCI defines
// both forms for the calls that carry an address or an MPIDR.
pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON_32: u32 = 0x8400_0003;
pub const CPU_ON_64: u32 = 0xc400_0003;
pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
pub const MIGRATE_32: u32 = 0x8400_0005;
pub const MIGRATE_64: u32 = 0xc400_0005;
pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
pub const MIGRATE_INFO_UP_CPU_32: u32 = 0x8400_0007;
pub const MIGRATE_INFO_UP_CPU_64: u32 = 0xc400_0007;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000a;
pub const SYSTEM_SUSPEND_32: u32 = 0x8400_000e;
pub const SYSTEM_SUSPEND_64: u32 = 0xc400_000e;

/// PSCI return codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciError {
    NotSupported,
    InvalidParameters,
    Denied,
    AlreadyOn,
    OnPending,
    InternalFailure,
    NotPresent,
    Disabled,
    InvalidAddress,
    /// A value the specification does not define.
    Unknown(i64),
}

impl PsciError {
    pub fn code(self) -> i64 {
        match self {
            PsciError::NotSupported => -1,
            PsciError::InvalidParameters => -2,
            PsciError::Denied => -3,
            PsciError::AlreadyOn => -4,
            PsciError::OnPending => -5,
            PsciError::InternalFailure => -6,
            PsciError::NotPresent => -7,
            PsciError::Disabled => -8,
            PsciError::InvalidAddress => -9,
            PsciError::Unknown(c) => c,
        }
    }
}

/// Interprets a PSCI call's x0: non-negative is success (the value), negative an error.
pub fn result(x0: u64) -> Result<u64, PsciError> {
    let v = x0 as i64;
    if v >= 0 {
        return Ok(x0);
    }
    Err(match v {
        -1 => PsciError::NotSupported,
        -2 => PsciError::InvalidParameters,
        -3 => PsciError::Denied,
        -4 => PsciError::AlreadyOn,
        -5 => PsciError::OnPending,
        -6 => PsciError::InternalFailure,
        -7 => PsciError::NotPresent,
        -8 => PsciError::Disabled,
        -9 => PsciError::InvalidAddress,
        c => PsciError::Unknown(c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_values_are_named_errors_and_round_trip() {
        for code in -9i64..=-1 {
            let e = result(code as u64).unwrap_err();
            assert_eq!(e.code(), code);
            assert!(!matches!(e, PsciError::Unknown(_)));
        }
        assert_eq!(result(-42i64 as u64), Err(PsciError::Unknown(-42)));
    }

    #[test]
    fn non_negative_values_are_success() {
        assert_eq!(result(0), Ok(0));
        assert_eq!(result(0x1_0002), Ok(0x1_0002));
    }
}
