//! Decoding a guest's trap into EL2 from the syndrome registers: what happened, at which IPA,
//! and, for an MMIO access the hardware described (ISV = 1), its size, direction and register.
//! Pure functions over register values: no policy here (see `dispatch`).

use crate::esr::Syndrome;

/// An MMIO access as the syndrome describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub write: bool,
    /// The general-purpose register (0-30; 31 = xzr/wzr).
    pub reg: u8,
    /// A load sign-extends to `reg` width.
    pub sign_extend: bool,
    /// The register is 64-bit (else 32-bit).
    pub sixty_four: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestTrap {
    /// A stage-2 abort on a data access (`instruction` false) or an instruction fetch.
    Abort {
        instruction: bool,
        /// The faulting IPA (page from HPFAR_EL2, offset from FAR_EL2), when the fault status
        /// says HPFAR_EL2 holds it.
        ipa: Option<u64>,
        /// DFSC/IFSC.
        fsc: u8,
        write: bool,
        /// Set when the hardware decoded the access (ISV = 1) and FAR is valid.
        access: Option<MmioAccess>,
    },
    Hvc {
        imm: u16,
    },
    /// A trapped SMC (`HCR_EL2.TSC`): ELR points at the SMC itself.
    Smc {
        imm: u16,
    },
    /// A trapped MSR/MRS (EC 0x18).
    SysReg {
        read: bool,
        reg: u8,
        encoding: u32,
    },
    Other {
        class: u8,
    },
}

/// Fault status codes for which HPFAR_EL2 holds the faulting IPA: translation and access-flag
/// faults at any level (stage 2). For others (permission, external aborts...) it may not.
fn hpfar_valid(fsc: u8) -> bool {
    matches!(fsc, 0x04..=0x0b)
}

/// Whether a trapped system instruction (`GuestTrap::SysReg` encoding) is a data-cache
/// maintenance by set/way (DC ISW, DC CSW, DC CISW), which `HCR_EL2.TSW` traps.
pub fn is_dc_set_way(encoding: u32) -> bool {
    let (op0, op2, op1, crn, crm) = (
        (encoding >> 20) & 3,
        (encoding >> 17) & 7,
        (encoding >> 14) & 7,
        (encoding >> 10) & 0xf,
        (encoding >> 1) & 0xf,
    );
    op0 == 1 && op1 == 0 && crn == 7 && op2 == 2 && matches!(crm, 6 | 10 | 14)
}

/// Whether a trapped system register (`GuestTrap::SysReg` encoding) is one of the GICv3 SGI
/// generation registers, `ICC_SGI1R_EL1`, `ICC_ASGI1R_EL1`, `ICC_SGI0R_EL1` (op0 3, op1 0,
/// CRn 12, CRm 11, op2 5/6/7), which trap to EL2 when `HCR_EL2.IMO`/`FMO` are set.
pub fn is_gic_sgi_register(encoding: u32) -> bool {
    let (op0, op2, op1, crn, crm) = (
        (encoding >> 20) & 3,
        (encoding >> 17) & 7,
        (encoding >> 14) & 7,
        (encoding >> 10) & 0xf,
        (encoding >> 1) & 0xf,
    );
    op0 == 3 && op1 == 0 && crn == 12 && crm == 11 && matches!(op2, 5..=7)
}

/// The access a data abort's syndrome describes, when the hardware decoded it (ISV = 1) and
/// FAR is valid (FnV = 0). Data aborts only: the caller checks the class.
#[inline(always)]
pub fn mmio_access(esr: u64) -> Option<MmioAccess> {
    let iss = esr & 0x1ff_ffff;
    (iss & (1 << 24) != 0 && iss & (1 << 10) == 0).then(|| MmioAccess {
        size: 1 << ((iss >> 22) & 3),
        write: iss & (1 << 6) != 0,
        reg: ((iss >> 16) & 0x1f) as u8,
        sign_extend: iss & (1 << 21) != 0,
        sixty_four: iss & (1 << 15) != 0,
    })
}

