//! Two sites and a counters-only witness over real QUIC on loopback
//! (127.0.0.1, .2, .3), every link through a fault-injecting UDP proxy so
//! that one link can be cut alone:
//!
//! - all up, the A–B link cut, the witness down, A cut from everyone;
//! - an accept-at-risk window that opens and closes;
//! - `validator status` (the real binary) against a running witness (the
//!   real binary too) and in-process sites, and its exit codes;
//! - configurations refused, with their messages.
//!
//! Sites A (auth1) and B (auth2) and the witness W are built by
//! `serve::assemble_node` from their configurations, as `validator serve`
//! builds them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/replicated.rs"]
mod replicated;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use replicated::{
    capture_warnings, captured, fixture, free_udp, http_get, http_options, logged_with, metric, nonce, status, verify, Faults, Fixture,
    UdpProxy, CLIENT,
};
use validator::config::{ConfigFile, NodeConfig, PeerSection, ReplicationConfig, SiteConfig, WitnessConfig};
use validator::serve::Running;

/// Every node's quorum deadline.
const QUORUM_DEADLINE: Duration = Duration::from_millis(1500);
/// How long a "recovers eventually" loop may take.
const RECOVERY: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Configurations.

fn peer(name: &str, site: u16, addr: SocketAddr) -> PeerSection {
    PeerSection { name: name.to_owned(), site, addr, fingerprint: None }
}

impl Fixture {
    fn replication(
        &self,
        name: &str,
        site: u16,
        listen: SocketAddr,
        peers: Vec<PeerSection>,
        witness: Option<PeerSection>,
    ) -> ReplicationConfig {
        ReplicationConfig {
            site,
            listen,
            certificate: self.pki().join(format!("{name}.pem")),
            key: self.pki().join(format!("{name}.key")),
            ca: self.pki().join("ca.pem"),
            deadline: QUORUM_DEADLINE,
            peers,
            witness,
        }
    }

    /// A full site `name` with its own copies of the keystore and AEAD store
    /// and its own database holding the API client.
    fn site(&self, name: &str, replication: Option<ReplicationConfig>, accept_at_risk_until: Option<SystemTime>) -> NodeConfig {
        let serve = self.serve_config(name, replication);
        NodeConfig::Site(SiteConfig { serve, accept_at_risk_until })
    }

    /// The witness: a counter database and its endpoint, nothing else.
    fn witness(&self, listen: SocketAddr, a: SocketAddr, b: SocketAddr) -> NodeConfig {
        let own = self.dir.path().join("witness");
        std::fs::create_dir_all(&own).unwrap();
        NodeConfig::Witness(WitnessConfig {
            db: own.join("counters.db"),
            synchronous: validator::counters::Synchronous::default(),
            http: http_options(),
            replication: self.replication("witness", 3, listen, vec![peer("auth1", 1, a), peer("auth2", 2, b)], None),
        })
    }
}

fn start(config: &NodeConfig) -> Running {
    let node = validator::serve::assemble_node(config).unwrap();
    validator::serve::start_node(node, config.http().clone()).unwrap()
}

// ---------------------------------------------------------------------------
// HTTP.

/// The `/status` page's `peer:` line for `name`.
fn peer_line(addr: SocketAddr, name: &str) -> String {
    let (code, body) = http_get(addr, "/status");
    assert_eq!(code, 200, "{body}");
    body.lines().find(|l| l.starts_with(&format!("peer: name={name} "))).unwrap_or_else(|| panic!("no peer {name} in:\n{body}")).to_owned()
}

