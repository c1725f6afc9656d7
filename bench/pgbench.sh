#!/usr/bin/env bash
# Throughput and latency, side by side in one run on this machine:
# pgbench -S directly against the warehouse PostgreSQL, through PgBouncer
# (transaction mode), and through shardpool (router -> shard -> warehouse,
# release build, on the local cluster).
#
#   bench/pgbench.sh                 # 16 and 64 clients, 20 s each
#   CLIENTS="16 64" DURATION=30 bench/pgbench.sh
#
# It brings up its own local cluster in bench/.work/state (stop a `make demo`
# cluster first: the ports are the same), installs pgbouncer from Debian's
# packages if missing, and stops everything it started (by pid) at the end.
# Results go to stdout and bench/results/pgbench-<date>.txt.
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
export LOCALKUBE_STATE="$BENCH/.work/state"
CLIENTS="${CLIENTS:-16 64}"
DURATION="${DURATION:-20}"
RATE="${RATE:-1000}"
POOL="${POOL:-20}"
SCALE="${SCALE:-10}"
PGB_PORT="${PGB_PORT:-16432}"
WORK="$BENCH/.work"
mkdir -p "$WORK" "$BENCH/results"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  log "installing pgbouncer (Debian package)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"

log "building shardpool (release)"
(cd "$ROOT" && cargo build --locked --release --bin shardpool)
export SHARDPOOL_BIN="$ROOT/target/release/shardpool"

PGB_PID=""
cleanup() {
  if [ -n "$PGB_PID" ] && kill -0 "$PGB_PID" 2>/dev/null; then kill -INT "$PGB_PID"; fi
  "$ROOT/e2e/down.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$ROOT/e2e/up.sh"
"$ROOT/e2e/install.sh" >/dev/null
# shellcheck disable=SC1091
source "$LOCALKUBE_STATE/env"
kc() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }

log "preparing the bench database (scale $SCALE) and its DataSource (pool $POOL)"
export PGSSLMODE=disable # every path plain TCP, as PgBouncer here
export PGHOST="$WAREHOUSE_PGHOST" PGPORT="$WAREHOUSE_PGPORT" PGUSER="$WAREHOUSE_PGUSER" PGPASSWORD="$WAREHOUSE_PGPASSWORD"
psql -q -d postgres -c "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench"
pgbench -i -q -s "$SCALE" bench >/dev/null 2>&1
kc -n tenants create secret generic bench-warehouse --from-literal=password="$WAREHOUSE_PGPASSWORD" --dry-run=client -o yaml | kc apply -f - >/dev/null
cat <<YAML | kc apply -f - >/dev/null
apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: bench, namespace: tenants}
spec:
  host: $WAREHOUSE_PGHOST
  port: $WAREHOUSE_PGPORT
  database: bench
  user: $WAREHOUSE_PGUSER
  passwordSecretRef: {name: bench-warehouse, key: password}
  tls: {mode: disable}
  pool: {minIdle: $POOL, maxSize: $POOL}
YAML
for _ in $(seq 1 120); do
  [ "$(kc -n tenants get datasource bench -o jsonpath='{.status.phase}')" = Ready ] && break
  sleep 0.5
done
ROUTER_IP=$(kc -n shardpool-system get pods -l app.kubernetes.io/component=router -o jsonpath='{.items[0].status.podIP}')
ROUTER_PW=$(cat "$LOCALKUBE_STATE/install/router-bi")

