# Shared helpers for the bench scripts (sourced, not run). Everything binds
# and connects on 127.0.0.0/8 only. Callers set `run` (a temp dir) and R
# (release binaries) and trap EXIT to stop what they started.

KEY=9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72
HZ=$(getconf CLK_TCK)

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_log() { # file pattern seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "timed out waiting for '$2' in $1:" >&2; tail -5 "$1" >&2; return 1
}

# Fixture TP + real pool_sv2 (SRI). Sets POOL (port).
start_pool() {
  local tp mon secret
  tp=$(port); POOL=$(port); mon=$(port)
  secret=$(grep -o 'TEST_AUTHORITY_SECRET_KEY: &str = "[^"]*' fixtures/src/tp.rs | cut -d'"' -f2)
  sed -e "s/{{AUTHORITY_PUBLIC_KEY}}/$KEY/; s/{{AUTHORITY_SECRET_KEY}}/$secret/; s/{{LISTEN}}/127.0.0.1:$POOL/; s/{{SHARES_PER_MINUTE}}/60/; s/{{SHARE_BATCH_SIZE}}/10/; s/{{MONITORING}}/127.0.0.1:$mon/; s/{{TP_ADDRESS}}/127.0.0.1:$tp/; s/{{TP_AUTHORITY_PUBLIC_KEY}}/$KEY/" peers/pool.toml.in > "$run/pool.toml"
  # BLOCK_INTERVAL=S: a new tip every S seconds. pool_sv2 keeps a per-channel
  # set of seen shares (bounded, flushed on a new tip) and closes a channel
  # that overflows it, which a proxy forwarding every share does at full load.
  $R/mock_tp --bind 127.0.0.1:$tp --nbits 1d010000 --no-tip-on-solution \
    --block-interval "${BLOCK_INTERVAL:-0}" > "$run/tp.log" 2>&1 &
  TP_PID=$!
  sleep 1
  NO_COLOR=1 "$BIN/pool_sv2" -c "$run/pool.toml" > "$run/pool.log" 2>&1 &
  POOL_PID=$!
  wait_log "$run/pool.log" "ready to accept" 30
}

# gridproxy (release) upstream to the pool; every hash a valid share (2^-32).
# Sets GP_PID, GP_PORT.
start_gridproxy() {
  GP_PORT=$(port)
  cat > "$run/gridproxy.toml" <<EOT
[[pools]]
name = "sri"
address = "127.0.0.1:$POOL"
protocol = "sv2"
authority_pubkey = "$KEY"
user = "load"
nominal_hashrate = 1e12
[listen]
sv1 = "127.0.0.1:$GP_PORT"
[limits]
max_connections = 19500
max_connections_per_ip = 19500   # the load generator connects from one address
submits_per_second = ${GP_SUBMITS_PER_SECOND:-200}
notify_writers = ${GP_NOTIFY_WRITERS:-0}
[difficulty]
initial = 2.3283064365386963e-10
min = 2.3283064365386963e-10
max = 2.3283064365386963e-10
retarget_secs = 3600
EOT
  RUST_LOG=${GP_LOG:-warn} ${GP_WRAP:-} $R/gridproxy run --config "$run/gridproxy.toml" --status-every 0 > "$run/gridproxy.log" 2>&1 &
  GP_PID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$GP_PORT") 2>/dev/null && return 0; sleep 0.2; done
  echo "gridproxy did not listen" >&2; tail -5 "$run/gridproxy.log" >&2; return 1
}

