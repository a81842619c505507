#!/usr/bin/env bash
# The main job: install what is missing, fetch Debian's arm64 Linux kernel (once, into build/),
# build Labyrinth, its test kernels and Linux's initramfs, and boot two SMP guests side by side
# in QEMU on 4 CPUs, each with 2 vCPUs: "stress" (Labyrinth's own test kernel) demand-faults,
# stamps and cross-checks its RAM from both vCPUs while "linux" (a real Linux kernel with a
# virtual GICv3, written as a Xen dom0less node) boots both its CPUs, runs a little work on
# each from a tiny init, and powers off. Each guest's console lines carry its name; when both have stopped, Labyrinth prints
# their reports and the ownership audit and powers QEMU off. LINUX_ARGS overrides Linux's
# command line (drop "loglevel=6" to see its whole boot log).
# Extra arguments go to QEMU (for example: -s -S to wait for gdb, see docs/debugging.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
scripts/build-guests.sh
scripts/fetch-linux.sh
mem=${MEM:-1G}
args=$(python3 scripts/guestcfg.py build/run.dtb --mem "$mem" --smp "${SMP:-4}" --cpu "${CPU:-cortex-a72}" \
    --guest "stress=build/guest-stress.bin,0x50000000,65536,cpus=2,args=stress.seed=1" \
    --guest "linux=build/linux/Image,0x52000000,262144,cpus=2,xen,initrd=build/linux/initramfs.cpio@0x51000000,args=${LINUX_ARGS:-console=ttyAMA0 earlycon loglevel=6 rdinit=/init}")
# shellcheck disable=SC2086
exec qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu "${CPU:-cortex-a72}" \
    -smp "${SMP:-4}" -m "$mem" -nographic -echr 0x14 -net none -kernel build/labyrinth.bin $args "$@"
