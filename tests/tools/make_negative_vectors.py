#!/usr/bin/env python3
"""Write the negative known-answer vectors under tests/vectors/.

The positive vectors are transcribed by hand from the reference
(otp-and-aead.md). The negative ones are derived from those positives here,
with an implementation that shares no code with the Rust core: AES-CCM comes
from `cryptography`'s AESCCM, AES-ECB from `cryptography`'s Cipher, and the
modhex, CRC and token layout are re-written below from the reference text.

Every negative case asserts, before it is written, *why* it is negative
(for example that AESCCM refuses the tampered AEAD, that the CRC residue is
wrong, or that the AEAD opens but carries another uid), so that a case never
fails for an accidental reason.

Usage: python3 tests/tools/make_negative_vectors.py   (from the repository root
or anywhere; it finds tests/vectors/ next to this script). It only writes files
whose names start with "neg_"; hand-written positives are left alone.
"""

import hashlib
import os
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(os.path.dirname(HERE), "vectors")
GEN = "derived by tests/tools/make_negative_vectors.py"

ALPHABET = "cbdefghijklnrtuv"

# ---------------------------------------------------------------- primitives


def modhex_encode(data: bytes) -> str:
    return "".join(ALPHABET[b >> 4] + ALPHABET[b & 15] for b in data)


def modhex_decode(text: str) -> bytes:
    assert len(text) % 2 == 0
    return bytes(ALPHABET.index(text[i]) * 16 + ALPHABET.index(text[i + 1]) for i in range(0, len(text), 2))


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            lsb = crc & 1
            crc >>= 1
            if lsb:
                crc ^= 0x8408
    return crc


def crc_ok(plain: bytes) -> bool:
    return crc16(plain) == 0xF0B8


def token_plain(uid: bytes, ctr: int, tl: int, th: int, use: int, rnd: int) -> bytes:
    body = uid + struct.pack("<HHBBH", ctr, tl, th, use, rnd)
    return body + struct.pack("<H", ~crc16(body) & 0xFFFF)


def ecb(key: bytes, block: bytes, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.ECB())
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(block) + op.finalize()


def ccm_nonce(kh: int, nonce6: bytes) -> bytes:
    assert len(nonce6) == 6
    return struct.pack("<I6sBBB", kh, nonce6, 0, 0, 0)


def seal(key: bytes, kh: int, nonce6: bytes, pt: bytes) -> bytes:
    return AESCCM(key, tag_length=8).encrypt(ccm_nonce(kh, nonce6), pt, None)


def opens(key: bytes, kh: int, nonce6: bytes, aead: bytes):
    """The plaintext, or None when AESCCM refuses the AEAD."""
    if len(key) not in (16, 24, 32) or len(aead) < 9:
        return None
    try:
        return AESCCM(key, tag_length=8).decrypt(ccm_nonce(kh, nonce6), aead, None)
    except InvalidTag:
        return None


