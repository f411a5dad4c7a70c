#!/usr/bin/env bash
# Side by side: the same SV1 load on gridproxy and on SRI's translator_sv2, both
# upstream to the real pool_sv2 (fixture mock TP), one after the other in one
# run so they do not compete for the cores. Prints each one's accepted shares/s,
# CPU per accepted share (utime+stime over a steady window, ramp excluded), RSS
# per miner and submit latency, then the ratios, for a fixed load (MINERS at
# RATE each) and for a closed-loop maximum (MAX_CONNECTIONS connections with
# MAX_INFLIGHT submits outstanding each, default 100 x 16). Loopback only.
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
MAXC=${MAX_CONNECTIONS:-100}; MAXQ=${MAX_INFLIGHT:-16}
echo "load: $(uptime)"
start_pool

# Two phases, each on gridproxy then translator_sv2 (never both at once):
#  fixed: N miners at RATE shares/s each -> RSS per miner, CPU per share, p99;
#  max:   MAXC connections, each closed-loop with MAXQ submits outstanding ->
#         the most accepted shares/s each proxy answers on these cores.
# gridproxy's per-connection flood limit (200/s) is lifted for the max phase
# only; translator_sv2 has none.
phase() { # fixed|max
  local gp tp
  if [ "$1" = max ]; then export INFLIGHT=$MAXQ GP_SUBMITS_PER_SECOND=1000000; n=$MAXC; p=1
  else export INFLIGHT=0 GP_SUBMITS_PER_SECOND=200; n=$N; p=$procs; fi
  start_gridproxy
  gp=$(measure "gridproxy_$1" "$GP_PID" "$GP_PORT" "$n" "$RATE" "$SECS" "$p" 5)
  echo "$gp"
  kill "$GP_PID"; wait "$GP_PID" 2>/dev/null || true
  start_translator
  tp=$(measure "translator_$1" "$TPX_PID" "$TPX_PORT" "$n" "$RATE" "$SECS" "$p" 5)
  echo "$tp"
  kill "$TPX_PID"; wait "$TPX_PID" 2>/dev/null || true
  fl="floor=none"
  if [ "$1" = fixed ]; then
    # The same load on a responder that does nothing (fixtures sv1_floor): the
    # latency the load tool, kernel and machine add under any proxy.
    local fport; fport=$(port)
    $R/sv1_floor --bind 127.0.0.1:$fport > "$run/floor.log" 2>&1 &
    local fpid=$!
    wait_log "$run/floor.log" "listening" 10
    fl=$(measure "floor_$1" "$fpid" "$fport" "$n" "$RATE" "$SECS" "$p" 5)
    echo "$fl"
    kill "$fpid"; wait "$fpid" 2>/dev/null || true
  fi
  grep -ciE "panick" "$run/translator.log" "$run/gridproxy.log" >/dev/null && echo "note: a panic was logged"
  python3 - "$gp" "$tp" "$n" "$1" "$fl" <<'PY'
import re, sys
g, t = (dict(re.findall(r"(\w+)=([\d.]+)", s)) for s in sys.argv[1:3])
n, phase = int(sys.argv[3]), sys.argv[4]
fl = dict(re.findall(r"(\w+)=([\d.]+)", sys.argv[5]))
for who, f in (("gridproxy", g), ("translator", t)):
    if int(f["held"]) < n:
        print(f"WARNING: {who} held {f['held']} of {n} miners")
r = lambda k, inv=False: (float(t[k]) / float(g[k]) if inv else float(g[k]) / float(t[k])) if float(g[k]) and float(t[k]) else float("nan")
if phase == "fixed":
    print(f"ratio fixed load ({n} miners, >1 = gridproxy better): "
          f"cpu_per_share={r('cpu_us_per_share', True):.2f}x rss_per_miner={r('rss_per_miner_kib', True):.2f}x p99={r('p99_us', True):.2f}x "
          f"(accepted shares/s {r('acc_per_s'):.2f}x: the load is fixed)")
    if "p99_us" in fl:
        print(f"floor (sv1_floor, answers without work): p50 {fl['p50_us']} us, p99 {fl['p99_us']} us; "
              f"gridproxy p99 is {float(g['p99_us']) / max(float(fl['p99_us']), 1):.2f}x the floor, translator {float(t['p99_us']) / max(float(fl['p99_us']), 1):.2f}x")
    print(f"targets: rss/miner <= 1/5 of translator: {r('rss_per_miner_kib', True) >= 5}; "
          f"p99 < {100 if n <= 1000 else 200} us: {float(g['p99_us']) < (100 if n <= 1000 else 200)}")
else:
    print(f"ratio max throughput ({n} connections closed-loop, >1 = gridproxy better): "
          f"accepted_shares_per_s={r('acc_per_s'):.2f}x cpu_per_share={r('cpu_us_per_share', True):.2f}x "
          f"(p99 and RSS here measure the queue of outstanding submits, not the proxies)")
    print(f"targets: shares/s >= 5x translator: {r('acc_per_s') >= 5}; >= 150k/s: {float(g['acc_per_s']) >= 150000}; "
          f"cpu/share <= 5 us: {float(g['cpu_us_per_share']) <= 5}")
PY
}
phase fixed
# For the max phase a new tip every 3 s: translator_sv2 forwards every share
# upstream (its channel target is the easiest), and pool_sv2 closes a channel
# whose seen-share set overflows between tips (SeenSharesBudgetExhausted).
kill "$POOL_PID" "$TP_PID" 2>/dev/null; wait "$POOL_PID" "$TP_PID" 2>/dev/null || true
BLOCK_INTERVAL=3 start_pool
phase max
