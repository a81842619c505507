//! Guests on this machine: creating them from the device tree's guest nodes, loading their
//! images, placing each vCPU on its own physical CPU, handling their traps, starting and
//! stopping vCPUs, and taking guests apart when they stop. The decisions about a trap's
//! meaning are the portable `vm` modules'.
//!
//! State: a [`Vm`] is what a guest's vCPUs share (its stage-2 space, memory budget, devices,
//! lifecycle), reached through `&'static` from every CPU it runs on; a [`Vcpu`] is what one
//! CPU owns (its counters, its pool handle), in that CPU's slot and touched by it alone.
//!
//! A guest's life is one state word: `Running`, then `Stopping` (one vCPU won the right to
//! stop or reset the guest and waits until every other vCPU is out of the guest: each is sent
//! a physical SGI and, on its way back into the guest, parks in [`wait_to_run`] instead), then
//! `Stopped` or, after a reset, `Running` again with only vCPU 0 started.

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use labyrinth::dt::{GuestConfig, Platform};
use labyrinth::frame::{AtomicError, CpuFrames, FrameManager, Owner, Pfn, VmId, BLOCK_FRAMES, FRAME_SIZE};
use labyrinth::stage2::{level_size, Attrs, Geometry, Stage2, Stage2Error, VmidAllocator};
use labyrinth::vm::layout::{self, Layout, UART_BASE, UART_SIZE};
use labyrinth::vm::lifecycle::{Life, Lifecycle};
use labyrinth::vm::trap::{self, GuestTrap, MmioAccess};
use labyrinth::vm::vgic::{self, VGic};
use labyrinth::vm::vpsci::{self, PowerState, PsciAction, StartRequest, VcpuPowerStates};
use labyrinth::vm::vtimer::{self, PhysTimer};
use labyrinth::vm::VcpuSet;
use labyrinth::vm::{budget::MemoryBudget, fdt_gen, image, vpl011::VPl011};
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::{self, TrapFrame, MAX_CPUS};

const BLOCK: u64 = level_size(2);

/// Why a guest stopped, for its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
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

#[derive(Default, Clone, Copy)]
struct Stats {
    page_faults: u64,
    block_faults: u64,
    aborts_injected: u64,
    undefs_injected: u64,
    mmio: u64,
    hvc: u64,
    smc: u64,
    sysreg: u64,
    /// Physical interrupts taken while it ran, virtual timer interrupts injected, SGIs it sent
    /// itself, accesses to its virtual GIC's registers.
    irqs: u64,
    vtimer: u64,
    sgis: u64,
    vgic_mmio: u64,
    /// Kicks taken: another CPU took this vCPU out of the guest.
    kicks: u64,
    /// vGIC maintenance interrupts (list registers emptied, a level interrupt completed).
    maintenance: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.page_faults += o.page_faults;
        self.block_faults += o.block_faults;
        self.aborts_injected += o.aborts_injected;
        self.undefs_injected += o.undefs_injected;
        self.mmio += o.mmio;
        self.hvc += o.hvc;
        self.smc += o.smc;
        self.sysreg += o.sysreg;
        self.irqs += o.irqs;
        self.vtimer += o.vtimer;
        self.sgis += o.sgis;
        self.vgic_mmio += o.vgic_mmio;
        self.kicks += o.kicks;
        self.maintenance += o.maintenance;
    }
}

/// The guest's stage-2 space and what is rebuilt with it on a reset.
struct Space {
    s2: Option<Stage2>,
    vmid: u16,
    dtb: Vec<u8>,
    resets: u32,
    frames_returned: u64,
}

/// What the vCPUs of one guest share.
pub struct Vm {
    name: &'static str,
    config: GuestConfig<'static>,
    id: VmId,
    layout: Layout,
    geo: Geometry,
    /// Its vCPUs run on physical CPUs `first_cpu..first_cpu + vcpus`.
    first_cpu: usize,
    vcpus: usize,
    /// Faults take it with `try_lock` on the fast path (never waiting) and `lock` on the
    /// general path; creation, reset and teardown hold it while every other vCPU is out.
    space: Mutex<Space>,
    /// `VTTBR_EL2` of the space (0 while it has none), read by each vCPU as it enters.
    vttbr: AtomicU64,
    uart: Mutex<VPl011>,
    /// Its virtual GICv3 (unless the guest opted out).
    vgic: Option<VGic>,
    /// Frames promised to this guest at creation; every frame it draws is counted here first.
    budget: MemoryBudget,
    /// Each vCPU's PSCI power state and pending start.
    power: VcpuPowerStates,
    life: Lifecycle,
    /// The counters of vCPUs that left the guest, for the report.
    totals: Mutex<Stats>,
}

impl Vm {
    fn owner(&self) -> Owner {
        Owner::guest(self.id)
    }

    fn life(&self) -> Life {
        self.life.life()
    }

    fn cpu_of(&self, vcpu: usize) -> usize {
        self.first_cpu + vcpu
    }
}

/// What one CPU owns of the vCPU it runs.
pub struct Vcpu {
    vm: &'static Vm,
    index: usize,
    /// The atomic path of this CPU.
    pool: Option<CpuFrames<'static, 'static>>,
    stats: Stats,
    /// Aborts and undefined instructions are logged for the first few only.
    logged: u32,
    /// Its emulated EL1 physical timer.
    ptimer: PhysTimer,
    /// The virtual timer's PPI is disabled at the host GIC until the guest has dealt with its
    /// interrupt (the line is resampled low).
    vtimer_held: bool,
}

const LOG_LIMIT: u32 = 8;

/// One slot per CPU; a slot is written by the boot CPU before its CPU starts, and afterwards
/// only by that CPU.
struct PerCpu(UnsafeCell<[Option<Vcpu>; MAX_CPUS]>);

// SAFETY: see `vcpu_slot`: each slot has a single user at any time.
unsafe impl Sync for PerCpu {}

static VCPUS: PerCpu = PerCpu(UnsafeCell::new([const { None }; MAX_CPUS]));
static VMIDS: Mutex<VmidAllocator> = Mutex::new(VmidAllocator::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);
static REPORTS: Mutex<Vec<alloc::string::String>> = Mutex::new(Vec::new());
/// Whether the host GIC is set up: CPUs can kick each other and guests can have a vGIC.
static HOST_GIC: AtomicBool = AtomicBool::new(false);
/// Set once before any guest runs; read on every fault, so a plain pointer, not a `Once`.
static FRAMES: core::sync::atomic::AtomicPtr<FrameManager<'static>> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// The vCPU that runs on CPU `cpu`.
///
/// # Safety
/// Only CPU `cpu` may call this once it runs, and only the boot CPU before that (the CPU is not
/// started yet); interrupts are masked at EL2, so no call overlaps another on a CPU.
unsafe fn vcpu_slot(cpu: usize) -> Option<&'static mut Option<Vcpu>> {
    // SAFETY: per the contract, nobody else holds a reference into this slot.
    unsafe { (*VCPUS.0.get()).get_mut(cpu) }
}

