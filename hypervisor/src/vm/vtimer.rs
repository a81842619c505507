//! A guest's EL1 timers, the portable part: the level of the virtual timer's interrupt line
//! as the guest programmed it, and the EL1 physical timer Labyrinth emulates per vCPU (its
//! `CNTP_*_EL0` registers trap to EL2 as system-register accesses).
//!
//! Pure logic over register values: it never reads a counter (the caller passes `now`, the
//! count as the guest sees it), never arms a host timer (it says when one is needed), never
//! touches the GIC (the caller reports the line's level to `vgic::VGic::set_line_level`).
//! The virtual timer's PPI is `vgic::VTIMER_INTID` (27), the physical one's
//! `vgic::PTIMER_INTID` (30).

// CNTx_CTL_EL0 fields.
pub const CTL_ENABLE: u64 = 1 << 0;
pub const CTL_IMASK: u64 = 1 << 1;
/// Read-only: the timer condition is met (and the timer enabled).
pub const CTL_ISTATUS: u64 = 1 << 2;

/// The interrupt line of a timer with control register `ctl` and compare value `cval` at count
/// `now`: high while enabled, not masked, and the condition (`now >= cval`, unsigned) met.
pub fn line_level(ctl: u64, cval: u64, now: u64) -> bool {
    ctl & CTL_ENABLE != 0 && ctl & CTL_IMASK == 0 && now >= cval
}

/// A system register's encoding as `vm::trap` reports it in `GuestTrap::SysReg { encoding }`
/// (the ISS of EC 0x18 less Rt and the direction: op0 in bits 21:20, op2 19:17, op1 16:14,
/// CRn 13:10, CRm 4:1).
pub const fn sysreg_encoding(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32) -> u32 {
    (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (crm << 1)
}

/// `CNTP_TVAL_EL0`: S3_3_C14_C2_0.
pub const CNTP_TVAL_EL0: u32 = sysreg_encoding(3, 3, 14, 2, 0);
/// `CNTP_CTL_EL0`: S3_3_C14_C2_1.
pub const CNTP_CTL_EL0: u32 = sysreg_encoding(3, 3, 14, 2, 1);
/// `CNTP_CVAL_EL0`: S3_3_C14_C2_2.
pub const CNTP_CVAL_EL0: u32 = sysreg_encoding(3, 3, 14, 2, 2);

/// The EL1 physical timer's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysTimerReg {
    Ctl,
    Cval,
    Tval,
}

/// Which physical-timer register a trapped system-register access names, if any.
pub fn classify(encoding: u32) -> Option<PhysTimerReg> {
    match encoding {
        CNTP_CTL_EL0 => Some(PhysTimerReg::Ctl),
        CNTP_CVAL_EL0 => Some(PhysTimerReg::Cval),
        CNTP_TVAL_EL0 => Some(PhysTimerReg::Tval),
        _ => None,
    }
}

/// One vCPU's emulated EL1 physical timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysTimer {
    /// ENABLE and IMASK as the guest wrote them (ISTATUS is computed).
    ctl: u64,
    cval: u64,
}

impl PhysTimer {
    /// Disabled, compare value 0 (the architecture leaves both UNKNOWN at reset).
    pub const fn new() -> Self {
        PhysTimer { ctl: 0, cval: 0 }
    }

    /// A read of `reg` at count `now`. TVAL is `cval - now` in its low 32 bits (a signed
    /// 32-bit value: negative once the deadline has passed), bits 63:32 RES0, as the
    /// architecture defines the register.
    pub fn read(&self, reg: PhysTimerReg, now: u64) -> u64 {
        match reg {
            PhysTimerReg::Ctl => {
                let met = self.ctl & CTL_ENABLE != 0 && now >= self.cval;
                self.ctl | if met { CTL_ISTATUS } else { 0 }
            }
            PhysTimerReg::Cval => self.cval,
            PhysTimerReg::Tval => u64::from(self.cval.wrapping_sub(now) as u32),
        }
    }

    /// A write of `value` to `reg` at count `now`. CTL keeps ENABLE and IMASK (ISTATUS is
    /// read-only, the rest RES0); TVAL sets `cval = now + value` with `value` a signed 32-bit
    /// quantity.
    pub fn write(&mut self, reg: PhysTimerReg, value: u64, now: u64) {
        match reg {
            PhysTimerReg::Ctl => self.ctl = value & (CTL_ENABLE | CTL_IMASK),
            PhysTimerReg::Cval => self.cval = value,
            PhysTimerReg::Tval => self.cval = now.wrapping_add(value as u32 as i32 as i64 as u64),
        }
    }

    /// The level of PPI 30's line at count `now`.
    pub fn level(&self, now: u64) -> bool {
        line_level(self.ctl, self.cval, now)
    }

