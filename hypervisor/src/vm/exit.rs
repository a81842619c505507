//! Exit handling: what a guest's trap means and what it does, as plain functions from (vCPU,
//! its guest, the trap, the saved registers) to an [`Outcome`], over the [`VcpuHw`] a CPU
//! offers. MMIO goes to the device models, HVC/SMC to PSCI, system registers to their
//! emulation, interrupts to the virtual GIC; what needs the machine as a whole (a demand
//! fault's frames, stopping or resetting the guest, taking a vCPU off) is returned to the
//! caller as the outcome.
//!
//! It owns the guest-visible effect of every trap: which register a load fills and how,
//! when the PC moves, what is injected. It never panics on anything a guest controls, and
//! never touches hardware except through `VcpuHw`.

use core::sync::atomic::Ordering;

use log::warn;

use super::guest::StopCause;
use super::hypercall;
use super::layout::{UART_BASE, UART_SIZE};
use super::trap::{self, GuestTrap, MmioAccess};
use super::vcpu::{host_irq, GuestRegs, Vcpu, VcpuHw, LOG_LIMIT};
use super::vgic::{self, VcpuSet};
use super::vpl011::VPl011;
use super::vpsci::{self, PsciAction};
use super::vtimer;

/// What the caller does once a trap is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Back into the guest with the registers as they are now.
    Resume,
    /// First touch of guest RAM at `ipa`: the demand-fault path maps it (or stops the guest).
    Fault {
        ipa: u64,
    },
    /// The vCPU called CPU_OFF (its power state is Off already): it leaves the guest until a
    /// CPU_ON starts it again; if every vCPU is off, the guest stops.
    CpuOff,
    Stop(StopCause),
    Reset,
    /// The guest gives back `[ipa, ipa + len)` (checked: page-aligned, inside its RAM): the
    /// caller unmaps and frees it and writes the call's results to x0 and x1.
    GiveBack {
        ipa: u64,
        len: u64,
    },
    /// The host console received characters: the caller reads them and routes them to the
    /// guest with the input focus ([`uart_input`]).
    ConsoleInput,
}

/// A synchronous exception from the guest, decoded from its syndrome (`esr`, `far`,
/// `hpfar`).
pub fn handle_sync<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut H::Regs,
    hw: &mut H,
    esr: u64,
    far: u64,
    hpfar: u64,
) -> Outcome {
    let vm = vcpu.vm;
    match trap::decode(esr, far, hpfar) {
        GuestTrap::Abort { ipa: Some(ipa), fsc: 0x04..=0x07, .. } if vm.layout.in_ram(ipa) => {
            Outcome::Fault { ipa }
        }
        GuestTrap::Abort { ipa: Some(ipa), access: Some(a), instruction: false, .. }
            if device_at(vm, ipa).is_some() =>
        {
            match device_at(vm, ipa) {
                Some(device) if !mmio(vcpu, regs, hw, device, a) => {
                    refuse_access(vcpu, regs, hw, false, esr, format_args!("{device:x?}, {} bytes", a.size))
                }
                _ => Outcome::Resume,
            }
        }
        GuestTrap::Abort { ipa: Some(ipa), instruction, .. }
            if vm.shm_revoked.at(&vm.config.shared, ipa).is_some() =>
        {
            refuse_revoked(vcpu, regs, hw, instruction, esr, ipa)
        }
        GuestTrap::Abort { ipa, instruction, fsc, .. } => refuse_access(
            vcpu,
            regs,
            hw,
            instruction,
            esr,
            format_args!("IPA {ipa:x?} (FAR {far:#x}), fault status {fsc:#x}"),
        ),
        GuestTrap::Hvc { .. } => {
            vcpu.stats.hvc += 1;
            firmware_call(vcpu, regs, hw)
        }
        GuestTrap::Smc { .. } => {
            vcpu.stats.smc += 1;
            // A trapped SMC leaves ELR at the SMC itself.
            regs.skip_instruction();
            firmware_call(vcpu, regs, hw)
        }
        GuestTrap::SysReg { encoding, read, reg } if vtimer::classify(encoding).is_some() => {
            vcpu.stats.sysreg += 1;
            physical_timer(vcpu, regs, hw, encoding, read, reg)
        }
        GuestTrap::SysReg { encoding, .. } if trap::is_dc_set_way(encoding) => {
            vcpu.stats.sysreg += 1;
            regs.skip_instruction();
            Outcome::Resume
        }
        GuestTrap::SysReg { encoding, read: false, reg }
            if vm.vgic.is_some() && trap::is_gic_sgi_register(encoding) =>
        {
            vcpu.stats.sysreg += 1;
            let value = regs.x(reg);
            regs.skip_instruction();
            send_sgi(vcpu, hw, value);
            Outcome::Resume
        }
        GuestTrap::SysReg { encoding, read, .. } => {
            vcpu.stats.sysreg += 1;
            undefined(
                vcpu,
                regs,
                hw,
                format_args!(
                    "system register access {encoding:#x} ({})",
                    if read { "read" } else { "write" }
                ),
            )
        }
        GuestTrap::Other { class } => undefined(vcpu, regs, hw, format_args!("exception class {class:#x}")),
    }
}

