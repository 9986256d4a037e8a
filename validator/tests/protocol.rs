//! The verify protocol and decision through the public API, with in-memory
//! fakes for the three interfaces (the real stores are tested elsewhere),
//! and Python's `hmac`/`hashlib` as an independent oracle for signatures.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests may panic")]

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ksm::KsmError;
use otp::{Counters, Otp, OtpDecode, PublicId, TokenCiphertext};
use proptest::prelude::*;
use validator::protocol::{
    self, check_request_signature, parse_response, signature, signed_query, verify_response, Echo, Nonce, RequestSignature, Response,
    SessionFields, Status, Version,
};
use validator::verify::{Checked, PeerSync, Prepared, SyncOutcome, Verifier, VerifyOptions};
use validator::{ApiClient, BackendFailure, CasOutcome, ClientId, ClientKey, ClientStore, CounterStore, CounterUpdate, OtpDecoder};

// ------------------------------------------------------------------ fakes

#[derive(Default)]
struct FakeClients {
    clients: HashMap<u64, ApiClient>,
    fail: AtomicBool,
}

impl FakeClients {
    fn with(mut self, id: u64, key: &[u8], active: bool) -> Self {
        let id_ = ClientId::new(id).unwrap();
        self.clients.insert(id, ApiClient { id: id_, active, key: ClientKey::new(key.to_vec()) });
        self
    }
}

impl ClientStore for FakeClients {
    fn client(&self, id: ClientId) -> Result<Option<ApiClient>, BackendFailure> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendFailure("client store down".into()));
        }
        Ok(self.clients.get(&id.get()).cloned())
    }
}

type DecodeFn = dyn Fn(&str) -> Result<OtpDecode, KsmError> + Send + Sync;

struct FakeDecoder {
    answer: Box<DecodeFn>,
    calls: Mutex<Vec<String>>,
}

impl FakeDecoder {
    fn new(answer: impl Fn(&str) -> Result<OtpDecode, KsmError> + Send + Sync + 'static) -> Self {
        Self { answer: Box::new(answer), calls: Mutex::new(Vec::new()) }
    }

    /// Knows the OTPs of [`otp_for`]: the token's first two bytes are the
    /// raw counter, the third the use.
    fn known() -> Self {
        Self::new(|text| {
            let otp = Otp::parse(text).map_err(KsmError::InvalidFormat)?;
            if otp.public_id() != public_id() {
                return Err(KsmError::UnknownYubikey(otp.public_id()));
            }
            let t = otp.token().as_bytes();
            Ok(OtpDecode { use_ctr: u16::from_le_bytes([t[0], t[1]]), session_ctr: t[2], timestamp_high: 0x12, timestamp_low: 0x3456 })
        })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl OtpDecoder for FakeDecoder {
    fn decode(&self, otp: &str) -> Result<OtpDecode, KsmError> {
        self.calls.lock().unwrap().push(otp.to_owned());
        (self.answer)(otp)
    }
}

/// The compare-and-set contract of [`CounterStore`], in memory.
#[derive(Default)]
struct FakeCounters {
    rows: Mutex<HashMap<PublicId, (Counters, String)>>,
    updates: Mutex<Vec<CounterUpdate>>,
    fail: AtomicBool,
}

impl CounterStore for FakeCounters {
    fn compare_and_set(&self, u: &CounterUpdate) -> Result<CasOutcome, BackendFailure> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendFailure("disk on fire".into()));
        }
        self.updates.lock().unwrap().push(u.clone());
        let mut rows = self.rows.lock().unwrap();
        match rows.get(&u.public_id) {
            Some((c, n)) if *c == u.counters && *n == u.nonce => Ok(CasOutcome::ReplayedRequest),
            Some((c, _)) if *c >= u.counters => Ok(CasOutcome::ReplayedOtp),
            _ => {
                rows.insert(u.public_id, (u.counters, u.nonce.clone()));
                Ok(CasOutcome::Accepted)
            }
        }
    }
}

struct FakePeers {
    outcome: Result<SyncOutcome, String>,
    levels: Mutex<Vec<(u8, Option<Duration>)>>,
}

impl PeerSync for FakePeers {
    fn sync(&self, _: &CounterUpdate, level: u8, timeout: Option<Duration>) -> Result<SyncOutcome, BackendFailure> {
        self.levels.lock().unwrap().push((level, timeout));
        self.outcome.clone().map_err(BackendFailure)
    }
}

// ------------------------------------------------------------------ fixtures

const KEY: &[u8; 20] = b"validator-test-key-1";
const OTHER_KEY: &[u8; 20] = b"validator-test-key-2";
const NONCE: &str = "goowtddubeilltjtawmeezumwrsyagoh";
const NONCE2: &str = "aaaabbbbccccddddeeeeffff";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_227_247_915_711)
}

fn public_id() -> PublicId {
    PublicId::from_number(1, 6).unwrap()
}

