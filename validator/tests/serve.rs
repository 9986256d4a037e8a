//! `validator serve` over real HTTP on loopback, with the real SQLite
//! counter and client stores, the real soft keystore and AEAD store: the
//! protocol's edges, concurrency (one OTP many times, interleaved OTPs of
//! one key, 256 connections at once), the answer deadline, and failures of
//! the module, the KSM and the database (`BACKEND_ERROR`, never `BAD_OTP`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use ksm::Ksm;
use otp::token::TokenFields;
use otp::{Counters, HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};
use validator::clients::SqliteClients;
use validator::counters::{CounterOptions, SqliteCounters};
use validator::protocol::{signed_query, verify_response};
use validator::remote_ksm::RemoteKsm;
use validator::serve::{HealthCheck, HttpOptions, MetricsSource, Parts, Running};
use validator::verify::{Verifier, VerifyOptions};
use validator::{ClientId, OtpDecoder};

const KH: KeyHandle = KeyHandle::new(0x2000);
const PASSWORD: &str = "correct horse";
const VERIFY: &str = "/wsapi/2.0/verify";
/// The timestamp every test OTP carries: high 0x56, low 0x1234.
const TS_HIGH: u8 = 0x56;
const TS_LOW: u16 = 0x1234;

// ------------------------------------------------------------------ fixture

struct YubiKey {
    id: PublicId,
    secrets: YubiKeySecrets,
}

impl YubiKey {
    fn otp(&self, counter: u16, session_use: u8) -> String {
        self.otp_with_uid(*self.secrets.uid.expose(), counter, session_use)
    }

    fn otp_with_uid(&self, uid: [u8; 6], counter: u16, session_use: u8) -> String {
        let t = TokenFields { uid, counter, session_use, timestamp_low: TS_LOW, timestamp_high: TS_HIGH, rnd: 0x4242 }.build();
        Otp::new(self.id, t.encrypt(&self.secrets.key)).to_string()
    }
}

/// A keystore, an AEAD store with `n` YubiKeys, and the validator's
/// database (clients and counters) in a temporary directory.
struct Site {
    _dir: tempfile::TempDir,
    hsm: Arc<SoftHsm>,
    store_path: PathBuf,
    keys: Vec<YubiKey>,
    clients: Arc<SqliteClients>,
    counters: Arc<SqliteCounters>,
}

fn site(n: u64) -> Site {
    site_with(n, CounterOptions::default())
}

fn site_with(n: u64, counter_options: CounterOptions) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("v.ks"), &Password::new(PASSWORD).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[0x3c; 32]).unwrap())]).unwrap();
    let hsm = Arc::new(hsm);
    let store_path = dir.path().join("aeads.db");
    let store = AeadStore::open(&store_path).unwrap();
    let keys = (1..=n)
        .map(|i| {
            let id = PublicId::from_number(0x1000 + i, 6).unwrap();
            let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
            store.put(&id, &rec, "test", 0).unwrap();
            YubiKey { id, secrets: YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap() }
        })
        .collect();
    let db = dir.path().join("validator.db");
    let clients = Arc::new(SqliteClients::open(&db, hsm.clone()).unwrap());
    let counters = Arc::new(SqliteCounters::open_with(&db, counter_options).unwrap());
    Site { _dir: dir, hsm, store_path, keys, clients, counters }
}

impl Site {
    /// The in-process KSM over this site's module and AEAD store.
    fn ksm(&self) -> Arc<Ksm> {
        Arc::new(Ksm::new(self.hsm.clone(), Box::new(AeadStore::open(&self.store_path).unwrap()), vec![KH.into()]))
    }

    /// Add API client `id`; its key bytes.
    fn add_client(&self, id: u64) -> Vec<u8> {
        let (_, key) = self.clients.add(Some(ClientId::new(id).unwrap()), None).unwrap();
        key.expose().to_vec()
    }

    /// What `serve::assemble` would build, over `decoder`.
    fn parts(&self, decoder: Arc<dyn OtpDecoder>, mut health: Vec<HealthCheck>) -> Parts {
        let c = self.counters.clone();
        health.push(Box::new(move || c.check().map_err(|e| e.to_string())));
        let c = self.counters.clone();
        let metrics: Vec<MetricsSource> = vec![Box::new(move |out: &mut String| c.render_metrics(out))];
        let verifier = Verifier::new(self.clients.clone(), decoder, self.counters.clone(), VerifyOptions::default());
        Parts { verifier: Arc::new(verifier), health, metrics }
    }

    fn serve_over(&self, decoder: Arc<dyn OtpDecoder>, health: Vec<HealthCheck>, request_timeout: Duration) -> Running {
        let opts = HttpOptions { request_timeout, ..HttpOptions::new("127.0.0.1:0".parse().unwrap()) };
        validator::serve::start(self.parts(decoder, health), opts).unwrap()
    }

    /// Served with the in-process KSM (whose health is checked too).
    fn serve(&self) -> Running {
        let ksm = self.ksm();
        let k = ksm.clone();
        self.serve_over(ksm, vec![Box::new(move || k.health())], Duration::from_secs(5))
    }

    fn stored(&self, key: usize) -> Option<Counters> {
        self.counters.get(&self.keys[key].id).unwrap().map(|s| s.counters)
    }
}

/// A nonce unique to (`tag`, `i`): 24 letters and digits.
fn nonce(tag: &str, i: usize) -> String {
    let n = format!("{tag}{i:0>20}");
    assert!(n.len() <= 40 && n.bytes().all(|b| b.is_ascii_alphanumeric()));
    format!("{n:x>24}")
}

/// A signed 2.0 query for client `id`.
fn query(id: u64, key: &[u8], otp: &str, nonce: &str) -> String {
    signed_query(&[("id", &id.to_string()), ("otp", otp), ("nonce", nonce)], Some(key))
}

// ------------------------------------------------------------------ HTTP

/// A raw HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Send `raw` on `s` and read until the server closes.
fn exchange_on(mut s: TcpStream, raw: &[u8]) -> Reply {
    s.write_all(raw).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let end =
        bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply { status, head, body: bytes[end + 4..].to_vec() }
}

fn request_bytes(method: &str, target: &[u8], body: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(method.as_bytes());
    raw.push(b' ');
    raw.extend_from_slice(target);
    raw.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: validator\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    raw.extend_from_slice(body);
    raw
}

fn get(addr: SocketAddr, target: &str) -> Reply {
    exchange_on(connect(addr), &request_bytes("GET", target.as_bytes(), b""))
}

fn post(addr: SocketAddr, target: &str, body: &[u8]) -> Reply {
    exchange_on(connect(addr), &request_bytes("POST", target.as_bytes(), body))
}

/// A verify answer, its framing checked.
#[derive(Debug)]
struct Answer {
    body: String,
    /// The lines in order, `h` first.
    lines: Vec<(String, String)>,
}

