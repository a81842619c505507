#!/usr/bin/env bash
# The main job: install what is missing, fetch Debian's arm64 Linux kernel (once, into build/),
# build Labyrinth, its test kernels and Linux's initramfs, and boot two SMP guests side by side
# in QEMU on 4 CPUs, each with 2 vCPUs: "stress" (Labyrinth's own test kernel) demand-faults,
# stamps and cross-checks its RAM from both vCPUs while "linux" (a real Linux kernel with a
# virtual GICv3, written as a Xen dom0less node) boots both its CPUs, runs a little work on
# each from a tiny init, and powers off. Each guest's console lines carry its name; when both have stopped, Labyrinth prints
# their reports and the ownership audit and powers QEMU off. LINUX_ARGS overrides Linux's
# command line (drop "loglevel=6" to see its whole boot log).
# With --shell (first argument) the run is interactive instead: Linux ends in a busybox shell
# that has the console's input; Ctrl-A three times moves the input to the other guest.
# Extra arguments go to QEMU (for example: -s -S to wait for gdb, see docs/debugging.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
scripts/fetch-linux.sh
scripts/build-guests.sh
mem=${MEM:-1G}
linux_args=${LINUX_ARGS:-console=ttyAMA0 earlycon loglevel=6 rdinit=/init}
linux="linux=build/linux/Image,0x52000000,262144,cpus=2,xen,initrd=build/linux/initramfs.cpio@0x51000000"
if [ "${1:-}" = --shell ]; then
    # Interactive: Linux first (it has the input focus) ends in a busybox shell; the stress
    # kernel beside it echoes the lines typed to it. Ctrl-A three times switches between them;
    # `poweroff -f` in the shell and `off` to the echo guest end the run (Ctrl-T x quits QEMU).
    shift
    guests=(--guest "$linux,args=$linux_args init_shell=1"
        --guest "stress=build/guest-stress.bin,0x50000000,65536,args=stress.echo")
else
    guests=(--guest "stress=build/guest-stress.bin,0x50000000,65536,cpus=2,args=stress.seed=1"
        --guest "$linux,args=$linux_args")
fi
args=$(python3 scripts/guestcfg.py build/run.dtb --mem "$mem" --smp "${SMP:-4}" --cpu "${CPU:-cortex-a72}" \
    "${guests[@]}")
# shellcheck disable=SC2086
exec qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu "${CPU:-cortex-a72}" \
    -smp "${SMP:-4}" -m "$mem" -nographic -echr 0x14 -net none -kernel build/labyrinth.bin $args "$@"
