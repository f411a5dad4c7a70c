#!/usr/bin/env bash
# Real third-party peers for gridproxy's tests: the SRI pool, translator and
# mining_device. `install` builds them once into a cache folder outside the repo
# (skipped when present); `up`/`down` start and stop the fixture TP, the pool and (if
# installed) the translator by pid, on loopback, for manual runs.
set -euo pipefail

CACHE="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}"
PEERS_BIN="$CACHE/peers/bin"
PEERS_TARGET="$CACHE/peers-target"

POOL_VERSION=0.7.0
TRANSLATOR_VERSION=0.6.0
ITESTS_VERSION=0.6.0

log() { printf '[peers] %s\n' "$*" >&2; }

apt_deps() {
  local missing=()
  for p in capnproto libcapnp-dev pkg-config libssl-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
}

install_one() { # crate version bin
  local crate=$1 version=$2 bin=$3
  if [ -x "$PEERS_BIN/$bin" ]; then
    log "$bin present ($PEERS_BIN/$bin), skipping build"
    return
  fi
  log "building $bin from $crate $version (cold: several minutes)"
  # cargo caches its rustc probe in the target folder, failures too: a probe
  # that once read junk on stdin failed every later build. Probe afresh, with
  # nothing on stdin.
  rm -f "$PEERS_TARGET/.rustc_info.json"
  CARGO_TARGET_DIR="$PEERS_TARGET" cargo install --locked --root "$CACHE/peers" --version "$version" "$crate" --bin "$bin" </dev/null \
    || CARGO_TARGET_DIR="$PEERS_TARGET" cargo install --root "$CACHE/peers" --version "$version" "$crate" --bin "$bin" </dev/null
}

cmd_install() {
  apt_deps
  mkdir -p "$PEERS_BIN"
  install_one pool_sv2 "$POOL_VERSION" pool_sv2
  install_one translator_sv2 "$TRANSLATOR_VERSION" translator_sv2
  install_one integration_tests_sv2 "$ITESTS_VERSION" mining_device
  # The three builds share one target folder (common dependencies build once);
  # only the installed binaries are kept, a CI disk is small.
  [ "${PEERS_KEEP_TARGET:-0}" = 1 ] || rm -rf "$PEERS_TARGET"
  log "peers ready in $PEERS_BIN"
}

cmd_path() { echo "$PEERS_BIN"; }

# --- up/down: mock TP + pool_sv2 (+ translator_sv2) on fixed loopback ports -------------
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${GRIDPROXY_PEERS_STATE:-$CACHE/run}"
TP_PORT="${TP_PORT:-18442}"
POOL_PORT="${POOL_PORT:-13333}"
POOL_MON_PORT="${POOL_MON_PORT:-19090}"
TPROXY_PORT="${TPROXY_PORT:-13334}"
TPROXY_MON_PORT="${TPROXY_MON_PORT:-19092}"
# SRI's published example authority pair (test key).
AUTH_PUB="9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72"
AUTH_SEC="mkDLTBBRxdBv998612qipDYoTK3YUrqLe8uWw7gu3iXbSrn2n"

fill() { # template out KEY=VALUE...
  local tpl=$1 out=$2; shift 2
  local args=()
  for kv in "$@"; do args+=(-e "s|{{${kv%%=*}}}|${kv#*=}|g"); done
  sed "${args[@]}" "$tpl" > "$out"
  if grep -v '^\s*#' "$out" | grep -q '{{'; then log "unfilled placeholder in $out"; exit 1; fi
}

wait_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

start_bg() { # name logfile cmd...
  local name=$1 logf=$2; shift 2
  "$@" >"$logf" 2>&1 &
  echo $! >"$STATE/$name.pid"
  log "$name started (pid $!, log $logf)"
}

cmd_up() {
  mkdir -p "$STATE"
  if [ -n "$(ls "$STATE"/*.pid 2>/dev/null)" ]; then log "already up? run '$0 down' first"; exit 1; fi
  [ -x "$PEERS_BIN/pool_sv2" ] || { log "pool_sv2 missing: run '$0 install'"; exit 1; }
  # Stray POOL__/TPROXY__ overrides in the caller's shell must not reach the peers.
  local v
  for v in $(compgen -e | grep -E '^(POOL|TPROXY)__' || true); do unset "$v"; done
  local repo_target="${CARGO_TARGET_DIR_REPO:-$REPO/target}"
  (cd "$REPO" && CARGO_TARGET_DIR="$repo_target" cargo build -q -p gridproxy-fixtures --bin mock_tp)
  local tp_bin="$repo_target/debug/mock_tp"
  start_bg mock_tp "$STATE/mock_tp.log" "$tp_bin" --bind "127.0.0.1:$TP_PORT"
  wait_port "$TP_PORT" 10 || { log "mock TP did not listen"; cmd_down; exit 1; }

  fill "$REPO/peers/pool.toml.in" "$STATE/pool.toml" \
    AUTHORITY_PUBLIC_KEY="$AUTH_PUB" AUTHORITY_SECRET_KEY="$AUTH_SEC" \
    LISTEN="127.0.0.1:$POOL_PORT" SHARES_PER_MINUTE=60.0 SHARE_BATCH_SIZE=1 \
    MONITORING="127.0.0.1:$POOL_MON_PORT" TP_ADDRESS="127.0.0.1:$TP_PORT" \
    TP_AUTHORITY_PUBLIC_KEY="$AUTH_PUB"
  start_bg pool_sv2 "$STATE/pool.log" env NO_COLOR=1 "$PEERS_BIN/pool_sv2" -c "$STATE/pool.toml"
  wait_port "$POOL_PORT" 30 || { log "pool did not listen"; cmd_down; exit 1; }

  if [ -x "$PEERS_BIN/translator_sv2" ]; then
    fill "$REPO/peers/translator.toml.in" "$STATE/translator.toml" \
      SV1_PORT="$TPROXY_PORT" EXTRANONCE2_SIZE=4 AGGREGATE_CHANNELS=true \
      MONITORING="127.0.0.1:$TPROXY_MON_PORT" MIN_HASHRATE=100000.0 SHARES_PER_MINUTE=30.0 \
      ENABLE_VARDIFF=false POOL_HOST=127.0.0.1 POOL_PORT="$POOL_PORT" \
      POOL_AUTHORITY_PUBLIC_KEY="$AUTH_PUB" USER_IDENTITY=gridproxy-manual
    start_bg translator_sv2 "$STATE/translator.log" env NO_COLOR=1 \
      "$PEERS_BIN/translator_sv2" -c "$STATE/translator.toml"
    wait_port "$TPROXY_PORT" 30 || { log "translator did not listen"; cmd_down; exit 1; }
  fi
  echo "TP      127.0.0.1:$TP_PORT"
  echo "pool    127.0.0.1:$POOL_PORT (authority $AUTH_PUB, metrics http://127.0.0.1:$POOL_MON_PORT/metrics)"
  [ -f "$STATE/translator_sv2.pid" ] && echo "tproxy  127.0.0.1:$TPROXY_PORT (SV1)"
  echo "logs    $STATE/*.log"
}

cmd_down() {
  local f pid
  for f in "$STATE"/translator_sv2.pid "$STATE"/pool_sv2.pid "$STATE"/mock_tp.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then log "stopped $(basename "$f" .pid) (pid $pid)"; fi
    rm -f "$f"
  done
}

case "${1:-}" in
  install) cmd_install ;;
  path) cmd_path ;;
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: $0 install|path|up|down" >&2; exit 2 ;;
esac
