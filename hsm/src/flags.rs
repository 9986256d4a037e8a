//! Key-handle permission flags, modelled on the YubiHSM 1.
//!
//! The bit values are the YubiHSM 1's own (pyhsm's test configuration gives
//! handle N the flag `1 << (N-1)`), so a flag word read from a YubiHSM 1
//! configuration means the same here. One bit is an appliance extension:
//! [`Flags::EXPORT`], which allows decrypting an AEAD to program YubiKeys.
//! A YubiHSM 1 has no such command: there the plaintext is only recovered in
//! software by someone holding the key.

use std::fmt;
use std::str::FromStr;

/// A set of permission flags of one key handle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u32);

/// (name, bit) in display order.
const NAMES: &[(&str, u32)] = &[
    ("aead-generate", Flags::AEAD_GENERATE.0),
    ("buffer-aead-generate", Flags::BUFFER_AEAD_GENERATE.0),
    ("random-aead-generate", Flags::RANDOM_AEAD_GENERATE.0),
    ("aead-decrypt-cmp", Flags::AEAD_DECRYPT_CMP.0),
    ("db-yubikey-aead-store", Flags::DB_YUBIKEY_AEAD_STORE.0),
    ("otp-decode", Flags::OTP_DECODE.0),
    ("ecb-encrypt", Flags::ECB_BLOCK_ENCRYPT.0),
    ("ecb-decrypt", Flags::ECB_BLOCK_DECRYPT.0),
    ("ecb-decrypt-cmp", Flags::ECB_BLOCK_DECRYPT_CMP.0),
    ("hmac-sha1", Flags::HMAC_SHA1_GENERATE.0),
    ("export", Flags::EXPORT.0),
    ("user-nonce", Flags::USER_NONCE.0),
    ("buffer-load", Flags::BUFFER_LOAD.0),
];

/// (preset name, flags, description) accepted by [`Flags::from_str`].
pub const PRESETS: &[(&str, Flags, &str)] = &[
    ("personalizer", Flags::PERSONALIZER, "generate secrets, wrap them, and export them once to program YubiKeys"),
    ("decode-only", Flags::OTP_DECODE, "validation servers: decode OTPs, nothing else"),
    ("import", Flags::IMPORT, "wrap secrets brought from elsewhere (YK-KSM exports)"),
];

/// Every flag name and preset name [`Flags::from_str`] accepts.
pub(crate) fn known_names() -> impl Iterator<Item = &'static str> {
    NAMES.iter().map(|(n, _)| *n).chain(PRESETS.iter().map(|(n, _, _)| *n))
}

impl Flags {
    /// No permissions.
    pub const NONE: Self = Self(0);
    /// `YSM_AEAD_GENERATE`: AEAD of host-supplied data.
    pub const AEAD_GENERATE: Self = Self(0x0000_0002);
    /// `YSM_BUFFER_AEAD_GENERATE`: AEAD of the internal buffer.
    pub const BUFFER_AEAD_GENERATE: Self = Self(0x0000_0004);
    /// `YSM_RANDOM_AEAD_GENERATE`: AEAD of fresh random bytes.
    pub const RANDOM_AEAD_GENERATE: Self = Self(0x0000_0008);
    /// `YSM_AEAD_DECRYPT_CMP`: compare an AEAD's plaintext.
    pub const AEAD_DECRYPT_CMP: Self = Self(0x0000_0010);
    /// `YSM_DB_YUBIKEY_AEAD_STORE`: store into the internal database.
    pub const DB_YUBIKEY_AEAD_STORE: Self = Self(0x0000_0100);
    /// `YSM_AEAD_YUBIKEY_OTP_DECODE`: decode OTPs against AEADs.
    pub const OTP_DECODE: Self = Self(0x0000_0200);
    /// `YSM_AES_ECB_BLOCK_ENCRYPT`.
    pub const ECB_BLOCK_ENCRYPT: Self = Self(0x0000_2000);
    /// `YSM_AES_ECB_BLOCK_DECRYPT`.
    pub const ECB_BLOCK_DECRYPT: Self = Self(0x0000_4000);
    /// `YSM_AES_ECB_BLOCK_DECRYPT_CMP`.
    pub const ECB_BLOCK_DECRYPT_CMP: Self = Self(0x0000_8000);
    /// `YSM_HMAC_SHA1_GENERATE`.
    pub const HMAC_SHA1_GENERATE: Self = Self(0x0001_0000);
    /// Appliance extension: decrypt AEADs to program YubiKeys.
    pub const EXPORT: Self = Self(0x0100_0000);
    /// `YSM_USER_NONCE`: the caller may choose the AEAD nonce.
    pub const USER_NONCE: Self = Self(0x2000_0000);
    /// `YSM_BUFFER_LOAD`: load host data into the internal buffer.
    pub const BUFFER_LOAD: Self = Self(0x4000_0000);

