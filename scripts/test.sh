#!/usr/bin/env bash
# Every test Labyrinth has, in one command (the README's; .ci/run calls exactly this):
#   1. host unit, property, stress and regression tests of the portable core and of the guest
#      kernels' runtime (cargo test),
#      and the loom model checks of the lock-free paths (frame pools, the vCPU lifecycle, PSCI
#      power states, the vGIC's SGI mailboxes),
#   2. QEMU boot tests that assert on the console (scripts/boot_tests.py), with Labyrinth's
#      guest kernels (scripts/build-guests.sh) for the two-guest scenarios and Debian's arm64
#      Linux (scripts/fetch-linux.sh, downloaded once into build/) for the Linux guest,
#   3. fuzz smoke runs (cargo fuzz, nightly) of the device-tree parser, the stage-2 tables, the
#      frame manager, trap decoding, system-register classification, the PL011 and the exit
#      path, after the corpus replay in (1),
# and before them the hygiene checks: formatting and clippy (scripts/lint.sh), every benchmark
# run once, every fuzz target built, an aarch64 build without warnings.
# Installs what is missing first. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

status=0
passed=0
failed=0
step() {
    local name=$1; shift
    echo "== $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        echo "== $name: FAILED"
        status=1
        failed=$((failed + 1))
    fi
}

# Warnings in the aarch64-only code (the arch edge, the wiring) fail the build step: host clippy
# cannot see that code (docs/testing.md).
no_warnings() {
    local log
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if grep -q '^warning' "$log"; then
        echo "test: $* printed warnings" >&2
        rc=1
    fi
    rm -f "$log"
    return "$rc"
}

step "formatting and lints (rustfmt, clippy)" timeout 1200 scripts/lint.sh
step "host tests" timeout 1200 cargo test --workspace
# The guest kernels' runtime (its own workspace): bootargs, ranges, device-tree reading.
step "guest runtime host tests" timeout 600 bash -c 'cd guest-images && cargo test -q -p guest-rt'
# Criterion runs each benchmark once in test mode: a benchmark that no longer builds or runs fails.
step "benchmarks, once each" timeout 600 cargo test -q -p labyrinth --benches
step "loom model checks (frame pools, stage-2 installs, vCPU lifecycle, PSCI, vGIC mailboxes)" env RUSTFLAGS="--cfg loom" \
    timeout 1200 cargo test --release -p labyrinth --lib loom --target-dir target/loom
step "build (aarch64)" no_warnings scripts/build.sh
step "fetch the Linux guest kernel and busybox" scripts/fetch-linux.sh
step "build guest kernels" scripts/build-guests.sh
step "downloads authenticated (tampering refused)" timeout 300 python3 scripts/fetch_tests.py
step "QEMU boot tests" timeout 1800 python3 scripts/boot_tests.py
step "fuzz targets build" timeout 900 scripts/fuzz.sh --build-all
step "device-tree fuzz smoke" timeout 600 scripts/fuzz.sh dt_parse "${FUZZ_SECONDS:-30}"
step "stage-2 fuzz smoke" timeout 600 scripts/fuzz.sh stage2_ops "${FUZZ_SECONDS:-30}"
step "frame manager fuzz smoke" timeout 600 scripts/fuzz.sh frame_ops "${FUZZ_GUEST_SECONDS:-20}"
step "trap decoding fuzz smoke" timeout 600 scripts/fuzz.sh trap_decode "${FUZZ_GUEST_SECONDS:-20}"
step "system register fuzz smoke" timeout 600 scripts/fuzz.sh sysreg "${FUZZ_GUEST_SECONDS:-20}"
step "PL011 fuzz smoke" timeout 600 scripts/fuzz.sh vpl011 "${FUZZ_GUEST_SECONDS:-20}"
step "exit path fuzz smoke" timeout 600 scripts/fuzz.sh exit_path "${FUZZ_GUEST_SECONDS:-20}"

echo "steps: $passed passed, $failed failed"
exit $status
