#!/usr/bin/env python3
"""The downloads' chain of trust, tried against tampering: scripts/debian-fetch.sh must refuse a
changed InRelease (bad signature), a right signature checked against the wrong keys, and an
index or a package that is not what the signed text says. Each case serves a local mirror
(file://) built from the real suite's files; only the real InRelease and index are downloaded.

Usage: scripts/fetch_tests.py   (exits non-zero on any failure)
"""
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCH = os.path.join(ROOT, "scripts", "debian-fetch.sh")
MIRROR = os.environ.get("MIRROR", "http://deb.debian.org/debian")
SUITE = "dists/bookworm/"
INDEX = SUITE + "main/binary-arm64/Packages.xz"
# A small package, to keep the honest run cheap.
PACKAGE = "^busybox-static$"


def fetch(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def run(mirror, keyring=None):
    env = dict(os.environ, MIRROR=mirror)
    if keyring:
        env["KEYRING"] = keyring
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.run([FETCH, PACKAGE, os.path.join(d, "out.deb")], env=env, capture_output=True, text=True)
        return p.returncode, p.stdout + p.stderr


def mirror_with(base, inrelease, index, deb_path=None, deb=None):
    """A local mirror holding these files; returns its file:// URL."""
    for rel, data in ((SUITE + "InRelease", inrelease), (INDEX, index), (deb_path, deb)):
        if rel is None:
            continue
        path = os.path.join(base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return "file://" + base


def main():
    inrelease = fetch(MIRROR + "/" + SUITE + "InRelease")
    index = fetch(MIRROR + "/" + INDEX)
    failures = 0

    def expect(name, rc_out, ok, needle):
        nonlocal failures
        rc, out = rc_out
        good = (rc == 0) == ok and needle in out
        print("%-5s %s" % ("ok" if good else "FAIL", name))
        if not good:
            failures += 1
            print(out)

    with tempfile.TemporaryDirectory() as wd:
        # The package itself, from the real mirror: the honest chain must pass.
        honest = run(MIRROR)
        expect("the honest chain passes", honest, True, "busybox-static")
        deb_path = next(l.split()[-1] for l in honest[1].splitlines() if "downloading" in l)

        # A changed byte in the signed text (the index's hash): the signature fails.
        forged = inrelease.replace(b"main/binary-arm64/Packages.xz", b"main/binary-arm64/Packages.xy", 1)
        m = mirror_with(os.path.join(wd, "a"), forged, index)
        expect("a changed InRelease is refused", run(m), False, "valid signature")

        # The real InRelease checked against keys that did not sign it.
        other = os.path.join(wd, "other.gpg")
        shutil.copy("/usr/share/keyrings/debian-archive-removed-keys.gpg", other)
        m = mirror_with(os.path.join(wd, "b"), inrelease, index)
        expect("a signature by keys not trusted is refused", run(m, keyring=other), False, "valid signature")

        # A substituted index (another, valid xz file): not the size or hash the signature gives.
        fake_index = subprocess.run(["xz", "-c"], input=b"Package: busybox-static\n", capture_output=True).stdout
        m = mirror_with(os.path.join(wd, "c"), inrelease, fake_index)
        expect("a substituted index is refused", run(m), False, "signed Release gives")

        # The right index, a substituted package: not the hash the index gives.
        m = mirror_with(os.path.join(wd, "d"), inrelease, index, deb_path, gzip.compress(b"not a package"))
        expect("a substituted package is refused", run(m), False, "SHA256 the index gives")
    print("fetch tests: %s" % ("all passed" if failures == 0 else "%d failed" % failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
