//! Shared parts of the tests that run replicating sites in-process over
//! real QUIC on loopback (`replication_e2e`, `witness`): WARN capture, the
//! keystore, AEAD store and CA fixture, HTTP helpers and a fault-injecting
//! UDP proxy.
//!
//! Included with `#[path]` by several test binaries; each uses a part.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};
use replication::pki::Ca;
use validator::clients::SqliteClients;
use validator::config::{KsmSource, ReplicationConfig, ServeConfig};
use validator::protocol::{parse_response, signed_query, verify_response};
use validator::serve::HttpOptions;
use validator::{ClientId, ClientKey};

pub const KH: KeyHandle = KeyHandle::new(0x2000);
pub const PASSWORD: &str = "correct horse";
pub const CLIENT: u64 = 11;
pub const YEAR: Duration = Duration::from_secs(365 * 86_400);
/// The private CA's name (a rogue CA may take it too).
pub const CA_NAME: &str = "replication test CA";
/// The HTTP answer ceiling, well above the quorum deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// WARN and ERROR events, captured in-process.

pub fn captured() -> &'static Mutex<Vec<String>> {
    static LOG: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(Vec::new()))
}

/// A minimal subscriber keeping every WARN and ERROR event as one line of
/// `field=value` pairs.
struct Capture;

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line(format!("{} {}: ", event.metadata().level(), event.metadata().target()));
        event.record(&mut line);
        captured().lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

pub fn capture_warnings() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tracing::subscriber::set_global_default(Capture).unwrap());
}

/// The captured lines mentioning `needle`.
pub fn logged_with(needle: &str) -> Vec<String> {
    captured().lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
}

// ---------------------------------------------------------------------------
// Keys and certificates.

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub secrets: YubiKeySecrets,
    pub id: PublicId,
    pub client_key: Vec<u8>,
    pub ca: Ca,
}

/// Keystore, AEAD store with one YubiKey, a private CA with certificates
/// for auth1, auth2 and witness in `pki/`, the API client key.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("v.ks");
    let hsm = SoftHsm::create(&ks, &Password::new(PASSWORD).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[0x47; 32]).unwrap())]).unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let id = PublicId::from_number(0x0c0f_fee0_0001, 6).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
    store.put(&id, &rec, "test", 0).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
    drop(store);
    std::fs::write(dir.path().join("password"), PASSWORD).unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = Ca::generate(CA_NAME, YEAR).unwrap();
    ca.write(&pki).unwrap();
    for name in ["auth1", "auth2", "witness"] {
        ca.issue(name, YEAR).unwrap().write(&pki).unwrap();
    }
    Fixture { dir, secrets, id, client_key: (0..20u8).map(|i| i.wrapping_mul(7) ^ 0x33).collect(), ca }
}

impl Fixture {
    /// An OTP of the fixture's YubiKey.
    pub fn otp(&self, counter: u16, session_use: u8) -> String {
        let t =
            TokenFields { uid: *self.secrets.uid.expose(), counter, session_use, timestamp_low: 0x0101, timestamp_high: 0x02, rnd: 0x7777 }
                .build();
        Otp::new(self.id, t.encrypt(&self.secrets.key)).to_string()
    }

    /// The directory holding the CA and the certificates.
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The settings of site `name`, with its own copies of the keystore and
    /// AEAD store and its own database holding the API client.
    pub fn serve_config(&self, name: &str, replication: Option<ReplicationConfig>) -> ServeConfig {
        let root = self.dir.path();
        let own = root.join(name);
        std::fs::create_dir_all(&own).unwrap();
        let ks = own.join("v.ks");
        std::fs::copy(root.join("v.ks"), &ks).unwrap();
        let store = own.join("aeads.db");
        std::fs::copy(root.join("aeads.db"), &store).unwrap();
        let db = own.join("validator.db");
        let hsm = Arc::new(SoftHsm::open_unlocked(&ks, &Password::new(PASSWORD).unwrap()).unwrap());
        let clients = SqliteClients::open(&db, hsm).unwrap();
        clients.add(Some(ClientId::new(CLIENT).unwrap()), Some(ClientKey::new(self.client_key.clone()))).unwrap();
        drop(clients);
        ServeConfig {
            db,
            synchronous: validator::counters::Synchronous::default(),
            hsm: hsm::config::HsmConfig::soft(&ks, Some(&root.join("password"))),
            ksm: KsmSource::Store { path: store, key_handles: Vec::new() },
            http: http_options(),
            replication,
        }
    }
}

/// HTTP on 127.0.0.1 (any port), answers within [`REQUEST_TIMEOUT`].
pub fn http_options() -> HttpOptions {
    HttpOptions { request_timeout: REQUEST_TIMEOUT, ..HttpOptions::new("127.0.0.1:0".parse().unwrap()) }
}

