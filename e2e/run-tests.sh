#!/usr/bin/env bash
# Runs the end-to-end suite (e2e/tests) against the local cluster with
# shardpool installed (e2e/install.sh). Brings the cluster up when it is not, and down again afterwards in that case only, so
# a `make demo` cluster survives `make test`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

started=0
if ! { pid_alive apiserver && [ -f "$STATE/env" ]; }; then
  "$E2E/up.sh"
  started=1
fi
cleanup() { if [ "$started" = 1 ] && [ -z "${KEEP_CLUSTER:-}" ]; then "$E2E/down.sh"; fi; }
trap cleanup EXIT
# The data-path tests need shardpool installed (idempotent when it is).
"$E2E/install.sh"
# shellcheck disable=SC1091
source "$STATE/env"
cd "$E2E"
# Bounded: the whole suite, including waits, must end within the timeout.
go test ./tests/ -count=1 -timeout 35m -v "$@"
# Last, on its own: uninstalling the release (destructive), then putting it
# back when the cluster outlives this run (a `make demo` cluster).
if [ "$#" = 0 ]; then
  SHARDPOOL_E2E_UNINSTALL=1 go test ./tests/ -count=1 -timeout 5m -v -run '^TestHelmUninstallLeavesNothing$'
  if [ "$started" = 0 ] || [ -n "${KEEP_CLUSTER:-}" ]; then "$E2E/install.sh"; fi
fi
