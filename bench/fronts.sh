# Warehouse fronts for the scale benchmark (sourced by bench/scale.sh).
#
# PostgreSQL cannot hold 80,000 backends on this machine; PgBouncer can
# hold that many client connections for a few KiB each. One process may
# open at most `ulimit -n` files (20,000 here, and the hard limit cannot be
# raised without privileges), so FRONTS PgBouncers share the load, each on
# its own loopback port, each in front of the same warehouse database in
# transaction mode. Each DataSource names one front, so each source's
# server connections all arrive at one PgBouncer, whose SHOW CLIENTS lists
# them with their application_name: one pool per source stays provable
# from the warehouse side.
#
# Clients authenticate with SCRAM-SHA-256 against the role's own verifier
# (copied from pg_authid), so a front does no key derivation per login;
# the fronts log in to PostgreSQL with the role's password.
#
# Every front runs as user postgres (PgBouncer refuses root), daemonised,
# and is tracked and stopped by the pid in its pid file.
#
# Each front reaches PostgreSQL through FRONT_POOL server connections
# (default 16). With 4, the load of the rollout and rescale (400 clients)
# queued in the fronts (40-125 ms average wait against 1 ms queries), and
# a client that closed while queued stayed in SHOW CLIENTS until its turn,
# which the connection count check cannot tell from an open connection.
#
# A new owner's fence ends, in the PostgreSQL behind the fronts, the
# backends whose application_name names the source. A front's server
# connection keeps the name of the last client it served, so the fence
# could end a connection the front was just handing to another client (one
# query of a rollout failed: "pooler error: invalid server parameter").
# Each front resets application_name after every transaction: a source's
# name is then seen only while one of its transactions runs there.
#
# Needs: PGBOUNCER, FRONTS_DIR, WAREHOUSE_PG* (e2e/.state/env), psql.

# fronts_start COUNT BASE_PORT DATABASE ROLE PASSWORD MAX_CLIENTS
fronts_start() {
  local count=$1 base=$2 db=$3 role=$4 pw=$5 max=$6 k port verifier
  mkdir -p "$FRONTS_DIR"
  verifier=$(PGPASSWORD="$WAREHOUSE_PGPASSWORD" psql -Atq -h "$WAREHOUSE_PGHOST" -p "$WAREHOUSE_PGPORT" -U "$WAREHOUSE_PGUSER" -d postgres \
    -c "SELECT rolpassword FROM pg_authid WHERE rolname = '$role'")
  case "$verifier" in SCRAM-SHA-256*) ;; *) echo "role $role has no SCRAM verifier" >&2; return 1 ;; esac
  printf '"%s" "%s"\n"admin" "%s"\n' "$role" "$verifier" "$FRONTS_ADMIN_PASSWORD" > "$FRONTS_DIR/userlist.txt"
  for ((k = 0; k < count; k++)); do
    port=$((base + k))
    cat > "$FRONTS_DIR/front-$k.ini" <<INI
[databases]
$db = host=$WAREHOUSE_PGHOST port=$WAREHOUSE_PGPORT dbname=$db user=$role password=$pw pool_size=${FRONT_POOL:-16}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $FRONTS_DIR/userlist.txt
admin_users = admin
pool_mode = transaction
server_reset_query = RESET application_name
server_reset_query_always = 1
default_pool_size = ${FRONT_POOL:-16}
max_client_conn = $max
listen_backlog = 4096
log_connections = 0
log_disconnections = 0
logfile = $FRONTS_DIR/front-$k.log
pidfile = $FRONTS_DIR/front-$k.pid
INI
  done
  chmod 600 "$FRONTS_DIR"/userlist.txt "$FRONTS_DIR"/*.ini
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$FRONTS_DIR"; fi
  for ((k = 0; k < count; k++)); do
    rm -f "$FRONTS_DIR/front-$k.pid"
    if [ "$(id -u)" = 0 ]; then
      runuser -u postgres -- bash -c "ulimit -n \$(ulimit -Hn); exec '$PGBOUNCER' -d '$FRONTS_DIR/front-$k.ini'" >/dev/null
    else
      bash -c "ulimit -n \$(ulimit -Hn); exec '$PGBOUNCER' -d '$FRONTS_DIR/front-$k.ini'" >/dev/null
    fi
    for _ in $(seq 1 50); do [ -s "$FRONTS_DIR/front-$k.pid" ] && break; sleep 0.1; done
    [ -s "$FRONTS_DIR/front-$k.pid" ] || { echo "front $k did not start:" >&2; tail -5 "$FRONTS_DIR/front-$k.log" >&2; return 1; }
  done
}

# fronts_stop: SIGINT (PgBouncer's immediate shutdown) to every front by
# the pid it wrote, SIGKILL after 5 s.
fronts_stop() {
  local f pid i
  for f in "$FRONTS_DIR"/front-*.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -INT "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$f"
  done
}