/// A free UDP port on `ip`, released again.
pub fn free_udp(ip: &str) -> SocketAddr {
    UdpSocket::bind(format!("{ip}:0")).unwrap().local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// HTTP.

/// GET verify at `addr` as the fixture's client: answered 200, the
/// answer's `h` checked with the client key.
pub fn verify(addr: SocketAddr, f: &Fixture, otp: &str, nonce: &str) -> BTreeMap<String, String> {
    let q = signed_query(&[("id", &CLIENT.to_string()), ("otp", otp), ("nonce", nonce)], Some(&f.client_key));
    let (code, body) = http_get(addr, &format!("/wsapi/2.0/verify?{q}"));
    assert_eq!(code, 200, "{body}");
    assert!(verify_response(&body, &f.client_key), "bad h in {body:?}");
    parse_response(&body).unwrap()
}

/// GET verify at `addr` as API client `client`; the answer's `h` is
/// checked with `key` unless the client is unknown there (unsigned).
pub fn verify_as(addr: SocketAddr, client: u64, key: &[u8], otp: &str, nonce: &str) -> BTreeMap<String, String> {
    let q = signed_query(&[("id", &client.to_string()), ("otp", otp), ("nonce", nonce)], Some(key));
    let (_, body) = http_get(addr, &format!("/wsapi/2.0/verify?{q}"));
    let fields = parse_response(&body).unwrap();
    if status(&fields) != "NO_SUCH_CLIENT" {
        assert!(verify_response(&body, key), "bad h in {body:?}");
    }
    fields
}

/// HTTP status code and body.
pub fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: validator\r\nConnection: close\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.replace("\r\n", "\n"))
}

pub fn status(fields: &BTreeMap<String, String>) -> &str {
    fields.get("status").map(String::as_str).unwrap_or("")
}

/// The value of the Prometheus series `series` (name and labels, exact).
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics");
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' '))).map(|v| v.trim().parse().unwrap())
}

/// A nonce unique to this process.
pub fn nonce(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}{:08}x{:06}", NEXT.fetch_add(1, Ordering::Relaxed), std::process::id() % 1_000_000)
}

/// Fresh OTPs (counter `*counter`, then the next ones) at `addr` until one
/// is answered OK, within `within`. Returns that OTP and the statuses seen
/// before it.
pub fn login_until_ok(addr: SocketAddr, f: &Fixture, counter: &mut u16, within: Duration) -> (String, Vec<String>) {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let otp = f.otp(*counter, 0);
        *counter += 1;
        let r = verify(addr, f, &otp, &nonce("retry"));
        match status(&r) {
            "OK" => return (otp, seen),
            s @ "NOT_ENOUGH_ANSWERS" => seen.push(s.to_owned()),
            other => panic!("unexpected answer {other} while waiting for OK: {r:?} (before: {seen:?})"),
        }
        assert!(start.elapsed() < within, "no OK within {within:?}: {seen:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// The fault-injecting UDP proxy.

/// What a link's proxies do to datagrams, switchable while they run.
#[derive(Default)]
pub struct Faults {
    /// Drop everything, both ways.
    pub partition: AtomicBool,
    /// Hold every datagram this long before relaying it.
    pub delay_ms: AtomicU64,
    /// Drop this many datagrams in 1000 (pseudo-random).
    pub loss_per_mille: AtomicU32,
    pub relayed: AtomicU64,
    pub dropped: AtomicU64,
}

impl Faults {
    /// Cuts the link (drops everything, both ways), or heals it.
    pub fn set_partition(&self, on: bool) {
        self.partition.store(on, Ordering::Relaxed);
    }

    /// Whether to drop the next datagram; otherwise sleeps for the delay.
    fn drop_next(&self, rng: &mut u64) -> bool {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let loss = u64::from(self.loss_per_mille.load(Ordering::Relaxed));
        if self.partition.load(Ordering::Relaxed) || *rng % 1000 < loss {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.relayed.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Relays datagrams sent to `listen` on to `target`, and the answers back;
/// one upstream socket per client address.
pub struct UdpProxy {
    pub listen: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl UdpProxy {
    /// A proxy listening on `ip` (any port), its datagrams subject to `faults`.
    pub fn start(ip: &str, target: SocketAddr, faults: Arc<Faults>) -> Self {
        let socket = UdpSocket::bind(format!("{ip}:0")).unwrap();
        socket.set_read_timeout(Some(POLL)).unwrap();
        let listen = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (faults, stop.clone());
        let ip = ip.to_owned();
        let thread = std::thread::spawn(move || {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut children = Vec::new();
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(listen.port());
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                let up = upstreams.entry(from).or_insert_with(|| {
                    let up = UdpSocket::bind(format!("{ip}:0")).unwrap();
                    up.connect(target).unwrap();
                    up.set_read_timeout(Some(POLL)).unwrap();
                    let up = Arc::new(up);
                    let (back, up2, f2, s2) = (socket.try_clone().unwrap(), up.clone(), f.clone(), s.clone());
                    children.push(std::thread::spawn(move || {
                        let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(from.port());
                        let mut buf = vec![0u8; 65_536];
                        while !s2.load(Ordering::Relaxed) {
                            let Ok(n) = up2.recv(&mut buf) else { continue };
                            if !f2.drop_next(&mut rng) {
                                let _ = back.send_to(&buf[..n], from);
                            }
                        }
                    }));
                    up
                });
                if !f.drop_next(&mut rng) {
                    let _ = up.send(&buf[..n]);
                }
            }
            for c in children {
                c.join().unwrap();
            }
        });
        Self { listen, stop, thread: Some(thread) }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
