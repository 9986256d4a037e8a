//! Modhex: bytes -> modhex -> bytes, and (for UTF-8 input) text -> bytes -> text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp::modhex;

fuzz_target!(|data: &[u8]| {
    // Any bytes encode to twice as many modhex characters and decode back.
    let text = modhex::encode(data);
    assert_eq!(text.len(), 2 * data.len());
    assert!(modhex::is_modhex(&text));
    assert_eq!(modhex::decode(&text).as_deref(), Ok(data));
    let mut out = vec![0u8; data.len()];
    modhex::decode_into(&text, &mut out).expect("decode_into of encoded text");
    assert_eq!(out, data);

    // Any string that decodes is canonical modhex: it encodes back to itself.
    // One that does not has a foreign character or an odd length.
    if let Ok(s) = std::str::from_utf8(data) {
        match modhex::decode(s) {
            Ok(bytes) => assert_eq!(modhex::encode(&bytes), s),
            Err(_) => assert!(!modhex::is_modhex(s) || s.len() % 2 == 1),
        }
    }
});