impl Answer {
    /// Check the HTTP status, the content type and the body's exact framing:
    /// `key=value` lines ending in CRLF, `h` first, `t` second, `status`
    /// last, then an empty line.
    fn of(reply: &Reply) -> Self {
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
        let body = reply.text().to_owned();
        let inner = body.strip_suffix("\r\n\r\n").unwrap_or_else(|| panic!("does not end with an empty line: {body:?}"));
        let lines: Vec<(String, String)> = inner
            .split("\r\n")
            .map(|l| {
                assert!(!l.contains(['\r', '\n', ' ']), "stray CR, LF or space in {body:?}");
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key=value: {l:?} in {body:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let keys: Vec<&str> = lines.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.len() >= 3 && keys[0] == "h" && keys[1] == "t" && keys[keys.len() - 1] == "status", "{body:?}");
        let t = &lines[1].1;
        // yubikey-val's t: 2008-11-21T06:11:55Z0711.
        assert!(t.len() == 24 && &t[10..11] == "T" && &t[19..21] == "Z0" && t[21..].bytes().all(|b| b.is_ascii_digit()), "t={t}");
        Self { body, lines }
    }

    fn status(&self) -> &str {
        &self.lines.last().unwrap().1
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The keys between `t` and `status`.
    fn extras(&self) -> Vec<&str> {
        self.lines[2..self.lines.len() - 1].iter().map(|(k, _)| k.as_str()).collect()
    }

    fn signed_by(&self, key: &[u8]) -> bool {
        verify_response(&self.body, key)
    }

    /// The answer apart from `h` and `t` (which differ between two answers
    /// to the same request).
    fn comparable(&self) -> Vec<(String, String)> {
        self.lines[2..].to_vec()
    }
}

fn verify(addr: SocketAddr, query: &str) -> Answer {
    Answer::of(&get(addr, &format!("{VERIFY}?{query}")))
}

fn metrics(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    r.text().to_owned()
}

/// The value of one series in a metrics text.
fn metric(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{series} not in\n{text}"));
    line[series.len() + 1..].parse().unwrap()
}

fn requests_with(text: &str, status: &str) -> f64 {
    metric(text, &format!("validator_verify_requests_total{{status=\"{status}\"}}"))
}

/// Open one connection per target, then send every request at once (a
/// barrier), each on its own thread.
fn fire(addr: SocketAddr, targets: Vec<String>) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(targets.len()));
    let threads: Vec<_> = targets
        .into_iter()
        .map(|target| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = connect(addr);
                barrier.wait();
                exchange_on(s, &request_bytes("GET", target.as_bytes(), b""))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

// ------------------------------------------------------------------ protocol edges

/// Every parameter error, signature error and client error, with the key
/// each answer must be signed with: the client's whenever the `id`
/// resolves (disabled clients included), the empty key otherwise.
#[test]
fn parameter_client_and_signature_errors_over_http() {
    let site = site(2);
    let k1 = site.add_client(1);
    let k2 = site.add_client(2);
    site.clients.disable(ClientId::new(2).unwrap()).unwrap();
    let server = site.serve();
    let addr = server.local_addr();
    let [a, b] = &site.keys[..] else { unreachable!() };
    let otp = a.otp(1, 0);
    let n = nonce("edge", 0);
    let signed = |pairs: &[(&str, &str)]| signed_query(pairs, Some(&k1));
    let unknown_id = PublicId::from_number(0xdead, 6).unwrap();
    let stranger = YubiKey { id: unknown_id, secrets: YubiKeySecrets::from_plaintext(&[7; 22]).unwrap() };
    let empty: &[u8] = b"";

    // (what, query, status, key the answer is signed with)
    let cases: Vec<(&str, String, &str, &[u8])> = vec![
        ("no id", signed_query(&[("otp", &otp), ("nonce", &n)], None), "MISSING_PARAMETER", empty),
        ("empty id", signed_query(&[("id", ""), ("otp", &otp), ("nonce", &n)], None), "MISSING_PARAMETER", empty),
        ("id 0", signed_query(&[("id", "0"), ("otp", &otp), ("nonce", &n)], None), "MISSING_PARAMETER", empty),
        ("id not digits", signed_query(&[("id", "1a"), ("otp", &otp), ("nonce", &n)], None), "MISSING_PARAMETER", empty),
        ("id 11 digits", signed_query(&[("id", "10000000001"), ("otp", &otp), ("nonce", &n)], None), "MISSING_PARAMETER", empty),
        ("id repeated", format!("id=1&{}", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n)])), "MISSING_PARAMETER", empty),
        ("no otp", signed(&[("id", "1"), ("nonce", &n)]), "MISSING_PARAMETER", &k1),
        ("empty otp", signed(&[("id", "1"), ("otp", ""), ("nonce", &n)]), "MISSING_PARAMETER", &k1),
        ("otp repeated", signed(&[("id", "1"), ("otp", &otp), ("otp", &otp), ("nonce", &n)]), "MISSING_PARAMETER", &k1),
        ("no nonce", signed(&[("id", "1"), ("otp", &otp)]), "MISSING_PARAMETER", &k1),
        ("empty nonce", signed(&[("id", "1"), ("otp", &otp), ("nonce", "")]), "MISSING_PARAMETER", &k1),
        ("nonce 15", signed(&[("id", "1"), ("otp", &otp), ("nonce", &"a".repeat(15))]), "MISSING_PARAMETER", &k1),
        ("nonce 41", signed(&[("id", "1"), ("otp", &otp), ("nonce", &"a".repeat(41))]), "MISSING_PARAMETER", &k1),
        ("nonce with -", signed(&[("id", "1"), ("otp", &otp), ("nonce", "abcdefgh-ijklmnop")]), "MISSING_PARAMETER", &k1),
        ("nonce with space", signed(&[("id", "1"), ("otp", &otp), ("nonce", "abcdefgh ijklmnop")]), "MISSING_PARAMETER", &k1),
        ("nonce with NUL", signed(&[("id", "1"), ("otp", &otp), ("nonce", "abcdefgh\0ijklmnop")]), "MISSING_PARAMETER", &k1),
        ("sl 0", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n), ("sl", "0")]), "MISSING_PARAMETER", &k1),
        ("sl 101", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n), ("sl", "101")]), "MISSING_PARAMETER", &k1),
        ("timeout not digits", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n), ("timeout", "1s")]), "MISSING_PARAMETER", &k1),
        ("otp too short", signed(&[("id", "1"), ("otp", &otp[..31]), ("nonce", &n)]), "BAD_OTP", &k1),
        ("otp too long", signed(&[("id", "1"), ("otp", &format!("{otp}ccccc")), ("nonce", &n)]), "BAD_OTP", &k1),
        ("otp not modhex", signed(&[("id", "1"), ("otp", &format!("{}a", &otp[1..])), ("nonce", &n)]), "BAD_OTP", &k1),
        ("otp hello", signed(&[("id", "1"), ("otp", "hello"), ("nonce", &n)]), "BAD_OTP", &k1),
        ("unknown yubikey", signed(&[("id", "1"), ("otp", &stranger.otp(1, 0)), ("nonce", &n)]), "BAD_OTP", &k1),
        // b's token under a's public id: the CRC fails.
        ("corrupt otp", signed(&[("id", "1"), ("otp", &format!("{}{}", &otp[..12], &b.otp(1, 0)[12..])), ("nonce", &n)]), "BAD_OTP", &k1),
        ("wrong private id", signed(&[("id", "1"), ("otp", &a.otp_with_uid([9; 6], 1, 0)), ("nonce", &n)]), "BAD_OTP", &k1),
        ("h by another key", signed_query(&[("id", "1"), ("otp", &otp), ("nonce", &n)], Some(&k2)), "BAD_SIGNATURE", &k1),
        ("h garbage", format!("id=1&otp={otp}&nonce={n}&h=abc"), "BAD_SIGNATURE", &k1),
        ("h over other values", format!("{}&sl=50", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n)])), "BAD_SIGNATURE", &k1),
        ("h repeated", format!("{0}&h={1}", signed(&[("id", "1"), ("otp", &otp), ("nonce", &n)]), "AAAA"), "MISSING_PARAMETER", &k1),
        ("unknown client", signed_query(&[("id", "99"), ("otp", &otp), ("nonce", &n)], Some(&k1)), "NO_SUCH_CLIENT", empty),
        ("disabled client", signed_query(&[("id", "2"), ("otp", &otp), ("nonce", &n)], Some(&k2)), "NO_SUCH_CLIENT", &k2),
    ];
    let mut by_status: BTreeMap<&str, f64> = BTreeMap::new();
    for (what, q, status, key) in &cases {
        let answer = verify(addr, q);
        assert_eq!(answer.status(), *status, "{what}: {q}\n{}", answer.body);
        assert!(answer.signed_by(key), "{what}: not signed with the expected key\n{}", answer.body);
        if !key.is_empty() {
            assert!(!answer.signed_by(b""), "{what}: signed with the empty key");
        }
        // Errors carry no otp, nonce or sl: yubikey-val's fields per status.
        assert!(answer.extras().is_empty(), "{what}: {}", answer.body);
        *by_status.entry(status).or_default() += 1.0;
    }
    // None of them touched the counters: a's OTP is still good, at both
    // ends of the nonce length range.
    assert_eq!(site.stored(0), None);
    let ok = verify(addr, &signed(&[("id", "1"), ("otp", &otp), ("nonce", &"N".repeat(16))]));
    assert_eq!(ok.status(), "OK", "{}", ok.body);
    let ok = verify(addr, &signed(&[("id", "1"), ("otp", &a.otp(1, 1)), ("nonce", &"7".repeat(40))]));
    assert_eq!(ok.status(), "OK", "{}", ok.body);
    *by_status.entry("OK").or_default() += 2.0;

    let m = metrics(addr);
    for (status, n) in &by_status {
        assert_eq!(requests_with(&m, status), *n, "{status}");
    }
    assert_eq!(requests_with(&m, "BACKEND_ERROR"), 0.0);
    server.shutdown();
}