/// A PSCI call whose whole effect is its return value (VERSION, FEATURES, AFFINITY_INFO,
/// errors), answered from x0-x3 without taking anything: `false` sends it to
/// [`handle_sync`]. For the fast path.
#[inline(always)]
pub fn psci_query(vcpu: &mut Vcpu, regs: &mut impl GuestRegs) -> bool {
    let vm = vcpu.vm;
    let ram = vm.layout.ram_base..vm.layout.ram_end();
    match vpsci::query(regs.x(0), regs.x(1), regs.x(2), regs.x(3), &vm.power, ram) {
        Some(v) => {
            vcpu.stats.hvc += 1;
            regs.set_x(0, v);
            true
        }
        None => false,
    }
}

/// An HVC or SMC: Labyrinth's own calls, else PSCI (which answers anything else with
/// NOT_SUPPORTED).
fn firmware_call<H: VcpuHw>(vcpu: &mut Vcpu, regs: &mut H::Regs, hw: &mut H) -> Outcome {
    let fid = regs.x(0);
    if !hypercall::is_ours(fid) {
        return psci(vcpu, regs, hw);
    }
    let vm = vcpu.vm;
    let values = match hypercall::decode(fid, regs.x(1), regs.x(2), vm.ram()) {
        hypercall::Call::Return(v) => v,
        hypercall::Call::MemoryInfo => {
            let b = &vm.budget;
            [0, b.pages() as u64, (b.used() + b.beyond()) as u64, b.drawable_beyond() as u64]
        }
        hypercall::Call::GiveBack { ipa, len } => return Outcome::GiveBack { ipa, len },
    };
    for (r, v) in (0u8..).zip(values) {
        regs.set_x(r, v);
    }
    Outcome::Resume
}

fn psci<H: VcpuHw>(vcpu: &mut Vcpu, regs: &mut H::Regs, hw: &mut H) -> Outcome {
    let vm = vcpu.vm;
    let (fid, x1, x2, x3) = (regs.x(0), regs.x(1), regs.x(2), regs.x(3));
    match vpsci::call(fid, x1, x2, x3, vcpu.index, &vm.power, vm.ram()) {
        PsciAction::Return(v) => {
            regs.set_x(0, v);
            Outcome::Resume
        }
        PsciAction::CpuOn { .. } => {
            // The target's CPU waits to be started: wake it to take the request.
            hw.wake_waiters();
            regs.set_x(0, 0);
            Outcome::Resume
        }
        PsciAction::CpuOff if vm.power.all_off() => Outcome::Stop(StopCause::CpuOff),
        PsciAction::CpuOff => Outcome::CpuOff,
        PsciAction::SystemOff => Outcome::Stop(StopCause::SystemOff),
        PsciAction::SystemReset => Outcome::Reset,
    }
}

/// An emulated device's registers, and the offset of an access in them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Uart { offset: u64 },
    Gic { frame: vgic::Frame, offset: u64 },
}

/// The device a guest's `ipa` reaches, if any.
#[inline(always)]
pub fn device_at(vm: &super::Vm, ipa: u64) -> Option<Device> {
    if (UART_BASE..UART_BASE + UART_SIZE).contains(&ipa) {
        return Some(Device::Uart { offset: ipa - UART_BASE });
    }
    let (frame, offset) = vgic::frame_of(ipa, vm.vcpus).filter(|_| vm.vgic.is_some())?;
    Some(Device::Gic { frame, offset })
}