fn this_vcpu() -> Option<&'static mut Vcpu> {
    // SAFETY: called only from this CPU's trap handler or guest entry, on its own slot.
    unsafe { vcpu_slot(arch::cpu_index()) }?.as_mut()
}

#[inline(always)]
fn frames() -> &'static FrameManager<'static> {
    let p = FRAMES.load(Ordering::Acquire);
    // SAFETY: set from a `&'static FrameManager` in `create_all` before any guest exists, and
    // never changed; no guest (hence no caller) runs before it is set.
    unsafe { p.as_ref() }.expect("guests run only after the frame manager exists")
}

#[inline(always)]
fn env(vm: &Vm) -> arch::HwStage2<'static> {
    arch::HwStage2 { frames: frames(), cpu: arch::cpu_index(), vttbr: vm.vttbr.load(Ordering::Relaxed) }
}

/// Builds every well-formed guest the device tree describes and gives each of its vCPUs a
/// physical CPU, in configuration order. Returns how many CPUs run a vCPU. A guest that cannot
/// be built is named, with its reason, and left out; the others go on.
pub fn create_all(
    platform: &Platform<'static>,
    frames_mgr: &'static FrameManager<'static>,
    cpus: usize,
    pa_bits: u32,
) -> usize {
    FRAMES.store(frames_mgr as *const _ as *mut _, Ordering::Release);
    let geo = Geometry::for_pa_bits(pa_bits);
    // The host GIC carries the kicks between CPUs and the virtual GICs' interrupts.
    let host_gic = match platform.gic() {
        Some(gic) => arch::gic::init(gic).map_err(|e| alloc::format!("{e}")),
        None => Err(alloc::format!("the host device tree describes no GIC")),
    };
    HOST_GIC.store(host_gic.is_ok(), Ordering::Release);
    // CPUs that can get no vCPU never allocate: empty their pools before any promise is made,
    // so those frames can be promised (the rest are retired once the guests are placed).
    let wanted: usize =
        platform.guests().iter().filter_map(|g| g.as_ref().ok()).map(|c| c.cpus as usize).sum();
    let wanted = wanted.min(cpus);
    retire_cpus(frames_mgr, wanted..cpus);
    let mut next_cpu = 0;
    let mut vms = Vec::new();
    for g in platform.guests() {
        let cfg = match g {
            Ok(cfg) => *cfg,
            Err(e) => {
                error!("{e}: not started");
                continue;
            }
        };
        let n = cfg.cpus as usize;
        if next_cpu + n > cpus {
            error!(
                "guest {}: {n} vCPUs but {} physical CPUs left ({cpus} CPUs): not started",
                cfg.name,
                cpus - next_cpu
            );
            continue;
        }
        if let (true, Err(e)) = (cfg.virtual_gic || n > 1, &host_gic) {
            error!(
                "guest {}: needs the host GIC (virtual GIC or several vCPUs) but {e}: not started",
                cfg.name
            );
            continue;
        }
        match build(&cfg, geo, cpus, next_cpu) {
            Ok(vm) => {
                info!(
                    "guest {}: {} MiB RAM at {:#x}, kernel at {:#x}, device tree at {:#x}, {} mappings, {n} vCPU{} on CPU {next_cpu}{}, VMID {}",
                    vm.name,
                    vm.layout.ram_size >> 20,
                    vm.layout.ram_base,
                    vm.layout.kernel,
                    vm.layout.dtb,
                    if cfg.no_block_mappings { "4 KiB" } else { "4 KiB and 2 MiB" },
                    if n > 1 { "s" } else { "" },
                    if n > 1 { alloc::format!("-{}", next_cpu + n - 1) } else { alloc::string::String::new() },
                    vm.space.lock().vmid,
                );
                vms.push(vm);
                next_cpu += n;
            }
            Err(msg) => error!("{msg}: not started"),
        }
    }
    retire_cpus(frames_mgr, next_cpu..wanted);
    LIVE.store(vms.len(), Ordering::Release);
    let vms: &'static [Vm] = Vec::leak(vms);
    for vm in vms {
        boot_vcpu0(vm);
        for index in 0..vm.vcpus {
            let cpu = vm.cpu_of(index);
            // SAFETY: CPU `cpu` does not run yet (boot CPU, before starting it).
            if let Some(slot) = unsafe { vcpu_slot(cpu) } {
                *slot = Some(Vcpu {
                    vm,
                    index,
                    pool: frames().cpu(cpu),
                    stats: Stats::default(),
                    logged: 0,
                    ptimer: PhysTimer::new(),
                    vtimer_held: false,
                });
            }
        }
    }
    next_cpu
}

/// Retires the frame pools of CPUs that run no guest (see `FrameManager::retire`).
fn retire_cpus(frames_mgr: &FrameManager<'static>, cpus: core::ops::Range<usize>) {
    for cpu in cpus {
        if let Err(e) = frames_mgr.retire(cpu) {
            warn!("CPU {cpu} runs no guest but its frame pools were not emptied: {e}");
        }
    }
}

/// A formatted reason a guest cannot be built.
type BuildError = alloc::string::String;

/// Builds guest `cfg` with its vCPUs from CPU `first_cpu` on; the error names the guest and
/// what is wrong.
fn build(cfg: &GuestConfig<'static>, geo: Geometry, cpus: usize, first_cpu: usize) -> Result<Vm, BuildError> {
    build_inner(cfg, geo, cpus, first_cpu).map_err(|e| {
        if e.starts_with("guest ") {
            e
        } else {
            alloc::format!("guest {}: {e}", cfg.name)
        }
    })
}

fn build_inner(
    cfg: &GuestConfig<'static>,
    geo: Geometry,
    cpus: usize,
    first_cpu: usize,
) -> Result<Vm, BuildError> {
    use alloc::format;
    cfg.validate(cpus, geo.ipa_bits).map_err(|e| format!("{e}"))?;
    if cfg.device_tree.is_some() {
        warn!(
            "guest {}: its multiboot,device-tree module is ignored; Labyrinth writes the guest's device tree",
            cfg.name
        );
    }
    let vcpus = cfg.cpus as usize;
    let kernel = module_bytes(cfg.kernel.region.base(), cfg.kernel.region.size())?;
    let header = image::parse(kernel).map_err(|e| format!("kernel: {e}"))?;
    let ramdisk_size = cfg.ramdisk.map(|r| r.region.size());
    let layout = layout::plan(cfg.memory_bytes(), geo.ipa_bits, &header, ramdisk_size)
        .map_err(|e| format!("memory: {e}"))?;
    let dtb = fdt_gen::generate(&layout, vcpus, cfg.bootargs, 0, cfg.virtual_gic)
        .map_err(|_| format!("cannot write its device tree"))?;
    let id = VmId::new(first_cpu as u16 + 1).ok_or_else(|| format!("too many guests"))?;
    let budget = promise_memory(cfg.name, &layout, geo)?;
    let Some(vmid) = VMIDS.lock().alloc() else {
        frames().uncommit(budget.promised());
        return Err(format!("no VMID left"));
    };
    let vm = Vm {
        name: cfg.name,
        config: *cfg,
        id,
        layout,
        geo,
        first_cpu,
        vcpus,
        space: Mutex::new(Space { s2: None, vmid, dtb, resets: 0, frames_returned: 0 }),
        vttbr: AtomicU64::new(0),
        uart: Mutex::new(VPl011::new()),
        vgic: match cfg.virtual_gic {
            true => Some(
                VGic::new(vcpus).ok_or_else(|| format!("cpus = {vcpus}: too many for its virtual GIC"))?,
            ),
            false => None,
        },
        budget,
        power: VcpuPowerStates::new(vcpus).ok_or_else(|| format!("cpus = {vcpus}: not a vCPU count"))?,
        life: Lifecycle::new(),
        totals: Mutex::new(Stats::default()),
    };
    let loaded = load(&vm, &mut vm.space.lock(), first_cpu);
    if let Err(e) = loaded {
        teardown(&vm, &mut vm.space.lock());
        frames().uncommit(vm.budget.promised());
        return Err(format!("loading: {e}"));
    }
    Ok(vm)
}