/// The exact lines of OK answers (with and without `timestamp=1`) and of
/// replays, over HTTP.
#[test]
fn ok_answers_timestamps_and_replays_over_http() {
    let site = site(1);
    let key = site.add_client(7);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    let ask = |pairs: &[(&str, &str)]| verify(addr, &signed_query(pairs, Some(&key)));

    let (otp, n) = (yk.otp(5, 3), nonce("ts", 1));
    let first = ask(&[("id", "7"), ("otp", &otp), ("nonce", &n), ("timestamp", "1")]);
    assert_eq!(first.status(), "OK", "{}", first.body);
    assert_eq!(first.extras(), ["otp", "nonce", "sl", "timestamp", "sessioncounter", "sessionuse"]);
    assert_eq!(first.get("otp"), Some(otp.as_str()));
    assert_eq!(first.get("nonce"), Some(n.as_str()));
    // No sync peers: yubikey-val with an empty sync pool answers sl=0.
    assert_eq!(first.get("sl"), Some("0"));
    let ts = (u32::from(TS_HIGH) << 16) + u32::from(TS_LOW);
    assert_eq!(first.get("timestamp"), Some(ts.to_string().as_str()));
    assert_eq!(first.get("sessioncounter"), Some("5"));
    assert_eq!(first.get("sessionuse"), Some("3"));
    assert!(first.signed_by(&key) && !first.signed_by(b""));

    // The same request again, and the same OTP with another nonce.
    let again = ask(&[("id", "7"), ("otp", &otp), ("nonce", &n), ("timestamp", "1")]);
    assert_eq!((again.status(), again.extras()), ("REPLAYED_REQUEST", vec!["otp", "nonce"]), "{}", again.body);
    assert_eq!((again.get("otp"), again.get("nonce")), (Some(otp.as_str()), Some(n.as_str())));
    assert!(again.signed_by(&key));
    let other = ask(&[("id", "7"), ("otp", &otp), ("nonce", &nonce("ts", 2))]);
    assert_eq!((other.status(), other.extras()), ("REPLAYED_OTP", vec!["otp", "nonce"]), "{}", other.body);
    // An older OTP, never seen: replayed too.
    let older = ask(&[("id", "7"), ("otp", &yk.otp(5, 2)), ("nonce", &nonce("ts", 3))]);
    assert_eq!(older.status(), "REPLAYED_OTP");

    // Without timestamp=1 (or with anything but exactly 1): no session fields.
    for (i, ts_param) in [None, Some("0"), Some("true"), Some("01")].into_iter().enumerate() {
        let o = yk.otp(5, 10 + u8::try_from(i).unwrap());
        let nn = nonce("ts", 10 + i);
        let mut pairs = vec![("id", "7"), ("otp", o.as_str()), ("nonce", nn.as_str())];
        if let Some(t) = ts_param {
            pairs.push(("timestamp", t));
        }
        let a = ask(&pairs);
        assert_eq!((a.status(), a.extras()), ("OK", vec!["otp", "nonce", "sl"]), "timestamp={ts_param:?}: {}", a.body);
    }

    // Caps lock: the 15-bit counter is reported and stored.
    let caps = ask(&[("id", "7"), ("otp", &yk.otp(0x8006, 0)), ("nonce", &nonce("ts", 20)), ("timestamp", "1")]);
    assert_eq!((caps.status(), caps.get("sessioncounter")), ("OK", Some("6")), "{}", caps.body);
    assert_eq!(site.stored(0), Some(Counters::new(6, 0).unwrap()));
    // An upper-case OTP (caps lock on the host) is echoed as it was sent.
    let upper = yk.otp(6, 1).to_uppercase();
    let up = ask(&[("id", "7"), ("otp", &upper), ("nonce", &nonce("ts", 21))]);
    assert_eq!((up.status(), up.get("otp")), ("OK", Some(upper.as_str())), "{}", up.body);

    // The protocol 1.x path: nothing echoed, no nonce needed.
    let v1 = Answer::of(&get(addr, &format!("/wsapi/verify?{}", signed_query(&[("id", "7"), ("otp", &yk.otp(6, 2))], Some(&key)))));
    assert_eq!((v1.status(), v1.extras()), ("OK", Vec::<&str>::new()), "{}", v1.body);
    assert!(v1.signed_by(&key));
    server.shutdown();
}