/// A load from a device register whose value never changes (the UART's flags, the GIC's
/// identification), served from no state and under no lock: `true` when it was (the register
/// filled, the PC moved on), `false` for anything else, left to [`mmio`]. The fast path's
/// first try: it makes no call.
#[inline(always)]
pub fn mmio_constant(vcpu: &mut Vcpu, regs: &mut impl GuestRegs, device: Device, a: MmioAccess) -> bool {
    if a.write {
        return false;
    }
    let value = match device {
        Device::Uart { offset } => {
            VPl011::read_constant(offset, a.size, vcpu.vm.uart_rx.load(Ordering::Relaxed)).map(u64::from)
        }
        Device::Gic { frame, offset } if vcpu.vm.vgic.is_some() => {
            vgic::VGic::read_constant(frame, offset, a.size)
        }
        Device::Gic { .. } => None,
    };
    let Some(value) = value else { return false };
    match device {
        Device::Uart { .. } => vcpu.stats.mmio += 1,
        Device::Gic { .. } => vcpu.stats.vgic_mmio += 1,
    }
    emulate_mmio(regs, a, |_| Some(value))
}

/// A trapped MMIO access `a` to `device`, carried out: `true` when the device took it (the
/// load's register filled, the PC moved on), `false` when it refused it (nothing changed:
/// the caller injects an abort). The same for the fast path and the general one.
#[inline(always)]
pub fn mmio<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut impl GuestRegs,
    hw: &mut H,
    device: Device,
    a: MmioAccess,
) -> bool {
    match device {
        Device::Uart { offset } => {
            vcpu.stats.mmio += 1;
            let name = vcpu.vm.name;
            let (done, change) = {
                let mut uart = vcpu.vm.uart.lock();
                let streaming = uart.streaming();
                let done = emulate_mmio(regs, a, |write| match write {
                    Some(v) => uart
                        .write(offset, a.size, v as u32, &mut |out, ended| match streaming {
                            true => hw.console_part(name, out, ended),
                            false => hw.console_line(name, out),
                        })
                        .then_some(0),
                    None => uart.read(offset, a.size).map(u64::from),
                });
                vcpu.vm.uart_rx.store(uart.rx_waiting(), Ordering::Relaxed);
                (done, uart.line_change())
            };
            if let Some(level) = change {
                uart_line(vcpu, hw, level);
            }
            done
        }
        Device::Gic { frame, offset } => {
            vcpu.stats.vgic_mmio += 1;
            let Some(g) = vcpu.vm.vgic.as_ref() else { return false };
            let mut to_sync = VcpuSet::EMPTY;
            let done = emulate_mmio(regs, a, |write| match write {
                Some(v) => g.write(frame, offset, a.size, v).map(|set| {
                    // An enable, a pending bit, a priority or a route changed what these
                    // vCPUs see.
                    to_sync = set;
                    0
                }),
                None => g.read(frame, offset, a.size),
            });
            // Reads (and writes that changed nothing) have no one to tell.
            if !to_sync.is_empty() {
                deliver(vcpu, hw, to_sync);
            }
            done
        }
    }
}

/// The emulated UART's interrupt line moved to `level` (a read emptied its FIFO, the guest
/// changed its mask): the virtual GIC follows, and the vCPU its SPI is routed to is told.
fn uart_line<H: VcpuHw>(vcpu: &mut Vcpu, hw: &mut H, level: bool) {
    let Some(g) = vcpu.vm.vgic.as_ref() else { return };
    if let Some(target) = g.set_line_level(vcpu.index, vgic::UART_INTID, level) {
        deliver(vcpu, hw, VcpuSet::only(target));
    }
}

/// Characters typed for guest `vm` (which has the input focus), from the CPU whose vCPU
/// `here` (of any guest) took the console's interrupt: into its UART's FIFO, its interrupt
/// line raised if that changed it; the vCPU the line is routed to syncs now if it is `here`,
/// else is kicked. Returns how many characters its full FIFO dropped.
pub fn uart_input<H: VcpuHw>(here: &mut Vcpu, hw: &mut H, vm: &super::Vm, bytes: &[u8]) -> usize {
    let (dropped, change) = {
        let mut uart = vm.uart.lock();
        let dropped = bytes.iter().filter(|&&b| !uart.push_input(b)).count();
        vm.uart_rx.store(uart.rx_waiting(), Ordering::Relaxed);
        (dropped, uart.line_change())
    };
    if let (Some(level), Some(g)) = (change, vm.vgic.as_ref()) {
        if let Some(target) = g.set_line_level(0, vgic::UART_INTID, level) {
            if core::ptr::eq(here.vm, vm) && here.index == target {
                sync_vgic(here, hw);
            } else {
                hw.kick(vm.cpu_of(target));
            }
        }
    }
    dropped
}

