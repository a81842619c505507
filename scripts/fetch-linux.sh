#!/usr/bin/env bash
# Fetches the Linux guest kernel: Debian bookworm's arm64 cloud kernel (PL011 console, GICv3 and
# the arch timer built in; few drivers, so it boots quickly), from deb.debian.org. The package is
# resolved from the suite's Packages index and its SHA256 checked against that index, then the
# arm64 Image is unpacked to build/linux/Image. Nothing is downloaded when it is already there.
# MIRROR overrides the mirror; PACKAGE_RE the package pattern.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/linux
image=$out/Image
[ -s "$image" ] && exit 0
mirror=${MIRROR:-http://deb.debian.org/debian}
pattern=${PACKAGE_RE:-'^linux-image-[0-9.]+-[0-9]+-cloud-arm64-unsigned$'}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-linux: reading $mirror bookworm arm64 Packages index"
curl -fsS -o "$tmp/Packages.xz" "$mirror/dists/bookworm/main/binary-arm64/Packages.xz"
# Newest matching package: its pool path and SHA256 (the index is signed by Release, which apt
# checks; here we trust the mirror for the index and the index for the .deb).
read -r file sha < <(xz -dc "$tmp/Packages.xz" | python3 -c '
import re, sys, subprocess
pat = re.compile(sys.argv[1])
best = None
for stanza in sys.stdin.read().split("\n\n"):
    f = dict(l.split(": ", 1) for l in stanza.splitlines() if ": " in l and not l.startswith(" "))
    if pat.match(f.get("Package", "")):
        key = [int(x) for x in re.findall(r"\d+", f["Package"] + " " + f["Version"])]
        if best is None or key > best[0]:
            best = (key, f["Filename"], f["SHA256"])
if best is None:
    sys.exit("fetch-linux: no package matches " + sys.argv[1])
print(best[1], best[2])
' "$pattern")
deb=$tmp/$(basename "$file")
echo "fetch-linux: downloading $file"
curl -fsS -o "$deb" "$mirror/$file"
echo "$sha  $deb" | sha256sum -c --quiet - || { echo "fetch-linux: SHA256 mismatch for $file" >&2; exit 1; }
(cd "$tmp" && ar x "$deb" data.tar.xz && tar -xJf data.tar.xz --wildcards './boot/vmlinuz-*')
vmlinuz=$(ls "$tmp"/boot/vmlinuz-* | head -1)
# Debian's arm64 vmlinuz is a gzip'd Image on some releases, the raw Image on others.
if gzip -t "$vmlinuz" 2>/dev/null; then gzip -dc "$vmlinuz" >"$tmp/Image"; else cp "$vmlinuz" "$tmp/Image"; fi
# The arm64 Image magic "ARM\x64" at offset 56.
[ "$(dd if="$tmp/Image" bs=1 skip=56 count=4 2>/dev/null)" = $'ARM\x64' ] || { echo "fetch-linux: $vmlinuz is not an arm64 Image" >&2; exit 1; }
echo "$(basename "$file") $sha" >"$out/SOURCE"
mv "$tmp/Image" "$image"
echo "fetch-linux: $image ($(stat -c %s "$image") bytes) from $(basename "$file")"