/// A POST form is the same request as the GET query: same answer apart
/// from `t` and `h`, for every kind of answer.
#[test]
fn post_form_gets_the_same_answer_as_get() {
    let site = site(1);
    let key = site.add_client(3);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    let q = |otp: &str, n: &str| query(3, &key, otp, n);

    // A fresh OTP by POST.
    let (otp, n) = (yk.otp(1, 0), nonce("post", 0));
    let posted = Answer::of(&post(addr, VERIFY, q(&otp, &n).as_bytes()));
    assert_eq!((posted.status(), posted.extras()), ("OK", vec!["otp", "nonce", "sl"]), "{}", posted.body);
    assert!(posted.signed_by(&key));
    // A trailing slash and a POST with timestamp=1.
    let (o2, n2) = (yk.otp(1, 1), nonce("post", 2));
    let ts = signed_query(&[("id", "3"), ("otp", &o2), ("nonce", &n2), ("timestamp", "1")], Some(&key));
    let posted = Answer::of(&post(addr, &format!("{VERIFY}/"), ts.as_bytes()));
    assert_eq!(posted.extras(), ["otp", "nonce", "sl", "timestamp", "sessioncounter", "sessionuse"]);

    // Answers that do not change state, by GET and by POST.
    let queries = [
        q(&o2, &n),                                                       // REPLAYED_OTP (other request)
        ts.clone(),                                                       // REPLAYED_REQUEST
        q(&otp, &nonce("post", 1)),                                       // REPLAYED_OTP
        query(3, b"not the key at all", &yk.otp(2, 0), &n),               // BAD_SIGNATURE
        signed_query(&[("id", "3"), ("otp", &yk.otp(2, 0))], Some(&key)), // MISSING_PARAMETER
        query(4, &key, &yk.otp(2, 0), &n),                                // NO_SUCH_CLIENT
        q("cccccccccccccccccccccccccccccccccccccccc", &n),                // BAD_OTP (unknown)
        q("hello", &n),                                                   // BAD_OTP (malformed)
    ];
    let mut seen = Vec::new();
    for query in &queries {
        let by_get = verify(addr, query);
        let by_post = Answer::of(&post(addr, VERIFY, query.as_bytes()));
        assert_eq!(by_get.comparable(), by_post.comparable(), "{query}");
        let key_used: &[u8] = if by_get.signed_by(&key) { &key } else { b"" };
        assert!(by_get.signed_by(key_used) && by_post.signed_by(key_used), "{query}");
        seen.push(by_get.status().to_owned());
    }
    assert_eq!(
        seen,
        ["REPLAYED_OTP", "REPLAYED_REQUEST", "REPLAYED_OTP", "BAD_SIGNATURE", "MISSING_PARAMETER", "NO_SUCH_CLIENT", "BAD_OTP", "BAD_OTP"]
    );
    // Other methods are refused by the HTTP layer.
    let put = exchange_on(connect(addr), &request_bytes("PUT", VERIFY.as_bytes(), q(&yk.otp(3, 0), &n).as_bytes()));
    assert_eq!(put.status, 405);
    assert_eq!(get(addr, "/wsapi/2/verify?id=3").status, 404);
    server.shutdown();
}

