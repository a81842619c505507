#!/usr/bin/env bash
# Fetches the Linux guest kernel: Debian bookworm's arm64 cloud kernel (PL011 console, GICv3 and
# the arch timer built in; few drivers, so it boots quickly), from deb.debian.org, verified from
# the suite's signed InRelease down to the .deb (scripts/debian-fetch.sh), then the arm64 Image
# is unpacked to build/linux/Image and the package, version and SHA256 written to
# build/linux/SOURCE. Nothing is downloaded when it is already there. MIRROR overrides the
# mirror; PACKAGE_RE the package pattern. Also fetches busybox (busybox-static) into
# build/linux/busybox the same way, for the interactive shell.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/linux
image=$out/Image
mkdir -p "$out"
# busybox (Debian's busybox-static, verified the same way) for the Linux guest's interactive
# shell (scripts/run.sh --shell).
if [ ! -s "$out/busybox" ]; then
    btmp=$(mktemp -d)
    info=$(scripts/debian-fetch.sh '^busybox-static$' "$btmp/busybox.deb" | tail -1)
    (cd "$btmp" && ar x busybox.deb data.tar.xz && tar -xJf data.tar.xz ./bin/busybox)
    mv "$btmp/bin/busybox" "$out/busybox"
    echo "$info" >"$out/BUSYBOX_SOURCE"
    rm -rf "$btmp"
    echo "fetch-linux: $out/busybox from $info"
fi
[ -s "$image" ] && exit 0
pattern=${PACKAGE_RE:-'^linux-image-[0-9.]+-[0-9]+-cloud-arm64-unsigned$'}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
deb=$tmp/kernel.deb
echo "fetch-linux: resolving $pattern in Debian bookworm (signed InRelease, index, package hashes)"
info=$(scripts/debian-fetch.sh "$pattern" "$deb" | tail -1)
read -r package version sha <<<"$info"
file="${package}_${version}_arm64.deb"
(cd "$tmp" && ar x "$deb" data.tar.xz && tar -xJf data.tar.xz --wildcards './boot/vmlinuz-*')
vmlinuz=$(ls "$tmp"/boot/vmlinuz-* | head -1)
# Debian's arm64 vmlinuz is a gzip'd Image on some releases, the raw Image on others.
if gzip -t "$vmlinuz" 2>/dev/null; then gzip -dc "$vmlinuz" >"$tmp/Image"; else cp "$vmlinuz" "$tmp/Image"; fi
# The arm64 Image magic "ARM\x64" at offset 56.
[ "$(dd if="$tmp/Image" bs=1 skip=56 count=4 2>/dev/null)" = $'ARM\x64' ] || { echo "fetch-linux: $vmlinuz is not an arm64 Image" >&2; exit 1; }
echo "$file $sha" >"$out/SOURCE"
mv "$tmp/Image" "$image"
echo "fetch-linux: $image ($(stat -c %s "$image") bytes) from $(basename "$file")"