# translator_sv2 (SRI), aggregated channel upstream to the same pool. Difficulty
# lowered with TPROXY__ overrides so that every hash is a valid share: a
# hashrate below 1 H/s makes its target 2^256-1 (channels_sv2 hash_rate_to_target).
# Sets TP_PID, TPX_PORT.
start_translator() {
  local mon
  TPX_PORT=$(port); mon=$(port)
  sed -e "s/{{SV1_PORT}}/$TPX_PORT/; s/{{EXTRANONCE2_SIZE}}/4/; s/{{AGGREGATE_CHANNELS}}/true/; s/{{MONITORING}}/127.0.0.1:$mon/; s/{{MIN_HASHRATE}}/100000.0/; s/{{SHARES_PER_MINUTE}}/30.0/; s/{{ENABLE_VARDIFF}}/false/; s/{{POOL_HOST}}/127.0.0.1/; s/{{POOL_PORT}}/$POOL/; s/{{POOL_AUTHORITY_PUBLIC_KEY}}/$KEY/; s/{{USER_IDENTITY}}/bench/" peers/translator.toml.in > "$run/translator.toml"
  if grep -v '^\s*#' "$run/translator.toml" | grep -q '{{'; then echo "unfilled placeholder in translator.toml" >&2; return 1; fi
  NO_COLOR=1 \
    TPROXY__DOWNSTREAM_DIFFICULTY_CONFIG__MIN_INDIVIDUAL_MINER_HASHRATE=0.5 \
    TPROXY__DOWNSTREAM_DIFFICULTY_CONFIG__SHARES_PER_MINUTE=60.0 \
    "$BIN/translator_sv2" -c "$run/translator.toml" > "$run/translator.log" 2>&1 &
  TPX_PID=$!
  wait_log "$run/translator.log" "listening on 127.0.0.1:$TPX_PORT" 30
  wait_log "$run/translator.log" "miner telemetry discovery disabled" 10
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# Sum over the loadgen logs with this prefix of the latest KEY=N value.
latest_sum() { # key prefix
  local f s=0 v
  for f in "$2".*.log; do
    v=$(grep -o "$1=[0-9]*" "$f" | tail -1 | cut -d= -f2)
    s=$((s + ${v:-0}))
  done
  echo $s
}
acc_total() { latest_sum acc_total "$1"; }
ready_total() { latest_sum ready "$1"; }
held_total() { latest_sum held "$1"; }

# Put N miners at RATE shares/s on 127.0.0.1:PORT for SECS after the ramp, over
# PROCS loadgen processes, and measure PID over a steady window (after ramp and
# WARM seconds, until 2 s before the end). Prints one `result:` line:
# LG_EXTRA: more loadgen arguments (e.g. --blocks).
# With INFLIGHT=K set, each loadgen connection is closed-loop with K submits
# outstanding (RATE is ignored): the most shares per second PID answers.
#   name miners held acc_per_s cpu_us_per_share rss_base rss_peak rss_per_miner p50 p99 p999 errors
measure() { # name pid port N RATE SECS PROCS WARM
  local name=$1 pid=$2 tport=$3 n=$4 rate=$5 secs=$6 procs=$7 warm=$8
  local pre="$run/lg.$name" base peak i per rem c0 c1 a0 a1 t0 t1 r held lgs=()
  base=$(rss_kib "$pid")
  per=$((n / procs)); rem=$((n % procs))
  for ((i = 0; i < procs; i++)); do
    c=$per; [ $i -lt $rem ] && c=$((c + 1))
    # Each process gets its own source addresses (ephemeral ports are per source).
    $R/loadgen --target 127.0.0.1:$tport --connections "$c" --rate "$rate" --duration "$secs" \
      --user "$name$i" --warmup "$warm" --sources 4 --connect-rate $((2000 / procs)) \
      --lat-out "$pre.$i.lat" --steady-file "$pre.steady" --inflight "${INFLIGHT:-0}" ${LG_EXTRA:-} > "$pre.$i.log" 2>&1 &
    lgs+=($!)
  done
  # Ramp: wait until every process has printed its first per-second line.
  for _ in $(seq 600); do
    r=0
    for ((i = 0; i < procs; i++)); do
      if grep -q '^t=' "$pre.$i.log" 2>/dev/null; then r=$((r + 1))
      elif ! kill -0 "${lgs[$i]}" 2>/dev/null; then echo "FAIL: loadgen $i exited during the ramp:" >&2; tail -5 "$pre.$i.log" >&2; return 1
      fi
    done
    [ $r -eq $procs ] && break; sleep 0.5
  done
  # Each loadgen runs SECS from here; the window must close before they do.
  local stop_at=$(( $(date +%s) + secs - 2 ))
  # Settled: every connection has its first job (the proxy is done accepting
  # and starting channels); then WARM seconds more.
  for _ in $(seq 240); do
    [ "$(ready_total "$pre")" -ge "$n" ] && break; sleep 0.5
  done
  sleep "$warm"
  touch "$pre.steady" # latency samples count from here, in every process
  c0=$(cpu_ticks "$pid"); a0=$(acc_total "$pre"); t0=$(date +%s.%N)
  peak=$(rss_kib "$pid")
  local end=$stop_at
  [ "$end" -gt "$(( $(date +%s) + 5 ))" ] || { echo "FAIL: $name took too long to settle for a ${secs}s run" >&2; return 1; }
  while [ "$(date +%s)" -lt $end ]; do
    r=$(rss_kib "$pid"); [ "$r" -gt "$peak" ] && peak=$r; sleep 1
  done
  c1=$(cpu_ticks "$pid"); a1=$(acc_total "$pre"); t1=$(date +%s.%N)
  held=$(held_total "$pre")
  r=$(rss_kib "$pid"); [ "$r" -gt "$peak" ] && peak=$r
  wait "${lgs[@]}" || true
  cat "$pre".*.lat > "$pre.lat.all" 2>/dev/null || true
  grep -h '^loadgen:' "$pre".*.log | sed 's/^loadgen: [^:]*: //' | sort | uniq -c | sort -rn | head -3 >&2 || true
  local errs=0 e
  for f in "$pre".*.log; do e=$(grep -o 'summary:.* errors=[0-9]*' "$f" | grep -o 'errors=[0-9]*' | cut -d= -f2); errs=$((errs + ${e:-0})); done
  python3 - "$name" "$n" "$held" "$a0" "$a1" "$t0" "$t1" "$c0" "$c1" "$HZ" "$base" "$peak" "$errs" "$pre.lat.all" <<'PY'
import sys
name, n, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a0, a1, t0, t1, c0, c1, hz, base, peak, errs = (float(x) for x in sys.argv[4:14])
lat = sorted(int(l) for l in open(sys.argv[14]) if l.strip())
pct = lambda p: lat[min(int(len(lat) * p), len(lat) - 1)] if lat else 0
acc, secs = a1 - a0, t1 - t0
cpu_us = (c1 - c0) / hz * 1e6
print(f"result: {name} miners={n} held={held} acc_per_s={acc/secs:.0f} "
      f"cpu_us_per_share={(cpu_us/acc) if acc else 0:.2f} cpu_pct={cpu_us/secs/1e4:.0f} "
      f"rss_base_kib={base:.0f} rss_peak_kib={peak:.0f} rss_per_miner_kib={(peak-base)/n:.2f} "
      f"p50_us={pct(.5)} p99_us={pct(.99)} p999_us={pct(.999)} samples={len(lat)} errors={errs:.0f} window_s={secs:.1f}")
PY
}
