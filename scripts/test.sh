#!/usr/bin/env bash
# gridproxy's test command, in two stages:
#
#   1 checks      fast, no peers: cargo fmt --check, cargo clippy -D warnings,
#                 cargo deny (licences, bans, sources) and the unit tests (each
#                 crate's lib, bins, doc tests and own tests/; not the
#                 end-to-end tests of gridproxy-tests)
#   2 end to end  installs what the end-to-end tests need (Debian packages, the
#                 real SRI peers and the grid peers, built once into a cache
#                 folder), then runs gridproxy-tests' end-to-end binary,
#                 tests/tests/e2e, then builds, installs and checks the
#                 Debian package (scripts/package.sh)
#
# then, opt-in, fuzzing (FUZZ_SECS). A failing stage stops the run: a format,
# lint or unit-test failure is reported before any peer is built.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # the checks, then only tests matching NAME
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
STAGE=""
STAGE_START=$SECONDS
# Every line carries the seconds since the start, so a CI log shows where the
# time went.
log() { printf '\n== [%5d s] %s\n' $((SECONDS - START)) "$*" >&2; }
stage() { # NAME: ends the running stage (with its duration) and opens NAME
  stage_end
  STAGE=$1
  STAGE_START=$SECONDS
  printf '\n==== [%5d s] stage %s\n' $((SECONDS - START)) "$STAGE" >&2
}
stage_end() {
  [ -n "$STAGE" ] || return 0
  printf '\n==== [%5d s] stage %s passed in %d s\n' $((SECONDS - START)) "$STAGE" $((SECONDS - STAGE_START)) >&2
  STAGE=""
}
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$STAGE" ]; then
    printf '\n==== [%5d s] stage %s FAILED after %d s (exit %d)\n' \
      $((SECONDS - START)) "$STAGE" $((SECONDS - STAGE_START)) "$rc" >&2
  fi
}
trap on_exit EXIT

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

# A one-off full build: incremental state would only double the target folder.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# ---------------------------------------------------------------------------
stage "1/2 checks"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

log "layout: no module cycles; the engine and a lean binary link no simulators (ARCHITECTURE.md)"
python3 scripts/module_cycles.py protocol/src proxy/src curtail/src grid/src app/src fixtures/src
for spec in "-p gridproxy-proxy" "-p gridproxy --no-default-features"; do
  # shellcheck disable=SC2086 # the spec is a list of cargo arguments
  if cargo tree $spec -e normal --prefix none | grep -q '^gridproxy-fixtures '; then
    echo "cargo tree $spec: gridproxy-fixtures is a normal dependency" >&2
    exit 1
  fi
done
if cargo tree -p gridproxy-proxy -e normal --prefix none | grep -E '^gridproxy-(curtail|grid|fixtures) |^gridproxy v' >&2; then
  echo "the engine (gridproxy-proxy) depends on a crate above it" >&2
  exit 1
fi

log "cargo deny check licenses bans sources (deny.toml; cargo-deny built once into ${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}/tools)"
bash scripts/tools.sh install
PATH="$(bash scripts/tools.sh path):$PATH"
export PATH
# advisories is left out: it fetches the advisory database over the network.
cargo deny check licenses bans sources

log "unit tests: every crate's lib, bins and doc tests, each crate's own tests/ but gridproxy-tests'"
# One test at a time, as the whole suite always ran: some unit tests time real
# sockets and timers, and 2 cores shared by parallel tests make that flaky.
# Each command selects the whole workspace (--exclude gridproxy-tests resolves
# the same features): `-p gridproxy-tests` alone would resolve other features
# (criterion's zerocopy/derive drops out) and rebuild rusqlite, rand and all
# our crates a second time.
cargo test --workspace --lib --bins -- --test-threads=1 "${filter[@]}"
cargo test --workspace --exclude gridproxy-tests --test '*' -- --test-threads=1 "${filter[@]}"
cargo test --workspace --doc -- "${filter[@]}"

# ---------------------------------------------------------------------------
stage "2/2 end to end"

log "installing test peers (cached in ${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy})"
bash scripts/peers.sh install

log "installing chromium, chromedriver and promtool (Debian) for the operate tests"
bash scripts/browser.sh install

log "installing the grid test peers: openleadr-rs VTN on PostgreSQL (built once, cached), mosquitto, pymodbus"
bash scripts/vtn.sh install
bash scripts/mosquitto.sh install
python3 -m pip install --quiet --user 'pymodbus==3.16.1'

log "cargo test: the end-to-end binary (tests/tests/e2e)"
# One test at a time: the end-to-end tests each run real pools, a proxy and
# hashing miners, and two of them at once on 2 cores makes timings flaky.
# (--workspace for the same features as stage 1's builds, see above: only
# gridproxy-tests has an e2e target.)
times=$(mktemp)
GRIDPROXY_TEST_TIMES=$times cargo test --workspace --test e2e -- --test-threads=1 "${filter[@]}"
# Where the time went (a test's module holds the gate while it runs; a
# module that runs its tests at several times is listed once per stretch).
log "slowest end-to-end modules (seconds):"
awk '{t[$2]+=$1} END {for (m in t) printf "%8.1f %s\n", t[m], m}' "$times" | sort -rn | head -15 >&2
rm -f "$times"

if [ "${#filter[@]}" -eq 0 ]; then
  log "the Debian package: built (cargo-deb), installed (dpkg -i), unit verified, installed config checked, served /healthz, stopped by SIGTERM"
  bash scripts/package.sh check
fi

stage_end

# Fuzzing needs its own instrumented release build of every crate (10-20 min
# cold on 2 cores), more than CI's time budget leaves: opt in with FUZZ_SECS.
if [ "${#filter[@]}" -eq 0 ] && [ "${FUZZ_SECS:-0}" -gt 0 ]; then
    log "fuzzing: each cargo-fuzz target for ${FUZZ_SECS} s from its committed seeds (fuzz/README.md)"
    FUZZ_TARGET_DIR="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}/fuzz-target" bash scripts/fuzz.sh "$FUZZ_SECS"
else
    log "fuzzing skipped (FUZZ_SECS=10 bash scripts/test.sh runs every target 10 s; see fuzz/README.md)"
fi
log "all stages passed"