/// An OTP of the test YubiKey whose fake decode gives `raw_counter` and `session_use`.
fn otp_for(raw_counter: u16, session_use: u8) -> String {
    let mut token = [0x5au8; 16];
    token[..2].copy_from_slice(&raw_counter.to_le_bytes());
    token[2] = session_use;
    Otp::new(public_id(), TokenCiphertext::new(token)).to_string()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `list` plus `h` signed with `key`.
fn signed(list: &[(&str, &str)], key: &[u8]) -> Vec<(String, String)> {
    let mut p = pairs(list);
    p.push(("h".into(), signature(list.iter().copied(), key)));
    p
}

struct Rig {
    clients: Arc<FakeClients>,
    decoder: Arc<FakeDecoder>,
    counters: Arc<FakeCounters>,
    verifier: Verifier,
}

impl Rig {
    fn new() -> Self {
        Self::with_decoder(FakeDecoder::known())
    }

    fn with_decoder(decoder: FakeDecoder) -> Self {
        let clients = Arc::new(FakeClients::default().with(1, KEY, true).with(2, OTHER_KEY, false));
        let decoder = Arc::new(decoder);
        let counters = Arc::new(FakeCounters::default());
        let verifier = Verifier::new(clients.clone(), decoder.clone(), counters.clone(), VerifyOptions::default());
        Self { clients, decoder, counters, verifier }
    }

    fn run(&self, p: &[(String, String)]) -> Answer {
        self.run_version(p, Version::V2)
    }

    fn run_version(&self, p: &[(String, String)], v: Version) -> Answer {
        Answer::of(&self.verifier.verify(p, v, now()))
    }
}

/// A rendered answer, read back as a client would.
#[derive(Debug)]
struct Answer {
    status: Status,
    body: String,
    fields: BTreeMap<String, String>,
}

impl Answer {
    fn of(r: &Response) -> Self {
        let body = r.render();
        let fields = parse_response(&body).unwrap();
        assert_eq!(fields["status"], r.status().as_str());
        Self { status: r.status(), body, fields }
    }

    /// The keys between `t` and `status`, in order.
    fn extras(&self) -> Vec<&str> {
        let lines: Vec<&str> = self.body.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert!(lines[0].starts_with("h=") && lines[1].starts_with("t=") && lines.last().unwrap().starts_with("status="));
        lines[2..lines.len() - 1].iter().map(|l| l.split_once('=').unwrap().0).collect()
    }

    fn signed_by(&self, key: &[u8]) -> bool {
        verify_response(&self.body, key)
    }
}

fn v2(otp: &str, nonce: &str) -> Vec<(String, String)> {
    pairs(&[("id", "1"), ("otp", otp), ("nonce", nonce)])
}

// ------------------------------------------------------------------ Python oracle

fn python(script: &str, args: &[&str]) -> String {
    let py = appliance_tests::tools::require("python3", "python3");
    let out = Command::new(py).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
}

const PY_SIGN: &str = "
import sys, hmac, hashlib, base64
key = base64.b64decode(sys.argv[1])
print(base64.b64encode(hmac.new(key, sys.argv[2].encode(), hashlib.sha1).digest()).decode())
";

/// ykclient's response check: whitespace-separated k=v tokens, `h` apart,
/// the rest sorted and joined, HMAC-SHA1, base64 of exactly 20 bytes.
const PY_VERIFY_RESPONSE: &str = "
import sys, hmac, hashlib, base64
key = base64.b64decode(sys.argv[1])
body = sys.argv[2]
assert body.endswith('\\r\\n\\r\\n'), 'no final empty line'
pairs = dict(tok.split('=', 1) for tok in body.split())
tag = base64.b64decode(pairs.pop('h'), validate=True)
assert len(tag) == 20
msg = '&'.join(k + '=' + pairs[k] for k in sorted(pairs))
print('good' if hmac.compare_digest(hmac.new(key, msg.encode(), hashlib.sha1).digest(), tag) else 'bad')
";

fn b64(key: &[u8]) -> String {
    STANDARD.encode(key)
}

// ------------------------------------------------------------------ signatures

/// A request signed with a published key: id 15618, key
/// `Eibja2kRFXXoW6hjZaiyBtWnCBA=` (Yubico forum, "Validation Protocol
/// Version 2.0 - HMAC-SHA1 signature", 2014, a reply by Yubico's Klas).
#[test]
fn published_request_signature() {
    let key = STANDARD.decode("Eibja2kRFXXoW6hjZaiyBtWnCBA=").unwrap();
    let list = [("id", "15618"), ("nonce", "0102030405060708090a0b0c0d0e0f"), ("otp", "ccccccbteuddjivcnlfefefrccdcjrfjfvgjnfkcklge")];
    assert_eq!(signature(list, &key), "Jt19GpDOAraTYRFBHSofYZFEwjE=");
    let query =
        "otp=ccccccbteuddjivcnlfefefrccdcjrfjfvgjnfkcklge&id=15618&h=Jt19GpDOAraTYRFBHSofYZFEwjE%3D&nonce=0102030405060708090a0b0c0d0e0f";
    let p = httpd::form::pairs(query).unwrap();
    assert_eq!(check_request_signature(&p, &key), RequestSignature::Valid);
    assert_eq!(check_request_signature(&p, KEY), RequestSignature::Invalid);
}

/// The spec's example, `b=1&a=2&c=3&h=V5FkMYr9GCG9tQA9ihuuybWl99U=`, is
/// verified over `a=2&b=1&c=3`. The spec does not say with which key (the
/// forum key above and the empty key do not give that `h`), so the check
/// is made with our own key and Python computing `h` over the sorted line.
#[test]
fn spec_example_with_python_oracle() {
    let h = python(PY_SIGN, &[&b64(KEY), "a=2&b=1&c=3"]);
    assert_eq!(signature([("b", "1"), ("a", "2"), ("c", "3")], KEY), h);
    let p = pairs(&[("b", "1"), ("a", "2"), ("c", "3"), ("h", &h)]);
    assert_eq!(check_request_signature(&p, KEY), RequestSignature::Valid);
    // The spec's own h is not ours.
    let p = pairs(&[("b", "1"), ("a", "2"), ("c", "3"), ("h", "V5FkMYr9GCG9tQA9ihuuybWl99U=")]);
    assert_eq!(check_request_signature(&p, KEY), RequestSignature::Invalid);
    assert_eq!(check_request_signature(&p, b""), RequestSignature::Invalid);
}

/// The request ykclient 2.15 sends (reference §5.3), signed by Python over
/// the raw query as ykclient does and escaped as `curl_easy_escape` does,
/// goes through the form decoder and verifies; the answer echoes the OTP
/// and nonce byte for byte and its signature passes Python's check.
#[test]
fn ykclient_request_with_python_oracle() {
    let otp = "vvccccddddddknktribgebdrbiljclidleldlutikvkl";
    let raw = format!("id=1&nonce={NONCE}&otp={otp}&timestamp=1");
    let query = python(
        "
import sys, hmac, hashlib, base64, urllib.parse
key = base64.b64decode(sys.argv[1]); q = sys.argv[2]
h = base64.b64encode(hmac.new(key, q.encode(), hashlib.sha1).digest()).decode()
print(q + '&h=' + urllib.parse.quote(h, safe=''))
",
        &[&b64(KEY), &raw],
    );
    assert_eq!(signed_query(&[("id", "1"), ("nonce", NONCE), ("otp", otp), ("timestamp", "1")], Some(KEY)), query);

    let p = httpd::form::pairs(&query).unwrap();
    assert_eq!(check_request_signature(&p, KEY), RequestSignature::Valid);
    let id = PublicId::from_modhex("vvccccdddddd").unwrap();
    let rig = Rig::with_decoder(FakeDecoder::new(move |text| {
        let o = Otp::parse(text).map_err(KsmError::InvalidFormat)?;
        assert_eq!(o.public_id(), id);
        Ok(OtpDecode { use_ctr: 3, session_ctr: 1, timestamp_high: 0, timestamp_low: 8 })
    }));
    let a = rig.run(&p);
    assert_eq!(a.status, Status::Ok, "{}", a.body);
    assert_eq!(a.fields["otp"], otp);
    assert_eq!(a.fields["nonce"], NONCE);
    assert_eq!(python(PY_VERIFY_RESPONSE, &[&b64(KEY), &a.body]), "good");
    assert!(a.signed_by(KEY));
}

#[test]
fn every_answer_signature_passes_the_python_check() {
    let rig = Rig::new();
    let otp = otp_for(5, 0);
    let answers = [
        (rig.run(&v2(&otp, NONCE)), &KEY[..]),
        (rig.run(&v2(&otp, NONCE)), &KEY[..]),
        (rig.run(&v2(&otp, NONCE2)), &KEY[..]),
        (rig.run(&pairs(&[("otp", &otp), ("nonce", NONCE)])), &[][..]),
        (rig.run(&pairs(&[("id", "2"), ("otp", &otp), ("nonce", NONCE)])), &OTHER_KEY[..]),
    ];
    let statuses: Vec<Status> = answers.iter().map(|(a, _)| a.status).collect();
    assert_eq!(statuses, [Status::Ok, Status::ReplayedRequest, Status::ReplayedOtp, Status::MissingParameter, Status::NoSuchClient]);
    for (a, key) in &answers {
        assert_eq!(python(PY_VERIFY_RESPONSE, &[&b64(key), &a.body]), "good", "{}", a.body);
        assert!(a.signed_by(key));
    }
}

// ------------------------------------------------------------------ exact bytes

#[test]
fn exact_bytes_of_an_ok_answer() {
    let echo = Echo::new(Version::V2, "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn", Nonce::new(NONCE));
    let session = SessionFields { timestamp: 0x12_3456, session_counter: 5, session_use: 2 };
    let r = Response::ok(&echo, 0, Some(session), now()).signed_with(Some(ClientKey::new(KEY.to_vec())));
    let unsigned = "t=2008-11-21T06:11:55Z0711\r\n\
                    otp=cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn\r\n\
                    nonce=goowtddubeilltjtawmeezumwrsyagoh\r\n\
                    sl=0\r\n\
                    timestamp=1193046\r\n\
                    sessioncounter=5\r\n\
                    sessionuse=2\r\n\
                    status=OK\r\n\
                    \r\n";
    let line = "nonce=goowtddubeilltjtawmeezumwrsyagoh&otp=cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn&sessioncounter=5&sessionuse=2\
                &sl=0&status=OK&t=2008-11-21T06:11:55Z0711&timestamp=1193046";
    let h = python(PY_SIGN, &[&b64(KEY), line]);
    assert_eq!(r.render(), format!("h={h}\r\n{unsigned}"));
    // Pinned, so that the bytes are checked even where Python is not run.
    assert_eq!(h, "axp6NjbS7o6lYRK8M3qT0Kvh63Y=");
}

#[test]
fn exact_bytes_of_bare_and_replayed_answers() {
    let bare = Response::bare(Status::MissingParameter, now()).render();
    let h = python(PY_SIGN, &["", "status=MISSING_PARAMETER&t=2008-11-21T06:11:55Z0711"]);
    assert_eq!(bare, format!("h={h}\r\nt=2008-11-21T06:11:55Z0711\r\nstatus=MISSING_PARAMETER\r\n\r\n"));

    let echo = Echo::new(Version::V2, "OTP", Nonce::new(NONCE));
    let body = Response::replayed(&echo, true, now()).render();
    assert!(body.ends_with(
        "\r\nt=2008-11-21T06:11:55Z0711\r\notp=OTP\r\nnonce=goowtddubeilltjtawmeezumwrsyagoh\r\nstatus=REPLAYED_REQUEST\r\n\r\n"
    ));
    let body = Response::not_enough_answers(&echo, 50, now()).render();
    assert!(body.ends_with("\r\notp=OTP\r\nnonce=goowtddubeilltjtawmeezumwrsyagoh\r\nsl=50\r\nstatus=NOT_ENOUGH_ANSWERS\r\n\r\n"));
    // 1.x: nothing echoed, no sl, and no REPLAYED_REQUEST.
    let v1 = Echo::new(Version::V1, "OTP", None);
    let body = Response::replayed(&v1, true, now()).render();
    assert!(body.ends_with("\r\nt=2008-11-21T06:11:55Z0711\r\nstatus=REPLAYED_OTP\r\n\r\n"));
    let body = Response::ok(&v1, 0, None, now()).render();
    assert!(body.ends_with("\r\nt=2008-11-21T06:11:55Z0711\r\nstatus=OK\r\n\r\n"));
}

#[test]
fn response_client_side_checks() {
    let body = Response::bare(Status::BadOtp, now()).signed_with(Some(ClientKey::new(KEY.to_vec()))).render();
    assert!(verify_response(&body, KEY));
    assert!(!verify_response(&body, OTHER_KEY));
    assert!(!verify_response(&body, b""));
    assert!(!verify_response(body.trim_end(), KEY), "no final newline");
    assert!(!verify_response(&body.replace("BAD_OTP", "OK"), KEY), "tampered");
    let no_h: String = body.split_inclusive("\r\n").skip(1).collect();
    assert!(!verify_response(&no_h, KEY));
    // LF-only bodies parse too (as ykclient reads them).
    assert!(verify_response(&body.replace("\r\n", "\n"), KEY));
}

// ------------------------------------------------------------------ statuses

#[test]
fn ok_then_replays() {
    let rig = Rig::new();
    let otp = otp_for(5, 3);
    let a = rig.run(&v2(&otp, NONCE));
    assert_eq!(a.status, Status::Ok);
    assert_eq!(a.extras(), ["otp", "nonce", "sl"]);
    assert_eq!((a.fields["otp"].as_str(), a.fields["nonce"].as_str(), a.fields["sl"].as_str()), (otp.as_str(), NONCE, "0"));
    assert!(a.signed_by(KEY));

    // The same request again (a fanned-out request seen twice).
    let a = rig.run(&v2(&otp, NONCE));
    assert_eq!(a.status, Status::ReplayedRequest);
    assert_eq!(a.extras(), ["otp", "nonce"]);
    assert!(a.signed_by(KEY));
    // The same OTP with another nonce.
    let a = rig.run(&v2(&otp, NONCE2));
    assert_eq!(a.status, Status::ReplayedOtp);
    assert_eq!(a.extras(), ["otp", "nonce"]);
    assert_eq!(a.fields["nonce"], NONCE2);
    // An older OTP, even with a fresh nonce; then a newer one.
    assert_eq!(rig.run(&v2(&otp_for(5, 2), NONCE2)).status, Status::ReplayedOtp);
    assert_eq!(rig.run(&v2(&otp_for(4, 9), NONCE2)).status, Status::ReplayedOtp);
    assert_eq!(rig.run(&v2(&otp_for(5, 4), NONCE2)).status, Status::Ok);
    assert_eq!(rig.run(&v2(&otp_for(6, 0), NONCE2)).status, Status::Ok);

    let updates = rig.counters.updates.lock().unwrap();
    let first = &updates[0];
    assert_eq!((first.public_id, first.counters, first.nonce.as_str()), (public_id(), Counters::new(5, 3).unwrap(), NONCE));
    assert_eq!((first.timestamp_high, first.timestamp_low, first.now), (0x12, 0x3456, 1_227_247_915));
}

#[test]
fn timestamp_fields() {
    let rig = Rig::new();
    // Caps-lock bit set: sessioncounter is the 15-bit counter.
    let mut p = v2(&otp_for(0x8007, 2), NONCE);
    p.push(("timestamp".into(), "1".into()));
    let a = rig.run(&p);
    assert_eq!(a.status, Status::Ok);
    assert_eq!(a.extras(), ["otp", "nonce", "sl", "timestamp", "sessioncounter", "sessionuse"]);
    assert_eq!(a.fields["timestamp"], (0x12 << 16 | 0x3456).to_string());
    assert_eq!(a.fields["sessioncounter"], "7");
    assert_eq!(a.fields["sessionuse"], "2");
    assert_eq!(rig.counters.updates.lock().unwrap()[0].counters, Counters::new(7, 2).unwrap());
    // Anything but 1 leaves them out; replays never carry them.
    let mut p = v2(&otp_for(8, 0), NONCE);
    p.push(("timestamp".into(), "true".into()));
    assert_eq!(rig.run(&p).extras(), ["otp", "nonce", "sl"]);
    p.retain(|(k, _)| k != "timestamp");
    p.push(("timestamp".into(), "1".into()));
    assert_eq!(rig.run(&p).extras(), ["otp", "nonce"]);
}

#[test]
fn missing_and_malformed_parameters() {
    let rig = Rig::new();
    let otp = otp_for(1, 0);
    type Case<'a> = (&'a [(&'a str, &'a str)], Status, &'a [u8]);
    let cases: &[Case<'_>] = &[
        (&[("otp", &otp), ("nonce", NONCE)], Status::MissingParameter, b""),
        (&[("id", ""), ("otp", &otp), ("nonce", NONCE)], Status::MissingParameter, b""),
        (&[("id", "abc"), ("otp", &otp), ("nonce", NONCE)], Status::MissingParameter, b""),
        (&[("id", "0"), ("otp", &otp), ("nonce", NONCE)], Status::MissingParameter, b""),
        (&[("id", "1"), ("nonce", NONCE)], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", ""), ("nonce", NONCE)], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp)], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", "")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", "abcdefghijklmno")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", &"a".repeat(41))], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", "abcdefgh-jklmnopq")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", "abcdefghijklmnopé")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", NONCE), ("sl", "0")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", NONCE), ("sl", "101")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", NONCE), ("timeout", "-1")], Status::MissingParameter, KEY),
        (&[("id", "1"), ("otp", &otp), ("nonce", NONCE), ("nonce", NONCE)], Status::MissingParameter, KEY),
        (&[("id", "1"), ("id", "1"), ("otp", &otp), ("nonce", NONCE)], Status::MissingParameter, b""),
        // A client that does not exist cannot sign the refusal.
        (&[("id", "99"), ("otp", &otp)], Status::MissingParameter, b""),
        // Malformed OTPs: BAD_OTP, before the client is looked at.
        (&[("id", "1"), ("otp", "cccc"), ("nonce", NONCE)], Status::BadOtp, KEY),
        (&[("id", "1"), ("otp", &format!("{otp}c")), ("nonce", NONCE)], Status::BadOtp, KEY),
        (&[("id", "1"), ("otp", &"c".repeat(49)), ("nonce", NONCE)], Status::BadOtp, KEY),
        (&[("id", "1"), ("otp", &otp.replacen('c', "a", 1)), ("nonce", NONCE)], Status::BadOtp, KEY),
        (&[("id", "1"), ("otp", &format!(" {}", &otp[1..])), ("nonce", NONCE)], Status::BadOtp, KEY),
        (&[("id", "99"), ("otp", "cccc"), ("nonce", NONCE)], Status::BadOtp, b""),
    ];
    for (list, status, key) in cases {
        let a = rig.run(&pairs(list));
        assert_eq!(a.status, *status, "{list:?}");
        assert!(a.extras().is_empty(), "{list:?}");
        assert!(a.signed_by(key), "{list:?}: {}", a.body);
    }
    assert!(rig.decoder.calls().is_empty(), "nothing malformed reaches the KSM");
    assert!(rig.counters.updates.lock().unwrap().is_empty());
}