/// Promises the guest the frames its RAM and their stage-2 tables can take, or what is left if
/// that is less (an overcommitted guest: it is stopped when it touches more). Promises are
/// made in configuration order, so the guests named first are the ones served in full.
fn promise_memory(name: &str, layout: &Layout, geo: Geometry) -> Result<MemoryBudget, BuildError> {
    let pages = (layout.ram_size / FRAME_SIZE) as usize;
    let tables = geo.max_table_pages(layout.ram_base, layout.ram_size);
    let promised = frames().commit(pages + tables);
    let Some(budget) = MemoryBudget::new(promised, tables) else {
        frames().uncommit(promised);
        return Err(alloc::format!(
            "no host memory left to promise it ({promised} frames, {tables} needed for its tables alone)"
        ));
    };
    if budget.pages() < pages {
        warn!(
            "guest {name}: {} MiB of RAM but {} KiB left to promise it: overcommitted, it is stopped if it touches more",
            layout.ram_size >> 20,
            budget.pages() * 4
        );
    }
    Ok(budget)
}

/// A boot module's bytes, mapped read-only at EL2 for the copy.
fn module_bytes(base: u64, size: u64) -> Result<&'static [u8], BuildError> {
    arch::map_range(base, base + size, arch::MapKind::ReadOnly)
        .map_err(|e| alloc::format!("cannot map module {base:#x}+{size:#x}: {e}"))?;
    // SAFETY: the module lies in RAM the frame database tagged Reserved (nobody writes it) and
    // was just mapped read-only at EL2 for the rest of the run.
    Ok(unsafe { core::slice::from_raw_parts(base as *const u8, size as usize) })
}

/// A fresh stage-2 space with the kernel, ramdisk and device tree copied in (and cleaned to the
/// point of coherency: the guest starts with its MMU and caches off). Everything else of its
/// RAM is faulted in on first touch. Called with every vCPU of the guest out of it.
fn load(vm: &Vm, space: &mut Space, cpu: usize) -> Result<(), Stage2Error> {
    let mut env = arch::HwStage2 { frames: frames(), cpu, vttbr: 0 };
    let mut s2 = Stage2::new(&mut env, vm.id, space.vmid, vm.geo)?;
    env.vttbr = s2.vttbr();
    let kernel = module_bytes(vm.config.kernel.region.base(), vm.config.kernel.region.size())
        .map_err(|_| Stage2Error::OutOfMemory)?;
    let mut r = copy_in(vm, &mut s2, &mut env, vm.layout.kernel, kernel);
    if let (Ok(()), Some(m), Some((at, _))) = (&r, vm.config.ramdisk, vm.layout.ramdisk) {
        r = module_bytes(m.region.base(), m.region.size())
            .map_err(|_| Stage2Error::OutOfMemory)
            .and_then(|bytes| copy_in(vm, &mut s2, &mut env, at, bytes));
    }
    if r.is_ok() {
        r = copy_in(vm, &mut s2, &mut env, vm.layout.dtb, &space.dtb);
    }
    // Kept even when loading failed, so that teardown returns what was copied.
    vm.vttbr.store(s2.vttbr(), Ordering::Release);
    space.s2 = Some(s2);
    r
}

/// Copies `bytes` to guest IPA `at` (page-aligned), page by page into fresh frames.
fn copy_in(
    vm: &Vm,
    s2: &mut Stage2,
    env: &mut arch::HwStage2<'static>,
    at: u64,
    bytes: &[u8],
) -> Result<(), Stage2Error> {
    for (i, chunk) in bytes.chunks(FRAME_SIZE as usize).enumerate() {
        if !vm.budget.take(1) {
            return Err(Stage2Error::OutOfMemory);
        }
        let pfn = alloc_page(env.cpu, vm.owner()).ok_or(Stage2Error::OutOfMemory)?;
        // SAFETY: `pfn` was just handed to this guest (zeroed, mapped at EL2 as free RAM) and
        // `chunk` is at most a page of a module or of the heap.
        unsafe { arch::copy_phys(pfn.phys(), chunk.as_ptr() as u64, chunk.len()) };
        arch::clean_to_poc(pfn.phys(), FRAME_SIZE);
        s2.map(env, at + i as u64 * FRAME_SIZE, pfn.phys(), 3, Attrs::RAM)?;
    }
    Ok(())
}

/// A frame for `owner` from the atomic path, refilling the pool once if it ran dry.
fn alloc_page(cpu: usize, owner: Owner) -> Option<Pfn> {
    let frames = frames();
    frames.alloc_page_atomic_exclusive(cpu, owner).ok().or_else(|| {
        frames.refill(cpu).ok()?;
        frames.alloc_page_atomic_exclusive(cpu, owner).ok()
    })
}

/// Whether CPU `cpu` has a vCPU to run.
pub fn has_guest(cpu: usize) -> bool {
    // SAFETY: read-only look at a slot the boot CPU filled before starting `cpu`.
    unsafe { vcpu_slot(cpu) }.is_some_and(|s| s.is_some())
}

/// Runs this CPU's vCPU: never returns.
pub fn run_this_cpu() -> ! {
    let Some(vcpu) = this_vcpu() else {
        arch::park();
    };
    if HOST_GIC.load(Ordering::Acquire) {
        if let Err(e) = arch::gic::init_cpu() {
            error!("guest {}: cannot set up this CPU's GIC: {e}", vcpu.vm.name);
            if vcpu.index == 0 {
                stop(vcpu, StopCause::HostGic);
            }
            arch::park();
        }
    }
    wait_to_run(vcpu)
}

