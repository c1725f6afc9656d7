#!/usr/bin/env bash
# The scale the first users run at, on the local cluster with the release
# build: N DataSources (default 6,000) with minIdle CONNS (12) and maxSize
# MAX (16) over SHARDS shards (8), created at once, against FRONTS
# PgBouncer processes standing in for the warehouses (bench/fronts.sh says
# why several). It measures, and writes to bench/results/scale-<date>.txt:
#
#   - time from the first create to every source assigned, and to every
#     source Ready with its CONNS connections;
#   - the most connections being opened at the same moment per shard (the
#     shard's own high-water mark, against its connect limit, chart value
#     shard.connectLimit) and in all;
#   - server connections per source from the warehouse side (SHOW CLIENTS
#     of the fronts, by application_name): exactly CONNS, one owner each;
#   - RSS of each shard, router and operator process;
#   - API writes per minute per resource once everything is Ready (the API
#     server's apiserver_request_total), the operator's reconcile pass
#     duration and every process's CPU at steady state.
#
#   bench/scale.sh                                  # N=6000 CONNS=12 SHARDS=8
#   N=1000 CONNS=4 SHARDS=4 FRONTS=2 bench/scale.sh # a smaller setting
#   CONNECT_LIMIT=64 bench/scale.sh                 # shard.connectLimit
#   FRONT_POOL=4 bench/scale.sh                     # server connections per front (default 16)
#   KEEP_CLUSTER=1 bench/scale.sh                   # leave the cluster and fronts running
#   LOG_LEVEL=info,shardpool::shard::pool=debug bench/scale.sh  # RUST_LOG of every component
#   NET_BACKLOG=65536 bench/scale.sh                # net.core.netdev_max_backlog for the run (root;
#                                                   # restored after): at 72,000 loopback connections
#                                                   # the default 1,000 drops keepalive probes
#   CONNS=1 SCALE_CHANGES=0 bench/scale.sh          # no rollout or rescale; beside a run
#                                                   # at CONNS=12 it splits shard memory
#                                                   # into sources and connections
#
# It brings up its own local cluster in bench/.work/state (stop a `make
# demo` cluster first: the ports are the same), installs pgbouncer from
# Debian's packages if missing, and stops everything it started (by pid)
# at the end. Not part of `make test` (it takes 5-15 minutes); the
# scaled-down check that is: e2e/tests/scalerun_test.go.
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
export LOCALKUBE_STATE="$BENCH/.work/state"
N="${N:-6000}"
CONNS="${CONNS:-12}"
MAX="${MAX:-16}"
SHARDS="${SHARDS:-8}"
FRONTS="${FRONTS:-6}"
FRONT_POOL="${FRONT_POOL:-16}"
FRONT_BASE="${FRONT_BASE:-16500}"
CONNECT_LIMIT="${CONNECT_LIMIT:-32}"
READY_LIMIT="${READY_LIMIT:-600}"
STEADY_SECONDS="${STEADY_SECONDS:-60}"
SYS=shardpool-system
mkdir -p "$BENCH/.work" "$BENCH/results"
OUT="$BENCH/results/scale-$(date +%Y%m%d-%H%M%S).txt"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Each front holds its share of the connections (plus the fencing ones)
# within one process's file limit.
per_front=$(( (N * (CONNS + 1) + FRONTS - 1) / FRONTS + 100 ))
fd_limit=$(ulimit -Hn)
if [ "$per_front" -gt $((fd_limit - 100)) ]; then
  echo "each of $FRONTS fronts would hold $per_front connections, above the file limit $fd_limit: raise FRONTS" >&2
  exit 2
fi

if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  log "installing pgbouncer (Debian package)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
export PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"

log "building shardpool (release)"
(cd "$ROOT" && cargo build --locked --release --bin shardpool)
export SHARDPOOL_BIN="$ROOT/target/release/shardpool"

export FRONTS_DIR="$BENCH/.work/fronts"
FRONTS_ADMIN_PASSWORD="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)"
export FRONTS_ADMIN_PASSWORD
# shellcheck source=bench/fronts.sh
source "$BENCH/fronts.sh"
# The kernel's view of the run: loopback packets dropped because a CPU's
# input queue was full (net.core.netdev_max_backlog), and established
# connections the kernel aborted on a timer (keepalive probes or
# retransmissions unanswered). 72,000 connections whose keepalive probes
# fire together overflow the default queue of 1,000.
kernel_counts() {
  local dropped=0 d
  while read -r _ d _; do dropped=$((dropped + 0x$d)); done < /proc/net/softnet_stat
  echo "$dropped $(awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "TCPAbortOnTimeout") c = i; h = 1 } else print $c }' /proc/net/netstat)"
}
BACKLOG_WAS="$(cat /proc/sys/net/core/netdev_max_backlog)"
if [ -n "${NET_BACKLOG:-}" ]; then
  log "net.core.netdev_max_backlog $BACKLOG_WAS -> $NET_BACKLOG for this run"
  echo "$NET_BACKLOG" > /proc/sys/net/core/netdev_max_backlog
