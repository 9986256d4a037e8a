//! OTP strings and tokens.
//!
//! - An OTP string that parses prints back as its lower-case form.
//! - 16 bytes that pass the CRC check form a token whose fields rebuild the
//!   same bytes, and which survives AES encryption and decryption.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp::token::TokenFields;
use otp::{Otp, Token, TokenCiphertext, YubiKeyKey};

fn fields_of(t: &Token) -> TokenFields {
    TokenFields {
        uid: *t.uid().expose(),
        counter: t.raw_counter(),
        timestamp_low: t.timestamp_low(),
        timestamp_high: t.timestamp_high(),
        session_use: t.session_use(),
        rnd: t.rnd(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(otp) = Otp::parse(s) {
            let printed = otp.to_string();
            assert_eq!(printed, s.to_ascii_lowercase());
            assert_eq!(Otp::parse(&printed), Ok(otp));
        }
    }

    // Layout: key(16) || plaintext-or-ciphertext(16).
    if data.len() >= 32 {
        let key = YubiKeyKey::from_slice(&data[..16]).expect("16 bytes");
        let block: [u8; 16] = data[16..32].try_into().expect("16 bytes");

        // As a plaintext: the CRC decides; a valid token round-trips.
        if let Ok(token) = Token::from_plaintext(block) {
            assert_eq!(fields_of(&token).build(), token);
            let ciphertext = token.encrypt(&key);
            assert_eq!(Token::decrypt(&key, &ciphertext), Ok(token));
        }

        // As a ciphertext: whatever decrypts re-encrypts to the same bytes.
        let ciphertext = TokenCiphertext::new(block);
        if let Ok(token) = Token::decrypt(&key, &ciphertext) {
            assert_eq!(token.encrypt(&key), ciphertext);
            assert_eq!(fields_of(&token).build(), token);
        }
    }
});
