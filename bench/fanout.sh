#!/usr/bin/env bash
# The stale-work window (issue 17): for each miner count, a fresh gridproxy
# (release) upstream to the real pool_sv2, the fixture TP making a new block
# every BLOCK seconds, loadgen miners at RATE shares/s each timing every
# block's clean job (`loadgen --blocks`). Per block: from gridproxy's receipt
# of the new block (its "new block from the pool" log line) to the first and
# to the last miner's receipt of the clean job; then p50/p99/max over the
# blocks, next to the share latency of the same run (which spans the
# fan-outs). Both clocks are this machine's wall clock. Loopback only.
#
#   bash bench/fanout.sh [SECS] [COUNTS...]      # default: 40 1000
#   BLOCK=5 RATE=1 bash bench/fanout.sh 60 1000 10000 19000
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-40}; shift 2>/dev/null || true
COUNTS=("${@:-}"); [ -n "${COUNTS[0]}" ] || COUNTS=(1000)
RATE=${RATE:-1}; BLOCK=${BLOCK:-5}
for n in "${COUNTS[@]}"; do [ "$n" -le 19000 ] || { echo "at most 19000 miners (gridproxy holds <= 19500 sockets)"; exit 2; }; done
bash scripts/peers.sh install >/dev/null
BIN="$(bash scripts/peers.sh path)"
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -q -p gridproxy -p gridproxy-fixtures
R=${BENCH_BIN:-target/release}  # BENCH_BIN: binaries of another build (a before/after run)
run=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
. bench/lib.sh
ulimit -n 20000 2>/dev/null || true
echo "load: $(uptime)"
echo "fanout: a new block every ${BLOCK} s, ${RATE} share/s per miner, ${SECS} s per count; binaries: ${BENCH_BIN:-this checkout, $(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
BLOCK_INTERVAL=$BLOCK start_pool
for n in "${COUNTS[@]}"; do
  # Only the upstream's block lines at info: a line per miner would cost more than the fan-out.
  GP_LOG="warn,gridproxy_proxy::upstream=info" start_gridproxy
  procs=$(( (n + 4999) / 5000 ))
  LG_EXTRA=--blocks measure "gp$n" "$GP_PID" "$GP_PORT" "$n" "$RATE" "$SECS" "$procs" 5 > "$run/result.$n"
  cat "$run/result.$n"
  if grep -qiE "panic" "$run/gridproxy.log"; then echo "gridproxy panicked:"; grep -i panic "$run/gridproxy.log" | head -3; exit 1; fi
  kill "$GP_PID"; wait "$GP_PID" 2>/dev/null || true
  python3 - "$n" "$run/gridproxy.log" "$run/result.$n" "$run"/lg."gp$n".*.log <<'PY'
import re, sys
from datetime import datetime
n, gplog, result, lglogs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
# gridproxy: "<RFC 3339> INFO ...: new block from the pool pool=sri prev_hash=<hex>"
arrived = {}
for line in open(gplog, errors="replace"):
    if "new block from the pool" not in line:
        continue
    m = re.search(r"prev_hash=([0-9a-f]{64})", line)
    t = line.split()[0]
    if not m:
        continue
    ts = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    arrived.setdefault(m.group(1), round(ts * 1e6))
# loadgen: "block prev_hash=<hex> miners=N first_us=T last_us=T", one process per 5,000 miners
seen = {}
for f in lglogs:
    for line in open(f, errors="replace"):
        m = re.match(r"block prev_hash=(\w+) miners=(\d+) first_us=(\d+) last_us=(\d+)", line)
        if not m:
            continue
        h, k, a, b = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        c = seen.setdefault(h, [0, a, b])
        c[0] += k; c[1] = min(c[1], a); c[2] = max(c[2], b)
firsts, lasts, partial = [], [], 0
for h, (k, a, b) in seen.items():
    if h not in arrived:
        continue  # a block from before this process (the first job, not a fan-out)
    if k < n:
        partial += 1  # reached fewer miners than connected (the run ended mid fan-out, or a miner was not ready)
        continue
    firsts.append((a - arrived[h]) / 1000); lasts.append((b - arrived[h]) / 1000)
def pct(v, p):
    v = sorted(v)
    return v[min(int(len(v) * p), len(v) - 1)] if v else float("nan")
f = dict(re.findall(r"(\w+)=([\d.]+)", open(result).read()))
print(f"fanout: miners={n} blocks={len(lasts)} partial={partial} "
      f"first_ms_p50={pct(firsts,.5):.1f} last_ms_p50={pct(lasts,.5):.1f} last_ms_p99={pct(lasts,.99):.1f} last_ms_max={max(lasts, default=float('nan')):.1f} "
      f"share_p50_us={f.get('p50_us','?')} share_p99_us={f.get('p99_us','?')} share_p999_us={f.get('p999_us','?')} "
      f"rss_per_miner_kib={f.get('rss_per_miner_kib','?')} acc_per_s={f.get('acc_per_s','?')}")
if not lasts:
    print("FAIL: no complete block fan-out measured", file=sys.stderr)
    sys.exit(1)
PY
done
