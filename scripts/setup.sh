#!/usr/bin/env bash
# Installs what building and testing Labyrinth needs, if it is missing (Debian bookworm):
# Debian's Rust 1.96 with its library source (rustup cannot add the aarch64 target here),
# ld.lld, QEMU, dtc, and what fetching the Linux guest kernel needs (curl, xz, ar, gpgv and Debian's archive keyring). Idempotent and quiet when everything is present.
set -euo pipefail

need=()
[ -x /usr/bin/cargo ] || need+=(cargo-web)
[ -x /usr/bin/rustc ] || need+=(rustc-web)
[ -d /usr/lib/rustlib/src/rust/library ] || need+=(rust-web-src)
command -v ld.lld >/dev/null || need+=(lld)
command -v llvm-objcopy >/dev/null || need+=(llvm)
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v dtc >/dev/null || need+=(device-tree-compiler)
command -v python3 >/dev/null || need+=(python3)
# scripts/fetch-linux.sh: download, unpack the .deb (ar, xz).
command -v curl >/dev/null || need+=(curl)
command -v xz >/dev/null || need+=(xz-utils)
command -v ar >/dev/null || need+=(binutils)
# scripts/debian-fetch.sh: the suite's signature checked against Debian's archive keys.
command -v gpgv >/dev/null || need+=(gpgv)
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ "${WITH_GDB:-0}" = 1 ]; then command -v gdb-multiarch >/dev/null || need+=(gdb-multiarch); fi

if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