/// The vCPUs in `set` have new interrupt state: this one syncs its list registers now, the
/// others are kicked (they sync when they trap).
fn deliver<H: VcpuHw>(vcpu: &mut Vcpu, hw: &mut H, set: VcpuSet) {
    let vm = vcpu.vm;
    for i in set.without(vcpu.index).iter().filter(|&i| i < vm.vcpus) {
        hw.kick(vm.cpu_of(i));
    }
    if set.contains(vcpu.index) {
        sync_vgic(vcpu, hw);
    }
}

/// A trapped `ICC_SGI1R_EL1` (or ASGI1R/SGI0R) write: an SGI the guest sends, posted to its
/// targets' mailboxes without a lock, then delivered.
fn send_sgi<H: VcpuHw>(vcpu: &mut Vcpu, hw: &mut H, value: u64) {
    let Some(g) = vcpu.vm.vgic.as_ref() else { return };
    vcpu.stats.sgis += 1;
    let targets = g.send_sgi(vcpu.index, value);
    deliver(vcpu, hw, targets);
}

/// A trapped access to the EL1 physical timer (`CNTP_CTL/CVAL/TVAL_EL0`), emulated: its
/// interrupt (PPI 30) follows the emulated timer's line.
fn physical_timer<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut H::Regs,
    hw: &mut H,
    encoding: u32,
    read: bool,
    reg: u8,
) -> Outcome {
    let Some(which) = vtimer::classify(encoding) else { return Outcome::Resume };
    let now = hw.counter();
    if read {
        regs.set_x(reg, vcpu.ptimer.read(which, now));
    } else {
        vcpu.ptimer.write(which, regs.x(reg), now);
    }
    regs.skip_instruction();
    sync_vgic(vcpu, hw);
    Outcome::Resume
}

/// Physical interrupts that arrived while the guest ran: a kick only takes the vCPU out of
/// the guest (its caller then looks at the guest's state; the sync drains its mailbox); the
/// virtual timer's PPI is held off at the host GIC until the guest deals with it; the EL2
/// timer stands for the emulated physical timer; a maintenance interrupt asks for a sync.
pub fn handle_irq<H: VcpuHw>(vcpu: &mut Vcpu, hw: &mut H) -> Outcome {
    // Bounded: each INTID is completed before the next acknowledge and none of them comes
    // back once handled, so more than a few rounds means a misbehaving GIC.
    // Whether the list registers are up to date with everything handled so far.
    let mut synced = false;
    let mut console = false;
    for _ in 0..16 {
        let Some(intid) = hw.ack() else { break };
        vcpu.stats.irqs += 1;
        synced = false;
        match intid {
            host_irq::KICK => vcpu.stats.kicks += 1,
            // Its condition (a completed level interrupt, empty list registers) holds until
            // the list registers are rewritten: sync before completing it, or it comes back.
            host_irq::MAINTENANCE => {
                vcpu.stats.maintenance += 1;
                sync_vgic(vcpu, hw);
                synced = true;
            }
            host_irq::VTIMER => {
                hw.set_ppi_enabled(host_irq::VTIMER, false);
                // A guest without a virtual GIC cannot take it: it stays off.
                vcpu.vtimer_held = vcpu.vm.vgic.is_some();
                vcpu.stats.vtimer += 1;
            }
            host_irq::HYP_TIMER => hw.set_hyp_timer(None),
            // Level: it stays high until the caller has read what waits, which it does next.
            i if Some(i) == hw.console_intid() => console = true,
            _ => {}
        }
        hw.eoi(intid);
    }
    if !synced {
        sync_vgic(vcpu, hw);
    }
    if console {
        return Outcome::ConsoleInput;
    }
    Outcome::Resume
}

/// Brings the guest's interrupts up to date on this CPU: both timers' lines resampled (a
/// disabled or re-armed timer is no longer pending), the list registers folded back into the
/// model, the mailbox drained, and the list registers refilled (see `vm::vgic`).
pub fn sync_vgic<H: VcpuHw>(vcpu: &mut Vcpu, hw: &mut H) {
    let Some(g) = vcpu.vm.vgic.as_ref() else { return };
    let now = hw.counter();
    let (ctl, cval) = hw.vtimer_registers();
    let vline = vtimer::line_level(ctl, cval, now);
    g.set_line_level(vcpu.index, vgic::VTIMER_INTID, vline);
    if !vline && vcpu.vtimer_held {
        vcpu.vtimer_held = false;
        hw.set_ppi_enabled(host_irq::VTIMER, true);
    }
    let pline = vcpu.ptimer.level(now);
    g.set_line_level(vcpu.index, vgic::PTIMER_INTID, pline);
    // While its line is high the EL2 timer stays off; it is armed again once the guest has
    // dealt with the interrupt (a resample finds the line low).
    hw.set_hyp_timer(if pline { None } else { vcpu.ptimer.deadline() });
    let mut buf = [0u64; 16];
    let lrs = &mut buf[..hw.lr_count().min(16)];
    hw.read_lrs(lrs);
    let underflow = g.sync_lrs(vcpu.index, lrs);
    hw.write_lrs(lrs);
    hw.set_underflow(underflow);
}

