#!/usr/bin/env bash
# Connection scale: for each miner count, a fresh gridproxy (release) upstream to
# the real pool_sv2 (fixture TP), loadgen miners spread over several processes
# (20k open files per process here), held SECS seconds at RATE shares/s each.
# Prints per-count results, then a linear fit of RSS against miners and its
# projection to 100k miners. Loopback only.
#
#   bash bench/scale.sh [SECS] [RATE] [COUNTS...]     # default: 60 1 1000 5000 19000
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}; RATE=${2:-1}; shift 2 2>/dev/null || shift $#
COUNTS=("${@:-}"); [ -n "${COUNTS[0]}" ] || COUNTS=(1000 5000 19000)
for n in "${COUNTS[@]}"; do [ "$n" -le 19000 ] || { echo "at most 19000 miners (gridproxy holds <= 19500 sockets)"; exit 2; }; done
bash scripts/peers.sh install >/dev/null
BIN="$(bash scripts/peers.sh path)"
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -q -p gridproxy -p gridproxy-fixtures
R=target/release
run=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
. bench/lib.sh
ulimit -n 20000 2>/dev/null || true
echo "load: $(uptime)"
start_pool
: > "$run/results"
for n in "${COUNTS[@]}"; do
  start_gridproxy
  procs=$(( (n + 4999) / 5000 ))
  measure "gp$n" "$GP_PID" "$GP_PORT" "$n" "$RATE" "$SECS" "$procs" 5 | tee -a "$run/results"
  if grep -qiE "panic" "$run/gridproxy.log"; then echo "gridproxy panicked:"; grep -i panic "$run/gridproxy.log" | head -3; exit 1; fi
  kill "$GP_PID"; wait "$GP_PID" 2>/dev/null || true
done
python3 - "$run/results" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    f = dict(re.findall(r"(\w+)=([\d.]+)", line))
    rows.append((int(f["miners"]), float(f["rss_peak_kib"]) - float(f["rss_base_kib"]), int(f["held"])))
for n, kib, held in rows:
    print(f"scale: miners={n} held={held} rss_delta_kib={kib:.0f} per_miner_kib={kib/n:.2f}")
if len(rows) >= 2:
    xs, ys = [r[0] for r in rows], [r[1] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    icpt = my - slope * mx
    print(f"fit: rss_kib = {icpt:.0f} + {slope:.3f} * miners; "
          f"projected 100k miners: {(icpt + slope * 1e5) / 1024:.0f} MiB ({slope:.2f} KiB/miner marginal)")
PY