/// Oversized requests are refused by the HTTP layer (httpd bounds the
/// target and the body to 1 KiB): `414 URI Too Long` and `413 Payload Too
/// Large`, with a one-line reason, not a protocol body. ykclient then
/// reports a parse error and pam_yubico `PAM_AUTHINFO_UNAVAIL`; no real
/// client sends a kilobyte (pam_yubico's longest request is about 150
/// bytes). Non-ASCII input never panics: it is `MISSING_PARAMETER` or
/// `BAD_OTP`, or `400` when the bytes are not even a valid request target.
#[test]
fn oversized_and_non_ascii_requests() {
    let site = site(1);
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    let n = nonce("na", 0);
    let signed = |pairs: &[(&str, &str)]| signed_query(pairs, Some(&key));

    // Exactly 1 KiB of target is served; one byte more is not.
    let base = format!("{VERIFY}?id=1&otp={}&nonce={n}&pad=", yk.otp(1, 0));
    let at_limit = format!("{base}{}", "p".repeat(1024 - base.len()));
    assert_eq!(at_limit.len(), 1024);
    let a = Answer::of(&get(addr, &at_limit));
    assert_eq!(a.status(), "OK", "{}", a.body);
    let over = get(addr, &format!("{base}{}", "p".repeat(1025 - base.len())));
    assert_eq!((over.status, over.text()), (414, "target_too_long\n"));
    let huge = get(addr, &format!("{VERIFY}?id=1&otp={}&nonce={n}&pad={}", yk.otp(1, 1), "p".repeat(8 * 1024)));
    assert_eq!((huge.status, huge.text()), (414, "target_too_long\n"));
    // A POST body: 1 KiB is read, more is refused.
    let body = signed(&[("id", "1"), ("otp", &yk.otp(1, 2)), ("nonce", &n), ("pad", &"p".repeat(2000))]);
    let big = post(addr, VERIFY, body.as_bytes());
    assert_eq!((big.status, big.text()), (413, "body_too_large\n"));
    // Neither reached the counters.
    let a = verify(addr, &signed(&[("id", "1"), ("otp", &yk.otp(1, 1)), ("nonce", &nonce("na", 1))]));
    assert_eq!(a.status(), "OK", "{}", a.body);

    // UTF-8 (percent-encoded) in each parameter.
    let cases: Vec<(&str, String, &str, &[u8])> = vec![
        ("UTF-8 otp", signed(&[("id", "1"), ("otp", &format!("{}é", &yk.otp(1, 3)[..31])), ("nonce", &n)]), "BAD_OTP", &key),
        ("UTF-8 otp, 44 chars", signed(&[("id", "1"), ("otp", &"é".repeat(44)), ("nonce", &n)]), "BAD_OTP", &key),
        ("UTF-8 nonce", signed(&[("id", "1"), ("otp", &yk.otp(1, 3)), ("nonce", "nonceéééééééééééé")]), "MISSING_PARAMETER", &key),
        (
            "Unicode digits in nonce",
            signed(&[("id", "1"), ("otp", &yk.otp(1, 3)), ("nonce", "٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦")]),
            "MISSING_PARAMETER",
            &key,
        ),
        ("UTF-8 id", signed(&[("id", "١"), ("otp", &yk.otp(1, 3)), ("nonce", &n)]), "MISSING_PARAMETER", b""),
        ("UTF-8 key", signed(&[("id", "1"), ("otp", &yk.otp(1, 3)), ("nonce", &n), ("ключ", "1")]), "OK", &key),
        (
            "UTF-8 h",
            format!("{}&h=%C3%A9", signed_query(&[("id", "1"), ("otp", &yk.otp(1, 4)), ("nonce", &n)], None)),
            "BAD_SIGNATURE",
            &key,
        ),
        // Bytes that are not UTF-8: the query cannot be read, its id is not trusted.
        ("%FF in otp", format!("id=1&otp=%FF%FE{}&nonce={n}", &yk.otp(1, 5)[2..]), "MISSING_PARAMETER", b""),
        ("%C3 alone in nonce", format!("id=1&otp={}&nonce={n}%C3", yk.otp(1, 5)), "MISSING_PARAMETER", b""),
        ("bad escape", format!("id=1&otp={}&nonce={n}%zz", yk.otp(1, 5)), "MISSING_PARAMETER", b""),
    ];
    for (what, q, status, signed_with) in &cases {
        let a = verify(addr, q);
        assert_eq!(a.status(), *status, "{what}: {}", a.body);
        assert!(a.signed_by(signed_with), "{what}: {}", a.body);
    }
    // A UTF-8 parameter is signed over its decoded value, as yubikey-val does.
    let a = verify(addr, &signed(&[("id", "1"), ("otp", &yk.otp(1, 6)), ("nonce", &n), ("note", "grüße")]));
    assert_eq!(a.status(), "OK", "{}", a.body);
    // A POST body that is not UTF-8 at all.
    let mut raw_body = format!("id=1&nonce={n}&otp=").into_bytes();
    raw_body.extend_from_slice(&[0xff, 0xfe, 0x80, 0xc3]);
    let a = Answer::of(&post(addr, VERIFY, &raw_body));
    assert_eq!(a.status(), "MISSING_PARAMETER");
    assert!(a.signed_by(b""));
    // Raw (unescaped) UTF-8 in the request target is read as if it had
    // been escaped; raw bytes that are not UTF-8, a NUL or a space are not a
    // request target at all: hyper's parser answers 400 (empty body) before
    // any handler runs.
    let raw_target = |tail: &[u8]| {
        let mut t = format!("{VERIFY}?id=1&nonce={n}&otp=").into_bytes();
        t.extend_from_slice(tail);
        exchange_on(connect(addr), &request_bytes("GET", &t, b""))
    };
    let a = Answer::of(&raw_target("été".as_bytes()));
    assert_eq!(a.status(), "BAD_OTP", "{}", a.body);
    assert!(a.signed_by(&key));
    for tail in [&b"\xff\xfe"[..], b"\xc3", "été\u{0}".as_bytes(), b"a b", b"\x7f"] {
        let r = raw_target(tail);
        assert_eq!((r.status, r.body.as_slice()), (400, &b""[..]), "{tail:?}: {r:?}");
    }
    // Still serving, and the metrics saw every refusal.
    assert_eq!(verify(addr, &signed(&[("id", "1"), ("otp", &yk.otp(1, 7)), ("nonce", &n)])).status(), "OK");
    let m = metrics(addr);
    assert_eq!(metric(&m, "validator_http_rejected_total{reason=\"target_too_long\"}"), 2.0);
    assert_eq!(metric(&m, "validator_http_rejected_total{reason=\"body_too_large\"}"), 1.0);
    assert_eq!(get(addr, "/health").status, 200);
    server.shutdown();
}

/// `/health` follows the module and the counter store; `/metrics` counts
/// requests by status, their latency, and the counter store's batches.
#[test]
fn health_and_metrics() {
    let site = site(2);
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let health = get(addr, "/health");
    assert_eq!((health.status, health.text()), (200, "ok\n"));

    let yk = &site.keys[0];
    for i in 0..5u8 {
        assert_eq!(verify(addr, &query(1, &key, &yk.otp(1, i), &nonce("m", i.into()))).status(), "OK");
    }
    for _ in 0..3 {
        assert_eq!(verify(addr, &query(1, &key, &yk.otp(1, 4), &nonce("m", 4))).status(), "REPLAYED_REQUEST");
    }
    assert_eq!(verify(addr, &query(1, &key, &yk.otp(1, 0), &nonce("m", 99))).status(), "REPLAYED_OTP");
    assert_eq!(verify(addr, &query(1, &key, "hello", &nonce("m", 99))).status(), "BAD_OTP");
    // 8 concurrent OTPs of the other key: group commit may batch them.
    let other = &site.keys[1];
    let targets = (0..8u8).map(|i| format!("{VERIFY}?{}", query(1, &key, &other.otp(2, i), &nonce("c", i.into())))).collect();
    let oks = fire(addr, targets).iter().filter(|r| Answer::of(r).status() == "OK").count();
    assert!(oks >= 1);

    let r = get(addr, "/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"), "{r:?}");
    let m = r.text();
    let ok = 5.0 + oks as f64;
    assert_eq!(requests_with(m, "OK"), ok);
    assert_eq!(requests_with(m, "REPLAYED_REQUEST"), 3.0);
    assert_eq!(requests_with(m, "REPLAYED_OTP"), 1.0 + (8 - oks) as f64);
    assert_eq!(requests_with(m, "BAD_OTP"), 1.0);
    assert_eq!(requests_with(m, "BACKEND_ERROR"), 0.0);
    // The latency histogram, per status.
    assert_eq!(metric(m, "validator_verify_duration_seconds_bucket{status=\"OK\",le=\"+Inf\"}"), ok);
    assert_eq!(metric(m, "validator_verify_duration_seconds_count{status=\"OK\"}"), ok);
    assert!(metric(m, "validator_verify_duration_seconds_sum{status=\"OK\"}") > 0.0);
    assert!(metric(m, "validator_verify_duration_seconds_bucket{status=\"OK\",le=\"5\"}") <= ok);
    assert_eq!(metric(m, "validator_deadline_missed_total"), 0.0);
    // The counter store: every compare-and-set went through a committed batch.
    assert_eq!(metric(m, "validator_counter_updates_total{outcome=\"accepted\"}"), ok);
    assert_eq!(metric(m, "validator_counter_updates_total{outcome=\"replayed_request\"}"), 3.0);
    assert_eq!(metric(m, "validator_counter_updates_total{outcome=\"replayed_otp\"}"), 1.0 + (8 - oks) as f64);
    assert_eq!(metric(m, "validator_counter_updates_total{outcome=\"failed\"}"), 0.0);
    let batches = metric(m, "validator_counter_batches_total");
    assert!((1.0..=17.0).contains(&batches), "{batches} batches for 17 updates");
    assert_eq!(metric(m, "validator_counter_batch_size_count"), batches);
    assert_eq!(metric(m, "validator_counter_batch_size_sum"), 17.0);
    assert_eq!(metric(m, "validator_counter_batch_failures_total"), 0.0);
    assert_eq!(metric(m, "validator_counter_commit_seconds_count"), batches);
    assert_eq!(metric(m, "validator_counter_synchronous{mode=\"full\"}"), 1.0);
    assert!(metric(m, "validator_http_connections_total") >= 20.0);

    // The module locked: not ready, and it says why.
    site.hsm.lock().unwrap();
    let health = get(addr, "/health");
    assert_eq!((health.status, health.text()), (503, "not ready: security module locked\n"));
    site.hsm.unlock(&Password::new(PASSWORD).unwrap()).unwrap();
    assert_eq!(get(addr, "/health").status, 200);
    server.shutdown();
}

