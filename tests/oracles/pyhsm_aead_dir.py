#!/usr/bin/env python3
"""Write a pyhsm-layout AEAD directory, independently of the Rust code.

Usage: pyhsm_aead_dir.py <base dir> <key handle as typed> <handle key hex>

Reads one YubiKey per line on stdin: `<modhex public id> <uid hex> <aes key hex>`.
For each it writes the v1 file that pyhsm's yhsm-generate-keys would write:

    <base>/<key handle as typed>/<every 2-char pair of the id>/<id>
    contents: b"YubiHSM AEAD\n" | 0x01 | LE32(key handle) | nonce(6) | AEAD

with the nonce = the public id's bytes (pyhsm's default) and the AEAD =
AES-CCM (8-byte MAC, 2-byte length field, no associated data) over
key(16) | uid(6), CCM nonce LE32(key handle) | nonce(6) | 00 00 00.
Prints each written path.
"""

import os
import struct
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

MODHEX = "cbdefghijklnrtuv"


def modhex_decode(s: str) -> bytes:
    digits = "".join("0123456789abcdef"[MODHEX.index(c)] for c in s)
    return bytes.fromhex(digits)


def key_handle_value(typed: str) -> int:
    if typed.startswith("0x"):
        return int(typed, 16)
    if typed.isdigit():
        return int(typed)
    if len(typed) == 4:
        return struct.unpack("<I", typed.encode())[0]
    raise ValueError(f"bad key handle {typed!r}")


def main() -> None:
    base, typed, handle_key = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    kh = key_handle_value(typed)
    ccm = AESCCM(handle_key, tag_length=8)
    for line in sys.stdin:
        if not line.strip():
            continue
        public_id, uid, key = line.split()
        nonce = modhex_decode(public_id)
        assert len(nonce) == 6, "this oracle handles 12-character public ids"
        aead = ccm.encrypt(struct.pack("<I6sxxx", kh, nonce), bytes.fromhex(key) + bytes.fromhex(uid), None)
        pairs = [public_id[i : i + 2] for i in range(0, len(public_id), 2)]
        directory = os.path.join(base, typed, *pairs)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, public_id)
        with open(path, "wb") as f:
            f.write(b"YubiHSM AEAD\n" + bytes([1]) + struct.pack("<I", kh) + nonce + aead)
        print(path)


if __name__ == "__main__":
    main()
