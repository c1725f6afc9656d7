#!/usr/bin/env bash
# Stops everything e2e/up.sh started, by the pids it recorded (never by
# name): first the pods' processes (through the pod runner, then any process
# group it left), then the control plane and the warehouse PostgreSQL; then
# removes e2e/.state.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -d "$STATE" ] || { log "nothing to stop ($STATE does not exist)"; exit 0; }

# Every pid this run recorded, to check at the end that none survived.
recorded=()
for f in "$PIDS"/*.pid "$STATE"/pods/*/*.pid; do
  [ -f "$f" ] && recorded+=("$(cat "$f")")
done

stop_pid podrunner 45
# Pod process groups the runner did not get to stop, and orphans (pods the
# fault harness deleted while their processes ran on).
for f in "$STATE"/pods/*/*.pid "$PIDS"/orphan-*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$pid" -gt 1 ] && kill -KILL -- "-$pid" 2>/dev/null || true
done
rm -f "$PIDS"/orphan-*.pid
for c in toxiproxy kwok scheduler controller-manager apiserver etcd; do
  stop_pid "$c" 10
done
# PostgreSQL: SIGINT to the postmaster is its fast shutdown.
if [ -f "$STATE/warehouse/postmaster.pid" ]; then
  pm=$(head -n 1 "$STATE/warehouse/postmaster.pid")
  if [[ "$pm" =~ ^[0-9]+$ ]] && kill -INT "$pm" 2>/dev/null; then
    for ((i = 0; i < 200; i++)); do kill -0 "$pm" 2>/dev/null || break; sleep 0.1; done
  fi
fi
stop_pid warehouse 20
left=()
for pid in "${recorded[@]}"; do
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && left+=("$pid")
done
if [ "${#left[@]}" -gt 0 ]; then
  die "processes still running after down.sh: ${left[*]} (state kept in $STATE)"
fi
rm -rf "$STATE"
log "local cluster stopped; $STATE removed"
