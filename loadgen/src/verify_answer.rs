//! Validation protocol 2.0 requests as ykclient sends them, and strict
//! checks of the answers.
//!
//! A request is `GET /wsapi/2.0/verify?id=…&nonce=…&otp=…&timestamp=1&h=…`:
//! the pairs in that (alphabetical) order, signed with the client's key
//! over exactly that text, `h` percent-escaped
//! ([`validator::protocol::signed_query`]). An answer passes [`check`] only
//! if it is `status=OK`, echoes the request's `otp` and `nonce`, carries an
//! `h` that signs every other line under the client's key (as ykclient
//! verifies it), and reports the session counter, use and timestamp the
//! OTP encoded.

use otp::OtpDecode;
use validator::protocol::{parse_response, signed_query, verify_response, NONCE_MAX, NONCE_MIN};

/// The verify endpoint of protocol 2.0.
pub const VERIFY_PATH: &str = "/wsapi/2.0/verify";

const ALPHANUMERIC: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Nonces for requests: 16 to 40 alphanumeric characters of random data
/// (the protocol's rule), from a small fast generator (splitmix64). Not
/// for secrets; a nonce only has to be fresh.
#[derive(Clone, Debug)]
pub struct NonceSource {
    state: u64,
}

impl NonceSource {
    /// A generator with a fixed seed (tests).
    #[must_use]
    pub fn seeded(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the clock, the process id and `stream`
    /// (e.g. a thread index), so that threads and runs differ.
    #[must_use]
    pub fn from_clock(stream: u64) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut s = Self { state: nanos ^ u64::from(std::process::id()).rotate_left(32) ^ stream.wrapping_mul(0xa076_1d64_78bd_642f) };
        // Mix the seed before the first use.
        s.next_u64();
        s
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fresh nonce, of a random length in 16..=40.
    pub fn nonce(&mut self) -> String {
        let span = (NONCE_MAX - NONCE_MIN + 1) as u64;
        let len = NONCE_MIN + (self.next_u64() % span) as usize;
        let mut out = String::with_capacity(len);
        while out.len() < len {
            // Ten characters of 6 bits from each draw (62 of 64 values used).
            let mut bits = self.next_u64();
            for _ in 0..10 {
                if out.len() == len {
                    break;
                }
                if let Some(&c) = ALPHANUMERIC.get((bits & 0x3f) as usize) {
                    out.push(char::from(c));
                }
                bits >>= 6;
            }
        }
        out
    }
}

/// The request target for verifying `otp` as client `client_id` with
/// `key`: `/wsapi/2.0/verify?id=…&nonce=…&otp=…&timestamp=1&h=…`, signed as
/// ykclient signs it.
#[must_use]
pub fn verify_target(client_id: u64, key: &[u8], otp: &str, nonce: &str) -> String {
    let id = client_id.to_string();
    let query = signed_query(&[("id", &id), ("nonce", nonce), ("otp", otp), ("timestamp", "1")], Some(key));
    format!("{VERIFY_PATH}?{query}")
}

/// Check an answer to [`verify_target`]: `OK`, the request's `otp` and
/// `nonce` echoed, a valid `h` under `key`, and the session counter, use
/// and timestamp of `expect`. The error says what was wrong.
pub fn check(body: &[u8], key: &[u8], otp: &str, nonce: &str, expect: &OtpDecode) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    let text = std::str::from_utf8(body).map_err(|_| format!("answer is not UTF-8: {:?}", shown()))?;
    let fields = parse_response(text).map_err(|e| format!("malformed answer ({e}): {text:?}"))?;
    let field = |k: &str| fields.get(k).map(String::as_str);
    match field("status") {
        Some("OK") => {}
        Some(other) => return Err(format!("status={other} (otp {otp})")),
        None => return Err(format!("no status: {text:?}")),
    }
    if !verify_response(text, key) {
        return Err(format!("bad response signature: {text:?}"));
    }
    if field("otp") != Some(otp) {
        return Err(format!("otp not echoed: sent {otp}, got {:?}", field("otp")));
    }
    if field("nonce") != Some(nonce) {
        return Err(format!("nonce not echoed: sent {nonce}, got {:?}", field("nonce")));
    }
    let counters = expect.counters();
    for (name, want) in [
        ("sessioncounter", u32::from(counters.counter())),
        ("sessionuse", u32::from(counters.session_use())),
        ("timestamp", expect.timestamp()),
    ] {
        let want = want.to_string();
        if field(name) != Some(want.as_str()) {
            return Err(format!("{name}: expected {want}, got {:?} (otp {otp})", field(name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::collections::HashSet;
    use std::time::SystemTime;

    use validator::protocol::{
        check_request_signature, parse_request, Echo, Nonce, RequestSignature, Response, SessionFields, Status, Version,
    };
    use validator::ClientKey;

    const OTP: &str = "ccccccccccccdbdbekbhfuihurvjvirllnrchuelvjtk";
    const KEY: &[u8] = b"0123456789abcdefghij";
    const D: OtpDecode = OtpDecode { use_ctr: 0x0105, session_ctr: 9, timestamp_high: 0x12, timestamp_low: 0xbeef };

    fn ok_answer(otp: &str, nonce: &str, d: &OtpDecode, key: &[u8]) -> String {
        let echo = Echo::new(Version::V2, otp, Nonce::new(nonce));
        Response::ok(&echo, 0, Some(SessionFields::from_decode(d)), SystemTime::now())
            .signed_with(Some(ClientKey::new(key.to_vec())))
            .render()
    }

    #[test]
    fn nonces_follow_the_protocol() {
        let mut n = NonceSource::seeded(1);
        let mut lengths = HashSet::new();
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let s = n.nonce();
            assert!((NONCE_MIN..=NONCE_MAX).contains(&s.len()), "{s}");
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
            assert!(Nonce::new(&s).is_some(), "{s}");
            lengths.insert(s.len());
            assert!(seen.insert(s));
        }
        assert_eq!(lengths.len(), NONCE_MAX - NONCE_MIN + 1);
        assert_ne!(NonceSource::from_clock(1).nonce(), NonceSource::from_clock(2).nonce());
    }

    #[test]
    fn requests_are_signed_as_ykclient_signs_them() {
        let target = verify_target(17, KEY, OTP, "abcdefghijklmnop");
        let query = target.strip_prefix("/wsapi/2.0/verify?").unwrap();
        assert!(query.starts_with(&format!("id=17&nonce=abcdefghijklmnop&otp={OTP}&timestamp=1&h=")), "{query}");
        let pairs = httpd::form::pairs(query).unwrap();
        assert_eq!(check_request_signature(&pairs, KEY), RequestSignature::Valid);
        assert_eq!(check_request_signature(&pairs, b"another key of 20 b."), RequestSignature::Invalid);
        let request = parse_request(&pairs, Version::V2).unwrap();
        assert_eq!(request.id().get(), 17);
        assert!(request.timestamp());
    }

    #[test]
    fn a_good_answer_passes() {
        let nonce = "abcdefghijklmnop";
        check(ok_answer(OTP, nonce, &D, KEY).as_bytes(), KEY, OTP, nonce, &D).unwrap();
    }

    #[test]
    fn every_deviation_is_caught() {
        let nonce = "abcdefghijklmnop";
        let good = ok_answer(OTP, nonce, &D, KEY);
        let e = |body: &str| check(body.as_bytes(), KEY, OTP, nonce, &D).unwrap_err();

        assert!(e(&ok_answer(OTP, nonce, &D, b"wrong key, 20 bytes!")).contains("signature"));
        assert!(e(&good.replace("status=OK", "status=REPLAYED_OTP")).contains("REPLAYED_OTP"));
        // Tampering with any signed line breaks h.
        assert!(e(&good.replace("sl=0", "sl=1")).contains("signature"));
        assert!(e(&ok_answer("ccccccccccccdbdbekbhfuihurvjvirllnrchuelvjtt", nonce, &D, KEY)).contains("otp not echoed"));
        assert!(e(&ok_answer(OTP, "abcdefghijklmnoq", &D, KEY)).contains("nonce not echoed"));
        let other_use = OtpDecode { session_ctr: 10, ..D };
        assert!(e(&ok_answer(OTP, nonce, &other_use, KEY)).contains("sessionuse"));
        let other_counter = OtpDecode { use_ctr: 0x0106, ..D };
        assert!(e(&ok_answer(OTP, nonce, &other_counter, KEY)).contains("sessioncounter"));
        let other_time = OtpDecode { timestamp_low: 0xbeee, ..D };
        assert!(e(&ok_answer(OTP, nonce, &other_time, KEY)).contains("timestamp"));
        // Without timestamp=1's fields.
        let echo = Echo::new(Version::V2, OTP, Nonce::new(nonce));
        let bare = Response::ok(&echo, 0, None, SystemTime::now()).signed_with(Some(ClientKey::new(KEY.to_vec()))).render();
        assert!(e(&bare).contains("sessioncounter"));
        // Error statuses, unsigned answers, garbage.
        let err = Response::bare(Status::BackendError, SystemTime::now()).render();
        assert!(e(&err).contains("BACKEND_ERROR"));
        assert!(e(good.trim_end()).contains("malformed"));
        assert!(e("").contains("malformed"));
        assert!(check(b"\xff\xfe\n", KEY, OTP, nonce, &D).unwrap_err().contains("UTF-8"));
        assert!(e("h=x\r\nt=y\r\n\r\n").contains("no status"));
    }
}
