#!/usr/bin/env bash
# Time-limited fuzz run of one of Labyrinth's cargo-fuzz targets (see docs/fuzzing.md).
#
#   scripts/fuzz.sh [TARGET] [SECONDS] [extra libFuzzer flags...]
#   scripts/fuzz.sh --build-all     builds every target, runs none
#
# TARGET defaults to dt_parse, SECONDS to 60. Installs cargo-fuzz if missing. Seeds come from
# hypervisor/fuzz/corpus/TARGET and hypervisor/fuzz/regressions/TARGET (both read-only); new
# inputs go to hypervisor/fuzz/work/TARGET (git-ignored, kept between runs). Exits 1 if
# libFuzzer finds a crash, a hang or a leak (the input is then in hypervisor/fuzz/artifacts/TARGET/),
# 2 on bad arguments, 3 if the target does not build. FUZZ_SANITIZER=address turns ASan on.
set -euo pipefail

# Targets whose input is op codes and small numbers, with nothing for libFuzzer's comparison
# tracing to solve, and which run a checking model whose every comparison would be traced
# (3x slower): built without `-sanitizer-coverage-trace-compares`, into their own target
# directory so the two kinds of build do not rebuild each other. They are also built at
# coverage level 3 (edges) instead of cargo-fuzz's 4 (edges and indirect calls): libFuzzer
# uses the indirect-call trace only with -use_value_profile=1, which these runs do not set,
# so it was a call per closure call for nothing.
FAST_TARGETS=(stage2_ops frame_ops)
FAST_RUSTFLAGS="-Cllvm-args=-sanitizer-coverage-level=3"

is_fast() {
    local t
    for t in "${FAST_TARGETS[@]}"; do [[ "$t" == "$1" ]] && return 0; done
    return 1
}

# cargo fuzz build/run options for target $1 (in the array `build`).
build_options() {
    build=(--fuzz-dir "$fuzz_dir" --sanitizer "${FUZZ_SANITIZER:-none}")
    # cargo-fuzz appends RUSTFLAGS to its own flags: the later level wins.
    flags_env=(RUSTFLAGS="${RUSTFLAGS:-}")
    if is_fast "$1"; then
        build+=(--no-trace-compares --target-dir "$fuzz_dir/target/fast")
        flags_env=(RUSTFLAGS="${RUSTFLAGS:-} $FAST_RUSTFLAGS")
    fi
}

# The longest input worth mutating: a stage-2 sequence stops after its 64th operation, a frame
# sequence after its 64th (a configuration byte, then 4 bytes an operation), a trap is three
# registers, a UART run a few hundred accesses.
max_len() {
    case "$1" in
        stage2_ops) echo 512 ;;
        frame_ops) echo 257 ;;
        trap_decode) echo 24 ;;
        sysreg) echo 64 ;;
        vpl011) echo 4096 ;;
        *) echo 16384 ;;
    esac
}

# cargo-fuzz needs the nightly toolchain; `+nightly` overrides the repo's rust-toolchain.toml.
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (about a minute)" >&2
    (cd / && cargo +nightly install cargo-fuzz --locked)
fi

if [[ "${1:-}" == --build-all ]]; then
    fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/hypervisor/fuzz"
    cargo +nightly fuzz build --fuzz-dir "$fuzz_dir" --sanitizer "${FUZZ_SANITIZER:-none}"
    for t in "${FAST_TARGETS[@]}"; do
        build_options "$t"
        env "${flags_env[@]}" cargo +nightly fuzz build "${build[@]}" "$t"
    done
    exit 0
fi

target="${1:-dt_parse}"
seconds="${2:-60}"
shift $(( $# > 2 ? 2 : $# ))

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/hypervisor/fuzz"
cd "$root"

if [[ ! -f "$fuzz_dir/fuzz_targets/$target.rs" ]]; then
    echo "fuzz.sh: no fuzz target '$target' in $fuzz_dir/fuzz_targets" >&2
    exit 2
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || (( seconds < 1 )); then
    echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2
    exit 2
fi

work="$fuzz_dir/work/$target"
seeds="$fuzz_dir/corpus/$target"
regressions="$fuzz_dir/regressions/$target"
mkdir -p "$work" "$seeds" "$regressions"

flags=(-max_total_time="$seconds" -timeout=10 -max_len="$(max_len "$target")" -print_final_stats=1)
if [[ -f "$fuzz_dir/$target.dict" ]]; then
    flags+=(-dict="$fuzz_dir/$target.dict")
fi

# The code is safe Rust: AddressSanitizer finds nothing there and halves the speed, so it is off
# unless FUZZ_SANITIZER (address, memory, thread, leak) asks for it.
build_options "$target"

# Build first, so that a compile error is not reported as a crash.
if ! env "${flags_env[@]}" cargo +nightly fuzz build "${build[@]}" "$target"; then
    echo "fuzz.sh: building $target FAILED (the crate does not compile); nothing was fuzzed" >&2
    exit 3
fi

echo "fuzz.sh: $target for ${seconds}s (seeds: $seeds, $regressions; work corpus: $work)" >&2
status=0
env "${flags_env[@]}" cargo +nightly fuzz run "${build[@]}" "$target" \
    "$work" "$seeds" "$regressions" -- "${flags[@]}" "$@" || status=$?

if (( status != 0 )); then
    echo >&2
    echo "fuzz.sh: $target FAILED (exit $status). The input is in $fuzz_dir/artifacts/$target/." >&2
    echo "fuzz.sh: fix the bug, then copy the input to $regressions/ (cargo test replays it)." >&2
fi
exit "$status"
