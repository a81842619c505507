#!/usr/bin/env python3
"""Describe guests for Labyrinth the way a bootloader would: a host device tree (QEMU's own,
from -machine dumpdtb, edited with dtc) with one /chosen node per guest, and QEMU -device loader
arguments that put each guest's kernel (and ramdisk) image at the host address the node names.

The binding (docs/configuration.md):
    chosen {
        NAME {
            compatible = "labyrinth,guest";
            #address-cells = <2>; #size-cells = <2>;
            memory = <0x0 KIB>;  cpus = <N>;
            [labyrinth,no-block-mappings;]
            [labyrinth,no-virtual-gic;]      (a bare guest: no GIC, no timer interrupt)
            [shm@ADDR { compatible = "xen,domain-shared-memory-v1"; xen,shm-id = "ID";
                        [role = "owner";] xen,shared-mem = <0x0 ADDR 0x0 SIZE>; };]
            module@ADDR { compatible = "multiboot,kernel", "multiboot,module";
                          reg = <0x0 ADDR 0x0 SIZE>; bootargs = "..."; };
        };
    };

Usage as a program:
    scripts/guestcfg.py OUT.dtb [--mem 1G] [--smp 2] [--cpu cortex-a72]
        --guest NAME=IMAGE,ADDR,MEMORY_KIB[,cpus=N][,noblocks][,novgic][,xen][,initrd=FILE@ADDR]
                [,shm=ID@GUEST_ADDR+SIZE[:owner][:host=HOST_ADDR]]...[,args=...] ...
(`xen`: compatible = "xen,domain", the dom0less spelling, instead of "labyrinth,guest";
`shm`: a static shared memory node, Xen's binding; `:owner` gives role = "owner", `:host=`
writes Xen's older form, host address first).
prints the QEMU arguments to add (-dtb and -device loader ...).
"""
import argparse
import os
import subprocess
import tempfile


def qemu_base(cpu="cortex-a72", smp=2, mem="1G"):
    return ["qemu-system-aarch64", "-M", "virt,virtualization=on,gic-version=3", "-cpu", cpu,
            "-smp", str(smp), "-m", mem, "-nographic", "-net", "none"]


def host_dts(cpu="cortex-a72", smp=2, mem="1G"):
    """QEMU's own device tree for this machine, as dts text."""
    with tempfile.TemporaryDirectory() as wd:
        raw = os.path.join(wd, "raw.dtb")
        subprocess.run(qemu_base(cpu, smp, mem) + ["-machine", "dumpdtb=" + raw], check=True,
                       capture_output=True, timeout=60)
        return subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", raw], check=True,
                              capture_output=True, text=True).stdout


# Xen's dom0less binding for a domU; Labyrinth accepts it as a guest node (no vendor property).
XEN_DOMAIN = "xen,domain"


def shm_node(name, shm_id, guest_addr, size, role=None, host_addr=None):
    """A static shared memory node for a guest node's `extra` (Xen's dom0less binding, with the
    guest node's 2 address and 2 size cells): `role` "owner", "borrower" or None (Xen's default,
    a borrower); `host_addr` writes Xen's older form with a host address first."""
    mem = [guest_addr, size] if host_addr is None else [host_addr, guest_addr, size]
    cells = " ".join("0x%x 0x%x" % (v >> 32, v & 0xffffffff) for v in mem)
    role_line = "\t\t\t\trole = \"%s\";\n" % role if role else ""
    return (
        "\t\t\t%s {\n"
        "\t\t\t\tcompatible = \"xen,domain-shared-memory-v1\";\n"
        "\t\t\t\txen,shm-id = \"%s\";\n"
        "%s"
        "\t\t\t\txen,shared-mem = <%s>;\n"
        "\t\t\t};\n"
    ) % (name, shm_id, role_line, cells)


