#!/usr/bin/env bash
# Validator benchmark: verify 2.0 over HTTP (in-process KSM, SQLite
# counters with group commit) under closed-loop load of unique, valid,
# HMAC-signed requests, with synchronous=FULL and NORMAL (a fresh database
# each) at concurrency 8 and 32, all on 127.0.0.1, on the soft keystore
# and/or a throwaway SoftHSM2 token (--backend); then the memory of the
# real `validator serve` binary with 1,000,000 YubiKeys provisioned (soft
# keystore; the store is built once and cached under the target directory).
#
#   scripts/bench-validator.sh                      # the defaults below
#   scripts/bench-validator.sh --rss-keys 0         # throughput only
#   scripts/bench-validator.sh --rss-keys 0 --backend softhsm2
#                                                   # the validator on SoftHSM2 (PKCS#11;
#                                                   # Debian package softhsm2)
#   scripts/bench-validator.sh --rss-keys 0 --backend soft,softhsm2
#                                                   # both, one after the other
#   scripts/bench-validator.sh --rss-keys 0 --backend softhsm2,softhsm2-key-in-token
#                                                   # the token's two decode modes
#   scripts/bench-validator.sh --help               # every option of validator-bench
#
# Options given here are passed on and win over the defaults (clap takes
# the last occurrence).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release --quiet -p validator -p loadgen
exec "$target_dir/release/validator-bench" \
  --keys 1000 --requests-per-level 40000 --warmup 2000 \
  --concurrency 8,32 --synchronous full,normal \
  --rss-keys 1000000 \
  "$@"