fi
cleanup() {
  [ -z "${NET_BACKLOG:-}" ] || echo "$BACKLOG_WAS" > /proc/sys/net/core/netdev_max_backlog || true
  if [ -n "${KEEP_CLUSTER:-}" ]; then
    log "KEEP_CLUSTER: left running; stop with: FRONTS_DIR=$FRONTS_DIR bash -c 'source bench/fronts.sh; fronts_stop'; LOCALKUBE_STATE=$LOCALKUBE_STATE e2e/down.sh"
    return
  fi
  fronts_stop
  "$ROOT/e2e/down.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$ROOT/e2e/up.sh"
"$ROOT/e2e/install.sh" >/dev/null
# shellcheck disable=SC1091
source "$LOCALKUBE_STATE/env"
kc() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }
HELM="$ROOT/e2e/.bin/helm"

log "$SHARDS shards, connect limit $CONNECT_LIMIT"
"$HELM" --kubeconfig "$KUBECONFIG" upgrade shardpool "$ROOT/charts/shardpool" -n "$SYS" \
  --reuse-values --set shard.count="$SHARDS" --set shard.connectLimit="$CONNECT_LIMIT" \
  ${LOG_LEVEL:+--set-string "logLevel=${LOG_LEVEL//,/\\,}"} --wait --timeout 180s >/dev/null
deadline=$((SECONDS + 180))
until [ "$(kc -n "$SYS" get pods -l app.kubernetes.io/component=shard -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -cx True || true)" = "$SHARDS" ]; do
  ((SECONDS < deadline)) || { echo "$SHARDS shards not Ready within 180 s" >&2; exit 1; }
  sleep 1
done

log "warehouse database bench_scale, role bench_scale; $FRONTS PgBouncer fronts on 127.0.0.1:$FRONT_BASE.. ($per_front clients each at most)"
PW="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)"
PGPASSWORD="$WAREHOUSE_PGPASSWORD" psql -q -h "$WAREHOUSE_PGHOST" -p "$WAREHOUSE_PGPORT" -U "$WAREHOUSE_PGUSER" -d postgres -v ON_ERROR_STOP=1 \
  -c "DROP DATABASE IF EXISTS bench_scale" -c "DROP ROLE IF EXISTS bench_scale" \
  -c "CREATE ROLE bench_scale LOGIN PASSWORD '$PW'" -c "CREATE DATABASE bench_scale OWNER bench_scale"
fronts_start "$FRONTS" "$FRONT_BASE" bench_scale bench_scale "$PW" "$per_front"
ports=""
for ((k = 0; k < FRONTS; k++)); do ports="$ports $((FRONT_BASE + k))"; done

{
  echo "# shardpool scale benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "# shardpool $(git -C "$ROOT" describe --always --dirty --abbrev=7), release build; $("$PGBOUNCER" --version | head -n 1) x $FRONTS as the warehouse side"
  echo "# N=$N CONNS=$CONNS MAX=$MAX SHARDS=$SHARDS FRONTS=$FRONTS FRONT_POOL=$FRONT_POOL CONNECT_LIMIT=$CONNECT_LIMIT"
  echo "# net.core.netdev_max_backlog $(cat /proc/sys/net/core/netdev_max_backlog)"
} > "$OUT"
read -r dropped0 aborted0 < <(kernel_counts)

log "running the measurement (e2e/tests/scalebench_test.go)"
cd "$ROOT/e2e"
SCALE_OUT="$OUT" SCALE_N="$N" SCALE_CONNS="$CONNS" SCALE_MAX="$MAX" SCALE_FRONT_PORTS="$ports" \
  SCALE_ADMIN_PASSWORD="$FRONTS_ADMIN_PASSWORD" SCALE_DATABASE=bench_scale SCALE_USER=bench_scale SCALE_PASSWORD="$PW" \
  SCALE_READY_LIMIT="$READY_LIMIT" SCALE_STEADY_SECONDS="$STEADY_SECONDS" \
  go test -tags scalebench ./tests/ -count=1 -timeout 60m -v -run '^TestScaleBench$' > "$BENCH/.work/scale-test.log" 2>&1 && status=0 || status=$?
grep -E '^\s*(--- |FAIL|ok|PASS)|_test.go:[0-9]+:' "$BENCH/.work/scale-test.log" | tail -n 60 >&2 || true
read -r dropped1 aborted1 < <(kernel_counts)
echo "kernel during the measurement: $((dropped1 - dropped0)) loopback packets dropped (input queue full), $((aborted1 - aborted0)) connections aborted on a timer (TCPAbortOnTimeout)" >> "$OUT"
echo "# rerun: ${NET_BACKLOG:+NET_BACKLOG=$NET_BACKLOG }N=$N CONNS=$CONNS MAX=$MAX SHARDS=$SHARDS FRONTS=$FRONTS FRONT_POOL=$FRONT_POOL CONNECT_LIMIT=$CONNECT_LIMIT bench/scale.sh" >> "$OUT"
cat "$OUT"
log "results in $OUT (test log: bench/.work/scale-test.log)"
exit "$status"