class Guest:
    def __init__(self, name, image, addr, memory_kib, no_blocks=False, bootargs="", cpus=1,
                 compatible="labyrinth,guest", extra="", ramdisk=None, ramdisk_addr=None, vgic=False,
                 no_vgic=False):
        self.name, self.image, self.addr = name, image, addr
        # An optional initramfs, placed by the loader at ramdisk_addr.
        self.ramdisk, self.ramdisk_addr = ramdisk, ramdisk_addr
        # Every guest gets a virtual GICv3 and the timer's interrupts; no_vgic writes the
        # opt-out (labyrinth,no-virtual-gic) for bare test kernels that must see no GIC, and
        # vgic writes the old, now default, labyrinth,virtual-gic.
        self.vgic, self.no_vgic = vgic, no_vgic
        self.memory_kib, self.no_blocks, self.bootargs = memory_kib, no_blocks, bootargs
        self.cpus, self.compatible, self.extra = cpus, compatible, extra

    def size(self):
        return os.path.getsize(self.image) if self.image else 0x1000

    def node(self):
        flags = "\t\t\tlabyrinth,no-block-mappings;\n" if self.no_blocks else ""
        if self.vgic:
            flags += "\t\t\tlabyrinth,virtual-gic;\n"
        if self.no_vgic:
            flags += "\t\t\tlabyrinth,no-virtual-gic;\n"
        kernel = ""
        if self.image is not None:
            kernel = (
                "\t\t\tmodule@%x {\n"
                "\t\t\t\tcompatible = \"multiboot,kernel\", \"multiboot,module\";\n"
                "\t\t\t\treg = <0x%x 0x%x 0x%x 0x%x>;\n"
                "\t\t\t\tbootargs = \"%s\";\n"
                "\t\t\t};\n"
            ) % (self.addr, self.addr >> 32, self.addr & 0xffffffff, self.size() >> 32,
                 self.size() & 0xffffffff, self.bootargs)
        if self.ramdisk is not None:
            size = os.path.getsize(self.ramdisk)
            kernel += (
                "\t\t\tmodule@%x {\n"
                "\t\t\t\tcompatible = \"multiboot,ramdisk\", \"multiboot,module\";\n"
                "\t\t\t\treg = <0x%x 0x%x 0x%x 0x%x>;\n"
                "\t\t\t};\n"
            ) % (self.ramdisk_addr, self.ramdisk_addr >> 32, self.ramdisk_addr & 0xffffffff,
                 size >> 32, size & 0xffffffff)
        return (
            "\t\t%s {\n"
            "\t\t\tcompatible = \"%s\";\n"
            "\t\t\t#address-cells = <2>;\n"
            "\t\t\t#size-cells = <2>;\n"
            "\t\t\tmemory = <0x%x 0x%x>;\n"
            "\t\t\tcpus = <%d>;\n"
            "%s%s%s"
            "\t\t};\n"
        ) % (self.name, self.compatible, self.memory_kib >> 32, self.memory_kib & 0xffffffff,
             self.cpus, flags, self.extra, kernel)

    def loader_args(self):
        if self.image is None:
            return []
        args = ["-device", "loader,file=%s,addr=0x%x,force-raw=on" % (self.image, self.addr)]
        if self.ramdisk is not None:
            args += ["-device", "loader,file=%s,addr=0x%x,force-raw=on" % (self.ramdisk, self.ramdisk_addr)]
        return args


def add_guests(dts, guests):
    """Inserts the guest nodes into the dts's /chosen node."""
    nodes = "".join(g.node() for g in guests)
    start = dts.find("\tchosen {\n")
    if start < 0:
        raise ValueError("no /chosen node in the host device tree")
    # Subnodes go after /chosen's properties, just before its closing brace.
    end = dts.index("\n\t};", start) + 1
    return dts[:end] + nodes + dts[end:]


def make_dtb(out, guests, cpu="cortex-a72", smp=2, mem="1G", edit=None):
    """Writes the host DTB with `guests` to `out`; returns the QEMU arguments to add."""
    dts = add_guests(host_dts(cpu, smp, mem), guests)
    if edit:
        dts = edit(dts)
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", out, "-"], input=dts, text=True,
                   check=True, capture_output=True)
    args = ["-dtb", out]
    for g in guests:
        args += g.loader_args()
    return args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--cpu", default="cortex-a72")
    ap.add_argument("--guest", action="append", default=[],
                    help="NAME=IMAGE,ADDR,MEMORY_KIB[,cpus=N][,noblocks][,novgic][,xen][,initrd=FILE@ADDR][,args=BOOTARGS]"
                         " (args= last: it takes the rest, commas included)")
    a = ap.parse_args()
    guests = []
    for spec in a.guest:
        name, rest = spec.split("=", 1)
        rest, _, args = rest.partition(",args=")
        parts = rest.split(",")
        image, addr, kib = parts[0], int(parts[1], 0), int(parts[2], 0)
        noblocks = "noblocks" in parts[3:]
        vgic = "vgic" in parts[3:]
        no_vgic = "novgic" in parts[3:]
        cpus = int(next((p[5:] for p in parts[3:] if p.startswith("cpus=")), "1"), 0)
        initrd = next((p[7:] for p in parts[3:] if p.startswith("initrd=")), None)
        rd, rd_addr = (None, None)
        if initrd:
            rd, at = initrd.rsplit("@", 1)
            rd_addr = int(at, 0)
        compatible = XEN_DOMAIN if "xen" in parts[3:] else "labyrinth,guest"
        extra = ""
        for p in (p[4:] for p in parts[3:] if p.startswith("shm=")):
            p, *opts = p.split(":")
            shm_id, _, where = p.partition("@")
            at, _, size = where.partition("+")
            role = "owner" if "owner" in opts else None
            host = next((int(o[5:], 0) for o in opts if o.startswith("host=")), None)
            extra += shm_node("shm-%s" % shm_id, shm_id, int(at, 0), int(size, 0), role, host_addr=host)
        guests.append(Guest(name, image, addr, kib, noblocks, args, cpus=cpus, compatible=compatible,
                            extra=extra, ramdisk=rd, ramdisk_addr=rd_addr, vgic=vgic, no_vgic=no_vgic))
    print(" ".join(make_dtb(a.out, guests, a.cpu, a.smp, a.mem)))


if __name__ == "__main__":
    main()
