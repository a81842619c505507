//! Decoding of the Exception Syndrome Register (`ESR_ELx`): exception class by name and the
//! fields an exception report needs. Pure functions over the raw value; it reads no register.

use tock_registers::{register_bitfields, LocalRegisterCopy};

register_bitfields! {u64,
    pub ESR [
        /// Instruction-specific syndrome.
        ISS OFFSET(0) NUMBITS(25) [],
        /// Instruction length: 1 = 32-bit instruction.
        IL OFFSET(25) NUMBITS(1) [],
        /// Exception class.
        EC OFFSET(26) NUMBITS(6) []
    ]
}

register_bitfields! {u64,
    /// The ISS of an abort (EC 0x20, 0x21, 0x24, 0x25) as far as Labyrinth reads it; the fields
    /// from WnR up describe data aborts only.
    pub ABORT_ISS [
        /// The fault status code (DFSC/IFSC).
        FSC OFFSET(0) NUMBITS(6) [],
        /// Write not read.
        WNR OFFSET(6) NUMBITS(1) [],
        /// FAR is not valid.
        FNV OFFSET(10) NUMBITS(1) [],
        /// The register is 64-bit (else 32-bit).
        SF OFFSET(15) NUMBITS(1) [],
        /// The general-purpose register transferred.
        SRT OFFSET(16) NUMBITS(5) [],
        /// A load sign-extends.
        SSE OFFSET(21) NUMBITS(1) [],
        /// Access size: 1 << SAS bytes.
        SAS OFFSET(22) NUMBITS(2) [],
        /// SAS, SSE, SRT, SF and AR describe the access.
        ISV OFFSET(24) NUMBITS(1) []
    ],
    /// `HPFAR_EL2` as far as Labyrinth reads it (IPAs of up to 52 bits).
    pub HPFAR [
        /// The faulting IPA's bits 51:12.
        FIPA OFFSET(4) NUMBITS(40) []
    ]
}

register_bitfields! {u32,
    /// The ISS of a trapped MSR, MRS or system instruction (EC 0x18).
    pub SYSREG_ISS [
        /// 1: a read (MRS), 0: a write (MSR) or a system instruction.
        READ OFFSET(0) NUMBITS(1) [],
        CRM OFFSET(1) NUMBITS(4) [],
        /// The general-purpose register.
        RT OFFSET(5) NUMBITS(5) [],
        CRN OFFSET(10) NUMBITS(4) [],
        OP1 OFFSET(14) NUMBITS(3) [],
        OP2 OFFSET(17) NUMBITS(3) [],
        OP0 OFFSET(20) NUMBITS(2) []
    ]
}

/// A syndrome value with accessors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syndrome(pub u64);

impl Syndrome {
    fn reg(self) -> LocalRegisterCopy<u64, ESR::Register> {
        LocalRegisterCopy::new(self.0)
    }
    pub fn class(self) -> u8 {
        self.reg().read(ESR::EC) as u8
    }
    pub fn iss(self) -> u32 {
        self.reg().read(ESR::ISS) as u32
    }
    pub fn is_32bit_instruction(self) -> bool {
        self.reg().is_set(ESR::IL)
    }
    /// The exception class's name, as the Arm ARM calls it.
    pub fn class_name(self) -> &'static str {
        class_name(self.class())
    }
    /// For aborts: the fault status code (DFSC/IFSC) named.
    pub fn fault_status_name(self) -> Option<&'static str> {
        matches!(self.class(), 0x20 | 0x21 | 0x24 | 0x25).then(|| fault_status_name(self.iss() & 0x3f))
    }
}

/// Names of the exception classes (`ESR_ELx.EC`).
pub fn class_name(ec: u8) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x01 => "trapped WFI/WFE",
        0x03 => "trapped MCR/MRC (CP15)",
        0x04 => "trapped MCRR/MRRC (CP15)",
        0x05 => "trapped MCR/MRC (CP14)",
        0x06 => "trapped LDC/STC",
        0x07 => "trapped SVE/SIMD/FP access",
        0x0c => "trapped MRRC (CP14)",
        0x0d => "branch target exception",
        0x0e => "illegal execution state",
        0x11 => "SVC (AArch32)",
        0x12 => "HVC (AArch32)",
        0x13 => "SMC (AArch32)",
        0x15 => "SVC (AArch64)",
        0x16 => "HVC (AArch64)",
        0x17 => "SMC (AArch64)",
        0x18 => "trapped MSR/MRS/system instruction",
        0x19 => "trapped SVE access",
        0x1c => "pointer authentication failure",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort from the same EL",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort from the same EL",
        0x26 => "SP alignment fault",
        0x28 => "trapped FP exception (AArch32)",
        0x2c => "trapped FP exception (AArch64)",
        0x2f => "SError interrupt",
        0x30 => "breakpoint from a lower EL",
        0x31 => "breakpoint from the same EL",
        0x32 => "software step from a lower EL",
        0x33 => "software step from the same EL",
        0x34 => "watchpoint from a lower EL",
        0x35 => "watchpoint from the same EL",
        0x38 => "BKPT (AArch32)",
        0x3c => "BRK (AArch64)",
        _ => "reserved exception class",
    }
}

/// Names of the data/instruction fault status codes (DFSC/IFSC).
pub fn fault_status_name(fsc: u32) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x08..=0x0b => "access flag fault",
        0x0c..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x11 => "synchronous tag check fault",
        0x14..=0x17 => "synchronous external abort on table walk",
        0x18 => "synchronous parity/ECC error",
        0x1c..=0x1f => "synchronous parity/ECC error on table walk",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        0x31 => "unsupported atomic hardware update",
        _ => "reserved fault status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_same_el_data_abort() {
        // EC 0x25, IL, DFSC 0x07 (level-3 translation fault).
        let s = Syndrome((0x25 << 26) | (1 << 25) | 0x07);
        assert_eq!(s.class(), 0x25);
        assert_eq!(s.class_name(), "data abort from the same EL");
        assert!(s.is_32bit_instruction());
        assert_eq!(s.fault_status_name(), Some("translation fault"));
    }

    #[test]
    fn names_hvc_and_smc_and_has_no_fault_status_for_them() {
        let hvc = Syndrome(0x16 << 26);
        assert_eq!(hvc.class_name(), "HVC (AArch64)");
        assert_eq!(hvc.fault_status_name(), None);
        assert_eq!(Syndrome(0x17 << 26).class_name(), "SMC (AArch64)");
    }

    #[test]
    fn unknown_classes_are_reserved_not_a_panic() {
        for ec in 0..64u64 {
            assert!(!Syndrome(ec << 26).class_name().is_empty());
        }
        assert_eq!(class_name(0x3f), "reserved exception class");
    }

    #[test]
    fn iss_excludes_class_and_length() {
        let s = Syndrome(u64::MAX);
        assert_eq!(s.iss(), (1 << 25) - 1);
        assert_eq!(s.class(), 0x3f);
    }
}