/// This CPU's vCPU is out of the guest: it waits (never spinning hot) until it is started
/// (its guest's boot, a CPU_ON, a reset), or parks for good once its guest has stopped.
fn wait_to_run(vcpu: &mut Vcpu) -> ! {
    let vm = vcpu.vm;
    vm.life.leave(vcpu.index);
    loop {
        match vm.life() {
            Life::Stopped => {
                if HOST_GIC.load(Ordering::Relaxed) {
                    arch::gic::vcpu_off();
                }
                arch::park();
            }
            Life::Running if vm.power.state(vcpu.index) == Some(PowerState::OnPending) => {
                // A stop that began meanwhile either sees this vCPU inside (and kicks it) or
                // is seen here (see `vm::lifecycle`).
                if !vm.life.try_enter(vcpu.index) {
                    continue;
                }
                let Some(StartRequest { entry, context }) = vm.power.enter(vcpu.index) else {
                    vm.life.leave(vcpu.index);
                    continue;
                };
                if vcpu.index != 0 {
                    info!(
                        "guest {}: vCPU {} starts at {entry:#x} on CPU {}",
                        vm.name,
                        vcpu.index,
                        arch::cpu_index()
                    );
                }
                arch::configure_el2(vm.vttbr.load(Ordering::Acquire), vm.geo, vcpu.index);
                if HOST_GIC.load(Ordering::Relaxed) {
                    arch::gic::vcpu_reset();
                }
                vcpu.ptimer = PhysTimer::new();
                vcpu.vtimer_held = false;
                // Interrupts posted while it was off (SGIs in its mailbox) go in now.
                sync_vgic(vcpu);
                arch::enter_guest(entry, context)
            }
            _ => arch::wait_for_event(),
        }
    }
}

/// Takes this vCPU out of the guest for good or until it is started again: its counters go
/// to the guest's totals, its virtual interface is silenced, and it waits.
fn leave_guest(vcpu: &mut Vcpu) -> ! {
    let stats = core::mem::take(&mut vcpu.stats);
    vcpu.vm.totals.lock().add(&stats);
    if HOST_GIC.load(Ordering::Relaxed) {
        arch::gic::vcpu_reset();
    }
    wait_to_run(vcpu)
}

/// Every exception a guest takes comes here (on its CPU's exception stack).
pub fn guest_trap(kind: u64, frame: &mut TrapFrame) {
    let Some(vcpu) = this_vcpu() else {
        arch::emergency_line(format_args!("guest exception on CPU {} with no guest", arch::cpu_index()));
        arch::power_off();
    };
    match kind {
        8 => guest_sync(vcpu, frame),
        11 => {
            error!(
                "guest {} vCPU {}: SError (ESR {:#x}): stopped",
                vcpu.vm.name,
                vcpu.index,
                arch::trap_syndrome().esr
            );
            stop(vcpu, StopCause::SError);
        }
        // IRQ (or FIQ) while the guest ran: a kick, the virtual timer or the vGIC's maintenance.
        _ => guest_irq(vcpu),
    }
    // Another vCPU is stopping or resetting the guest: this one leaves it now.
    if vcpu.vm.life() != Life::Running {
        leave_guest(vcpu);
    }
}

fn guest_sync(vcpu: &mut Vcpu, frame: &mut TrapFrame) {
    let vm = vcpu.vm;
    let syn = arch::trap_syndrome();
    match trap::decode(syn.esr, syn.far, syn.hpfar) {
        GuestTrap::Abort { ipa: Some(ipa), fsc: 0x04..=0x07, .. } if vm.layout.in_ram(ipa) => {
            demand_fault(vcpu, frame, ipa)
        }
        GuestTrap::Abort { ipa: Some(ipa), access: Some(a), instruction: false, .. }
            if (UART_BASE..UART_BASE + UART_SIZE).contains(&ipa) =>
        {
            mmio_uart(vcpu, frame, ipa - UART_BASE, a, syn.esr)
        }
        GuestTrap::Abort { ipa: Some(ipa), access: Some(a), instruction: false, .. }
            if vm.vgic.is_some() && vgic::frame_of(ipa, vm.vcpus).is_some() =>
        {
            mmio_vgic(vcpu, frame, ipa, a, syn.esr)
        }
        GuestTrap::Abort { ipa, instruction, fsc, .. } => refuse_access(
            vcpu,
            frame,
            instruction,
            syn.esr,
            format_args!("IPA {ipa:x?} (FAR {:#x}), fault status {fsc:#x}", syn.far),
        ),
        GuestTrap::Hvc { .. } => {
            vcpu.stats.hvc += 1;
            psci(vcpu, frame);
        }
        GuestTrap::Smc { .. } => {
            vcpu.stats.smc += 1;
            // A trapped SMC leaves ELR at the SMC itself.
            frame.elr += 4;
            psci(vcpu, frame);
        }
        GuestTrap::SysReg { encoding, read, reg: r } if vtimer::classify(encoding).is_some() => {
            vcpu.stats.sysreg += 1;
            physical_timer(vcpu, frame, encoding, read, r);
        }
        GuestTrap::SysReg { encoding, .. } if trap::is_dc_set_way(encoding) => {
            vcpu.stats.sysreg += 1;
            frame.elr += 4;
        }
        GuestTrap::SysReg { encoding, read: false, reg: r }
            if vm.vgic.is_some() && trap::is_gic_sgi_register(encoding) =>
        {
            vcpu.stats.sysreg += 1;
            send_sgi(vcpu, reg(frame, r));
            frame.elr += 4;
        }
        GuestTrap::SysReg { encoding, read, .. } => {
            vcpu.stats.sysreg += 1;
            undefined(
                vcpu,
                frame,
                format_args!(
                    "system register access {encoding:#x} ({})",
                    if read { "read" } else { "write" }
                ),
            );
        }
        GuestTrap::Other { class } => undefined(vcpu, frame, format_args!("exception class {class:#x}")),
    }
}

/// The demand-fault fast path, called before any frame is built: a 4 KiB page for a guest
/// without block mappings ([`fast_page_fault`]); a guest with blocks goes to
/// [`fast_block_fault`]. `false` leaves the fault to the general path (walks, table pages,
/// pool refills, errors, MMIO, a stage-2 space another vCPU is changing...).
#[inline(always)]
pub fn fast_fault(ipa_page: u64) -> bool {
    let Some(vcpu) = this_vcpu() else { return false };
    if !vcpu.vm.config.no_block_mappings {
        return fast_block_fault(vcpu, ipa_page);
    }
    fast_page_fault(vcpu, ipa_page)
}

