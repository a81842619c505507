//! One vCPU's redistributor: its SGIs' and PPIs' state, `GICR_WAKER`, and its two MMIO
//! frames (RD and SGI). Behind its own lock in the `VGic`: its vCPU takes it to sync its list
//! registers, any vCPU to access its frames (as on hardware, a PE may reach any
//! redistributor).

use super::bank::Bank;
use super::regs::*;

/// SGIs are always edge-triggered.
const SGI_MASK: u32 = 0xffff;
/// The SGI frame's priorities: INTIDs 0-31.
const IPRIORITYR_END: u64 = IPRIORITYR + 32;
/// ICFGR1: the PPIs' trigger.
const ICFGR1: u64 = ICFGR + 4;
/// The upper half of GICR_TYPER, for 32-bit reads.
const GICR_TYPER_HIGH: u64 = GICR_TYPER + 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Redistributor {
    /// INTIDs 0-31.
    pub irqs: Bank<1>,
    /// GICR_WAKER.ProcessorSleep.
    pub asleep: bool,
}

impl Redistributor {
    /// Reset: everything disabled, group 0, priority 0, SGIs edge, PPIs level, asleep.
    pub const fn new() -> Self {
        let mut irqs = Bank::new();
        irqs.edge[0] = SGI_MASK;
        Redistributor { irqs, asleep: true }
    }

    /// The RD frame of vCPU `vcpu` of `vcpus`.
    pub fn read_rd(&self, vcpu: usize, vcpus: usize, offset: u64, size: u8) -> u64 {
        // Affinity Aff0 = vCPU index (its MPIDR), Processor_Number = index, Last on the last
        // one; no physical or virtual LPIs.
        let last = if vcpu + 1 == vcpus { GICR_TYPER_LAST } else { 0 };
        let typer =
            ((vcpu as u64) << GICR_TYPER_AFF_SHIFT) | ((vcpu as u64) << GICR_TYPER_PROC_NUM_SHIFT) | last;
        match offset {
            GICR_IIDR => u64::from(IIDR),
            GICR_TYPER if size == 8 => typer,
            GICR_TYPER => typer & 0xffff_ffff,
            GICR_TYPER_HIGH => typer >> 32,
            // ChildrenAsleep follows ProcessorSleep at once.
            GICR_WAKER if self.asleep => WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP,
            PIDR2 => u64::from(PIDR2_GICV3),
            _ => 0,
        }
    }

    pub fn write_rd(&mut self, offset: u64, value: u64) {
        if offset == GICR_WAKER {
            self.asleep = value & WAKER_PROCESSOR_SLEEP != 0;
        }
    }

    /// The SGI frame: word 0 of the bit-per-INTID registers, priorities of INTIDs 0-31,
    /// ICFGR0/1. Everything else (extended PPIs, IGRPMODR, NSACR) is RAZ/WI.
    pub fn read_sgi(&self, offset: u64, size: u8) -> u64 {
        match offset {
            IGROUPR | ISENABLER | ICENABLER | ISPENDR | ICPENDR | ISACTIVER | ICACTIVER => {
                u64::from(self.irqs.read_bitmap(offset, 0))
            }
            IPRIORITYR..IPRIORITYR_END => self.irqs.read_priority((offset - IPRIORITYR) as usize, size),
            ICFGR | ICFGR1 => u64::from(self.irqs.read_config(((offset - ICFGR) / 4) as usize)),
            _ => 0,
        }
    }

    pub fn write_sgi(&mut self, offset: u64, size: u8, value: u64) {
        match offset {
            IGROUPR | ISENABLER | ICENABLER | ISPENDR | ICPENDR | ISACTIVER | ICACTIVER => {
                self.irqs.write_bitmap(offset, 0, value as u32, u32::MAX)
            }
            IPRIORITYR..IPRIORITYR_END => {
                self.irqs.write_priority((offset - IPRIORITYR) as usize, size, value)
            }
            // SGIs stay edge-triggered (ICFGR0 is read-only); PPIs' trigger is writable.
            ICFGR1 => self.irqs.write_config(1, value as u32, 0xffff),
            _ => {}
        }
    }
}
