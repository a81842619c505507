#!/usr/bin/env bash
# Attaches gdb-multiarch to a Labyrinth started with `scripts/run.sh -s -S` (QEMU's gdbstub on
# :1234, CPUs halted at reset). The image is linked at 0 and relocates itself to where QEMU put
# it (RAM base + 2 MiB), so the symbols are loaded at that offset. Extra arguments go to gdb.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_GDB=1 scripts/setup.sh
load=${LOAD_ADDRESS:-0x40200000}
exec gdb-multiarch -q \
    -ex "set architecture aarch64" \
    -ex "add-symbol-file build/labyrinth.elf -o $load" \
    -ex "target remote ${GDB_PORT:-:1234}" \
    "$@"
