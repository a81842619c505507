//! `/init` of the Linux guest's initramfs: proof that a Linux guest reached user space. It
//! reads `labyrinth,reset-count` from the device tree Labyrinth wrote for it (mounting sysfs
//! for `/sys/firmware/devicetree`), says what it found, reports the CPUs Linux brought up
//! (`/sys/devices/system/cpu/online`) and runs a small computation pinned to each of them in
//! turn (`sched_setaffinity`, then `getcpu` says where it ran), and asks the kernel to power off, which
//! Linux turns into PSCI SYSTEM_OFF for Labyrinth to reclaim the guest. With `init_reset=1` on
//! the kernel command line (Linux hands unknown `name=value` parameters to init as its
//! environment) and a reset count of 0, it asks for a restart instead (PSCI SYSTEM_RESET), so
//! the test suite sees Labyrinth reset a guest with a virtual GIC and Linux boot again.
//!
//! It also lists the static shared memory regions its device tree describes the way Xen does
//! (`/reserved-memory/xen-shmem@ADDR`, `compatible = "xen,shared-memory-v1"`): id, address,
//! size, one line each, as a guest driver would find them.
//!
//! With `init_shell=1` it starts an interactive shell instead of powering off: busybox's `sh`
//! from the initramfs (`/bin/sh`), on the console, with /proc mounted; `poweroff -f` in the
//! shell ends the guest.
//!
//! Raw aarch64 Linux system calls only (`svc #0`, number in x8); no libc, no allocation. It must
//! never return: init exiting makes the kernel panic.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

const SYS_MOUNT: u64 = 40;
const SYS_CLOSE: u64 = 57;
const SYS_SCHED_SETAFFINITY: u64 = 122;
const SYS_GETCPU: u64 = 168;
const SYS_OPENAT: u64 = 56;
const SYS_READ: u64 = 63;
const SYS_WRITE: u64 = 64;
const SYS_PPOLL: u64 = 73;
const SYS_GETDENTS64: u64 = 61;
const SYS_REBOOT: u64 = 142;
const SYS_EXECVE: u64 = 221;
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

/// `n` in hexadecimal (16 digits) into `buf`.
fn hex(n: u64, buf: &mut [u8; 16]) -> &[u8] {
    for (i, b) in buf.iter_mut().enumerate() {
        let d = (n >> (60 - 4 * i)) & 0xf;
        *b = if d < 10 { b'0' + d as u8 } else { b'a' + d as u8 - 10 };
    }
    buf
}

fn mount_sysfs() {
    syscall(
        SYS_MOUNT,
        b"sysfs\0".as_ptr() as u64,
        b"/sys\0".as_ptr() as u64,
        b"sysfs\0".as_ptr() as u64,
        0,
        0,
    );
}

/// Reads the NUL-terminated `path` into `buf`: the bytes read.
fn read_file<'a>(path: &[u8], buf: &'a mut [u8]) -> Option<&'a [u8]> {
    let fd = syscall(SYS_OPENAT, AT_FDCWD, path.as_ptr() as u64, 0, 0, 0);
    if fd < 0 {
        return None;
    }
    let n = syscall(SYS_READ, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64, 0, 0);
    syscall(SYS_CLOSE, fd as u64, 0, 0, 0, 0);
    (n >= 0).then(|| &buf[..n as usize])
}

/// The CPUs of a Linux CPU list (`0-1,3`), as a bit set (CPUs 0-63).
fn parse_cpu_list(list: &[u8]) -> u64 {
    let mut set = 0u64;
    for part in list.split(|&b| b == b',') {
        let num = |s: &[u8]| -> Option<u32> {
            let s = s.trim_ascii();
            if s.is_empty() {
                return None;
            }
            s.iter().try_fold(0u32, |acc, &b| b.is_ascii_digit().then(|| acc * 10 + (b - b'0') as u32))
        };
        let mut ends = part.splitn(2, |&b| b == b'-');
        let lo = ends.next().and_then(num);
        let hi = ends.next().and_then(num).or(lo);
        if let (Some(lo), Some(hi)) = (lo, hi) {
            for c in lo..=hi.min(63) {
                set |= 1 << c;
            }
        }
    }
    set
}

/// Reports the online CPUs, then pins itself to each in turn and does some work there.
fn work_on_each_cpu() {
    let mut buf = [0u8; 64];
    let Some(list) = read_file(b"/sys/devices/system/cpu/online\0", &mut buf) else {
        print(b"labyrinth-init: cannot read /sys/devices/system/cpu/online\n");
        return;
    };
    print(b"labyrinth-init: cpus online: ");
    print(list.trim_ascii());
    print(b"\n");
    let set = parse_cpu_list(list);
    let mut dec = [0u8; 10];
    let mut hx = [0u8; 16];
    for cpu in (0..64).filter(|c| set & (1 << c) != 0) {
        let mask: u64 = 1 << cpu;
        let r = syscall(SYS_SCHED_SETAFFINITY, 0, 8, &mask as *const u64 as u64, 0, 0);
        // The same computation everywhere: its result is the same on every CPU.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut sum: u64 = 0;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sum = sum.wrapping_add(x);
        }
        let sum = core::hint::black_box(sum);
        let mut on: u32 = u32::MAX;
        syscall(SYS_GETCPU, &mut on as *mut u32 as u64, 0, 0, 0, 0);
        print(b"labyrinth-init: cpu ");
        print(decimal(cpu, &mut dec));
        print(b": getcpu ");
        print(decimal(on, &mut dec));
        print(b", work 0x");
        print(hex(sum, &mut hx));
        print(if r == 0 && on == cpu { b" (ok)\n" } else { b" FAILED\n" });
    }
}

