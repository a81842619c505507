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
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use labyrinth::dt::{GuestConfig, Platform};
use labyrinth::frame::{
    AtomicError, CpuFrames, FrameManager, Owner, Pfn, Promise, VmId, BLOCK_FRAMES, FRAME_SIZE,
};
use labyrinth::stage2::{
    level_size, Attrs, Declined, Geometry, PageSlot, Stage2, Stage2Error, VmidAllocator,
};
use labyrinth::vm::exit::{self, Outcome};
use labyrinth::vm::guest::{Boot, VmParts};
use labyrinth::vm::hypercall;
use labyrinth::vm::input_focus::{InputFocus, Typed};
use labyrinth::vm::layout::{self, Layout};
use labyrinth::vm::lifecycle::Life;
use labyrinth::vm::shm::{self, Departure, LiveRegion, RegionPlan, Registry, ShmProblem, ShmRefusal, User};
use labyrinth::vm::trap::MmioAccess;
use labyrinth::vm::vcpu::{GuestRegs, VcpuHw, PAGE_CREDIT_BATCH};
use labyrinth::vm::vpsci::{PowerState, StartRequest};
use labyrinth::vm::{budget::MemoryBudget, fdt_gen, image, vpl011::VPl011};
use labyrinth::vm::{StopCause, Vcpu, VcpuSet, Vm};
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::{self, TrapFrame, MAX_CPUS};

const BLOCK: u64 = level_size(2);

/// One slot per CPU; a slot is written by the boot CPU before its CPU starts, and afterwards
/// only by that CPU.
struct PerCpu(UnsafeCell<[Option<Vcpu<'static>>; MAX_CPUS]>);

// SAFETY: see `vcpu_slot`: each slot has a single user at any time.
unsafe impl Sync for PerCpu {}

static VCPUS: PerCpu = PerCpu(UnsafeCell::new([const { None }; MAX_CPUS]));
static VMIDS: Mutex<VmidAllocator> = Mutex::new(VmidAllocator::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);
static REPORTS: Mutex<Vec<alloc::string::String>> = Mutex::new(Vec::new());
/// The shared memory regions that exist (`vm::shm`), each until its owner (or, for a region
/// Labyrinth owns, its last user) stops. Held while a region is revoked from a borrower's
/// space, and taken by a guest before its own space is emptied (a reset) or destroyed (a
/// stop): so a revocation never unmaps in a space that is going away under it.
static SHARED: Mutex<Registry<'static>> = Mutex::new(Registry::new());
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
unsafe fn vcpu_slot(cpu: usize) -> Option<&'static mut Option<Vcpu<'static>>> {
    // SAFETY: per the contract, nobody else holds a reference into this slot.
    unsafe { (*VCPUS.0.get()).get_mut(cpu) }
}

/// This CPU's vCPU, through the pointer the arch keeps for the CPU (`arch::cpu_local`: one
/// system-register read and one load, no index arithmetic or bounds check on the fast path).
#[inline(always)]
fn this_vcpu() -> Option<&'static mut Vcpu<'static>> {
    let p = arch::cpu_local() as *mut Vcpu<'static>;
    // SAFETY: null, or set by `create_all` to this CPU's own slot's vCPU (a static that never
    // moves or changes after); only this CPU's trap handler or guest entry calls this, and
    // interrupts are masked at EL2, so no other reference to it is live.
    unsafe { p.as_mut() }
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
    arch::HwStage2 { frames: frames(), cpu: arch::cpu_index(), vttbr: vm.s2.vttbr() }
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
    // Shared memory is checked across the well-formed guests before any is built.
    let configs: Vec<GuestConfig<'static>> =
        platform.guests().iter().filter_map(|g| g.as_ref().ok().copied()).collect();
    let (regions, verdicts) = shm::plan(&configs, geo.ipa_bits, platform.memory());
    let mut built: Vec<Option<usize>> = alloc::vec![None; configs.len()];
    let mut next_cpu = 0;
    let mut vms = Vec::new();
    let mut k = 0;
    for g in platform.guests() {
        let cfg = match g {
            Ok(cfg) => *cfg,
            Err(e) => {
                error!("{e}: not started");
                continue;
            }
        };
        k += 1;
        if let Some(Some(refusal)) = verdicts.get(k - 1) {
            error!("{refusal}: not started");
            continue;
        }
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
                    vm.s2.vmid(),
                );
                built[k - 1] = Some(vms.len());
                vms.push(vm);
                next_cpu += n;
            }
            Err(msg) => error!("{msg}: not started"),
        }
    }
    let mut refused = share_regions(&configs, &regions, &built, &vms);
    refused.sort_unstable();
    refused.dedup();
    for &i in &refused {
        // Leaves its regions (revoking what it owns) before its space goes, and releases a
        // region it was the last user of only once its space is gone (unmapped, invalidated).
        let vm = &vms[i];
        let gone = shm_detach(vm, &vms, NOT_STARTED);
        destroy(vm);
        shm_release(vm, gone, NOT_STARTED);
        vm.budget.withdraw(frames());
        // Its CPUs run no guest now: their pools' frames go back for the others.
        retire_cpus(frames_mgr, vm.first_cpu..vm.first_cpu + vm.vcpus);
    }
    let vms: Vec<Vm> =
        vms.into_iter().enumerate().filter(|(i, _)| !refused.contains(i)).map(|(_, vm)| vm).collect();
    retire_cpus(frames_mgr, next_cpu..wanted);
    // Every promise is made: what no promise covers is open to every guest past its own.
    let reserved = vms.iter().map(|vm| vm.budget.promised().saturating_sub(held_frames(vm))).sum();
    let open = frames_mgr.open_unpromised(reserved);
    info!("memory: {} KiB promised to guests, {} KiB free and unpromised", reserved * 4, open * 4);
    LIVE.store(vms.len(), Ordering::Release);
    let vms: &'static [Vm] = Vec::leak(vms);
    GUESTS.call_once(|| vms);
    if let (Some(first), true, Some(intid)) =
        (vms.first(), HOST_GIC.load(Ordering::Relaxed), platform.uart().and_then(|u| u.intid))
    {
        if arch::enable_input(intid) {
            route_input(first.cpu_of(0));
            first.uart.lock().set_streaming(true, &mut |_, _| {});
            info!(
                "console: input goes to guest {}; Ctrl-A three times moves it to the next guest",
                first.name
            );
        }
    }
    for vm in vms {
        if !vm.boot_vcpu0() {
            error!("guest {}: vCPU 0 cannot be started", vm.name);
        }
        for index in 0..vm.vcpus {
            let cpu = vm.cpu_of(index);
            // SAFETY: CPU `cpu` does not run yet (boot CPU, before starting it).
            if let Some(slot) = unsafe { vcpu_slot(cpu) } {
                let vcpu = slot.insert(Vcpu::new(vm, index, frames().cpu(cpu)));
                arch::set_cpu_local(cpu, vcpu as *mut Vcpu<'static> as *mut ());
            }
        }
    }
    next_cpu
}

