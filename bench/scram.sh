#!/usr/bin/env bash
# What the shards' SCRAM key cache saves when they open server connections
# (benches/scram_keys.rs, release build, its own throwaway PostgreSQL on a
# loopback port): CPU and wall time per connection with the keys derived
# for every connection and with them kept per source, side by side in
# ABBA rounds. Writes bench/results/scram-<date>.txt.
#
#   bench/scram.sh                         # 4 rounds of 20 sources x 12 connections
#   ROUNDS=6 SOURCES=20 CONNS=12 bench/scram.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/bench/results/scram-$(date +%Y%m%d-%H%M%S).txt"
cd "$ROOT"
cargo bench --locked --bench scram_keys 2>/dev/null | tee "$OUT"
echo "# rerun: ROUNDS=${ROUNDS:-4} SOURCES=${SOURCES:-20} CONNS=${CONNS:-12} bench/scram.sh" | tee -a "$OUT"
