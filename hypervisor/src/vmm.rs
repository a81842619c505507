//! Guests on this machine: creating them from the device tree's guest nodes, loading their
//! images, placing one vCPU per physical CPU, handling their traps, and taking them apart when
//! they stop. The decisions about a trap's meaning are the portable `vm` modules'; the state
//! lives here, one guest per CPU, touched only by that CPU once it runs.

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicUsize, Ordering};

use labyrinth::dt::{GuestConfig, Platform};
use labyrinth::frame::{AtomicError, CpuFrames, FrameManager, Owner, Pfn, VmId, BLOCK_FRAMES, FRAME_SIZE};
use labyrinth::stage2::{level_size, Attrs, Geometry, Stage2, Stage2Error, VmidAllocator};
use labyrinth::vm::layout::{self, Layout, UART_BASE, UART_SIZE};
use labyrinth::vm::trap::{self, GuestTrap, MmioAccess};
use labyrinth::vm::vgic::{self, VGic};
use labyrinth::vm::vpsci::{self, PsciAction};
use labyrinth::vm::{budget::MemoryBudget, fdt_gen, image, vpl011::VPl011};
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::{self, TrapFrame, MAX_CPUS};

const BLOCK: u64 = level_size(2);

/// Why a guest stopped, for its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    SystemOff,
    CpuOff,
    OutOfMemory,
    SError,
    /// The host GIC could not be set up for its virtual GIC.
    HostGic,
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
    resets: u64,
    frames_returned: u64,
}

pub struct Vm {
    name: &'static str,
    config: GuestConfig<'static>,
    id: VmId,
    vmid: u16,
    owner: Owner,
    layout: Layout,
    geo: Geometry,
    s2: Option<Stage2>,
    /// The atomic path of the CPU this guest runs on.
    pool: Option<CpuFrames<'static, 'static>>,
    /// `VTTBR_EL2` of `s2` (0 while it has none), kept at hand for the fault path.
    vttbr: u64,
    uart: VPl011,
    /// Its virtual GICv3, when configured (`labyrinth,virtual-gic`).
    vgic: Option<VGic>,
    stats: Stats,
    /// Frames promised to this guest at creation; every frame it draws is counted here first.
    budget: MemoryBudget,
    dtb: Vec<u8>,
    /// Aborts and undefined instructions are logged for the first few only.
    logged: u32,
}

const LOG_LIMIT: u32 = 8;

/// One slot per CPU; a slot is written by the boot CPU before its CPU starts the guest, and
/// afterwards only by that CPU.
struct PerCpu(UnsafeCell<[Option<Vm>; MAX_CPUS]>);

// SAFETY: see `this_cpu_vm`: each slot has a single user at any time.
unsafe impl Sync for PerCpu {}

static VMS: PerCpu = PerCpu(UnsafeCell::new([const { None }; MAX_CPUS]));
static VMIDS: Mutex<VmidAllocator> = Mutex::new(VmidAllocator::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);
static REPORTS: Mutex<Vec<alloc::string::String>> = Mutex::new(Vec::new());
/// Set once before any guest runs; read on every fault, so a plain pointer, not a `Once`.
static FRAMES: core::sync::atomic::AtomicPtr<FrameManager<'static>> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// The guest that runs on CPU `cpu`.
///
/// # Safety
/// Only CPU `cpu` may call this once it runs its guest, and only the boot CPU before that (the
/// CPU is not started yet); interrupts are masked, so no call overlaps another on a CPU.
unsafe fn vm_slot(cpu: usize) -> Option<&'static mut Option<Vm>> {
    // SAFETY: per the contract, nobody else holds a reference into this slot.
    unsafe { (*VMS.0.get()).get_mut(cpu) }
}

fn this_cpu_vm() -> Option<&'static mut Vm> {
    // SAFETY: called only from this CPU's trap handler or guest entry, on its own slot.
    unsafe { vm_slot(arch::cpu_index()) }?.as_mut()
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
    arch::HwStage2 { frames: frames(), cpu: arch::cpu_index(), vttbr: vm.vttbr }
}