    /// The personalisation laptop's handle: generate, wrap with the public
    /// id as nonce, export once.
    pub const PERSONALIZER: Self =
        Self(Self::BUFFER_AEAD_GENERATE.0 | Self::RANDOM_AEAD_GENERATE.0 | Self::USER_NONCE.0 | Self::BUFFER_LOAD.0 | Self::EXPORT.0);
    /// Importing known secrets.
    pub const IMPORT: Self = Self(Self::BUFFER_LOAD.0 | Self::BUFFER_AEAD_GENERATE.0 | Self::USER_NONCE.0);

    /// Wrap a raw flag word.
    #[must_use]
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The raw flag word.
    #[must_use]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Does this set hold every flag of `other`?
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// Lists flag names joined by `,`; unnamed bits appear as hex.
impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let mut rest = self.0;
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let s = if first { "" } else { "," };
            first = false;
            f.write_str(s)
        };
        for (name, bit) in NAMES {
            if rest & bit != 0 {
                sep(f)?;
                f.write_str(name)?;
                rest &= !bit;
            }
        }
        if rest != 0 {
            sep(f)?;
            write!(f, "{rest:#010x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({:#010x}: {self})", self.0)
    }
}

/// Parses a comma-separated list of flag names and presets, or a raw flag
/// word in `0x` hex (`0x60000004`).
impl FromStr for Flags {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x") {
            return u32::from_str_radix(hex, 16).map(Self).map_err(|_| format!("invalid flag word {s:?}"));
        }
        let mut out = Self::NONE;
        for part in s.split(',').map(str::trim) {
            if let Some((_, bit)) = NAMES.iter().find(|(n, _)| *n == part) {
                out = out | Self(*bit);
            } else if let Some((_, preset, _)) = PRESETS.iter().find(|(n, _, _)| *n == part) {
                out = out | *preset;
            } else {
                return Err(format!("unknown flag {part:?}; known: {}", known_names().collect::<Vec<_>>().join(", ")));
            }
        }
        if out == Self::NONE {
            return Err("no flags given".to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!("otp-decode".parse::<Flags>().unwrap(), Flags::OTP_DECODE);
        assert_eq!("0x60000004".parse::<Flags>().unwrap(), Flags::IMPORT);
        assert_eq!(Flags::IMPORT.to_string(), "buffer-aead-generate,user-nonce,buffer-load");
        let p: Flags = "personalizer".parse().unwrap();
        assert!(p.contains(Flags::EXPORT) && !p.contains(Flags::OTP_DECODE));
        assert_eq!(p.to_string().parse::<Flags>().unwrap(), p);
        assert_eq!(Flags::from_bits(0x8000_0001).to_string(), "0x80000001");
        assert!("bogus".parse::<Flags>().is_err());
        assert!("".parse::<Flags>().is_err());
        assert!("0xzz".parse::<Flags>().is_err());
    }
}
