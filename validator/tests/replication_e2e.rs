//! Two `validator serve` sites in one process, replicating counters over
//! real QUIC on loopback, driven end to end (issue 5, "Real QUIC on
//! loopback"):
//!
//! - the same request at both sites, a replay at the other site, a dead
//!   peer failing closed within the quorum deadline;
//! - pam_yubico through `pamtester` with a `urllist` naming both sites;
//! - a fault-injecting UDP proxy (partition, delay, loss) between the two
//!   QUIC endpoints, written here;
//! - a peer presenting a certificate from another CA, or one from the right
//!   CA that does not match the configured pin.
//!
//! Each site is built by `serve::assemble` from a `ServeConfig` with a
//! `[replication]` section, over its own copies of one soft keystore and
//! AEAD store and its own database holding the same API client.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/pam.rs"]
mod pam;
#[path = "oracles/replicated.rs"]
mod replicated;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hsm::soft::SoftHsm;
use hsm::{NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use otp::token::TokenFields;
use otp::{Otp, PublicId, YubiKeySecrets};
use pam::{require_pam_yubico, require_root, PamService};
use replicated::{
    capture_warnings, captured, fixture, free_udp, http_get, logged_with, metric, nonce, status, verify, verify_as, Faults, Fixture,
    UdpProxy, CA_NAME, CLIENT, KH, PASSWORD, REQUEST_TIMEOUT, YEAR,
};
use replication::pki::Ca;
use validator::clients::SqliteClients;
use validator::config::{PeerSection, ReplicationConfig, ServeConfig};
use validator::serve::Running;
use validator::ClientId;

/// Both sites' quorum deadline: generous, for a loaded machine.
const QUORUM_DEADLINE: Duration = Duration::from_millis(2000);
/// How long a "recovers eventually" loop may take.
const RECOVERY: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Two sites.

/// How one site is set up.
struct SiteSpec<'a> {
    name: &'a str,
    site: u16,
    quic: SocketAddr,
    /// Directory holding `<name>.pem` and `<name>.key`.
    cert_dir: PathBuf,
    peer: (&'a str, u16, SocketAddr),
    peer_pin: Option<String>,
}

impl Fixture {
    fn config(&self, spec: &SiteSpec<'_>) -> ServeConfig {
        let replication = ReplicationConfig {
            site: spec.site,
            listen: spec.quic,
            certificate: spec.cert_dir.join(format!("{}.pem", spec.name)),
            key: spec.cert_dir.join(format!("{}.key", spec.name)),
            ca: self.pki().join("ca.pem"),
            deadline: QUORUM_DEADLINE,
            peers: vec![PeerSection {
                name: spec.peer.0.to_owned(),
                site: spec.peer.1,
                addr: spec.peer.2,
                fingerprint: spec.peer_pin.clone(),
            }],
            witness: None,
        };
        self.serve_config(spec.name, Some(replication))
    }

    fn start(&self, spec: &SiteSpec<'_>) -> Running {
        let config = self.config(spec);
        let parts = validator::serve::assemble(&config).unwrap();
        validator::serve::start(parts, config.http.clone()).unwrap()
    }

    /// A (auth1) and B (auth2) with their QUIC endpoints on `qa` and `qb`;
    /// A dials B at `a_dials`, B dials A at `b_dials`.
    fn two_sites(&self, qa: SocketAddr, qb: SocketAddr, a_dials: SocketAddr, b_dials: SocketAddr) -> (Running, Running) {
        let a =
            self.start(&SiteSpec { name: "auth1", site: 1, quic: qa, cert_dir: self.pki(), peer: ("auth2", 2, a_dials), peer_pin: None });
        let b =
            self.start(&SiteSpec { name: "auth2", site: 2, quic: qb, cert_dir: self.pki(), peer: ("auth1", 1, b_dials), peer_pin: None });
        (a, b)
    }
}

/// Fresh OTPs (counter `*counter`, then the next ones) at `addr` until one
/// is answered OK, within [`RECOVERY`]. Returns that OTP and the statuses
/// seen before it.
fn login_until_ok(addr: SocketAddr, f: &Fixture, counter: &mut u16) -> (String, Vec<String>) {
    replicated::login_until_ok(addr, f, counter, RECOVERY)
}

// ---------------------------------------------------------------------------
// pam_yubico.

fn url(site: &Running) -> String {
    format!("http://{}/wsapi/2.0/verify", site.local_addr())
}

/// pam_yubico with `urllist` naming both sites: a fresh OTP logs alice in,
/// the same OTP again fails, and an OTP accepted through A alone fails
/// through a service that asks B alone.
#[test]
fn pam_yubico_with_both_sites_in_urllist_logs_in_once_per_otp() {
    require_root();
    require_pam_yubico();
    let f = fixture();
    let (qa, qb) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    let (a, b) = f.two_sites(qa, qb, qb, qa);
    let authfile = f.dir.path().join("authfile");
    std::fs::write(&authfile, format!("alice:{}\n", f.id)).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(&f.client_key);
    let both = PamService::new(f.dir.path(), CLIENT, &key, &[url(&a), url(&b)], &authfile);
    let only_a = PamService::new(f.dir.path(), CLIENT, &key, &[url(&a)], &authfile);
    let only_b = PamService::new(f.dir.path(), CLIENT, &key, &[url(&b)], &authfile);

    let fresh = f.otp(1, 0);
    let (code, out) = both.login("alice", &fresh).outcome();
    assert_eq!(code, Some(0), "fresh OTP through both sites:\n{out}");
    assert!(out.contains("successfully authenticated"), "{out}");

    let (code, out) = both.login("alice", &fresh).outcome();
    assert_eq!(code, Some(1), "the same OTP again:\n{out}");
    assert!(out.contains("REPLAYED_OTP"), "{out}");

    let next = f.otp(2, 0);
    let (code, out) = only_a.login("alice", &next).outcome();
    assert_eq!(code, Some(0), "a new OTP through A:\n{out}");
    let (code, out) = only_b.login("alice", &next).outcome();
    assert_eq!(code, Some(1), "A's OTP replayed through B:\n{out}");
    assert!(out.contains("REPLAYED_OTP"), "{out}");

    // The key's next press still logs in through B alone.
    let (code, out) = only_b.login("alice", &f.otp(2, 1)).outcome();
    assert_eq!(code, Some(0), "a new OTP through B:\n{out}");

    drop((both, only_a, only_b));
    a.shutdown();
    b.shutdown();
}

// ---------------------------------------------------------------------------
// Partition, delay and loss through the proxy.

/// Sites A and B talking only through two proxies on 127.0.0.3 that share
/// one set of faults (each site dials the other at one of its ports); the
/// proxies are returned to be kept running.
fn proxied_sites(f: &Fixture) -> (Running, Running, Arc<Faults>, [UdpProxy; 2]) {
    let (qa, qb) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    let faults = Arc::new(Faults::default());
    let to_b = UdpProxy::start("127.0.0.3", qb, faults.clone());
    let to_a = UdpProxy::start("127.0.0.3", qa, faults.clone());
    let (a, b) = f.two_sites(qa, qb, to_b.listen, to_a.listen);
    (a, b, faults, [to_a, to_b])
}

/// A and B talk only through the proxy (each dials the other at one of its
/// ports). Partitioned, A answers a signed NOT_ENOUGH_ANSWERS by its
/// deadline; healed, logins at A succeed again and are replays at B; with
/// delay and loss, logins still get through and stay replay-safe.
#[test]
fn partition_through_the_proxy_fails_closed_and_heals() {
    let f = fixture();
    let (a, b, faults, proxies) = proxied_sites(&f);
    let (aa, ba) = (a.local_addr(), b.local_addr());
    let mut counter = 1;

    // Both up: one login at A, replayed at B.
    let (otp, _) = login_until_ok(aa, &f, &mut counter);
    assert_eq!(status(&verify(ba, &f, &otp, &nonce("replay"))), "REPLAYED_OTP");
    assert!(faults.relayed.load(Ordering::Relaxed) > 0, "nothing went through the proxy");

    // Partition.
    faults.partition.store(true, Ordering::Relaxed);
    let before = metric(aa, "validator_replication_verdicts_total{verdict=\"not_enough_answers\"}").unwrap();
    let cut = f.otp(counter, 0);
    counter += 1;
    let n = nonce("partition");
    let asked = Instant::now();
    let r = verify(aa, &f, &cut, &n);
    let took = asked.elapsed();
    assert_eq!(status(&r), "NOT_ENOUGH_ANSWERS", "{r:?}");
    assert_eq!(r.get("otp"), Some(&cut));
    assert_eq!(r.get("nonce"), Some(&n));
    assert!(took < REQUEST_TIMEOUT, "answered after {took:?}, not by the quorum deadline");
    let after = metric(aa, "validator_replication_verdicts_total{verdict=\"not_enough_answers\"}").unwrap();
    assert!(after > before, "not_enough_answers {before} -> {after}");
    assert!(faults.dropped.load(Ordering::Relaxed) > 0, "the proxy dropped nothing");
    assert_eq!(metric(aa, "validator_replication_peer_up{peer=\"auth2\",site=\"2\"}"), Some(0.0));
    // The refused OTP is burned at A.
    assert_eq!(status(&verify(aa, &f, &cut, &nonce("again"))), "REPLAYED_OTP");

    // Heal: A recovers (its connection may need a moment).
    faults.partition.store(false, Ordering::Relaxed);
    let (healed, refused) = login_until_ok(aa, &f, &mut counter);
    eprintln!("after healing, {} refusals before the first OK", refused.len());
    assert_eq!(status(&verify(ba, &f, &healed, &nonce("afterheal"))), "REPLAYED_OTP");
    // And the other way round: an OTP accepted at B is a replay at A.
    let (at_b, _) = login_until_ok(ba, &f, &mut counter);
    assert_eq!(status(&verify(aa, &f, &at_b, &nonce("afterheal"))), "REPLAYED_OTP");

    assert_eq!(metric(aa, "validator_replication_peer_up{peer=\"auth2\",site=\"2\"}"), Some(1.0));

    // A partition longer than the QUIC idle timeout (10 s): the connection
    // dies, every answer meanwhile is NOT_ENOUGH_ANSWERS, and after healing
    // A reconnects.
    faults.partition.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(13) {
        let otp = f.otp(counter, 0);
        counter += 1;
        assert_eq!(status(&verify(aa, &f, &otp, &nonce("longcut"))), "NOT_ENOUGH_ANSWERS");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(metric(aa, "validator_replication_peer_up{peer=\"auth2\",site=\"2\"}"), Some(0.0));
    faults.partition.store(false, Ordering::Relaxed);
    let (reconnected, refused) = login_until_ok(aa, &f, &mut counter);
    eprintln!("after the long partition, {} refusals before the first OK", refused.len());
    assert_eq!(status(&verify(ba, &f, &reconnected, &nonce("reconnected"))), "REPLAYED_OTP");

    // Delay and some loss: logins still get through, still replay-safe.
    faults.delay_ms.store(5, Ordering::Relaxed);
    faults.loss_per_mille.store(50, Ordering::Relaxed);
    for _ in 0..3 {
        let (lossy, _) = login_until_ok(aa, &f, &mut counter);
        assert_eq!(status(&verify(ba, &f, &lossy, &nonce("lossy"))), "REPLAYED_OTP");
    }

    a.shutdown();
    b.shutdown();
    drop(proxies);
}

/// An OTP of the YubiKey with `secrets`.
fn otp_of(id: PublicId, secrets: &YubiKeySecrets, counter: u16) -> String {
    let t = TokenFields { uid: *secrets.uid.expose(), counter, session_use: 0, timestamp_low: 0x0202, timestamp_high: 0x03, rnd: 0x1234 }
        .build();
    Otp::new(id, t.encrypt(&secrets.key)).to_string()
}

/// Polls `done` every 100 ms until it holds, within [`RECOVERY`].
fn eventually(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < RECOVERY, "{what}: not within {RECOVERY:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn after_a_partition_counters_aeads_and_clients_converge() {
    let f = fixture();
    let (a, b, faults, proxies) = proxied_sites(&f);
    let (aa, ba) = (a.local_addr(), b.local_addr());
    let site = |name: &str, file: &str| f.dir.path().join(name).join(file);
    let hsm_a = Arc::new(SoftHsm::open_unlocked(&site("auth1", "v.ks"), &Password::new(PASSWORD).unwrap()).unwrap());
    let clients_a = SqliteClients::open(&site("auth1", "validator.db"), hsm_a.clone()).unwrap();
    let (store_a, store_b) =
        (AeadStore::open_existing(&site("auth1", "aeads.db")).unwrap(), AeadStore::open_existing(&site("auth2", "aeads.db")).unwrap());
    let mut counter = 1;
    let (_, _) = login_until_ok(aa, &f, &mut counter);

    // Before the partition: client 78 made at A reaches B and works there.
    let key78 = clients_a.add(Some(ClientId::new(78).unwrap()), None).unwrap().1;
    let probe = f.otp(counter, 0);
    counter += 1;
    eventually("client 78 at B", || status(&verify_as(ba, 78, key78.expose(), &probe, &nonce("probe78"))) != "NO_SUCH_CLIENT");

    faults.partition.store(true, Ordering::Relaxed);
    // During the partition, at A: an OTP refused for want of B (its
    // counters burned at A only), a new YubiKey's AEAD, client 77 created,
    // client 78 disabled; and one public id provisioned at both sites with
    // different bytes (a key provisioned twice).
    let burned = f.otp(counter, 0);
    counter += 1;
    assert_eq!(status(&verify(aa, &f, &burned, &nonce("cut"))), "NOT_ENOUGH_ANSWERS");
    let fresh_id = PublicId::from_number(0x0c0f_fee0_0077, 6).unwrap();
    let rec = hsm_a.generate_yubikey_aeads(&[KH], NonceSource::Given(fresh_id.aead_nonce().unwrap())).unwrap().remove(0);
    let fresh = YubiKeySecrets::from_plaintext(&hsm_a.decrypt_aead(&rec).unwrap()).unwrap();
    store_a.put(&fresh_id, &rec, "ksm import", 0).unwrap();
    let key77 = clients_a.add(Some(ClientId::new(77).unwrap()), None).unwrap().1;
    clients_a.disable(ClientId::new(78).unwrap()).unwrap();
    let twice = PublicId::from_number(0x0c0f_fee0_0099, 6).unwrap();
    let twice_a = hsm_a.generate_yubikey_aeads(&[KH], NonceSource::Random).unwrap().remove(0);
    let twice_b = hsm_a.generate_yubikey_aeads(&[KH], NonceSource::Random).unwrap().remove(0);
    store_a.put(&twice, &twice_a, "ksm import", 0).unwrap();
    store_b.put(&twice, &twice_b, "ksm import", 0).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(store_b.get(&fresh_id, KH).unwrap().is_none(), "the AEAD crossed the partition");
    assert_eq!(status(&verify_as(ba, 77, key77.expose(), &otp_of(fresh_id, &fresh, 1), &nonce("early"))), "NO_SUCH_CLIENT");
    let counters_b = validator::counters::SqliteCounters::open(&site("auth2", "validator.db")).unwrap();
    let burned_at =
        validator::counters::SqliteCounters::open(&site("auth1", "validator.db")).unwrap().get(&f.id).unwrap().unwrap().counters;
    assert!(counters_b.get(&f.id).unwrap().unwrap().counters < burned_at);

    // Heal: everything reaches B without any login.
    faults.partition.store(false, Ordering::Relaxed);
    let took = eventually("AEAD, client and counters at B", || {
        store_b.get(&fresh_id, KH).unwrap().is_some()
            && counters_b.get(&f.id).unwrap().unwrap().counters >= burned_at
            && !store_b.conflicts().unwrap().is_empty()
    });
    eprintln!("converged {took:?} after healing");
    // The new YubiKey logs in at B as the new client, and is then a replay at A.
    let first = otp_of(fresh_id, &fresh, 1);
    let mut answer = BTreeMap::new();
    eventually("client 77 accepted at B", || {
        answer = verify_as(ba, 77, key77.expose(), &first, &nonce("new77"));
        status(&answer) != "NO_SUCH_CLIENT"
    });
    assert_eq!(status(&answer), "OK", "{answer:?}");
    assert_eq!(status(&verify(aa, &f, &first, &nonce("replay77"))), "REPLAYED_OTP");
    // The OTP burned at A alone is refused at B too.
    assert_eq!(status(&verify(ba, &f, &burned, &nonce("burned"))), "REPLAYED_OTP");
    // Client 78 is disabled at B.
    eventually("client 78 disabled at B", || {
        status(&verify_as(ba, 78, key78.expose(), &f.otp(counter, 0), &nonce("gone78"))) == "NO_SUCH_CLIENT"
    });
    // The doubly provisioned id: each site kept its own, and quarantined the other's.
    assert_eq!(store_a.get(&twice, KH).unwrap(), Some(twice_a));
    assert_eq!(store_b.get(&twice, KH).unwrap(), Some(twice_b));
    eventually("the conflict quarantined at A", || store_a.conflicts().unwrap().iter().any(|c| c.public_id == twice));
    assert!(store_b.conflicts().unwrap().iter().any(|c| c.public_id == twice && c.refused == twice_a));
    eventually("the conflict counted at A", || {
        metric(aa, "validator_replication_sync_conflicts_total{peer=\"auth2\",dataset=\"aeads\"}").unwrap_or(0.0) >= 1.0
    });
    let (_, status_page) = http_get(aa, "/status");
    for dataset in ["counters", "aeads", "clients"] {
        assert!(status_page.contains(&format!("sync: peer=auth2 dataset={dataset} ")), "{status_page}");
    }

    a.shutdown();
    b.shutdown();
    drop(proxies);
}

// ---------------------------------------------------------------------------
// Untrusted peers.

/// Sites A (pinning `pin` for auth2, if given) and B presenting the
/// certificate in `b_certs`; A's answers must fail closed, and A must have
/// logged the refusal of B's certificate `b_fingerprint`.
fn refused_peer(f: &Fixture, b_certs: PathBuf, pin: Option<String>, b_fingerprint: &str) {
    capture_warnings();
    let (qa, qb) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    let a = f.start(&SiteSpec { name: "auth1", site: 1, quic: qa, cert_dir: f.pki(), peer: ("auth2", 2, qb), peer_pin: pin });
    let b = f.start(&SiteSpec { name: "auth2", site: 2, quic: qb, cert_dir: b_certs, peer: ("auth1", 1, qa), peer_pin: None });
    let aa = a.local_addr();
    for counter in 1..=3 {
        let otp = f.otp(counter, 0);
        let r = verify(aa, f, &otp, &nonce("refused"));
        assert_eq!(status(&r), "NOT_ENOUGH_ANSWERS", "counter {counter}: {r:?}");
        assert_eq!(r.get("otp"), Some(&otp));
    }
    assert_eq!(metric(aa, "validator_replication_verdicts_total{verdict=\"accepted\"}"), Some(0.0));
    assert_eq!(metric(aa, "validator_replication_verdicts_total{verdict=\"not_enough_answers\"}"), Some(3.0));
    assert!(metric(aa, "validator_replication_rpc_failures_total").unwrap() >= 1.0);
    assert!(metric(aa, "validator_replication_connections_total{outcome=\"refused\"}").unwrap() >= 1.0, "refusal not counted");
    assert_eq!(metric(aa, "validator_replication_peer_up{peer=\"auth2\",site=\"2\"}"), Some(0.0));
    let refusals: Vec<String> = logged_with(b_fingerprint).into_iter().filter(|l| l.contains("refused")).collect();
    eprintln!("refusals of {b_fingerprint} logged: {refusals:#?}");
    assert!(!refusals.is_empty(), "no refusal of {b_fingerprint} logged; captured:\n{:#?}", captured().lock().unwrap());
    a.shutdown();
    b.shutdown();
}

/// B's certificate comes from another CA (with the right name): refused.
#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let f = fixture();
    let other = f.dir.path().join("other-pki");
    std::fs::create_dir(&other).unwrap();
    let rogue_ca = Ca::generate(CA_NAME, YEAR).unwrap();
    let rogue = rogue_ca.issue("auth2", YEAR).unwrap();
    rogue.write(&other).unwrap();
    refused_peer(&f, other, None, &rogue.fingerprint().to_string());
}

/// B's certificate comes from the right CA with the right name, but A pins
/// another certificate's fingerprint for auth2: refused.
#[test]
fn a_peer_not_matching_its_pinned_fingerprint_is_refused() {
    let f = fixture();
    let pinned = f.ca.issue("auth2", YEAR).unwrap();
    let presented = replication::pki::Identity::load(&f.pki().join("auth2.pem"), &f.pki().join("auth2.key")).unwrap();
    assert_ne!(pinned.fingerprint(), presented.fingerprint());
    refused_peer(&f, f.pki(), Some(pinned.fingerprint().to_string()), &presented.fingerprint().to_string());
}

// ---------------------------------------------------------------------------
// Sites dialling each other directly.

/// Sites A (auth1, 127.0.0.1) and B (auth2, 127.0.0.2), started.
fn direct(f: &Fixture) -> (Running, Running) {
    let (qa, qb) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    f.two_sites(qa, qb, qb, qa)
}

#[test]
fn same_otp_and_nonce_at_both_sites_at_once_is_ok_and_never_a_replayed_otp() {
    let f = fixture();
    let (a, b) = direct(&f);
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
                assert_eq!(metric(http, "validator_replication_verdicts_total{verdict=\"accepted\"}"), Some(1.0), "site {site}");
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
    let (a, b) = direct(&f);
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
    let (a, b) = direct(&f);
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
    assert_eq!(metric(a.local_addr(), "validator_replication_verdicts_total{verdict=\"not_enough_answers\"}"), Some(1.0));
    a.shutdown();
}
