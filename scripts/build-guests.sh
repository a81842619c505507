#!/usr/bin/env bash
# Builds Labyrinth's guest test kernels (guest-images/, its own cargo workspace) for
# aarch64-unknown-none and writes the raw arm64 Images build/guest-stress.bin,
# build/guest-isolation.bin and build/guest-smp-test.bin (plus their ELFs, for gdb), and the Linux guest's /init
# (build/linux/init) packed into its initramfs, build/linux/initramfs.cpio. Quiet: prints nothing unless the build
# fails (then cargo's whole output); fails on any error. Installs nothing: run
# scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
for tool in cargo ld.lld llvm-objcopy; do
    command -v "$tool" >/dev/null || { echo "build-guests: $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done
cd guest-images
# Debian's toolchain builds core/alloc from source for the target (see guest-images/README.md).
# rustc warns on every build that `+strict-align` (.cargo/config.toml) is not a feature it
# knows (it still passes it to LLVM, which does): cargo's output is kept for failures only.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! RUSTC_BOOTSTRAP=1 cargo build --release --target aarch64-unknown-none \
    -Zbuild-std=core,alloc,compiler_builtins -Zbuild-std-features=compiler-builtins-mem \
    -p stress -p isolation -p smp-test -p linux-init >"$log" 2>&1; then
    cat "$log" >&2
    echo "build-guests: cargo build failed" >&2
    exit 1
fi
mkdir -p "$root/build"
for k in stress isolation smp-test; do
    elf=target/aarch64-unknown-none/release/$k
    # The guests run with their MMU off (all memory Device): no DC ZVA (or any DC), no
    # exclusives, no LSE atomics. Checked on the disassembly when llvm-objdump is there.
    if command -v llvm-objdump >/dev/null; then
        bad=$(llvm-objdump -d --no-show-raw-insn "$elf" | awk -F'\t' '/^ *[0-9a-f]+:/ { print $2 }' |
            grep -E '^(dc|ld[a]?xr[bh]?|st[l]?xr[bh]?|ld[a]?xp|st[l]?xp|casp?[al]*[bh]?|swp[al]*[bh]?|(ld|st)(add|clr|eor|set|smax|smin|umax|umin)[al]*[bh]?)$' |
            sort -u | tr '\n' ' ' || true)
        if [ -n "$bad" ]; then
            echo "build-guests: $k uses instructions not allowed with the MMU off: $bad" >&2
            exit 1
        fi
    fi
    cp "$elf" "$root/build/guest-$k.elf"
    llvm-objcopy -O binary "$elf" "$root/build/guest-$k.bin"
done
# The Linux guest's init is a Linux user program (its MMU is on): no such check. Stripped, it
# is about 1 KiB.
mkdir -p "$root/build/linux"
llvm-objcopy --strip-all target/aarch64-unknown-none/release/linux-init "$root/build/linux/init"
# With busybox fetched (scripts/fetch-linux.sh), the initramfs also carries the shell.
busybox=()
[ -s "$root/build/linux/busybox" ] && busybox=("$root/build/linux/busybox")
python3 "$root/scripts/mkinitramfs.py" "$root/build/linux/init" "$root/build/linux/initramfs.cpio" "${busybox[@]}"