def flip(data: bytes, index: int, mask: int) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def garbage(label: str, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


# ---------------------------------------------------- reference positives
# Only used as the starting points of the negatives; each is re-checked here.

K2000 = bytes.fromhex("2000" * 16)
NONCE_M = bytes.fromhex("4d4d4d4d4d4d")
FOO = b"foo" + bytes(13)
V1 = bytes.fromhex("6657738b1501b25e455387c9a4e05ad94f84d3975ef2f942")
V2 = bytes.fromhex("41795dca5440f31f0412c688e5a11b98488d6b8e001ca913a9b559d0cb68")
V3 = bytes.fromhex(
    "41795dca5440f31f0412c688e5a11b98488d6b8e001c2f118c244f7c70e5857b0faee31a66d20269dc7dadfd6a59416cf7d07c71e8585fa510bc20b10e05ab5ba27627068bf99cf7"
)
K09 = bytes([9] * 16)
V4 = bytes.fromhex("146e56d1027355e497278aa58dbbc22aa379b5dd598b415d")
HSM_KEY = bytes(range(32))
YK_KEY = bytes(range(16))
UID = bytes.fromhex("010203040506")
NONCE_1 = bytes.fromhex("000000000001")
V5 = bytes.fromhex("e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75")
CHAIN_TOKEN = "dvgtiblfkbgturecfllberrvkinnctnn"
ZERO_ROW_TOKEN = "kkkncjnvcnenkjvjgncjihljiibgbhbh"
ROW6_KEY = bytes.fromhex("c4422890653076cde73d449b191b416a")
ROW2_TOKEN = "rnibcnfhdninbrdebccrndfhjgnhftee"
ROW4_TOKEN = "dcihgvrhjeucvrinhdfddbjhfjftjdei"
MAGIC = b"YubiHSM AEAD\n"
MAGIC_CRLF = b"YubiHSM AEAD\r\n"
FILE_V5 = MAGIC + b"\x01" + struct.pack("<I", 1) + NONCE_1 + V5

assert seal(K2000, 0x2000, NONCE_M, FOO) == V1
assert seal(K2000, 0x2000, NONCE_M, b"A" * 22) == V2
assert seal(K2000, 0x2000, NONCE_M, b"A" * 64) == V3
assert seal(K09, 1, NONCE_M, FOO) == V4
assert seal(HSM_KEY, 1, NONCE_1, YK_KEY + UID) == V5
assert ecb(YK_KEY, token_plain(UID, 1, 1, 1, 1, 0)) == modhex_decode(CHAIN_TOKEN)
assert len(FILE_V5) == 54

# ------------------------------------------------------------------ writing

written = []


def write(kind: str, name: str, expect: str, why: str, fields):
    assert name.startswith("neg_") and expect != "ok"
    lines = [f"kind: {kind}", f"expect: {expect}", f"source: {GEN}: {why}"]
    for key, value in fields:
        if isinstance(value, (bytes, bytearray)):
            value = value.hex()
        value = str(value)
        assert value == value.rstrip() and "\n" not in value, (name, key)
        lines.append(f"{key}: {value}" if value else f"{key}:")
    path = os.path.join(VECTORS, kind, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    written.append(path)


def kh_text(kh: int) -> str:
    return f"0x{kh:08x}"


# ------------------------------------------------------------------- aead/


def aead_integrity(name, why, key, kh, nonce, aead):
    assert opens(key, kh, nonce, aead) is None, name
    write("aead", name, "aead_integrity", why,
          [("aes-key", key), ("key-handle", kh_text(kh)), ("nonce", nonce), ("aead", aead)])


aead_integrity("neg_v1_ciphertext_bit_flip", "vector 1 with bit 0 of ciphertext byte 0 flipped",
               K2000, 0x2000, NONCE_M, flip(V1, 0, 0x01))
aead_integrity("neg_v1_tag_bit_flip", "vector 1 with the top bit of the last MAC byte flipped",
               K2000, 0x2000, NONCE_M, flip(V1, len(V1) - 1, 0x80))
aead_integrity("neg_v3_last_ciphertext_byte_flip", "vector 3 with the last ciphertext byte (63) changed",
               K2000, 0x2000, NONCE_M, flip(V3, 63, 0x01))
aead_integrity("neg_v5_ciphertext_bit_flip_uid", "vector 5 with a bit of the encrypted uid flipped",
               HSM_KEY, 1, NONCE_1, flip(V5, 18, 0x10))
aead_integrity("neg_v5_tag_first_byte_flip", "vector 5 with the first MAC byte changed",
               HSM_KEY, 1, NONCE_1, flip(V5, 22, 0x01))
aead_integrity("neg_v5_tag_zeroed", "vector 5 with the MAC replaced by zeros",
               HSM_KEY, 1, NONCE_1, V5[:22] + bytes(8))
aead_integrity("neg_v1_wrong_key_handle", "vector 1 opened under key handle 0x2001 (same AES key)",
               K2000, 0x2001, NONCE_M, V1)
aead_integrity("neg_v1_key_handle_big_endian", "vector 1 opened under 0x00200000 (key handle packed big-endian)",
               K2000, 0x00200000, NONCE_M, V1)
aead_integrity("neg_v4_key_handle_zero", "vector 4 opened under key handle 0",
               K09, 0, NONCE_M, V4)
aead_integrity("neg_v5_wrong_nonce", "vector 5 opened with nonce 000000000002 (another public id)",
               HSM_KEY, 1, bytes.fromhex("000000000002"), V5)
aead_integrity("neg_v5_nonce_reversed", "vector 5 opened with the nonce bytes reversed",
               HSM_KEY, 1, NONCE_1[::-1], V5)
aead_integrity("neg_v2_nonce_zero", "vector 2 opened with an all-zero nonce",
               K2000, 0x2000, bytes(6), V2)
aead_integrity("neg_v4_wrong_key", "vector 4 opened with key 0a*16 instead of 09*16",
               bytes([10] * 16), 1, NONCE_M, V4)
aead_integrity("neg_v1_aes128_half_key", "vector 1 opened with the first 16 bytes of its AES-256 key",
               K2000[:16], 0x2000, NONCE_M, V1)
aead_integrity("neg_v5_aes192_key_prefix", "vector 5 opened with the first 24 bytes of its AES-256 key",
               HSM_KEY[:24], 1, NONCE_1, V5)
aead_integrity("neg_v5_truncated_one_byte", "vector 5 minus its last byte (29 bytes, a valid length)",
               HSM_KEY, 1, NONCE_1, V5[:-1])
aead_integrity("neg_v5_extra_byte", "vector 5 plus a trailing 00 byte",
               HSM_KEY, 1, NONCE_1, V5 + b"\x00")


def aead_length(name, why, aead):
    assert not 9 <= len(aead) <= 72
    write("aead", name, "bad_length", why,
          [("aes-key", K2000), ("key-handle", "0x00002000"), ("nonce", NONCE_M), ("aead", aead)])


aead_length("neg_aead_8_bytes", "8 bytes (a MAC with no ciphertext; YubiHSM AEADs are 9 to 72 bytes)", V1[-8:])
aead_length("neg_aead_73_bytes", "vector 3 plus one byte: 73 bytes, over YSM_AEAD_MAX_SIZE", V3 + b"\x00")
aead_length("neg_aead_empty", "an empty AEAD", b"")

write("aead", "neg_key_20_bytes", "bad_key_size", "a 20-byte AES key (only 16, 24 or 32 exist)",
      [("aes-key", K2000[:20]), ("key-handle", "0x00002000"), ("nonce", NONCE_M), ("aead", V1)])
write("aead", "neg_key_empty", "bad_key_size", "an empty AES key",
      [("aes-key", b""), ("key-handle", "0x00002000"), ("nonce", NONCE_M), ("aead", V1)])
write("aead", "neg_seal_empty_plaintext", "bad_length", "sealing 0 bytes (the YubiHSM seals 1 to 64)",
      [("aes-key", K2000), ("key-handle", "0x00002000"), ("nonce", NONCE_M), ("plaintext", b"")])
write("aead", "neg_seal_65_bytes", "bad_length", "sealing 65 bytes (over YSM_DATA_BUF_SIZE = 64)",
      [("aes-key", K2000), ("key-handle", "0x00002000"), ("nonce", NONCE_M), ("plaintext", b"A" * 65)])

# -------------------------------------------------------------- otp-token/


def bad_token(name, why, key, token):
    assert not crc_ok(ecb(key, modhex_decode(token), decrypt=True)), name
    write("otp-token", name, "bad_crc", why, [("aes-key", key), ("token", token)])


def change_char(text, index):
    c = text[index]
    return text[:index] + ALPHABET[(ALPHABET.index(c) + 1) % 16] + text[index + 1:]


bad_token("neg_selftest1_last_char_changed", "row 1 token with its last modhex character changed",
          YK_KEY, change_char(CHAIN_TOKEN, 31))
bad_token("neg_selftest1_first_char_changed", "row 1 token with its first modhex character changed",
          YK_KEY, change_char(CHAIN_TOKEN, 0))
bad_token("neg_selftest1_wrong_key", "row 1 token decrypted with the key of row 6", ROW6_KEY, CHAIN_TOKEN)
bad_token("neg_selftest4_key_last_byte", "row 4 token decrypted with key 88*15 || 89",
          bytes([0x88] * 15 + [0x89]), ROW4_TOKEN)
bad_token("neg_selftest2_with_zero_key", "row 2 token decrypted with the all-zero key of row 5",
          bytes(16), ROW2_TOKEN)
bad_token("neg_all_c_token", "the all-zero ciphertext (32 x 'c') under the all-zero key", bytes(16), "c" * 32)
bad_token("neg_plaintext_not_encrypted", "row 1 plaintext typed without AES encryption",
          YK_KEY, modhex_encode(token_plain(UID, 1, 1, 1, 1, 0)))

# -------------------------------------------------------- token-plaintext/

ROW1 = token_plain(UID, 1, 1, 1, 1, 0)
assert ROW1.hex() == "01020304050601000100010100" "0036fe"


def bad_plain(name, why, plain):
    assert len(plain) == 16 and not crc_ok(plain), name
    write("token-plaintext", name, "bad_crc", why, [("plaintext", plain)])


bad_plain("neg_crc_stored_big_endian", "row 1 plaintext with its CRC stored big-endian (fe 36)", ROW1[:14] + ROW1[14:][::-1])
bad_plain("neg_crc_not_complemented", "row 1 plaintext storing crc16(bytes 0-13) instead of its complement",
          ROW1[:14] + struct.pack("<H", crc16(ROW1[:14])))
bad_plain("neg_counter_bit_flip", "row 1 plaintext with bit 0 of the counter flipped", flip(ROW1, 6, 0x01))
bad_plain("neg_all_zero", "16 zero bytes", bytes(16))

# ----------------------------------------------------------------- modhex/


def bad_modhex(name, why, text, position):
    write("modhex", name, "bad_modhex", why, [("modhex", text), ("position", position)])


bad_modhex("neg_bad_char_a", "'a' is hex, not modhex", "cbda", 3)
bad_modhex("neg_hex_digits", "hex digits are not modhex", "0123", 0)
bad_modhex("neg_upper_case", "decoding is strict lower case (ifhgieif in capitals)", "IFHGIEIF", 0)
bad_modhex("neg_non_ascii_even_bytes", "a non-ASCII character (2 UTF-8 bytes, 4 bytes in all)", "vv\u00e9", 2)
bad_modhex("neg_non_ascii_odd_bytes", "a non-ASCII character in an odd byte length: the character is reported first", "c\u00e9", 1)
bad_modhex("neg_embedded_space", "a space inside", "cb dc", 2)
write("modhex", "neg_odd_length_3", "odd_length", "three valid characters", [("modhex", "cbd")])
write("modhex", "neg_odd_length_9", "odd_length", "ifhgieif plus one character", [("modhex", "ifhgieifc")])

# -------------------------------------------------------------------- otp/

CHAIN_OTP = "cccccccccccb" + CHAIN_TOKEN


def bad_otp(name, why, expect, otp, position=None):
    fields = [("otp", otp)]
    if position is not None:
        fields.append(("position", position))
    write("otp", name, expect, why, fields)


bad_otp("neg_31_chars", "row 1 token missing its last character", "bad_length", CHAIN_TOKEN[:31])
bad_otp("neg_49_chars", "a 17-character public id (over 16)", "bad_length", "c" * 16 + "b" + CHAIN_TOKEN)
bad_otp("neg_50_chars", "an 18-character public id", "bad_length", "c" * 17 + "b" + CHAIN_TOKEN)
bad_otp("neg_empty", "an empty OTP", "bad_length", "")
bad_otp("neg_bad_char_in_token", "an 'a' at position 40", "bad_modhex", CHAIN_OTP[:40] + "a" + CHAIN_OTP[41:], 40)
bad_otp("neg_bad_char_in_public_id", "an 'x' at position 0", "bad_modhex", "x" + CHAIN_OTP[1:], 0)
bad_otp("neg_non_ascii_first", "a non-ASCII first character (44 characters, 45 bytes)", "bad_modhex",
        "\u00e9" + CHAIN_OTP[1:], 0)
bad_otp("neg_non_ascii_in_token", "a non-ASCII character inside a 32-character token", "bad_modhex",
        CHAIN_TOKEN[:10] + "\u00fc" + CHAIN_TOKEN[11:], 10)
bad_otp("neg_hex_digits", "the chain OTP written in hex instead of modhex", "bad_modhex",
        "000000000001" + modhex_decode(CHAIN_TOKEN).hex(), 0)
bad_otp("neg_embedded_space", "a space between public id and token (token shortened to keep 44)", "bad_modhex",
        "cccccccccccb " + CHAIN_TOKEN[:31], 12)
bad_otp("neg_odd_public_id_33", "33 characters: a 1-character public id", "odd_length", "c" + CHAIN_TOKEN)

# -------------------------------------------------------------------- ksm/


def ksm(name, why, expect, otp, aead, key=HSM_KEY, kh=1, nonce=None):
    fields = [("hsm-key", key), ("key-handle", kh_text(kh)), ("otp", otp), ("aead", aead)]
    if nonce is not None:
        fields.append(("nonce", nonce))
    write("ksm", name, expect, why, fields)


def ksm_integrity(name, why, otp, aead, key=HSM_KEY, kh=1, nonce=None):
    n = nonce if nonce is not None else modhex_decode(otp[:-32]).ljust(6, b"\0")
    assert opens(key, kh, n, aead) is None, name
    ksm(name, why, "aead_integrity", otp, aead, key, kh, nonce)


ksm_integrity("neg_wrong_key_handle", "chain vector decoded under key handle 2", CHAIN_OTP, V5, kh=2)
ksm_integrity("neg_key_handle_byte_order", "chain vector under 0x01000000 (key handle byte order)", CHAIN_OTP, V5, kh=0x01000000)
ksm_integrity("neg_wrong_hsm_key", "chain vector with the HSM key bytes reversed", CHAIN_OTP, V5, key=HSM_KEY[::-1])
ksm_integrity("neg_hsm_key_aes128_prefix", "chain vector with the first 16 bytes of the HSM key", CHAIN_OTP, V5, key=HSM_KEY[:16])
ksm_integrity("neg_other_public_id", "the chain token under public id cccccccccccd (nonce 000000000002)",
              "cccccccccccd" + CHAIN_TOKEN, V5)
ksm_integrity("neg_explicit_zero_nonce", "chain vector with an explicit all-zero nonce instead of the public id",
              CHAIN_OTP, V5, nonce=bytes(6))
ksm_integrity("neg_aead_tampered", "chain vector with one AEAD ciphertext bit flipped", CHAIN_OTP, flip(V5, 3, 0x04))

other_token_plain = ecb(YK_KEY, modhex_decode(ZERO_ROW_TOKEN), decrypt=True)
assert not crc_ok(other_token_plain)
ksm("neg_token_of_other_key", "the all-zero-key token of row 5 sent with the chain public id", "bad_crc",
    "cccccccccccb" + ZERO_ROW_TOKEN, V5)
bent = change_char(CHAIN_TOKEN, 20)
assert not crc_ok(ecb(YK_KEY, modhex_decode(bent), decrypt=True))
ksm("neg_token_char_changed", "chain OTP with token character 20 changed", "bad_crc", "cccccccccccb" + bent, V5)


def uid_mismatch_aead(uid):
    aead = seal(HSM_KEY, 1, NONCE_1, YK_KEY + uid)
    assert opens(HSM_KEY, 1, NONCE_1, aead) == YK_KEY + uid
    plain = ecb(YK_KEY, modhex_decode(CHAIN_TOKEN), decrypt=True)
    assert crc_ok(plain) and plain[:6] != uid
    return aead


ksm("neg_uid_mismatch_last_byte", "valid AEAD of key 000102..0f with uid 010203040507; the token says 010203040506",
    "uid_mismatch", CHAIN_OTP, uid_mismatch_aead(bytes.fromhex("010203040507")))
ksm("neg_uid_mismatch_zero_uid", "valid AEAD of key 000102..0f with uid 000000000000", "uid_mismatch",
    CHAIN_OTP, uid_mismatch_aead(bytes(6)))
ksm("neg_uid_mismatch_first_byte", "valid AEAD of key 000102..0f with uid 810203040506", "uid_mismatch",
    CHAIN_OTP, uid_mismatch_aead(bytes.fromhex("810203040506")))

short = seal(HSM_KEY, 1, NONCE_1, YK_KEY)
assert opens(HSM_KEY, 1, NONCE_1, short) == YK_KEY and len(short) == 24
ksm("neg_aead_of_16_bytes", "valid AEAD of a 16-byte plaintext (not key || uid)", "bad_length", CHAIN_OTP, short)
longer = seal(HSM_KEY, 1, NONCE_1, YK_KEY + UID + b"\0")
assert len(longer) == 31
ksm("neg_aead_of_23_bytes", "valid AEAD of key || uid || 00 (23 bytes)", "bad_length", CHAIN_OTP, longer)
ksm("neg_otp_49_chars", "a 17-character public id before the chain token", "bad_length", "c" * 16 + "b" + CHAIN_TOKEN, V5)
ksm("neg_otp_43_chars", "chain OTP minus its last character: the public id becomes 11 characters", "odd_length",
    CHAIN_OTP[:-1], V5)
ksm("neg_otp_bad_modhex", "chain OTP with an 'a' in the token", "bad_modhex", CHAIN_OTP[:20] + "a" + CHAIN_OTP[21:], V5)
ksm("neg_public_id_too_long_for_nonce", "a 16-character public id cannot be a 6-byte AEAD nonce", "bad_public_id",
    "c" * 15 + "b" + CHAIN_TOKEN, V5)

# ------------------------------------------------------------------ yhsm2/

Y2 = NONCE_1 + V5
assert Y2.hex() == "000000000001e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75"


def yhsm2(name, why, expect, aead36, nonce_id=1, key=HSM_KEY, token=CHAIN_TOKEN):
    if expect == "aead_integrity":
        assert len(aead36) == 36 and opens(key, nonce_id, aead36[:6], aead36[6:]) is None, name
    write("yhsm2", name, expect, why,
          [("hsm-key", key), ("nonce-id", kh_text(nonce_id)), ("aead36", aead36), ("otp", token)])


yhsm2("neg_35_bytes", "the YubiHSM 2 form minus its last byte", "bad_length", Y2[:35])
yhsm2("neg_37_bytes", "the YubiHSM 2 form plus one byte", "bad_length", Y2 + b"\x00")
yhsm2("neg_yhsm1_form_30_bytes", "the 30-byte YubiHSM 1 AEAD given where the 36-byte form is expected", "bad_length", V5)
yhsm2("neg_wrong_nonce_id", "decrypted under nonce id 2", "aead_integrity", Y2, nonce_id=2)
yhsm2("neg_nonce_id_big_endian", "nonce id 1 packed big-endian (0x01000000), the python-yubihsm generate mix-up",
      "aead_integrity", Y2, nonce_id=0x01000000)
yhsm2("neg_nonce_prefix_changed", "the 6-byte nonce prefix changed to 000000000002", "aead_integrity",
      bytes.fromhex("000000000002") + V5)
yhsm2("neg_tag_flipped", "last MAC byte flipped", "aead_integrity", flip(Y2, 35, 0x01))
Y2_UID = NONCE_1 + uid_mismatch_aead(bytes.fromhex("010203040507"))
yhsm2("neg_uid_mismatch", "valid YubiHSM 2 AEAD of uid 010203040507, token of uid 010203040506", "uid_mismatch", Y2_UID)
yhsm2("neg_token_of_other_key", "row 5 token (all-zero key) against the vector 5 AEAD", "bad_crc", Y2, token=ZERO_ROW_TOKEN)

# -------------------------------------------------------------- aead-file/


def afile(name, why, expect, data, **extra):
    fields = [("file", data)]
    for key in ("lookup_key_handle", "public_id", "aes_key"):
        if key in extra:
            fields.append((key.replace("_", "-"), extra[key]))
    write("aead-file", name, expect, why, fields)


for n in (5, 12, 13, 16, 20):
    afile(f"neg_truncated_{n}_bytes", f"the §5.1 example cut to {n} bytes (inside the header)", "truncated_file", FILE_V5[:n])
afile("neg_truncated_crlf_13_bytes", "\"YubiHSM AEAD\\r\" (a cut Windows marker)", "truncated_file", MAGIC_CRLF[:13])
afile("neg_header_only_24_bytes", "a complete v1 header with no AEAD", "bad_length", FILE_V5[:24])
afile("neg_truncated_30_bytes", "the §5.1 example cut to 30 bytes (6 AEAD bytes)", "bad_length", FILE_V5[:30])
assert opens(HSM_KEY, 1, NONCE_1, FILE_V5[24:53]) is None
afile("neg_truncated_53_bytes", "the §5.1 example minus one byte: parses, but the MAC fails", "aead_integrity",
      FILE_V5[:53], aes_key=HSM_KEY)
for version in (0, 2, 0xFF):
    data = FILE_V5[:13] + bytes([version]) + FILE_V5[14:]
    afile(f"neg_version_{version}", f"the §5.1 example with version byte {version}", "unknown_version", data)
afile("neg_version_2_crlf", "a CRLF-marker file with version byte 2", "unknown_version",
      MAGIC_CRLF + b"\x02" + FILE_V5[14:])
afile("neg_v1_aead_73_bytes", "a v1 header followed by 73 AEAD bytes", "bad_length",
      FILE_V5[:24] + garbage("aead-73", 73))
afile("neg_empty", "an empty file", "bad_length", b"")
afile("neg_zeros_200_bytes", "200 zero bytes (too long for a raw v0 AEAD)", "bad_length", bytes(200))
afile("neg_garbage_4_bytes", "4 bytes of garbage", "bad_length", bytes.fromhex("00010203"))
g54 = garbage("aead-file-54", 54)
assert not g54.startswith(b"Yubi") and opens(HSM_KEY, 1, NONCE_1, g54) is None
afile("neg_garbage_54_bytes_as_v0", "54 bytes of garbage read as a v0 AEAD: only the MAC catches it", "aead_integrity",
      g54, lookup_key_handle="0x1", public_id="cccccccccccb", aes_key=HSM_KEY)
lower = b"yubihsm aead\n" + FILE_V5[13:]
assert opens(HSM_KEY, 1, NONCE_1, lower) is None
afile("neg_lower_case_marker", "a lower-case marker is not v1; read as a 54-byte v0 AEAD it fails the MAC", "aead_integrity",
      lower, lookup_key_handle="0x1", public_id="cccccccccccb", aes_key=HSM_KEY)
afile("neg_key_handle_mismatch", "the §5.1 file (kh 1) looked up for key handle 2", "key_handle_mismatch",
      FILE_V5, lookup_key_handle="0x2", public_id="cccccccccccb")
afile("neg_key_handle_mismatch_byte_order", "the §5.1 file looked up for 0x01000000", "key_handle_mismatch",
      FILE_V5, lookup_key_handle="0x01000000", public_id="cccccccccccb")
file_kh20 = MAGIC + b"\x01" + struct.pack("<I", 0x20) + NONCE_1 + seal(HSM_KEY, 0x20, NONCE_1, YK_KEY + UID)
afile("neg_key_handle_mismatch_decimal_20", "a kh 0x20 file under the directory \"20\" (decimal 20, pyhsm issue #6)",
      "key_handle_mismatch", file_kh20, lookup_key_handle="20", public_id="cccccccccccb")
nonce2 = FILE_V5[:18] + bytes.fromhex("000000000002") + FILE_V5[24:]
assert opens(HSM_KEY, 1, bytes.fromhex("000000000002"), V5) is None
afile("neg_nonce_field_changed", "the §5.1 file with its nonce field changed to 000000000002", "aead_integrity",
      nonce2, aes_key=HSM_KEY)
kh2 = FILE_V5[:14] + struct.pack("<I", 2) + FILE_V5[18:]
assert opens(HSM_KEY, 2, NONCE_1, V5) is None
afile("neg_key_handle_field_changed", "the §5.1 file relabelled kh 2 and looked up as 2: the MAC binds the handle",
      "aead_integrity", kh2, lookup_key_handle="2", public_id="cccccccccccb", aes_key=HSM_KEY)
afile("neg_v0_wrong_public_id", "raw vector 5 found under public id cccccccccccd", "aead_integrity",
      V5, lookup_key_handle="1", public_id="cccccccccccd", aes_key=HSM_KEY)
afile("neg_v0_public_id_too_long", "raw vector 5 under a 16-character public id (no 6-byte nonce)", "bad_public_id",
      V5, lookup_key_handle="1", public_id="cccccccccccccccb")

# ------------------------------------------------------------- key-handle/

for name, text, why in [
    ("neg_empty", "", "empty"),
    ("neg_0x_alone", "0x", "a bare 0x prefix"),
    ("neg_hex_bad_digit", "0xg1", "a non-hex digit after 0x"),
    ("neg_five_ascii", "abcde", "five characters (only exactly four are read as ASCII)"),
    ("neg_three_ascii", "KSM", "three characters"),
    ("neg_decimal_overflow", "4294967296", "2^32 in decimal"),
    ("neg_hex_overflow", "0x100000000", "2^32 in hex"),
    ("neg_minus_one", "-1", "a negative number"),
    ("neg_ascii_with_space", "KS 1", "four characters with a space"),
]:
    write("key-handle", name, "bad_key_handle", why, [("text", text)])

print(f"wrote {len(written)} negative vectors", file=sys.stderr)
