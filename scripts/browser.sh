#!/usr/bin/env bash
# Tools the operate tests need from Debian: headless Chromium with its
# WebDriver (the dashboard test) and promtool (the /metrics format check).
#
#   scripts/browser.sh install   # apt-get install what is missing (sudo when not root)
#   scripts/browser.sh check     # exit 0 when everything is present, else list what is missing
#   scripts/browser.sh paths     # print the paths the tests use
#
# The tests find the binaries through CHROMIUM, CHROMEDRIVER and PROMTOOL
# (defaults: /usr/bin/chromium, /usr/bin/chromedriver, /usr/bin/promtool).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
PROMTOOL="${PROMTOOL:-/usr/bin/promtool}"

missing() {
  local m=()
  [ -x "$CHROMIUM" ] || m+=(chromium)
  [ -x "$CHROMEDRIVER" ] || m+=(chromium-driver)
  [ -x "$PROMTOOL" ] || m+=(prometheus)
  echo "${m[@]:-}"
}

case "${1:-install}" in
  install)
    need="$(missing)"
    if [ -z "$need" ]; then
      echo "browser.sh: chromium, chromedriver and promtool present"
      exit 0
    fi
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "browser.sh: installing $need" >&2
    $sudo apt-get update -qq
    # prometheus pulls no daemon start in containers without systemd; we only use promtool.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
    still="$(missing)"
    if [ -n "$still" ]; then
      echo "browser.sh: still missing after install: $still" >&2
      exit 1
    fi
    echo "browser.sh: installed $need"
    ;;
  check)
    need="$(missing)"
    if [ -n "$need" ]; then echo "missing: $need"; exit 1; fi
    echo "ok"
    ;;
  paths)
    echo "CHROMIUM=$CHROMIUM"
    echo "CHROMEDRIVER=$CHROMEDRIVER"
    echo "PROMTOOL=$PROMTOOL"
    ;;
  *)
    echo "usage: $0 install|check|paths" >&2
    exit 2
    ;;
esac
