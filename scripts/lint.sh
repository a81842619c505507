#!/usr/bin/env bash
# The code's hygiene, checked with the nightly toolchain's rustfmt and clippy (Debian's 1.96 has
# neither; see docs/testing.md): formatting (rustfmt.toml states the house style) of the
# workspace, the fuzz crate and the guest images, then clippy with the workspace's [lints] on
# every host target of the workspace (library, tests, benchmarks) and of the fuzz crate.
# Exits non-zero on any difference or warning. `scripts/lint.sh fix` formats in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "${1:-}" = fix ]; then
    cargo +nightly fmt --all
    (cd hypervisor/fuzz && cargo +nightly fmt)
    (cd guest-images && cargo +nightly fmt)
    exit 0
fi

status=0
run() {
    if ! "$@"; then
        echo "lint: FAILED: $*" >&2
        status=1
    fi
}
# rustfmt finds rustfmt.toml in the repository's root from each of the three workspaces. Only
# the main one takes `--all`: elsewhere it would also reach the path dependency `labyrinth`.
run cargo +nightly fmt --all --check
run bash -c 'cd hypervisor/fuzz && cargo +nightly fmt --check'
run bash -c 'cd guest-images && cargo +nightly fmt --check'
# Own target directories: the nightly's artifacts must not evict Debian cargo's.
run cargo +nightly clippy -q --workspace --all-targets --target-dir target/clippy -- -D warnings
# The fuzz targets see the model only under `--cfg fuzzing`, as cargo-fuzz builds them.
run env RUSTFLAGS="--cfg fuzzing" cargo +nightly clippy -q --all-targets \
    --manifest-path hypervisor/fuzz/Cargo.toml --target-dir "$root/target/clippy-fuzz" -- -D warnings
exit $status