#[test]
fn clients_and_signatures() {
    let rig = Rig::new();
    let otp = otp_for(1, 0);
    let list = [("id", "1"), ("otp", otp.as_str()), ("nonce", NONCE), ("timestamp", "1")];

    // Unknown client: empty key. Disabled client: its own key.
    let a = rig.run(&pairs(&[("id", "99"), ("otp", &otp), ("nonce", NONCE)]));
    assert_eq!((a.status, a.signed_by(b"")), (Status::NoSuchClient, true));
    let a = rig.run(&signed(&[("id", "2"), ("otp", &otp), ("nonce", NONCE)], OTHER_KEY));
    assert_eq!((a.status, a.signed_by(OTHER_KEY)), (Status::NoSuchClient, true));

    // Wrong key, tampered value, malformed or short h: BAD_SIGNATURE, signed.
    let mut bad = signed(&list, OTHER_KEY);
    assert_eq!(rig.run(&bad).status, Status::BadSignature);
    bad = signed(&list, KEY);
    bad[3].1 = "0".into();
    assert_eq!(rig.run(&bad).status, Status::BadSignature);
    for h in ["!!!!", "not base64 at all", "AAAA", "Jt19GpDOAraTYRFBHSofYZFEwjE=", &STANDARD.encode([0u8; 21])] {
        let mut p = pairs(&list);
        p.push(("h".into(), h.into()));
        let a = rig.run(&p);
        assert_eq!((a.status, a.signed_by(KEY)), (Status::BadSignature, true), "{h}");
    }
    // A repeated h is a repeated parameter.
    let mut p = signed(&list, KEY);
    p.push(p[4].clone());
    assert_eq!(rig.run(&p).status, Status::MissingParameter);
    assert!(rig.decoder.calls().is_empty());

    // Unknown parameters are signed over too.
    let with_extra = [("id", "1"), ("otp", otp.as_str()), ("nonce", NONCE), ("x-extra", "a b&c=é")];
    let a = rig.run(&signed(&with_extra, KEY));
    assert_eq!(a.status, Status::Ok, "{}", a.body);
    let mut p = signed(&with_extra[..3], KEY);
    p.push(("x-extra".into(), "a b&c=é".into()));
    assert_eq!(rig.run(&p).status, Status::BadSignature);

    // Unsigned requests and h= are accepted, as by yubikey-val.
    let a = rig.run(&pairs(&[("id", "1"), ("otp", &otp_for(2, 0)), ("nonce", NONCE), ("h", "")]));
    assert_eq!(a.status, Status::Ok);
}