// ------------------------------------------------------------------ concurrency

/// 64 parallel copies of one OTP: exactly one `OK`. With 64 nonces the
/// others are `REPLAYED_OTP`; with one nonce they are `REPLAYED_REQUEST`.
#[test]
fn sixty_four_parallel_copies_of_one_otp_give_exactly_one_ok() {
    let site = site(1);
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];

    for (round, same_nonce, others) in [(1u16, false, "REPLAYED_OTP"), (2, true, "REPLAYED_REQUEST")] {
        let otp = yk.otp(round, 0);
        let nonces: Vec<String> = (0..64).map(|i| nonce(&format!("r{round}"), if same_nonce { 0 } else { i })).collect();
        let targets = nonces.iter().map(|n| format!("{VERIFY}?{}", query(1, &key, &otp, n))).collect();
        let replies = fire(addr, targets);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (reply, n) in replies.iter().zip(&nonces) {
            let a = Answer::of(reply);
            assert!(a.signed_by(&key), "{}", a.body);
            assert_eq!((a.get("otp"), a.get("nonce")), (Some(otp.as_str()), Some(n.as_str())), "{}", a.body);
            *counts.entry(a.status().to_owned()).or_default() += 1;
        }
        println!("64 copies, same nonce {same_nonce}: {counts:?}");
        assert_eq!(counts.get("OK"), Some(&1), "{counts:?}");
        assert_eq!(counts.get(others), Some(&63), "{counts:?}");
        assert_eq!(site.stored(0), Some(Counters::new(round, 0).unwrap()));
    }
    let m = metrics(addr);
    assert_eq!(metric(&m, "validator_counter_updates_total{outcome=\"accepted\"}"), 2.0);
    server.shutdown();
}