/// A 4 KiB page through the cached level-3 table (inlined into both callers: `fast_fault`
/// for guests without blocks, `fast_block_fault` where a block cannot go).
#[inline(always)]
fn fast_page_fault(vcpu: &mut Vcpu, ipa_page: u64) -> bool {
    let vm = vcpu.vm;
    if !vm.layout.in_ram(ipa_page) {
        return false;
    }
    let Some(pool) = vcpu.pool else { return false };
    // Never waits: a space another vCPU holds sends the fault to the general path.
    let Some(mut space) = vm.space.try_lock() else { return false };
    let Some(s2) = space.s2.as_mut() else { return false };
    let mut env = fast_env(pool, vm.vttbr.load(Ordering::Relaxed));
    // Only the cached level-3 table's free slots are served here: everything that could fail
    // after the frame is taken (a walk, a table page) is the general path's, so this path makes
    // no call (its caller saved only the caller-saved registers).
    let Some(slot) = s2.cached_page_slot(&env, ipa_page) else { return false };
    if !vm.budget.take(1) {
        return false;
    }
    let Ok(page) = pool.alloc_guest_page_own_pool(vm.id) else {
        vm.budget.untake(1);
        return false;
    };
    match slot.fill(&mut env, page) {
        Ok(()) => {
            vcpu.stats.page_faults += 1;
            true
        }
        Err(page) => give_back_unmapped(vm, pool, page),
    }
}

/// The fast paths' stage-2 environment, built from the CPU's pool handle rather than the
/// global: nothing to load that the cached-table shortcuts do not use.
#[inline(always)]
fn fast_env(pool: CpuFrames<'static, 'static>, vttbr: u64) -> arch::HwStage2<'static> {
    arch::HwStage2 { frames: pool.manager(), cpu: pool.index(), vttbr }
}

/// A claimed page the fast path could not map (cannot happen: it was claimed for this guest):
/// back to the pool, and the general path explains.
#[cold]
#[inline(never)]
fn give_back_unmapped(
    vm: &Vm,
    pool: CpuFrames<'static, 'static>,
    page: labyrinth::frame::ClaimedPage,
) -> bool {
    vm.budget.untake(1);
    let _ = pool.return_unused_page_atomic(page.pfn(), Owner::guest(page.vm()));
    false
}

/// The block fault's fast path, for a guest that allows blocks: when the aligned 2 MiB around
/// `ipa` lies in its RAM, its promise covers 512 more frames and nothing is mapped there
/// (the level-2 entry is invalid), a block from this CPU's block pool, claimed with one CAS
/// on its head, mapped with one entry; where a block cannot go, the page path. `false`
/// changes nothing and leaves the fault to the general path (no level-2 table yet, no block
/// at hand...).
/// Out of line: inlined it saves ~3 instructions here but adds registers to `guest_fast`'s
/// frame, costing the 4 KiB and HVC paths 6 each (measured).
#[inline(never)]
fn fast_block_fault(vcpu: &mut Vcpu, ipa: u64) -> bool {
    let vm = vcpu.vm;
    let block = ipa & !(BLOCK - 1);
    // Where no block can go (RAM ends inside this 2 MiB, or part of it is mapped already: a
    // level-3 table is there), a page can, through the cached level-3 table.
    if block < vm.layout.ram_base || block + BLOCK > vm.layout.ram_end() {
        return fast_page_fault(vcpu, ipa);
    }
    let Some(pool) = vcpu.pool else { return false };
    let vacant_ok = {
        let Some(mut space) = vm.space.try_lock() else { return false };
        let Some(s2) = space.s2.as_mut() else { return false };
        let mut env = fast_env(pool, vm.vttbr.load(Ordering::Relaxed));
        let Some(vacant) = s2.cached_vacant_block(&env, block) else {
            drop(space);
            return fast_page_fault(vcpu, ipa);
        };
        if !vm.budget.take(BLOCK_FRAMES) {
            return false;
        }
        let Ok(claimed) = pool.alloc_guest_block_own_pool(vm.id) else {
            vm.budget.untake(BLOCK_FRAMES);
            return false;
        };
        vacant.fill(&mut env, claimed).map_err(|b| b.pfn())
    };
    if let Err(head) = vacant_ok {
        // Claimed but not mapped (cannot happen: it was claimed for this guest).
        return give_back_block(vm, head);
    }
    vcpu.stats.block_faults += 1;
    // The pool just ran dry: refill it now, several blocks at once, so the next faults find
    // blocks here instead of taking the general path to refill (the call the general path
    // would make, with the same lock; paid once per `block_high` blocks).
    if pool.needs_block_refill() {
        return refill_blocks(pool);
    }
    true
}

/// Refills the CPU's pools after the fault was served; `true`: the fault was.
#[cold]
#[inline(never)]
fn refill_blocks(pool: CpuFrames<'static, 'static>) -> bool {
    let _ = pool.manager().refill(pool.index());
    true
}

/// A block claimed on the fast path and not mapped: never used, but released the slow way
/// (scrubbed), which a block has no atomic return for. `false`: the general path explains.
#[cold]
#[inline(never)]
fn give_back_block(vm: &Vm, head: Pfn) -> bool {
    vm.budget.untake(BLOCK_FRAMES);
    if let Err(e) = frames().release(head, BLOCK_FRAMES, vm.owner(), &arch::Scrubber) {
        error!("guest {}: block {head} claimed and not mapped, not returned: {e}", vm.name);
    }
    false
}

/// An HVC on the fast path: PSCI calls whose whole effect is a return value (VERSION,
/// FEATURES, AFFINITY_INFO, errors) are answered from x0-x3; calls that change vCPU state go
/// to the general path. Not inlined: the fault path beside it in `guest_fast` then needs no
/// stack frame of its own (this is a tail call).
#[inline(never)]
pub fn fast_hvc(frame: &mut TrapFrame) -> bool {
    let Some(vcpu) = this_vcpu() else { return false };
    let vm = vcpu.vm;
    let ram = vm.layout.ram_base..vm.layout.ram_end();
    match vpsci::query(frame.x[0], frame.x[1], frame.x[2], frame.x[3], &vm.power, ram) {
        Some(v) => {
            vcpu.stats.hvc += 1;
            frame.x[0] = v;
            true
        }
        None => false,
    }
}