pub fn decode(esr: u64, far: u64, hpfar: u64) -> GuestTrap {
    let s = Syndrome(esr);
    let iss = s.iss();
    match s.class() {
        0x20 | 0x24 => {
            let instruction = s.class() == 0x20;
            let fsc = (iss & 0x3f) as u8;
            let fnv = iss & (1 << 10) != 0;
            let ipa =
                (hpfar_valid(fsc) && !fnv).then_some(((hpfar >> 4) & ((1 << 40) - 1)) << 12 | (far & 0xfff));
            let write = !instruction && iss & (1 << 6) != 0;
            let access = if instruction { None } else { mmio_access(esr) };
            GuestTrap::Abort { instruction, ipa, fsc, write, access }
        }
        0x16 => GuestTrap::Hvc { imm: iss as u16 },
        0x17 => GuestTrap::Smc { imm: iss as u16 },
        0x18 => GuestTrap::SysReg {
            read: iss & 1 != 0,
            reg: ((iss >> 5) & 0x1f) as u8,
            encoding: iss & 0x3f_fc1e,
        },
        class => GuestTrap::Other { class },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DABT_LOW: u64 = 0x24 << 26;
    const IL: u64 = 1 << 25;

    #[test]
    fn a_translation_fault_carries_its_ipa() {
        // Level-3 translation fault, write, no ISV; HPFAR holds IPA[47:12] in bits [43:4].
        let esr = DABT_LOW | IL | (1 << 6) | 0x07;
        let t = decode(esr, 0xffff_0000_1234_5678, (0x4123_4000u64 >> 12) << 4);
        assert_eq!(
            t,
            GuestTrap::Abort {
                instruction: false,
                ipa: Some(0x4123_4678),
                fsc: 7,
                write: true,
                access: None
            }
        );
    }

    #[test]
    fn an_isv_access_is_decoded() {
        // 32-bit store from w5: SAS = 2, SRT = 5, WnR.
        let esr = DABT_LOW | IL | (1 << 24) | (2 << 22) | (5 << 16) | (1 << 6) | 0x06;
        let GuestTrap::Abort { access: Some(a), .. } = decode(esr, 0x0900_0000, (0x0900_0000u64 >> 12) << 4)
        else {
            panic!("no access")
        };
        assert_eq!(a, MmioAccess { size: 4, write: true, reg: 5, sign_extend: false, sixty_four: false });
    }

    #[test]
    fn permission_faults_have_no_trusted_ipa() {
        let t = decode(DABT_LOW | 0x0f, 0x1000, 0x1230);
        assert!(matches!(t, GuestTrap::Abort { ipa: None, fsc: 0x0f, .. }));
    }

    #[test]
    fn far_not_valid_means_no_ipa_and_no_access() {
        let esr = DABT_LOW | (1 << 24) | (1 << 10) | 0x07;
        assert!(matches!(decode(esr, 0, 0x40000 << 4), GuestTrap::Abort { ipa: None, access: None, .. }));
    }

    #[test]
    fn instruction_aborts_are_aborts_too() {
        let t = decode((0x20 << 26) | IL | 0x06, 0x8000_0000, (0x8000_0000u64 >> 12) << 4);
        assert_eq!(
            t,
            GuestTrap::Abort {
                instruction: true,
                ipa: Some(0x8000_0000),
                fsc: 6,
                write: false,
                access: None
            }
        );
    }

    #[test]
    fn dc_set_way_is_recognised() {
        // DC CISW, x3: op0=1 op1=0 CRn=7 CRm=14 op2=2.
        let iss = (1 << 20) | (2 << 17) | (7 << 10) | (3 << 5) | (14 << 1);
        let GuestTrap::SysReg { encoding, read: false, reg: 3 } = decode((0x18 << 26) | iss, 0, 0) else {
            panic!()
        };
        assert!(is_dc_set_way(encoding));
        // DC CIVAC (CRn=7, CRm=14, op1=3, op2=1) is not set/way.
        let iss = (1 << 20) | (1 << 17) | (3 << 14) | (7 << 10) | (14 << 1);
        let GuestTrap::SysReg { encoding, .. } = decode((0x18 << 26) | iss, 0, 0) else { panic!() };
        assert!(!is_dc_set_way(encoding));
    }

    #[test]
    fn gic_sgi_registers_are_recognised() {
        // MSR ICC_SGI1R_EL1, x2.
        let iss = (3 << 20) | (5 << 17) | (12 << 10) | (2 << 5) | (11 << 1);
        let GuestTrap::SysReg { encoding, read: false, reg: 2 } = decode((0x18 << 26) | iss, 0, 0) else {
            panic!()
        };
        assert!(is_gic_sgi_register(encoding));
        // ICC_SGI0R_EL1 (op2 7) too; ICC_EOIR1_EL1 (CRm 12, op2 1) and the DC set/way ops are not.
        assert!(is_gic_sgi_register((3 << 20) | (7 << 17) | (12 << 10) | (11 << 1)));
        assert!(!is_gic_sgi_register((3 << 20) | (1 << 17) | (12 << 10) | (12 << 1)));
        assert!(!is_gic_sgi_register((1 << 20) | (2 << 17) | (7 << 10) | (14 << 1)));
    }

    #[test]
    fn hvc_smc_and_sysregs() {
        assert_eq!(decode((0x16 << 26) | IL | 0x1234, 0, 0), GuestTrap::Hvc { imm: 0x1234 });
        assert_eq!(decode((0x17 << 26) | IL, 0, 0), GuestTrap::Smc { imm: 0 });
        assert!(matches!(
            decode((0x18 << 26) | IL | 1 | (3 << 5), 0, 0),
            GuestTrap::SysReg { read: true, reg: 3, .. }
        ));
        assert_eq!(decode(0x01 << 26, 0, 0), GuestTrap::Other { class: 1 });
    }
}
