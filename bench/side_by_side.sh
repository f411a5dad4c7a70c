#!/usr/bin/env bash
# Side by side: the same SV1 load on gridproxy and on SRI's translator_sv2, both
# upstream to the real pool_sv2 (fixture mock TP), one after the other in one
# run so they do not compete for the cores. Prints each one's accepted shares/s,
# CPU per accepted share (utime+stime over a steady window, ramp excluded), RSS
# per miner and submit latency, then the ratios. Loopback only.
#
#   bash bench/side_by_side.sh [MINERS] [RATE_PER_MINER] [SECONDS]   # default 1000 1 30
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; RATE=${2:-1}; SECS=${3:-30}
[ "$N" -le 19000 ] || { echo "at most 19000 miners"; exit 2; }
[ "$SECS" -ge 15 ] || { echo "at least 15 seconds (warm-up and a steady window)"; exit 2; }
bash scripts/peers.sh install >/dev/null
BIN="$(bash scripts/peers.sh path)"
for b in pool_sv2 translator_sv2; do [ -x "$BIN/$b" ] || { echo "FAIL: $BIN/$b missing (scripts/peers.sh install)"; exit 1; }; done
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -q -p gridproxy -p gridproxy-fixtures
R=target/release
run=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
. bench/lib.sh
ulimit -n 20000 2>/dev/null || true
procs=$(( (N + 4999) / 5000 ))
echo "load: $(uptime)"
start_pool
start_gridproxy
gp=$(measure gridproxy "$GP_PID" "$GP_PORT" "$N" "$RATE" "$SECS" "$procs" 5)
echo "$gp"
kill "$GP_PID"; wait "$GP_PID" 2>/dev/null || true
start_translator
tp=$(measure translator "$TPX_PID" "$TPX_PORT" "$N" "$RATE" "$SECS" "$procs" 5)
echo "$tp"
grep -ciE "panick" "$run/translator.log" "$run/gridproxy.log" >/dev/null && echo "note: a panic was logged"
python3 - "$gp" "$tp" "$N" <<'PY'
import re, sys
g, t = (dict(re.findall(r"(\w+)=([\d.]+)", s)) for s in sys.argv[1:3])
n = int(sys.argv[3])
for who, f in (("gridproxy", g), ("translator", t)):
    if int(f["held"]) < n:
        print(f"WARNING: {who} held {f['held']} of {n} miners")
r = lambda k, inv=False: (float(t[k]) / float(g[k]) if inv else float(g[k]) / float(t[k])) if float(g[k]) and float(t[k]) else float("nan")
print(f"ratio (gridproxy vs translator, >1 = gridproxy better): "
      f"accepted_shares_per_s={r('acc_per_s'):.2f}x cpu_per_share={r('cpu_us_per_share', True):.2f}x "
      f"rss_per_miner={r('rss_per_miner_kib', True):.2f}x p99={r('p99_us', True):.2f}x")
print(f"targets: shares/s >= 5x: {r('acc_per_s') >= 5}; cpu/share <= 5 us: {float(g['cpu_us_per_share']) <= 5}; "
      f"rss/miner <= 1/5: {r('rss_per_miner_kib', True) >= 5}; p99 < {100 if n <= 1000 else 200} us: {float(g['p99_us']) < (100 if n <= 1000 else 200)}")
PY
