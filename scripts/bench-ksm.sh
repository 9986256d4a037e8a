#!/usr/bin/env bash
# KSM benchmark, side by side in one run: our KSM over HTTP, our KSM
# in-process, and pyhsm's yhsm-yubikey-ksm with its soft HSM (-D keys.json),
# at concurrency 1, 8 and 32, all on 127.0.0.1.
#
#   scripts/bench-ksm.sh                        # the three targets
#   scripts/bench-ksm.sh --rss-keys 1000000     # plus `ksm serve` memory with 1M AEADs
#   scripts/bench-ksm.sh --help                 # every option of ksm-bench
#
# pyhsm 1.2.1 is Python-2-only. This script installs it, if missing, into
# its own prefix under the cargo target directory (nothing is installed
# into the Python itself), using Python 2.7 from pyenv. PyPI carries 1.2.1
# as "1.2.1.post1". Besides pyserial and pycrypto (its declared
# dependencies; pycrypto is compiled, so a C compiler and the Python headers
# are needed), yhsm-yubikey-ksm imports `daemon` and `sqlalchemy` at start-up
# even with the soft HSM and an AEAD directory, so python-daemon and
# SQLAlchemy are installed too, at the last versions that support Python 2.
# If Python 2.7 or the install is not available, the benchmark runs without
# pyhsm and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
export PYHSM_PREFIX=${PYHSM_PREFIX:-$target_dir/pyhsm-py27}

pyhsm_packages=(
  "pyhsm==1.2.1.post1"
  "pyserial==3.5"
  "pycrypto==2.6.1"
  "python-daemon==2.3.0"
  "lockfile==0.12.2"
  "docutils==0.18.1"
  "SQLAlchemy==1.4.54"
)

find_python2() {
  if [ -n "${PYTHON2:-}" ]; then echo "$PYTHON2"; return; fi
  local p
  if command -v pyenv >/dev/null 2>&1 && p=$(pyenv prefix 2.7.18 2>/dev/null) && [ -x "$p/bin/python" ]; then
    echo "$p/bin/python"; return
  fi
  for p in "${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python" "$(command -v python2.7 || true)"; do
    if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return; fi
  done
}

pyhsm_works() {
  # Importing the KSM module pulls in everything it needs at start-up.
  PYTHONPATH="$PYHSM_PREFIX/lib/python2.7/site-packages" "$1" -c 'import pyhsm.ksm.yubikey_ksm, pyhsm.soft_hsm' >/dev/null 2>&1 &&
    [ -x "$PYHSM_PREFIX/bin/yhsm-yubikey-ksm" ]
}

python2=$(find_python2 || true)
if [ -z "$python2" ]; then
  echo "note: no Python 2.7 found (pyenv 2.7.18, python2.7, or \$PYTHON2); the benchmark runs without pyhsm"
elif pyhsm_works "$python2"; then
  echo "pyhsm: installed in $PYHSM_PREFIX"
else
  echo "pyhsm: installing ${pyhsm_packages[*]} into $PYHSM_PREFIX (Python: $python2)"
  mkdir -p "$PYHSM_PREFIX"
  if "$python2" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --prefix "$PYHSM_PREFIX" "${pyhsm_packages[@]}" 2>&1 | grep -v -e DEPRECATION -e '^$' >&2; then :; fi
  if pyhsm_works "$python2"; then
    echo "pyhsm: installed"
  else
    echo "note: pyhsm could not be installed; the benchmark runs without it"
  fi
fi

cargo build --release --quiet -p ksm -p loadgen
exec "$target_dir/release/ksm-bench" "$@"
