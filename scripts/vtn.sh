#!/usr/bin/env bash
# The real OpenADR 3 VTN (openleadr-rs, crate openleadr-vtn 0.2.8) as a test peer for
# gridproxy's VEN (grid/src/openadr.rs), on loopback only.
#
#   scripts/vtn.sh install   apt deps if missing; build the VTN once into the cache (skip if built)
#   scripts/vtn.sh up        private PostgreSQL cluster + VTN, business-logic (BL) and VEN OAuth
#                            clients, one enrolled VEN object; writes/prints an env file
#   scripts/vtn.sh down      stops exactly the VTN and postgres pids that `up` recorded
#   scripts/vtn.sh env       prints the env file of a running instance
#
# Env knobs: GRIDPROXY_CACHE (~/.cache/gridproxy), VTN_PORT (3000), VTN_PG_PORT (55432),
# VTN_RUN_DIR (${TMPDIR:-/tmp}/gridproxy-vtn.$VTN_PORT), VEN_NAME (ven-1).
set -euo pipefail

VERSION=0.2.8
CACHE="${GRIDPROXY_CACHE:-$HOME/.cache/gridproxy}"
HOME_DIR="$CACHE/openleadr-vtn"
BIN="$HOME_DIR/bin/openleadr-vtn"
PORT="${VTN_PORT:-3000}"
PG_PORT="${VTN_PG_PORT:-55432}"
RUN="${VTN_RUN_DIR:-${TMPDIR:-/tmp}/gridproxy-vtn.$PORT}"
PG="$RUN/pg"
ENV_FILE="$RUN/vtn.env"
VEN_NAME="${VEN_NAME:-ven-1}"
BASE="http://127.0.0.1:$PORT"
# The internal OAuth server starts with no users. `up` inserts a throw-away user by SQL
# (argon2id hash of the secret "bl-client", from the crate's own test fixture users.sql),
# uses it to create the real clients with random secrets, then deletes it.
BOOT_SECRET='bl-client'
BOOT_HASH='$argon2id$v=19$m=16,t=2,p=1$MWt1QVNFdHdlZVJhNEZzUA$Rmkguwgaz+A2GWIaDRtv8w'

log() { echo "[vtn] $*" >&2; }
die() { echo "[vtn] ERROR: $*" >&2; exit 1; }
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# initdb/postgres refuse to run as root: use the postgres account then.
as_db() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] || die "PostgreSQL not installed (run: scripts/vtn.sh install)"
  echo "$d"
}