/// First touch of guest RAM: a 2 MiB block when allowed and the whole aligned block is
/// unmapped and a block is at hand, else a 4 KiB page, from the atomic path.
#[inline(always)]
fn demand_fault(vcpu: &mut Vcpu, frame: &mut TrapFrame, ipa: u64) {
    let vm = vcpu.vm;
    let frames = frames();
    let cpu = arch::cpu_index();
    let owner = vm.owner();
    let mut env = env(vm);
    let mut space = vm.space.lock();
    let Some(s2) = space.s2.as_mut() else { return };
    if !vm.config.no_block_mappings {
        let block = ipa & !(BLOCK - 1);
        if block >= vm.layout.ram_base
            && block + BLOCK <= vm.layout.ram_end()
            && s2.is_unmapped(&env, block, 2)
            && vm.budget.take(BLOCK_FRAMES)
        {
            // The fast path leaves an empty block pool to this path: refill it here (several
            // blocks at once) rather than fall back to pages while the buddy allocator has blocks.
            let block_at_hand = frames.alloc_block_atomic_exclusive(cpu, owner).or_else(|e| {
                if e == AtomicError::Empty && frames.refill(cpu).is_ok() {
                    frames.alloc_block_atomic_exclusive(cpu, owner)
                } else {
                    Err(e)
                }
            });
            match block_at_hand {
                Ok(first) => match s2.map_block(&mut env, block, first.phys(), Attrs::RAM) {
                    Ok(()) => {
                        vcpu.stats.block_faults += 1;
                        return;
                    }
                    Err(e) => {
                        vm.budget.untake(BLOCK_FRAMES);
                        let _ = frames.release(first, BLOCK_FRAMES, owner, &arch::Scrubber);
                        warn!("guest {}: block at {block:#x} not mapped ({e}): using pages", vm.name);
                    }
                },
                Err(_) => vm.budget.untake(BLOCK_FRAMES),
            }
        }
    }
    // Mapped meanwhile by another vCPU (it held the space while this one waited): done, the
    // access is retried.
    if !s2.is_unmapped(&env, ipa & !(FRAME_SIZE - 1), 3) {
        return;
    }
    if !vm.budget.take(1) {
        drop(space);
        error!(
            "guest {}: out of memory at IPA {ipa:#x}: the {} KiB promised to it are used up",
            vm.name,
            vm.budget.pages() * 4
        );
        stop(vcpu, StopCause::OutOfMemory);
    }
    let Some(pfn) = alloc_page(cpu, owner) else {
        drop(space);
        error!("guest {}: out of memory at IPA {ipa:#x}: no frame left", vm.name);
        stop(vcpu, StopCause::OutOfMemory);
    };
    match s2.map_page(&mut env, ipa & !(FRAME_SIZE - 1), pfn.phys(), Attrs::RAM) {
        Ok(()) => vcpu.stats.page_faults += 1,
        Err(Stage2Error::OutOfMemory) => {
            vm.budget.untake(1);
            let _ = frames.return_unused_page_atomic(cpu, pfn, owner);
            if frames.refill(cpu).is_err() || frames.needs_refill(cpu) {
                drop(space);
                error!("guest {}: out of memory for stage-2 tables at IPA {ipa:#x}", vm.name);
                stop(vcpu, StopCause::OutOfMemory);
            }
            // Retried when the guest re-executes the access.
        }
        Err(e) => {
            vm.budget.untake(1);
            let _ = frames.return_unused_page_atomic(cpu, pfn, owner);
            drop(space);
            refuse_access(vcpu, frame, false, arch::trap_syndrome().esr, format_args!("IPA {ipa:#x}: {e}"));
        }
    }
    if frames.needs_refill(cpu) {
        let _ = frames.refill(cpu);
    }
}

fn reg(frame: &TrapFrame, r: u8) -> u64 {
    frame.x.get(r as usize).copied().unwrap_or(0)
}

fn set_reg(frame: &mut TrapFrame, r: u8, v: u64) {
    if let Some(x) = frame.x.get_mut(r as usize) {
        *x = v;
    }
}

fn mmio_uart(vcpu: &mut Vcpu, frame: &mut TrapFrame, offset: u64, a: MmioAccess, esr: u64) {
    vcpu.stats.mmio += 1;
    let name = vcpu.vm.name;
    let ok = {
        let mut uart = vcpu.vm.uart.lock();
        emulate_mmio(frame, a, |write| match write {
            Some(v) => uart.write(offset, a.size, v as u32, &mut |line| emit(name, line)).then_some(0),
            None => uart.read(offset, a.size).map(u64::from),
        })
    };
    if !ok {
        refuse_access(vcpu, frame, false, esr, format_args!("UART offset {offset:#x}, {} bytes", a.size));
    }
}

/// An access to the virtual GIC's distributor or a redistributor.
fn mmio_vgic(vcpu: &mut Vcpu, frame: &mut TrapFrame, ipa: u64, a: MmioAccess, esr: u64) {
    vcpu.stats.vgic_mmio += 1;
    let vm = vcpu.vm;
    let (Some(g), Some((f, offset))) = (vm.vgic.as_ref(), vgic::frame_of(ipa, vm.vcpus)) else { return };
    let mut to_sync = VcpuSet::EMPTY;
    let ok = emulate_mmio(frame, a, |write| match write {
        Some(v) => g.write(f, offset, a.size, v).map(|set| {
            // An enable, a pending bit, a priority or a route changed what these vCPUs see.
            to_sync = set;
            0
        }),
        None => g.read(f, offset, a.size),
    });
    if !ok {
        refuse_access(
            vcpu,
            frame,
            false,
            esr,
            format_args!("GIC {f:?} offset {offset:#x}, {} bytes", a.size),
        );
        return;
    }
    deliver(vcpu, to_sync);
}

/// The vCPUs in `set` have new interrupt state: this one syncs its list registers now, the
/// others are kicked (they sync when they trap).
fn deliver(vcpu: &mut Vcpu, set: VcpuSet) {
    let vm = vcpu.vm;
    for i in set.without(vcpu.index).iter().filter(|&i| i < vm.vcpus) {
        if let Some(mpidr) = crate::boot::cpu_mpidr(vm.cpu_of(i)) {
            arch::gic::kick(mpidr);
        }
    }
    if set.contains(vcpu.index) {
        sync_vgic(vcpu);
    }
}

/// A trapped access to the EL1 physical timer (`CNTP_CTL/CVAL/TVAL_EL0`), emulated: its
/// interrupt (PPI 30) follows the emulated timer's line.
fn physical_timer(vcpu: &mut Vcpu, frame: &mut TrapFrame, encoding: u32, read: bool, r: u8) {
    let Some(which) = vtimer::classify(encoding) else { return };
    let now = arch::timer::counter();
    if read {
        set_reg(frame, r, vcpu.ptimer.read(which, now));
    } else {
        vcpu.ptimer.write(which, reg(frame, r), now);
    }
    frame.elr += 4;
    sync_vgic(vcpu);
}

/// Carries out a trapped MMIO access on a device model: `device(None)` reads (the value, or
/// `None` to refuse), `device(Some(v))` writes `v` (`Some(_)` when accepted). On success the
/// load's register gets the value as the instruction would have, and the instruction is
/// skipped; `false` leaves the frame as it was for the caller to inject an abort.
fn emulate_mmio(
    frame: &mut TrapFrame,
    a: MmioAccess,
    device: impl FnOnce(Option<u64>) -> Option<u64>,
) -> bool {
    let Some(value) = device(a.write.then(|| reg(frame, a.reg))) else { return false };
    if !a.write {
        set_reg(frame, a.reg, load_value(a, value));
    }
    frame.elr += 4;
    true
}

/// A load's value as the register receives it: zero- or sign-extended from `a.size` bytes,
/// truncated to 32 bits for a W register.
fn load_value(a: MmioAccess, v: u64) -> u64 {
    let mask = if a.size >= 8 { u64::MAX } else { (1u64 << (a.size * 8)) - 1 };
    let mut v = v & mask;
    if a.sign_extend && a.size < 8 && v & (1 << (a.size * 8 - 1)) != 0 {
        v |= !mask;
    }
    if !a.sixty_four {
        v &= 0xffff_ffff;
    }
    v
}

