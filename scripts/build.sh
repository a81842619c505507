#!/usr/bin/env bash
# Builds the hypervisor for aarch64 and writes build/labyrinth.bin, a Linux arm64 Image.
# PROFILE=dev builds unoptimised (better for gdb); the default is release.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
dir=$profile; [ "$profile" = dev ] && dir=debug
# Debian's toolchain builds core/alloc from source for the target (see docs/testing.md).
RUSTC_BOOTSTRAP=1 cargo build -q -p labyrinth --bin labyrinth --profile "$profile" \
    --target aarch64-unknown-none-softfloat \
    -Zbuild-std=core,alloc,compiler_builtins -Zbuild-std-features=compiler-builtins-mem
mkdir -p build
elf=target/aarch64-unknown-none-softfloat/$dir/labyrinth
cp "$elf" build/labyrinth.elf
llvm-objcopy -O binary "$elf" build/labyrinth.bin