#[test]
fn unescaped_plus_in_h_is_accepted() {
    let rig = Rig::new();
    // Find a nonce whose signature contains '+'.
    let otp = otp_for(1, 0);
    let (list, h) = (0..)
        .map(|i| {
            let nonce = format!("nonce{i:011}abcdef");
            let list = vec![("id", "1".to_owned()), ("otp", otp.clone()), ("nonce", nonce)];
            let h = signature(list.iter().map(|(k, v)| (*k, v.as_str())), KEY);
            (list, h)
        })
        .find(|(_, h)| h.contains('+'))
        .unwrap();
    let query: String = list.iter().map(|(k, v)| format!("{k}={v}&")).collect::<String>() + "h=" + &h;
    let p = httpd::form::pairs(&query).unwrap();
    assert!(p.last().unwrap().1.contains(' '));
    assert_eq!(rig.run(&p).status, Status::Ok);
}

#[test]
fn ksm_verdicts_and_failures() {
    let otp = otp_for(1, 0);
    let cases: Vec<(KsmError, Status)> = vec![
        (KsmError::UnknownYubikey(public_id()), Status::BadOtp),
        (KsmError::CorruptOtp(hsm::Error::OtpInvalid(hsm::OtpFault::Crc)), Status::BadOtp),
        (KsmError::CorruptOtp(hsm::Error::OtpInvalid(hsm::OtpFault::UidMismatch)), Status::BadOtp),
        (KsmError::InvalidFormat(otp::Error::TokenCrc), Status::BadOtp),
        (KsmError::Backend(hsm::Error::Locked), Status::BackendError),
        (KsmError::Backend(hsm::Error::NotReady("unplugged".into())), Status::BackendError),
        (KsmError::Database(ksm::LookupError("database is locked".into())), Status::BackendError),
        (KsmError::CorruptAead(hsm::Error::AeadInvalid(otp::Error::AeadIntegrity)), Status::BackendError),
    ];
    for (err, status) in cases {
        let label = format!("{err:?}");
        let slot = Mutex::new(Some(err));
        let rig = Rig::with_decoder(FakeDecoder::new(move |_| Err(slot.lock().unwrap().take().unwrap())));
        let a = rig.run(&v2(&otp, NONCE));
        assert_eq!(a.status, status, "{label}");
        assert!(a.extras().is_empty());
        assert!(a.signed_by(KEY), "{label}");
        assert!(rig.counters.updates.lock().unwrap().is_empty(), "{label}: counters untouched");
    }
}