/// A trapped `ICC_SGI1R_EL1` (or ASGI1R/SGI0R) write: an SGI the guest sends, posted to its
/// targets' mailboxes without a lock, then delivered (see [`deliver`]).
fn send_sgi(vcpu: &mut Vcpu, value: u64) {
    let Some(g) = vcpu.vm.vgic.as_ref() else { return };
    vcpu.stats.sgis += 1;
    let targets = g.send_sgi(vcpu.index, value);
    deliver(vcpu, targets);
}

/// Physical interrupts that arrived while the guest ran: a kick only takes the vCPU out of
/// the guest (its caller then looks at the guest's state; the sync below drains its mailbox);
/// the virtual timer's PPI is held off at the host GIC until the guest deals with it; the EL2
/// timer stands for the emulated physical timer; the maintenance interrupt asks for a sync.
fn guest_irq(vcpu: &mut Vcpu) {
    if !HOST_GIC.load(Ordering::Relaxed) {
        warn!("guest {}: interrupt with no host GIC set up, ignored", vcpu.vm.name);
        return;
    }
    // Bounded: each INTID is completed before the next acknowledge, and a held timer does
    // not come back, so more than a few rounds means a misbehaving GIC.
    for _ in 0..16 {
        let intid = arch::gic::ack();
        if intid >= arch::gic::SPURIOUS {
            break;
        }
        vcpu.stats.irqs += 1;
        match intid {
            arch::gic::KICK_SGI => vcpu.stats.kicks += 1,
            // Its condition (a completed level interrupt, empty list registers) holds until
            // the list registers are rewritten: sync before completing it, or it comes back.
            arch::gic::MAINTENANCE_PPI => {
                vcpu.stats.maintenance += 1;
                sync_vgic(vcpu);
            }
            arch::gic::VTIMER_PPI => {
                arch::gic::set_ppi_enabled(arch::gic::VTIMER_PPI, false);
                // A guest without a virtual GIC cannot take it: it stays off.
                vcpu.vtimer_held = vcpu.vm.vgic.is_some();
                vcpu.stats.vtimer += 1;
            }
            arch::timer::HYP_TIMER_PPI => arch::timer::set_hyp_timer(None),
            _ => {}
        }
        arch::gic::eoi(intid);
    }
    sync_vgic(vcpu);
}

/// Brings the guest's interrupts up to date on this CPU: both timers' lines resampled (a
/// disabled or re-armed timer is no longer pending), the list registers folded back into the
/// model, the mailbox drained, and the list registers refilled (see `vm::vgic`).
fn sync_vgic(vcpu: &mut Vcpu) {
    let Some(g) = vcpu.vm.vgic.as_ref() else { return };
    let now = arch::timer::counter();
    let (ctl, cval) = arch::timer::vtimer_registers();
    let vline = vtimer::line_level(ctl, cval, now);
    g.set_line_level(vcpu.index, vgic::VTIMER_INTID, vline);
    if !vline && vcpu.vtimer_held {
        vcpu.vtimer_held = false;
        arch::gic::set_ppi_enabled(arch::gic::VTIMER_PPI, true);
    }
    let pline = vcpu.ptimer.level(now);
    g.set_line_level(vcpu.index, vgic::PTIMER_INTID, pline);
    // While its line is high the EL2 timer stays off; it is armed again once the guest has
    // dealt with the interrupt (a resample finds the line low).
    arch::timer::set_hyp_timer(if pline { None } else { vcpu.ptimer.deadline() });
    let mut buf = [0u64; 8];
    let lrs = &mut buf[..arch::gic::lr_count()];
    arch::gic::read_lrs(lrs);
    let underflow = g.sync_lrs(vcpu.index, lrs);
    arch::gic::write_lrs(lrs);
    arch::gic::set_underflow(underflow);
}

fn emit(name: &str, line: &[u8]) {
    let text = core::str::from_utf8(line).unwrap_or("<non-UTF-8 output>");
    arch::raw_line(format_args!("[{name}] {text}"));
}

fn refuse_access(
    vcpu: &mut Vcpu,
    frame: &mut TrapFrame,
    instruction: bool,
    esr: u64,
    what: core::fmt::Arguments<'_>,
) {
    vcpu.stats.aborts_injected += 1;
    if vcpu.logged < LOG_LIMIT {
        vcpu.logged += 1;
        warn!(
            "guest {} vCPU {}: {} at PC {:#x} refused: {what}: external abort injected",
            vcpu.vm.name,
            vcpu.index,
            if instruction { "instruction fetch" } else { "data access" },
            frame.elr
        );
    }
    arch::inject_external_abort(frame, instruction, esr);
}

fn undefined(vcpu: &mut Vcpu, frame: &mut TrapFrame, what: core::fmt::Arguments<'_>) {
    vcpu.stats.undefs_injected += 1;
    if vcpu.logged < LOG_LIMIT {
        vcpu.logged += 1;
        warn!(
            "guest {} vCPU {}: {what} at PC {:#x}: undefined instruction injected",
            vcpu.vm.name, vcpu.index, frame.elr
        );
    }
    arch::inject_undefined(frame);
}

fn psci(vcpu: &mut Vcpu, frame: &mut TrapFrame) {
    let vm = vcpu.vm;
    let (fid, x1, x2, x3) = (frame.x[0], frame.x[1], frame.x[2], frame.x[3]);
    match vpsci::call(fid, x1, x2, x3, vcpu.index, &vm.power, vm.layout.ram_base..vm.layout.ram_end()) {
        PsciAction::Return(v) => frame.x[0] = v,
        PsciAction::CpuOn { .. } => {
            // The target's CPU waits in `wait_to_run`: wake it to take the request.
            arch::send_event();
            frame.x[0] = 0;
        }
        PsciAction::CpuOff => cpu_off(vcpu),
        PsciAction::SystemOff => stop(vcpu, StopCause::SystemOff),
        PsciAction::SystemReset => reset(vcpu),
    }
}

/// vCPU 0 starts at the kernel with x0 = the device tree, as a boot loader would start it:
/// a start request like any CPU_ON, taken by its CPU in `wait_to_run`.
fn boot_vcpu0(vm: &Vm) {
    vm.power.reset();
    vm.power.cpu_off(0);
    if vm.power.cpu_on(0, vm.layout.kernel, vm.layout.dtb).is_err() {
        error!("guest {}: vCPU 0 cannot be started", vm.name);
    }
}

/// PSCI CPU_OFF: this vCPU leaves the guest until a CPU_ON starts it again; the last running
/// vCPU to go off stops the guest.
fn cpu_off(vcpu: &mut Vcpu) -> ! {
    if vcpu.vm.power.all_off() {
        stop(vcpu, StopCause::CpuOff);
    }
    leave_guest(vcpu)
}

