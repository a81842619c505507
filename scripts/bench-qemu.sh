#!/usr/bin/env bash
# Path lengths measured in QEMU under -icount shift=0 (1 instruction = 1 ns of virtual time;
# the generic timer counts it): prints the hypervisor's own benchmark lines.
# Usage: scripts/bench-qemu.sh [BENCH ...]   (default: alloc)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
for b in "${@:-alloc}"; do
    timeout 120 qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu cortex-a72 \
        -smp 2 -m 1G -nographic -net none -icount shift=0 -kernel build/labyrinth.bin \
        -append "labyrinth.bench=$b" | sed 's/\r//' | grep -E "bench|FATAL|panic" \
        || { echo "bench $b: no result" >&2; exit 1; }
done