/// Prints each `xen,shared-memory-v1` child of `/reserved-memory`: its `xen,id`, `reg` (two
/// cells of address, two of size, as Labyrinth writes them) and `xen,offset`.
fn shared_memory() {
    const DIR: &[u8] = b"/sys/firmware/devicetree/base/reserved-memory/";
    let mut path = [0u8; 160];
    path[..DIR.len()].copy_from_slice(DIR);
    let fd = syscall(SYS_OPENAT, AT_FDCWD, path.as_ptr() as u64, 0, 0, 0);
    if fd < 0 {
        print(b"labyrinth-init: no /reserved-memory in the device tree\n");
        return;
    }
    let mut dents = [0u8; 2048];
    let n = syscall(SYS_GETDENTS64, fd as u64, dents.as_mut_ptr() as u64, dents.len() as u64, 0, 0);
    syscall(SYS_CLOSE, fd as u64, 0, 0, 0, 0);
    let mut at = 0usize;
    let mut found = 0;
    // linux_dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name (NUL-terminated).
    while n > 0 && at + 19 < n as usize {
        let reclen = u16::from_ne_bytes([dents[at + 16], dents[at + 17]]) as usize;
        let name = &dents[at + 19..(at + reclen).min(n as usize)];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        at += reclen.max(1);
        if !name.starts_with(b"xen-shmem@") || DIR.len() + name.len() + 16 > path.len() {
            continue;
        }
        let file = |prop: &[u8], buf: &mut [u8; 64]| -> usize {
            let mut p = [0u8; 160];
            let mut len = DIR.len();
            p[..len].copy_from_slice(DIR);
            p[len..len + name.len()].copy_from_slice(name);
            len += name.len();
            p[len] = b'/';
            p[len + 1..len + 1 + prop.len()].copy_from_slice(prop);
            read_file(&p, buf).map_or(0, |b| b.len())
        };
        let (mut compat, mut id, mut reg, mut off) = ([0u8; 64], [0u8; 64], [0u8; 64], [0u8; 64]);
        let compat_len = file(b"compatible\0", &mut compat);
        if &compat[..compat_len] != b"xen,shared-memory-v1\0" {
            continue;
        }
        let id_len = file(b"xen,id\0", &mut id);
        let id = &id[..id_len.saturating_sub(1)];
        let be = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let (addr, size) =
            if file(b"reg\0", &mut reg) == 16 { (be(&reg[..8]), be(&reg[8..])) } else { (0, 0) };
        let offset = if file(b"xen,offset\0", &mut off) == 8 { be(&off[..8]) } else { u64::MAX };
        let mut h = [0u8; 16];
        print(b"labyrinth-init: shared memory \"");
        print(id);
        print(b"\" at 0x");
        print(hex(addr, &mut h));
        print(b" size 0x");
        print(hex(size, &mut h));
        print(b" offset 0x");
        print(hex(offset, &mut h));
        print(b" (xen,shared-memory-v1)\n");
        found += 1;
    }
    if found == 0 {
        print(b"labyrinth-init: no xen,shared-memory-v1 region in /reserved-memory\n");
    }
}

/// `/chosen/labyrinth,reset-count` (a big-endian u32), if sysfs and the property are there.
fn reset_count() -> Option<u32> {
    let path = b"/sys/firmware/devicetree/base/chosen/labyrinth,reset-count\0";
    let fd = syscall(SYS_OPENAT, AT_FDCWD, path.as_ptr() as u64, 0, 0, 0);
    if fd < 0 {
        return None;
    }
    let mut cell = [0u8; 4];
    (syscall(SYS_READ, fd as u64, cell.as_mut_ptr() as u64, 4, 0, 0) == 4).then(|| u32::from_be_bytes(cell))
}

/// Replaces init with busybox's shell on the console (returns only if that fails).
fn shell() {
    let proc_ = b"proc\0";
    syscall(SYS_MOUNT, proc_.as_ptr() as u64, b"/proc\0".as_ptr() as u64, proc_.as_ptr() as u64, 0, 0);
    print(b"labyrinth-init: starting a shell (busybox sh); poweroff -f ends the guest\n");
    let path = b"/bin/sh\0";
    let argv: [*const u8; 2] = [b"sh\0".as_ptr(), core::ptr::null()];
    let envp: [*const u8; 4] = [
        b"PATH=/bin\0".as_ptr(),
        b"HOME=/\0".as_ptr(),
        b"PS1=labyrinth-linux# \0".as_ptr(),
        core::ptr::null(),
    ];
    let r = syscall(SYS_EXECVE, path.as_ptr() as u64, argv.as_ptr() as u64, envp.as_ptr() as u64, 0, 0);
    let mut buf = [0u8; 10];
    print(b"labyrinth-init: no shell (execve error ");
    print(decimal((-r) as u32, &mut buf));
    print(b"): is busybox in the initramfs? powering off\n");
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
    let (want_reset, want_shell) = unsafe {
        let argc = *sp as usize;
        let envp = sp.add(argc + 2) as *const *const u8;
        (has_env(envp, b"init_reset=1"), has_env(envp, b"init_shell=1"))
    };
    mount_sysfs();
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
    shared_memory();
    work_on_each_cpu();
    if want_shell {
        shell();
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