cmd_install() {
  local t0=$SECONDS missing=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  for p in cmake pkg-config libssl-dev curl jq build-essential; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ -x "$BIN" ]; then log "VTN already built: $BIN"; return 0; fi

  # Let cargo resolve and unpack the published crate (through whatever registry cargo is
  # configured with), then copy it out so we can patch it.
  local probe="$HOME_DIR/probe" src="$HOME_DIR/src" manifest
  mkdir -p "$probe/src" "$HOME_DIR/bin"
  printf '[package]\nname = "vtn-probe"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nopenleadr-vtn = "=%s"\n\n[workspace]\n' \
    "$VERSION" >"$probe/Cargo.toml"
  echo 'fn main() {}' >"$probe/src/main.rs"
  manifest=$(cd "$probe" && cargo metadata --format-version 1 |
    jq -r --arg v "$VERSION" '.packages[] | select(.name == "openleadr-vtn" and .version == $v) | .manifest_path')
  [ -f "$manifest" ] || die "openleadr-vtn $VERSION source not found"
  rm -rf "$src"
  cp -a "$(dirname "$manifest")" "$src"
  chmod -R u+w "$src"
  printf '\n[workspace]\n' >>"$src/Cargo.toml"
  # A test peer, not a production VTN: opt-level 1 builds in much less time;
  # the password hashing (argon2) keeps full optimisation so logins stay fast.
  printf '\n[profile.release]\nopt-level = 1\n\n[profile.release.package.argon2]\nopt-level = 3\n\n[profile.release.package.blake2]\nopt-level = 3\n' >>"$src/Cargo.toml"

  # Patch 1: the listener is hard-coded to 0.0.0.0; bind VTN_BIND_ADDRESS (default loopback).
  sed -i 's|let addr = format!("0.0.0.0:{}", config.port);|let addr = format!("{}:{}", std::env::var("VTN_BIND_ADDRESS").unwrap_or_else(\|_\| "127.0.0.1".into()), config.port);|' \
    "$src/src/lib.rs"
  grep -q VTN_BIND_ADDRESS "$src/src/lib.rs" || die "bind-address patch failed"
  ! grep -q '0\.0\.0\.0' "$src/src/lib.rs" || die "VTN still binds 0.0.0.0"
  # Patch 2: PostgreSQL < 16 needs an alias on a subquery in FROM (two migrations).
  sed -i -E 's/FROM \(SELECT unnest\(_scopes\) AS scope\)[[:space:]]*$/FROM (SELECT unnest(_scopes) AS scope) AS s/' \
    "$src"/migrations/*.sql
  # Patch 3: the shipped Cargo.lock pins webpki-roots 1.0.11, which some registries lack.
  cd "$src"
  if ! cargo fetch --locked 2>"$HOME_DIR/fetch.log" >/dev/null; then
    grep -q webpki-roots "$HOME_DIR/fetch.log" || { cat "$HOME_DIR/fetch.log" >&2; die "cargo fetch failed"; }
    log "webpki-roots 1.0.11 unavailable: using 1.0.10"
    cargo update -p webpki-roots@1.0.11 --precise 1.0.10
    cargo fetch --locked >/dev/null
  fi
  log "building openleadr-vtn $VERSION (cold: 10-20 min on 2 cores)"
  SQLX_OFFLINE=true CMAKE_POLICY_VERSION_MINIMUM=3.5 CARGO_TARGET_DIR="$HOME_DIR/target" \
    cargo build --release --locked --features internal-oauth --bin openleadr-vtn
  install -m 755 "$HOME_DIR/target/release/openleadr-vtn" "$BIN"
  [ "${VTN_KEEP_TARGET:-0}" = 1 ] || rm -rf "$HOME_DIR/target"
  log "built $BIN in $((SECONDS - t0)) s"
}

# api METHOD PATH TOKEN [JSON] -> response body; non-zero on HTTP >= 400.
api() {
  local out code args=(-sS -X "$1" -H "Authorization: Bearer $3" -w '\n%{http_code}')
  [ -n "${4:-}" ] && args+=(-H 'Content-Type: application/json' --data "$4")
  out=$(curl "${args[@]}" "$BASE$2") || return 1
  code=${out##*$'\n'}; out=${out%$'\n'*}
  [ "$code" -lt 400 ] || { log "$1 $2 -> HTTP $code: $out"; return 1; }
  printf '%s\n' "$out"
}
token() { curl -sS --fail-with-body "$BASE/auth/token" -d grant_type=client_credentials \
  --data-urlencode "client_id=$1" --data-urlencode "client_secret=$2" | jq -er .access_token; }
# new_client REFERENCE CLIENT_ID SECRET SCOPES_JSON BOOT_TOKEN
new_client() {
  local id
  id=$(api POST /users "$5" "$(jq -nc --arg r "$1" --argjson s "$4" '{reference:$r,description:"gridproxy tests",scope:$s}')" | jq -er .id) || return 1
  api POST "/users/$id" "$5" "$(jq -nc --arg i "$2" --arg s "$3" '{client_id:$i,client_secret:$s}')" >/dev/null
}

cmd_up() {
  [ -x "$BIN" ] || die "VTN not built: run 'scripts/vtn.sh install' first"
  command -v jq >/dev/null || die "jq missing: run 'scripts/vtn.sh install'"
  if alive "$(cat "$RUN/vtn.pid" 2>/dev/null)" && [ -f "$ENV_FILE" ]; then cat "$ENV_FILE"; return 0; fi
  busy "$PORT" && die "127.0.0.1:$PORT is in use (set VTN_PORT)"
  busy "$PG_PORT" && die "127.0.0.1:$PG_PORT is in use (set VTN_PG_PORT)"
  local bin; bin=$(pg_bin)
  case "$RUN" in /|/tmp|/tmp/|"$HOME"|"") die "refusing VTN_RUN_DIR=$RUN" ;; esac
  [ -f "$RUN/pg.pid" ] && cmd_down
  rm -rf "$RUN"; mkdir -p "$PG"; chmod 755 "$RUN"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG"

  # A fresh private cluster per `up`: an empty DB every time.
  local pw; pw=$(hex 16)
  echo "$pw" >"$PG/pw"; [ "$(id -u)" = 0 ] && chown postgres "$PG/pw"
  as_db "$bin/initdb" -D "$PG/data" -U openadr --pwfile="$PG/pw" --auth=scram-sha-256 -E UTF8 \
    --no-locale >"$RUN/initdb.log" 2>&1 || { cat "$RUN/initdb.log" >&2; die "initdb failed"; }
  rm -f "$PG/pw"
  printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n" \
    "$PG_PORT" "$PG" >>"$PG/data/postgresql.conf"
  as_db "$bin/pg_ctl" -D "$PG/data" -l "$PG/postgres.log" -w -t 60 start >/dev/null ||
    { cat "$PG/postgres.log" >&2; die "postgres did not start"; }
  head -n1 "$PG/data/postmaster.pid" >"$RUN/pg.pid"
  local psql=("$bin/psql" -qX -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U openadr)
  PGPASSWORD="$pw" "${psql[@]}" -d postgres -c 'CREATE DATABASE openadr' >/dev/null ||
    { cmd_down; die "CREATE DATABASE failed"; }
  local db="postgres://openadr:$pw@127.0.0.1:$PG_PORT/openadr"

  # The VTN migrates the DB itself at start. cwd = RUN so dotenvy finds no stray .env.
  (
    cd "$RUN"
    export DATABASE_URL="$db" PORT="$PORT" VTN_BIND_ADDRESS=127.0.0.1 OAUTH_TYPE=INTERNAL \
      OAUTH_KEY_TYPE=HMAC OAUTH_BASE64_SECRET="$(head -c 32 /dev/urandom | base64 -w0)" \
      OAUTH_TOKEN_URL="$BASE/auth/token" RUST_LOG="${RUST_LOG:-info}"
    exec "$BIN" >"$RUN/vtn.log" 2>&1 </dev/null
  ) &
  local pid=$! i
  echo "$pid" >"$RUN/vtn.pid"
  for i in $(seq 120); do
    alive "$pid" || { tail -n 20 "$RUN/vtn.log" >&2; cmd_down; die "VTN exited"; }
    curl -sf "$BASE/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -sf "$BASE/health" >/dev/null || { cmd_down; die "VTN not healthy after 60 s"; }
  ! grep -q 'migration failed' "$RUN/vtn.log" || { cmd_down; die "VTN DB migration failed"; }

  PGPASSWORD="$pw" "${psql[@]}" -d openadr >/dev/null <<SQL || { cmd_down; die "bootstrap user insert failed"; }
INSERT INTO "user" (id, reference, description, scopes, created, modified)
  VALUES ('bootstrap', 'bootstrap', 'deleted by scripts/vtn.sh up', '{write_users}', now(), now());
INSERT INTO user_credentials (user_id, client_id, client_secret) VALUES ('bootstrap', 'bootstrap', '$BOOT_HASH');
SQL
  local bl_secret ven_secret boot bl ven_id
  bl_secret=$(hex 16); ven_secret=$(hex 16)
  {
    boot=$(token bootstrap "$BOOT_SECRET") &&
      new_client gridproxy-bl bl-client "$bl_secret" \
        '["read_all","write_programs","write_events","write_vens_bl","write_reports_bl","write_subscriptions_bl","write_users"]' "$boot" &&
      new_client gridproxy-ven ven-client "$ven_secret" \
        '["read_targets","read_ven_objects","write_reports_ven","write_subscriptions_ven","write_vens_ven"]' "$boot" &&
      api DELETE /users/bootstrap "$boot" >/dev/null &&
      bl=$(token bl-client "$bl_secret") &&
      token ven-client "$ven_secret" >/dev/null &&
      # Enrol the VEN (a VEN object bound to its client id): without one it gets no
      # websocket notifications and no targeted events.
      ven_id=$(api POST /vens "$bl" "$(jq -nc --arg n "$VEN_NAME" \
        '{objectType:"BL_VEN_REQUEST",clientID:"ven-client",venName:$n,targets:[$n]}')" | jq -er .id)
  } || { cmd_down; die "creating the OAuth clients failed (log: $RUN/vtn.log)"; }

  (umask 077; cat >"$ENV_FILE" <<EOF
VTN_URL=$BASE
BL_CLIENT_ID=bl-client
BL_CLIENT_SECRET=$bl_secret
VEN_CLIENT_ID=ven-client
VEN_CLIENT_SECRET=$ven_secret
VEN_ID=$ven_id
VEN_NAME=$VEN_NAME
VTN_RUN_DIR=$RUN
EOF
  )
  log "up: VTN pid $pid, postgres pid $(cat "$RUN/pg.pid"), env $ENV_FILE"
  cat "$ENV_FILE"
}

cmd_down() {
  local pid i
  pid=$(cat "$RUN/vtn.pid" 2>/dev/null || true)
  if alive "$pid"; then
    kill -TERM "$pid"
    for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid"
    log "stopped VTN pid $pid"
  fi
  pid=$(cat "$RUN/pg.pid" 2>/dev/null || true)
  if alive "$pid"; then
    as_db "$(pg_bin)/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null 2>&1 || kill -INT "$pid"
    log "stopped postgres pid $pid"
  fi
  rm -f "$RUN/vtn.pid" "$RUN/pg.pid" "$ENV_FILE"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  env) cat "$ENV_FILE" ;;
  *) echo "usage: $0 install|up|down|env" >&2; exit 2 ;;
esac
