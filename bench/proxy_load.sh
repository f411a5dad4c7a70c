#!/usr/bin/env bash
# Load run: N loadgen SV1 miners -> gridproxy (release) -> real pool_sv2 (fixture TP),
# all on loopback. Prints loadgen's accepted shares/s and latency, and gridproxy's
# RSS per miner (idle after connect, and under load).
#
#   bash bench/proxy_load.sh [MINERS] [RATE_PER_MINER] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; RATE=${2:-1}; SECS=${3:-30}
[ "$N" -le 19000 ] || { echo "at most 19000 miners (20k open files per process here)"; exit 2; }
bash scripts/peers.sh install >/dev/null
BIN="$(bash scripts/peers.sh path)"
cargo build --release -q -p gridproxy -p gridproxy-fixtures
R=target/release
run=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TP=$(port); POOL=$(port); MON=$(port); SV1=$(port)
KEY=9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72
SECRET=$(grep -o 'TEST_AUTHORITY_SECRET_KEY: &str = "[^"]*' fixtures/src/tp.rs | cut -d'"' -f2)
sed -e "s/{{AUTHORITY_PUBLIC_KEY}}/$KEY/; s/{{AUTHORITY_SECRET_KEY}}/$SECRET/; s/{{LISTEN}}/127.0.0.1:$POOL/; s/{{SHARES_PER_MINUTE}}/60/; s/{{SHARE_BATCH_SIZE}}/10/; s/{{MONITORING}}/127.0.0.1:$MON/; s/{{TP_ADDRESS}}/127.0.0.1:$TP/; s/{{TP_AUTHORITY_PUBLIC_KEY}}/$KEY/" peers/pool.toml.in > "$run/pool.toml"
cat > "$run/gridproxy.toml" <<EOT
[[pools]]
name = "sri"
address = "127.0.0.1:$POOL"
protocol = "sv2"
authority_pubkey = "$KEY"
user = "load"
nominal_hashrate = 1e12
[listen]
sv1 = "127.0.0.1:$SV1"
[limits]
max_connections = 19500
max_connections_per_ip = 19500   # the load generator connects from one address
[difficulty]
initial = 2.3283064365386963e-10
min = 2.3283064365386963e-10
retarget_secs = 3600
EOT
ulimit -n 20000 2>/dev/null || true
$R/mock_tp --bind 127.0.0.1:$TP --nbits 1d010000 --no-tip-on-solution > "$run/tp.log" 2>&1 &
sleep 1
"$BIN/pool_sv2" -c "$run/pool.toml" > "$run/pool.log" 2>&1 &
for _ in $(seq 50); do grep -q "ready to accept" "$run/pool.log" && break; sleep 0.2; done
RUST_LOG=warn $R/gridproxy run --config "$run/gridproxy.toml" --status-every 0 > "$run/proxy.log" 2>&1 &
GP=$!
sleep 1
rss() { awk '/VmRSS/ {print $2}' /proc/$GP/status; }
base=$(rss)
echo "gridproxy pid $GP, RSS before miners: ${base} KiB"
$R/loadgen --target 127.0.0.1:$SV1 --connections "$N" --rate "$RATE" --duration "$SECS" > "$run/loadgen.log" 2>&1 &
LG=$!
peak=0
while kill -0 $LG 2>/dev/null; do r=$(rss); [ "$r" -gt "$peak" ] && peak=$r; sleep 1; done
grep "^loadgen:" "$run/loadgen.log" | head -5 || true
tail -4 "$run/loadgen.log"
grep -ciE "disconnected|error" "$run/proxy.log" || true
grep -iE "disconnected|limit" "$run/proxy.log" | head -3 || true
cpu=$(awk '{print $14+$15}' /proc/$GP/stat); hz=$(getconf CLK_TCK)
acc=$(grep -o 'accepted=[0-9]*' "$run/loadgen.log" | tail -1 | cut -d= -f2)
python3 - "$N" "$base" "$peak" "$cpu" "$hz" "${acc:-0}" <<'PY'
import sys
n, base, peak, cpu, hz, acc = (float(x) for x in sys.argv[1:])
print(f"gridproxy: miners={int(n)} rss_base_kib={base:.0f} rss_peak_kib={peak:.0f} "
      f"rss_per_miner_kib={(peak-base)/n:.2f} cpu_s={cpu/hz:.1f} cpu_us_per_accepted_share={(cpu/hz*1e6/acc) if acc else 0:.1f}")
PY