log "starting pgbouncer on 127.0.0.1:$PGB_PORT (transaction mode, pool $POOL)"
PGB="$WORK/pgbouncer"
mkdir -p "$PGB"
printf '"%s" "%s"\n' "$WAREHOUSE_PGUSER" "$WAREHOUSE_PGPASSWORD" > "$PGB/userlist.txt"
cat > "$PGB/pgbouncer.ini" <<INI
[databases]
bench = host=$WAREHOUSE_PGHOST port=$WAREHOUSE_PGPORT dbname=bench user=$WAREHOUSE_PGUSER password=$WAREHOUSE_PGPASSWORD
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $PGB/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = $POOL
max_client_conn = 1000
logfile = $PGB/pgbouncer.log
pidfile = $PGB/pgbouncer.pid
INI
PGB_VERSION=$("$PGBOUNCER" --version | head -n 1 | awk '{print $2}')
# Prepared statements in transaction mode need PgBouncer 1.21+.
PGB_PREPARED=0
if printf '1.21\n%s\n' "$PGB_VERSION" | sort -V -C; then
  echo "max_prepared_statements = 200" >> "$PGB/pgbouncer.ini"
  PGB_PREPARED=1
fi
chmod 600 "$PGB/userlist.txt" "$PGB/pgbouncer.ini"
if [ "$(id -u)" = 0 ]; then
  chown -R postgres: "$PGB"
  runuser -u postgres -- "$PGBOUNCER" "$PGB/pgbouncer.ini" >/dev/null 2>&1 &
else
  "$PGBOUNCER" "$PGB/pgbouncer.ini" >/dev/null 2>&1 &
fi
for _ in $(seq 1 50); do [ -s "$PGB/pgbouncer.pid" ] && break; sleep 0.1; done
PGB_PID=$(cat "$PGB/pgbouncer.pid")

# run NAME HOST PORT DB PASSWORD ARGS... -> prints "tps latency_ms"
run() {
  local host=$1 port=$2 db=$3 pw=$4 user=$5; shift 5
  PGPASSWORD="$pw" pgbench -h "$host" -p "$port" -U "$user" -n -S "$@" "$db" 2>&1
}
tps() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1; }

out="$BENCH/results/pgbench-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# pgbench -S (select-only), $DURATION s per run, scale $SCALE, server pool $POOL, $(nproc) cores, all on this machine"
  echo "# shardpool $(git -C "$ROOT" rev-parse --short HEAD), release build; PgBouncer $PGB_VERSION, transaction mode (0 = not run: prepared statements need PgBouncer 1.21+)"
  printf '%-8s %-8s %12s %12s %12s %10s %10s\n' clients mode direct pgbouncer shardpool sp/pgb sp/direct
  for c in $CLIENTS; do
    for mode in simple extended prepared; do
      j=$(( c < 2 ? 1 : 2 ))
      d=$(run "$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER" -M $mode -c "$c" -j $j -T "$DURATION" | tps)
      b=0
      if [ "$mode" != prepared ] || [ "$PGB_PREPARED" = 1 ]; then
        b=$(run 127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER" -M $mode -c "$c" -j $j -T "$DURATION" | tps)
      fi
      s=$(run "$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi -M $mode -c "$c" -j $j -T "$DURATION" | tps)
      awk -v c="$c" -v m="$mode" -v d="${d:-0}" -v b="${b:-0}" -v s="${s:-0}" 'BEGIN {
        printf "%-8s %-8s %12.0f %12.0f %12.0f %10.2f %10.2f\n", c, m, d, b, s, (b > 0 ? s / b : 0), (d > 0 ? s / d : 0) }'
    done
  done
  echo
  echo "# latency at a fixed $RATE queries/s (8 clients, -M simple), milliseconds"
  printf '%-10s %8s %8s %8s\n' target p50 p99 mean
  for target in direct pgbouncer shardpool; do
    rm -f "$WORK"/pgbench_log.*
    case $target in
      direct) args=("$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
      pgbouncer) args=(127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
      shardpool) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi) ;;
    esac
    (cd "$WORK" && run "${args[@]}" -M simple -c 8 -j 2 -R "$RATE" -T "$DURATION" -l >/dev/null)
    cat "$WORK"/pgbench_log.* | awk '{print $3/1000}' | sort -n | awk -v t=$target '
      {v[NR]=$1; s+=$1} END {printf "%-10s %8.3f %8.3f %8.3f\n", t, v[int(NR*0.5)], v[int(NR*0.99)], s/NR}'
  done
} | tee "$out"
log "results: $out"
