#!/usr/bin/env bash
# Replication benchmark: two real `validator serve` sites (127.0.0.1 and
# 127.0.0.2, soft keystore, in-process KSM, durable counters) replicating
# over QUIC with mutual TLS, against a single site: validations/s and
# p50/p99 at concurrency 32 with the safety rule on, CPU per validation,
# the QUIC path RTT, the lag of AEAD and API-client changes, and the
# catch-up of 100,000 counters changed during a 60 s partition.
#
#   scripts/bench-replication.sh                          # the defaults below
#   scripts/bench-replication.sh --concurrency 8 --skip-catch-up
#   scripts/bench-replication.sh --help                   # every option
#
# Options given here are passed on and win over the defaults (clap takes
# the last occurrence).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release --quiet -p validator -p loadgen
exec "$target_dir/release/replication-bench" \
  --keys 1000 --requests 20000 --warmup 2000 --concurrency 32 \
  --catch-up-counters 100000 --partition-secs 60 \
  "$@"
