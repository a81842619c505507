//! The boot sequence, after the arch entry code has the MMU on: trust nothing in the device
//! tree until `dt` has checked it, print the memory map it derives, bring the other CPUs up,
//! and (until guests exist) power off cleanly. Every refusal names its cause and powers off.

use core::sync::atomic::{AtomicUsize, Ordering};

use labyrinth::dt::{self, Conduit, Platform, Region};
use labyrinth::logger::level_from_bootargs;
use labyrinth::memmap::{self, MemoryMap};
use labyrinth::psci;
use log::{error, info, warn, LevelFilter};

use crate::arch;

/// Free RAM below which Labyrinth refuses to run: room for its frame database, heap and pools.
const MIN_FREE_RAM: u64 = 16 << 20;
/// How long the boot CPU waits for the others to report, in milliseconds.
const CPU_ONLINE_TIMEOUT_MS: u64 = 1000;

/// CPUs that have reached `secondary_main` (the boot CPU counts itself).
static CPUS_ONLINE: AtomicUsize = AtomicUsize::new(0);
/// MPIDR of each CPU index Labyrinth gave out (index 0: the boot CPU; 0 for none).
/// The firmware's CPU_ON function id.
static CPU_ON_FID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(psci::CPU_ON_64 as u64);

/// Reports why Labyrinth cannot go on, then powers off.
fn refuse(args: core::fmt::Arguments<'_>) -> ! {
    error!("{args}");
    error!("powering off");
    arch::power_off()
}

pub fn primary_main(dtb: u64, dtb_size: u64) -> ! {
    CPUS_ONLINE.store(1, Ordering::Relaxed);
    if dtb_size == 0 {
        arch::install_fallback_console();
        refuse(format_args!(
            "device tree refused: x0 = {dtb:#x} holds no 8-byte aligned blob with the FDT magic"
        ));
    }
    // SAFETY: the boot map made [dtb, dtb + dtb_size) readable (read-only) and nothing in
    // Labyrinth ever writes it; it stays mapped for the whole run.
    let blob: &'static [u8] = unsafe { core::slice::from_raw_parts(dtb as *const u8, dtb_size as usize) };
    let platform = match dt::parse(blob) {
        Ok(p) => p,
        Err(e) => {
            arch::install_fallback_console();
            refuse(format_args!("device tree refused: {e}"));
        }
    };

    let level = platform.bootargs().and_then(level_from_bootargs).unwrap_or(LevelFilter::Info);
    match platform.uart() {
        Some(uart) => {
            if let Err(e) = arch::init_console(uart.region.base(), level) {
                arch::install_fallback_console();
                refuse(format_args!("cannot map the console {}: {e}", uart.node));
            }
        }
        None => {
            arch::install_fallback_console();
            warn!("device tree names no PL011: console at QEMU virt's {:#x}", 0x0900_0000);
        }
    }
    let cpu = arch::read_cpu_info();
    info!(
        "Labyrinth {} at EL{}, MIDR {:#x}, {}-bit physical addresses",
        env!("CARGO_PKG_VERSION"),
        cpu.current_el,
        cpu.midr,
        cpu.pa_bits
    );
    log::debug!(
        "device tree at {dtb:#x}, {} bytes, bootargs {:?}",
        platform.total_size(),
        platform.bootargs()
    );

    let map = memory_map(&platform, dtb);
    for line in map.lines() {
        info!("{line}");
    }
    // Free RAM is what Labyrinth will hand out (frame database, heap, guests): map it. Reserved
    // ranges stay unmapped, so no stray pointer reaches firmware or /reserved-memory.
    for r in map.free() {
        if let Err(e) = arch::map_range(r.base(), r.end(), arch::MapKind::ReadWrite) {
            refuse(format_args!("cannot map free RAM {r}: {e}"));
        }
    }

    let cpus = start_secondaries(&platform);
    let frames = match crate::frames::init(&map, image_region(), cpus) {
        Ok(f) => f,
        Err(e) => refuse(format_args!("frame ownership: {e}")),
    };
    crate::selftest::run(platform.bootargs(), frames);

    if platform.guests().is_empty() {
        info!("no guests configured in /chosen: nothing to run, powering off");
        arch::power_off();
    }
    let running = crate::vmm::create_all(&platform, frames, cpus, cpu.pa_bits);
    if running == 0 {
        error!("no guest could be started: powering off");
        arch::power_off();
    }
    // Guest i runs on CPU i: wake the others (parked off since they reported), then run ours.
    for index in 1..running {
        restart_cpu(index);
    }
    crate::vmm::run_this_cpu()
}