/// Every guest built, in configuration order (the input focus indexes it).
static GUESTS: spin::Once<&'static [Vm]> = spin::Once::new();
/// Which guest the console's input goes to. Taken by the CPU the input interrupt is routed
/// to, and by a guest's stop; never on a fault path.
static INPUT: spin::Mutex<InputFocus> = spin::Mutex::new(InputFocus::new());
/// The CPU the console's input interrupt is routed to.
static INPUT_CPU: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Guest `to` gets the input focus from `from`: its output streams (a prompt shows before its
/// newline), the other's goes back to lines.
fn move_focus(from: &Vm, to: &Vm) {
    let mut hw = arch::Hw;
    from.uart.lock().set_streaming(false, &mut |_, _| {});
    to.uart.lock().set_streaming(true, &mut |l, ended| VcpuHw::console_part(&mut hw, to.name, l, ended));
    info!("console: input now goes to guest {}", to.name);
}

/// Routes the console's input interrupt to CPU `cpu` (one that runs a guest).
fn route_input(cpu: usize) {
    let (Some(intid), Some(mpidr)) = (arch::input_intid(), arch::mpidr_of(cpu)) else {
        return;
    };
    INPUT_CPU.store(cpu, Ordering::Release);
    arch::gic::route_spi(intid, mpidr);
}

/// The console's receiver has characters: each goes through the input focus (Ctrl-A three
/// times moves it) to the guest that has it, into its UART's FIFO. Bounded: the rest of a
/// long burst raises the interrupt again.
fn console_input(vcpu: &mut Vcpu) {
    let Some(guests) = GUESTS.get() else { return };
    let mut focus = INPUT.lock();
    for _ in 0..64 {
        let Some(b) = arch::read_input() else { break };
        match focus.typed(b) {
            Typed::Held => {}
            Typed::Deliver { bytes, len } => {
                let vm = &guests[focus.focus()];
                if vm.life.life() != Life::Stopped {
                    let dropped = exit::uart_input(vcpu, &mut arch::Hw, vm, &bytes[..len]);
                    if dropped > 0 && vm.uart.lock().rx_dropped == dropped as u64 {
                        warn!("guest {}: its UART's receive FIFO is full: typed characters dropped", vm.name);
                    }
                }
            }
            Typed::Switch => {
                let old = focus.focus();
                match focus.next(guests.len(), |g| guests[g].life.life() != Life::Stopped) {
                    Some(g) => move_focus(&guests[old], &guests[g]),
                    None => {
                        info!("console: input stays with guest {}: no other guest runs", guests[old].name)
                    }
                }
            }
        }
    }
}

/// Guest `vm` stopped: the input focus moves on if it had it, and the input interrupt goes to
/// another guest's CPU if it was routed to one of `vm`'s (that CPU parks).
fn input_after_stop(vm: &Vm) {
    let Some(guests) = GUESTS.get() else { return };
    let live = |g: usize| guests[g].life.life() != Life::Stopped && !core::ptr::eq(&guests[g], vm);
    let mut focus = INPUT.lock();
    if core::ptr::eq(&guests[focus.focus()], vm) {
        if let Some(g) = focus.next(guests.len(), live) {
            move_focus(vm, &guests[g]);
        }
    }
    let cpu = INPUT_CPU.load(Ordering::Acquire);
    if (vm.first_cpu..vm.first_cpu + vm.vcpus).contains(&cpu) {
        if let Some(g) = (0..guests.len()).find(|&g| live(g)) {
            route_input(guests[g].cpu_of(0));
        }
    }
}

/// Whether CPU `cpu` has a vCPU in a running guest, or about to enter it (powered on).
fn runs_a_vcpu(guests: &[Vm], cpu: usize) -> bool {
    guests.iter().any(|g| {
        g.life.life() != Life::Stopped
            && (g.first_cpu..g.first_cpu + g.vcpus).contains(&cpu)
            && matches!(g.power.state(cpu - g.first_cpu), Some(PowerState::On | PowerState::OnPending))
    })
}

/// This CPU's vCPU leaves its guest (CPU_OFF, a reset) while guests run: if the console's
/// input interrupt is routed here it moves to a CPU whose vCPU is in a guest, since a CPU
/// waiting for its vCPU to be started takes no interrupt and typed characters would wait.
/// The input focus's lock orders moves of the route; a vCPU that leaves is Off before it gets
/// here, so a CPU moving the route never picks one that is leaving.
fn input_leaves(here: usize) {
    let Some(guests) = GUESTS.get() else { return };
    let _moving = INPUT.lock();
    if INPUT_CPU.load(Ordering::Acquire) != here {
        return;
    }
    // None: nothing runs now; the next vCPU to enter takes the route (`input_arrives`).
    if let Some(cpu) = (0..MAX_CPUS).find(|&cpu| cpu != here && runs_a_vcpu(guests, cpu)) {
        route_input(cpu);
        info!("console: input interrupt moves to CPU {cpu}: CPU {here}'s vCPU left its guest");
    }
}

/// This CPU's vCPU enters its guest: if the console's input interrupt is routed to a CPU whose
/// vCPU is not in a guest (it left when no other ran), it comes here.
fn input_arrives(here: usize) {
    let Some(guests) = GUESTS.get() else { return };
    let _moving = INPUT.lock();
    let cpu = INPUT_CPU.load(Ordering::Acquire);
    if cpu != here && cpu != usize::MAX && !runs_a_vcpu(guests, cpu) {
        route_input(here);
        info!("console: input interrupt moves to CPU {here}: CPU {cpu}'s vCPU is not in its guest");
    }
}

/// Frames guest `vm` holds now: its pages and its stage-2 table pages.
fn held_frames(vm: &Vm) -> usize {
    vm.budget.used() + vm.budget.beyond() + vm.s2.table_pages()
}

/// Creates every shared region some built guest uses (`built[k]`: config `k`'s index in
/// `vms`) and maps it into each: frames promised, allocated for the owner (Labyrinth's VM 0 if
/// no guest owns it), moved to shared-owned by the share transition, mapped shared-owned into
/// the owner and shared-borrowed into the borrowers. Returns the guests (indices in `vms`) to
/// refuse, each named with its reason: borrowers whose owner did not start, the users of a
/// region that could not be made, a guest that could not map a region and, if it owns it,
/// that region's borrowers (`shm::map_users`), and then, to a fixed point, the borrowers of
/// the regions a refused guest owns. A region keeps a view of every guest it was mapped into,
/// refused or not: the refused guests leave it, and its frames go, in `create_all`.
fn share_regions(
    configs: &[GuestConfig<'static>],
    regions: &[RegionPlan<'static>],
    built: &[Option<usize>],
    vms: &[Vm],
) -> Vec<usize> {
    let names: Vec<&'static str> = configs.iter().map(|c| c.name).collect();
    let mut started: Vec<bool> = built.iter().map(Option::is_some).collect();
    let mut refused = Vec::new();
    let mut refuse = |(k, r): (usize, ShmRefusal<'_>), started: &mut Vec<bool>| {
        error!("{r}: not started");
        started[k] = false;
        refused.extend(built[k]);
    };
    for r in shm::refuse_orphans(regions, &names, &mut started) {
        refuse(r, &mut started);
    }
    let cpu = arch::cpu_index();
    for region in regions {
        // An owner refused for an earlier region: its borrowers are refused below, as orphans.
        if region.owner.is_some_and(|o| !started[o]) {
            continue;
        }
        let (users, guests): (Vec<User<'static>>, Vec<&Vm>) = region
            .users
            .iter()
            .filter_map(|&(k, s)| built[k].filter(|_| started[k]).map(|i| ((k, s, vms[i].id), &vms[i])))
            .unzip();
        if users.is_empty() {
            continue;
        }
        let t0 = arch::time_now_ticks();
        let vm_of = |k: usize| built[k].map_or(shm::LABYRINTH, |i| vms[i].id);
        let owner = region.owner_vm(vm_of);
        let pages = region.pages();
        // The region's frames, and the table pages mapping it in each user, are promised apart
        // from any guest's RAM: no guest's promise pays for another's view of it.
        let tables: usize = users
            .iter()
            .zip(&guests)
            .map(|((_, s, _), vm)| vm.geo.max_table_pages(s.guest_addr, s.size))
            .sum();
        let Some((list, promise)) = share_frames(pages + tables, pages, owner, cpu) else {
            for &(k, s, _) in &users {
                let problem = ShmProblem::OutOfMemory;
                let r = ShmRefusal {
                    guest: names[k],
                    id: region.id,
                    guest_addr: s.guest_addr,
                    size: s.size,
                    problem,
                };
                refuse((k, r), &mut started);
            }
            continue;
        };
        let mut live = LiveRegion { id: region.id, owner, frames: list, promise, views: Vec::new() };
        let mapping = shm::map_users(&mut live, &users, &names, |i, frames_of, as_owner| {
            let (vm, at) = (guests[i], users[i].1.guest_addr);
            let _ = frames().refill(cpu);
            shm::map_region(&vm.s2, &mut env(vm), frames_of, at, as_owner)
        });
        for r in mapping.refused {
            refuse(r, &mut started);
        }
        let us = (arch::time_now_ticks() - t0) * 1_000_000 / arch::ticks_per_second().max(1);
        if let Some(why) = mapping.unused {
            error!(
                "shared memory \"{}\": {} KiB made and used by no guest: {why}; its frames go back once the guests refused for it are gone",
                region.id,
                pages * 4
            );
        } else {
            // The guests that run with it (a borrower that could not map it keeps a view).
            let line: Vec<_> = live
                .views
                .iter()
                .filter_map(|v| {
                    users.iter().find(|u| u.2 == v.vm && started[u.0]).map(|u| (u.0, v.guest_addr))
                })
                .map(|(k, at)| alloc::format!("{} at {at:#x}", names[k]))
                .collect();
            let line = line.join(", ");
            let by = match region.owner {
                Some(k) => alloc::format!("guest {}", names[k]),
                None => alloc::format!("Labyrinth (no guest owns it)"),
            };
            info!(
                "shared memory \"{}\": {} KiB owned by {by}, mapped in {line} ({us} us)",
                region.id,
                pages * 4
            );
        }
        if let Some((host, k)) = region.host {
            info!(
                "shared memory \"{}\": host address {host:#x} (Xen's older form, from guest {}) checked (page-aligned, inside host RAM, the same in every guest that names one) and not used: Labyrinth owns every host frame and allocates the region's itself; the guests see only their guest addresses",
                region.id, names[k]
            );
        }
        SHARED.lock().add(live);
    }
    // A guest refused here may own a region made before: its borrowers are orphans now.
    for r in shm::refuse_orphans(regions, &names, &mut started) {
        refuse(r, &mut started);
    }
    if !regions.is_empty() {
        let audit = frames().audit(None);
        let verdict = if audit.is_consistent() { "consistent" } else { "FAILED" };
        info!(
            "shared memory: ownership audit {verdict}, {} frames shared, each with one owner",
            audit.shared
        );
    }
    refused
}

/// `pages` frames tagged shared-owned by `owner`, allocated one by one on CPU `cpu`, after a
/// promise of `wanted` frames; `None` (nothing kept, nothing promised) if either fails.
fn share_frames(wanted: usize, pages: usize, owner: VmId, cpu: usize) -> Option<(Vec<Pfn>, Promise)> {
    let promise = frames().commit(wanted);
    let mut list = Vec::with_capacity(pages);
    let ok = promise.frames() == wanted
        && (0..pages).all(|_| match alloc_page(cpu, Owner::guest(owner)) {
            Some(pfn) => match frames().share(pfn, 1, owner) {
                Ok(()) => {
                    list.push(pfn);
                    true
                }
                Err(e) => {
                    error!("shared memory: {pfn} not shared ({e})");
                    let _ = frames().release(pfn, 1, Owner::guest(owner), &arch::Scrubber);
                    false
                }
            },
            None => false,
        });
    if ok {
        return Some((list, promise));
    }
    let region = LiveRegion { id: "", owner, frames: list, promise, views: Vec::new() };
    release_shared(&region);
    frames().withdraw(&region.promise);
    None
}

/// Releases a region's shared frames (scrubbed), contiguous runs at once; how many went back.
fn release_shared(region: &LiveRegion<'_>) -> u64 {
    let mut released = 0;
    for (first, n) in region.runs() {
        match frames().release(first, n, Owner::shared(region.owner), &arch::Scrubber) {
            Ok(()) => released += n as u64,
            Err(e) => error!("shared memory \"{}\": frames at {first} not returned: {e}", region.id),
        }
    }
    released
}

/// Maps the guest's shared regions again (after a reset emptied its space): same frames,
/// same contents; a region revoked meanwhile (its owner stopped) is no longer there. Every
/// vCPU of the guest out of it.
fn shm_remap(vm: &Vm) -> Result<(), Stage2Error> {
    SHARED.lock().remap(vm.id, |frames_of, view| {
        let _ = frames().refill(arch::cpu_index());
        shm::map_region(&vm.s2, &mut env(vm), frames_of, view.guest_addr, view.owner)
    })
}

/// How a guest refused at creation left, for the shared-memory log lines.
const NOT_STARTED: &str = "was not started";

/// Guest `vm`'s space is about to go (a stop, or a guest refused at creation; every vCPU of
/// it out): it leaves its regions. Every region it owns is revoked from each borrower first:
/// the borrower's view unmapped by break-before-make while its vCPUs run, the TLB entries of
/// its VMID invalidated in every CPU, and the revocation recorded for its abort path. All
/// under the registry's lock, which a borrower takes before emptying or destroying its own
/// space. Returns the regions that left with `vm`, for [`shm_release`] once its space is gone.
/// `left` says how it went, for the log ("stopped", [`NOT_STARTED`]).
fn shm_detach(vm: &Vm, guests: &[Vm], left: &str) -> Vec<Departure<'static>> {
    let mut shared = SHARED.lock();
    let gone = shared.leave(vm.id);
    for d in gone.iter().filter(|d| d.owner_left) {
        for v in &d.region.views {
            let Some(b) = guests.iter().find(|g| g.id == v.vm) else { continue };
            // Recorded before the unmap: a touch that faults once the entry is gone says why.
            b.shm_revoked.revoke(&b.config.shared, v.guest_addr, vm.name);
            let t0 = arch::time_now_ticks();
            let done = match v.mapped {
                false => Ok(0),
                true => shm::unmap_view(&b.s2, &mut env(b), v.guest_addr, d.region.size()),
            };
            let us = (arch::time_now_ticks() - t0) * 1_000_000 / arch::ticks_per_second().max(1);
            let end = v.guest_addr + d.region.size();
            match done {
                Ok(0) => info!(
                    "shared memory \"{}\": revoked from guest {} at {:#x}-{end:#x} because its owner, guest {}, {left} ({}, {us} us)",
                    d.region.id,
                    b.name,
                    v.guest_addr,
                    vm.name,
                    match (v.mapped, left == NOT_STARTED) {
                        (true, false) => "unmapped while it runs, its TLB entries invalidated",
                        (true, true) => "unmapped before it ran",
                        (false, false) => "not mapped: it is resetting",
                        (false, true) => "not mapped",
                    }
                ),
                Ok(n) => error!(
                    "shared memory \"{}\": revoking it from guest {} handed back {n} frames of the guest's own",
                    d.region.id, b.name
                ),
                Err(e) => error!(
                    "shared memory \"{}\": revoking it from guest {} at {:#x} failed: {e}",
                    d.region.id, b.name, v.guest_addr
                ),
            }
        }
    }
    gone
}

/// The regions that left with guest `vm` (from [`shm_detach`]), once its space is gone: their
/// frames scrubbed and released, their promise withdrawn. Whether any went. `left` as for
/// [`shm_detach`].
fn shm_release(vm: &Vm, gone: Vec<Departure<'static>>, left: &str) -> bool {
    let any = !gone.is_empty();
    for d in gone {
        let region = d.region;
        let n = release_shared(&region);
        // Its frames and the table pages that mapped it are free: anyone may draw them now.
        frames().withdraw(&region.promise);
        let after = if d.owner_left { "its owner" } else { "its last user" };
        info!(
            "shared memory \"{}\": released ({n} frames) after {after}, guest {}, {left}",
            region.id, vm.name
        );
    }
    any
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
    let dtb = fdt_gen::generate(&layout, vcpus, cfg.bootargs, 0, cfg.virtual_gic, &cfg.shared)
        .map_err(|_| format!("cannot write its device tree"))?;
    let id = VmId::new(first_cpu as u16 + 1).ok_or_else(|| format!("too many guests"))?;
    let budget = promise_memory(cfg, &layout, geo)?;
    let Some(vmid) = VMIDS.lock().alloc() else {
        budget.withdraw(frames());
        return Err(format!("no VMID left"));
    };
    let mut env = arch::HwStage2 { frames: frames(), cpu: first_cpu, vttbr: 0 };
    let s2 = match Stage2::new(&mut env, id, vmid, geo) {
        Ok(s2) => s2,
        Err(e) => {
            budget.withdraw(frames());
            return Err(format!("no stage-2 root table: {e}"));
        }
    };
    let parts = VmParts { config: *cfg, id, layout, geo, first_cpu, s2, dtb, budget };
    let vm = Vm::new(parts).map_err(|e| format!("{e}"))?;
    let loaded = load(&vm, &vm.boot.lock(), first_cpu);
    if let Err(e) = loaded {
        destroy(&vm);
        vm.budget.withdraw(frames());
        return Err(format!("loading: {e}"));
    }
    Ok(vm)
}

/// Promises the guest the frames its RAM (or its `labyrinth,guaranteed-memory` floor) and their
/// stage-2 tables can take, or what is left if that is less. Promises are made in
/// configuration order, so the guests named first are the ones served in full. Past its
/// promise a guest draws, best effort, from the frames nobody is promised.
fn promise_memory(
    cfg: &GuestConfig<'static>,
    layout: &Layout,
    geo: Geometry,
) -> Result<MemoryBudget, BuildError> {
    let name = cfg.name;
    let ram_pages = (layout.ram_size / FRAME_SIZE) as usize;
    let floor = cfg.guaranteed_kib.map_or(ram_pages, |kib| ((kib * 1024) / FRAME_SIZE) as usize);
    let pages = floor.min(ram_pages);
    let tables = geo.max_table_pages(layout.ram_base, layout.ram_size);
    // Each other vCPU may hold one unit it then gives back (it lost the entry to a vCPU that
    // mapped its own) and its page credit (`Vcpu::take_pages`): room for that, so neither a
    // race nor another vCPU's credit runs a covered guest out of memory.
    let unit = if cfg.no_block_mappings { 1 } else { BLOCK_FRAMES };
    let in_flight = (cfg.cpus as usize).saturating_sub(1) * (unit + PAGE_CREDIT_BATCH);
    let budget =
        match MemoryBudget::new(frames().commit(pages + in_flight + tables), tables, frames().unpromised()) {
            Ok(budget) => budget,
            Err(promise) => {
                frames().withdraw(&promise);
                return Err(alloc::format!(
                    "no host memory left to promise it ({} frames, {tables} needed for its tables alone)",
                    promise.frames()
                ));
            }
        };
    if budget.pages() < ram_pages {
        warn!(
            "guest {name}: {} MiB of RAM, {} KiB promised{}: overcommitted, it draws the rest from memory nobody is promised and is stopped if none is left",
            layout.ram_size >> 20,
            budget.pages() * 4,
            if pages < ram_pages && budget.pages() >= pages { " (its guaranteed minimum)" } else { "" }
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

/// The kernel, ramdisk and device tree copied into the guest's (empty) stage-2 space and
/// cleaned to the point of coherency (the guest starts with its MMU and caches off): into
/// 2 MiB blocks where the guest allows them (one fault fewer per 512 pages, and its images
/// never hold a region to 4 KiB mappings), else into pages. Everything else of its RAM is
/// faulted in on first touch. Called with every vCPU of the guest out.
fn load(vm: &Vm, boot: &Boot, cpu: usize) -> Result<(), Stage2Error> {
    let mut env = arch::HwStage2 { frames: frames(), cpu, vttbr: vm.s2.vttbr() };
    let module = |m: &labyrinth::dt::Module<'static>| {
        module_bytes(m.region.base(), m.region.size()).map_err(|_| Stage2Error::OutOfMemory)
    };
    let mut images: [(u64, &[u8]); 3] = [(vm.layout.kernel, module(&vm.config.kernel)?), (0, &[]), (0, &[])];
    if let (Some(m), Some((at, _))) = (vm.config.ramdisk, vm.layout.ramdisk) {
        images[1] = (at, module(&m)?);
    }
    images[2] = (vm.layout.dtb, &boot.dtb);
    images.sort_unstable_by_key(|&(at, _)| at);
    let pieces = images.map(|(at, bytes)| at..at + bytes.len() as u64);
    for (ipa, size) in layout::image_units(&pieces, vm.ram(), !vm.config.no_block_mappings) {
        if size == BLOCK && load_block(vm, &mut env, ipa, &images)? {
            continue;
        }
        // A page, or a block's pages when no block could be had.
        for page in (ipa..ipa + size).step_by(FRAME_SIZE as usize) {
            if pieces.iter().any(|p| p.start < page + FRAME_SIZE && page < p.end) {
                load_unit(vm, &mut env, page, FRAME_SIZE, &images)?;
            }
        }
    }
    Ok(())
}

/// One 2 MiB block of images: `false` when no block is at hand (the caller uses pages).
fn load_block(
    vm: &Vm,
    env: &mut arch::HwStage2<'static>,
    ipa: u64,
    images: &[(u64, &[u8])],
) -> Result<bool, Stage2Error> {
    match load_unit(vm, env, ipa, BLOCK, images) {
        Err(Stage2Error::OutOfMemory) => Ok(false),
        r => r.map(|()| true),
    }
}

/// Fresh frames for the unit `[ipa, ipa + size)` (a page or a block), the images' bytes
/// that fall in it copied in and cleaned, mapped.
fn load_unit(
    vm: &Vm,
    env: &mut arch::HwStage2<'static>,
    ipa: u64,
    size: u64,
    images: &[(u64, &[u8])],
) -> Result<(), Stage2Error> {
    let (n, owner, cpu) = ((size / FRAME_SIZE) as usize, vm.owner(), env.cpu);
    if !vm.budget.take(n) {
        return Err(Stage2Error::OutOfMemory);
    }
    let frames = frames();
    let first = if n == 1 {
        alloc_page(cpu, owner)
    } else {
        frames.alloc_block_atomic_exclusive(cpu, owner).ok().or_else(|| {
            frames.refill(cpu).ok()?;
            frames.alloc_block_atomic_exclusive(cpu, owner).ok()
        })
    };
    let Some(first) = first else {
        vm.budget.untake(n);
        return Err(Stage2Error::OutOfMemory);
    };
    let pa = first.phys();
    for &(at, bytes) in images {
        let (lo, hi) = (at.max(ipa), (at + bytes.len() as u64).min(ipa + size));
        if lo < hi {
            let src = &bytes[(lo - at) as usize..(hi - at) as usize];
            // SAFETY: `[pa, pa + size)` was just handed to this guest (zeroed, mapped at EL2 as
            // free RAM) and `src` is part of a module or of the heap.
            unsafe { arch::copy_phys(pa + (lo - ipa), src.as_ptr() as u64, src.len()) };
            arch::clean_to_poc(pa + (lo - ipa), hi - lo);
        }
    }
    let level = if n == 1 { 3 } else { 2 };
    vm.s2.map(env, ipa, pa, level, Attrs::RAM).inspect_err(|_| {
        vm.budget.untake(n);
        let _ = frames.release(first, n, owner, &arch::Scrubber);
    })
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
    vm.quiescence.offline(vcpu.index);
    loop {
        match vm.life.life() {
            Life::Stopped => {
                if HOST_GIC.load(Ordering::Relaxed) {
                    arch::gic::vcpu_off();
                }
                retire_this_cpu();
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
                arch::configure_el2(vm.s2.vttbr(), vm.geo, vcpu.index);
                if HOST_GIC.load(Ordering::Relaxed) {
                    arch::gic::vcpu_reset();
                }
                vcpu.restart();
                input_arrives(arch::cpu_index());
                vm.quiescence.online(vcpu.index, &vm.s2);
                // Interrupts posted while it was off (SGIs in its mailbox) go in now.
                exit::sync_vgic(vcpu, &mut arch::Hw);
                arch::enter_guest(entry, context)
            }
            _ => arch::wait_for_event(),
        }
    }
}

/// Takes this vCPU out of the guest for good or until it is started again: its counters go
/// to the guest's totals, its virtual interface is silenced, and it waits.
fn leave_guest(vcpu: &mut Vcpu) -> ! {
    input_leaves(arch::cpu_index());
    // Before it is out (`wait_to_run`): a reclaim, which resets the budget, waits for that.
    vcpu.vm.budget.untake(vcpu.drop_credit());
    let stats = vcpu.take_stats();
    vcpu.vm.totals.lock().add(&stats);
    if HOST_GIC.load(Ordering::Relaxed) {
        arch::gic::vcpu_reset();
    }
    wait_to_run(vcpu)
}

/// Every exception a guest takes comes here, from the arch's vectors, on its CPU's exception
/// stack with the guest's registers in `frame`; what the frame holds on return is what the
/// guest resumes with. `kind` is the vector: 8 synchronous, 9 IRQ, 10 FIQ, 11 SError.
#[no_mangle]
extern "C" fn guest_trap(kind: u64, frame: &mut TrapFrame) {
    let Some(vcpu) = this_vcpu() else {
        arch::emergency_line(format_args!("guest exception on CPU {} with no guest", arch::cpu_index()));
        arch::power_off();
    };
    let hw = &mut arch::Hw;
    let outcome = match kind {
        8 => {
            let syn = arch::trap_syndrome();
            exit::handle_sync(vcpu, frame, hw, syn.esr, syn.far, syn.hpfar)
        }
        11 => {
            error!(
                "guest {} vCPU {}: SError (ESR {:#x}): stopped",
                vcpu.vm.name,
                vcpu.index,
                arch::trap_syndrome().esr
            );
            Outcome::Stop(StopCause::SError)
        }
        // IRQ (or FIQ) while the guest ran: a kick, a timer or the vGIC's maintenance.
        _ if HOST_GIC.load(Ordering::Relaxed) => exit::handle_irq(vcpu, hw),
        _ => {
            warn!("guest {}: interrupt with no host GIC set up, ignored", vcpu.vm.name);
            Outcome::Resume
        }
    };
    match outcome {
        Outcome::Resume => {}
        Outcome::Fault { ipa } => demand_fault(vcpu, frame, ipa),
        Outcome::CpuOff => leave_guest(vcpu),
        Outcome::Stop(cause) => stop(vcpu, cause),
        Outcome::Reset => reset(vcpu),
        Outcome::GiveBack { ipa, len } => give_back(vcpu, frame, ipa, len),
        Outcome::ConsoleInput => console_input(vcpu),
    }
    let vm = vcpu.vm;
    // Another vCPU is stopping or resetting the guest: this one leaves it now.
    if vm.life.life() != Life::Running {
        leave_guest(vcpu);
    }
    // Back to the guest holding no table pointer: a quiescent point.
    vm.quiescence.pass(vcpu.index, &vm.s2);
    if vm.s2.retired_pages() > 0 {
        vm.s2.drain_retired(&mut env(vm), vm.quiescence.oldest());
    }
}

/// The guest gives back `[ipa, ipa + len)` (checked: page-aligned, in its RAM) while its other
/// vCPUs may run and fault: unmapped by break-before-make with the entries held locked (a
/// block only partly returned is split first), every TLB invalidated, then the frames scrubbed
/// and freed and the guest's count credited (what it drew beyond its promise first). A later
/// touch faults in a fresh zeroed page. x0 = 0 and x1 = frames freed, or an error and nothing
/// changed.
fn give_back(vcpu: &mut Vcpu, frame: &mut TrapFrame, ipa: u64, len: u64) {
    let vm = vcpu.vm;
    let mut env = env(vm);
    let mut freed = 0usize;
    let unmapped = vm.s2.unmap_live(&mut env, ipa, len, &mut release_to(vm, &mut freed));
    vm.budget.untake(freed);
    vcpu.stats.given_back += freed as u64;
    let (x0, x1) = match unmapped {
        Ok(()) => (hypercall::SUCCESS, freed as u64),
        Err(e) => {
            warn!("guest {}: giving back IPA {ipa:#x}+{len:#x} refused: {e}", vm.name);
            (
                if e == Stage2Error::OutOfMemory {
                    hypercall::NO_MEMORY
                } else {
                    hypercall::INVALID_PARAMETER
                },
                0,
            )
        }
    };
    frame.set_x(0, x0 as u64);
    frame.set_x(1, x1);
}

/// Frees what a stage-2 change hands back (`released(pa, size)`: a page or a block, no
/// longer reachable through any TLB), scrubbed, counting the frames in `freed`.
fn release_to<'a>(vm: &'a Vm, freed: &'a mut usize) -> impl FnMut(u64, u64) + 'a {
    move |pa, size| {
        let n = (size / FRAME_SIZE) as usize;
        match frames().release(Pfn(pa / FRAME_SIZE), n, vm.owner(), &arch::Scrubber) {
            Ok(()) => *freed += n,
            Err(e) => error!("guest {}: frames at {pa:#x} not returned: {e}", vm.name),
        }
    }
}

/// The fast path for a guest's synchronous exception, from the arch's vectors with only
/// x0-x18 and x30 saved (in [`fast_frame`], which the paths that need registers load): a
/// stage-2 translation fault goes to [`fast_translation_fault`], an HVC to the PSCI query;
/// `false` sends everything else, and what they decline, to [`guest_trap`] with a full frame.
#[no_mangle]
extern "C" fn guest_fast() -> bool {
    match arch::fast_trap() {
        arch::FastTrap::Hvc => fast_hvc(),
        arch::FastTrap::TranslationFault { ipa, esr } => fast_translation_fault(ipa, esr),
        arch::FastTrap::Other => false,
    }
}

/// The registers the fast path's vector entry saved.
#[inline(always)]
fn fast_frame() -> &'static mut TrapFrame {
    // SAFETY: called only from `guest_fast`'s paths (`fast_hvc`, `fast_mmio`: one per trap, and
    // each calls this once), so this is the one reference to the frame until the trap returns.
    unsafe { arch::fast_frame() }
}

/// An access to an emulated device on the fast path: served when the hardware decoded it and
/// its register is one the fast frame holds, and the device takes it; anything else (a
/// refusal to explain, x19-x29) goes to the general path, which does it again in full.
/// A read of a constant register (the UART's flags a guest polls before every byte) is
/// served here with no call; the rest is a tail call. Out of line: inlined, its stack use
/// costs the fault paths in `guest_fast` a bigger frame (measured: +2 and +5).
#[inline(never)]
fn fast_mmio(vcpu: &mut Vcpu, ipa_page: u64, esr: u64) -> bool {
    let Some(a) = labyrinth::vm::trap::mmio_access(esr).filter(|a| arch::FastRegs::holds(a.reg)) else {
        return false;
    };
    let Some(device) = exit::device_at(vcpu.vm, ipa_page | arch::fault_page_offset()) else { return false };
    let frame = fast_frame();
    if exit::mmio_constant(vcpu, &mut arch::FastRegs(frame), device, a) {
        return true;
    }
    fast_mmio_device(vcpu, frame, device, a)
}

/// The device's own emulation (its state, under its lock), out of line.
#[inline(never)]
fn fast_mmio_device(vcpu: &mut Vcpu, frame: &mut TrapFrame, device: exit::Device, a: MmioAccess) -> bool {
    exit::mmio(vcpu, &mut arch::FastRegs(frame), &mut arch::Hw, device, a)
}

/// Not inlined: the fault path beside it in `guest_fast` then needs no stack frame of its own
/// (this is a tail call).
#[inline(never)]
fn fast_hvc() -> bool {
    let Some(vcpu) = this_vcpu() else { return false };
    exit::psci_query(vcpu, fast_frame())
}

/// A stage-2 translation fault on the fast path: a page in the vCPU's cached level-3 table
/// first ([`fast_page_fault`]); elsewhere in guest RAM a block ([`fast_block_fault`]) for a
/// guest that allows them; outside RAM an MMIO access ([`fast_mmio`]). Every call is in tail
/// position, so this path needs no stack frame. `false` leaves the trap to the general path
/// (walks, table pages, pool refills, errors...).
#[inline(always)]
fn fast_translation_fault(ipa_page: u64, esr: u64) -> bool {
    let Some(vcpu) = this_vcpu() else { return false };
    // A hit is RAM (the cache remembers only tables whose 2 MiB lies wholly in RAM:
    // `FaultCache::serving`), and no block can go where a level-3 table is: no more checks.
    if let Some(slot) = vcpu.vm.s2.page_slot(&vcpu.cache, ipa_page) {
        return fast_page_fault(vcpu, slot);
    }
    if !vcpu.vm.layout.in_ram(ipa_page) {
        return fast_mmio(vcpu, ipa_page, esr);
    }
    if !vcpu.vm.config.no_block_mappings {
        return fast_block_fault(vcpu, ipa_page);
    }
    false
}

/// A 4 KiB page of guest RAM into its free `slot` of the vCPU's cached level-3 table
/// (inlined into both callers: `fast_translation_fault`, and `block_declined` where a block
/// cannot go): the page counted from the vCPU's credit, one pool pop with its claim CAS, one
/// descriptor CAS. No lock, nothing shared written but the pool, the frame's tag and the
/// descriptor. Not counted here: the credit counts the pages ([`Vcpu::take_stats`]).
#[inline(always)]
fn fast_page_fault<'v>(vcpu: &mut Vcpu<'v>, slot: PageSlot<'v>) -> bool {
    let Some(pool) = vcpu.pool else { return false };
    // Only the cached level-3 table's slots are served here: everything that could fail after
    // the frame is taken (a walk, a table page) is the general path's, so this path makes no
    // call (its caller saved only the caller-saved registers).
    if !vcpu.take_page_without_call() {
        return false;
    }
    // Claimed for the space's own guest, so the install's owner check folds away.
    let Ok(page) = pool.alloc_guest_page_own_pool(slot.vm()) else {
        vcpu.untake_pages(1);
        return false;
    };
    match slot.install(&mut fast_env(pool), page) {
        Ok(()) => true,
        Err(declined) => {
            // The claim and the reason by value: a tail call, so this path keeps no frame.
            let retry = matches!(declined, Declined::Retry(_));
            page_declined(vcpu, pool, declined.into_claim(), retry)
        }
    }
}

/// A claimed page the fast path did not map: back to the pool untouched (still zero). Another
/// vCPU's mapping there (or a structural change holding the entry) means the access just
/// retries (`true`); anything else goes to the general path, which explains.
#[cold]
#[inline(never)]
fn page_declined(
    vcpu: &mut Vcpu,
    pool: CpuFrames<'static, 'static>,
    page: labyrinth::frame::ClaimedPage,
    retry: bool,
) -> bool {
    vcpu.untake_pages(1);
    if pool.return_unused_page_atomic(page.pfn(), Owner::guest(page.vm())).is_err() {
        let _ = frames().release(page.pfn(), 1, Owner::guest(page.vm()), &arch::Scrubber);
    }
    vcpu.stats.lost_races += u64::from(retry);
    // Opaque: known to be `retry`, the caller would call this and return the constant itself,
    // which is no tail call and costs the fast path a frame.
    core::hint::black_box(retry)
}

/// The fast paths' stage-2 environment, built from the CPU's pool handle rather than the
/// global: nothing to load that the cached-table shortcuts do not use.
#[inline(always)]
fn fast_env(pool: CpuFrames<'static, 'static>) -> arch::HwStage2<'static> {
    // No TLB maintenance on an install (invalid to valid): the VTTBR is not needed.
    arch::HwStage2 { frames: pool.manager(), cpu: pool.index(), vttbr: 0 }
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
    // level-3 table is there, and the caller found it not cached), the general path maps a
    // page. The offset in RAM wraps below it: two compares for "the whole 2 MiB lies in RAM".
    let off = block.wrapping_sub(vm.layout.ram_base);
    if off >= vm.layout.ram_size || vm.layout.ram_size - off < BLOCK {
        return false;
    }
    let Some(pool) = vcpu.pool else { return false };
    let Some(vacant) = vm.s2.block_slot(&vcpu.cache, block) else { return false };
    // Within the promise only: a draw beyond it is the general path's (a call).
    if !vm.budget.take_promised(BLOCK_FRAMES) {
        return false;
    }
    // Claimed for the space's own guest, so the install's owner check folds away.
    let Ok(claimed) = pool.alloc_guest_block_own_pool(vacant.vm()) else {
        return block_not_at_hand(vm);
    };
    if let Err(declined) = vacant.install(&mut fast_env(pool), claimed) {
        // The claim and what to do by value: a tail call, so this path keeps no frame.
        let outcome = match &declined {
            Declined::Retry(_) => Some(true),
            Declined::Refused(_, Stage2Error::AlreadyMapped { .. }) => None,
            Declined::Refused(..) => Some(false),
        };
        return block_declined(vcpu, ipa, declined.into_claim(), outcome);
    }
    vcpu.stats.block_faults += 1;
    // The pool just ran dry: refill it now, several blocks at once, so the next faults find
    // blocks here instead of taking the general path to refill (the call the general path
    // would make; paid once per `block_high` blocks).
    if pool.needs_block_refill() {
        return refill_blocks(pool);
    }
    true
}

/// No block in this CPU's pool: the frames counted go back and the general path takes the
/// fault (a tail call, so the fast path keeps no frame for this call).
#[cold]
#[inline(never)]
fn block_not_at_hand(vm: &Vm) -> bool {
    vm.budget.untake(BLOCK_FRAMES);
    false
}

/// A claimed block the fast path did not map: released (scrubbed: a block has no atomic
/// return). `outcome` `None`: pages already there, a page instead; `Some(true)`: another
/// vCPU's block (or a held entry), the access retries; `Some(false)`: the general path.
#[cold]
#[inline(never)]
fn block_declined(
    vcpu: &mut Vcpu,
    ipa: u64,
    block: labyrinth::frame::ClaimedBlock,
    outcome: Option<bool>,
) -> bool {
    let vm = vcpu.vm;
    vm.budget.untake(BLOCK_FRAMES);
    let head = block.pfn();
    if let Err(e) = frames().release(head, BLOCK_FRAMES, vm.owner(), &arch::Scrubber) {
        error!("guest {}: block {head} claimed and not mapped, not returned: {e}", vm.name);
    }
    match outcome {
        Some(retry) => {
            vcpu.stats.lost_races += u64::from(retry);
            retry
        }
        None => match vm.s2.page_slot(&vcpu.cache, ipa) {
            Some(slot) => fast_page_fault(vcpu, slot),
            None => false,
        },
    }
}

/// Refills the CPU's pools after the fault was served; `true`: the fault was.
#[cold]
#[inline(never)]
fn refill_blocks(pool: CpuFrames<'static, 'static>) -> bool {
    let _ = pool.manager().refill(pool.index());
    true
}

/// First touch of guest RAM, the general path: a 2 MiB block when allowed, the whole aligned
/// block is unmapped and a block is at hand (the pool refilled once if empty), else a 4 KiB
/// page, from the atomic path; missing tables linked by compare-and-swap. Another vCPU's
/// mapping found on the way is not an error: the frame goes back and the access retries.
fn demand_fault(vcpu: &mut Vcpu, frame: &mut TrapFrame, ipa: u64) {
    let vm = vcpu.vm;
    let frames = frames();
    let cpu = arch::cpu_index();
    let owner = vm.owner();
    let mut env = env(vm);
    if !vm.config.no_block_mappings {
        let block = ipa & !(BLOCK - 1);
        if block >= vm.layout.ram_base
            && block + BLOCK <= vm.layout.ram_end()
            && vm.s2.is_unmapped(&env, block, 2)
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
                Ok(first) => {
                    match vm.s2.map_cached(&mut env, &mut vcpu.cache, block, first.phys(), 2, Attrs::RAM) {
                        Ok(()) => {
                            vcpu.stats.block_faults += 1;
                            return;
                        }
                        Err(e) => {
                            vm.budget.untake(BLOCK_FRAMES);
                            let _ = frames.release(first, BLOCK_FRAMES, owner, &arch::Scrubber);
                            if matches!(e, Stage2Error::Busy { .. }) || !vm.s2.is_unmapped(&env, block, 2) {
                                // Another vCPU mapped a block there first, or a change holds it.
                                vcpu.stats.lost_races += 1;
                                return;
                            }
                            warn!("guest {}: block at {block:#x} not mapped ({e}): using pages", vm.name);
                        }
                    }
                }
                Err(_) => vm.budget.untake(BLOCK_FRAMES),
            }
        }
    }
    if !vcpu.take_pages(1) {
        let audit = frames.audit(None);
        let held = audit.guests.iter().find(|g| g.vm == vm.id).map_or(0, |g| g.memory);
        error!(
            "guest {}: out of memory at IPA {ipa:#x}: the {} KiB promised to it are used up and nothing unpromised is left ({} KiB beyond its promise; {} frames counted, {held} held)",
            vm.name,
            vm.budget.pages() * 4,
            vm.budget.beyond() * 4,
            vm.budget.used() + vm.budget.beyond()
        );
        stop(vcpu, StopCause::OutOfMemory);
    }
    let Some(pfn) = alloc_page(cpu, owner) else {
        error!("guest {}: out of memory at IPA {ipa:#x}: no frame left", vm.name);
        stop(vcpu, StopCause::OutOfMemory);
    };
    match vm.s2.map_cached(&mut env, &mut vcpu.cache, ipa & !(FRAME_SIZE - 1), pfn.phys(), 3, Attrs::RAM) {
        Ok(()) => {}
        Err(e) => {
            vcpu.untake_pages(1);
            let _ = frames.return_unused_page_atomic(cpu, pfn, owner);
            match e {
                // Another vCPU was first, or a structural change holds the entry: retry.
                Stage2Error::AlreadyMapped { .. } | Stage2Error::Busy { .. } => vcpu.stats.lost_races += 1,
                Stage2Error::OutOfMemory => {
                    if frames.refill(cpu).is_err() || frames.needs_refill(cpu) {
                        error!("guest {}: out of memory for stage-2 tables at IPA {ipa:#x}", vm.name);
                        stop(vcpu, StopCause::OutOfMemory);
                    }
                    // Retried when the guest re-executes the access.
                }
                e => {
                    exit::refuse_access(
                        vcpu,
                        frame,
                        &mut arch::Hw,
                        false,
                        arch::trap_syndrome().esr,
                        format_args!("IPA {ipa:#x}: {e}"),
                    );
                }
            }
        }
    }
    if frames.needs_refill(cpu) {
        let _ = frames.refill(cpu);
    }
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
                VcpuHw::kick(&mut arch::Hw, vm.cpu_of(i));
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

/// Every frame mapped in the guest's space goes back (scrubbed), its table pages too: `empty`
/// keeps the root (a reset), `destroy` frees it and the VMID (a stop). Called with every vCPU
/// of the guest out of it.
fn reclaim(vm: &Vm, destroy_space: bool) -> u64 {
    let name = vm.name;
    {
        // A streamed line is open on the console: end it there.
        let mut uart = vm.uart.lock();
        let streaming = uart.streaming();
        uart.flush(&mut |line, ended| match streaming {
            true => VcpuHw::console_part(&mut arch::Hw, name, line, ended),
            false => VcpuHw::console_line(&mut arch::Hw, name, line),
        });
    }
    let mut env = env(vm);
    let mut returned = 0usize;
    let mut released = release_to(vm, &mut returned);
    if destroy_space {
        let proof = vm.s2.destroy(&mut env, &mut released);
        VMIDS.lock().release(proof);
    } else {
        vm.s2.empty(&mut env, &mut released);
    }
    drop(released);
    vm.budget.reclaimed();
    returned as u64
}

/// A guest that could not be loaded, or stopped: its space destroyed.
fn destroy(vm: &Vm) {
    let returned = reclaim(vm, true);
    vm.boot.lock().frames_returned += returned;
}

/// PSCI SYSTEM_RESET from any vCPU: every vCPU is taken out, the memory reclaimed, the images
/// loaded again, and vCPU 0 alone restarted at the kernel, as firmware would.
fn reset(vcpu: &mut Vcpu) -> ! {
    let vm = vcpu.vm;
    if !take_guest_down(vcpu) {
        leave_guest(vcpu);
    }
    info!("guest {}: SYSTEM_RESET: reclaiming and reloading", vm.name);
    // Its shared regions stay (same frames), unmapped with the rest until the reload maps them
    // again: a revocation meanwhile must not unmap in a space being emptied.
    SHARED.lock().suspend(vm.id);
    // The reclaim resets the whole budget: this vCPU's credit goes with it.
    vcpu.drop_credit();
    let returned = reclaim(vm, false);
    let reloaded = {
        let mut boot = vm.boot.lock();
        boot.frames_returned += returned;
        boot.resets += 1;
        reload(vm, &mut boot)
    };
    if let Err(why) = reloaded {
        error!("guest {}: cannot restart after reset: {why}", vm.name);
        stop_taken_down(vcpu, StopCause::ResetFailed);
    }
    {
        // A fresh UART; the input focus (and so streamed output) stays with the guest.
        let mut uart = vm.uart.lock();
        let (streaming, dropped) = (uart.streaming(), uart.rx_dropped);
        *uart = VPl011::new();
        uart.set_streaming(streaming, &mut |_, _| {});
        uart.rx_dropped = dropped;
        vm.uart_rx.store(0, Ordering::Relaxed);
    }
    if let Some(g) = vm.vgic.as_ref() {
        g.reset();
    }
    if !vm.boot_vcpu0() {
        error!("guest {}: vCPU 0 cannot be started after reset", vm.name);
    }
    vm.life.finish(true);
    arch::send_event();
    leave_guest(vcpu)
}

/// A fresh device tree (its reset count moved on) and the images loaded again after a reset.
fn reload(vm: &Vm, boot: &mut Boot) -> Result<(), &'static str> {
    boot.dtb = fdt_gen::generate(
        &vm.layout,
        vm.vcpus,
        vm.config.bootargs,
        boot.resets,
        vm.vgic.is_some(),
        &vm.config.shared,
    )
    .map_err(|_| "cannot rewrite its device tree")?;
    load(vm, boot, arch::cpu_index()).map_err(|_| "out of memory loading its images")?;
    shm_remap(vm).map_err(|_| "cannot map its shared memory again")
}