#[test]
fn store_failures_are_backend_errors() {
    let rig = Rig::new();
    rig.counters.fail.store(true, Ordering::SeqCst);
    let a = rig.run(&v2(&otp_for(1, 0), NONCE));
    assert_eq!((a.status, a.signed_by(KEY)), (Status::BackendError, true));

    rig.clients.fail.store(true, Ordering::SeqCst);
    let a = rig.run(&v2(&otp_for(1, 0), NONCE));
    assert_eq!((a.status, a.signed_by(b"")), (Status::BackendError, true));
    // A refusal stays a refusal when the client store fails meanwhile.
    let a = rig.run(&pairs(&[("id", "1"), ("otp", "x")]));
    assert_eq!((a.status, a.signed_by(b"")), (Status::MissingParameter, true));
}

#[test]
fn sync_hook() {
    let otp = otp_for(1, 0);
    let make = |outcome| {
        let peers = Arc::new(FakePeers { outcome, levels: Mutex::new(Vec::new()) });
        let rig = Rig::new();
        let verifier = Verifier::new(rig.clients.clone(), rig.decoder.clone(), rig.counters.clone(), VerifyOptions::default())
            .with_peer_sync(peers.clone());
        (verifier, peers)
    };
    let run = |v: &Verifier, p: &[(String, String)]| Answer::of(&v.verify(p, Version::V2, now()));

    let (v, peers) = make(Ok(SyncOutcome::Synced { sl: 100 }));
    let mut p = v2(&otp, NONCE);
    p.extend(pairs(&[("sl", "secure"), ("timeout", "3")]));
    let a = run(&v, &p);
    assert_eq!((a.status, a.fields["sl"].as_str()), (Status::Ok, "100"));
    assert_eq!(run(&v, &v2(&otp_for(2, 0), NONCE)).status, Status::Ok);
    let mut p = v2(&otp_for(3, 0), NONCE);
    p.push(("sl".into(), "fast".into()));
    run(&v, &p);
    let mut p = v2(&otp_for(4, 0), NONCE);
    p.push(("sl".into(), "75".into()));
    run(&v, &p);
    assert_eq!(*peers.levels.lock().unwrap(), [(40, Some(Duration::from_secs(3))), (60, None), (1, None), (75, None)]);

    let (v, _) = make(Ok(SyncOutcome::NotEnoughAnswers { sl: 0 }));
    let a = run(&v, &v2(&otp, NONCE));
    assert_eq!((a.status, a.extras()), (Status::NotEnoughAnswers, vec!["otp", "nonce", "sl"]));
    assert!(a.signed_by(KEY));

    let (v, _) = make(Ok(SyncOutcome::Replayed));
    let a = run(&v, &v2(&otp, NONCE));
    assert_eq!((a.status, a.extras()), (Status::ReplayedOtp, vec!["otp", "nonce"]));

    let (v, _) = make(Err("peer link down".into()));
    let a = run(&v, &v2(&otp, NONCE));
    assert_eq!((a.status, a.signed_by(KEY)), (Status::BackendError, true));
}