/// Starts CPU `index` again (it powered itself off after reporting online) to run its guest.
fn restart_cpu(index: usize) {
    let Some(mpidr) = arch::mpidr_of(index) else { return };
    let fid = CPU_ON_FID.load(Ordering::Relaxed) as u32;
    // Make the guest's slot visible before the CPU starts (it reads it with its MMU on).
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::ISH);
    for _ in 0..1000 {
        match arch::cpu_on(fid, mpidr, arch::secondary_entry_address(), index as u64) {
            Ok(()) => return,
            // Still on its way off: try again.
            Err(psci::PsciError::AlreadyOn) | Err(psci::PsciError::OnPending) => core::hint::spin_loop(),
            Err(e) => {
                error!("CPU {mpidr:#x}: cannot start it for its guest ({e:?})");
                return;
            }
        }
    }
    error!("CPU {mpidr:#x}: never powered off: its guest does not run");
}

fn image_region() -> Region {
    let (start, end) = arch::image_range();
    match Region::from_bounds(start, end) {
        Some(r) => r,
        None => refuse(format_args!("empty image range {start:#x}-{end:#x}")),
    }
}

fn memory_map(platform: &Platform<'static>, dtb: u64) -> MemoryMap<'static> {
    let image = image_region();
    let reservations = match memmap::boot_reservations(platform, image, dtb) {
        Ok(r) => r,
        Err(e) => refuse(format_args!("memory map refused: {e}")),
    };
    match MemoryMap::build(platform.memory(), reservations.as_slice(), MIN_FREE_RAM) {
        Ok(m) => m,
        Err(e) => refuse(format_args!("memory map refused: {e}")),
    }
}

/// Starts every CPU the device tree lists through PSCI CPU_ON and waits (bounded) for each to
/// report. A CPU that fails to start is logged and left off. Returns the CPU indices in use
/// (the boot CPU is 0, started CPUs 1, 2, ...).
fn start_secondaries(platform: &Platform<'_>) -> usize {
    let cpus = platform.cpus();
    let Some(psci_node) = platform.psci() else {
        warn!("no /psci node: only the boot CPU runs");
        return 1;
    };
    if psci_node.conduit == Conduit::Hvc {
        warn!("/psci asks for HVC, which traps to Labyrinth itself at EL2: only the boot CPU runs");
        return 1;
    }
    let fid = psci_node.cpu_on.unwrap_or(psci::CPU_ON_64);
    CPU_ON_FID.store(fid as u64, Ordering::Relaxed);
    let me = arch::mpidr();
    let mut next_index = 1;
    let mut started = 1;
    arch::record_mpidr(0, me);
    for c in cpus.iter().filter(|c| c.mpidr != me) {
        if next_index >= arch::MAX_CPUS {
            warn!("CPU {:#x}: beyond the {} CPUs Labyrinth runs, left off", c.mpidr, arch::MAX_CPUS);
            continue;
        }
        match arch::cpu_on(fid, c.mpidr, arch::secondary_entry_address(), next_index as u64) {
            Ok(()) => {
                arch::record_mpidr(next_index, c.mpidr);
                next_index += 1;
                started += 1;
            }
            Err(e) => warn!("CPU {:#x}: PSCI CPU_ON failed ({e:?}), left off", c.mpidr),
        }
    }
    let deadline = arch::time_now_ticks() + arch::ticks_per_second() * CPU_ONLINE_TIMEOUT_MS / 1000;
    while CPUS_ONLINE.load(Ordering::Acquire) < started && arch::time_now_ticks() < deadline {
        core::hint::spin_loop();
    }
    let online = CPUS_ONLINE.load(Ordering::Acquire);
    if online < started {
        warn!("{} CPU(s) started but never reported", started - online);
    }
    info!("{online} of {} CPUs online", cpus.len());
    next_index
}

#[no_mangle]
extern "C" fn secondary_main(index: usize) -> ! {
    if crate::vmm::has_guest(index) {
        crate::vmm::run_this_cpu();
    }
    info!("cpu{index} online, MPIDR {:#x}", arch::mpidr());
    CPUS_ONLINE.fetch_add(1, Ordering::Release);
    // Off until a guest needs it: CPU_ON brings it back here with its guest in place.
    arch::cpu_off();
    arch::park()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    arch::emergency_line(format_args!("panic: {info}"));
    arch::power_off()
}
