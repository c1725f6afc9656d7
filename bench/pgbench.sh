#!/usr/bin/env bash
# Throughput and latency, side by side in one run on this machine:
# pgbench -S directly against the warehouse PostgreSQL, through PgBouncer
# (transaction mode), and through shardpool (router -> shard -> warehouse,
# release build, on the local cluster).
#
#   bench/pgbench.sh                 # 16 and 64 clients, 3 rounds of 10 s each
#   CLIENTS="16 64" DURATION=20 REPEAT=5 bench/pgbench.sh
#
# Each round runs direct, PgBouncer and shardpool back to back; the table
# gives the median over the rounds (ratios: the median of each round's
# ratio), so a slow spell of the host hits all three alike. When perf is
# installed it also counts the CPU time and context switches per query of
# PgBouncer and of shardpool's router plus shard, and /proc/stat gives the
# share of CPU time the hypervisor stole during the runs.
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
DURATION="${DURATION:-10}"
REPEAT="${REPEAT:-3}"
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

# The processes whose CPU time is counted: PgBouncer, and the router and
# the shard serving the bench source (found by their listening sockets).
listener_pid() { ss -ltnpH "src $1:$2" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1; }
SHARD_IDX=$(kc -n tenants get datasource bench -o jsonpath='{.status.shard}')
SHARD_IP=$(kc -n shardpool-system get pods -l "shardpool.dev/shard=$SHARD_IDX" -o jsonpath='{.items[0].status.podIP}')
SP_PIDS="$(listener_pid "$ROUTER_IP" 5432),$(listener_pid "$SHARD_IP" 6432)"
PERF="$(command -v perf || true)"
if [ -n "$PERF" ] && ! "$PERF" stat -e task-clock -p "$PGB_PID" -- sleep 0.1 >/dev/null 2>&1; then PERF=""; fi
[ -n "$PERF" ] || log "perf not usable: CPU per query is not reported"

cpu_snapshot() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

# measure TARGET ARGS... -> "tps cpu_us_per_query cs_per_query steal_percent"
# (cpu and cs "-" for direct, or without perf).
measure() {
  local target=$1; shift
  local args pids="" perfpid="" res n tps s0 s1 steal cpu="-" cs="-"
  case $target in
    direct) args=("$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
    pgbouncer) args=(127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER"); pids=$PGB_PID ;;
    shardpool) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi); pids=$SP_PIDS ;;
  esac
  rm -f "$WORK/perf.txt"
  if [ -n "$PERF" ] && [ -n "$pids" ]; then
    "$PERF" stat -x, -e task-clock,context-switches -p "$pids" -o "$WORK/perf.txt" &
    perfpid=$!
  fi
  s0=$(cpu_snapshot)
  res=$(run "${args[@]}" "$@")
  s1=$(cpu_snapshot)
  if [ -n "$perfpid" ]; then kill -INT "$perfpid" 2>/dev/null || true; wait "$perfpid" 2>/dev/null || true; fi
  n=$(echo "$res" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' | head -n 1)
  tps=$(echo "$res" | tps)
  steal=$(echo "$s0 $s1" | awk '{printf "%.0f", ($4 > $2 ? 100 * ($3 - $1) / ($4 - $2) : 0)}')
  if [ -n "$perfpid" ] && [ -s "$WORK/perf.txt" ] && [ "${n:-0}" -gt 0 ]; then
    cpu=$(awk -F, -v n="$n" '$3 == "task-clock" {printf "%.1f", $1 * 1000 / n}' "$WORK/perf.txt")
    cs=$(awk -F, -v n="$n" '$3 == "context-switches" {printf "%.2f", $1 / n}' "$WORK/perf.txt")
  fi
  echo "${tps:-0} ${cpu:--} ${cs:--} $steal"
}
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'; }

