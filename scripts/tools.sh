#!/usr/bin/env bash
# Cargo tools the checks use (cargo-deny, cargo-deb), built once from crates.io into
# the same cache folder as the test peers (scripts/peers.sh), skipped when present.
#
#   scripts/tools.sh install   # build what is missing (cold: several minutes)
#   scripts/tools.sh path      # print the folder to put on PATH
#
# scripts/test.sh runs `install`, then puts `path` first on PATH.
set -euo pipefail

CACHE="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}"
TOOLS_BIN="$CACHE/tools/bin"

# Pinned so that CI and every developer run the same checks; --locked builds the
# tool with the dependency versions its release was tested with.
CARGO_DENY_VERSION=0.20.2
CARGO_DEB_VERSION=3.6.3

log() { printf '[tools] %s\n' "$*" >&2; }

install_one() { # crate version bin
  local crate=$1 version=$2 bin=$3
  if [ -x "$TOOLS_BIN/$bin" ] && "$TOOLS_BIN/$bin" --version 2>/dev/null | grep -qF "$version"; then
    log "$bin $version present ($TOOLS_BIN/$bin), skipping build"
    return
  fi
  log "building $bin $version from crates.io (cold: several minutes)"
  # cargo install builds in a temporary target folder and removes it: only
  # the binary stays in the cache.
  cargo install --locked --root "$CACHE/tools" --version "$version" "$crate" --bin "$bin"
}

cmd_install() {
  mkdir -p "$TOOLS_BIN"
  install_one cargo-deny "$CARGO_DENY_VERSION" cargo-deny
  install_one cargo-deb "$CARGO_DEB_VERSION" cargo-deb
  log "tools ready in $TOOLS_BIN"
}

cmd_path() { echo "$TOOLS_BIN"; }

case "${1:-}" in
  install) cmd_install ;;
  path) cmd_path ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
