//! Decoding a guest's trap into EL2 from the syndrome registers: what happened, at which IPA,
//! and, for an MMIO access the hardware described (ISV = 1), its size, direction and register.
//! Pure functions over register values: no policy here (see `dispatch`).

use tock_registers::LocalRegisterCopy;

use crate::esr::{Syndrome, ABORT_ISS, HPFAR, SYSREG_ISS};

type AbortIss = LocalRegisterCopy<u64, ABORT_ISS::Register>;
type SysRegIss = LocalRegisterCopy<u32, SYSREG_ISS::Register>;

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

/// The fields of a trapped system register access that name the register (op0, op1, CRn, CRm,
/// op2), without the direction and the general-purpose register: `GuestTrap::SysReg`'s
/// `encoding`.
const SYSREG_NAME: u32 = {
    use SYSREG_ISS::*;
    (OP0.mask << OP0.shift)
        | (OP2.mask << OP2.shift)
        | (OP1.mask << OP1.shift)
        | (CRN.mask << CRN.shift)
        | (CRM.mask << CRM.shift)
};

/// `(op0, op1, CRn, CRm, op2)` of a `GuestTrap::SysReg` encoding.
fn sysreg_name(encoding: u32) -> (u32, u32, u32, u32, u32) {
    let r = SysRegIss::new(encoding);
    (
        r.read(SYSREG_ISS::OP0),
        r.read(SYSREG_ISS::OP1),
        r.read(SYSREG_ISS::CRN),
        r.read(SYSREG_ISS::CRM),
        r.read(SYSREG_ISS::OP2),
    )
}

/// Whether a trapped system instruction (`GuestTrap::SysReg` encoding) is a data-cache
/// maintenance by set/way (DC ISW, DC CSW, DC CISW), which `HCR_EL2.TSW` traps.
pub fn is_dc_set_way(encoding: u32) -> bool {
    let (op0, op1, crn, crm, op2) = sysreg_name(encoding);
    op0 == 1 && op1 == 0 && crn == 7 && op2 == 2 && matches!(crm, 6 | 10 | 14)
}

/// Whether a trapped system register (`GuestTrap::SysReg` encoding) is one of the GICv3 SGI
/// generation registers, `ICC_SGI1R_EL1`, `ICC_ASGI1R_EL1`, `ICC_SGI0R_EL1` (op0 3, op1 0,
/// CRn 12, CRm 11, op2 5/6/7), which trap to EL2 when `HCR_EL2.IMO`/`FMO` are set.
pub fn is_gic_sgi_register(encoding: u32) -> bool {
    let (op0, op1, crn, crm, op2) = sysreg_name(encoding);
    op0 == 3 && op1 == 0 && crn == 12 && crm == 11 && matches!(op2, 5..=7)
}

/// The access a data abort's syndrome describes, when the hardware decoded it (ISV = 1) and
/// FAR is valid (FnV = 0). Data aborts only: the caller checks the class.
#[inline(always)]
pub fn mmio_access(esr: u64) -> Option<MmioAccess> {
    let iss = AbortIss::new(esr);
    (iss.is_set(ABORT_ISS::ISV) && !iss.is_set(ABORT_ISS::FNV)).then(|| MmioAccess {
        size: 1 << iss.read(ABORT_ISS::SAS),
        write: iss.is_set(ABORT_ISS::WNR),
        reg: iss.read(ABORT_ISS::SRT) as u8,
        sign_extend: iss.is_set(ABORT_ISS::SSE),
        sixty_four: iss.is_set(ABORT_ISS::SF),
    })
}

pub fn decode(esr: u64, far: u64, hpfar: u64) -> GuestTrap {
    let s = Syndrome(esr);
    let iss = s.iss();
    match s.class() {
        0x20 | 0x24 => {
            let instruction = s.class() == 0x20;
            let abort = AbortIss::new(esr);
            let fsc = abort.read(ABORT_ISS::FSC) as u8;
            let ipa = (hpfar_valid(fsc) && !abort.is_set(ABORT_ISS::FNV)).then(|| {
                LocalRegisterCopy::<u64, HPFAR::Register>::new(hpfar).read(HPFAR::FIPA) << 12 | (far & 0xfff)
            });
            let write = !instruction && abort.is_set(ABORT_ISS::WNR);
            let access = if instruction { None } else { mmio_access(esr) };
            GuestTrap::Abort { instruction, ipa, fsc, write, access }
        }
        0x16 => GuestTrap::Hvc { imm: iss as u16 },
        0x17 => GuestTrap::Smc { imm: iss as u16 },
        0x18 => {
            let r = SysRegIss::new(iss);
            GuestTrap::SysReg {
                read: r.is_set(SYSREG_ISS::READ),
                reg: r.read(SYSREG_ISS::RT) as u8,
                encoding: iss & SYSREG_NAME,
            }
        }
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
    fn a_system_register_is_named_by_op0_op1_crn_crm_op2() {
        // ISS bits 21:10 and 4:1: everything but Rt (9:5) and the direction (0).
        assert_eq!(SYSREG_NAME, 0x3f_fc1e);
        // MRS x7, ICC_SGI1R_EL1 (op0 3, op1 0, CRn 12, CRm 11, op2 5).
        let iss = (3 << 20) | (5 << 17) | (12 << 10) | (7 << 5) | (11 << 1) | 1;
        let GuestTrap::SysReg { read: true, reg: 7, encoding } = decode((0x18 << 26) | iss, 0, 0) else {
            panic!()
        };
        assert!(is_gic_sgi_register(encoding));
        assert_eq!(encoding, (iss & !((0x1f << 5) | 1)) as u32);
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
