//! Exit handling on the host: traps built from real syndromes, run through `vm::exit` over a
//! fake CPU that records what the handler asked of it.

use std::boxed::Box;

use super::exercise::{test_guest, Event, FakeCpu, Regs, KERNEL, RAM};
use super::exit::{self, handle_irq, handle_sync, Outcome};
use super::guest::{StopCause, Vm};
use super::layout::UART_BASE;
use super::trap::MmioAccess;
use super::vcpu::{host_irq, Vcpu};
use super::vgic::{self, GICD_BASE, GICR_BASE};
use super::vpsci::PowerState;
use super::vtimer;

/// A guest of `vcpus` vCPUs, with a virtual GIC or not, for the rest of the test run.
fn guest(vcpus: u32, gic: bool) -> &'static Vm {
    Box::leak(Box::new(test_guest(vcpus, gic)))
}

// Syndromes (ESR_EL2) of the traps the tests take.
const IL: u64 = 1 << 25;

/// A data abort with a valid syndrome at `ipa`: `size` bytes, register `reg`.
fn mmio(ipa: u64, size: u8, write: bool, reg: u8, sign: bool, sixty_four: bool) -> (u64, u64, u64) {
    let sas = u64::from(size.trailing_zeros());
    let esr = (0x24 << 26)
        | IL
        | (1 << 24)
        | (sas << 22)
        | (u64::from(sign) << 21)
        | (u64::from(reg) << 16)
        | (u64::from(sixty_four) << 15)
        | (u64::from(write) << 6)
        | 0x07;
    (esr, ipa, (ipa >> 12) << 4)
}

fn hvc() -> (u64, u64, u64) {
    ((0x16 << 26) | IL, 0, 0)
}

/// A trapped MSR (write) or MRS (read) of the system register `encoding` (trap.rs's layout).
fn sysreg(encoding: u32, read: bool, reg: u8) -> (u64, u64, u64) {
    ((0x18 << 26) | IL | u64::from(encoding) | (u64::from(reg) << 5) | u64::from(read), 0, 0)
}

fn run(vcpu: &mut Vcpu, regs: &mut Regs, cpu: &mut FakeCpu, (esr, far, hpfar): (u64, u64, u64)) -> Outcome {
    handle_sync(vcpu, regs, cpu, esr, far, hpfar)
}

#[test]
fn a_uart_flag_read_fills_the_register_and_moves_the_pc() {
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    regs.x[3] = 0xdead;
    let out = run(&mut v, &mut regs, &mut cpu, mmio(UART_BASE + 0x18, 4, false, 3, false, false));
    assert_eq!(out, Outcome::Resume);
    assert_eq!(regs.x[3], u64::from(vm.uart.lock().read(0x18, 4).unwrap()));
    assert_eq!(regs.pc, 4);
    assert!(cpu.events.is_empty(), "{:?}", cpu.events);
}

#[test]
fn a_misaligned_uart_access_is_an_abort_and_the_pc_stays() {
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    run(&mut v, &mut regs, &mut cpu, mmio(UART_BASE + 1, 4, false, 3, false, false));
    assert_eq!(cpu.events, [Event::Abort { instruction: false }]);
    assert_eq!((regs.pc, v.stats.aborts_injected), (0, 1));
}

#[test]
fn uart_output_goes_out_line_by_line_with_the_guests_name() {
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    for c in b"hi\n" {
        regs.x[0] = u64::from(*c);
        run(&mut v, &mut regs, &mut cpu, mmio(UART_BASE, 1, true, 0, false, false));
    }
    assert_eq!(cpu.console, ["[g] hi"]);
    assert_eq!(v.stats.mmio, 3);
}

