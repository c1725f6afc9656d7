#!/usr/bin/env bash
# Starts the local Kubernetes cluster: embedded etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler (all from k8s.io/kubernetes at the
# version pinned in e2e/go.mod), kwok keeping two fake nodes Ready,
# the pod runner (their kubelet: pods run as local processes on 127.1.x.y),
# toxiproxy (the TCP fault proxy: every pod reaches the API server through a
# proxy of its own, so e2e/fault can cut one pod off), and a PostgreSQL
# server playing the customer warehouses.
#
# Idempotent: a second run while everything is up does nothing. Writes
# e2e/.state/env (KUBECONFIG, WAREHOUSE_PG*). Stop with e2e/down.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMPONENTS=(etcd apiserver controller-manager scheduler kwok toxiproxy podrunner)

# --- already up, or half up? -------------------------------------------------
alive=0 dead=()
for c in "${COMPONENTS[@]}" warehouse; do
  if pid_alive "$c"; then alive=$((alive + 1)); elif [ -f "$PIDS/$c.pid" ]; then dead+=("$c"); fi
done
if [ "$alive" -eq $((${#COMPONENTS[@]} + 1)) ] && [ -f "$STATE/env" ]; then
  if kc get --raw /readyz >/dev/null 2>&1; then
    log "local cluster already up (state in $STATE)"
    running=$(sed -n 's/^export LOCAL_SHARDPOOL_BIN=//p' "$STATE/env")
    if [ -n "${SHARDPOOL_BIN:-}" ] && [ -n "$running" ] && [ "$running" != "$SHARDPOOL_BIN" ]; then
      log "note: its pods run $running, not $SHARDPOOL_BIN; run e2e/down.sh (make down) first to switch"
    fi
    exit 0
  fi
fi
if [ "$alive" -gt 0 ] || [ "${#dead[@]}" -gt 0 ]; then
  die "a previous run is half up (running: $alive of $((${#COMPONENTS[@]} + 1)); stopped: ${dead[*]:-none}).
Run e2e/down.sh to clear it, then e2e/up.sh again."
fi

# --- prerequisites -------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go 1.24 or newer (https://go.dev/dl) and put 'go' on PATH"
command -v kubectl >/dev/null 2>&1 || die "kubectl is missing: install kubectl 1.32 or newer and put it on PATH"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$PGBIN/initdb" ] || die "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin; set PGBIN, or apt-get install postgresql)"

mkdir -p "$STATE" "$PIDS" "$LOGS" "$BIN"

# --- build -----------------------------------------------------------------------
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$E2E/go.mod")"
[[ "$K8S_VERSION" =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "cannot read the pinned k8s.io/kubernetes version from e2e/go.mod"
log "building localkube (Kubernetes $K8S_VERSION; the first build takes about 5 minutes on 2 cores, later ones seconds)"
VPKG=k8s.io/component-base/version
LDFLAGS="-X $VPKG.gitVersion=$K8S_VERSION -X $VPKG.gitMajor=${BASH_REMATCH[1]} -X $VPKG.gitMinor=${BASH_REMATCH[2]} -X $VPKG.gitTreeState=clean -X $VPKG.buildDate=1970-01-01T00:00:00Z"
(cd "$E2E" && go build -ldflags "$LDFLAGS" -o "$LOCALKUBE" ./cluster/cmd/localkube) || die "building localkube failed (see above)"

# --- ports -----------------------------------------------------------------------
for p in "$APISERVER_PORT" "$ETCD_PORT" "$ETCD_PEER_PORT" "$KCM_PORT" "$SCHEDULER_PORT" "$KWOK_PORT" "$TOXIPROXY_PORT" "$WAREHOUSE_PORT"; do
  "$LOCALKUBE" freeport "$p" || die "port $p is needed by the local cluster; stop what uses it or move the cluster's ports (LOCALKUBE_*_PORT, see e2e/lib.sh)"
done

# --- credentials -----------------------------------------------------------------
"$LOCALKUBE" pki --dir "$STATE/pki" --apiserver-port "$APISERVER_PORT" --kubeconfig "$STATE/kubeconfig"
PKI="$STATE/pki"

# --- control plane ---------------------------------------------------------------
log "starting etcd on 127.0.0.1:$ETCD_PORT"
start_bg etcd "$LOCALKUBE" etcd --data-dir "$STATE/etcd" --client-port "$ETCD_PORT" --peer-port "$ETCD_PEER_PORT"
wait_for "etcd" 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

log "starting kube-apiserver on https://127.0.0.1:$APISERVER_PORT"
start_bg apiserver "$LOCALKUBE" apiserver \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --authorization-mode=Node,RBAC \
  --allow-privileged=true \
  --profiling=false \
  --cert-dir="$PKI"
wait_for "kube-apiserver" 120 apiserver kc get --raw /readyz

log "starting kube-controller-manager and kube-scheduler"
start_bg controller-manager "$LOCALKUBE" controller-manager \
  --kubeconfig="$STATE/kubeconfig" \
  --authentication-kubeconfig="$STATE/kubeconfig" --authorization-kubeconfig="$STATE/kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$PKI/kcm" \
  --leader-elect=false \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --use-service-account-credentials=true \
  --controllers='*' \
  --node-monitor-grace-period=2m \
  --concurrent-deployment-syncs=10 --concurrent-replicaset-syncs=10 --concurrent-gc-syncs=20
start_bg scheduler "$LOCALKUBE" scheduler \
  --kubeconfig="$STATE/kubeconfig" \
  --authentication-kubeconfig="$STATE/kubeconfig" --authorization-kubeconfig="$STATE/kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$PKI/scheduler" \
  --leader-elect=false

# --- nodes -----------------------------------------------------------------------
log "registering fake nodes and starting kwok"
kc apply -f "$E2E/cluster/config/nodes.yaml" >/dev/null
start_bg kwok "$LOCALKUBE" kwok \
  --kubeconfig="$STATE/kubeconfig" \
  --config="$E2E/cluster/config/kwok.yaml" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-ip=127.0.0.1 \
  --node-lease-duration-seconds=40 \
  --server-address="127.0.0.1:$KWOK_PORT"
wait_for "nodes Ready" 90 kwok kc wait --for=condition=Ready node --all --timeout=2s

log "starting toxiproxy on 127.0.0.1:$TOXIPROXY_PORT"
start_bg toxiproxy "$LOCALKUBE" toxiproxy --host 127.0.0.1 --port "$TOXIPROXY_PORT"
wait_for "toxiproxy" 30 toxiproxy curl -sf "http://127.0.0.1:$TOXIPROXY_PORT/version"
echo "http://127.0.0.1:$TOXIPROXY_PORT" > "$STATE/toxiproxy.url"

SHARDPOOL_BIN="${SHARDPOOL_BIN:-$ROOT/target/debug/shardpool}"
log "starting the pod runner (pods on $NODES; image shardpool -> $SHARDPOOL_BIN)"
start_bg podrunner "$LOCALKUBE" podrunner \
  --kubeconfig="$STATE/kubeconfig" --nodes="$NODES" --state="$STATE" \
  --apiserver-host=127.0.0.1 --apiserver-port="$APISERVER_PORT" --ca-file="$PKI/ca.crt" \
  --image-map="shardpool=$SHARDPOOL_BIN" --toxiproxy="http://127.0.0.1:$TOXIPROXY_PORT"
wait_for "controller-manager" 60 controller-manager kc -n default get serviceaccount default
pid_alive scheduler || die "kube-scheduler exited (log: $LOGS/scheduler.log)"
pid_alive podrunner || die "the pod runner exited (log: $LOGS/podrunner.log)"

# --- the warehouse PostgreSQL ----------------------------------------------------
PGDATA="$STATE/warehouse"
PGUSER_W=warehouse
PGPASS_W="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
log "initialising the warehouse PostgreSQL on 127.0.0.1:$WAREHOUSE_PORT"
mkdir -p "$PGDATA"
[ "$(id -u)" = 0 ] && chown postgres: "$PGDATA" && chmod 700 "$PGDATA"
printf '%s\n' "$PGPASS_W" > "$STATE/warehouse.pw"
[ "$(id -u)" = 0 ] && chown postgres: "$STATE/warehouse.pw"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U "$PGUSER_W" --pwfile="$STATE/warehouse.pw" \
  --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$LOGS/warehouse-initdb.log" 2>&1 \
  || { tail -n 20 "$LOGS/warehouse-initdb.log" >&2; die "initdb failed"; }
rm -f "$STATE/warehouse.pw"
# TLS like a customer's warehouse: a CA made here signs a certificate for
# 127.0.0.1 and localhost; sources reach it with any tls mode, verify-full
# with the CA from $STATE/warehouse-ca.crt.
TLSDIR="$STATE/warehouse-tls"
mkdir -p "$TLSDIR"
make_tls "$TLSDIR" warehouse localhost "DNS:localhost,IP:127.0.0.1"
cp "$TLSDIR/warehouse-ca.crt" "$STATE/warehouse-ca.crt"
[ "$(id -u)" = 0 ] && chown -R postgres: "$TLSDIR"
cat >> "$PGDATA/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = '$TLSDIR/warehouse.crt'
ssl_key_file = '$TLSDIR/warehouse.key'
listen_addresses = '127.0.0.1'
port = $WAREHOUSE_PORT
unix_socket_directories = '$PGDATA'
max_connections = ${WAREHOUSE_MAX_CONNECTIONS:-2000}
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
CONF
if [ "$(id -u)" = 0 ]; then
  start_bg warehouse runuser -u postgres -- "$PGBIN/postgres" -D "$PGDATA"
else
  start_bg warehouse "$PGBIN/postgres" -D "$PGDATA"
fi
wait_for "warehouse PostgreSQL" 60 warehouse "$PGBIN/pg_isready" -h 127.0.0.1 -p "$WAREHOUSE_PORT"

cat > "$STATE/env" <<ENV
# Written by e2e/up.sh; source it to talk to the local cluster.
export KUBECONFIG="$STATE/kubeconfig"
export WAREHOUSE_PGHOST=127.0.0.1
export WAREHOUSE_PGPORT=$WAREHOUSE_PORT
export WAREHOUSE_PGUSER=$PGUSER_W
export WAREHOUSE_PGPASSWORD=$PGPASS_W
export WAREHOUSE_CA=$STATE/warehouse-ca.crt
# The binary the pod runner runs for the shardpool image (e2e/install.sh builds it).
export LOCAL_SHARDPOOL_BIN=$SHARDPOOL_BIN
ENV
log "local cluster up: source $STATE/env"
kc version 2>/dev/null | sed 's/^/  /' >&2 || true
kc get nodes >&2
