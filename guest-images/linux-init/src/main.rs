//! `/init` of the Linux guest's initramfs: proof that a Linux guest reached user space. It
//! reads `labyrinth,reset-count` from the device tree Labyrinth wrote for it (mounting sysfs
//! for `/sys/firmware/devicetree`), says what it found, and asks the kernel to power off, which
//! Linux turns into PSCI SYSTEM_OFF for Labyrinth to reclaim the guest. With `init_reset=1` on
//! the kernel command line (Linux hands unknown `name=value` parameters to init as its
//! environment) and a reset count of 0, it asks for a restart instead (PSCI SYSTEM_RESET), so
//! the test suite sees Labyrinth reset a guest with a virtual GIC and Linux boot again.
//!
//! Raw aarch64 Linux system calls only (`svc #0`, number in x8); no libc, no allocation. It must
//! never return: init exiting makes the kernel panic.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

const SYS_MOUNT: u64 = 40;
const SYS_OPENAT: u64 = 56;
const SYS_READ: u64 = 63;
const SYS_WRITE: u64 = 64;
const SYS_PPOLL: u64 = 73;
const SYS_REBOOT: u64 = 142;
const AT_FDCWD: u64 = -100i64 as u64;
const LINUX_REBOOT_MAGIC1: u64 = 0xfee1_dead;
const LINUX_REBOOT_MAGIC2: u64 = 0x2812_1969;
const LINUX_REBOOT_CMD_POWER_OFF: u64 = 0x4321_fedc;
const LINUX_REBOOT_CMD_RESTART: u64 = 0x0123_4567;

/// A system call with up to five arguments.
fn syscall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let ret: i64;
    // SAFETY: the kernel reads only the arguments we pass (NUL-terminated strings and buffers
    // we own) and clobbers nothing but x0.
    unsafe {
        asm!("svc #0", inlateout("x0") a0 as i64 => ret, in("x1") a1, in("x2") a2, in("x3") a3, in("x4") a4,
             in("x8") nr, options(nostack));
    }
    ret
}

fn print(bytes: &[u8]) {
    syscall(SYS_WRITE, 1, bytes.as_ptr() as u64, bytes.len() as u64, 0, 0);
}

/// `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `/chosen/labyrinth,reset-count` (a big-endian u32), if sysfs and the property are there.
fn reset_count() -> Option<u32> {
    syscall(
        SYS_MOUNT,
        b"sysfs\0".as_ptr() as u64,
        b"/sys\0".as_ptr() as u64,
        b"sysfs\0".as_ptr() as u64,
        0,
        0,
    );
    let path = b"/sys/firmware/devicetree/base/chosen/labyrinth,reset-count\0";
    let fd = syscall(SYS_OPENAT, AT_FDCWD, path.as_ptr() as u64, 0, 0, 0);
    if fd < 0 {
        return None;
    }
    let mut cell = [0u8; 4];
    (syscall(SYS_READ, fd as u64, cell.as_mut_ptr() as u64, 4, 0, 0) == 4).then(|| u32::from_be_bytes(cell))
}

/// Whether the environment Linux gave init holds exactly `wanted` (`name=value`).
///
/// # Safety
/// `envp` is the NULL-terminated array of NUL-terminated strings the kernel put on the stack.
unsafe fn has_env(mut envp: *const *const u8, wanted: &[u8]) -> bool {
    // SAFETY: per the contract, every pointer up to the NULL one is a valid C string.
    unsafe {
        while !(*envp).is_null() {
            let s = *envp;
            let mut n = 0;
            while *s.add(n) != 0 {
                n += 1;
            }
            if core::slice::from_raw_parts(s, n) == wanted {
                return true;
            }
            envp = envp.add(1);
        }
    }
    false
}

// The kernel enters with sp at argc, then argv[], NULL, envp[], NULL: hand sp to Rust.
global_asm!(".globl _start", "_start:", "mov x0, sp", "b init_main");

#[no_mangle]
extern "C" fn init_main(sp: *const u64) -> ! {
    // SAFETY: the initial stack layout of the Linux ELF ABI (see `_start`).
    let want_reset = unsafe {
        let argc = *sp as usize;
        has_env(sp.add(argc + 2) as *const *const u8, b"init_reset=1")
    };
    let count = reset_count();
    let mut buf = [0u8; 10];
    match count {
        Some(n) => {
            print(b"labyrinth-init: reset count ");
            print(decimal(n, &mut buf));
            print(b"\n");
        }
        None => print(b"labyrinth-init: no labyrinth,reset-count in the device tree\n"),
    }
    let cmd = if want_reset && count == Some(0) {
        print(b"labyrinth-init: asking for a reset\n");
        LINUX_REBOOT_CMD_RESTART
    } else {
        print(b"labyrinth-init: hello from user space, powering off\n");
        LINUX_REBOOT_CMD_POWER_OFF
    };
    let r = syscall(SYS_REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, cmd, 0, 0);
    // Only reached if the reboot call failed: say so, then wait (exiting would panic the kernel).
    print(if r < 0 {
        b"labyrinth-init: reboot failed\n"
    } else {
        b"labyrinth-init: still running after reboot\n"
    });
    loop {
        // ppoll on no descriptors with no timeout sleeps until a signal: an idle wait.
        syscall(SYS_PPOLL, 0, 0, 0, 0, 0);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