/// Carries out a trapped MMIO access on a device model: `device(None)` reads (the value, or
/// `None` to refuse), `device(Some(v))` writes `v` (`Some(_)` when accepted). On success the
/// load's register gets the value as the instruction would have, and the instruction is
/// skipped; `false` leaves the registers as they were for the caller to inject an abort.
pub fn emulate_mmio(
    regs: &mut impl GuestRegs,
    a: MmioAccess,
    device: impl FnOnce(Option<u64>) -> Option<u64>,
) -> bool {
    let Some(value) = device(a.write.then(|| regs.x(a.reg))) else { return false };
    if !a.write {
        regs.set_x(a.reg, load_value(a, value));
    }
    regs.skip_instruction();
    true
}

/// A load's value as the register receives it: zero- or sign-extended from `a.size` bytes,
/// truncated to 32 bits for a W register.
#[inline(always)]
pub fn load_value(a: MmioAccess, v: u64) -> u64 {
    let bits = u32::from(a.size.clamp(1, 8)) * 8;
    let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let mut v = v & mask;
    if a.sign_extend && bits < 64 && v & (1 << (bits - 1)) != 0 {
        v |= !mask;
    }
    if !a.sixty_four {
        v &= 0xffff_ffff;
    }
    v
}

/// An access Labyrinth refuses: a synchronous external abort injected, logged for the first
/// few of each vCPU.
pub fn refuse_access<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut H::Regs,
    hw: &mut H,
    instruction: bool,
    esr: u64,
    what: core::fmt::Arguments<'_>,
) -> Outcome {
    vcpu.stats.aborts_injected += 1;
    if vcpu.logged < LOG_LIMIT {
        vcpu.logged += 1;
        warn!(
            "guest {} vCPU {}: {} at PC {:#x} refused: {what}: external abort injected",
            vcpu.vm.name,
            vcpu.index,
            if instruction { "instruction fetch" } else { "data access" },
            regs.pc()
        );
    }
    hw.inject_external_abort(regs, instruction, esr);
    Outcome::Resume
}

/// An access to a shared region revoked from this guest (its owner stopped): refused like
/// any access outside RAM and devices, and the first of each vCPU to each region says why.
fn refuse_revoked<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut H::Regs,
    hw: &mut H,
    instruction: bool,
    esr: u64,
    ipa: u64,
) -> Outcome {
    let vm = vcpu.vm;
    if let Some((node, id, owner)) = vm.shm_revoked.at(&vm.config.shared, ipa) {
        let bit = 1u8 << (node % 8);
        if vcpu.revoked_logged & bit == 0 {
            vcpu.revoked_logged |= bit;
            warn!(
                "guest {} vCPU {}: {} at PC {:#x} to shared memory \"{id}\" (IPA {ipa:#x}) refused: the region was revoked when its owner, guest {owner}, stopped: external abort injected",
                vm.name,
                vcpu.index,
                if instruction { "instruction fetch" } else { "data access" },
                regs.pc()
            );
        }
    }
    vcpu.stats.aborts_injected += 1;
    hw.inject_external_abort(regs, instruction, esr);
    Outcome::Resume
}

fn undefined<H: VcpuHw>(
    vcpu: &mut Vcpu,
    regs: &mut H::Regs,
    hw: &mut H,
    what: core::fmt::Arguments<'_>,
) -> Outcome {
    vcpu.stats.undefs_injected += 1;
    if vcpu.logged < LOG_LIMIT {
        vcpu.logged += 1;
        warn!(
            "guest {} vCPU {}: {what} at PC {:#x}: undefined instruction injected",
            vcpu.vm.name,
            vcpu.index,
            regs.pc()
        );
    }
    hw.inject_undefined(regs);
    Outcome::Resume
}
