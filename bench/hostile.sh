#!/usr/bin/env bash
# Hostile networks: 2,000 honest SV1 miners at 1 share/s through gridproxy
# (release, default limits) into the real pool_sv2, for SECS seconds, twice:
# alone, then alongside every attacker of `attack` (connection churn with
# 100,000 fresh worker names, garbage lines, slowloris, suggest_difficulty
# floods, SV2 channel open/close churn, one address grabbing every slot), all
# bounded in count and time, all on loopback.
#
# Prints, for both runs: honest accepted shares/s, honest disconnects, the
# proxy's RSS at the end, and each limit's trip counter from /metrics; then
# checks: accepted/s within 5%, zero honest disconnects, and RSS under the
# stated bound.
#
#   bash bench/hostile.sh [SECS]        (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-300}
N=2000
bash scripts/peers.sh install >/dev/null
BIN="$(bash scripts/peers.sh path)"
cargo build --release -q -p gridproxy -p gridproxy-fixtures
R=target/release
run=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
source bench/lib.sh
ulimit -n 20000 2>/dev/null || true
SECRET=$(grep -o 'TEST_AUTHORITY_SECRET_KEY: &str = "[^"]*' fixtures/src/tp.rs | cut -d'"' -f2)

# RSS bound under attack, KiB: the clean run's RSS plus what the limits let
# attackers hold at most: 100,000 registry names (max_workers) at ~0.5 KiB,
# 2,000 grabbed slots (max_connections_per_ip) and the slowloris and flood
# connections (~1,000) at ~6 KiB each, and 64 MiB of allocator slack.
BOUND_EXTRA_KIB=$(( 100000 / 2 + 3000 * 6 + 65536 ))

# gridproxy with SV1 and SV2 listeners and the control API; limits at their
# defaults (the point of the run), except the difficulty that makes every
# hash a share. Sets GP_PID, GP_PORT, SV2_PORT, API_PORT.
start_hostile_gridproxy() {
  GP_PORT=$(port); SV2_PORT=$(port); API_PORT=$(port)
  cat > "$run/gridproxy.toml" <<EOT
[[pools]]
name = "sri"
address = "127.0.0.1:$POOL"
protocol = "sv2"
authority_pubkey = "$KEY"
user = "hostile"
nominal_hashrate = 1e12
[listen]
sv1 = "127.0.0.1:$GP_PORT"
sv2 = "127.0.0.1:$SV2_PORT"
sv2_authority_pubkey = "$KEY"
sv2_authority_secret = "$SECRET"
[api]
listen = "127.0.0.1:$API_PORT"
[difficulty]
initial = 2.3283064365386963e-10
min = 2.3283064365386963e-10
max = 2.3283064365386963e-10
retarget_secs = 3600
EOT
  RUST_LOG=${GP_LOG:-warn} $R/gridproxy run --config "$run/gridproxy.toml" --status-every 0 > "$run/gridproxy.$1.log" 2>&1 &
  GP_PID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$GP_PORT") 2>/dev/null && return 0; sleep 0.2; done
  echo "gridproxy did not listen" >&2; tail -5 "$run/gridproxy.$1.log" >&2; return 1
}

one_run() { # name attack(0|1)
  local name=$1 attack=$2 apid=""
  start_pool
  start_hostile_gridproxy "$name"
  echo "== $name: $N honest miners, ${SECS}s$([ "$attack" = 1 ] && echo ', with attackers')" >&2
  if [ "$attack" = 1 ]; then
    $R/attack --sv1 127.0.0.1:$GP_PORT --sv2 127.0.0.1:$SV2_PORT --authority "$KEY" \
      --duration "$SECS" > "$run/attack.log" 2>&1 &
    apid=$!
  fi
  measure "$name" "$GP_PID" "$GP_PORT" "$N" 1 "$SECS" 1 5 | tee "$run/result.$name"
  [ -z "$apid" ] || wait "$apid" || true
  echo "rss_end_kib=$(rss_kib "$GP_PID")" > "$run/rss.$name"
  curl -sf "http://127.0.0.1:$API_PORT/metrics" > "$run/metrics.$name" \
    || { echo "FAIL: /metrics unreadable" >&2; return 1; }
  [ -z "$apid" ] || grep '^attack: [a-z0-9]*:' "$run/attack.log"
  kill "$GP_PID" "$POOL_PID" "$TP_PID" 2>/dev/null; wait "$GP_PID" "$POOL_PID" "$TP_PID" 2>/dev/null || true
}

one_run clean 0
one_run hostile 1

python3 - "$run" "$BOUND_EXTRA_KIB" <<'PY'
import re, sys
run, extra = sys.argv[1], int(sys.argv[2])
def result(name):
    line = open(f"{run}/result.{name}").read()
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}
def rss(name):
    return int(open(f"{run}/rss.{name}").read().split("=")[1])
def metrics(name):
    out = {}
    for l in open(f"{run}/metrics.{name}"):
        m = re.match(r'(gridproxy_limit_trips_total|gridproxy_workers_evicted_total|gridproxy_workers_untracked_total|gridproxy_workers_known)(\{[^}]*\})? ([0-9.e+]+)', l)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    if not out:
        sys.exit(f"FAIL: no limit metrics in the {name} scrape")
    return out
c, h = result("clean"), result("hostile")
rc, rh = rss("clean"), rss("hostile")
mc, mh = metrics("clean"), metrics("hostile")
print(f"{'':34} {'clean':>12} {'hostile':>12}")
print(f"{'honest accepted shares/s':34} {c['acc_per_s']:>12.0f} {h['acc_per_s']:>12.0f}")
print(f"{'honest disconnects':34} {c['errors']:>12.0f} {h['errors']:>12.0f}")
print(f"{'honest held at end':34} {c['held']:>12.0f} {h['held']:>12.0f}")
print(f"{'share latency p99 (us)':34} {c['p99_us']:>12.0f} {h['p99_us']:>12.0f}")
print(f"{'proxy RSS at end (KiB)':34} {rc:>12} {rh:>12}")
for k in sorted(set(mc) | set(mh)):
    print(f"{k:34} {mc.get(k, 0):>12.0f} {mh.get(k, 0):>12.0f}")
bound = rc + extra
ok = True
def check(cond, what):
    global ok
    print(("ok   " if cond else "FAIL ") + what)
    ok &= cond
check(abs(h["acc_per_s"] - c["acc_per_s"]) <= 0.05 * c["acc_per_s"], "honest accepted/s within 5% of the clean run")
check(h["errors"] == 0 and c["errors"] == 0, "no honest miner disconnected")
check(rh <= bound, f"RSS under attack {rh} KiB <= bound {bound} KiB (clean RSS + {extra} KiB)")
for limit in ["max_connections_per_ip", "requests_per_second", "channel_opens_per_second"]:
    key = f'gridproxy_limit_trips_total{{limit="{limit}"}}'
    check(mh.get(key, 0) > 0, f"{limit} tripped under attack")
check(mh.get("gridproxy_workers_evicted_total", 0) > 0, "idle worker names were evicted")
sys.exit(0 if ok else 1)
PY
