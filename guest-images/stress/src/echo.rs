//! `stress.echo`: the console's input, through the emulated PL011's receive interrupt. The
//! kernel unmasks the UART's receive and receive-timeout interrupts, enables its SPI in the
//! virtual GIC and sleeps in WFI; the handler drains the FIFO. Each line typed is printed back
//! as `stress: echo: <line>`; the line `off` powers the guest off.
//!
//! With `stress.echo-cpu=1` (a guest of two vCPUs) vCPU 1 echoes, the UART's SPI routed to it,
//! and vCPU 0 powers itself off (CPU_OFF) once vCPU 1 is ready: the console's input must still
//! arrive although the CPU it was routed to has no vCPU in the guest.

use core::ptr::{read_volatile, write_volatile};

use guest_rt::dt::BootInfo;
use guest_rt::{console, gic, println, psci, smp, Global};

const DR: u64 = 0x00;
const FR: u64 = 0x18;
const IMSC: u64 = 0x38;
const MIS: u64 = 0x40;
const FR_RXFE: u32 = 1 << 4;
const INT_RX_RT: u32 = (1 << 4) | (1 << 6);
/// The PL011's SPI in the guest's tree.
const UART_INTID: u32 = 33;
const LINE: usize = 80;

static BUF: Global<[u8; LINE]> = Global::new([0; LINE]);
static LEN: Global<usize> = Global::new(0);
static OFF: Global<bool> = Global::new(false);
static INTERRUPTS: Global<u64> = Global::new(0);

fn reg(offset: u64) -> *mut u32 {
    (console::UART_BASE as u64 + offset) as *mut u32
}

fn on_irq(intid: u32) {
    if intid != UART_INTID {
        return;
    }
    INTERRUPTS.set(INTERRUPTS.get() + 1);
    // SAFETY: the PL011's registers, aligned 32-bit accesses.
    while unsafe { read_volatile(reg(FR)) } & FR_RXFE == 0 {
        // SAFETY: as above.
        let b = unsafe { read_volatile(reg(DR)) } as u8;
        let (mut buf, mut len) = (BUF.get(), LEN.get());
        if b == b'\r' || b == b'\n' {
            let text = core::str::from_utf8(&buf[..len]).unwrap_or("<not UTF-8>");
            println!("stress: echo: {}", text);
            if text == "off" {
                OFF.set(true);
            }
            len = 0;
        } else if len < LINE {
            buf[len] = b;
            len += 1;
        }
        BUF.set(buf);
        LEN.set(len);
    }
}

pub fn run(boot: &BootInfo, on_cpu1: bool) -> ! {
    let Some(g) = boot.gic.as_ref() else {
        println!("stress: echo needs a GIC");
        psci::system_off();
    };
    gic::init(g);
    if let Err(e) = gic::init_distributor() {
        println!("stress: echo: GIC setup failed: {}", e);
        psci::system_off();
    }
    gic::set_handler(on_irq);
    if !on_cpu1 {
        echo_here(0);
    }
    smp::init(boot);
    if smp::cpu_count() < 2 {
        println!("stress: echo: FAILED: stress.echo-cpu=1 needs two vCPUs");
        psci::system_off();
    }
    if let Err((cpu, r)) = smp::start_secondaries(echo_here, smp::seconds(10)) {
        println!("stress: echo: FAILED: cpu {} not started ({})", cpu, r);
        psci::system_off();
    }
    if !smp::wait_until(smp::seconds(10), || READY.get()) {
        println!("stress: echo: FAILED: cpu 1 never got ready");
        psci::system_off();
    }
    println!("stress: echo: cpu 0 powers off");
    psci::cpu_off()
}

static READY: Global<bool> = Global::new(false);

/// The echo loop on CPU `cpu`, the UART's SPI routed to it.
fn echo_here(cpu: usize) -> ! {
    if let Err(e) = gic::init_cpu() {
        println!("stress: echo: GIC setup failed on cpu {}: {}", cpu, e);
        psci::system_off();
    }
    if cpu != 0 {
        gic::route_spi(UART_INTID, smp::mpidr(cpu).unwrap_or(0));
    }
    gic::enable_spi(UART_INTID);
    // SAFETY: the PL011's interrupt mask, an aligned 32-bit register.
    unsafe { write_volatile(reg(IMSC), INT_RX_RT) };
    if cpu == 0 {
        println!("stress: echo: ready");
    } else {
        println!("stress: echo: ready on cpu {}", cpu);
    }
    READY.set(true);
    smp::dsb();
    smp::sev();
    while !OFF.get() {
        // SAFETY: waiting for an interrupt; IRQs are unmasked around it (handled by on_irq).
        unsafe { core::arch::asm!("wfi", options(nostack)) };
        gic::take_pending_irqs();
    }
    // SAFETY: as above.
    let pending = unsafe { read_volatile(reg(MIS)) };
    println!("stress: echo: done after {} interrupts (MIS {:#x})", INTERRUPTS.get(), pending);
    println!("stress: done");
    psci::system_off()
}