/// Polls `/status` until `name`'s line says `state=…`, within [`RECOVERY`].
fn wait_for_state(addr: SocketAddr, name: &str, state: &str) -> String {
    let start = Instant::now();
    loop {
        let line = peer_line(addr, name);
        if line.contains(&format!(" state={state} ")) {
            return line;
        }
        assert!(start.elapsed() < RECOVERY, "{name} never {state}: {line}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fresh OTPs at `addr` until one is answered OK, within [`RECOVERY`].
fn login_until_ok(addr: SocketAddr, f: &Fixture, counter: &mut u16) -> String {
    replicated::login_until_ok(addr, f, counter, RECOVERY).0
}

/// A fresh OTP at `addr`: its answer and how long it took.
fn timed_login(addr: SocketAddr, f: &Fixture, counter: &mut u16) -> (String, BTreeMap<String, String>, Duration) {
    let otp = f.otp(*counter, 0);
    *counter += 1;
    let asked = Instant::now();
    let r = verify(addr, f, &otp, &nonce("timed"));
    (otp, r, asked.elapsed())
}

// ---------------------------------------------------------------------------
// Three nodes.

struct Group {
    a: Running,
    b: Running,
    w: Option<Running>,
    /// The witness's configuration, to start it again.
    w_config: NodeConfig,
    ab: Arc<Faults>,
    aw: Arc<Faults>,
    bw: Arc<Faults>,
    _proxies: Vec<UdpProxy>,
}

/// A (auth1, site 1, 127.0.0.1), B (auth2, site 2, 127.0.0.2), W
/// (witness, site 3, 127.0.0.3); every node reaches every other through a
/// proxy of their link.
fn three_nodes(f: &Fixture) -> Group {
    let (qa, qb, qw) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"), free_udp("127.0.0.3"));
    let (ab, aw, bw) = (Arc::new(Faults::default()), Arc::new(Faults::default()), Arc::new(Faults::default()));
    let a_to_b = UdpProxy::start("127.0.0.2", qb, ab.clone());
    let b_to_a = UdpProxy::start("127.0.0.1", qa, ab.clone());
    let a_to_w = UdpProxy::start("127.0.0.3", qw, aw.clone());
    let w_to_a = UdpProxy::start("127.0.0.1", qa, aw.clone());
    let b_to_w = UdpProxy::start("127.0.0.3", qw, bw.clone());
    let w_to_b = UdpProxy::start("127.0.0.2", qb, bw.clone());
    let w_config = f.witness(qw, w_to_a.listen, w_to_b.listen);
    let w = start(&w_config);
    let a = start(&f.site(
        "auth1",
        Some(f.replication("auth1", 1, qa, vec![peer("auth2", 2, a_to_b.listen)], Some(peer("witness", 3, a_to_w.listen)))),
        None,
    ));
    let b = start(&f.site(
        "auth2",
        Some(f.replication("auth2", 2, qb, vec![peer("auth1", 1, b_to_a.listen)], Some(peer("witness", 3, b_to_w.listen)))),
        None,
    ));
    Group { a, b, w: Some(w), w_config, ab, aw, bw, _proxies: vec![a_to_b, b_to_a, a_to_w, w_to_a, b_to_w, w_to_b] }
}

/// (a) all up, (b) the A–B link cut, (d) A cut from B and W, (c) W down:
/// 2 of 3 keeps both sites answering through any single failure, and the
/// minority side fails closed by its deadline.
#[test]
fn two_sites_and_a_witness_survive_any_single_failure() {
    let f = fixture();
    let g = three_nodes(&f);
    let (aa, ba) = (g.a.local_addr(), g.b.local_addr());
    let wa = g.w.as_ref().unwrap().local_addr();
    let mut counter = 1;

    // The witness serves health, metrics and status, and verifies nothing.
    let (code, body) = http_get(wa, &format!("/wsapi/2.0/verify?id={CLIENT}&otp={}&nonce=abcdefghijklmnop", f.otp(100, 0)));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("witness"), "{body}");
    assert_eq!(http_get(wa, "/health").0, 200);
    let (_, metrics) = http_get(wa, "/metrics");
    assert!(metrics.contains("validator_replication_peer_up"), "{metrics}");
    assert!(!metrics.contains("validator_verify_requests_total"), "{metrics}");
    let (_, w_status) = http_get(wa, "/status");
    assert!(w_status.contains("node: role=witness site=3"), "{w_status}");
    assert!(w_status.contains("quorum: required=2 group=3"), "{w_status}");

    // (a) All up: OK at A, a replay at B.
    let otp = login_until_ok(aa, &f, &mut counter);
    assert_eq!(status(&verify(ba, &f, &otp, &nonce("replay"))), "REPLAYED_OTP");
    let (_, a_status) = http_get(aa, "/status");
    assert!(a_status.contains("node: role=site site=1"), "{a_status}");
    assert!(a_status.contains("quorum: required=2 group=3"), "{a_status}");
    assert!(a_status.contains("policy: fail-closed"), "{a_status}");
    assert!(a_status.contains("sync: "), "{a_status}");
    for name in ["auth2", "witness"] {
        wait_for_state(aa, name, "up");
    }
    assert!(peer_line(aa, "witness").contains(" role=witness "));

    // (b) The A–B link cut, both still reach W: A answers OK without
    // waiting for its deadline, and the same OTP at B is a replay (W holds
    // it); an OTP accepted at B is a replay at A the same way.
    g.ab.set_partition(true);
    let (otp, r, took) = timed_login(aa, &f, &mut counter);
    assert_eq!(status(&r), "OK", "{r:?}");
    assert!(took < QUORUM_DEADLINE, "A waited {took:?}: the witness's answer should have made the quorum");
    assert_eq!(status(&verify(ba, &f, &otp, &nonce("cutreplay"))), "REPLAYED_OTP");
    let (at_b, r, _) = timed_login(ba, &f, &mut counter);
    assert_eq!(status(&r), "OK", "{r:?}");
    assert_eq!(status(&verify(aa, &f, &at_b, &nonce("cutreplay"))), "REPLAYED_OTP");
    assert!(g.ab.dropped.load(Ordering::Relaxed) > 0, "the A–B proxies dropped nothing");
    let line = wait_for_state(aa, "auth2", "down");
    assert!(!line.ends_with("last_error=-"), "{line}");
    assert!(peer_line(aa, "witness").contains(" state=up "));
    g.ab.set_partition(false);

    // (d) A cut from B and W: A fails closed at its deadline, not before;
    // B goes on accepting with W.
    g.aw.set_partition(true);
    g.ab.set_partition(true);
    let (cut, r, took) = timed_login(aa, &f, &mut counter);
    assert_eq!(status(&r), "NOT_ENOUGH_ANSWERS", "{r:?}");
    assert_eq!(r.get("otp"), Some(&cut));
    assert!(took >= QUORUM_DEADLINE.mul_f32(0.9), "answered after {took:?}, before the deadline");
    assert!(took < QUORUM_DEADLINE + Duration::from_secs(5), "answered after {took:?}, long past the deadline");
    let (_, r, took) = timed_login(ba, &f, &mut counter);
    assert_eq!(status(&r), "OK", "B with W: {r:?}");
    assert!(took < QUORUM_DEADLINE, "B waited {took:?}");
    assert!(metric(aa, "validator_replication_verdicts_total{verdict=\"not_enough_answers\"}").unwrap() >= 1.0);
    g.aw.set_partition(false);
    g.ab.set_partition(false);
    let healed = login_until_ok(aa, &f, &mut counter);
    assert_eq!(status(&verify(ba, &f, &healed, &nonce("healed"))), "REPLAYED_OTP");

    // (c) W down: A and B are a majority on their own.
    let Group { a, b, w, bw, .. } = g;
    w.unwrap().shutdown();
    let (otp, r, took) = timed_login(aa, &f, &mut counter);
    assert_eq!(status(&r), "OK", "W down: {r:?}");
    assert!(took < QUORUM_DEADLINE, "A waited {took:?} with B up");
    assert_eq!(status(&verify(ba, &f, &otp, &nonce("wdown"))), "REPLAYED_OTP");
    let at_b = login_until_ok(ba, &f, &mut counter);
    assert_eq!(status(&verify(aa, &f, &at_b, &nonce("wdown"))), "REPLAYED_OTP");
    wait_for_state(aa, "witness", "down");
    assert!(bw.relayed.load(Ordering::Relaxed) > 0);
    a.shutdown();
    b.shutdown();
}

/// A witness that was down catches up on the counters the sites accepted
/// meanwhile (it pulls them, as every node pulls every peer), and only
/// counters: the sites see it hold neither AEADs nor API clients.
#[test]
fn a_witness_back_from_downtime_catches_up_on_counters() {
    let f = fixture();
    let g = three_nodes(&f);
    let (aa, ba) = (g.a.local_addr(), g.b.local_addr());
    let mut counter = 1;
    login_until_ok(aa, &f, &mut counter);
    let Group { a, b, w, w_config, .. } = g;
    w.unwrap().shutdown();
    // A and B go on without it.
    for site in [aa, ba, aa] {
        let (_, r, _) = timed_login(site, &f, &mut counter);
        assert_eq!(status(&r), "OK", "{r:?}");
    }
    let last = otp::Counters::new(counter - 1, 0).unwrap();
    let NodeConfig::Witness(ref wc) = w_config else { panic!("not a witness") };
    let store = validator::counters::SqliteCounters::open(&wc.db).unwrap();
    assert!(store.get(&f.id).unwrap().is_none_or(|s| s.counters < last), "the witness saw them while down");
    // Back on the same database and address (which may take a moment to free).
    let started = Instant::now();
    let w = loop {
        match validator::serve::assemble_node(&w_config) {
            Ok(node) => break validator::serve::start_node(node, w_config.http().clone()).unwrap(),
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(10), "the witness does not start again: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let took = Instant::now();
    while store.get(&f.id).unwrap().is_none_or(|s| s.counters < last) {
        assert!(took.elapsed() < RECOVERY, "the witness never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the witness caught up {:?} after it started", took.elapsed());
    let (_, w_status) = http_get(w.local_addr(), "/status");
    assert!(w_status.contains("sync: peer=auth1 dataset=counters "), "{w_status}");
    assert!(!w_status.contains("dataset=aeads") && !w_status.contains("dataset=clients"), "{w_status}");
    let start = Instant::now();
    loop {
        let (_, a_status) = http_get(aa, "/status");
        if a_status.contains("sync: peer=witness dataset=aeads not held by the peer")
            && a_status.contains("sync: peer=witness dataset=clients not held by the peer")
        {
            break;
        }
        assert!(start.elapsed() < RECOVERY, "{a_status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.shutdown();
    a.shutdown();
    b.shutdown();
}

/// (e) A site whose peer is down, inside an accept-at-risk window: OK,
/// logged and counted; after the window, NOT_ENOUGH_ANSWERS again.
#[test]
fn accept_at_risk_window_accepts_then_fails_closed() {
    capture_warnings();
    let f = fixture();
    let (qa, nobody) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"));
    let until = SystemTime::now() + Duration::from_secs(7);
    let a = start(&f.site("auth1", Some(f.replication("auth1", 1, qa, vec![peer("auth2", 2, nobody)], None)), Some(until)));
    let aa = a.local_addr();
    assert!(!logged_with("ACCEPT-AT-RISK window open").is_empty(), "no start warning: {:#?}", captured().lock().unwrap());
    let left = metric(aa, "validator_replication_accept_at_risk_window_seconds").unwrap();
    assert!(left > 0.0 && left <= 7.0, "window {left}");
    let (_, page) = http_get(aa, "/status");
    assert!(page.contains("policy: ACCEPT-AT-RISK until="), "{page}");

    let mut counter = 1;
    let (otp, r, took) = timed_login(aa, &f, &mut counter);
    assert_eq!(status(&r), "OK", "inside the window: {r:?}");
    assert!(took >= QUORUM_DEADLINE.mul_f32(0.9), "accepted at risk after {took:?}: before the deadline");
    assert_eq!(metric(aa, "validator_replication_verdicts_total{verdict=\"accepted_at_risk\"}"), Some(1.0));
    assert_eq!(metric(aa, "validator_replication_accepted_at_risk_total"), Some(1.0));
    assert!(!logged_with("ACCEPTED AT RISK").is_empty() || !logged_with("AT RISK: quorum missed").is_empty());
    // Accepted at risk is still accepted here: a replay is refused.
    assert_eq!(status(&verify(aa, &f, &otp, &nonce("again"))), "REPLAYED_OTP");

    let end = until.duration_since(SystemTime::now()).unwrap_or_default();
    std::thread::sleep(end + Duration::from_millis(300));
    assert_eq!(metric(aa, "validator_replication_accept_at_risk_window_seconds"), Some(0.0));
    let (_, r, _) = timed_login(aa, &f, &mut counter);
    assert_eq!(status(&r), "NOT_ENOUGH_ANSWERS", "after the window: {r:?}");
    assert_eq!(metric(aa, "validator_replication_accepted_at_risk_total"), Some(1.0));
    let (_, page) = http_get(aa, "/status");
    assert!(page.contains("policy: fail-closed (accept-at-risk window ended"), "{page}");
    a.shutdown();
}

// ---------------------------------------------------------------------------
// `validator status` and `validator serve` as processes.

fn validator_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_validator"));
    cmd.args(args)
        .env_remove("OTP_KEYSTORE")
        .env_remove("OTP_KEYSTORE_PASSWORD_FILE")
        .env_remove("OTP_VALIDATOR_DB")
        .env_remove("OTP_VALIDATOR_CONFIG")
        .env("RUST_LOG", "warn");
    cmd
}

/// `validator status ARGS`: exit code and stdout.
fn status_cli(args: &[&str]) -> (Option<i32>, String) {
    let mut full = vec!["status", "--timeout-ms", "3000"];
    full.extend_from_slice(args);
    let out = validator_command(&full).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// [`status_cli`] until it exits `code`, within [`RECOVERY`]; the last result.
fn status_cli_until(args: &[&str], code: i32) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        let (got, out) = status_cli(args);
        if got == Some(code) || start.elapsed() > RECOVERY {
            return (got, out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `validator serve` process, its stderr drained.
struct Server {
    child: Child,
    addr: SocketAddr,
    drain: Option<JoinHandle<()>>,
}

impl Server {
    fn start(config: &Path) -> Self {
        let mut child = validator_command(&["serve", "--config", config.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut early = String::new();
        let addr: SocketAddr = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "validator serve exited before listening:\n{early}");
            if let Some(rest) = line.split("serving http://").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
            early.push_str(&line);
        };
        let drain = std::thread::spawn(move || for _ in stderr.lines().map_while(Result::ok) {});
        Self { child, addr, drain: Some(drain) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

/// (f) The witness runs as `validator serve` from a TOML file; `validator
/// status` against it and against a site exits 0 with every peer up, 1
/// with one unknown or down, 2 when nothing answers.
#[test]
fn validator_status_reports_peers_and_exits_by_their_state() {
    let f = fixture();
    let (qa, qb, qw) = (free_udp("127.0.0.1"), free_udp("127.0.0.2"), free_udp("127.0.0.3"));
    let toml = format!(
        r#"listen = "127.0.0.1:0"
db = "{db}"
[replication]
role = "witness"
site = 3
listen = "{qw}"
certificate = "{pki}/witness.pem"
key = "{pki}/witness.key"
ca = "{pki}/ca.pem"
deadline_ms = {deadline}
[[replication.peers]]
name = "auth1"
site = 1
addr = "{qa}"
[[replication.peers]]
name = "auth2"
site = 2
addr = "{qb}"
"#,
        db = f.dir.path().join("witness.db").display(),
        pki = f.pki().display(),
        deadline = QUORUM_DEADLINE.as_millis(),
    );
    let witness_toml = f.dir.path().join("witness.toml");
    std::fs::write(&witness_toml, toml).unwrap();
    let w = Server::start(&witness_toml);
    let w_url = format!("http://{}", w.addr);

    // Nothing exchanged yet: both sites unknown to the witness.
    let (code, out) = status_cli(&["--url", &w_url]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("node: role=witness site=3"), "{out}");
    assert!(out.contains("peer: name=auth1 site=1 role=site") && out.contains("state=unknown"), "{out}");
    assert!(out.contains("peers: total=2 up=0 down=0 unknown=2"), "{out}");

    let site = |name: &str, n: u16, q: SocketAddr, other: (&str, u16, SocketAddr)| {
        start(&f.site(name, Some(f.replication(name, n, q, vec![peer(other.0, other.1, other.2)], Some(peer("witness", 3, qw)))), None))
    };
    let a = site("auth1", 1, qa, ("auth2", 2, qb));
    let b = site("auth2", 2, qb, ("auth1", 1, qa));
    let mut counter = 1;
    login_until_ok(a.local_addr(), &f, &mut counter);
    login_until_ok(b.local_addr(), &f, &mut counter);

    // Both sites have asked the witness (each request goes to both other
    // nodes; the quorum may have come from the other site first): all up.
    let (code, out) = status_cli_until(&["--url", &format!("{w_url}/status")], 0);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("peers: total=2 up=2 down=0 unknown=0"), "{out}");

    // A's own view, through --config (its listen address).
    let a_toml = f.dir.path().join("a.toml");
    std::fs::write(&a_toml, format!("listen = \"{}\"\n", a.local_addr())).unwrap();
    wait_for_state(a.local_addr(), "witness", "up");
    wait_for_state(a.local_addr(), "auth2", "up");
    let (code, out) = status_cli(&["--config", a_toml.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("node: role=site site=1"), "{out}");
    assert!(out.contains("peer: name=witness site=3 role=witness"), "{out}");

    // The witness process killed: A still accepts (with B), and reports it down.
    drop(w);
    login_until_ok(a.local_addr(), &f, &mut counter);
    wait_for_state(a.local_addr(), "witness", "down");
    let (code, out) = status_cli(&["--config", a_toml.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("peer: name=witness") && out.contains("state=down"), "{out}");

    // Nothing listening: 2.
    let (code, out) = status_cli(&["--url", &w_url]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("error:"), "{out}");
    // Not an http:// URL: 2.
    let (code, out) = status_cli(&["--url", "https://127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{out}");

    // A site without replication has a status page too, and no peers: 0.
    let alone = start(&f.site("alone", None, None));
    let (code, out) = status_cli(&["--url", &format!("http://{}", alone.local_addr())]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replication: off"), "{out}");
    alone.shutdown();
    a.shutdown();
    b.shutdown();
}

// ---------------------------------------------------------------------------
// Configurations refused.

const SITE: &str = r#"
db = "v.db"
keystore = "ks"
[ksm]
store = "s"
[replication]
site = 1
listen = "127.0.0.1:4433"
certificate = "auth1.pem"
key = "auth1.key"
ca = "ca.pem"
witness = "w"
[[replication.peers]]
name = "auth2"
site = 2
addr = "127.0.0.2:4433"
[[replication.peers]]
name = "w"
site = 3
addr = "127.0.0.3:4433"
"#;

const WITNESS: &str = r#"
db = "w.db"
[replication]
role = "witness"
site = 3
listen = "127.0.0.3:4433"
certificate = "w.pem"
key = "w.key"
ca = "ca.pem"
[[replication.peers]]
name = "auth1"
site = 1
addr = "127.0.0.1:4433"
[[replication.peers]]
name = "auth2"
site = 2
addr = "127.0.0.2:4433"
"#;

fn resolve(text: &str) -> Result<NodeConfig, String> {
    toml::from_str::<ConfigFile>(text).map_err(|e| e.to_string())?.resolve_node()
}

fn refused(text: &str, needle: &str) {
    match resolve(text) {
        Ok(c) => panic!("accepted (wanted an error with {needle:?}): {c:?}"),
        Err(e) => assert!(e.contains(needle), "error {e:?} does not mention {needle:?}"),
    }
}

/// (g) What is accepted, what is refused, and the messages.
#[test]
fn configurations_are_refused_with_clear_messages() {
    // Accepted: a witness without keystore or KSM; a site with a window
    // (quoted or as a TOML date-time).
    let w = resolve(WITNESS).unwrap();
    assert!(matches!(&w, NodeConfig::Witness(c) if c.replication.peers.len() == 2 && c.replication.witness.is_none()), "{w:?}");
    let soon = validator::config::format_utc(SystemTime::now() + Duration::from_secs(3600));
    for window in [format!("\"{soon}\""), soon.clone()] {
        let c = resolve(&SITE.replace("witness = \"w\"", &format!("witness = \"w\"\naccept_at_risk_until = {window}"))).unwrap();
        let NodeConfig::Site(s) = c else { panic!("not a site") };
        let until = s.accept_at_risk_until.unwrap();
        assert!(until > SystemTime::now() + Duration::from_secs(3500), "{window}");
    }

    // A window already past is no error (a restart after it must not fail):
    // the site fails closed, with a WARN at the start.
    let past = resolve(&SITE.replace("witness = \"w\"", "witness = \"w\"\naccept_at_risk_until = \"2020-01-01T00:00:00Z\"")).unwrap();
    assert!(matches!(past, NodeConfig::Site(SiteConfig { accept_at_risk_until: Some(t), .. }) if t < SystemTime::now()));
    // Accept-at-risk needs replication.
    let alone = SITE.split("[replication]").next().unwrap().to_owned();
    refused(&format!("{alone}[replication]\naccept_at_risk_until = \"{soon}\"\n"), "`site` is required");

    // A witness needs no keys, and refuses them.
    refused(&format!("keystore = \"ks\"\n{WITNESS}"), "keystore");
    refused(&WITNESS.replace("db = \"w.db\"", "db = \"w.db\"\n[ksm]\nstore = \"s\"\n"), "ksm.store");
    // A witness names no witness, has exactly two peers, no window.
    refused(&WITNESS.replace("role = \"witness\"", "role = \"witness\"\nwitness = \"auth2\""), "remove `witness`");
    let one_peer = WITNESS.split("[[replication.peers]]\nname = \"auth2\"").next().unwrap().to_owned();
    refused(&one_peer, "exactly the two sites");
    refused(&WITNESS.replace("role = \"witness\"", &format!("role = \"witness\"\naccept_at_risk_until = \"{soon}\"")), "belongs to a site");
    // Roles are spelt out.
    refused(&WITNESS.replace("\"witness\"", "\"wittness\""), "wittness");
    // A site needs its peer.
    let no_peers = SITE.split("[[replication.peers]]").next().unwrap().replace("witness = \"w\"\n", "");
    refused(&no_peers, "needs its peer site");
    // Ids and names appear once.
    refused(&SITE.replace("site = 3", "site = 2"), "site id 2 appears twice");
    refused(&SITE.replace("site = 3", "site = 1"), "this node's own");
    refused(&SITE.replace("name = \"w\"", "name = \"AUTH2\"").replace("witness = \"w\"", "witness = \"AUTH2\""), "appears twice");
    refused(&WITNESS.replace("site = 2", "site = 1"), "appears twice");
    // Accept-at-risk: at most 24 h ahead, in UTC, a real time.
    let far = validator::config::format_utc(SystemTime::now() + Duration::from_secs(25 * 3600));
    refused(&SITE.replace("witness = \"w\"", &format!("witness = \"w\"\naccept_at_risk_until = \"{far}\"")), "at most 24 h");
    refused(&SITE.replace("witness = \"w\"", "witness = \"w\"\naccept_at_risk_until = \"2026-11-27T08:00:00+01:00\""), "UTC");
    refused(&SITE.replace("witness = \"w\"", "witness = \"w\"\naccept_at_risk_until = \"2026-02-30T08:00:00Z\""), "RFC 3339");
    refused(&SITE.replace("witness = \"w\"", "witness = \"w\"\naccept_at_risk_until = \"tomorrow\""), "RFC 3339");
    // Unknown keys.
    refused(&SITE.replace("witness = \"w\"", "witness = \"w\"\naccept_at_risk_minutes = 5"), "accept_at_risk_minutes");

    // `validator serve` says so and exits 1 before listening.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), format!("keystore = \"ks\"\n{WITNESS}")).unwrap();
    let out = validator_command(&["serve", "--config", bad.path().to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a witness verifies no OTP"), "{stderr}");
}

/// The witness unit's command line, with the witness block of the shipped
/// example as its configuration, gets as far as the certificate it names.
#[test]
fn the_witness_unit_and_example_are_accepted() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(manifest.join("systemd/otp-validator-witness.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(|a| a.replace("/etc/otp-appliance", root)).collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    let settings: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    for key in ["password", "keystore", "LoadCredential"] {
        assert!(!settings.iter().any(|l| l.contains(key)), "a witness has no keys: {key} in\n{unit}");
    }
    let run = || {
        let out = validator_command(&args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run();
    assert!(stderr.contains(&format!("{root}/witness.toml: No such file")), "{stderr}");

    // The example's witness block, uncommented, paths moved here.
    let example = std::fs::read_to_string(manifest.join("validator.toml.example")).unwrap();
    let block = example.split("Its own file:").nth(1).unwrap();
    let toml: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("# ")).filter(|l| !l.starts_with('(')).collect();
    let toml = toml.join("\n").replace("/etc/otp-appliance", root).replace("/var/lib/otp-appliance", root);
    std::fs::write(dir.path().join("witness.toml"), toml).unwrap();
    let stderr = run();
    assert!(stderr.contains("replication identity") && stderr.contains("witness.pem"), "{stderr}");
}
