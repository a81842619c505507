#!/usr/bin/env bash
# The main job: install what is missing, build Labyrinth and its two guest kernels, and boot
# them side by side in QEMU: "stress" demand-faults and verifies its RAM, "isolation" tries to
# reach what it must not. Each guest's console lines carry its name; when both have stopped,
# Labyrinth prints their reports and the ownership audit and powers QEMU off.
# Extra arguments go to QEMU (for example: -s -S to wait for gdb, see docs/debugging.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
scripts/build-guests.sh
mem=${MEM:-1G}
args=$(python3 scripts/guestcfg.py build/run.dtb --mem "$mem" --smp "${SMP:-2}" --cpu "${CPU:-cortex-a72}" \
    --guest "stress=build/guest-stress.bin,0x50000000,65536,args=stress.seed=1" \
    --guest "isolation=build/guest-isolation.bin,0x51000000,65536,args=isolation.probe=0x40200000,0x50000000")
# shellcheck disable=SC2086
exec qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu "${CPU:-cortex-a72}" \
    -smp "${SMP:-2}" -m "$mem" -nographic -net none -kernel build/labyrinth.bin $args "$@"