    /// The count at which the line goes high, if it can: the caller arms a host timer for it
    /// (or raises the line at once if it has passed). `None` while disabled or masked.
    pub fn deadline(&self) -> Option<u64> {
        (self.ctl & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE).then_some(self.cval)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::vm::trap::{decode, GuestTrap};

    /// The encoding `vm::trap::decode` reports for an MSR/MRS of (op0, op1, CRn, CRm, op2).
    fn trapped(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64, read: bool) -> u32 {
        let iss =
            (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (7 << 5) | (crm << 1) | u64::from(read);
        let GuestTrap::SysReg { encoding, reg: 7, .. } = decode((0x18 << 26) | (1 << 25) | iss, 0, 0) else {
            panic!("not a system register trap")
        };
        encoding
    }

    #[test]
    fn encodings_match_what_trap_decoding_reports() {
        assert_eq!(classify(trapped(3, 3, 14, 2, 1, true)), Some(PhysTimerReg::Ctl));
        assert_eq!(classify(trapped(3, 3, 14, 2, 2, false)), Some(PhysTimerReg::Cval));
        assert_eq!(classify(trapped(3, 3, 14, 2, 0, true)), Some(PhysTimerReg::Tval));
        assert_eq!(classify(trapped(3, 3, 14, 3, 1, true)), None, "CNTV_CTL_EL0 is not ours");
        assert_eq!(classify(trapped(3, 3, 14, 0, 1, true)), None, "CNTPCT_EL0 neither");
        assert_eq!(classify(trapped(3, 0, 12, 11, 5, false)), None, "ICC_SGI1R_EL1 neither");
    }

    #[test]
    fn the_virtual_timers_line() {
        let on = CTL_ENABLE;
        assert!(line_level(on, 100, 100), "at the compare value");
        assert!(line_level(on | CTL_ISTATUS, 100, u64::MAX));
        assert!(!line_level(on, 100, 99));
        assert!(!line_level(on | CTL_IMASK, 100, 200), "masked");
        assert!(!line_level(0, 100, 200), "disabled");
        assert!(!line_level(on, u64::MAX, u64::MAX - 1), "unsigned comparison");
    }

    #[test]
    fn ctl_keeps_enable_and_imask_and_computes_istatus() {
        let mut t = PhysTimer::new();
        assert_eq!(t.read(PhysTimerReg::Ctl, 0), 0);
        t.write(PhysTimerReg::Cval, 1000, 0);
        t.write(PhysTimerReg::Ctl, u64::MAX, 0);
        assert_eq!(t.read(PhysTimerReg::Ctl, 999), CTL_ENABLE | CTL_IMASK, "ISTATUS is not writable");
        assert_eq!(t.read(PhysTimerReg::Ctl, 1000), CTL_ENABLE | CTL_IMASK | CTL_ISTATUS);
        assert!(!t.level(1000), "masked: condition met, line low");
        assert_eq!(t.deadline(), None);
        t.write(PhysTimerReg::Ctl, CTL_ENABLE, 0);
        assert!(t.level(1000) && !t.level(999));
        assert_eq!(t.deadline(), Some(1000));
        t.write(PhysTimerReg::Ctl, 0, 0);
        assert_eq!(t.read(PhysTimerReg::Ctl, 5000), 0, "no ISTATUS while disabled");
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn tval_is_a_signed_32_bit_view_of_cval() {
        let mut t = PhysTimer::new();
        t.write(PhysTimerReg::Ctl, CTL_ENABLE, 0);
        let now = 0x1_0000_0000u64;
        t.write(PhysTimerReg::Tval, 500, now);
        assert_eq!(t.read(PhysTimerReg::Cval, now), now + 500);
        assert_eq!(t.read(PhysTimerReg::Tval, now + 100), 400);
        // Past the deadline: negative, in 32 bits.
        assert_eq!(t.read(PhysTimerReg::Tval, now + 600), u64::from((-100i32) as u32));
        assert_eq!(t.read(PhysTimerReg::Tval, now + 600) as u32 as i32, -100);
        // A negative TVAL written is a deadline in the past: the line is high at once.
        t.write(PhysTimerReg::Tval, u64::from((-20i32) as u32), now);
        assert_eq!(t.read(PhysTimerReg::Cval, now), now - 20);
        assert!(t.level(now));
        // Only the low 32 bits of a TVAL write count.
        t.write(PhysTimerReg::Tval, 0xffff_ffff_0000_0010, now);
        assert_eq!(t.read(PhysTimerReg::Cval, now), now + 16);
        // The difference wraps in 32 bits however far the compare value is.
        t.write(PhysTimerReg::Cval, now + (1 << 33) + 7, now);
        assert_eq!(t.read(PhysTimerReg::Tval, now), 7);
    }
}
