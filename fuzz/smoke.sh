#!/usr/bin/env bash
# Coverage-guided smoke run of every fuzz target on a *stable* toolchain,
# without cargo-fuzz or nightly: libfuzzer-sys builds libFuzzer with the C++
# compiler, and rustc's stable -C flags add the SanitizerCoverage counters
# that cargo-fuzz would add. (No AddressSanitizer: that needs nightly, and the
# code under test forbids `unsafe` anyway.)
#
# Usage: fuzz/smoke.sh [seconds per target, default 10] [target ...]
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-10}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(fuzz_modhex fuzz_otp fuzz_aead_file)
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
# An explicit --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cdebug-assertions -Coverflow-checks"
cargo build --release --target "$host" --target-dir target/stable

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: ${seconds}s"
    # corpus/<t> collects new inputs; seeds/<t> is read only.
    "target/stable/$host/release/$t" "corpus/$t" "seeds/$t" \
        -max_total_time="$seconds" -artifact_prefix="artifacts/$t/" -print_final_stats=1
done
