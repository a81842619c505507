#!/usr/bin/env bash
# The main job: install what is missing, build, and boot Labyrinth in QEMU.
# Extra arguments go to QEMU (for example: -m 3G, -smp 4, -dtb my.dtb, -s -S for gdb).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
exec qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu "${CPU:-cortex-a72}" \
    -smp "${SMP:-2}" -m "${MEM:-1G}" -nographic -net none -kernel build/labyrinth.bin "$@"
