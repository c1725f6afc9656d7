# Shared by the benchmarks that run pgbench through shardpool on the local
# cluster (sourced by bench/pgbench.sh and bench/linktls.sh). Needs kc
# (kubectl on the local cluster) and WAREHOUSE_PG* from its env file.

# bench_source SCALE POOL: the database `bench` (pgbench -i at SCALE) on the
# warehouse and the DataSource tenants/bench in front of it (pool of POOL,
# plain TCP, as every path of the benchmarks), waited for until Ready (60 s
# at most). Exports PG* for the warehouse.
bench_source() {
  local scale=$1 pool=$2
  export PGSSLMODE=disable
  export PGHOST="$WAREHOUSE_PGHOST" PGPORT="$WAREHOUSE_PGPORT" PGUSER="$WAREHOUSE_PGUSER" PGPASSWORD="$WAREHOUSE_PGPASSWORD"
  psql -q -d postgres -c "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench"
  pgbench -i -q -s "$scale" bench >/dev/null 2>&1
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
  pool: {minIdle: $pool, maxSize: $pool}
YAML
  for _ in $(seq 1 120); do
    [ "$(kc -n tenants get datasource bench -o jsonpath='{.status.phase}')" = Ready ] && break
    sleep 0.5
  done
}

# listener_pid IP PORT: the pid of the process listening there (a pod's
# process on the local cluster).
listener_pid() { ss -ltnpH "src $1:$2" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1; }
