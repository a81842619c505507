#!/usr/bin/env python3
"""Aggregate 4 KiB demand-fault throughput in wall-clock time under QEMU's multi-threaded TCG
(no -icount: one host thread per vCPU), with 1 and with 2 vCPUs faulting into one guest.

The stress guest (no block mappings, stress.mode=partitioned: each vCPU its own slice) times
the whole machine from CPU 0 between barriers: the first touch of every page (each a stage-2
fault) and the second touch of the same pages (no fault). The faults' share is the
difference, so fault throughput is pages / (first - second), in the guest's counter ticks,
which follow the host's clock. The figure is the 2-vCPU throughput over the 1-vCPU one, the
median of --runs pairs. It measures the host as much as Labyrinth: run it with nothing else
on the machine (two vCPU threads need two free cores); the load average is printed with it.

With each pair it runs smp-test's trap-scaling case (two CPUs' loops of HVCs, of emulated MMIO
reads, of 4 KiB demand faults and of no trap, against one CPU's), which separates what any trap
costs under this QEMU from what Labyrinth's fault path adds, and measures the fault the way the
HVC is measured (docs/guests.md, "Throughput in wall-clock time").

  python3 scripts/scaling_bench.py [--runs N] [--mib M] [--svg docs/scaling.svg]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guestcfg  # noqa: E402

STRESS = os.path.join(ROOT, "build", "guest-stress.bin")
SMP_TEST = os.path.join(ROOT, "build", "guest-smp-test.bin")
KERNEL = os.path.join(ROOT, "build", "labyrinth.bin")
MODE = "partitioned"


def run(wd, cpus, mib, mode):
    guest = guestcfg.Guest("stress", STRESS, 0x5000_0000, mib * 1024, no_blocks=True, cpus=cpus,
                           bootargs="stress.seed=1 stress.mode=" + mode)
    args = guestcfg.make_dtb(os.path.join(wd, "s%d.dtb" % cpus), [guest], smp=cpus)
    cmd = guestcfg.qemu_base(smp=cpus) + ["-accel", "tcg,thread=multi", "-kernel", KERNEL] + args
    cmd += os.environ.get("QEMU_EXTRA", "").split()
    out = subprocess.run(cmd, capture_output=True, timeout=900, stdin=subprocess.DEVNULL).stdout
    text = out.decode(errors="replace").replace("\r", "")
    m = re.search(r"stress: %s cpus=%d machine first=(\d+) second=(\d+) ticks" % (mode, cpus), text)
    if not m or "verify=ok" not in text:
        sys.exit("scaling_bench: no verified %d-vCPU figure in the output:\n%s" % (cpus, text[-3000:]))
    pages = sum(int(p) for p in re.findall(r"stress: cpu \d+ %s first-touch pages=(\d+)" % mode, text))
    first, second = int(m.group(1)), int(m.group(2))
    return pages, first, second


def trap_scaling(wd):
    """smp-test's trap-scaling case: two CPUs' loops against one CPU's, for a loop of HVCs, of
    emulated MMIO reads (a stage-2 data abort each, as a fault is), of first touches of fresh
    pages (a 4 KiB demand fault each: the fault measured the way the HVC is) and of no trap."""
    guest = guestcfg.Guest("smp", SMP_TEST, 0x5000_0000, 160 * 1024, no_blocks=True, cpus=2,
                           bootargs="smptest.case=trap-scaling smptest.storm=100000 "
                                    "smptest.fault-pages=12288")
    args = guestcfg.make_dtb(os.path.join(wd, "t.dtb"), [guest], smp=2)
    cmd = guestcfg.qemu_base(smp=2) + ["-accel", "tcg,thread=multi", "-kernel", KERNEL] + args
    out = subprocess.run(cmd, capture_output=True, timeout=900, stdin=subprocess.DEVNULL).stdout
    text = out.decode(errors="replace")
    got = dict(re.findall(r"trap-scaling (\S+) n=\d+ .* two cpus do (\d+\.\d+)x the work of one", text))
    if set(got) != {"hvc", "mmio-abort", "fault-4k", "no-trap"}:
        sys.exit("scaling_bench: no trap-scaling figures in the output:\n%s" % text[-3000:])
    return {k: float(v) for k, v in got.items()}


ROWS = [("no-trap", "loop, no trap"), ("hvc", "null HVC (PSCI_VERSION)"),
        ("mmio-abort", "MMIO read (stage-2 abort)"), ("fault-4k", "loop of 4 KiB demand faults"),
        ("fault", "stress guest's fault pass")]


def svg(results):
    """Horizontal bars: median 2-vCPU/1-vCPU ratio per row, with the runs' range as a whisker,
    lines at 1x, the 1.8x goal and 2x."""
    w, left, top, bar, step = 760, 230, 50, 20, 44
    h = top + step * len(ROWS) + 40
    x = lambda v: left + v / 2.5 * (w - left - 30)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif">' % (w, h),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="20" font-size="14">Two vCPUs against one, wall clock, QEMU 7.2 multi-threaded TCG, '
           '2 host cores</text>',
           '<text x="10" y="38" font-size="11">median of the runs, whisker: lowest to highest</text>']
    for v, label, colour in [(1.0, "1x", "#888"), (1.8, "goal 1.8x", "#c33"), (2.0, "2x", "#888")]:
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-dasharray="4,3"/>'
                   % (x(v), top - 6, x(v), h - 30, colour))
        out.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle" fill="%s">%s</text>'
                   % (x(v), h - 14, colour, label))
    for i, (key, label) in enumerate(ROWS):
        vals = sorted(results[key])
        med = statistics.median(vals)
        y = top + i * step
        out.append('<text x="%d" y="%d" font-size="12" text-anchor="end">%s</text>' % (left - 8, y + 15, label))
        out.append('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>'
                   % (left, y, x(med) - left, bar, "#4a7" if key == "no-trap" else "#47a"))
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>'
                   % (x(vals[0]), y + bar // 2, x(vals[-1]), y + bar // 2))
        out.append('<text x="%.1f" y="%d" font-size="11">%.2fx</text>' % (x(max(med, vals[-1])) + 6, y + 15, med))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--mode", default=MODE)
    ap.add_argument("--svg", help="write the plot here (docs/scaling.svg)")
    args = ap.parse_args()
    results = {k: [] for k, _ in ROWS}
    touch = []
    with tempfile.TemporaryDirectory() as wd:
        for r in range(args.runs):
            res = {}
            for cpus in (1, 2):
                pages, first, second = run(wd, cpus, args.mib, args.mode)
                res[cpus] = (pages, first, second)
                print("run %d: %d vCPU(s): %d pages, first touch %d ticks, second %d, faults %d "
                      "(%.0f faults per 1000 ticks), load %.2f"
                      % (r + 1, cpus, pages, first, second, first - second,
                         1000 * pages / max(1, first - second), os.getloadavg()[0]), flush=True)
            (p1, f1, s1), (p2, f2, s2) = res[1], res[2]
            results["fault"].append((p2 / max(1, f2 - s2)) / (p1 / max(1, f1 - s1)))
            touch.append((p2 / max(1, s2)) / (p1 / max(1, s1)))
            for k, v in trap_scaling(wd).items():
                results[k].append(v)
            print("run %d: 2 vCPUs / 1 vCPU: faults %.2fx (fault-free touch %.2fx), %s"
                  % (r + 1, results["fault"][-1], touch[-1],
                     ", ".join("%s %.2fx" % (k, results[k][-1]) for k, _ in ROWS[:4])), flush=True)
    for key, label in ROWS:
        vals = results[key]
        print("%-28s median %.2fx, lowest %.2fx, highest %.2fx" % (label, statistics.median(vals), min(vals), max(vals)))
    print("%-28s median %.2fx (the stress guest's second touch)" % ("fault-free touch", statistics.median(touch)))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(results))
        print("wrote", args.svg)


if __name__ == "__main__":
    main()
