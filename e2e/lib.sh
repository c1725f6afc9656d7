# Shared helpers for the local cluster scripts. Sourced, not run.
# Every background process is recorded in $PIDS/<name>.pid and stopped by
# that pid, never by name.

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$E2E/.." && pwd)"
STATE="${LOCALKUBE_STATE:-$E2E/.state}"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
BIN="$E2E/.bin"
LOCALKUBE="$BIN/localkube"

# Loopback ports; each can be moved with its environment variable.
APISERVER_PORT="${LOCALKUBE_APISERVER_PORT:-16443}"
ETCD_PORT="${LOCALKUBE_ETCD_PORT:-12379}"
ETCD_PEER_PORT="${LOCALKUBE_ETCD_PEER_PORT:-12380}"
KCM_PORT="${LOCALKUBE_KCM_PORT:-16445}"
SCHEDULER_PORT="${LOCALKUBE_SCHEDULER_PORT:-16446}"
KWOK_PORT="${LOCALKUBE_KWOK_PORT:-16447}"
WAREHOUSE_PORT="${LOCALKUBE_WAREHOUSE_PORT:-15432}"
TOXIPROXY_PORT="${LOCALKUBE_TOXIPROXY_PORT:-16474}"
NODES="local-node-0,local-node-1"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pid_alive() { # name
  local f="$PIDS/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# start_bg NAME CMD...: start CMD in the background (own session), log to
# $LOGS/NAME.log, record its pid.
start_bg() {
  local name=$1; shift
  mkdir -p "$PIDS" "$LOGS"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

# stop_pid NAME [GRACE]: SIGTERM the recorded pid (and its process group),
# SIGKILL after GRACE seconds (default 10), remove the pid file.
stop_pid() {
  local name=$1 grace=${2:-10} f="$PIDS/$1.pid" pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) did not stop in ${grace}s; SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

# wait_for DESC TIMEOUT_SECONDS PIDNAME CMD...: poll CMD until it succeeds;
# fail with the component's log tail if its process died or time ran out.
wait_for() {
  local desc=$1 timeout=$2 name=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && ! pid_alive "$name"; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$desc: $name exited (log: $LOGS/$name.log)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$desc: not ready after ${timeout}s (log: $LOGS/$name.log)"
    fi
    sleep 0.5
  done
}

kc() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }

# ensure_helm: build helm from the version pinned in e2e/tools/go.mod.
HELM="$BIN/helm"
ensure_helm() {
  mkdir -p "$BIN"
  (cd "$E2E/tools" && go build -o "$HELM" helm.sh/helm/v3/cmd/helm) || die "building helm failed (see above)"
}

# make_tls DIR NAME CN SANS: a CA (DIR/NAME-ca.crt, .key) and a server
# certificate it signed (DIR/NAME.crt, DIR/NAME.key; P-256) for CN with the
# subjectAltName SANS (e.g. "DNS:localhost,IP:127.0.0.1"), valid 30 days.
make_tls() {
  local dir=$1 name=$2 cn=$3 sans=$4
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 -days 30 -subj "/CN=shardpool local $name CA" "${ec[@]}" \
    -keyout "$dir/$name-ca.key" -out "$dir/$name-ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null \
    || die "openssl: cannot make the $name CA"
  openssl req -subj "/CN=$cn" "${ec[@]}" -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null \
    || die "openssl: cannot make the $name key"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$sans" > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/$name-ca.crt" -CAkey "$dir/$name-ca.key" -CAcreateserial \
    -days 30 -out "$dir/$name.crt" -extfile "$dir/$name.ext" 2>/dev/null \
    || die "openssl: cannot sign the $name certificate"
  chmod 600 "$dir/$name.key" "$dir/$name-ca.key"
}