/// A small deterministic generator (xorshift64*), for the send order.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Interleaved OTPs of one key, sent concurrently and out of order: only
/// increasing counters are accepted. No `OK` goes to an OTP lower than one
/// already answered `OK` before it was sent; every refusal is explained by
/// a higher OTP sent before it was answered; the stored counter is the
/// highest OTP.
#[test]
fn interleaved_otps_of_one_key_only_increasing_counters_accepted() {
    const N: u32 = 320;
    const THREADS: usize = 16;
    let site = site(1);
    let key = Arc::new(site.add_client(1));
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    let ticket = |t: u32| Counters::new(u16::try_from(1 + t / 200).unwrap(), u8::try_from(t % 200).unwrap()).unwrap();
    // Ticket t goes out around position t, give or take 12.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut order: Vec<(u64, u32)> = (0..N).map(|t| (u64::from(t) + rng.below(24), t)).collect();
    order.sort_unstable();
    let queue: VecDeque<(u32, String, String)> = order
        .iter()
        .map(|&(_, t)| {
            let c = ticket(t);
            (t, yk.otp(c.counter(), c.session_use()), nonce("il", t as usize))
        })
        .collect();
    let queue = Arc::new(Mutex::new(queue));
    let record = Arc::new(Mutex::new(Vec::<(u32, Instant, Instant, String)>::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (queue, record, key) = (queue.clone(), record.clone(), key.clone());
            std::thread::spawn(move || loop {
                let Some((t, otp, n)) = queue.lock().unwrap().pop_front() else { return };
                let s = connect(addr);
                let sent = Instant::now();
                let reply = exchange_on(s, &request_bytes("GET", format!("{VERIFY}?{}", query(1, &key, &otp, &n)).as_bytes(), b""));
                let answered = Instant::now();
                let a = Answer::of(&reply);
                assert!(a.signed_by(&key), "{}", a.body);
                assert_eq!((a.get("otp"), a.get("nonce")), (Some(otp.as_str()), Some(n.as_str())));
                record.lock().unwrap().push((t, sent, answered, a.status().to_owned()));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut record = record.lock().unwrap().clone();
    assert_eq!(record.len(), N as usize);
    record.sort_by_key(|r| r.2);
    let oks: Vec<&(u32, Instant, Instant, String)> = record.iter().filter(|r| r.3 == "OK").collect();
    for r in &record {
        assert!(r.3 == "OK" || r.3 == "REPLAYED_OTP", "ticket {}: {}", r.0, r.3);
    }
    // No OK below an OTP already answered OK before this one was sent.
    for x in &oks {
        for y in oks.iter().filter(|y| y.2 < x.1) {
            assert!(x.0 > y.0, "ticket {} accepted after ticket {} had been accepted", x.0, y.0);
        }
    }
    // Every refusal had a reason: a higher OTP accepted, sent before the
    // refusal was answered.
    for r in record.iter().filter(|r| r.3 != "OK") {
        assert!(oks.iter().any(|y| y.0 > r.0 && y.1 < r.2), "ticket {} refused with nothing higher in flight", r.0);
    }
    // In answer order, the accepted tickets rise except where two answers
    // crossed (both in flight at once).
    for w in oks.windows(2) {
        assert!(w[1].0 > w[0].0 || w[1].1 < w[0].2, "tickets {} then {} accepted in sequence", w[0].0, w[1].0);
    }
    assert_eq!(oks.iter().map(|r| r.0).max(), Some(N - 1));
    assert_eq!(site.stored(0), Some(ticket(N - 1)));
    let m = metrics(addr);
    assert_eq!(metric(&m, "validator_counter_updates_total{outcome=\"accepted\"}"), oks.len() as f64);
    println!("interleaved: {N} OTPs of one key from {THREADS} threads, {} accepted, {} REPLAYED_OTP", oks.len(), N as usize - oks.len());
    server.shutdown();
}

/// 256 connections at once, distinct OTPs and nonces, two clients: every
/// answer is `OK`, echoes its own request's `otp` and `nonce`, and is
/// signed with its own client's key (not the other's).
#[test]
fn concurrency_256_every_answer_is_its_own() {
    let site = site(256);
    let keys = [site.add_client(1), site.add_client(2)];
    let server = site.serve();
    let addr = server.local_addr();
    let requests: Vec<(usize, String, String)> =
        site.keys.iter().enumerate().map(|(i, yk)| (i % 2, yk.otp(1 + u16::try_from(i).unwrap(), 0), nonce("cc", i))).collect();
    let targets =
        requests.iter().map(|(c, otp, n)| format!("{VERIFY}?{}", query(u64::try_from(c + 1).unwrap(), &keys[*c], otp, n))).collect();
    let t0 = Instant::now();
    let replies = fire(addr, targets);
    let took = t0.elapsed();
    for (reply, (c, otp, n)) in replies.iter().zip(&requests) {
        let a = Answer::of(reply);
        assert_eq!(a.status(), "OK", "{}", a.body);
        assert_eq!((a.get("otp"), a.get("nonce")), (Some(otp.as_str()), Some(n.as_str())), "{}", a.body);
        assert!(a.signed_by(&keys[*c]), "not signed by its client: {}", a.body);
        assert!(!a.signed_by(&keys[1 - c]), "signed by the other client: {}", a.body);
    }
    let m = metrics(addr);
    assert_eq!(requests_with(&m, "OK"), 256.0);
    assert!(metric(&m, "validator_http_connections_total") >= 256.0);
    let batches = metric(&m, "validator_counter_batches_total");
    println!(
        "256 at once: all OK in {took:?}, {batches} counter transactions (largest {})",
        metric(&m, "validator_counter_batch_size_max")
    );
    server.shutdown();
}

// ------------------------------------------------------------------ deadline

/// A KSM that accepts connections and never answers.
fn silent_ksm() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/wsapi/decrypt?otp=", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    url
}

/// The KSM never answers: the answer still comes by the deadline, a
/// `BACKEND_ERROR` signed with the client's key. The request's `timeout`
/// and the server's ceiling: the lower wins.
#[test]
fn a_ksm_that_never_answers_is_a_signed_backend_error_by_the_deadline() {
    let site = site(1);
    let key = site.add_client(1);
    let yk = &site.keys[0];
    let silent = silent_ksm();
    let remote = || Arc::new(RemoteKsm::new(std::slice::from_ref(&silent), Duration::from_secs(4)).unwrap());

    // Ceiling 300 ms.
    let server = site.serve_over(remote(), Vec::new(), Duration::from_millis(300));
    let addr = server.local_addr();
    let ask = |addr, otp: &str, n: &str, timeout: Option<&str>| {
        let mut pairs = vec![("id", "1"), ("otp", otp), ("nonce", n)];
        if let Some(t) = timeout {
            pairs.push(("timeout", t));
        }
        let t0 = Instant::now();
        let a = verify(addr, &signed_query(&pairs, Some(&key)));
        (a, t0.elapsed())
    };
    for (i, timeout) in [None, Some("1"), Some("10")].into_iter().enumerate() {
        let (a, took) = ask(addr, &yk.otp(1, u8::try_from(i).unwrap()), &nonce("dl", i), timeout);
        assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
        assert!(a.signed_by(&key) && !a.signed_by(b""), "{}", a.body);
        assert!(a.extras().is_empty(), "{}", a.body);
        println!("KSM silent, ceiling 300 ms, timeout={timeout:?}: BACKEND_ERROR after {took:?}");
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(1), "timeout={timeout:?}: answered after {took:?}");
    }
    let m = metrics(addr);
    assert_eq!(metric(&m, "validator_deadline_missed_total"), 3.0);
    assert_eq!(requests_with(&m, "BACKEND_ERROR"), 3.0);
    assert_eq!(requests_with(&m, "BAD_OTP"), 0.0);
    server.shutdown();

    // Ceiling 5 s: the request's timeout=1 wins.
    let server = site.serve_over(remote(), Vec::new(), Duration::from_secs(5));
    let addr = server.local_addr();
    let (a, took) = ask(addr, &yk.otp(2, 0), &nonce("dl", 10), Some("1"));
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    println!("KSM silent, ceiling 5 s, timeout=1: BACKEND_ERROR after {took:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(1900), "timeout=1: answered after {took:?}");
    // Parameter errors do not wait for anything.
    let t0 = Instant::now();
    assert_eq!(verify(addr, &signed_query(&[("id", "1"), ("otp", &yk.otp(2, 1))], Some(&key))).status(), "MISSING_PARAMETER");
    assert!(t0.elapsed() < Duration::from_millis(500));
    server.shutdown();
}

// ------------------------------------------------------------------ backend failures

/// The module failing (a pulled device) and the module locked: the KSM
/// cannot decide, so the answer is `BACKEND_ERROR` (signed with the
/// client's key), never `BAD_OTP`; the OTP is not spent, and works once
/// the module is back.
#[test]
fn module_faults_and_a_locked_keystore_are_backend_errors() {
    let site = site(1);
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    let ask = |otp: &str, i: usize| verify(addr, &query(1, &key, otp, &nonce("bf", i)));
    assert_eq!(ask(&yk.otp(1, 0), 0).status(), "OK");

    site.hsm.faults().fail_all();
    let a = ask(&yk.otp(1, 1), 1);
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    // Even an OTP that would be a replay: the module cannot tell.
    assert_eq!(ask(&yk.otp(1, 0), 2).status(), "BACKEND_ERROR");
    assert_eq!(get(addr, "/health").status, 503);
    site.hsm.faults().clear();
    assert_eq!(ask(&yk.otp(1, 1), 3).status(), "OK");

    site.hsm.lock().unwrap();
    let a = ask(&yk.otp(1, 2), 4);
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    let health = get(addr, "/health");
    assert_eq!((health.status, health.text()), (503, "not ready: security module locked\n"));
    site.hsm.unlock(&Password::new(PASSWORD).unwrap()).unwrap();
    assert_eq!(ask(&yk.otp(1, 2), 5).status(), "OK");

    let m = metrics(addr);
    assert_eq!(requests_with(&m, "BACKEND_ERROR"), 3.0);
    assert_eq!(requests_with(&m, "BAD_OTP"), 0.0);
    assert_eq!(site.stored(0), Some(Counters::new(1, 2).unwrap()));
    server.shutdown();
}

/// A remote KSM that is down, or that fails (its module faulted), is a
/// `BACKEND_ERROR`; its verdicts (unknown YubiKey) are `BAD_OTP` only when
/// no KSM failed.
#[test]
fn remote_ksm_down_or_failing_is_a_backend_error() {
    let site = site(1);
    let key = site.add_client(1);
    let yk = &site.keys[0];
    // A real `ksm serve` on its own module, over the same AEAD store.
    let ksm_hsm = Arc::new(SoftHsm::open_unlocked(site.hsm.path(), &Password::new(PASSWORD).unwrap()).unwrap());
    let ksm = Ksm::new(ksm_hsm.clone(), Box::new(AeadStore::open(&site.store_path).unwrap()), vec![KH.into()]);
    let ksm_server = ksm::serve::start(Arc::new(ksm), HttpOptions::new("127.0.0.1:0".parse().unwrap())).unwrap();
    let live = format!("http://{}/wsapi/decrypt?otp=", ksm_server.local_addr());
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/wsapi/decrypt?otp=", l.local_addr().unwrap())
    };
    let remote = |urls: &[String]| Arc::new(RemoteKsm::new(urls, Duration::from_secs(2)).unwrap());
    let stranger = YubiKey { id: PublicId::from_number(0xbeef, 6).unwrap(), secrets: YubiKeySecrets::from_plaintext(&[3; 22]).unwrap() };
    let mut i = 0;
    let mut ask = |addr: SocketAddr, otp: &str| {
        i += 1;
        verify(addr, &query(1, &key, otp, &nonce("rk", i)))
    };

    let server = site.serve_over(remote(std::slice::from_ref(&live)), Vec::new(), Duration::from_secs(5));
    let addr = server.local_addr();
    assert_eq!(ask(addr, &yk.otp(1, 0)).status(), "OK");
    assert_eq!(ask(addr, &stranger.otp(1, 0)).status(), "BAD_OTP");
    ksm_hsm.faults().fail_all();
    let a = ask(addr, &yk.otp(1, 1));
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    // The AEAD store alone knows the YubiKey is unknown: still a verdict.
    assert_eq!(ask(addr, &stranger.otp(1, 1)).status(), "BAD_OTP");
    ksm_hsm.faults().clear();
    assert_eq!(ask(addr, &yk.otp(1, 1)).status(), "OK");
    server.shutdown();

    // Nobody listening.
    let server = site.serve_over(remote(std::slice::from_ref(&dead)), Vec::new(), Duration::from_secs(5));
    let addr = server.local_addr();
    let a = ask(addr, &yk.otp(1, 2));
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    server.shutdown();

    // One down, one up: a good OTP passes; "unknown" is not believed.
    let server = site.serve_over(remote(&[dead, live]), Vec::new(), Duration::from_secs(5));
    let addr = server.local_addr();
    assert_eq!(ask(addr, &yk.otp(1, 2)).status(), "OK");
    assert_eq!(ask(addr, &stranger.otp(1, 2)).status(), "BACKEND_ERROR");
    // The KSM gone altogether.
    ksm_server.shutdown();
    assert_eq!(ask(addr, &yk.otp(1, 3)).status(), "BACKEND_ERROR");
    let m = metrics(addr);
    assert_eq!(requests_with(&m, "BAD_OTP"), 0.0);
    server.shutdown();
    assert_eq!(site.stored(0), Some(Counters::new(1, 2).unwrap()));
}

/// The counter database locked by another process's write transaction
/// longer than the busy timeout: `BACKEND_ERROR`, and nothing recorded (the
/// same OTP is accepted once the lock is gone).
#[test]
fn a_locked_counter_database_is_a_backend_error() {
    let site = site_with(1, CounterOptions { busy_timeout: Duration::from_millis(200), ..CounterOptions::default() });
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let yk = &site.keys[0];
    assert_eq!(verify(addr, &query(1, &key, &yk.otp(1, 0), &nonce("db", 0))).status(), "OK");

    let blocker = rusqlite::Connection::open(site.counters.path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let a = verify(addr, &query(1, &key, &yk.otp(1, 1), &nonce("db", 1)));
    assert_eq!(a.status(), "BACKEND_ERROR", "{}", a.body);
    assert!(a.signed_by(&key));
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    let a = verify(addr, &query(1, &key, &yk.otp(1, 1), &nonce("db", 2)));
    assert_eq!(a.status(), "OK", "the OTP refused for a database failure was spent: {}", a.body);
    let m = metrics(addr);
    assert_eq!(metric(&m, "validator_counter_batch_failures_total"), 1.0);
    assert_eq!(requests_with(&m, "BACKEND_ERROR"), 1.0);
    server.shutdown();
}

/// Six requests at once against a server with two blocking threads and a
/// KSM that never answers: two requests take the threads and hang in the
/// KSM, four wait for a thread until their deadline (400 ms). The answers,
/// how long they all took, and the client's key.
fn saturated_pool_answers() -> (Vec<Answer>, Duration, Vec<u8>) {
    let site = site(1);
    let key = site.add_client(1);
    let yk = &site.keys[0];
    let silent = silent_ksm();
    let remote = Arc::new(RemoteKsm::new(std::slice::from_ref(&silent), Duration::from_secs(3)).unwrap());
    let opts = HttpOptions {
        request_timeout: Duration::from_millis(400),
        max_blocking_threads: 2,
        ..HttpOptions::new("127.0.0.1:0".parse().unwrap())
    };
    let server = validator::serve::start(site.parts(remote, Vec::new()), opts).unwrap();
    let addr = server.local_addr();
    let targets = (0..6u8).map(|i| format!("{VERIFY}?{}", query(1, &key, &yk.otp(1, i), &nonce("sat", i.into())))).collect();
    let t0 = Instant::now();
    let replies = fire(addr, targets);
    let took = t0.elapsed();
    server.shutdown();
    (replies.iter().map(Answer::of).collect(), took, key)
}

/// Every blocking thread taken: the requests queued behind them are still
/// answered by the deadline, `BACKEND_ERROR`.
#[test]
fn a_saturated_blocking_pool_still_answers_by_the_deadline() {
    let (answers, took, _) = saturated_pool_answers();
    assert!(took < Duration::from_millis(1500), "answered after {took:?}");
    for a in &answers {
        assert_eq!((a.status(), a.extras()), ("BACKEND_ERROR", Vec::<&str>::new()), "{}", a.body);
    }
}

/// The same, and every answer signed with the client's key: its id
/// resolves, and the README promises the client's key for every answer
/// then. The requests that never got a blocking thread are answered with
/// the empty key (`Response::bare` in `ValidatorService::verify`, because
/// `prepare` had not run), so ykclient reports a bad server signature
/// instead of `BACKEND_ERROR`.
#[test]
fn a_saturated_blocking_pool_answers_are_signed_with_the_client_key() {
    let (answers, _, key) = saturated_pool_answers();
    let unsigned: Vec<&str> = answers.iter().filter(|a| !a.signed_by(&key)).map(|a| a.body.as_str()).collect();
    assert!(unsigned.is_empty(), "{} of 6 BACKEND_ERROR answers not signed with the client's key: {unsigned:?}", unsigned.len());
}

/// yubikey-val reads `$_GET` and falls back to `$_POST` only when the
/// query string is empty (validation-protocol.md §1.1), so a POST whose
/// parameters are in the URL is verified like a GET. Here the query string
/// of a POST is ignored: the empty body is `MISSING_PARAMETER`.
#[test]
fn a_post_with_its_parameters_in_the_url_is_read_like_a_get() {
    let site = site(1);
    let key = site.add_client(1);
    let server = site.serve();
    let addr = server.local_addr();
    let q = query(1, &key, &site.keys[0].otp(1, 0), &nonce("pq", 0));
    let a = Answer::of(&post(addr, &format!("{VERIFY}?{q}"), b""));
    assert_eq!(a.status(), "OK", "{}", a.body);
    server.shutdown();
}