/// Wins the right to stop or reset the guest and takes every other vCPU out of it: `false`
/// if another vCPU won (this one then leaves the guest through its caller's path).
fn take_guest_down(vcpu: &mut Vcpu) -> bool {
    let vm = vcpu.vm;
    if !vm.life.begin_stop(vcpu.index) {
        return false;
    }
    let mut kicked = VcpuSet::EMPTY;
    let mut rounds = 0u64;
    loop {
        let inside = vm.life.inside(vm.vcpus);
        if inside.is_empty() {
            return true;
        }
        for i in inside.iter() {
            // One kick each, sent again now and then: a vCPU that took its kick just before it
            // re-entered sees the stop on entry, so this is only a guard against a lost SGI.
            if !kicked.contains(i) || rounds % 100_000 == 0 {
                kicked = kicked.with(i);
                if let Some(mpidr) = crate::boot::cpu_mpidr(vm.cpu_of(i)) {
                    arch::gic::kick(mpidr);
                }
            }
        }
        rounds += 1;
        if rounds == 10_000_000 {
            warn!(
                "guest {}: vCPUs {inside:?} still in the guest after a stop was asked for: waiting",
                vm.name
            );
        }
        core::hint::spin_loop();
    }
}

/// Takes the guest's stage-2 space apart: every frame and table page goes back (scrubbed).
/// Called with every vCPU of the guest out of it.
fn teardown(vm: &Vm, space: &mut Space) {
    let name = vm.name;
    vm.uart.lock().flush(&mut |line| emit(name, line));
    let Some(s2) = space.s2.take() else { return };
    let mut env = env(vm);
    vm.vttbr.store(0, Ordering::Release);
    let frames = frames();
    let owner = vm.owner();
    let mut returned = 0u64;
    let proof = s2.teardown(&mut env, &mut |pa, size| {
        let n = (size / FRAME_SIZE) as usize;
        match frames.release(Pfn(pa / FRAME_SIZE), n, owner, &arch::Scrubber) {
            Ok(()) => returned += n as u64,
            Err(e) => error!("guest {name}: frames at {pa:#x} not returned: {e}"),
        }
    });
    space.frames_returned += returned;
    vm.budget.reclaimed();
    VMIDS.lock().release(proof);
}

/// PSCI SYSTEM_RESET from any vCPU: every vCPU is taken out, the memory reclaimed, the images
/// loaded again, and vCPU 0 alone restarted at the kernel, as firmware would.
fn reset(vcpu: &mut Vcpu) -> ! {
    let vm = vcpu.vm;
    if !take_guest_down(vcpu) {
        leave_guest(vcpu);
    }
    info!("guest {}: SYSTEM_RESET: reclaiming and reloading", vm.name);
    let reloaded = {
        let mut space = vm.space.lock();
        teardown(vm, &mut space);
        space.resets += 1;
        reload(vm, &mut space)
    };
    if let Err(why) = reloaded {
        error!("guest {}: cannot restart after reset: {why}", vm.name);
        stop_taken_down(vcpu, StopCause::ResetFailed);
    }
    *vm.uart.lock() = VPl011::new();
    if let Some(g) = vm.vgic.as_ref() {
        g.reset();
    }
    boot_vcpu0(vm);
    vm.life.finish(true);
    arch::send_event();
    leave_guest(vcpu)
}

/// A fresh VMID, device tree and stage-2 space after a reset.
fn reload(vm: &Vm, space: &mut Space) -> Result<(), &'static str> {
    space.vmid = VMIDS.lock().alloc().ok_or("no VMID left")?;
    space.dtb = fdt_gen::generate(&vm.layout, vm.vcpus, vm.config.bootargs, space.resets, vm.vgic.is_some())
        .map_err(|_| "cannot rewrite its device tree")?;
    load(vm, space, arch::cpu_index()).map_err(|_| "out of memory loading its images")
}

/// The guest's stage-2 mappings, merged into runs, at debug level (`loglevel=debug`).
fn dump_mappings(vm: &Vm, space: &Space) {
    if log::max_level() < log::LevelFilter::Debug {
        return;
    }
    let Some(s2) = space.s2.as_ref() else { return };
    let env = env(vm);
    let mut n = 0u32;
    s2.for_each_run(&env, &mut |m| {
        if n < 64 {
            log::debug!(
                "guest {}: IPA {:#x}-{:#x} -> PA {:#x} ({} KiB, {}{}{})",
                vm.name,
                m.ipa,
                m.ipa + m.size - 1,
                m.pa,
                m.size >> 10,
                if m.attrs.read { "r" } else { "-" },
                if m.attrs.write { "w" } else { "-" },
                if m.attrs.exec { "x" } else { "-" }
            );
        }
        n += 1;
    });
    log::debug!("guest {}: {n} mapping runs, {} table pages", vm.name, s2.table_pages());
}

/// The guest is done: every vCPU out, reclaim, audit, report; the last guest to stop powers
/// the machine off.
fn stop(vcpu: &mut Vcpu, cause: StopCause) -> ! {
    if !take_guest_down(vcpu) {
        leave_guest(vcpu);
    }
    stop_taken_down(vcpu, cause)
}

fn stop_taken_down(vcpu: &mut Vcpu, cause: StopCause) -> ! {
    let vm = vcpu.vm;
    if HOST_GIC.load(Ordering::Relaxed) {
        arch::gic::vcpu_off();
    }
    let (resets, returned) = {
        let mut space = vm.space.lock();
        dump_mappings(vm, &space);
        teardown(vm, &mut space);
        (space.resets, space.frames_returned)
    };
    frames().uncommit(vm.budget.promised());
    let audit = frames().audit(None);
    let left = audit.guests.iter().find(|g| g.vm == vm.id).map_or(0, |g| g.memory + g.page_tables);
    let mut s = *vm.totals.lock();
    s.add(&vcpu.stats);
    let mut line = alloc::string::String::new();
    let _ = write!(
        line,
        "guest {}: stopped by {cause:?}; vCPUs {}; faults {} (4 KiB pages {}, 2 MiB blocks {}); aborts injected {}, undefined {}; exits: mmio {}, hvc {}, smc {}, sysreg {}; resets {resets}; frames returned {returned}, still owned {left}; interrupts {} (virtual timer {}, kicks {}, maintenance {}), own SGIs {}, vgic mmio {}",
        vm.name,
        vm.vcpus,
        s.page_faults + s.block_faults,
        s.page_faults,
        s.block_faults,
        s.aborts_injected,
        s.undefs_injected,
        s.mmio,
        s.hvc,
        s.smc,
        s.sysreg,
        s.irqs,
        s.vtimer,
        s.kicks,
        s.maintenance,
        s.sgis,
        s.vgic_mmio,
    );
    info!("{line}");
    REPORTS.lock().push(line);
    vm.life.finish(false);
    arch::send_event();
    if LIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
        info!("all guests stopped");
        for r in REPORTS.lock().iter() {
            info!("report: {r}");
        }
        let audit = frames().audit(None);
        info!("ownership audit: {audit}");
        if audit.is_consistent() && audit.guests.iter().all(|g| g.memory + g.page_tables == 0) {
            info!("ownership audit: consistent, no frame owned by any guest");
        } else {
            error!("ownership audit: FAILED");
        }
        arch::power_off();
    }
    arch::park()
}