#[test]
fn loads_extend_as_the_instruction_would() {
    let a =
        |size, sign_extend, sixty_four| MmioAccess { size, write: false, reg: 0, sign_extend, sixty_four };
    assert_eq!(exit::load_value(a(1, true, true), 0x80), 0xffff_ffff_ffff_ff80);
    assert_eq!(exit::load_value(a(1, true, false), 0x80), 0xffff_ff80);
    assert_eq!(exit::load_value(a(2, false, true), 0x1_8000), 0x8000);
    assert_eq!(exit::load_value(a(4, false, false), u64::MAX), 0xffff_ffff);
    assert_eq!(exit::load_value(a(8, true, true), u64::MAX), u64::MAX);
}

#[test]
fn the_distributor_answers_and_a_guest_without_a_gic_is_refused_it() {
    let (vm, mut cpu, mut regs) = (guest(1, true), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    run(&mut v, &mut regs, &mut cpu, mmio(GICD_BASE + 8, 4, false, 1, false, false));
    assert_eq!(regs.x[1], vm.vgic.as_ref().unwrap().read(vgic::Frame::Distributor, 8, 4).unwrap());
    assert_eq!(v.stats.vgic_mmio, 1);
    let bare = guest(1, false);
    let mut v = Vcpu::new(bare, 0, None);
    run(&mut v, &mut regs, &mut cpu, mmio(GICD_BASE + 8, 4, false, 1, false, false));
    assert!(cpu.saw(&Event::Abort { instruction: false }));
}

#[test]
fn ram_faults_go_to_the_fault_path_and_anything_else_is_refused() {
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    let fault = |ipa: u64| ((0x24 << 26) | IL | 0x07, ipa, (ipa >> 12) << 4);
    assert_eq!(run(&mut v, &mut regs, &mut cpu, fault(RAM + 0x1234)), Outcome::Fault { ipa: RAM + 0x1234 });
    assert!(cpu.events.is_empty());
    assert_eq!(run(&mut v, &mut regs, &mut cpu, fault(RAM + (64 << 20))), Outcome::Resume);
    assert_eq!(cpu.events, [Event::Abort { instruction: false }]);
}

// A touch of a shared region revoked from this guest (its owner stopped) is refused like any
// access outside RAM and devices (an external abort, the PC unchanged); the log line that says
// why is the first of each vCPU for that region only, and counts apart from the other refusals.
#[test]
fn a_revoked_region_is_refused_and_said_so_once() {
    let mut vm = test_guest(1, false);
    let ring = crate::dt::SharedMem {
        id: "ring",
        role: crate::dt::ShmRole::Borrower,
        guest_addr: 0x2000_0000,
        size: 0x20_0000,
        host_addr: None,
        node: "s",
    };
    vm.config.shared.push(ring).unwrap();
    let vm: &'static Vm = Box::leak(Box::new(vm));
    let (mut cpu, mut regs) = (FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    let fault = |ipa: u64| ((0x24 << 26) | IL | 0x07, ipa, (ipa >> 12) << 4);
    // Before the revocation (an address it has no mapping for yet): an ordinary refusal.
    assert_eq!(run(&mut v, &mut regs, &mut cpu, fault(0x2000_0010)), Outcome::Resume);
    assert_eq!((v.logged, v.revoked_logged), (1, 0));
    assert!(vm.shm_revoked.revoke(&vm.config.shared, 0x2000_0000, "owner"));
    for ipa in [0x2000_0010, 0x201f_fff8] {
        assert_eq!(run(&mut v, &mut regs, &mut cpu, fault(ipa)), Outcome::Resume);
    }
    assert_eq!(cpu.events.len(), 3);
    assert!(cpu.events.iter().all(|e| *e == Event::Abort { instruction: false }));
    assert_eq!((regs.pc, v.stats.aborts_injected, v.logged, v.revoked_logged), (0, 3, 1, 1));
    // Past the region: an ordinary refusal again.
    assert_eq!(run(&mut v, &mut regs, &mut cpu, fault(0x2020_0000)), Outcome::Resume);
    assert_eq!((v.logged, v.revoked_logged), (2, 1));
}

#[test]
fn an_unknown_system_register_is_undefined() {
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    // ACTLR_EL1 (op0 3, op1 0, CRn 1, CRm 0, op2 1), trapped by TACR.
    run(&mut v, &mut regs, &mut cpu, sysreg(vtimer::sysreg_encoding(3, 0, 1, 0, 1), true, 2));
    assert_eq!(cpu.events, [Event::Undefined]);
    assert_eq!(regs.pc, 0, "an injected exception does not skip the instruction itself");
}

#[test]
fn cpu_on_starts_a_vcpu_once_and_the_last_cpu_off_stops_the_guest() {
    let (vm, mut cpu, mut regs) = (guest(2, true), FakeCpu::default(), Regs::default());
    assert_eq!(vm.power.enter(0).map(|r| r.entry), Some(KERNEL), "vCPU 0 starts at the kernel");
    let mut v0 = Vcpu::new(vm, 0, None);
    regs.x[..4].copy_from_slice(&[0xc400_0003, 1, KERNEL, 7]);
    assert_eq!(run(&mut v0, &mut regs, &mut cpu, hvc()), Outcome::Resume);
    assert_eq!(regs.x[0], 0);
    assert!(cpu.saw(&Event::Wake), "the target's CPU is woken");
    assert_eq!(vm.power.state(1), Some(PowerState::OnPending));
    regs.x[..4].copy_from_slice(&[0xc400_0003, 1, KERNEL, 7]);
    run(&mut v0, &mut regs, &mut cpu, hvc());
    assert_eq!(regs.x[0] as i64, -5, "ON_PENDING");
    let start = vm.power.enter(1).unwrap();
    assert_eq!((start.entry, start.context), (KERNEL, 7));
    // vCPU 0 goes off: vCPU 1 runs on; then vCPU 1 goes off: the guest stops.
    regs.x[0] = 0x8400_0002;
    assert_eq!(run(&mut v0, &mut regs, &mut cpu, hvc()), Outcome::CpuOff);
    let mut v1 = Vcpu::new(vm, 1, None);
    regs.x[0] = 0x8400_0002;
    assert_eq!(run(&mut v1, &mut regs, &mut cpu, hvc()), Outcome::Stop(StopCause::CpuOff));
}

#[test]
fn system_off_and_reset_come_back_as_outcomes_from_hvc_and_smc() {
    let (vm, mut cpu, mut regs) = (guest(2, true), FakeCpu::default(), Regs::default());
    let mut v1 = Vcpu::new(vm, 1, None);
    regs.x[0] = 0x8400_0008;
    assert_eq!(run(&mut v1, &mut regs, &mut cpu, hvc()), Outcome::Stop(StopCause::SystemOff));
    regs.x[0] = 0x8400_0009;
    let smc = ((0x17 << 26) | IL, 0, 0);
    assert_eq!(run(&mut v1, &mut regs, &mut cpu, smc), Outcome::Reset);
    assert_eq!(regs.pc, 4, "a trapped SMC is skipped");
    assert_eq!((v1.stats.hvc, v1.stats.smc), (1, 1));
}

/// Enables the group-1 interrupts and SGI/PPI `intids` for `vcpu` through the guest's own
/// MMIO accesses.
fn enable(v: &mut Vcpu, cpu: &mut FakeCpu, intids: u32) {
    let mut regs = Regs::default();
    let sgi_frame = GICR_BASE + v.index as u64 * vgic::GICR_SIZE + 0x1_0000;
    for (at, value) in
        [(GICD_BASE, 0x12), (sgi_frame + 0x80, u64::MAX), (sgi_frame + 0x100, u64::from(intids))]
    {
        regs.x[1] = value;
        assert_eq!(run(v, &mut regs, cpu, mmio(at, 4, true, 1, false, false)), Outcome::Resume);
    }
}

#[test]
fn an_sgi_to_another_vcpu_kicks_its_cpu_and_reaches_only_its_list_registers() {
    let vm = guest(2, true);
    let (mut c0, mut c1, mut regs) = (FakeCpu::default(), FakeCpu::default(), Regs::default());
    let (mut v0, mut v1) = (Vcpu::new(vm, 0, None), Vcpu::new(vm, 1, None));
    enable(&mut v1, &mut c1, 1 << 3);
    c0.events.clear();
    // ICC_SGI1R_EL1: INTID 3 to TargetList {1}.
    regs.x[5] = (3 << 24) | 0b10;
    let icc_sgi1r = vtimer::sysreg_encoding(3, 0, 12, 11, 5);
    run(&mut v0, &mut regs, &mut c0, sysreg(icc_sgi1r, false, 5));
    assert_eq!(c0.events, [Event::Kick(vm.cpu_of(1))]);
    assert!(c0.lr_intids().is_empty());
    // vCPU 1 takes the kick: the SGI is in its list registers.
    c1.pending.push(host_irq::KICK);
    handle_irq(&mut v1, &mut c1);
    assert_eq!(c1.lr_intids(), [3]);
    assert_eq!((v0.stats.sgis, v1.stats.kicks), (1, 1));
}

#[test]
fn a_maintenance_interrupt_rewrites_the_list_registers_before_it_is_completed() {
    let vm = guest(1, true);
    let (mut cpu, mut v) = (FakeCpu::default(), Vcpu::new(vm, 0, None));
    cpu.pending.push(host_irq::MAINTENANCE);
    handle_irq(&mut v, &mut cpu);
    let eoi = cpu.events.iter().position(|e| *e == Event::Eoi(host_irq::MAINTENANCE)).unwrap();
    let write = cpu.events.iter().position(|e| matches!(e, Event::WriteLrs(_))).unwrap();
    assert!(write < eoi, "{:?}", cpu.events);
    assert_eq!(v.stats.maintenance, 1);
    let writes = cpu.events.iter().filter(|e| matches!(e, Event::WriteLrs(_))).count();
    assert_eq!(writes, 1, "one sync for a lone maintenance interrupt: {:?}", cpu.events);
}

/// The scenario: the guest masks the virtual timer's PPI, lets it fire, disables the
/// timer and unmasks the PPI: no interrupt.
#[test]
fn a_disabled_virtual_timer_is_no_longer_pending() {
    let vm = guest(1, true);
    let (mut cpu, mut v) = (FakeCpu::default(), Vcpu::new(vm, 0, None));
    cpu.now = 1000;
    cpu.vtimer = (vtimer::CTL_ENABLE, 500);
    cpu.pending.push(host_irq::VTIMER);
    handle_irq(&mut v, &mut cpu);
    assert!(cpu.saw(&Event::Ppi(host_irq::VTIMER, false)), "the line is held off at the host");
    assert!(v.vtimer_held && cpu.lr_intids().is_empty(), "masked in the guest's GIC: not delivered");
    assert!(vm.vgic.as_ref().unwrap().is_pending(0, vgic::VTIMER_INTID));
    cpu.vtimer = (0, 500);
    enable(&mut v, &mut cpu, 1 << vgic::VTIMER_INTID);
    assert!(cpu.lr_intids().is_empty(), "nothing delivered after unmasking");
    assert!(!vm.vgic.as_ref().unwrap().is_pending(0, vgic::VTIMER_INTID));
    assert!(cpu.saw(&Event::Ppi(host_irq::VTIMER, true)) && !v.vtimer_held, "the host line is back");
    // Enabled and firing: delivered.
    cpu.vtimer = (vtimer::CTL_ENABLE, 500);
    cpu.pending.push(host_irq::VTIMER);
    handle_irq(&mut v, &mut cpu);
    assert_eq!(cpu.lr_intids(), [vgic::VTIMER_INTID]);
}

#[test]
fn the_physical_timer_is_emulated_and_its_interrupt_follows_its_line() {
    let vm = guest(1, true);
    let (mut cpu, mut v, mut regs) = (FakeCpu::default(), Vcpu::new(vm, 0, None), Regs::default());
    enable(&mut v, &mut cpu, 1 << vgic::PTIMER_INTID);
    cpu.now = 10_000;
    regs.x[2] = 500;
    run(&mut v, &mut regs, &mut cpu, sysreg(vtimer::CNTP_TVAL_EL0, false, 2));
    regs.x[2] = vtimer::CTL_ENABLE;
    run(&mut v, &mut regs, &mut cpu, sysreg(vtimer::CNTP_CTL_EL0, false, 2));
    assert_eq!(cpu.events.last(), Some(&Event::WriteLrs(vec![0; 4])));
    assert!(cpu.saw(&Event::HypTimer(Some(10_500))), "the EL2 timer stands in at the deadline");
    cpu.now = 10_200;
    run(&mut v, &mut regs, &mut cpu, sysreg(vtimer::CNTP_TVAL_EL0, true, 7));
    assert_eq!(regs.x[7], 300, "TVAL counts down");
    assert_eq!((regs.pc, v.stats.undefs_injected), (12, 0));
    cpu.now = 10_600;
    cpu.pending.push(host_irq::HYP_TIMER);
    handle_irq(&mut v, &mut cpu);
    assert_eq!(cpu.lr_intids(), [vgic::PTIMER_INTID]);
    assert_eq!(
        cpu.events.iter().rev().find(|e| matches!(e, Event::HypTimer(_))),
        Some(&Event::HypTimer(None))
    );
}

#[test]
fn labyrinths_calls_answer_memory_figures_and_hand_give_backs_to_the_caller() {
    use super::hypercall;
    let (vm, mut cpu, mut regs) = (guest(1, false), FakeCpu::default(), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    assert!(vm.budget.take(5));
    regs.x[..3].copy_from_slice(&[u64::from(hypercall::MEMORY_INFO), 0, 0]);
    assert_eq!(run(&mut v, &mut regs, &mut cpu, hvc()), Outcome::Resume);
    assert_eq!(
        regs.x[..4],
        [0, 90, 5, 0],
        "promised 90 pages (100 less 10 for tables), 5 held, none unpromised"
    );
    regs.x[..3].copy_from_slice(&[u64::from(hypercall::GIVE_BACK), RAM + 0x2000, 0x3000]);
    assert_eq!(run(&mut v, &mut regs, &mut cpu, hvc()), Outcome::GiveBack { ipa: RAM + 0x2000, len: 0x3000 });
    regs.x[..3].copy_from_slice(&[u64::from(hypercall::GIVE_BACK), UART_BASE, 0x1000]);
    assert_eq!(run(&mut v, &mut regs, &mut cpu, hvc()), Outcome::Resume, "MMIO is not RAM");
    assert_eq!(regs.x[0] as i64, hypercall::INVALID_PARAMETER);
    regs.x[..3].copy_from_slice(&[0x8600_ff01, 0, 0]);
    run(&mut v, &mut regs, &mut cpu, hvc());
    assert_eq!(regs.x[..4], hypercall::UID.map(u64::from), "the UID query names Labyrinth");
    regs.x[0] = 0x8400_0000;
    run(&mut v, &mut regs, &mut cpu, hvc());
    assert_eq!(regs.x[0], 0x1_0000, "PSCI (1.0) still answers its own range");
    assert!(cpu.events.is_empty(), "nothing injected: {:?}", cpu.events);
}

#[test]
fn the_fast_path_leaves_labyrinths_calls_to_the_general_one() {
    let (vm, mut regs) = (guest(1, false), Regs::default());
    let mut v = Vcpu::new(vm, 0, None);
    regs.x[..3].copy_from_slice(&[u64::from(super::hypercall::GIVE_BACK), RAM, 0x1000]);
    assert!(!exit::psci_query(&mut v, &mut regs));
    assert_eq!(regs.x[0], u64::from(super::hypercall::GIVE_BACK), "untouched");
    regs.x[0] = 0xc400_0077;
    assert!(exit::psci_query(&mut v, &mut regs), "an unknown PSCI call is answered here");
    assert_eq!(regs.x[0] as i64, -1);
}
