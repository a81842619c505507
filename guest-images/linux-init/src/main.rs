//! `/init` of the Linux guest's initramfs: proof that a Linux guest reached user space. It
//! writes one line to its standard output (the console Linux opened for it) and asks the kernel
//! to power off, which Linux turns into PSCI SYSTEM_OFF for Labyrinth to reclaim the guest.
//!
//! Raw aarch64 Linux system calls only (`svc #0`, number in x8); no libc, no allocation. It must
//! never return: init exiting makes the kernel panic.
#![no_std]
#![no_main]

use core::arch::asm;

const SYS_WRITE: u64 = 64;
const SYS_REBOOT: u64 = 142;
const SYS_PPOLL: u64 = 73;
const LINUX_REBOOT_MAGIC1: u64 = 0xfee1_dead;
const LINUX_REBOOT_MAGIC2: u64 = 0x2812_1969;
const LINUX_REBOOT_CMD_POWER_OFF: u64 = 0x4321_fedc;

const LINE: &[u8] = b"labyrinth-init: hello from user space, powering off\n";

/// A system call with up to four arguments.
fn syscall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: i64;
    // SAFETY: the kernel reads only the arguments we pass (a buffer we own, for write) and
    // clobbers nothing but x0.
    unsafe {
        asm!("svc #0", inlateout("x0") a0 as i64 => ret, in("x1") a1, in("x2") a2, in("x3") a3, in("x8") nr,
             options(nostack));
    }
    ret
}

#[no_mangle]
extern "C" fn _start() -> ! {
    syscall(SYS_WRITE, 1, LINE.as_ptr() as u64, LINE.len() as u64, 0);
    let r = syscall(SYS_REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0);
    // Only reached if the power-off failed: say so, then wait (exiting would panic the kernel).
    let msg: &[u8] = if r < 0 { b"labyrinth-init: reboot(POWER_OFF) failed\n" } else { b"labyrinth-init: still running after power-off\n" };
    syscall(SYS_WRITE, 1, msg.as_ptr() as u64, msg.len() as u64, 0);
    loop {
        // ppoll on no descriptors with no timeout sleeps until a signal: an idle wait.
        syscall(SYS_PPOLL, 0, 0, 0, 0);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
