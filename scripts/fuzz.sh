#!/usr/bin/env bash
# Build the cargo-fuzz targets (fuzz/) and run each for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Stable toolchain only: cargo-fuzz passes nightly flags (-Zsanitizer=...),
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. Each target starts
# from its committed seeds (fuzz/corpus/<target>, read-only) plus a scratch
# corpus (fuzz/work/<target>, gitignored). Exits non-zero on any crash, leak,
# timeout or failed invariant; the input is left in fuzz/artifacts/<target>/.
set -euo pipefail

SECS="${1:-20}"
shift || true
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
# Sanitizer: address by default; FUZZ_SANITIZER=none for speed.
SAN="${FUZZ_SANITIZER:-address}"
# Build directory (FUZZ_TARGET_DIR, e.g. a fresh one for a cold build).
TDIR="${FUZZ_TARGET_DIR:-fuzz/target}"
START=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir fuzz)
fi
if [ "${#TARGETS[@]}" -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found" >&2
    exit 1
fi

# All targets in one build (they share every dependency).
cargo fuzz build --fuzz-dir fuzz -s "$SAN" --target-dir "$TDIR"
BUILT=$(date +%s)
echo "fuzz: build took $((BUILT - START)) s"

# Run the built binaries directly: `cargo fuzz run` would rebuild whenever
# a source file changed since the build.
BIN="$TDIR/$(rustc -vV | sed -n 's/^host: //p')/release"
passed=0
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/work/$t.log"
    echo "== $t (${SECS}s)"
    if "$BIN/$t" "fuzz/work/$t" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1; then
        # libFuzzer's closing lines: "Done N runs in S second(s)" and stat::*.
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
        rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo 0)
        grep -E '^Done [0-9]+ runs' "$log" || true
        echo "$t: ok executions=$runs exec/s=$rate cov=$cov"
        passed=$((passed + 1))
    else
        echo "$t: FAILED (log: $log)" >&2
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|deadly signal' "$log" | head -n 20 >&2 || true
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed; build $((BUILT - START)) s, runs $(($(date +%s) - BUILT)) s"
[ "$failed" -eq 0 ]
