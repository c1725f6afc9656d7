#!/usr/bin/env bash
# Installs shardpool on the local cluster from the working tree: builds the
# binary the pod runner maps the `shardpool` image to (LOCAL_SHARDPOOL_BIN:
# target/release/shardpool after `make demo`, target/debug for `make test`),
# prepares the example warehouses and their Secrets, installs the Helm chart,
# applies examples/, waits until the example sources are Ready, and appends
# SHARDPOOL_PGURI, SHARDPOOL_HTTP and SHARDPOOL_HTTP_TOKEN to e2e/.state/env.
# Idempotent: a second run upgrades the release and keeps the credentials.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -f "$STATE/env" ] || die "the local cluster is not up: run e2e/up.sh first"
# shellcheck disable=SC1091
source "$STATE/env"
NS="${SHARDPOOL_NAMESPACE:-shardpool-system}"
RELEASE="${SHARDPOOL_RELEASE:-shardpool}"
READY_TIMEOUT="${SHARDPOOL_READY_TIMEOUT:-120}"
CREDS="$STATE/install"
mkdir -p "$CREDS"
chmod 700 "$CREDS"

# secret NAME: a random alphanumeric credential, generated once and kept.
secret() {
  local f="$CREDS/$1"
  [ -s "$f" ] || head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24 > "$f"
  cat "$f"
}

# The benchmarks run a release binary of their own (SHARDPOOL_BIN).
if [ -z "${SHARDPOOL_BIN:-}" ]; then
  case "${LOCAL_SHARDPOOL_BIN:-$ROOT/target/debug/shardpool}" in
    "$ROOT/target/release/shardpool") profile=(--release) ;;
    *) profile=() ;;
  esac
  log "building shardpool ${profile[*]:-(debug)}"
  (cd "$ROOT" && cargo build --locked "${profile[@]}" --bin shardpool) || die "cargo build failed"
fi
ensure_helm

log "preparing the example warehouses on $WAREHOUSE_PGHOST:$WAREHOUSE_PGPORT"
export PGHOST="$WAREHOUSE_PGHOST" PGPORT="$WAREHOUSE_PGPORT" PGUSER="$WAREHOUSE_PGUSER" PGPASSWORD="$WAREHOUSE_PGPASSWORD"
if [ "$(psql -d postgres -Atc "SELECT count(*) FROM pg_database WHERE datname = 'acme'")" = 0 ]; then
  psql -d postgres -q -v ON_ERROR_STOP=1 -f "$ROOT/examples/warehouses.sql" >/dev/null
fi
kc create namespace tenants --dry-run=client -o yaml | kc apply -f - >/dev/null
for c in acme globex initech; do
  pw=$(secret "$c-warehouse")
  psql -d "$c" -q -v ON_ERROR_STOP=1 <<SQL >/dev/null
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${c}_bi') THEN CREATE ROLE ${c}_bi LOGIN; END IF;
END \$\$;
ALTER ROLE ${c}_bi PASSWORD '$pw';
GRANT CONNECT ON DATABASE $c TO ${c}_bi;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ${c}_bi;
SQL
  kc -n tenants create secret generic "$c-warehouse" --from-literal=password="$pw" --dry-run=client -o yaml | kc apply -f - >/dev/null
done
unset PGPASSWORD
# The warehouse's CA, for sources with tls verify-full.
kc -n tenants create secret generic warehouse-ca --from-file=ca.crt="$WAREHOUSE_CA" --dry-run=client -o yaml | kc apply -f - >/dev/null

log "router credentials"
kc create namespace "$NS" --dry-run=client -o yaml | kc apply -f - >/dev/null
ROUTER_PW=$(secret router-bi)
OPS_PW=$(secret router-ops)
HTTP_TOKEN=$(secret router-http-token)
JWT_KEY=$(secret router-jwt-key)
# bi reaches the tenants namespace only; ops every namespace.
kc -n "$NS" create secret generic shardpool-router-auth \
  --from-literal=users="bi:$ROUTER_PW:tenants
ops:$OPS_PW:*" \
  --from-literal=tokens="$HTTP_TOKEN:tenants" \
  --from-literal=jwtKey="$JWT_KEY$JWT_KEY" \
  --dry-run=client -o yaml | kc apply -f - >/dev/null

# TLS for the router's PostgreSQL clients: a certificate for the router
# Service's name, signed by a CA made here (clients verify with router-ca.crt).
if [ ! -s "$CREDS/router.crt" ]; then
  make_tls "$CREDS" router "$RELEASE-router.$NS.svc" "DNS:$RELEASE-router.$NS.svc,DNS:localhost"
fi
kc -n "$NS" create secret tls shardpool-router-tls --cert="$CREDS/router.crt" --key="$CREDS/router.key" \
  --dry-run=client -o yaml | kc apply -f - >/dev/null

log "helm upgrade --install $RELEASE (namespace $NS)"
"$HELM" --kubeconfig "$KUBECONFIG" upgrade --install "$RELEASE" "$ROOT/charts/shardpool" \
  --namespace "$NS" --create-namespace \
  --set image.repository=shardpool --set image.tag=local \
  --set logFormat=text \
  --set 'shard.tenantNamespaces={tenants}' \
  --set router.tls.secretName=shardpool-router-tls \
  --set router.maxResultBytes=8388608 \
  --wait --timeout 180s || die "helm install failed or its pods did not become Ready; see $LOGS/${NS}_*.log"

log "applying examples/"
sed -e "s/WAREHOUSE_HOST/$WAREHOUSE_PGHOST/" -e "s/WAREHOUSE_PORT/$WAREHOUSE_PGPORT/" "$ROOT/examples/datasources.yaml" | kc apply -f - >/dev/null

log "waiting up to ${READY_TIMEOUT}s for the example sources to be Ready"
deadline=$((SECONDS + READY_TIMEOUT))
# The three examples by name: the suite leaves other sources in tenants.
until [ "$(kc -n tenants get datasources acme globex initech -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' 2>/dev/null | grep -c '^Ready$' || true)" = 3 ]; do
  if ((SECONDS >= deadline)); then
    kc -n tenants get datasources >&2 || true
    die "the example sources are not Ready after ${READY_TIMEOUT}s; see the operator's and shards' logs in $LOGS/"
  fi
  sleep 1
done

ROUTER_IP=$(kc -n "$NS" get pods -l app.kubernetes.io/component=router,app.kubernetes.io/instance="$RELEASE" \
  -o jsonpath='{.items[0].status.podIP}')
[ -n "$ROUTER_IP" ] || die "no router pod found in $NS"
sed -i '/^export SHARDPOOL_/d' "$STATE/env"
cat >> "$STATE/env" <<ENV
export SHARDPOOL_PGURI=postgresql://bi:$ROUTER_PW@$ROUTER_IP:5432
export SHARDPOOL_HTTP=http://$ROUTER_IP:8080
export SHARDPOOL_HTTP_TOKEN=$HTTP_TOKEN
ENV
kc -n tenants get datasources
cat <<MSG

shardpool is installed. To query the example sources:

  source $STATE/env
  psql "\$SHARDPOOL_PGURI/tenants.acme" -c 'SELECT count(*), sum(amount) FROM orders'
  curl -sS -H "Authorization: Bearer \$SHARDPOOL_HTTP_TOKEN" -H 'Content-Type: application/json' \\
    -d '{"sql": "SELECT origin, count(*) FROM shipments GROUP BY 1 ORDER BY 1"}' \\
    "\$SHARDPOOL_HTTP/v1/namespaces/tenants/datasources/globex/query"

Stop everything with: make down
MSG
