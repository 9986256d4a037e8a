#!/usr/bin/env bash
# The full test suite, on a fresh machine: installs what the tests need
# (Debian packages, Python packages), then runs formatting, lints and every
# test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive as independent oracles:
#   libyubikey-dev   ykgenerate / ykparse / modhex (Yubico's C library tools)
#   libpam-yubico    pam_yubico.so, the real PAM client of the validator
#   pamtester        drives PAM services from the tests (which run as root)
#   libykclient-dev  the `ykclient` command line (Yubico's C validation client)
#   iproute2 nftables iptables  network namespaces, partitions and loss for
#                    the replication tests (run as root; skipped otherwise)
#   sqlite3          the shell the personalizer audit tests tamper with the log through
#   openssl          the crypto officers' RSA keys and signatures (2FA, quorum) in the tests
#   softhsm2         the PKCS#11 token (libsofthsm2.so, softhsm2-util) of the hsm::pkcs11 tests
apt_packages=(libyubikey-dev libpam-yubico pamtester libykclient-dev iproute2 nftables iptables sqlite3 openssl softhsm2)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python packages: `cryptography` (AESCCM) checks our AEADs independently.
if ! python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' 2>/dev/null; then
  echo "installing Python package: cryptography"
  python3 -m pip install --quiet --disable-pip-version-check cryptography
fi
# `yubico-client` (PyPI): a second independent validation protocol client.
if ! python3 -c 'import yubico_client' 2>/dev/null; then
  echo "installing Python package: yubico-client"
  python3 -m pip install --quiet --disable-pip-version-check yubico-client
fi

# pyhsm 1.2.1 (published on PyPI as 1.2.1.post1) under Python 2.7 (pyenv's 2.7.18): the
# independent YubiHSM 1 client that hsm/tests/yhsm1_emulator.rs points at the emulator's pty,
# with python-daemon and sqlalchemy, which its yhsm-yubikey-ksm tool imports. pycrypto is
# built from source: it needs gcc (and the 2.7 headers, which pyenv's build carries).
py27="${PYHSM_PYTHON:-$HOME/.pyenv/versions/2.7.18/bin/python}"
if ! "$py27" -c 'import pyhsm, serial, Crypto, daemon, sqlalchemy' 2>/dev/null; then
  if [ ! -x "$py27" ]; then
    echo "Python 2.7 not found at $py27: install it with 'pyenv install 2.7.18' or set PYHSM_PYTHON" >&2
    exit 1
  fi
  if ! command -v gcc >/dev/null; then
    sudo_cmd=(); [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends gcc libc6-dev
  fi
  echo "installing Python 2.7 packages: pyhsm 1.2.1, python-daemon, sqlalchemy"
  "$py27" -m pip install --quiet --disable-pip-version-check 'pyhsm==1.2.1.post1' 'python-daemon==2.3.0' 'sqlalchemy==1.4.54'
fi

echo "== cargo fmt"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== fuzz targets compile"
cargo check --quiet --manifest-path fuzz/Cargo.toml
echo "== cargo test"
cargo test --workspace --locked
