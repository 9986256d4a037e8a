//! Yubico modhex: hexadecimal with the alphabet `cbdefghijklnrtuv`.
//!
//! The alphabet uses only keys that sit at the same place on most keyboard
//! layouts, which is why YubiKeys type it. Nibble `0` is `c`, nibble `f` is
//! `v`, high nibble first.
//!
//! Decoding is strict and **lowercase only**; callers that accept user
//! input lowercase it first (see [`crate::otp::Otp::parse`]).

use crate::Error;

/// The modhex alphabet, indexed by nibble value.
pub const ALPHABET: &[u8; 16] = b"cbdefghijklnrtuv";

/// The nibble a modhex character stands for, or `None`.
#[must_use]
pub fn nibble(c: u8) -> Option<u8> {
    // Position lookup in a 16-byte table: fast enough and obviously right.
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Encode bytes as modhex.
#[must_use]
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(ALPHABET[usize::from(b >> 4)] as char);
        out.push(ALPHABET[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Decode a modhex string into `out`, which must be exactly half its length.
///
/// This is the allocation-free form used on the hot path.
pub fn decode_into(text: &str, out: &mut [u8]) -> Result<(), Error> {
    let raw = text.as_bytes();
    if !raw.len().is_multiple_of(2) {
        return Err(Error::ModhexOddLength { len: text.chars().count() });
    }
    if out.len() != raw.len() / 2 {
        return Err(Error::length("modhex output", "half the input length", out.len()));
    }
    for (i, pair) in raw.chunks_exact(2).enumerate() {
        let hi = nibble(pair[0]).ok_or_else(|| bad_char(text, 2 * i))?;
        let lo = nibble(pair[1]).ok_or_else(|| bad_char(text, 2 * i + 1))?;
        out[i] = (hi << 4) | lo;
    }
    Ok(())
}

/// Decode a modhex string into bytes.
pub fn decode(text: &str) -> Result<Vec<u8>, Error> {
    let raw = text.as_bytes();
    if !raw.len().is_multiple_of(2) {
        // Report the first bad character before the length, if there is one:
        // that is the more useful message for a mistyped string.
        if let Some(pos) = raw.iter().position(|&c| nibble(c).is_none()) {
            return Err(bad_char(text, pos));
        }
        return Err(Error::ModhexOddLength { len: text.chars().count() });
    }
    let mut out = vec![0u8; raw.len() / 2];
    decode_into(text, &mut out)?;
    Ok(out)
}

/// Is every character of `text` in the modhex alphabet?
#[must_use]
pub fn is_modhex(text: &str) -> bool {
    text.bytes().all(|c| nibble(c).is_some())
}

/// Build the error for the byte at `byte_pos`, reporting the character (not
/// the byte) position so that non-ASCII input gets a sensible message.
fn bad_char(text: &str, byte_pos: usize) -> Error {
    let (position, found) = text
        .char_indices()
        .enumerate()
        .find(|(_, (start, c))| *start <= byte_pos && byte_pos < start + c.len_utf8())
        .map(|(i, (_, c))| (i, c))
        .unwrap_or((byte_pos, '\u{fffd}'));
    Error::ModhexCharacter { position, found }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn libyubikey_examples() {
        // Values checked against Debian libyubikey-dev's `modhex` tool.
        assert_eq!(encode(b"test"), "ifhgieif");
        assert_eq!(encode(&hex::decode("b565716f").unwrap()), "nghgibhv");
        assert_eq!(hex::encode(decode("dteffuje").unwrap()), "2d344e83");
        assert_eq!(encode(&hex::decode("ecde18dbe76fbd0c33330f1c354871db").unwrap()), "urtubjtnuihvntcreeeecvbregfjibtn");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("cbd"), Err(Error::ModhexOddLength { len: 3 }));
        assert_eq!(decode("cbda"), Err(Error::ModhexCharacter { position: 3, found: 'a' }));
        assert_eq!(decode("CB"), Err(Error::ModhexCharacter { position: 0, found: 'C' }));
        assert_eq!(decode("cé"), Err(Error::ModhexCharacter { position: 1, found: 'é' }));
        assert_eq!(decode("xcb"), Err(Error::ModhexCharacter { position: 0, found: 'x' }));
        assert_eq!(decode(""), Ok(vec![]));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = encode(&bytes);
            prop_assert!(is_modhex(&text));
            prop_assert_eq!(decode(&text).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(text in "\\PC{0,40}") {
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(encode(&bytes), text);
            }
        }
    }
}