/// Builds every well-formed guest the device tree describes and places guest `i` on CPU `i`.
/// Returns how many will run. A guest that cannot be built is named, with its reason, and
/// left out; the others go on.
pub fn create_all(
    platform: &Platform<'static>,
    frames_mgr: &'static FrameManager<'static>,
    cpus: usize,
    pa_bits: u32,
) -> usize {
    FRAMES.store(frames_mgr as *const _ as *mut _, Ordering::Release);
    let geo = Geometry::for_pa_bits(pa_bits);
    // The physical GIC is set up only if some guest gets a virtual one.
    let mut host_gic = None;
    if platform.guests().iter().any(|g| g.as_ref().is_ok_and(|c| c.virtual_gic)) {
        host_gic = Some(match platform.gic() {
            Some(gic) => arch::gic::init(gic).map_err(|e| alloc::format!("{e}")),
            None => Err(alloc::format!("the host device tree describes no GIC")),
        });
    }
    // CPUs that can get no guest never allocate: empty their pools before any promise is made,
    // so those frames can be promised (the rest are retired once the guests are placed).
    let wanted = platform.guests().iter().filter(|g| g.is_ok()).count().min(cpus);
    retire_cpus(frames_mgr, wanted..cpus);
    let mut next_cpu = 0;
    for g in platform.guests() {
        let cfg = match g {
            Ok(cfg) => *cfg,
            Err(e) => {
                error!("{e}: not started");
                continue;
            }
        };
        if next_cpu >= cpus {
            error!("guest {}: no physical CPU left for its vCPU ({cpus} CPUs): not started", cfg.name);
            continue;
        }
        if let (true, Some(Err(e))) = (cfg.virtual_gic, &host_gic) {
            error!("guest {}: needs a virtual GIC but {e}: not started", cfg.name);
            continue;
        }
        match build(&cfg, geo, cpus, next_cpu) {
            Ok(vm) => {
                info!(
                    "guest {}: {} MiB RAM at {:#x}, kernel at {:#x}, device tree at {:#x}, {} mappings, on CPU {next_cpu}, VMID {}",
                    vm.name,
                    vm.layout.ram_size >> 20,
                    vm.layout.ram_base,
                    vm.layout.kernel,
                    vm.layout.dtb,
                    if cfg.no_block_mappings { "4 KiB" } else { "4 KiB and 2 MiB" },
                    vm.vmid
                );
                // SAFETY: CPU `next_cpu` does not run a guest yet (boot CPU, before starting it).
                if let Some(slot) = unsafe { vm_slot(next_cpu) } {
                    *slot = Some(vm);
                }
                next_cpu += 1;
            }
            Err(msg) => error!("{msg}: not started"),
        }
    }
    retire_cpus(frames_mgr, next_cpu..wanted);
    LIVE.store(next_cpu, Ordering::Release);
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

/// Builds guest `cfg` for CPU `cpu`; the error names the guest and what is wrong.
fn build(cfg: &GuestConfig<'static>, geo: Geometry, cpus: usize, cpu: usize) -> Result<Vm, BuildError> {
    build_inner(cfg, geo, cpus, cpu).map_err(|e| {
        if e.starts_with("guest ") {
            e
        } else {
            alloc::format!("guest {}: {e}", cfg.name)
        }
    })
}

fn build_inner(cfg: &GuestConfig<'static>, geo: Geometry, cpus: usize, cpu: usize) -> Result<Vm, BuildError> {
    use alloc::format;
    cfg.validate(cpus, geo.ipa_bits).map_err(|e| format!("{e}"))?;
    if cfg.cpus != 1 {
        return Err(format!("cpus = {}: this version runs one vCPU per guest", cfg.cpus));
    }
    if cfg.device_tree.is_some() {
        warn!(
            "guest {}: its multiboot,device-tree module is ignored; Labyrinth writes the guest's device tree",
            cfg.name
        );
    }
    let kernel = module_bytes(cfg.kernel.region.base(), cfg.kernel.region.size())?;
    let header = image::parse(kernel).map_err(|e| format!("kernel: {e}"))?;
    let ramdisk_size = cfg.ramdisk.map(|r| r.region.size());
    let layout = layout::plan(cfg.memory_bytes(), geo.ipa_bits, &header, ramdisk_size)
        .map_err(|e| format!("memory: {e}"))?;
    let dtb = fdt_gen::generate(&layout, 1, cfg.bootargs, 0, cfg.virtual_gic)
        .map_err(|_| format!("cannot write its device tree"))?;
    let id = VmId::new(cpu as u16 + 1).ok_or_else(|| format!("too many guests"))?;
    let budget = promise_memory(cfg.name, &layout, geo)?;
    let Some(vmid) = VMIDS.lock().alloc() else {
        frames().uncommit(budget.promised());
        return Err(format!("no VMID left"));
    };
    let mut vm = Vm {
        name: cfg.name,
        config: *cfg,
        id,
        vmid,
        owner: Owner::guest(id),
        layout,
        geo,
        s2: None,
        pool: frames().cpu(cpu),
        vttbr: 0,
        uart: VPl011::new(),
        vgic: cfg.virtual_gic.then(VGic::new),
        stats: Stats::default(),
        budget,
        dtb,
        logged: 0,
    };
    if let Err(e) = load(&mut vm, cpu) {
        teardown(&mut vm);
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
/// RAM is faulted in on first touch.
fn load(vm: &mut Vm, cpu: usize) -> Result<(), Stage2Error> {
    let mut env = arch::HwStage2 { frames: frames(), cpu, vttbr: 0 };
    let s2 = Stage2::new(&mut env, vm.id, vm.vmid, vm.geo)?;
    env.vttbr = s2.vttbr();
    vm.vttbr = s2.vttbr();
    vm.s2 = Some(s2);
    let kernel = module_bytes(vm.config.kernel.region.base(), vm.config.kernel.region.size())
        .map_err(|_| Stage2Error::OutOfMemory)?;
    copy_in(vm, &mut env, vm.layout.kernel, kernel)?;
    if let (Some(m), Some((at, _))) = (vm.config.ramdisk, vm.layout.ramdisk) {
        let bytes = module_bytes(m.region.base(), m.region.size()).map_err(|_| Stage2Error::OutOfMemory)?;
        copy_in(vm, &mut env, at, bytes)?;
    }
    let dtb = core::mem::take(&mut vm.dtb);
    let r = copy_in(vm, &mut env, vm.layout.dtb, &dtb);
    vm.dtb = dtb;
    r
}

/// Copies `bytes` to guest IPA `at` (page-aligned), page by page into fresh frames.
fn copy_in(vm: &mut Vm, env: &mut arch::HwStage2<'static>, at: u64, bytes: &[u8]) -> Result<(), Stage2Error> {
    let s2 = vm.s2.as_mut().ok_or(Stage2Error::OutOfMemory)?;
    for (i, chunk) in bytes.chunks(FRAME_SIZE as usize).enumerate() {
        if !vm.budget.take(1) {
            return Err(Stage2Error::OutOfMemory);
        }
        let pfn = alloc_page(env.cpu, vm.owner).ok_or(Stage2Error::OutOfMemory)?;
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

/// Whether CPU `cpu` has a guest to run.
pub fn has_guest(cpu: usize) -> bool {
    // SAFETY: read-only look at a slot the boot CPU filled before starting `cpu`.
    unsafe { vm_slot(cpu) }.is_some_and(|s| s.is_some())
}

/// Runs this CPU's guest: never returns.
pub fn run_this_cpu() -> ! {
    let Some(vm) = this_cpu_vm() else {
        arch::park();
    };
    arch::configure_el2(vm.vttbr, vm.geo);
    if vm.vgic.is_some() {
        if let Err(e) = arch::gic::init_cpu() {
            error!("guest {}: cannot set up this CPU's GIC: {e}", vm.name);
            stop(vm, StopCause::HostGic);
        }
    }
    arch::enter_guest(vm.layout.kernel, vm.layout.dtb)
}

/// Every exception a guest takes comes here (on its CPU's exception stack).
pub fn guest_trap(kind: u64, frame: &mut TrapFrame) {
    let Some(vm) = this_cpu_vm() else {
        arch::emergency_line(format_args!("guest exception on CPU {} with no guest", arch::cpu_index()));
        arch::power_off();
    };
    match kind {
        8 => {}
        11 => {
            error!("guest {}: SError (ESR {:#x}): stopped", vm.name, arch::trap_syndrome().esr);
            stop(vm, StopCause::SError);
        }
        // IRQ (or FIQ) while the guest ran: the virtual timer or the vGIC's maintenance.
        9 | 10 if vm.vgic.is_some() => {
            guest_irq(vm);
            return;
        }
        // Without a virtual GIC no interrupt is enabled: a stray one is noted, the guest resumes.
        _ => {
            warn!("guest {}: unexpected interrupt (vector {kind}) ignored", vm.name);
            return;
        }
    }
    let syn = arch::trap_syndrome();
    match trap::decode(syn.esr, syn.far, syn.hpfar) {
        GuestTrap::Abort { ipa: Some(ipa), fsc: 0x04..=0x07, .. } if vm.layout.in_ram(ipa) => {
            demand_fault(vm, frame, ipa)
        }
        GuestTrap::Abort { ipa: Some(ipa), access: Some(a), instruction: false, .. }
            if (UART_BASE..UART_BASE + UART_SIZE).contains(&ipa) =>
        {
            mmio_uart(vm, frame, ipa - UART_BASE, a, syn.esr)
        }
        GuestTrap::Abort { ipa: Some(ipa), access: Some(a), instruction: false, .. }
            if vm.vgic.is_some() && vgic::frame_of(ipa).is_some() =>
        {
            mmio_vgic(vm, frame, ipa, a, syn.esr)
        }
        GuestTrap::Abort { ipa, instruction, fsc, .. } => refuse_access(
            vm,
            frame,
            instruction,
            syn.esr,
            format_args!("IPA {ipa:x?} (FAR {:#x}), fault status {fsc:#x}", syn.far),
        ),
        GuestTrap::Hvc { .. } => {
            vm.stats.hvc += 1;
            psci(vm, frame);
        }
        GuestTrap::Smc { .. } => {
            vm.stats.smc += 1;
            // A trapped SMC leaves ELR at the SMC itself.
            frame.elr += 4;
            psci(vm, frame);
        }
        GuestTrap::SysReg { encoding, .. } if trap::is_dc_set_way(encoding) => {
            vm.stats.sysreg += 1;
            frame.elr += 4;
        }
        GuestTrap::SysReg { encoding, read: false, reg: r }
            if vm.vgic.is_some() && trap::is_gic_sgi_register(encoding) =>
        {
            vm.stats.sysreg += 1;
            send_sgi(vm, reg(frame, r));
            frame.elr += 4;
        }
        GuestTrap::SysReg { encoding, read, .. } => {
            vm.stats.sysreg += 1;
            undefined(
                vm,
                frame,
                format_args!(
                    "system register access {encoding:#x} ({})",
                    if read { "read" } else { "write" }
                ),
            );
        }
        GuestTrap::Other { class } => undefined(vm, frame, format_args!("exception class {class:#x}")),
    }
}

/// The demand-fault fast path, called before any frame is built: a 4 KiB page for a guest
/// without block mappings ([`fast_page_fault`]); a guest with blocks goes to
/// [`fast_block_fault`]. `false` leaves the fault to the general path (walks, table pages,
/// pool refills, errors, MMIO...).
#[inline(always)]
pub fn fast_fault(ipa_page: u64) -> bool {
    let Some(vm) = this_cpu_vm() else { return false };
    if !vm.config.no_block_mappings {
        return fast_block_fault(vm, ipa_page);
    }
    fast_page_fault(vm, ipa_page)
}

/// A 4 KiB page through the cached level-3 table (inlined into both callers: `fast_fault`
/// for guests without blocks, `fast_block_fault` where a block cannot go).
#[inline(always)]
fn fast_page_fault(vm: &mut Vm, ipa_page: u64) -> bool {
    if !vm.layout.in_ram(ipa_page) {
        return false;
    }
    let (Some(pool), Some(s2)) = (vm.pool, vm.s2.as_mut()) else { return false };
    let mut env = fast_env(pool, vm.vttbr);
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
            vm.stats.page_faults += 1;
            true
        }
        Err(page) => give_back_unmapped(vm, page),
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
fn give_back_unmapped(vm: &mut Vm, page: labyrinth::frame::ClaimedPage) -> bool {
    vm.budget.untake(1);
    if let Some(pool) = vm.pool {
        let _ = pool.return_unused_page_atomic(page.pfn(), Owner::guest(page.vm()));
    }
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
fn fast_block_fault(vm: &mut Vm, ipa: u64) -> bool {
    let block = ipa & !(BLOCK - 1);
    // Where no block can go (RAM ends inside this 2 MiB, or part of it is mapped already: a
    // level-3 table is there), a page can, through the cached level-3 table.
    if block < vm.layout.ram_base || block + BLOCK > vm.layout.ram_end() {
        return fast_page_fault(vm, ipa);
    }
    let (Some(pool), Some(s2)) = (vm.pool, vm.s2.as_mut()) else { return false };
    let mut env = fast_env(pool, vm.vttbr);
    let Some(vacant) = s2.cached_vacant_block(&env, block) else { return fast_page_fault(vm, ipa) };
    if !vm.budget.take(BLOCK_FRAMES) {
        return false;
    }
    let Ok(block) = pool.alloc_guest_block_own_pool(vm.id) else {
        vm.budget.untake(BLOCK_FRAMES);
        return false;
    };
    if let Err(block) = vacant.fill(&mut env, block) {
        // Claimed but not mapped (cannot happen: it was claimed for this guest).
        return give_back_block(vm, block.pfn());
    }
    vm.stats.block_faults += 1;
    // The pool just ran dry: refill it now, several blocks at once, so the next faults find
    // blocks here instead of taking the general path to refill (the call the general path
    // would make, with the same lock; paid once per `block_high` blocks). Every call here is
    // in tail position, so this path needs no stack frame.
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
fn give_back_block(vm: &mut Vm, head: Pfn) -> bool {
    vm.budget.untake(BLOCK_FRAMES);
    if let Err(e) = frames().release(head, BLOCK_FRAMES, vm.owner, &arch::Scrubber) {
        error!("guest {}: block {head} claimed and not mapped, not returned: {e}", vm.name);
    }
    false
}

/// An HVC on the fast path: PSCI calls whose whole effect is a return value (VERSION,
/// FEATURES, AFFINITY_INFO, errors) are answered from x0-x3; calls that stop, reset or start a
/// vCPU go to the general path. Not inlined: the fault path beside it in `guest_fast` then
/// needs no stack frame of its own (this is a tail call).
#[inline(never)]
pub fn fast_hvc(frame: &mut TrapFrame) -> bool {
    let Some(vm) = this_cpu_vm() else { return false };
    match vpsci::handle(frame.x[0], frame.x[1], frame.x[2], frame.x[3], 0, &[true]) {
        PsciAction::Return(v) => {
            vm.stats.hvc += 1;
            frame.x[0] = v;
            true
        }
        _ => false,
    }
}

/// First touch of guest RAM: a 2 MiB block when allowed and the whole aligned block is
/// unmapped and a block is at hand, else a 4 KiB page, from the atomic path.
#[inline(always)]
fn demand_fault(vm: &mut Vm, frame: &mut TrapFrame, ipa: u64) {
    let frames = frames();
    let cpu = arch::cpu_index();
    let mut env = env(vm);
    let Some(s2) = vm.s2.as_mut() else { return };
    if !vm.config.no_block_mappings {
        let block = ipa & !(BLOCK - 1);
        if block >= vm.layout.ram_base
            && block + BLOCK <= vm.layout.ram_end()
            && s2.is_unmapped(&env, block, 2)
            && vm.budget.take(BLOCK_FRAMES)
        {
            // The fast path leaves an empty block pool to this path: refill it here (several
            // blocks at once) rather than fall back to pages while the buddy allocator has blocks.
            let block_at_hand = frames.alloc_block_atomic_exclusive(cpu, vm.owner).or_else(|e| {
                if e == AtomicError::Empty && frames.refill(cpu).is_ok() {
                    frames.alloc_block_atomic_exclusive(cpu, vm.owner)
                } else {
                    Err(e)
                }
            });
            match block_at_hand {
                Ok(first) => match s2.map_block(&mut env, block, first.phys(), Attrs::RAM) {
                    Ok(()) => {
                        vm.stats.block_faults += 1;
                        return;
                    }
                    Err(e) => {
                        vm.budget.untake(BLOCK_FRAMES);
                        let _ = frames.release(first, BLOCK_FRAMES, vm.owner, &arch::Scrubber);
                        warn!("guest {}: block at {block:#x} not mapped ({e}): using pages", vm.name);
                    }
                },
                Err(_) => vm.budget.untake(BLOCK_FRAMES),
            }
        }
    }
    if !vm.budget.take(1) {
        error!(
            "guest {}: out of memory at IPA {ipa:#x}: the {} KiB promised to it are used up",
            vm.name,
            vm.budget.pages() * 4
        );
        stop(vm, StopCause::OutOfMemory);
    }
    let Some(pfn) = alloc_page(cpu, vm.owner) else {
        error!("guest {}: out of memory at IPA {ipa:#x}: no frame left", vm.name);
        stop(vm, StopCause::OutOfMemory);
    };
    match s2.map_page(&mut env, ipa & !(FRAME_SIZE - 1), pfn.phys(), Attrs::RAM) {
        Ok(()) => vm.stats.page_faults += 1,
        Err(Stage2Error::OutOfMemory) => {
            vm.budget.untake(1);
            let _ = frames.return_unused_page_atomic(cpu, pfn, vm.owner);
            if frames.refill(cpu).is_err() || frames.needs_refill(cpu) {
                error!("guest {}: out of memory for stage-2 tables at IPA {ipa:#x}", vm.name);
                stop(vm, StopCause::OutOfMemory);
            }
            // Retried when the guest re-executes the access.
        }
        Err(e) => {
            vm.budget.untake(1);
            let _ = frames.return_unused_page_atomic(cpu, pfn, vm.owner);
            refuse_access(vm, frame, false, arch::trap_syndrome().esr, format_args!("IPA {ipa:#x}: {e}"));
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

fn mmio_uart(vm: &mut Vm, frame: &mut TrapFrame, offset: u64, a: MmioAccess, esr: u64) {
    vm.stats.mmio += 1;
    let name = vm.name;
    let uart = &mut vm.uart;
    let ok = emulate_mmio(frame, a, |write| match write {
        Some(v) => uart.write(offset, a.size, v as u32, &mut |line| emit(name, line)).then_some(0),
        None => uart.read(offset, a.size).map(u64::from),
    });
    if !ok {
        refuse_access(vm, frame, false, esr, format_args!("UART offset {offset:#x}, {} bytes", a.size));
    }
}

/// An access to the virtual GIC's distributor or redistributor.
fn mmio_vgic(vm: &mut Vm, frame: &mut TrapFrame, ipa: u64, a: MmioAccess, esr: u64) {
    vm.stats.vgic_mmio += 1;
    let (Some(g), Some((f, offset))) = (vm.vgic.as_mut(), vgic::frame_of(ipa)) else { return };
    let ok = emulate_mmio(frame, a, |write| match write {
        Some(v) => {
            let ok = g.write(f, offset, a.size, v);
            // An enable, a pending bit or a priority may have changed what the guest should see.
            sync_lrs(g);
            ok.then_some(0)
        }
        None => g.read(f, offset, a.size),
    });
    if !ok {
        refuse_access(vm, frame, false, esr, format_args!("GIC {f:?} offset {offset:#x}, {} bytes", a.size));
    }
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

/// A trapped `ICC_SGI1R_EL1` (or ASGI1R/SGI0R) write: an SGI the guest sends, possibly to its
/// own (only) vCPU.
fn send_sgi(vm: &mut Vm, value: u64) {
    let Some(g) = vm.vgic.as_mut() else { return };
    if let Some(intid) = VGic::sgi_for_self(value) {
        vm.stats.sgis += 1;
        g.raise(intid);
        sync_lrs(g);
    }
}

/// Physical interrupts that arrived while the guest ran: the virtual timer's is masked at its
/// source and injected as virtual PPI 27; the maintenance interrupt only asks for a refill.
fn guest_irq(vm: &mut Vm) {
    let Some(g) = vm.vgic.as_mut() else { return };
    // Bounded: each INTID is completed before the next acknowledge, and a masked timer does
    // not come back, so more than a few rounds means a misbehaving GIC.
    for _ in 0..16 {
        let intid = arch::gic::ack();
        if intid >= arch::gic::SPURIOUS {
            break;
        }
        vm.stats.irqs += 1;
        if intid == arch::gic::VTIMER_PPI {
            arch::gic::mask_vtimer();
            g.raise(vgic::VTIMER_INTID);
            vm.stats.vtimer += 1;
        }
        arch::gic::eoi(intid);
    }
    sync_lrs(g);
}

/// Hands the list registers back to the model and refills them (see `vm::vgic`).
fn sync_lrs(g: &mut VGic) {
    let mut buf = [0u64; 8];
    let lrs = &mut buf[..arch::gic::lr_count()];
    arch::gic::read_lrs(lrs);
    g.fold(lrs);
    let left_out = g.refill(lrs);
    arch::gic::write_lrs(lrs);
    arch::gic::set_underflow(left_out);
}

fn emit(name: &str, line: &[u8]) {
    let text = core::str::from_utf8(line).unwrap_or("<non-UTF-8 output>");
    arch::raw_line(format_args!("[{name}] {text}"));
}

fn refuse_access(
    vm: &mut Vm,
    frame: &mut TrapFrame,
    instruction: bool,
    esr: u64,
    what: core::fmt::Arguments<'_>,
) {
    vm.stats.aborts_injected += 1;
    if vm.logged < LOG_LIMIT {
        vm.logged += 1;
        warn!(
            "guest {}: {} at PC {:#x} refused: {what}: external abort injected",
            vm.name,
            if instruction { "instruction fetch" } else { "data access" },
            frame.elr
        );
    }
    arch::inject_external_abort(frame, instruction, esr);
}

fn undefined(vm: &mut Vm, frame: &mut TrapFrame, what: core::fmt::Arguments<'_>) {
    vm.stats.undefs_injected += 1;
    if vm.logged < LOG_LIMIT {
        vm.logged += 1;
        warn!("guest {}: {what} at PC {:#x}: undefined instruction injected", vm.name, frame.elr);
    }
    arch::inject_undefined(frame);
}

fn psci(vm: &mut Vm, frame: &mut TrapFrame) {
    let (fid, x1, x2, x3) = (frame.x[0], frame.x[1], frame.x[2], frame.x[3]);
    match vpsci::handle(fid, x1, x2, x3, 0, &[true]) {
        PsciAction::Return(v) => frame.x[0] = v,
        PsciAction::CpuOn { .. } => frame.x[0] = labyrinth::psci::PsciError::InternalFailure.code() as u64,
        PsciAction::CpuOff => stop(vm, StopCause::CpuOff),
        PsciAction::SystemOff => stop(vm, StopCause::SystemOff),
        PsciAction::SystemReset => reset(vm, frame),
    }
}

/// Takes the guest's stage-2 space apart: every frame and table page goes back (scrubbed).
fn teardown(vm: &mut Vm) {
    let name = vm.name;
    let mut uart = core::mem::take(&mut vm.uart);
    uart.flush(&mut |line| emit(name, line));
    let Some(s2) = vm.s2.take() else { return };
    let mut env = env(vm);
    vm.vttbr = 0;
    let frames = frames();
    let owner = vm.owner;
    let mut returned = 0u64;
    let proof = s2.teardown(&mut env, &mut |pa, size| {
        let n = (size / FRAME_SIZE) as usize;
        match frames.release(Pfn(pa / FRAME_SIZE), n, owner, &arch::Scrubber) {
            Ok(()) => returned += n as u64,
            Err(e) => error!("guest {name}: frames at {pa:#x} not returned: {e}"),
        }
    });
    vm.stats.frames_returned += returned;
    vm.budget.reclaimed();
    VMIDS.lock().release(proof);
}

fn reset(vm: &mut Vm, frame: &mut TrapFrame) {
    info!("guest {}: SYSTEM_RESET: reclaiming and reloading", vm.name);
    teardown(vm);
    vm.stats.resets += 1;
    let cpu = arch::cpu_index();
    vm.vmid = match VMIDS.lock().alloc() {
        Some(v) => v,
        None => stop(vm, StopCause::OutOfMemory),
    };
    match fdt_gen::generate(&vm.layout, 1, vm.config.bootargs, vm.stats.resets as u32, vm.vgic.is_some()) {
        Ok(dtb) => vm.dtb = dtb,
        Err(_) => {
            error!("guest {}: cannot rewrite its device tree after reset", vm.name);
            stop(vm, StopCause::OutOfMemory);
        }
    }
    if let Err(e) = load(vm, cpu) {
        error!("guest {}: cannot reload after reset: {e}", vm.name);
        stop(vm, StopCause::OutOfMemory);
    }
    arch::configure_el2(vm.vttbr, vm.geo);
    if let Some(g) = vm.vgic.as_mut() {
        *g = VGic::new();
        arch::gic::vcpu_reset();
    }
    arch::restart_guest(frame, vm.layout.kernel, vm.layout.dtb);
}

/// The guest's stage-2 mappings, merged into runs, at debug level (`loglevel=debug`).
fn dump_mappings(vm: &Vm) {
    if log::max_level() < log::LevelFilter::Debug {
        return;
    }
    let Some(s2) = vm.s2.as_ref() else { return };
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

/// The guest is done: reclaim, audit, report; the last guest to stop powers the machine off.
fn stop(vm: &mut Vm, cause: StopCause) -> ! {
    if vm.vgic.is_some() {
        arch::gic::vcpu_off();
    }
    dump_mappings(vm);
    teardown(vm);
    frames().uncommit(vm.budget.promised());
    let audit = frames().audit(None);
    let left = audit.guests.iter().find(|g| g.vm == vm.id).map_or(0, |g| g.memory + g.page_tables);
    let s = vm.stats;
    let mut line = alloc::string::String::new();
    let _ = write!(
        line,
        "guest {}: stopped by {cause:?}; faults {} (4 KiB pages {}, 2 MiB blocks {}); aborts injected {}, undefined {}; exits: mmio {}, hvc {}, smc {}, sysreg {}; resets {}; frames returned {}, still owned {left}; interrupts {} (virtual timer {}), own SGIs {}, vgic mmio {}",
        vm.name,
        s.page_faults + s.block_faults,
        s.page_faults,
        s.block_faults,
        s.aborts_injected,
        s.undefs_injected,
        s.mmio,
        s.hvc,
        s.smc,
        s.sysreg,
        s.resets,
        s.frames_returned,
        s.irqs,
        s.vtimer,
        s.sgis,
        s.vgic_mmio,
    );
    info!("{line}");
    REPORTS.lock().push(line);
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