#[test]
fn two_phases_and_deadline() {
    let rig = Rig::new();
    let mut p = v2(&otp_for(1, 0), NONCE);
    p.push(("timeout".into(), "2".into()));
    let Prepared::Checked(checked) = rig.verifier.prepare(&p, Version::V2, now()) else { panic!("not checked") };
    assert!(rig.decoder.calls().is_empty(), "phase 1 does not decrypt");
    assert_eq!(checked.client_id().get(), 1);
    assert_eq!(checked.public_id(), public_id());
    assert_eq!(checked.timeout(), Some(Duration::from_secs(2)));
    assert_eq!(checked.deadline(Duration::from_secs(5)), Duration::from_secs(2));
    assert_eq!(checked.deadline(Duration::from_millis(500)), Duration::from_millis(500));

    let late = Answer::of(&checked.backend_error(now()));
    assert_eq!((late.status, late.signed_by(KEY)), (Status::BackendError, true));
    assert!(late.extras().is_empty());

    let done = Answer::of(&rig.verifier.complete(&checked, now()));
    assert_eq!(done.status, Status::Ok);

    let Prepared::Checked(c) = rig.verifier.prepare(&v2(&otp_for(2, 0), NONCE), Version::V2, now()) else { panic!() };
    assert_eq!(c.deadline(Duration::from_secs(5)), Duration::from_secs(5));

    let Prepared::Done(r) = rig.verifier.prepare(&pairs(&[("id", "1")]), Version::V2, now()) else { panic!() };
    assert_eq!(r.status(), Status::MissingParameter);
}

