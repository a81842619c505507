#!/usr/bin/env bash
# Path lengths measured in QEMU under -icount shift=0 (1 instruction = 1 ns of virtual time;
# the generic timer counts it):
#   - the hypervisor's atomic frame allocation and its block and page pool refills
#     (labyrinth.bench=alloc, no guest);
#   - guest-visible instructions per 4 KiB demand fault, per 2 MiB block fault, per
#     PSCI_VERSION round trip, per emulated MMIO read (PL011 FR, GICD_IIDR), per SGI to self,
#     per SGI round trip between two vCPUs, and per 4 KiB fault with 1, 2 and 4 vCPUs faulting
#     at once, partitioned and overlapped (scripts/fault_bench.py, which also writes
#     docs/fault-cost.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
scripts/build-guests.sh
timeout 120 qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu cortex-a72 \
    -smp 2 -m 1G -nographic -net none -icount shift=0 -kernel build/labyrinth.bin \
    -append "labyrinth.bench=alloc" | sed 's/\r//' | grep -E "bench (alloc|refill)" \
    || { echo "bench alloc: no result" >&2; exit 1; }
python3 scripts/fault_bench.py
