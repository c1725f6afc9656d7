#!/usr/bin/env bash
# Throughput and latency, side by side in one run on this machine:
# pgbench -S directly against the warehouse PostgreSQL, through PgBouncer
# (transaction mode), through two PgBouncers in a row (the same two hops as
# router -> shard: the cost of the path's length apart from the software),
# and through shardpool (router -> shard -> warehouse, release build, on the
# local cluster), twice: `sp` with admission on (the default: every
# transaction goes through its source's admission queue, no limit
# reached) and `noadm` with it bypassed on the same source, shard process
# and links (annotation shardpool.dev/benchmark-bypass-admission, set for
# that run only), so `sp/noa` is what admission costs.
#
#   bench/pgbench.sh                 # 16 and 64 clients, 3 rounds of 10 s each
#   CLIENTS="16 64" DURATION=20 REPEAT=5 bench/pgbench.sh
#   CLIENTS= bench/pgbench.sh        # only the latency at a fixed rate
#   PIN=1 bench/pgbench.sh           # pgbench and PostgreSQL on CPU 0, the proxies on CPU 1
#
# PIN=1 shows what carries over to a cluster, where the proxies run on
# their own nodes: the proxies' CPU is no longer taken from the database's
# (pgbench and PostgreSQL get one core; PgBouncer, or router and shard
# together, the other). The default runs everything on every core.
#
# The latency part interleaves LAT_REPEAT (default 10) short rounds of
# LAT_DURATION s (default 3) per target: the host has slow spells of
# seconds, and a median over many short interleaved rounds passes them by.
#
# Each round runs the four back to back; the table gives the median over
# the rounds (ratios: the median of each round's ratio), so a slow spell of
# the host hits all of them alike. When perf is installed it also counts
# the CPU time and context switches per query of PgBouncer, of the two
# PgBouncers, of the router and of the shard, and /proc/stat gives the
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
CLIENTS="${CLIENTS-16 64}"
DURATION="${DURATION:-10}"
REPEAT="${REPEAT:-3}"
RATE="${RATE:-1000}"
LAT_REPEAT="${LAT_REPEAT:-10}"
LAT_DURATION="${LAT_DURATION:-3}"
POOL="${POOL:-20}"
PIN="${PIN:-0}"
SCALE="${SCALE:-10}"
PGB_PORT="${PGB_PORT:-16432}"
PGB2_PORT="${PGB2_PORT:-16433}"
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
PGB2_PID=""
cleanup() {
  for pid in $PGB2_PID $PGB_PID; do
    if kill -0 "$pid" 2>/dev/null; then kill -INT "$pid"; fi
  done
  "$ROOT/e2e/down.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$ROOT/e2e/up.sh"
"$ROOT/e2e/install.sh" >/dev/null
# shellcheck disable=SC1091
source "$LOCALKUBE_STATE/env"
kc() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

log "preparing the bench database (scale $SCALE) and its DataSource (pool $POOL)"
bench_source "$SCALE" "$POOL"
ROUTER_IP=$(kc -n shardpool-system get pods -l app.kubernetes.io/component=router -o jsonpath='{.items[0].status.podIP}')
ROUTER_PW=$(cat "$LOCALKUBE_STATE/install/router-bi")

log "starting pgbouncer on 127.0.0.1:$PGB_PORT (transaction mode, pool $POOL), and a second one on :$PGB2_PORT in front of it"
PGB="$WORK/pgbouncer"
mkdir -p "$PGB"
printf '"%s" "%s"\n' "$WAREHOUSE_PGUSER" "$WAREHOUSE_PGPASSWORD" > "$PGB/userlist.txt"
PGB_VERSION=$("$PGBOUNCER" --version | head -n 1 | awk '{print $2}')
# Prepared statements in transaction mode need PgBouncer 1.21+.
PGB_PREPARED=0
if printf '1.21\n%s\n' "$PGB_VERSION" | sort -V -C; then PGB_PREPARED=1; fi
# pgbouncer_ini NAME LISTEN_PORT SERVER_HOST SERVER_PORT
pgbouncer_ini() {
  cat > "$PGB/$1.ini" <<INI
[databases]
bench = host=$3 port=$4 dbname=bench user=$WAREHOUSE_PGUSER password=$WAREHOUSE_PGPASSWORD
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $PGB/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = $POOL
max_client_conn = 1000
logfile = $PGB/$1.log
pidfile = $PGB/$1.pid
INI
  if [ "$PGB_PREPARED" = 1 ]; then echo "max_prepared_statements = 200" >> "$PGB/$1.ini"; fi
}
# The first in front of the warehouse; the second in front of the first:
# two hops of PgBouncer, the same path length as router -> shard.
pgbouncer_ini pgbouncer "$PGB_PORT" "$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT"
pgbouncer_ini pgbouncer2 "$PGB2_PORT" 127.0.0.1 "$PGB_PORT"
chmod 600 "$PGB"/userlist.txt "$PGB"/*.ini
# start_pgbouncer NAME -> its pid (daemonised, so tracked by its pid file)
start_pgbouncer() {
  rm -f "$PGB/$1.pid"
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres: "$PGB"
    runuser -u postgres -- "$PGBOUNCER" -d "$PGB/$1.ini" >/dev/null 2>&1
  else
    "$PGBOUNCER" -d "$PGB/$1.ini" >/dev/null 2>&1
  fi
  for _ in $(seq 1 50); do [ -s "$PGB/$1.pid" ] && break; sleep 0.1; done
  cat "$PGB/$1.pid"
}
PGB_PID=$(start_pgbouncer pgbouncer)
PGB2_PID=$(start_pgbouncer pgbouncer2)

# run NAME HOST PORT DB PASSWORD ARGS... -> prints "tps latency_ms"
ON_DB_CPU=()
[ "$PIN" = 1 ] && ON_DB_CPU=(taskset -c 0)
run() {
  local host=$1 port=$2 db=$3 pw=$4 user=$5; shift 5
  PGPASSWORD="$pw" "${ON_DB_CPU[@]}" pgbench -h "$host" -p "$port" -U "$user" -n -S "$@" "$db" 2>&1
}
tps() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1; }

# The processes whose CPU time is counted: PgBouncer, and the router and
# the shard serving the bench source (found by their listening sockets).
SHARD_IDX=$(kc -n tenants get datasource bench -o jsonpath='{.status.shard}')
SHARD_IP=$(kc -n shardpool-system get pods -l "shardpool.dev/shard=$SHARD_IDX" -o jsonpath='{.items[0].status.podIP}')
ROUTER_PID=$(listener_pid "$ROUTER_IP" 5432)
SHARD_PID=$(listener_pid "$SHARD_IP" 6432)
# PIN=1: the warehouse's postmaster and its backends (new ones inherit it)
# on CPU 0, PgBouncer, router and shard on CPU 1; all by pid.
if [ "$PIN" = 1 ]; then
  PM_PID=$(head -n 1 "$LOCALKUBE_STATE/warehouse/postmaster.pid")
  for p in "$PM_PID" $(pgrep -P "$PM_PID"); do taskset -a -c -p 0 "$p" >/dev/null; done
  for p in "$PGB_PID" "$PGB2_PID" "$ROUTER_PID" "$SHARD_PID"; do taskset -a -c -p 1 "$p" >/dev/null; done
fi
PERF="$(command -v perf || true)"
if [ -n "$PERF" ] && ! "$PERF" stat -e task-clock -p "$PGB_PID" -- sleep 0.1 >/dev/null 2>&1; then PERF=""; fi
[ -n "$PERF" ] || log "perf not usable: CPU per query is not reported"

cpu_snapshot() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# kernel_ticks PID[,PID...] -> the processes' summed system time (stime) in clock ticks
CLK_TCK=$(getconf CLK_TCK)
kernel_ticks() {
  local t=0 p
  for p in ${1//,/ }; do t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $13}'))); done
  echo "$t"
}

# measure TARGET ARGS... -> "tps steal% cpuA csA cpuB csB kA kB": CPU
# time (us) and context switches per query of the target's processes, and
# the part of that CPU time spent in the kernel (us per query, from
# /proc/PID/stat), A and B counted apart: shardpool A = router, B = shard;
# pgbouncer A = it; pgbouncer2 A = both PgBouncers together. "-" where not
# counted.
measure() {
  local target=$1; shift
  local args groups=() pids=() perfpids=() k0=() k1=() res n tps s0 s1 steal i out=("-" "-" "-" "-") kern=("-" "-")
  case $target in
    direct) args=("$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
    pgbouncer) args=(127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER"); groups=("$PGB_PID") ;;
    pgbouncer2) args=(127.0.0.1 "$PGB2_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER"); groups=("$PGB_PID,$PGB2_PID") ;;
    shardpool) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi); groups=("$ROUTER_PID" "$SHARD_PID") ;;
    noadm) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi); groups=("$ROUTER_PID" "$SHARD_PID") ;;
  esac
  if [ "$target" = noadm ]; then bypass true; fi
  pids=("${groups[@]}") # kernel time comes from /proc, with or without perf
  [ -n "$PERF" ] || groups=()
  for i in "${!groups[@]}"; do
    rm -f "$WORK/perf.$i.txt"
    "$PERF" stat -x, -e task-clock,context-switches -p "${groups[$i]}" -o "$WORK/perf.$i.txt" &
    perfpids+=($!)
  done
  for i in "${!pids[@]}"; do k0[i]=$(kernel_ticks "${pids[$i]}"); done
  s0=$(cpu_snapshot)
  res=$(run "${args[@]}" "$@")
  s1=$(cpu_snapshot)
  for i in "${!pids[@]}"; do k1[i]=$(kernel_ticks "${pids[$i]}"); done
  for i in "${!perfpids[@]}"; do kill -INT "${perfpids[$i]}" 2>/dev/null || true; wait "${perfpids[$i]}" 2>/dev/null || true; done
  if [ "$target" = noadm ]; then bypass false; fi
  n=$(echo "$res" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' | head -n 1)
  tps=$(echo "$res" | tps)
  steal=$(echo "$s0 $s1" | awk '{printf "%.0f", ($4 > $2 ? 100 * ($3 - $1) / ($4 - $2) : 0)}')
  for i in "${!perfpids[@]}"; do
    if [ -s "$WORK/perf.$i.txt" ] && [ "${n:-0}" -gt 0 ]; then
      out[$((2 * i))]=$(awk -F, -v n="$n" '$3 == "task-clock" {printf "%.1f", $1 * 1000 / n}' "$WORK/perf.$i.txt")
      out[$((2 * i + 1))]=$(awk -F, -v n="$n" '$3 == "context-switches" {printf "%.2f", $1 / n}' "$WORK/perf.$i.txt")
    fi
  done
  for i in "${!pids[@]}"; do
    if [ "${n:-0}" -gt 0 ]; then kern[i]=$(awk -v t="$((k1[i] - k0[i]))" -v hz="$CLK_TCK" -v n="$n" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}'); fi
  done
  echo "${tps:-0} $steal ${out[*]} ${kern[*]}"
}
# bypass true|false: admission of the bench source off (on) for the next
# run; the shard applies an annotation within milliseconds of the watch
# event, 2 s are given.
bypass() {
  if [ "$1" = true ]; then
    kc -n tenants annotate datasource bench shardpool.dev/benchmark-bypass-admission=true --overwrite >/dev/null
  else
    kc -n tenants annotate datasource bench shardpool.dev/benchmark-bypass-admission- >/dev/null
  fi
  sleep 2
}
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'; }

out="$BENCH/results/pgbench-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# pgbench -S (select-only), scale $SCALE, server pool $POOL, $(nproc) cores, all on this machine"
  echo "# shardpool $(git -C "$ROOT" describe --always --dirty --abbrev=7), release build; PgBouncer $PGB_VERSION, transaction mode (0 = not run: prepared statements need PgBouncer 1.21+)"
  echo "# pgb x2: two PgBouncers in a row (client -> PgBouncer -> PgBouncer -> PostgreSQL), the same two hops as router -> shard"
  if [ "$PIN" = 1 ]; then echo "# PIN=1: pgbench and PostgreSQL pinned to CPU 0, PgBouncer(s), router and shard to CPU 1"; fi
  ROUNDS=()
  ALL=()
  if [ -n "$CLIENTS" ]; then
    echo "# throughput: medians of $REPEAT rounds of $DURATION s per target"
    echo "# us: CPU time per query of PgBouncer, of both PgBouncers of pgb x2, of the router and of the shard; ks: the kernel's part of it (system time); cs: context switches per query (router + shard for sp); steal: CPU time taken by the hypervisor"
    echo "# noadm: shardpool with admission bypassed; sp/noa: what admission leaves of the throughput (1.000 = free); noa us: the shard's CPU time per query without admission"
    printf '%-7s %-8s %7s %7s %7s %7s %6s %6s %6s %7s %7s %7s %7s %6s %6s %6s %6s %6s %6s %5s %7s %6s %6s\n' clients mode direct pgb "pgb x2" sp sp/pgb "sp/x2" sp/dir "pgb us" "x2 us" "rtr us" "shd us" "pgb ks" "x2 ks" "rtr ks" "shd ks" "pgb cs" "sp cs" steal noadm sp/noa "noa us"
    for c in $CLIENTS; do
      for mode in simple extended prepared; do
        j=$(( c < 2 ? 1 : 2 ))
        rows=()
        for round in $(seq "$REPEAT"); do
          d=$(measure direct -M $mode -c "$c" -j $j -T "$DURATION")
          b="0 0 - - - - - -"
          b2="0 0 - - - - - -"
          if [ "$mode" != prepared ] || [ "$PGB_PREPARED" = 1 ]; then
            b=$(measure pgbouncer -M $mode -c "$c" -j $j -T "$DURATION")
            b2=$(measure pgbouncer2 -M $mode -c "$c" -j $j -T "$DURATION")
          fi
          # With and without admission in turns, so neither always runs first.
          if [ $((round % 2)) = 1 ]; then
            s=$(measure shardpool -M $mode -c "$c" -j $j -T "$DURATION")
            r=$(measure noadm -M $mode -c "$c" -j $j -T "$DURATION")
          else
            r=$(measure noadm -M $mode -c "$c" -j $j -T "$DURATION")
            s=$(measure shardpool -M $mode -c "$c" -j $j -T "$DURATION")
          fi
          rows+=("$d $b $b2 $s $r")
        done
        # fields per round, 8 per target (tps steal cpuA csA cpuB csB kA kB):
        # direct 1-8, pgbouncer 9-16, pgbouncer2 17-24, shardpool 25-32,
        # shardpool without admission 33-40
        col() { printf '%s\n' "${rows[@]}" | awk -v k="$1" '$k != "-" {print $k}' | median; }
        ratio() { printf '%s\n' "${rows[@]}" | awk -v a="$1" -v b="$2" '$b > 0 {printf "%.3f\n", $a / $b}' | median; }
        spcs=$(printf '%s\n' "${rows[@]}" | awk '$28 != "-" && $30 != "-" {printf "%.2f\n", $28 + $30}' | median)
        steal=$(printf '%s\n' "${rows[@]}" | awk '{print ($2 + $10 + $18 + $26) / 4}' | median)
        ALL+=("${rows[@]}")
        ROUNDS+=("$c $mode: $(printf '%s\n' "${rows[@]}" | awk '{printf "%s%.0f/%.0f/%.0f/%.0f/%.0f", (NR > 1 ? ", " : ""), $1, $9, $17, $25, $33}')")
        printf '%-7s %-8s %7.0f %7.0f %7.0f %7.0f %6.2f %6.2f %6.2f %7s %7s %7s %7s %6s %6s %6s %6s %6s %6s %4.0f%% %7.0f %6.3f %6s\n' "$c" "$mode" \
          "$(col 1)" "$(col 9)" "$(col 17)" "$(col 25)" \
          "$(ratio 25 9 | sed 's/^-$/0/')" "$(ratio 25 17 | sed 's/^-$/0/')" "$(ratio 25 1 | sed 's/^-$/0/')" \
          "$(col 11)" "$(col 19)" "$(col 27)" "$(col 29)" "$(col 15)" "$(col 23)" "$(col 31)" "$(col 32)" "$(col 12)" "$spcs" "$steal" \
          "$(col 33)" "$(ratio 25 33 | sed 's/^-$/0/')" "$(col 37)"
      done
    done
    amed=$(printf '%s\n' "${ALL[@]}" | awk '$33 > 0 {printf "%.4f\n", $25 / $33}' | median)
    printf '%s\n' "${ALL[@]}" | awk -v med="$amed" '$33 > 0 {n++; m += $25 / $33; s += $25; t += $33} END {
      if (n > 0) printf "# admission over all %d rounds: sp/noa median %.3f, mean %.3f, total throughput ratio %.3f\n", n, med, m / n, s / t }'
    echo "# each round's tps, direct/pgbouncer/pgbouncer x2/shardpool/shardpool without admission:"
    printf '#   %s\n' "${ROUNDS[@]}"
    echo
  fi
  echo "# latency at a fixed $RATE queries/s (8 clients, -M simple), milliseconds: medians of $LAT_REPEAT interleaved rounds of $LAT_DURATION s; added = the round's p50 minus direct's"
  printf '%-10s %8s %8s %8s %10s\n' target p50 p99 mean "added p50"
  declare -A P50 P99 MEAN ADDED LROUNDS
  for _ in $(seq "$LAT_REPEAT"); do
    dp50=""
    for target in direct pgbouncer pgbouncer2 shardpool; do
      rm -f "$WORK"/pgbench_log.*
      case $target in
        direct) args=("$WAREHOUSE_PGHOST" "$WAREHOUSE_PGPORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
        pgbouncer) args=(127.0.0.1 "$PGB_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
        pgbouncer2) args=(127.0.0.1 "$PGB2_PORT" bench "$WAREHOUSE_PGPASSWORD" "$WAREHOUSE_PGUSER") ;;
        shardpool) args=("$ROUTER_IP" 5432 tenants.bench "$ROUTER_PW" bi) ;;
      esac
      (cd "$WORK" && run "${args[@]}" -M simple -c 8 -j 2 -R "$RATE" -T "$LAT_DURATION" -l >/dev/null)
      read -r p50 p99 mean < <(cat "$WORK"/pgbench_log.* | awk '{print $3/1000}' | sort -g | awk '
        {v[NR]=$1; s+=$1} END {printf "%.3f %.3f %.3f\n", v[int(NR*0.5)], v[int(NR*0.99)], s/NR}')
      [ "$target" = direct ] && dp50=$p50
      LROUNDS[$target]+="$p50 "
      P50[$target]+="$p50 "; P99[$target]+="$p99 "; MEAN[$target]+="$mean "
      ADDED[$target]+="$(awk -v a="$p50" -v b="$dp50" 'BEGIN {printf "%.3f", a - b}') "
    done
  done
  for target in direct pgbouncer pgbouncer2 shardpool; do
    m() { printf '%s\n' $1 | median; }
    printf '%-10s %8s %8s %8s %10s\n' "$target" "$(m "${P50[$target]}")" "$(m "${P99[$target]}")" "$(m "${MEAN[$target]}")" "$(m "${ADDED[$target]}")"
  done
  for target in direct pgbouncer pgbouncer2 shardpool; do
    echo "#   $target p50 per round: ${LROUNDS[$target]}"
  done
} | tee "$out"
log "results: $out"
