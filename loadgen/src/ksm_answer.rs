//! Checking KSM answers: `OK counter=%04x low=%04x high=%02x use=%02x`.

use otp::OtpDecode;

/// Parse a KSM success line; see [`OtpDecode::parse_ksm_line`].
#[must_use]
pub fn parse_ok(body: &[u8]) -> Option<OtpDecode> {
    OtpDecode::parse_ksm_line(std::str::from_utf8(body).ok()?)
}

/// Check a KSM answer against what the OTP encoded. The error says what
/// came back instead.
pub fn check(body: &[u8], expected: &OtpDecode) -> Result<(), String> {
    match parse_ok(body) {
        Some(got) if got == *expected => Ok(()),
        Some(got) => Err(format!("wrong answer: got {:?}, expected {:?}", got.ksm_line(), expected.ksm_line())),
        None => Err(format!("not OK: {:?}", String::from_utf8_lossy(&body[..body.len().min(120)]))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const D: OtpDecode = OtpDecode { use_ctr: 0x8005, session_ctr: 9, timestamp_high: 0x12, timestamp_low: 0xbeef };

    #[test]
    fn parses_both_implementations() {
        assert_eq!(parse_ok(b"OK counter=8005 low=beef high=12 use=09"), Some(D));
        assert_eq!(parse_ok(b"OK counter=8005 low=beef high=12 use=09\n"), Some(D));
        assert_eq!(parse_ok(b"OK counter=8005 low=BEEF high=12 use=09\r\n"), Some(D));
        assert_eq!(parse_ok(D.ksm_line().as_bytes()), Some(D));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            &b"ERR Corrupt OTP"[..],
            b"ERR",
            b"",
            b"OK counter=8005 low=beef high=12",
            b"OK counter=8005 low=beef high=12 use=09 extra",
            b"OK counter=805 low=beef high=12 use=09",
            b"OK counter=8005 low=beef high=12 use=0g",
            b"OK counter=8005  low=beef high=12 use=09",
            b"OK low=beef counter=8005 high=12 use=09",
            b"ok counter=8005 low=beef high=12 use=09",
            b"OK counter=8005 low=beef high=12 use=09\n\n",
            b"OK counter=+005 low=beef high=12 use=09",
            b"OK counter=8005 low=beef high=12 use=\xff\xff",
        ] {
            assert_eq!(parse_ok(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn check_compares_every_field() {
        assert!(check(b"OK counter=8005 low=beef high=12 use=09\n", &D).is_ok());
        let e = check(b"OK counter=8005 low=beef high=12 use=0a\n", &D).unwrap_err();
        assert!(e.starts_with("wrong answer"), "{e}");
        assert!(check(b"OK counter=8005 low=beee high=12 use=09", &D).is_err());
        assert!(check(b"OK counter=0005 low=beef high=12 use=09", &D).is_err());
        assert!(check(b"OK counter=8005 low=beef high=13 use=09", &D).is_err());
        assert!(check(b"ERR Unknown yubikey", &D).unwrap_err().starts_with("not OK"));
    }
}
