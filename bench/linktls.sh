#!/usr/bin/env bash
# What mutual TLS on the router-to-shard links costs, measured side by side
# in one run on this machine: the same release install, the same bench
# source and pgbench -S load, with `links.mutualTLS` on and off in turns
# (ABBA order over ROUNDS rounds, so neither setting always runs first or
# on a warmer host). Each switch is a helm upgrade: routers restart and the
# operator rolls the shards; the measurement starts once every router and
# shard pod is new, the source is Ready and answers through the router.
#
# Per round and setting it runs pgbench -S (simple protocol) at each of
# CLIENTS for DURATION s and reads the router's and the shard's CPU time
# (user + system, /proc/PID/stat) per query. It prints the medians and
# the ratios TLS / plain (throughput, CPU per query) and writes them to
# bench/results/linktls-<date>.txt.
#
#   bench/linktls.sh                          # 4 rounds, 16 and 64 clients, 10 s each
#   ROUNDS=6 CLIENTS="64" DURATION=20 bench/linktls.sh
#
# It brings up its own local cluster in bench/.work/state (stop a `make
# demo` cluster first: the ports are the same) and stops it at the end.
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
export LOCALKUBE_STATE="$BENCH/.work/state"
ROUNDS="${ROUNDS:-4}"
CLIENTS="${CLIENTS:-16 64}"
DURATION="${DURATION:-10}"
POOL="${POOL:-20}"
SCALE="${SCALE:-10}"
SYS=shardpool-system
mkdir -p "$BENCH/.work" "$BENCH/results"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building shardpool (release)"
(cd "$ROOT" && cargo build --locked --release --bin shardpool)
export SHARDPOOL_BIN="$ROOT/target/release/shardpool"
trap '"$ROOT/e2e/down.sh" >/dev/null 2>&1 || true' EXIT
"$ROOT/e2e/up.sh"
"$ROOT/e2e/install.sh" >/dev/null
# shellcheck disable=SC1091
source "$LOCALKUBE_STATE/env"
kc() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
HELM="$ROOT/e2e/.bin/helm"

log "bench database (scale $SCALE) and DataSource tenants/bench (pool $POOL)"
bench_source "$SCALE" "$POOL"
ROUTER_PW=$(cat "$LOCALKUBE_STATE/install/router-bi")

# ready_pods COMPONENT SINCE -> how many of its pods are Ready, not
# terminating, and created at or after SINCE (RFC 3339), and how many
# pods it has in all ("ready total").
ready_pods() {
  kc -n "$SYS" get pods -l "app.kubernetes.io/component=$1" -o json | python3 -c '
import json, sys
since = sys.argv[1]
items = json.load(sys.stdin)["items"]
ok = 0
for p in items:
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    if ready and "deletionTimestamp" not in p["metadata"] and p["metadata"]["creationTimestamp"] >= since:
        ok += 1
print(ok, len(items))' "$2"
}
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
CLK_TCK=$(getconf CLK_TCK)
SHARDS=$(kc -n "$SYS" get deploy -l app.kubernetes.io/component=shard -o name | wc -l)

# switch true|false: links.mutualTLS set, every router and shard pod new
# and Ready, the source Ready and answering through the router; sets
# ROUTER_IP, ROUTER_PID, SHARD_PID.
switch() {
  local since deadline r s
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  sleep 1 # creation timestamps have whole seconds
  "$HELM" --kubeconfig "$KUBECONFIG" upgrade shardpool "$ROOT/charts/shardpool" -n "$SYS" \
    --reuse-values --set links.mutualTLS="$1" --wait --timeout 300s >/dev/null
  deadline=$((SECONDS + 300))
  while :; do
    read -r r rt < <(ready_pods router "$since")
    read -r s st < <(ready_pods shard "$since")
    if [ "$r" = "$rt" ] && [ "$r" -ge 1 ] && [ "$s" = "$st" ] && [ "$s" = "$SHARDS" ] &&
      [ "$(kc -n tenants get datasource bench -o jsonpath='{.status.phase}')" = Ready ]; then
      ROUTER_IP=$(kc -n "$SYS" get pods -l app.kubernetes.io/component=router -o jsonpath='{.items[0].status.podIP}')
      if PGPASSWORD="$ROUTER_PW" psql -h "$ROUTER_IP" -p 5432 -U bi -d tenants.bench -Atqc 'SELECT 1' >/dev/null 2>&1; then
        break
      fi
    fi
    ((SECONDS < deadline)) || { echo "links.mutualTLS=$1: pods or the bench source not ready within 300 s" >&2; exit 1; }
    sleep 1
  done
  locate
}

