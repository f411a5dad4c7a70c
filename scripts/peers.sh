#!/usr/bin/env bash
# Real third-party peers for gridproxy's tests: the SRI pool, translator and
# mining_device. `install` builds them once into a cache folder outside the repo
# (skipped when present); `up`/`down` start and stop them by pid.
set -euo pipefail

CACHE="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}"
PEERS_BIN="$CACHE/peers/bin"
export CARGO_TARGET_DIR="$CACHE/peers-target"

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
  cargo install --locked --root "$CACHE/peers" --version "$version" "$crate" --bin "$bin" \
    || cargo install --root "$CACHE/peers" --version "$version" "$crate" --bin "$bin"
}

cmd_install() {
  apt_deps
  mkdir -p "$PEERS_BIN"
  install_one pool_sv2 "$POOL_VERSION" pool_sv2
  install_one translator_sv2 "$TRANSLATOR_VERSION" translator_sv2
  install_one integration_tests_sv2 "$ITESTS_VERSION" mining_device
  log "peers ready in $PEERS_BIN"
}

cmd_path() { echo "$PEERS_BIN"; }

case "${1:-}" in
  install) cmd_install ;;
  path) cmd_path ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
