#!/usr/bin/env bash
# The Debian package, built and checked as an operator would meet it:
#
#   scripts/package.sh build   # target/debian/gridproxy_<version>-1_<arch>.deb
#   scripts/package.sh check   # build, dpkg -i it, systemd-analyze verify the
#                              # unit, check-config the installed config, run
#                              # the installed binary as its user until
#                              # /healthz answers 200, then SIGTERM: exit 0
#
# `check` installs the package system-wide (root, as the test command's other
# Debian packages are). The package is made from the workspace's debug build
# (the one the tests use) so that CI does not build everything again in
# release; a release package is `cargo deb -p gridproxy` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[package] %s\n' "$*" >&2; }

cmd_build() {
  bash scripts/tools.sh install
  PATH="$(bash scripts/tools.sh path):$PATH"
  cargo build --quiet -p gridproxy --bin gridproxy
  rm -rf target/debian
  # cargo-deb warns that a dev profile is not what releases are made of.
  cargo deb -p gridproxy --profile dev --no-build --fast -o target/debian/ 2>&1 \
    | grep -v 'dev profile is not supported\|To enable debug symbols set' >&2 || true
  ls target/debian/gridproxy_*.deb
}

cmd_check() {
  local deb
  deb=$(cmd_build | tail -1)
  [ -f "$deb" ] || { echo "package.sh: no package built" >&2; exit 1; }
  local need=()
  command -v systemd-analyze >/dev/null || need+=(systemd)
  command -v adduser >/dev/null || need+=(adduser)
  command -v curl >/dev/null || need+=(curl)
  if [ "${#need[@]}" -gt 0 ]; then
    log "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  log "dpkg -i $deb"
  dpkg -i "$deb" >/dev/null
  log "systemd-analyze verify gridproxy.service"
  local unit=/usr/lib/systemd/system/gridproxy.service
  # --man=no: the unit's Documentation= names a file, not a man page.
  systemd-analyze verify --man=no "$unit"
  log "installed: $(/usr/bin/gridproxy --version); user $(id gridproxy)"
  log "gridproxy check-config (the installed /etc/gridproxy/gridproxy.toml, as user gridproxy)"
  (cd /var/lib/gridproxy 2>/dev/null || cd /; runuser -u gridproxy -- /usr/bin/gridproxy check-config)
  log "gridproxy run as user gridproxy until /healthz answers"
  local out
  out=$(mktemp)
  # setpriv execs (runuser would stay as a parent and turn SIGTERM into 143).
  setpriv --reuid=gridproxy --regid=gridproxy --init-groups /usr/bin/gridproxy run >"$out" 2>&1 &
  local pid=$!
  local code=000
  for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/healthz || true)
    [ "$code" = 200 ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ "$code" != 200 ]; then
    kill "$pid" 2>/dev/null || true
    cat "$out" >&2
    echo "package.sh: the installed gridproxy did not answer /healthz with 200 (got $code)" >&2
    exit 1
  fi
  log "/healthz: 200; SIGTERM"
  kill -TERM "$pid"
  local rc=0
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$out" >&2
    echo "package.sh: the installed gridproxy exited $rc after SIGTERM" >&2
    exit 1
  fi
  rm -f "$out"
  log "package ok: installed, unit verified, config valid, served /healthz, stopped cleanly"
}

case "${1:-}" in
  build) cmd_build ;;
  check) cmd_check ;;
  *) echo "usage: $0 build|check" >&2; exit 2 ;;
esac
