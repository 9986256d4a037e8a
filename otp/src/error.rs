use std::fmt;

/// Everything that can be wrong with an input to the core.
///
/// Each variant names one precise fault, so that callers can map it to a
/// protocol answer (for example the KSM's `ERR Invalid OTP format` versus
/// `ERR Corrupt OTP`) and operators get a clear message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A modhex string held a character outside `cbdefghijklnrtuv`.
    #[error("invalid modhex character {found:?} at position {position}")]
    ModhexCharacter {
        /// Zero-based character position.
        position: usize,
        /// The offending character.
        found: char,
    },
    /// A modhex string had an odd number of characters.
    #[error("modhex string has odd length {len}")]
    ModhexOddLength {
        /// Length in characters.
        len: usize,
    },
    /// A hexadecimal string could not be decoded.
    #[error("invalid hex: {0}")]
    Hex(String),
    /// The OTP string was not 32 to 48 characters long.
    #[error("OTP must be 32 to 48 modhex characters (public id of 0-16, token of 32), got {len}")]
    OtpLength {
        /// Length in characters.
        len: usize,
    },
    /// The public id was longer than 16 modhex characters (8 bytes).
    #[error("public id must be at most 8 bytes (16 modhex characters), got {len} bytes")]
    PublicIdLength {
        /// Length in bytes.
        len: usize,
    },
    /// The public id does not fit a 6-byte YubiHSM AEAD nonce.
    #[error("public id of {len} bytes does not fit a 6-byte AEAD nonce")]
    PublicIdTooLongForNonce {
        /// Length in bytes.
        len: usize,
    },
    /// A decrypted token failed the CRC-16 residue check.
    #[error("OTP token CRC check failed (wrong key or corrupted OTP)")]
    TokenCrc,
    /// A decrypted token carried a different private id (uid) than its AEAD.
    #[error("OTP private id does not match the AEAD's")]
    UidMismatch,
    /// A field had the wrong length.
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        /// What was being parsed.
        what: &'static str,
        /// The length required, as text (for example `"9 to 72"`).
        expected: &'static str,
        /// The length given.
        got: usize,
    },
    /// AES key of an unsupported size.
    #[error("AES key must be 16, 24 or 32 bytes, got {0}")]
    KeySize(usize),
    /// An AEAD failed its integrity check: tampered, or used with the wrong
    /// key, key handle or nonce.
    #[error("AEAD integrity check failed (tampered blob, or wrong key handle, key or nonce)")]
    AeadIntegrity,
    /// A key handle string could not be parsed.
    #[error("invalid key handle {0:?}: use decimal, 0x-prefixed hex, or 4 ASCII characters")]
    KeyHandleSyntax(String),
    /// A counter value was out of range.
    #[error("counter {0:#x} is out of range (at most 0x7fff)")]
    CounterRange(u16),
    /// An AEAD file was shorter than its header says it must be.
    #[error("AEAD file is truncated ({len} bytes)")]
    FileTruncated {
        /// The file's length in bytes.
        len: usize,
    },
    /// An AEAD file carried an unknown version byte.
    #[error("unknown AEAD file format version {0}")]
    FileVersion(u8),
}

impl Error {
    pub(crate) fn length(what: &'static str, expected: &'static str, got: usize) -> Self {
        Self::Length { what, expected, got }
    }
}

/// Write bytes as lowercase hex; used by `Debug` impls of public values.
pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}