# locate: ROUTER_IP, ROUTER_PID and SHARD_PID of the current pods (the
# source's shard); runs a short warm-up through them.
locate() {
  local shard ip
  for _ in $(seq 1 120); do
    [ "$(kc -n tenants get datasource bench -o jsonpath='{.status.phase}')" = Ready ] && break
    sleep 0.5
  done
  ROUTER_IP=$(kc -n "$SYS" get pods -l app.kubernetes.io/component=router -o jsonpath='{.items[0].status.podIP}')
  shard=$(kc -n tenants get datasource bench -o jsonpath='{.status.shard}')
  ip=$(kc -n "$SYS" get pods -l "shardpool.dev/shard=$shard" -o jsonpath='{.items[0].status.podIP}')
  ROUTER_PID=$(listener_pid "$ROUTER_IP" 5432)
  SHARD_PID=$(listener_pid "$ip" 6432)
  [ -n "$ROUTER_PID" ] && [ -n "$SHARD_PID" ] || { echo "router or shard process not found" >&2; exit 1; }
  # The new pods' pools warm and their links open: one short run first.
  PGPASSWORD="$ROUTER_PW" pgbench -h "$ROUTER_IP" -p 5432 -U bi -n -S -c 4 -j 2 -T 2 tenants.bench >/dev/null 2>&1 || true
}

# measure CLIENTS -> "tps router_us shard_us"
measure() {
  local r0 s0 r1 s1 out n tps
  r0=$(cpu_ticks "$ROUTER_PID")
  s0=$(cpu_ticks "$SHARD_PID")
  out=$(PGPASSWORD="$ROUTER_PW" pgbench -h "$ROUTER_IP" -p 5432 -U bi -n -S -M simple -c "$1" -j 2 -T "$DURATION" tenants.bench 2>&1)
  r1=$(cpu_ticks "$ROUTER_PID")
  s1=$(cpu_ticks "$SHARD_PID")
  n=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' | head -n 1)
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1)
  awk -v n="${n:-0}" -v t="${tps:-0}" -v r=$((r1 - r0)) -v s=$((s1 - s0)) -v hz="$CLK_TCK" \
    'BEGIN { if (n > 0) printf "%.0f %.2f %.2f\n", t, r * 1e6 / hz / n, s * 1e6 / hz / n; else print "0 0 0" }'
}
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'; }

declare -A ROWS
CURRENT=true # the chart's default, as installed
locate
for round in $(seq "$ROUNDS"); do
  # ABBA: tls, plain, plain, tls, tls, ...
  if [ $(((round - 1) % 2)) = 0 ]; then order="true false"; else order="false true"; fi
  for mode in $order; do
    log "round $round: links.mutualTLS=$mode"
    if [ "$mode" != "$CURRENT" ]; then
      switch "$mode"
      CURRENT=$mode
    fi
    for c in $CLIENTS; do
      ROWS["$c $mode"]+="$(measure "$c");"
    done
  done
done

out="$BENCH/results/linktls-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# pgbench -S -M simple through the router, links.mutualTLS on vs off, $(nproc) cores, all on this machine"
  echo "# shardpool $(git -C "$ROOT" describe --always --dirty --abbrev=7), release build; $ROUNDS rounds (ABBA order) of $DURATION s per setting and client count; medians; CPU: user + system time per query"
  printf '%-7s %8s %8s %7s %8s %8s %7s %8s %8s %7s\n' clients "tls tps" "pln tps" ratio "tls rtr" "pln rtr" ratio "tls shd" "pln shd" ratio
  for c in $CLIENTS; do
    t=$(tr ';' '\n' <<<"${ROWS["$c true"]}" | sed '/^$/d')
    p=$(tr ';' '\n' <<<"${ROWS["$c false"]}" | sed '/^$/d')
    col() { awk -v k="$2" '{print $k}' <<<"$1" | median; }
    tt=$(col "$t" 1); pt=$(col "$p" 1); tr_=$(col "$t" 2); pr=$(col "$p" 2); ts=$(col "$t" 3); ps=$(col "$p" 3)
    printf '%-7s %8s %8s %7.3f %8s %8s %7.3f %8s %8s %7.3f\n' "$c" "$tt" "$pt" "$(awk -v a="$tt" -v b="$pt" 'BEGIN{print (b > 0 ? a / b : 0)}')" \
      "$tr_" "$pr" "$(awk -v a="$tr_" -v b="$pr" 'BEGIN{print (b > 0 ? a / b : 0)}')" \
      "$ts" "$ps" "$(awk -v a="$ts" -v b="$ps" 'BEGIN{print (b > 0 ? a / b : 0)}')"
  done
  echo "# each round (tps router_us shard_us), TLS | plain:"
  for c in $CLIENTS; do
    echo "#   $c clients: ${ROWS["$c true"]} | ${ROWS["$c false"]}"
  done
  echo "# rerun: ROUNDS=$ROUNDS CLIENTS=\"$CLIENTS\" DURATION=$DURATION bench/linktls.sh"
} | tee "$out"
log "results: $out"