#[test]
fn get_and_post_forms_are_the_same_request() {
    let otp = otp_for(1, 0);
    let get = format!("id=1&otp={otp}&nonce={NONCE}&timestamp=1");
    let post = format!("timestamp=1&nonce={NONCE}&%6Ftp={}&id=%31", otp.to_ascii_uppercase().replace('C', "%43"));
    let (g, p) = (httpd::form::pairs(&get).unwrap(), httpd::form::pairs(&post).unwrap());
    let (a, b) = (Rig::new().run(&g), Rig::new().run(&p));
    assert_eq!((a.status, b.status), (Status::Ok, Status::Ok));
    assert_eq!(a.fields["sessioncounter"], b.fields["sessioncounter"]);
    // Each echoes its own OTP text.
    assert_eq!(b.fields["otp"], otp.to_ascii_uppercase());
    // Same pairs in another order: the same bytes.
    let mut shuffled = g.clone();
    shuffled.reverse();
    assert_eq!(Rig::new().run(&shuffled).body, a.body);
}

#[test]
fn caps_lock_and_dvorak_otps() {
    let rig = Rig::new();
    let otp = otp_for(1, 0);
    let upper = otp.to_ascii_uppercase();
    let a = rig.run(&v2(&upper, NONCE));
    assert_eq!(a.status, Status::Ok);
    assert_eq!(a.fields["otp"], upper, "echoed as sent, for ykclient's strcmp");

    let dvorak: String =
        otp_for(2, 0).chars().map(|c| "jxe.uidchtnbpygk".as_bytes()["cbdefghijklnrtuv".find(c).unwrap()] as char).collect();
    let a = rig.run(&v2(&dvorak, NONCE));
    assert_eq!(a.status, Status::Ok, "{dvorak}");
    assert_eq!(a.fields["otp"], dvorak);
    assert_eq!(rig.decoder.calls(), [otp, otp_for(2, 0)], "the KSM gets lower-case modhex");
}

#[test]
fn version_1() {
    let rig = Rig::new();
    let otp = otp_for(1, 0);
    let a = rig.run_version(&pairs(&[("id", "1"), ("otp", &otp)]), Version::V1);
    assert_eq!((a.status, a.extras()), (Status::Ok, vec![]));
    let a = rig.run_version(&pairs(&[("id", "1"), ("otp", &otp)]), Version::V1);
    assert_eq!(a.status, Status::ReplayedOtp, "1.x has no REPLAYED_REQUEST");
    let a = rig.run_version(&signed(&[("id", "1"), ("otp", &otp_for(2, 0)), ("timestamp", "1")], KEY), Version::V1);
    assert_eq!((a.status, a.extras()), (Status::Ok, vec!["timestamp", "sessioncounter", "sessionuse"]));
    assert!(a.signed_by(KEY));
    assert_eq!(rig.counters.updates.lock().unwrap()[0].nonce, "");
    // The same pairs on 2.0 lack the nonce.
    assert_eq!(rig.run(&pairs(&[("id", "1"), ("otp", &otp_for(3, 0))])).status, Status::MissingParameter);
}

