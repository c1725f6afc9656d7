#!/usr/bin/env bash
# 1,000 sources over 4 shards, on the local cluster with the release build:
#
#   1. the operator's initial sync: with N DataSources present and no
#      operator running, start the operator and time until every source has
#      its shard in status (and, separately, until every one is Ready);
#   2. the spread: sources and summed maxSize per shard against the load
#      bound (1 + epsilon) x mean;
#   3. memory: each shard process's RSS before the sources, with them
#      served but no connection open (minIdle 0), and with one warm server
#      connection each (minIdle 1, applied as a spec change), per source;
#   4. exactly one server connection per source in pg_stat_activity, and a
#      sample of sources answering through the router.
#
#   bench/sources.sh                  # N=1000 SHARDS=4
#   N=2000 SHARDS=4 bench/sources.sh
#
# It brings up its own local cluster in bench/.work/state (stop a `make
# demo` cluster first: the ports are the same) and stops it at the end.
# Results go to stdout and bench/results/sources-<date>.txt.
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
export LOCALKUBE_STATE="$BENCH/.work/state"
N="${N:-1000}"
SHARDS="${SHARDS:-4}"
NS=bench-many
SYS=shardpool-system
export WAREHOUSE_MAX_CONNECTIONS=$((N + 200))
mkdir -p "$BENCH/.work" "$BENCH/results"
OUT="$BENCH/results/sources-$(date +%Y%m%d-%H%M%S).txt"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
say() { printf '%s\n' "$*" | tee -a "$OUT"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

log "building shardpool (release)"
(cd "$ROOT" && cargo build --locked --release --bin shardpool)
export SHARDPOOL_BIN="$ROOT/target/release/shardpool"
cleanup() { "$ROOT/e2e/down.sh" >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$ROOT/e2e/up.sh"
"$ROOT/e2e/install.sh" >/dev/null
# shellcheck disable=SC1091
source "$LOCALKUBE_STATE/env"
source "$ROOT/e2e/lib.sh"
kc() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }
"$HELM" --kubeconfig "$KUBECONFIG" upgrade shardpool "$ROOT/charts/shardpool" -n "$SYS" \
  --reuse-values --set shard.count="$SHARDS" --wait --timeout 120s >/dev/null
deadline=$((SECONDS + 120))
until [ "$(kc -n "$SYS" get pods -l app.kubernetes.io/component=shard -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)" = "$SHARDS" ]; do
  ((SECONDS < deadline)) || { echo "shards not Ready" >&2; exit 1; }
  sleep 1
done

shard_pids() {
  kc -n "$SYS" get pods -l app.kubernetes.io/component=shard \
    -o jsonpath='{range .items[*]}{.metadata.labels.shardpool\.dev/shard} {.status.containerStatuses[0].containerID}{"\n"}{end}' \
    | sed 's#localkube://##' | sort -n
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
declare -A RSS0
while read -r k pid; do RSS0[$k]=$(rss_kib "$pid"); done < <(shard_pids)

log "preparing $N sources (database bench_many, role bench_many)"
export PGHOST="$WAREHOUSE_PGHOST" PGPORT="$WAREHOUSE_PGPORT" PGUSER="$WAREHOUSE_PGUSER" PGPASSWORD="$WAREHOUSE_PGPASSWORD"
PW="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)"
psql -q -d postgres -v ON_ERROR_STOP=1 -c "CREATE ROLE bench_many LOGIN PASSWORD '$PW'" -c "CREATE DATABASE bench_many OWNER bench_many"
kc create namespace "$NS" >/dev/null
# Onboard the namespace: shards may read Secrets only where this is bound.
kc -n "$NS" create rolebinding shardpool-shard-secrets --clusterrole=shardpool-shard-secrets \
  --serviceaccount="$SYS:shardpool-shard" >/dev/null
kc -n "$NS" create secret generic warehouse --from-literal=password="$PW" >/dev/null
last=$((N - 1)); W=${#last}
MANIFEST="$BENCH/.work/sources.yaml"
manifest() { # $1 = minIdle
  : > "$MANIFEST"
  for i in $(seq -w 0 $((N - 1))); do
    # maxSize varies (4, 8, 12, 16) so the load bound has something to balance.
    cat >> "$MANIFEST" <<YAML
---
apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: src-$i, namespace: $NS}
spec:
  host: "$WAREHOUSE_PGHOST"
  port: $WAREHOUSE_PGPORT
  database: bench_many
  user: bench_many
  passwordSecretRef: {name: warehouse, key: password}
  pool: {minIdle: $1, maxSize: $(( (10#$i % 4 + 1) * 4 ))}
YAML
  done
}
manifest 0

log "stopping the operator, applying $N DataSources"
kc -n "$SYS" scale deployment shardpool-operator --replicas=0 >/dev/null
kc -n "$SYS" wait --for=delete pod -l app.kubernetes.io/component=operator --timeout=60s >/dev/null 2>&1 || true
t=$(now)
kc apply --server-side -f "$MANIFEST" >/dev/null
APPLY=$(since "$t")

count() { # how many sources have $1 matching $2
  kc -n "$NS" get datasources -o jsonpath="{range .items[*]}{$1}{\"\\n\"}{end}" | grep -c "$2" || true
}
current() { # how many sources report Ready for their current generation with >= $1 open
  kc -n "$NS" get datasources -o jsonpath='{range .items[*]}{.metadata.generation} {.status.observedGeneration} {.status.phase} {.status.connections.open}{"\n"}{end}' \
    | awk -v min="$1" '$1 == $2 && $3 == "Ready" && $4 >= min { n++ } END { print n + 0 }'
}
rss_by_shard() { # "k rss" lines
  while read -r k pid; do echo "$k $(rss_kib "$pid")"; done < <(shard_pids)
}
log "starting the operator"
t=$(now)
kc -n "$SYS" scale deployment shardpool-operator --replicas=1 >/dev/null
ASSIGNED=""; READY=""
deadline=$((SECONDS + 600))
while [ -z "$READY" ]; do
  ((SECONDS < deadline)) || { echo "not all Ready after 600 s" >&2; kc -n "$NS" get datasources | awk 'NR>1 {print $3}' | sort | uniq -c >&2; exit 1; }
  if [ -z "$ASSIGNED" ] && [ "$(count .status.shard '^[0-9]')" = "$N" ]; then ASSIGNED=$(since "$t"); fi
  if [ -n "$ASSIGNED" ] && [ "$(current 0)" = "$N" ]; then READY=$(since "$t"); fi
  sleep 0.2
done
sleep 5 # let the shards settle
declare -A RSS1
while read -r k r; do RSS1[$k]=$r; done < <(rss_by_shard)

log "minIdle 0 -> 1 on every source (a spec change: each pool is rebuilt and warmed)"
manifest 1
t=$(now)
kc apply --server-side -f "$MANIFEST" >/dev/null
deadline=$((SECONDS + 600))
until [ "$(current 1)" = "$N" ]; do
  ((SECONDS < deadline)) || { echo "not all warm after 600 s" >&2; exit 1; }
  sleep 0.2
done
WARM=$(since "$t")
OPERATOR_UP=$(kc -n "$SYS" get pods -l app.kubernetes.io/component=operator -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].lastTransitionTime}')

say "shardpool sources benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, release build"
say "N=$N sources (minIdle 1, maxSize 4/8/12/16), $SHARDS shards"
say ""
say "apply of $N DataSources (kubectl apply --server-side):  ${APPLY} s"
say "operator start -> every source assigned (status.shard): ${ASSIGNED} s   (target < 15 s; includes the operator pod start, Ready at $OPERATOR_UP)"
say "operator start -> every source Ready (minIdle 0):       ${READY} s"
say "spec change minIdle 0 -> 1 -> every pool warm, Ready:   ${WARM} s   (includes the apply)"

say ""
say "spread (sources, summed maxSize) per shard:"
kc -n "$NS" get datasources -o jsonpath='{range .items[*]}{.status.shard} {.spec.pool.maxSize}{"\n"}{end}' \
  | awk -v eps=0.25 '{ n[$1]++; w[$1]+=$2; total+=$2 } END {
      k=0; for (s in n) k++; mean=total/k; max=0
      for (s in n) { printf "  shard %s: %d sources, load %d\n", s, n[s], w[s]; if (w[s]>max) max=w[s] }
      printf "  mean load %.1f, max %d = %.3f x mean (bound %.2f)\n", mean, max, max/mean, 1+eps }' | tee -a "$OUT"

sleep 5 # let maintenance settle
say ""
say "memory (VmRSS of each shard process, KiB):"
say "  shard  sources  before  served(minIdle 0)  warm(minIdle 1)  per source w/o connection  per open connection"
t0=0; t1=0; t2=0
while read -r k rss; do
  n=$(kc -n "$NS" get datasources -o jsonpath='{range .items[*]}{.status.shard}{"\n"}{end}' | grep -cx "$k" || true)
  r0=${RSS0[$k]:-0}; r1=${RSS1[$k]:-0}
  t0=$((t0 + r0)); t1=$((t1 + r1)); t2=$((t2 + rss))
  say "$(awk -v k="$k" -v n="$n" -v a="$r0" -v b="$r1" -v c="$rss" 'BEGIN { printf "  %5s  %7d  %6d  %17d  %15d  %25.1f  %19.1f", k, n, a, b, c, (b - a) / n, (c - b) / n }')"
done < <(rss_by_shard)
say "$(awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "  all shards: %.1f KiB per source beyond its connections (target < 64), %.1f KiB per open server connection, %.1f KiB per warm idle source in all", (b - a) / n, (c - b) / n, (c - a) / n }')"

say ""
conns=$(psql -Atq -d postgres -c "SELECT count(*), count(DISTINCT split_part(application_name, '/', 3)) FROM pg_stat_activity WHERE application_name LIKE 'shardpool/$NS/%'")
say "pg_stat_activity: $conns (server connections | distinct sources) for $N sources"
ok=0
for i in $(shuf -i 0-$((N - 1)) -n 20); do
  name=$(printf "src-%0${W}d" "$i")
  if PGPASSWORD="$(cat "$LOCALKUBE_STATE/install/router-ops")" psql -Atq "host=$(kc -n "$SYS" get pods -l app.kubernetes.io/component=router -o jsonpath='{.items[0].status.podIP}') port=5432 user=ops dbname=$NS.$name" -c "SELECT current_database()" 2>/dev/null | grep -qx bench_many; then
    ok=$((ok + 1))
  fi
done
say "router: $ok of 20 random sources answered"
say ""
say "rerun: bench/sources.sh   (N=$N SHARDS=$SHARDS)"
log "results in $OUT"
