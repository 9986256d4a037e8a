#!/usr/bin/env python3
"""YubiHSM 1 AEAD oracle for tests/tests/oracles.rs, built on `cryptography`.

Reads one request per line on stdin and answers one line per request:

    seal <id> <key hex> <key handle, decimal> <nonce hex, 6 bytes> <plaintext hex>
    open <id> <key hex> <key handle, decimal> <nonce hex, 6 bytes> <aead hex>

    <id> ok <hex>        sealed AEAD, or opened plaintext
    <id> fail <reason>   e.g. "fail InvalidTag"

The CCM nonce is laid out here, independently of the Rust code, as the
reference describes pyhsm's counter block: LE32(key handle) || nonce(6) ||
00 00 00; the MAC is 8 bytes and there is no associated data.
"""

import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM


def ccm_nonce(key_handle: int, nonce6: bytes) -> bytes:
    if len(nonce6) != 6:
        raise ValueError("nonce must be 6 bytes")
    return struct.pack("<I6sxxx", key_handle, nonce6)


def answer(line: str) -> str:
    op, ident, key, kh, nonce, data = line.split(" ")
    ccm = AESCCM(bytes.fromhex(key), tag_length=8)
    n = ccm_nonce(int(kh), bytes.fromhex(nonce))
    try:
        if op == "seal":
            out = ccm.encrypt(n, bytes.fromhex(data), None)
        elif op == "open":
            out = ccm.decrypt(n, bytes.fromhex(data), None)
        else:
            return f"{ident} fail unknown-op"
    except InvalidTag:
        return f"{ident} fail InvalidTag"
    return f"{ident} ok {out.hex()}"


def main() -> None:
    for line in sys.stdin:
        line = line.strip()
        if line:
            print(answer(line))


if __name__ == "__main__":
    main()
