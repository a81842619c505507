//! The console: the device tree's PL011, mapped as Device memory and installed as the logger's
//! sink. Before the device tree is trusted, a fallback at QEMU virt's PL011 address lets a
//! refusal be printed at all.

use core::sync::atomic::{AtomicU32, Ordering};
use labyrinth::drivers::pl011::{Pl011, Pl011Registers};
use labyrinth::logger::{Console, Logger};
use log::LevelFilter;

use spin::Once;

use super::cpu::cpu_index;
use super::mmu::{map_range, MapKind};

/// Where QEMU's virt machine has its first PL011: used only when the device tree is unusable.
pub const FALLBACK_UART: u64 = 0x0900_0000;

pub static LOGGER: Logger = Logger::new(cpu_index);

struct UartConsole(Pl011<'static>);

// SAFETY: the PL011's registers are MMIO reachable from every CPU; the logger's lock serialises
// every writer, and the block is never unmapped.
unsafe impl Sync for UartConsole {}
// SAFETY: as above; the reference is to device memory, not to any CPU's data.
unsafe impl Send for UartConsole {}

impl Console for UartConsole {
    fn write_str(&self, s: &str) {
        for b in s.bytes() {
            if b == b'\n' {
                self.0.write_byte(b'\r');
            }
            self.0.write_byte(b);
        }
    }
}

static UART: Once<UartConsole> = Once::new();

fn install(base: u64, level: LevelFilter) -> Result<(), labyrinth::hyp_map::MapError> {
    map_range(base, base + 0x1000, MapKind::Device)?;
    let console = UART.call_once(|| {
        // SAFETY: `base` is a PL011's register block (from the device tree, or QEMU virt's),
        // just mapped as Device memory, and lives for the rest of the run.
        let regs = unsafe { &*(base as *const Pl011Registers) };
        let uart = Pl011::new(regs);
        uart.enable();
        UartConsole(uart)
    });
    LOGGER.set_sink(console);
    // A second call finds the logger already set, which is fine: the sink is what changes.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    Ok(())
}

/// Installs the device tree's UART as the console.
pub fn init_console(base: u64, level: LevelFilter) -> Result<(), labyrinth::hyp_map::MapError> {
    install(base, level)
}

/// Installs QEMU virt's UART so that a refused device tree can still be reported.
pub fn install_fallback_console() {
    let _ = install(FALLBACK_UART, LevelFilter::Info);
}

/// The console receiver's interrupt (0: input off).
static INPUT_INTID: AtomicU32 = AtomicU32::new(0);

/// Turns the console's receiver and its interrupt `intid` on (routed by the caller).
pub fn enable_input(intid: u32) -> bool {
    let Some(c) = UART.get() else { return false };
    c.0.enable_receive();
    INPUT_INTID.store(intid, Ordering::Release);
    true
}

/// The console receiver's interrupt, once input is on.
pub fn input_intid() -> Option<u32> {
    Some(INPUT_INTID.load(Ordering::Acquire)).filter(|&i| i != 0)
}

/// A byte the console's user typed, if one waits.
pub fn read_input() -> Option<u8> {
    UART.get()?.0.read_byte()
}

/// A line printed as it is (a guest's console output).
pub fn raw_line(args: core::fmt::Arguments<'_>) {
    LOGGER.raw_line(args);
}

/// A line on the panic/exception path (see `Logger::emergency`).
pub fn emergency_line(args: core::fmt::Arguments<'_>) {
    LOGGER.emergency(args);
}
