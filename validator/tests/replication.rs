//! Two `validator serve` sites in one process, replicating counters over
//! real QUIC on loopback (127.0.0.1 and 127.0.0.2): each built by
//! `serve::assemble` from a `ServeConfig` with a `[replication]` section,
//! over its own SQLite database, a copy of the same soft keystore and AEAD
//! store, the same API client (id and key) in both databases, and
//! certificates from a private CA written to a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};
use replication::pki::Ca;
use validator::clients::SqliteClients;
use validator::config::{KsmSource, PeerSection, ReplicationConfig, ServeConfig};
use validator::protocol::{parse_response, signed_query, verify_response};
use validator::serve::{HttpOptions, Running};
use validator::ClientId;

const KH: KeyHandle = KeyHandle::new(0x2000);
const PASSWORD: &str = "correct horse";
const CLIENT: u64 = 7;
const YEAR: Duration = Duration::from_secs(365 * 86_400);
/// The quorum deadline of both sites: generous, for a loaded machine.
const QUORUM_DEADLINE: Duration = Duration::from_millis(1500);
/// The HTTP answer ceiling: longer than the quorum deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Fixture {
    dir: tempfile::TempDir,
    secrets: YubiKeySecrets,
    id: PublicId,
    client_key: Vec<u8>,
}

/// The keystore, the AEAD store with one YubiKey, the PKI and the API
/// client key, in a temp dir; each site gets copies.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("v.ks");
    let hsm = SoftHsm::create(&ks, &Password::new(PASSWORD).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[0x3c; 32]).unwrap())]).unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let id = PublicId::from_number(0x1001, 6).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
    store.put(&id, &rec, "test", 0).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
    drop(store);
    std::fs::write(dir.path().join("password"), PASSWORD).unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = Ca::generate("replication test CA", YEAR).unwrap();
    ca.write(&pki).unwrap();
    for name in ["auth1", "auth2"] {
        ca.issue(name, YEAR).unwrap().write(&pki).unwrap();
    }
    let client_key = vec![0x5a; 20];
    Fixture { dir, secrets, id, client_key }
}

impl Fixture {
    fn otp(&self, counter: u16, session_use: u8) -> String {
        let t =
            TokenFields { uid: *self.secrets.uid.expose(), counter, session_use, timestamp_low: 0x1234, timestamp_high: 0x56, rnd: 0x4242 }
                .build();
        Otp::new(self.id, t.encrypt(&self.secrets.key)).to_string()
    }

    /// Site `name`'s config: its own copies of the keystore and AEAD store,
    /// its database with the API client, replication to `peer`.
    fn site_config(&self, name: &str, site: u16, quic: SocketAddr, peer: (&str, u16, SocketAddr)) -> ServeConfig {
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
        clients.add(Some(ClientId::new(CLIENT).unwrap()), Some(validator::ClientKey::new(self.client_key.clone()))).unwrap();
        drop(clients);
        let pki = root.join("pki");
        let replication = ReplicationConfig {
            site,
            listen: quic,
            certificate: pki.join(format!("{name}.pem")),
            key: pki.join(format!("{name}.key")),
            ca: pki.join("ca.pem"),
            deadline: QUORUM_DEADLINE,
            peers: vec![PeerSection { name: peer.0.to_owned(), site: peer.1, addr: peer.2, fingerprint: None }],
            witness: None,
        };
        ServeConfig {
            db,
            synchronous: validator::counters::Synchronous::default(),
            keystore: ks,
            password_file: Some(root.join("password")),
            ksm: KsmSource::Store { path: store, key_handles: Vec::new() },
            http: HttpOptions { request_timeout: REQUEST_TIMEOUT, ..HttpOptions::new("127.0.0.1:0".parse().unwrap()) },
            replication: Some(replication),
        }
    }
}

/// A free UDP port on `ip`, with nothing bound to it any more.
fn free_udp(ip: &str) -> SocketAddr {
    std::net::UdpSocket::bind(format!("{ip}:0")).unwrap().local_addr().unwrap()
}

fn start(config: &ServeConfig) -> Running {
    let parts = validator::serve::assemble(config).unwrap();
    validator::serve::start(parts, config.http.clone()).unwrap()
}

/// Sites A (auth1, 127.0.0.1) and B (auth2, 127.0.0.2), started.
fn two_sites(f: &Fixture) -> (Running, Running) {
    let (qa, qb) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    let a = f.site_config("auth1", 1, qa, ("auth2", 2, qb));
    let b = f.site_config("auth2", 2, qb, ("auth1", 1, qa));
    (start(&a), start(&b))
}

/// GET verify at `addr`; the answer's fields, after checking its `h`
/// against the client key.
fn verify(addr: SocketAddr, f: &Fixture, otp: &str, nonce: &str) -> BTreeMap<String, String> {
    let q = signed_query(&[("id", &CLIENT.to_string()), ("otp", otp), ("nonce", nonce)], Some(&f.client_key));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /wsapi/2.0/verify?{q} HTTP/1.1\r\nHost: validator\r\nConnection: close\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let body = body.replace("\r\n", "\n");
    assert!(verify_response(&body, &f.client_key), "bad h in {body:?}");
    parse_response(&body).unwrap()
}

