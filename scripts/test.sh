#!/usr/bin/env bash
# gridproxy's test command: installs what the tests need (Debian packages and
# the real SRI peers, built once into a cache folder), then runs format and
# lint checks and the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # only tests matching NAME (after the checks)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

# A one-off full build: incremental state would only double the target folder.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

log "installing test peers (cached in ${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy})"
bash scripts/peers.sh install

log "installing chromium, chromedriver and promtool (Debian) for the operate tests"
bash scripts/browser.sh install

log "installing the grid test peers: openleadr-rs VTN on PostgreSQL (built once, cached), mosquitto, pymodbus"
bash scripts/vtn.sh install
bash scripts/mosquitto.sh install
python3 -m pip install --quiet --user 'pymodbus==3.16.1'

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test"
filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi
# One test at a time: the end-to-end tests each run real pools, a proxy and
# hashing miners, and two of them at once on 2 cores makes timings flaky.
cargo test --workspace -- --test-threads=1 "${filter[@]}"

# Fuzzing needs its own instrumented release build of every crate (10-20 min
# cold on 2 cores), more than CI's time budget leaves: opt in with FUZZ_SECS.
if [ "${#filter[@]}" -eq 0 ] && [ "${FUZZ_SECS:-0}" -gt 0 ]; then
    log "fuzzing: each cargo-fuzz target for ${FUZZ_SECS} s from its committed seeds (fuzz/README.md)"
    FUZZ_TARGET_DIR="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}/fuzz-target" bash scripts/fuzz.sh "$FUZZ_SECS"
else
    log "fuzzing skipped (FUZZ_SECS=10 bash scripts/test.sh runs every target 10 s; see fuzz/README.md)"
fi