out="$BENCH/results/pgbench-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# pgbench -S (select-only), medians of $REPEAT rounds of $DURATION s per target, scale $SCALE, server pool $POOL, $(nproc) cores, all on this machine"
  echo "# shardpool $(git -C "$ROOT" rev-parse --short HEAD), release build; PgBouncer $PGB_VERSION, transaction mode (0 = not run: prepared statements need PgBouncer 1.21+)"
  echo "# cpu us/q: CPU time per query of PgBouncer, and of the router plus the shard; cs/q: their context switches per query; steal: CPU time taken by the hypervisor"
  ROUNDS=()
  printf '%-7s %-8s %9s %9s %9s %7s %9s %9s %9s %7s %7s %6s\n' clients mode direct pgbouncer shardpool sp/pgb sp/direct "pgb us/q" "sp us/q" "pgb cs" "sp cs" steal
  for c in $CLIENTS; do
    for mode in simple extended prepared; do
      j=$(( c < 2 ? 1 : 2 ))
      rows=()
      for _ in $(seq "$REPEAT"); do
        d=$(measure direct -M $mode -c "$c" -j $j -T "$DURATION")
        b="0 - - 0"
        if [ "$mode" != prepared ] || [ "$PGB_PREPARED" = 1 ]; then
          b=$(measure pgbouncer -M $mode -c "$c" -j $j -T "$DURATION")
        fi
        s=$(measure shardpool -M $mode -c "$c" -j $j -T "$DURATION")
        rows+=("$d $b $s")
      done
      # columns per round: d_tps d_cpu d_cs d_steal b_tps b_cpu b_cs b_steal s_tps s_cpu s_cs s_steal
      col() { printf '%s\n' "${rows[@]}" | awk -v k="$1" '$k != "-" {print $k}' | median; }
      ratio() { printf '%s\n' "${rows[@]}" | awk -v a="$1" -v b="$2" '$b > 0 {printf "%.3f\n", $a / $b}' | median; }
      steal=$(printf '%s\n' "${rows[@]}" | awk '{print ($4 + $8 + $12) / 3}' | median)
      ROUNDS+=("$c $mode: $(printf '%s\n' "${rows[@]}" | awk '{printf "%s%.0f/%.0f/%.0f", (NR > 1 ? ", " : ""), $1, $5, $9}')")
      printf '%-7s %-8s %9.0f %9.0f %9.0f %7.2f %9.2f %9s %9s %9s %7s %5.0f%%\n' "$c" "$mode" \
        "$(col 1)" "$(col 5)" "$(col 9)" "$(ratio 9 5 | sed 's/^-$/0/')" "$(ratio 9 1 | sed 's/^-$/0/')" \
        "$(col 6)" "$(col 10)" "$(col 7)" "$(col 11)" "$steal"
    done
  done
  echo "# each round's tps, direct/pgbouncer/shardpool:"
  printf '#   %s\n' "${ROUNDS[@]}"
  echo
  echo "# latency at a fixed $RATE queries/s (8 clients, -M simple), milliseconds: medians of $REPEAT rounds; added = the round's p50 minus direct's"
  printf '%-10s %8s %8s %8s %10s\n' target p50 p99 mean "added p50"
  declare -A P50 P99 MEAN ADDED LROUNDS
  for _ in $(seq "$REPEAT"); do
    dp50=""
    for target in direct pgbouncer shardpool; do
      rm -f "$WORK"/pgbench_log.*
      case $target in
        direct) args=("$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
        pgbouncer) args=(127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
        shardpool) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi) ;;
      esac
      (cd "$WORK" && run "${args[@]}" -M simple -c 8 -j 2 -R "$RATE" -T "$DURATION" -l >/dev/null)
      read -r p50 p99 mean < <(cat "$WORK"/pgbench_log.* | awk '{print $3/1000}' | sort -g | awk '
        {v[NR]=$1; s+=$1} END {printf "%.3f %.3f %.3f\n", v[int(NR*0.5)], v[int(NR*0.99)], s/NR}')
      [ "$target" = direct ] && dp50=$p50
      LROUNDS[$target]+="$p50 "
      P50[$target]+="$p50 "; P99[$target]+="$p99 "; MEAN[$target]+="$mean "
      ADDED[$target]+="$(awk -v a="$p50" -v b="$dp50" 'BEGIN {printf "%.3f", a - b}') "
    done
  done
  for target in direct pgbouncer shardpool; do
    m() { printf '%s\n' $1 | median; }
    printf '%-10s %8s %8s %8s %10s\n' "$target" "$(m "${P50[$target]}")" "$(m "${P99[$target]}")" "$(m "${MEAN[$target]}")" "$(m "${ADDED[$target]}")"
  done
  for target in direct pgbouncer shardpool; do
    echo "#   $target p50 per round: ${LROUNDS[$target]}"
  done
} | tee "$out"
log "results: $out"