/// The guest's stage-2 mappings, merged into runs, at debug level (`loglevel=debug`).
fn dump_mappings(vm: &Vm) {
    if log::max_level() < log::LevelFilter::Debug {
        return;
    }
    let s2 = &vm.s2;
    let env = env(vm);
    let (mut n, mut small) = (0u32, 0u32);
    // Every run of a block or more (their count is bounded by the RAM), the first 4 KiB ones.
    s2.for_each_run(&env, &mut |m| {
        let block_run = m.size >= BLOCK;
        small += u32::from(!block_run);
        if block_run || small <= 64 {
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
    dump_mappings(vm);
    let (within, beyond) = (vm.budget.used(), vm.budget.beyond());
    // Its regions' borrowers lose their views first, then its space goes, then the frames.
    let gone = shm_detach(vm, GUESTS.get().copied().unwrap_or(&[]), "stopped");
    destroy(vm);
    let released = shm_release(vm, gone, "stopped");
    let (resets, returned) = {
        let boot = vm.boot.lock();
        (boot.resets, boot.frames_returned)
    };
    vm.budget.withdraw(frames());
    let audit = frames().audit(None);
    let left = audit.guests.iter().find(|g| g.vm == vm.id).map_or(0, |g| g.memory + g.page_tables);
    if audit.shared > 0 || released {
        let verdict = if audit.is_consistent() { "consistent" } else { "FAILED" };
        info!("ownership audit after guest {} stopped: {verdict}, {} frames shared", vm.name, audit.shared);
    }
    let mut s = *vm.totals.lock();
    s.add(&vcpu.stats());
    let mut line = alloc::string::String::new();
    let _ = write!(
        line,
        "guest {}: stopped by {cause:?}; vCPUs {}; faults {} (4 KiB pages {}, 2 MiB blocks {}), lost races {}; aborts injected {}, undefined {}; exits: mmio {}, hvc {}, smc {}, sysreg {}; resets {resets}; memory: promised {} KiB, drawn within it {} KiB, beyond it {} KiB, given back {} KiB; frames returned {returned}, still owned {left}; interrupts {} (virtual timer {}, kicks {}, maintenance {}), own SGIs {}, vgic mmio {}; typed input dropped {}",
        vm.name,
        vm.vcpus,
        s.page_faults + s.block_faults,
        s.page_faults,
        s.block_faults,
        s.lost_races,
        s.aborts_injected,
        s.undefs_injected,
        s.mmio,
        s.hvc,
        s.smc,
        s.sysreg,
        vm.budget.pages() * 4,
        within * 4,
        beyond * 4,
        s.given_back * 4,
        s.irqs,
        s.vtimer,
        s.kicks,
        s.maintenance,
        s.sgis,
        s.vgic_mmio,
        vm.uart.lock().rx_dropped,
    );
    info!("{line}");
    REPORTS.lock().push(line);
    vm.life.finish(false);
    input_after_stop(vm);
    arch::send_event();
    if LIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
        info!("all guests stopped");
        for r in REPORTS.lock().iter() {
            info!("report: {r}");
        }
        let audit = frames().audit(None);
        info!("ownership audit: {audit}");
        if audit.is_consistent()
            && audit.shared == 0
            && audit.guests.iter().all(|g| g.memory + g.page_tables + g.shared == 0)
        {
            info!("ownership audit: consistent, no frame owned by any guest");
        } else {
            error!("ownership audit: FAILED");
        }
        arch::power_off();
    }
    retire_this_cpu();
    arch::park()
}

/// This CPU's guest stopped and it parks for good (static partitioning: nothing else runs
/// here): the frames its pools hold go back, and what they could hold joins the unpromised
/// frames, for the guests still running.
fn retire_this_cpu() {
    let cpu = arch::cpu_index();
    match frames().retire(cpu) {
        Ok(n) => info!(
            "CPU {cpu} parks: its frame pools' {} KiB go back; {} KiB free and unpromised now",
            n * 4,
            frames().unpromised().available() * 4
        ),
        Err(e) => warn!("CPU {cpu} parks but its frame pools were not emptied: {e}"),
    }
}
