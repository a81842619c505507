#!/usr/bin/env bash
# Downloads the newest Debian bookworm arm64 package whose name matches a pattern, verified end
# to end as apt verifies it: the suite's InRelease must carry a valid signature by a key of
# Debian's archive keyring (gpgv, /usr/share/keyrings/debian-archive-keyring.gpg, from the
# debian-archive-keyring package) and name the bookworm suite; the Packages index must have the
# size and SHA256 that the signed InRelease gives; the .deb must have the SHA256 the index gives.
# Anyone on the path (the mirror is plain HTTP) can then only make the download fail.
#
#   scripts/debian-fetch.sh PACKAGE_REGEX OUT_DEB
#
# Writes the .deb to OUT_DEB and prints "PACKAGE VERSION SHA256" on its last line. MIRROR
# overrides the mirror; KEYRING the keyring.
set -euo pipefail
pattern=$1
out_deb=$2
mirror=${MIRROR:-http://deb.debian.org/debian}
keyring=${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
suite=bookworm
index=main/binary-arm64/Packages.xz
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "debian-fetch: $*" >&2; exit 1; }
[ -r "$keyring" ] || fail "no archive keyring at $keyring (install debian-archive-keyring)"

curl -fsS -o "$tmp/InRelease" "$mirror/dists/$suite/InRelease" || fail "cannot download $suite's InRelease"
gpgv --quiet --keyring "$keyring" --output "$tmp/Release" "$tmp/InRelease" 2>"$tmp/gpgv.log" \
    || { cat "$tmp/gpgv.log" >&2; fail "$suite's InRelease does not carry a valid signature by Debian's archive keys"; }
# The index's size and hash from the signed text, and the suite it is for.
read -r want_sha want_size < <(python3 - "$tmp/Release" "$index" "$suite" <<'PY'
import sys
text, index, suite = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
fields = {}
section = None
for line in text.splitlines():
    if line.startswith(" "):
        if section == "SHA256":
            sha, size, name = line.split()
            if name == index:
                print(sha, size)
        continue
    key, _, value = line.partition(":")
    section = key
    fields[key] = value.strip()
if fields.get("Codename") != suite:
    sys.exit("debian-fetch: the signed Release is for %r, not %s" % (fields.get("Codename"), suite))
PY
) || fail "the signed Release does not name $index"
[ -n "${want_sha:-}" ] || fail "the signed Release has no SHA256 for $index"
curl -fsS -o "$tmp/Packages.xz" "$mirror/dists/$suite/$index" || fail "cannot download $index"
[ "$(stat -c %s "$tmp/Packages.xz")" = "$want_size" ] || fail "$index has not the size the signed Release gives"
echo "$want_sha  $tmp/Packages.xz" | sha256sum -c --quiet - >/dev/null 2>&1 \
    || fail "$index has not the SHA256 the signed Release gives"

# Newest matching package: its pool path, version and SHA256, from the now-trusted index.
read -r name version file sha < <(xz -dc "$tmp/Packages.xz" | python3 -c '
import re, sys
pat = re.compile(sys.argv[1])
best = None
for stanza in sys.stdin.read().split("\n\n"):
    f = dict(l.split(": ", 1) for l in stanza.splitlines() if ": " in l and not l.startswith(" "))
    if pat.match(f.get("Package", "")):
        key = [int(x) for x in re.findall(r"\d+", f["Package"] + " " + f["Version"])]
        if best is None or key > best[0]:
            best = (key, f["Package"], f["Version"], f["Filename"], f["SHA256"])
if best is None:
    sys.exit("debian-fetch: no package matches " + sys.argv[1])
print(*best[1:])
' "$pattern") || fail "no package in the index matches $pattern"
echo "debian-fetch: downloading $file" >&2
curl -fsS -o "$tmp/pkg.deb" "$mirror/$file" || fail "cannot download $file"
echo "$sha  $tmp/pkg.deb" | sha256sum -c --quiet - >/dev/null 2>&1 || fail "$file has not the SHA256 the index gives"
mv "$tmp/pkg.deb" "$out_deb"
echo "$name $version $sha"
