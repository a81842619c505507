//! The PL011 at 0x0900_0000, transmit only. Every access is one aligned 32-bit `ldr`/`str`
//! without writeback (the hypervisor emulates it from the trap syndrome): FR (0x18) is polled
//! for TXFF (bit 5), a bounded number of times, before each byte goes to DR (0x00).
//!
//! Several CPUs print whole lines: each [`print!`]/[`println!`] call holds a lock for its
//! bytes. Without atomics (MMU off) the lock is Lamport's bakery: a CPU takes a ticket one
//! above every ticket it sees, and enters when no CPU holds a smaller (ticket, index); each
//! CPU writes only its own `CHOOSING`/`TICKET` words, and a `DMB` orders every step. A CPU
//! that prints from its exception handler while it holds the lock (a nested print) goes on
//! without waiting for itself.

use core::arch::asm;
use core::fmt;

use crate::dt::MAX_CPUS;
use crate::global::PerCpu;
use crate::smp::{dmb, dsb, this_cpu};

pub const UART_BASE: usize = 0x0900_0000;
const DR: usize = 0x00;
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;
/// FR polls per byte before writing anyway: a stuck TXFF must not hang the guest.
const TX_SPINS: u32 = 100_000;

/// One aligned 32-bit load (`ldr wN, [xM]`).
///
/// # Safety
/// `addr` must be 4-byte aligned and safe to read (or the read must be expected to abort).
#[inline(always)]
pub unsafe fn read32(addr: usize) -> u32 {
    let v: u32;
    asm!("ldr {v:w}, [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags));
    v
}

/// One aligned 32-bit store (`str wN, [xM]`).
///
/// # Safety
/// As [`read32`], for writing.
#[inline(always)]
pub unsafe fn write32(addr: usize, v: u32) {
    asm!("str {v:w}, [{a}]", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags));
}

pub fn put_byte(b: u8) {
    // SAFETY: the PL011's registers, aligned 32-bit accesses.
    unsafe {
        for _ in 0..TX_SPINS {
            if read32(UART_BASE + FR) & FR_TXFF == 0 {
                break;
            }
        }
        write32(UART_BASE + DR, b as u32);
    }
}

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

static CHOOSING: PerCpu<u64> = PerCpu::new(0);
static TICKET: PerCpu<u64> = PerCpu::new(0);
/// Nesting depth of this CPU's prints (a print from the exception handler inside a print).
static DEPTH: PerCpu<u64> = PerCpu::new(0);

fn lock(me: usize) {
    let depth = DEPTH.get(me);
    DEPTH.set(me, depth + 1);
    if depth > 0 {
        return;
    }
    CHOOSING.set(me, 1);
    dmb();
    let ticket = 1 + (0..MAX_CPUS).map(|j| TICKET.get(j)).max().unwrap_or(0);
    TICKET.set(me, ticket);
    dmb();
    CHOOSING.set(me, 0);
    dmb();
    for j in (0..MAX_CPUS).filter(|&j| j != me) {
        while CHOOSING.get(j) != 0 {}
        dmb();
        loop {
            let t = TICKET.get(j);
            if t == 0 || (t, j) > (ticket, me) {
                break;
            }
        }
    }
    dmb();
}

fn unlock(me: usize) {
    let depth = DEPTH.get(me) - 1;
    DEPTH.set(me, depth);
    if depth == 0 {
        dsb();
        TICKET.set(me, 0);
        dsb();
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let me = this_cpu();
    lock(me);
    let _ = fmt::write(&mut Console, args);
    unlock(me);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
