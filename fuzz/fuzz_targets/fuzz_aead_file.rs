//! AEAD files and the YubiHSM 2 AEAD form: what parses re-encodes to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp::aead_file::{AeadFile, MAGIC, MAGIC_CRLF};
use otp::yhsm2::Yhsm2OtpAead;

fuzz_target!(|data: &[u8]| {
    match AeadFile::parse(data) {
        Ok(AeadFile::V1(record)) => {
            let encoded = record.to_v1_bytes();
            if data.starts_with(MAGIC) {
                assert_eq!(encoded, data);
            } else {
                // The Windows marker is read, then written the canonical way.
                assert!(data.starts_with(MAGIC_CRLF));
                assert_eq!(&encoded[MAGIC.len()..], &data[MAGIC_CRLF.len()..]);
            }
            assert_eq!(AeadFile::parse(&encoded), Ok(AeadFile::V1(record)));
        }
        Ok(AeadFile::V0(aead)) => {
            assert_eq!(aead.as_bytes(), data);
            assert!(!data.starts_with(MAGIC) && !data.starts_with(MAGIC_CRLF));
        }
        Err(_) => {}
    }

    if let Ok(aead) = Yhsm2OtpAead::parse(data) {
        assert_eq!(&aead.to_bytes()[..], data);
    }
});
