#!/usr/bin/env python3
"""Packs the Linux guest's initramfs: a newc ("070701") cpio archive, the format Linux's
initramfs unpacker reads, holding /dev, /dev/console (char 5:1, so the kernel can open a console
for init even without its built-in initramfs), /sys (where init mounts sysfs to read its
device tree) and /init (our static init); with a busybox binary also /proc, /bin/busybox and
the links of the applets the interactive shell offers (/bin/sh among them).

Written here rather than with cpio(1) so that no root is needed for the device node and the
archive is byte-for-byte reproducible (fixed mtimes, uid/gid 0).

Usage: scripts/mkinitramfs.py INIT_ELF OUT.cpio [BUSYBOX_ELF]
"""
import sys


def entry(name, mode, data=b"", rdev=(0, 0), ino=1):
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
    out = hdr + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


APPLETS = ["sh", "ls", "cat", "echo", "uname", "mount", "poweroff", "reboot", "ps", "free", "dmesg",
           "grep", "head", "sleep", "true", "false", "hexdump", "nproc"]


def pack(init_bytes, busybox=None):
    parts = [
        entry("dev", 0o040755, ino=1),
        entry("dev/console", 0o020600, rdev=(5, 1), ino=2),
        entry("sys", 0o040755, ino=3),
        entry("init", 0o100755, init_bytes, ino=4),
    ]
    if busybox is not None:
        parts += [entry("proc", 0o040755, ino=5), entry("bin", 0o040755, ino=6),
                  entry("bin/busybox", 0o100755, busybox, ino=7)]
        parts += [entry("bin/" + a, 0o120777, b"busybox", ino=8 + i) for i, a in enumerate(APPLETS)]
    parts.append(entry("TRAILER!!!", 0, ino=0))
    blob = b"".join(parts)
    return blob + b"\0" * (-len(blob) % 512)


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    with open(sys.argv[1], "rb") as f:
        init = f.read()
    if init[:4] != b"\x7fELF":
        sys.exit("mkinitramfs: %s is not an ELF" % sys.argv[1])
    busybox = None
    if len(sys.argv) == 4:
        with open(sys.argv[3], "rb") as f:
            busybox = f.read()
    with open(sys.argv[2], "wb") as f:
        f.write(pack(init, busybox))


if __name__ == "__main__":
    main()
