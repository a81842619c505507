#!/usr/bin/env python3
"""Guest-visible path lengths under QEMU -icount shift=0 (1 instruction = 1 ns of virtual time;
the guest's generic timer counts it): instructions per 4 KiB demand fault, per 2 MiB block
fault and per PSCI_VERSION round trip through HVC, measured by Labyrinth's stress guest (first
touch minus second touch of the same pages; a timed loop minus the same loop with a `nop`);
per emulated MMIO read (the PL011's FR, the virtual GIC distributor's GICD_IIDR; stress with
stress.bench=mmio, same boot as the 4 KiB figure); per SGI to self and per SGI round trip
between two vCPUs on two physical CPUs (the smp-test guest's sgi-rtt case, on -smp 2);
instructions per 4 KiB fault of the whole machine with 1, 2 and 4 vCPUs faulting at once
(stress.mode=partitioned and overlapped, one vCPU per physical CPU: under -icount QEMU runs
the CPUs round-robin on one thread and the clock counts every CPU's instructions, so the
figure is the machine's extra time for the first touch per page mapped; stress.interleave makes
QEMU switch CPUs after every page, so the vCPUs' passes do overlap).

Writes docs/fault-cost.svg (a bar chart against Linux KVM's figures on the same QEMU, from
shared/docs/prior-art.md, where it has one) and prints a table. Run it through
scripts/bench-qemu.sh.
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guestcfg  # noqa: E402

STRESS = os.path.join(ROOT, "build", "guest-stress.bin")
SMP_TEST = os.path.join(ROOT, "build", "guest-smp-test.bin")
KERNEL = os.path.join(ROOT, "build", "labyrinth.bin")
# Linux 6.1 KVM on this machine's QEMU 7.2, nVHE, same toucher guest (prior-art.md). It has
# no MMIO or SGI figures: those rows have no KVM bar.
KVM = {"4 KiB fault": 8000, "2 MiB fault": 451000, "HVC round trip": 1482}
GOALS = {"4 KiB fault": 100, "2 MiB fault": 200, "HVC round trip": 100,
         "MMIO read (UART FR)": 150, "MMIO read (GICD_IIDR)": 150, "2 MiB of RAM, whole": 250}


def run(wd, name, guests, append=None, smp=1):
    args = guestcfg.make_dtb(os.path.join(wd, name + ".dtb"), guests, smp=smp)
    cmd = guestcfg.qemu_base(smp=smp) + ["-icount", "shift=0", "-kernel", KERNEL] + args
    if append:
        cmd += ["-append", append]
    out = subprocess.run(cmd, capture_output=True, timeout=600, stdin=subprocess.DEVNULL).stdout
    return out.decode(errors="replace").replace("\r", "")


def grab(pattern, text, what):
    m = re.search(pattern, text)
    if not m:
        sys.exit("fault_bench: no %s in the output:\n%s" % (what, text[-3000:]))
    return int(m.group(1))


def svg(results):
    """A horizontal log-scale bar chart: Labyrinth vs KVM per path (where KVM has a figure),
    with the goal marked (where there is one)."""
    import math
    rows = list(results.keys())
    w, h, left, top, bar = 800, 60 + 70 * len(rows), 190, 40, 22
    scale = lambda v: left + (w - left - 40) * math.log10(max(v, 1)) / 6  # 1 .. 10^6
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (w, h),
           '<text x="10" y="20" font-size="14">Instructions per operation (QEMU 7.2, -icount shift=0; log scale)</text>']
    for d in range(7):
        x = scale(10 ** d)
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (x, top, x, h - 20))
        out.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%s</text>' % (x, h - 5, "{:,}".format(10 ** d)))
    for i, name in enumerate(rows):
        y = top + 10 + 70 * i
        out.append('<text x="10" y="%d">%s</text>' % (y + 25, name))
        bars = [("Labyrinth", results[name], "#2a7")]
        if name in KVM:
            bars.append(("Linux KVM", KVM[name], "#c44"))
        for j, (label, v, colour) in enumerate(bars):
            yy = y + j * (bar + 4)
            out.append('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>' % (left, yy, scale(v) - left, bar, colour))
            out.append('<text x="%.1f" y="%d">%s %s</text>' % (scale(v) + 4, yy + 16, label, "{:,}".format(v)))
        if name not in GOALS:
            continue
        gx = scale(GOALS[name])
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000" stroke-dasharray="3,3"/>' % (gx, y - 4, gx, y + 2 * bar + 8))
        out.append('<text x="%.1f" y="%d" font-size="10">goal %d</text>' % (gx + 2, y - 6, GOALS[name]))
    out.append("</svg>")
    return "\n".join(out)


# (vCPUs, mode) of the concurrent-fault runs; the ratios are to the 1-vCPU run of the same code.
CONCURRENT = [(1, "partitioned"), (2, "partitioned"), (2, "overlapped"), (4, "partitioned"), (4, "overlapped")]
CONCURRENT_GOALS = {(2, "partitioned"): 1.05, (2, "overlapped"): 1.1}


def concurrent(wd):
    """Instructions per 4 KiB fault, machine-wide, per (vCPUs, mode)."""
    out = {}
    for cpus, mode in CONCURRENT:
        text = run(wd, "smp%d%s" % (cpus, mode),
                   [guestcfg.Guest("stress", STRESS, 0x5000_0000, 64 * 1024, no_blocks=True, cpus=cpus,
                                   bootargs="stress.seed=1 stress.interleave stress.mode=" + mode)], smp=cpus)
        out[(cpus, mode)] = grab(r"stress: %s cpus=%d machine first=\d+ second=\d+ ticks, fault=(-?\d+) "
                                 r"instructions/page" % (mode, cpus), text, "%d-vCPU %s figure" % (cpus, mode))
    return out


def main():
    results = {}
    with tempfile.TemporaryDirectory() as wd:
        # The MMIO reads come after every other figure of this boot, so they leave those alone.
        pages = run(wd, "pages", [guestcfg.Guest("stress", STRESS, 0x5000_0000, 64 * 1024, no_blocks=True,
                                                 bootargs="stress.seed=1 stress.bench=mmio")])
        results["4 KiB fault"] = grab(r"4k first-touch .* fault=(-?\d+) instructions/page", pages, "4 KiB figure")
        results["HVC round trip"] = grab(r"hvc psci_version round trip=(-?\d+) instructions", pages, "HVC figure")
        blocks = run(wd, "blocks", [guestcfg.Guest("stress", STRESS, 0x5000_0000, 64 * 1024,
                                                  bootargs="stress.seed=1 stress.blocks")])
        results["2 MiB fault"] = grab(r"2m first-touch .* fault=(-?\d+) instructions/block", blocks, "2 MiB figure")
        # A block guest touching every free page of its 64 MiB: what its whole RAM costs per 2 MiB,
        # the regions holding its images included (they are loaded into blocks).
        whole = run(wd, "whole", [guestcfg.Guest("stress", STRESS, 0x5000_0000, 64 * 1024, bootargs="stress.seed=1")])
        m = re.search(r"4k first-touch pages=\d+ first=(\d+) second=(\d+) ticks", whole)
        if not m:
            raise SystemExit("fault_bench: no whole-RAM figure\n" + whole)
        # Counter ticks to instructions: under -icount shift=0 one instruction takes 1 ns.
        ns_per_tick = 1e9 / grab(r"cntfrq=(\d+) Hz", whole, "counter frequency")
        results["2 MiB of RAM, whole"] = round((int(m.group(1)) - int(m.group(2))) * ns_per_tick / 32)
        gb = run(wd, "giveback", [guestcfg.Guest("stress", STRESS, 0x5000_0000, 64 * 1024, bootargs="stress.giveback")])
        results["give back 4 KiB"] = grab(r"give-back cost page=(\d+) block", gb, "give-back page figure")
        results["give back 2 MiB"] = grab(r"give-back cost page=\d+ block=(\d+) instructions", gb, "give-back block figure")
        results["MMIO read (UART FR)"] = grab(r"stress: mmio uart-fr read=(-?\d+) instructions", pages, "UART FR figure")
        results["MMIO read (GICD_IIDR)"] = grab(r"stress: mmio gicd-iidr read=(-?\d+) instructions", pages,
                                                "GICD_IIDR figure")
        # Two vCPUs, one per physical CPU (-smp 2), and nothing else running: under -icount the
        # virtual clock is the instructions of both CPUs, and each waits in WFI (halted).
        sgi = run(wd, "sgi", [guestcfg.Guest("smp", SMP_TEST, 0x5000_0000, 16 * 1024, cpus=2,
                                             bootargs="smptest.case=sgi-rtt")], smp=2)
        results["SGI round trip (2 vCPUs)"] = grab(r"smp-test: sgi round trip=(-?\d+) instructions", sgi,
                                                   "SGI round-trip figure")
        results["SGI to self"] = grab(r"smp-test: sgi to self=(-?\d+) instructions", sgi, "SGI-to-self figure")
        faults = concurrent(wd)
    print("%-16s %12s %12s %8s" % ("path", "Labyrinth", "Linux KVM", "goal"))
    for k, v in results.items():
        if k in KVM:
            print("%-16s %12d %12d %8d" % (k, v, KVM[k], GOALS[k]))
        else:
            print("%-16s %12d %12s %8s" % (k, v, "-", GOALS.get(k, "-")))
    base = faults[(1, "partitioned")]
    print("\n4 KiB faults at once (machine-wide instructions per page)")
    print("%-6s %-12s %8s %7s %6s" % ("vCPUs", "mode", "fault", "ratio", "goal"))
    for (cpus, mode), v in faults.items():
        goal = CONCURRENT_GOALS.get((cpus, mode))
        print("%-6d %-12s %8d %6.2fx %6s" % (cpus, mode, v, v / base, "%.2fx" % goal if goal else "-"))
    with open(os.path.join(ROOT, "docs", "fault-cost.svg"), "w") as f:
        f.write(svg(results))
    print("wrote docs/fault-cost.svg")


if __name__ == "__main__":
    main()
