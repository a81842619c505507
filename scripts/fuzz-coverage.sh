#!/usr/bin/env bash
# Which functions and lines of the code guests and boot input reach (stage2/, frame/, vm/, dt/,
# esr.rs, memmap.rs) the fuzz corpora execute (see docs/fuzzing.md, "Coverage").
#
#   scripts/fuzz-coverage.sh [TARGET...]      default: every target in hypervisor/fuzz/fuzz_targets
#
# Each target is built with `-C instrument-coverage` (`cargo fuzz coverage`) and run once over
# its corpora: the grown working corpus (hypervisor/fuzz/work/TARGET, if any), the seeds and the
# regressions. The profiles are merged with Debian's llvm-22 tools: the rustup nightly's LLVM
# is 22 as well, and rustup cannot install its own llvm-tools here. Output, in
# hypervisor/fuzz/coverage/ (git-ignored):
#   summary.txt     per-file regions, functions and lines covered, all targets together
#   unreached.txt   per file, the functions never run and the line ranges never run
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/hypervisor/fuzz"
src="$root/hypervisor/src"
llvm="${LLVM_BIN:-/usr/lib/llvm-22/bin}"
out="$fuzz_dir/coverage"

if [[ ! -x "$llvm/llvm-cov" || ! -x "$llvm/llvm-profdata" ]]; then
    echo "fuzz-coverage.sh: installing llvm-22 (llvm-cov, llvm-profdata)" >&2
    apt-get install -y --no-install-recommends llvm-22 >/dev/null
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    (cd / && cargo +nightly install cargo-fuzz --locked)
fi

targets=("$@")
if (( ${#targets[@]} == 0 )); then
    for f in "$fuzz_dir"/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

target_dir="$fuzz_dir/target/coverage"
bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
objects=()
profiles=()
mkdir -p "$out"
for t in "${targets[@]}"; do
    corpora=()
    # A snapshot of the working corpus: a campaign running beside this run replaces its files.
    rm -rf "$out/work-$t"
    if [[ -d "$fuzz_dir/work/$t" ]]; then
        cp -r "$fuzz_dir/work/$t" "$out/work-$t" 2>/dev/null || true # files replaced meanwhile
        corpora+=("$out/work-$t")
    fi
    for d in "$fuzz_dir/corpus/$t" "$fuzz_dir/regressions/$t"; do
        [[ -d "$d" ]] && corpora+=("$d")
    done
    echo "fuzz-coverage.sh: $t over ${corpora[*]#"$root/"}" >&2
    cargo +nightly fuzz coverage --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --llvm-path "$llvm" \
        "$t" "${corpora[@]}" >"$out/$t.log" 2>&1 || { grep -av '^Running\|^Executed' "$out/$t.log" | cut -c1-300 | tail -20 >&2; exit 1; }
    objects+=(-object "$bin_dir/$t")
    profiles+=("$out/$t/coverage.profdata")
done

"$llvm/llvm-profdata" merge -sparse "${profiles[@]}" -o "$out/all.profdata"
sources=("$src/stage2" "$src/frame" "$src/vm" "$src/dt" "$src/esr.rs" "$src/memmap.rs")
# The first object is positional for llvm-cov.
"$llvm/llvm-cov" report "${objects[@]:1}" -instr-profile "$out/all.profdata" "${sources[@]}" \
    | sed "s#$root/##" >"$out/summary.txt"
"$llvm/llvm-cov" export -format=text "${objects[@]:1}" -instr-profile "$out/all.profdata" "${sources[@]}" \
    | python3 -c '
import json, sys
root = sys.argv[1] + "/"
data = json.load(sys.stdin)["data"][0]
never = {}
for f in data["functions"]:
    if f["count"] == 0 and f["filenames"]:
        never.setdefault(f["filenames"][0], []).append(f["name"])
for f in sorted(data["files"], key=lambda f: f["filename"]):
    name = f["filename"].replace(root, "")
    # Segments: [line, col, count, has_count, is_region_entry, is_gap]; a line is unreached
    # when a counted segment starting on it has count 0 and none has more.
    seen = {}
    for line, _col, count, has_count, _entry, gap in f["segments"]:
        if has_count and not gap:
            seen[line] = max(seen.get(line, 0), count)
    zero = sorted(l for l, c in seen.items() if c == 0)
    ranges, start, prev = [], None, None
    for l in zero:
        if start is None or l != prev + 1:
            if start is not None:
                ranges.append((start, prev))
            start = l
        prev = l
    if start is not None:
        ranges.append((start, prev))
    funcs = never.get(f["filename"], [])
    if not ranges and not funcs:
        continue
    lines = f["summary"]["lines"]
    print(name + ": %d/%d lines" % (lines["covered"], lines["count"]))
    for n in sorted(set(funcs)):
        print(f"    never run: {n}")
    if ranges:
        print("    lines never run: " + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges))
' "$root" | "$llvm/llvm-cxxfilt" -n >"$out/unreached.txt"
cat "$out/summary.txt"
echo "fuzz-coverage.sh: unreached functions and lines in ${out#"$root/"}/unreached.txt" >&2