#[test]
fn non_ascii_and_huge_input() {
    let rig = Rig::new();
    let huge = "c".repeat(1 << 20);
    let many: Vec<(String, String)> = (0..100_000).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<Vec<(String, String)>> = vec![
        pairs(&[("id", "1"), ("otp", &huge), ("nonce", NONCE)]),
        pairs(&[("id", &"9".repeat(100_000)), ("otp", &otp_for(1, 0)), ("nonce", NONCE)]),
        pairs(&[("id", "1"), ("otp", &otp_for(1, 0)), ("nonce", &huge)]),
        pairs(&[("id", "1"), ("otp", &otp_for(1, 0)), ("nonce", NONCE), ("sl", &huge), ("timeout", &huge)]),
        pairs(&[("id", "1"), ("otp", &"é".repeat(44)), ("nonce", NONCE)]),
        pairs(&[("id", "١"), ("otp", "ｃｃｃ"), ("nonce", "ñññññññññññññññññ")]),
        pairs(&[("id", "1"), ("otp", &format!("{}\r\nstatus=OK", otp_for(1, 0))), ("nonce", NONCE)]),
        pairs(&[("\u{0}", "\u{0}"), ("id", "1"), ("otp", &otp_for(1, 0)), ("nonce", NONCE), ("h", &"é".repeat(1000))]),
        [pairs(&[("id", "1"), ("otp", &otp_for(1, 0)), ("nonce", NONCE)]), many].concat(),
    ];
    let want = [
        Status::BadOtp,
        Status::MissingParameter,
        Status::MissingParameter,
        Status::MissingParameter,
        Status::BadOtp,
        Status::BadOtp,
        Status::BadOtp,
        Status::BadSignature,
        Status::Ok,
    ];
    for (p, status) in cases.iter().zip(want) {
        let a = rig.run(p);
        assert_eq!(
            a.status,
            status,
            "{}",
            p.iter().map(|(k, v)| format!("{k}={}", v.chars().take(40).collect::<String>())).collect::<Vec<_>>().join("&")
        );
        assert!(a.body.is_ascii() && a.body.len() < 400, "{}", a.body);
    }
}

// ------------------------------------------------------------------ properties

fn key_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_owned()),
        Just("otp".to_owned()),
        Just("nonce".to_owned()),
        Just("h".to_owned()),
        Just("timestamp".to_owned()),
        Just("sl".to_owned()),
        Just("timeout".to_owned()),
        "\\PC{0,8}",
    ]
}

fn value_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_owned()),
        Just("2".to_owned()),
        Just(NONCE.to_owned()),
        Just(otp_for(1, 0)),
        "[cbdefghijklnrtuvCBDEFGHIJKLNRTUV.jxepy]{30,50}",
        "[0-9]{0,12}",
        "\\PC{0,60}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any pairs, either version: no panic, a known status, an ASCII body
    /// that parses and is signed with the client's key when the one `id`
    /// names a client, else with the empty key.
    #[test]
    fn any_pairs_give_a_signed_answer(
        list in proptest::collection::vec((key_strategy(), value_strategy()), 0..10),
        v1 in any::<bool>(),
    ) {
        let rig = Rig::new();
        let version = if v1 { Version::V1 } else { Version::V2 };
        let a = rig.run_version(&list, version);
        prop_assert!(Status::ALL.contains(&a.status));
        prop_assert!(a.body.is_ascii());
        let ids: Vec<&str> = list.iter().filter(|(k, _)| k == "id").map(|(_, v)| v.as_str()).collect();
        let key: &[u8] = match ids.as_slice() {
            [id] if id.parse::<ClientId>().map(ClientId::get) == Ok(1) => KEY,
            [id] if id.parse::<ClientId>().map(ClientId::get) == Ok(2) => OTHER_KEY,
            _ => b"",
        };
        prop_assert!(a.signed_by(key), "{:?}\n{}", list, a.body);
        if a.status == Status::Ok {
            prop_assert_eq!(version == Version::V2, a.fields.contains_key("nonce"));
        }
    }

    /// Whatever the pairs, a signature made over them checks, and changing
    /// any value breaks it.
    #[test]
    fn signatures_round_trip(
        map in proptest::collection::btree_map("[a-gi-z]{1,6}", "\\PC{0,20}", 1..8),
        key in proptest::collection::vec(any::<u8>(), 0..64),
        pick in any::<proptest::sample::Index>(),
    ) {
        let list: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = signed(&list, &key);
        prop_assert_eq!(check_request_signature(&p, &key), RequestSignature::Valid);
        let mut tampered = p.clone();
        let i = pick.index(list.len());
        tampered[i].1.push('x');
        prop_assert_eq!(check_request_signature(&tampered, &key), RequestSignature::Invalid);
    }
}

#[test]
fn parse_request_is_reachable_through_the_module() {
    // The HTTP layer can route by path and refuse early with the same rules.
    assert_eq!(Version::from_path("/wsapi/2.0/verify"), Some(Version::V2));
    let r = protocol::parse_request(&v2(&otp_for(1, 0), NONCE), Version::V2).unwrap();
    assert_eq!(r.echo(), Echo::new(Version::V2, &otp_for(1, 0), Nonce::new(NONCE)));
}

#[test]
fn the_http_layer_can_move_phase_two_to_a_blocking_thread() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    send_sync_static::<Verifier>();
    send_sync_static::<Checked>();
    send_sync_static::<Response>();
    send_sync_static::<Prepared>();
}
