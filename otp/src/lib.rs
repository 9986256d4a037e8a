//! The pure core of the appliance: Yubico OTPs and YubiHSM AEADs.
//!
//! **I/O contract: no network, no files, no clock, no threads and no OS
//! randomness.** Every function takes bytes or strings and returns values.
//! Randomness and time, where a caller needs them, are passed in. The crates
//! around this one (`hsm`, `ksm`, `validator`, `personalizer`) do the I/O.
//!
//! What lives here:
//! - [`modhex`]: Yubico's modified hexadecimal, strict decoding;
//! - [`otp`]: the OTP string (public id + 32-character token);
//! - [`token`]: the 16-byte token plaintext, its CRC and AES-128 encryption;
//! - [`counter`]: the replay ordering on (counter, use);
//! - [`aead`]: the YubiHSM 1 AEAD (AES-CCM, 8-byte MAC) and key handles;
//! - [`secrets`]: the YubiKey secrets plaintext `key(16) ‖ uid(6)`;
//! - [`decode`]: `AEAD_YUBIKEY_OTP_DECODE` semantics and the KSM answer line;
//! - [`aead_file`]: pyhsm's AEAD file format (v0, v1) and directory layout;
//! - [`yhsm2`]: the 36-byte YubiHSM 2 OTP AEAD.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod aead;
pub mod aead_file;
pub mod counter;
pub mod crc;
pub mod decode;
mod error;
pub mod modhex;
pub mod otp;
pub mod secrets;
pub mod token;
pub mod yhsm2;

pub use crate::aead::{Aead, AeadNonce, HandleKey, KeyHandle};
pub use crate::counter::Counters;
pub use crate::decode::OtpDecode;
pub use crate::error::Error;
pub use crate::otp::{Otp, PublicId, TokenCiphertext};
pub use crate::secrets::{PrivateId, YubiKeyKey, YubiKeySecrets};
pub use crate::token::Token;
