//! What the vCPUs of one guest share: its configuration and layout, its stage-2 space, its
//! memory budget, its devices (UART, virtual GIC), each vCPU's PSCI power state and its
//! lifecycle. Reached through `&'static` from every CPU that runs one of its vCPUs, so every
//! field is either fixed at creation, atomic, or behind a lock no fault path waits on.
//!
//! It decides nothing about a trap (that is `vm::exit`) and never touches hardware.

use core::ops::Range;
use core::sync::atomic::AtomicUsize;

use alloc::vec::Vec;
use spin::Mutex;

use super::budget::MemoryBudget;
use super::layout::Layout;
use super::lifecycle::Lifecycle;
use super::shm::Revocations;
use super::vcpu::Stats;
use super::vgic::VGic;
use super::vpl011::VPl011;
use super::vpsci::VcpuPowerStates;
use crate::dt::{GuestConfig, MAX_VCPUS};
use crate::frame::{Owner, VmId};
use crate::stage2::{Geometry, Quiescence, Stage2};

/// Why a guest stopped, for its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    SystemOff,
    /// Its last running vCPU called CPU_OFF.
    CpuOff,
    OutOfMemory,
    SError,
    /// The host GIC could not be set up for its virtual GIC.
    HostGic,
    /// Its stage-2 space, VMID or device tree could not be made again after a reset.
    ResetFailed,
}

/// What a reset rebuilds besides the stage-2 space's contents, and what the report counts.
pub struct Boot {
    /// The device tree the guest boots with (written again on a reset).
    pub dtb: Vec<u8>,
    pub resets: u32,
    pub frames_returned: u64,
}

/// Why a guest cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmError {
    /// A vCPU count PSCI or the virtual GIC cannot serve.
    VcpuCount(usize),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmError::VcpuCount(n) => write!(f, "cpus = {n}: not a vCPU count Labyrinth can run"),
        }
    }
}

/// One guest, shared by its vCPUs.
pub struct Vm {
    pub name: &'static str,
    pub config: GuestConfig<'static>,
    pub id: VmId,
    pub layout: Layout,
    pub geo: Geometry,
    /// Its vCPUs run on physical CPUs `first_cpu..first_cpu + vcpus`.
    pub first_cpu: usize,
    pub vcpus: usize,
    /// Its stage-2 space, for its whole life: faults install into it by compare-and-swap,
    /// from every vCPU at once, with no lock; a reset empties it and a stop destroys it, each
    /// only once every other vCPU is out (`vm::lifecycle`).
    pub s2: Stage2,
    /// Taken only with every other vCPU out (creation, reset, stop).
    pub boot: Mutex<Boot>,
    pub uart: Mutex<VPl011>,
    /// Characters waiting in the UART's receive FIFO, mirrored under its lock so that a flag
    /// register read needs no lock (`VPl011::read_constant`).
    pub uart_rx: AtomicUsize,
    /// Its virtual GICv3 (unless the guest opted out).
    pub vgic: Option<VGic>,
    /// Frames promised to this guest at creation; every frame it draws is counted here first.
    pub budget: MemoryBudget,
    /// Each vCPU's PSCI power state and pending start.
    pub power: VcpuPowerStates,
    pub life: Lifecycle,
    /// Each vCPU's last quiescent point: when table pages that left its stage-2 tree while it
    /// ran may be freed.
    pub quiescence: Quiescence<MAX_VCPUS>,
    /// The counters of vCPUs that left the guest, for the report.
    pub totals: Mutex<Stats>,
    /// Its shared memory nodes whose region was revoked (their owner stopped): the abort path
    /// reads it to say why a touch there is refused.
    pub shm_revoked: Revocations,
}

/// What a guest is made of, decided before it exists (see `Vm::new`).
pub struct VmParts {
    pub config: GuestConfig<'static>,
    pub id: VmId,
    pub layout: Layout,
    pub geo: Geometry,
    pub first_cpu: usize,
    pub s2: Stage2,
    pub dtb: Vec<u8>,
    pub budget: MemoryBudget,
}

impl Vm {
    /// A guest with an empty stage-2 space, its vCPUs all off.
    pub fn new(p: VmParts) -> Result<Vm, VmError> {
        let vcpus = p.config.cpus as usize;
        let power = VcpuPowerStates::new(vcpus).ok_or(VmError::VcpuCount(vcpus))?;
        let vgic = match p.config.virtual_gic {
            true => Some(VGic::new(vcpus).ok_or(VmError::VcpuCount(vcpus))?),
            false => None,
        };
        Ok(Vm {
            name: p.config.name,
            config: p.config,
            id: p.id,
            layout: p.layout,
            geo: p.geo,
            first_cpu: p.first_cpu,
            vcpus,
            s2: p.s2,
            boot: Mutex::new(Boot { dtb: p.dtb, resets: 0, frames_returned: 0 }),
            uart: Mutex::new(VPl011::new()),
            uart_rx: AtomicUsize::new(0),
            vgic,
            budget: p.budget,
            power,
            life: Lifecycle::new(),
            quiescence: Quiescence::new(),
            totals: Mutex::new(Stats::default()),
            shm_revoked: Revocations::new(),
        })
    }

    /// The owner tag its frames carry.
    pub fn owner(&self) -> Owner {
        Owner::guest(self.id)
    }

    /// Its RAM's IPAs.
    pub fn ram(&self) -> Range<u64> {
        self.layout.ram_base..self.layout.ram_end()
    }

    /// The physical CPU that runs vCPU `vcpu`.
    pub fn cpu_of(&self, vcpu: usize) -> usize {
        self.first_cpu + vcpu
    }

    /// vCPU 0 starts at the kernel with x0 = the device tree, as a boot loader starts it: a
    /// start request like any CPU_ON, which its CPU takes when it enters. Every vCPU must be
    /// out of the guest (creation, reset).
    pub fn boot_vcpu0(&self) -> bool {
        self.power.reset();
        self.power.cpu_off(0);
        self.power.cpu_on(0, self.layout.kernel, self.layout.dtb).is_ok()
    }
}