fn status(fields: &BTreeMap<String, String>) -> &str {
    fields.get("status").map(String::as_str).unwrap_or("")
}

fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: validator\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn same_otp_and_nonce_at_both_sites_at_once_is_ok_and_never_a_replayed_otp() {
    let f = fixture();
    let (a, b) = two_sites(&f);
    let (aa, ba) = (a.local_addr(), b.local_addr());
    let otp = f.otp(1, 0);
    let nonce = "samenonceatbothsites0001";
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| verify(aa, &f, &otp, nonce));
        let tb = s.spawn(|| verify(ba, &f, &otp, nonce));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    // The model's promise (replication/tests/quorum_model.rs): the peer
    // rule treats equal counters with the same nonce and OTP as the same
    // request, so both sites answer OK, unless one site's peer
    // compare-and-set lands before that site's own request, which its
    // local store then answers REPLAYED_REQUEST (pam_yubico takes the other
    // site's OK). Never REPLAYED_OTP, never two refusals.
    let answers = [("A", &ra, aa), ("B", &rb, ba)];
    assert!(answers.iter().any(|(_, r, _)| status(r) == "OK"), "no OK: A {ra:?}, B {rb:?}");
    for (site, r, http) in answers {
        match status(r) {
            "OK" => {
                assert_eq!(r.get("sl").map(String::as_str), Some("100"), "site {site}: {r:?}");
                let m = metrics(http);
                assert!(m.contains("validator_replication_verdicts_total{verdict=\"accepted\"} 1"), "site {site}: {m}");
                assert!(m.contains("validator_replication_peer_up{peer="), "site {site}: {m}");
            }
            "REPLAYED_REQUEST" => {}
            other => panic!("site {site} answered {other}: A {ra:?}, B {rb:?}"),
        }
        assert_eq!(r.get("otp"), Some(&otp), "site {site}");
        assert_eq!(r.get("nonce").map(String::as_str), Some(nonce), "site {site}");
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn an_otp_answered_ok_at_a_is_a_replayed_otp_at_b() {
    let f = fixture();
    let (a, b) = two_sites(&f);
    let otp = f.otp(2, 0);
    let first = verify(a.local_addr(), &f, &otp, "firstnonceatsitea0000001");
    assert_eq!(status(&first), "OK", "{first:?}");
    // B holds the counters durably (A answered OK only after B's fsync):
    // the same request at B is REPLAYED_REQUEST, another nonce REPLAYED_OTP.
    let same = verify(b.local_addr(), &f, &otp, "firstnonceatsitea0000001");
    assert_eq!(status(&same), "REPLAYED_REQUEST", "{same:?}");
    let again = verify(b.local_addr(), &f, &otp, "secondnonceatsiteb000001");
    assert_eq!(status(&again), "REPLAYED_OTP", "{again:?}");
    // A later OTP of the same key still works at B, and is then replayed at A.
    let next = f.otp(3, 0);
    assert_eq!(status(&verify(b.local_addr(), &f, &next, "thirdnonceatsiteb0000001")), "OK");
    assert_eq!(status(&verify(a.local_addr(), &f, &next, "fourthnonceatsitea000001")), "REPLAYED_OTP");
    a.shutdown();
    b.shutdown();
}

#[test]
fn with_site_b_down_site_a_fails_closed_within_its_deadline() {
    let f = fixture();
    let (a, b) = two_sites(&f);
    // Both up first: one login through A.
    assert_eq!(status(&verify(a.local_addr(), &f, &f.otp(4, 0), "upfirstnonce000000000001")), "OK");
    b.shutdown();
    let otp = f.otp(5, 0);
    let asked = Instant::now();
    let r = verify(a.local_addr(), &f, &otp, "bdownnonce00000000000001");
    let took = asked.elapsed();
    assert_eq!(status(&r), "NOT_ENOUGH_ANSWERS", "{r:?}");
    assert_eq!(r.get("otp"), Some(&otp));
    assert_eq!(r.get("nonce").map(String::as_str), Some("bdownnonce00000000000001"));
    assert!(r.contains_key("sl"), "{r:?}");
    // Answered by the quorum deadline, not the HTTP ceiling (generous slack).
    assert!(took < REQUEST_TIMEOUT, "took {took:?}");
    // The OTP is burned at A all the same: replaying it is refused.
    assert_eq!(status(&verify(a.local_addr(), &f, &otp, "bdownnonce00000000000002")), "REPLAYED_OTP");
    let m = metrics(a.local_addr());
    assert!(m.contains("validator_replication_verdicts_total{verdict=\"not_enough_answers\"} 1"), "{m}");
    a.shutdown();
}
