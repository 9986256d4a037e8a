//! The QUIC transport over real sockets on loopback (127.0.0.x): mutual
//! TLS, authorization, deadlines, reconnection, frame limits.
//!
//! Provider check: `cargo tree -p replication | grep -i aws` prints nothing
//! (ring only); `ring_is_the_only_crypto_provider` asserts the same on the
//! workspace's Cargo.lock, which is cheap enough to run every time.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::pki::{Ca, Fingerprint, Identity};
use replication::transport::{BlockingClient, Endpoint, EndpointConfig, Peer, PeerIdentity, PeerRule, RpcError, Settings, Trust};

const YEAR: Duration = Duration::from_secs(365 * 86_400);

fn ca(name: &str) -> Ca {
    Ca::generate(name, YEAR).unwrap()
}

fn identity(ca: &Ca, name: &str) -> Identity {
    ca.issue(name, YEAR).unwrap().identity().unwrap()
}

fn trust(ca: &Ca, rules: Vec<PeerRule>) -> Trust {
    Trust::new(ca.cert_der().clone(), rules).unwrap()
}

fn names(list: &[&str]) -> Vec<PeerRule> {
    list.iter().map(|n| PeerRule::name(*n)).collect()
}

fn bind(ip: &str, identity: Identity, trust: Trust, settings: Settings) -> Endpoint {
    bind_at(format!("{ip}:0").parse().unwrap(), identity, trust, settings)
}

fn bind_at(addr: SocketAddr, identity: Identity, trust: Trust, settings: Settings) -> Endpoint {
    Endpoint::bind(EndpointConfig { bind: addr, identity, trust, settings }).unwrap()
}

fn peer(name: &str, ep: &Endpoint) -> Peer {
    Peer::new(name, ep.local_addr().unwrap())
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// A handler that answers `<peer name> <fingerprint> | <request>` and
/// counts its calls.
fn echo(calls: Arc<AtomicUsize>) -> impl Fn(PeerIdentity, Bytes) -> std::future::Ready<Bytes> + Send + Sync + 'static {
    move |peer: PeerIdentity, request: Bytes| {
        calls.fetch_add(1, Ordering::SeqCst);
        let mut out = format!("{} {} | ", peer.name, peer.fingerprint).into_bytes();
        out.extend_from_slice(&request);
        std::future::ready(Bytes::from(out))
    }
}

/// Two sites of one CA that allow each other by name; B serves `echo`.
struct Pair {
    a: Endpoint,
    b: Endpoint,
    a_fp: Fingerprint,
    b_fp: Fingerprint,
    b_calls: Arc<AtomicUsize>,
}

fn pair(a_ip: &str, b_ip: &str) -> Pair {
    let ca = ca("test CA");
    let (ia, ib) = (identity(&ca, "auth1"), identity(&ca, "auth2"));
    let (a_fp, b_fp) = (ia.fingerprint(), ib.fingerprint());
    let a = bind(a_ip, ia, trust(&ca, names(&["auth2"])), Settings::default());
    let b = bind(b_ip, ib, trust(&ca, names(&["auth1"])), Settings::default());
    let b_calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(b.clone().serve(echo(b_calls.clone())));
    Pair { a, b, a_fp, b_fp, b_calls }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_mutual_tls_both_ways() {
    let p = pair("127.0.0.2", "127.0.0.3");
    let a_calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(p.a.clone().serve(echo(a_calls.clone())));

    let reply = p.a.request(&peer("auth2", &p.b), Bytes::from_static(b"hello"), soon(5000)).await.unwrap();
    // B saw A's authorized name and the fingerprint of A's certificate.
    assert_eq!(reply, format!("auth1 {} | hello", p.a_fp).as_bytes());

    let reply = p.b.request(&peer("auth1", &p.a), Bytes::from_static(b"back"), soon(5000)).await.unwrap();
    assert_eq!(reply, format!("auth2 {} | back", p.b_fp).as_bytes());

    // An empty request is a frame too.
    let reply = p.a.request(&peer("auth2", &p.b), Bytes::new(), soon(5000)).await.unwrap();
    assert_eq!(reply, format!("auth1 {} | ", p.a_fp).as_bytes());
    assert_eq!((p.b_calls.load(Ordering::SeqCst), a_calls.load(Ordering::SeqCst)), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_one_connection() {
    let ca = ca("test CA");
    let a = bind("127.0.0.2", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), Settings::default());
    let b = bind("127.0.0.3", identity(&ca, "auth2"), trust(&ca, names(&["auth1"])), Settings::default());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (f, m) = (in_flight.clone(), peak.clone());
    // Each request holds its stream for 20 ms, so they overlap.
    tokio::spawn(b.clone().serve(move |_peer: PeerIdentity, request: Bytes| {
        let (f, m) = (f.clone(), m.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            f.fetch_sub(1, Ordering::SeqCst);
            request
        }
    }));
    let target = peer("auth2", &b);
    // More than the 256 concurrent streams allowed: the rest wait for a slot.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..600u32 {
        let (a, target) = (a.clone(), target.clone());
        set.spawn(async move {
            let body = Bytes::from(i.to_be_bytes().to_vec());
            (i, a.request(&target, body, soon(20_000)).await)
        });
    }
    let mut ok = 0;
    while let Some(joined) = set.join_next().await {
        let (i, reply) = joined.unwrap();
        assert_eq!(reply.unwrap(), Bytes::from(i.to_be_bytes().to_vec()));
        ok += 1;
    }
    assert_eq!(ok, 600);
    assert_eq!(a.stats().dialled, 1, "one connection for every request");
    assert_eq!(b.stats().accepted, 1);
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak > 1, "requests ran concurrently (peak {peak})");
    assert!(peak <= 256, "the stream limit holds (peak {peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    let ours = ca("our CA");
    let theirs = ca("their CA");
    let calls = Arc::new(AtomicUsize::new(0));
    let server = bind("127.0.0.3", identity(&ours, "auth2"), trust(&ours, names(&["auth1"])), Settings::default());
    tokio::spawn(server.clone().serve(echo(calls.clone())));

    // A client whose certificate (right name, wrong CA) the server refuses.
    let intruder = bind("127.0.0.2", identity(&theirs, "auth1"), trust(&ours, names(&["auth2"])), Settings::default());
    let err = intruder.request(&peer("auth2", &server), Bytes::from_static(b"x"), soon(5000)).await.unwrap_err();
    assert!(matches!(&err, RpcError::RefusedByPeer(m) if m.contains("unknown CA")), "{err:?}");
    assert!(server.stats().refused >= 1);
    assert_eq!(server.stats().accepted, 0);

    // A server whose certificate (right name, wrong CA) the client refuses.
    let fake = bind("127.0.0.4", identity(&theirs, "auth2"), trust(&ours, names(&["auth1"])), Settings::default());
    let fake_calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(fake.clone().serve(echo(fake_calls.clone())));
    let client = bind("127.0.0.2", identity(&ours, "auth1"), trust(&ours, names(&["auth2"])), Settings::default());
    let err = client.request(&peer("auth2", &fake), Bytes::from_static(b"secret"), soon(5000)).await.unwrap_err();
    assert!(matches!(&err, RpcError::Tls(m) if m.contains("UnknownIssuer")), "{err:?}");
    assert_eq!(client.stats().refused, 1);
    assert_eq!(client.stats().dialled, 0);

    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(fake_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_ca_but_not_pinned_or_allowed_is_refused_both_ways() {
    let ca = ca("test CA");
    let (auth1, auth2, auth3) = (identity(&ca, "auth1"), identity(&ca, "auth2"), identity(&ca, "auth3"));
    let (fp1, fp2) = (auth1.fingerprint(), auth2.fingerprint());
    let auth1_again = auth1.clone();
    let other_fp = identity(&ca, "auth1").fingerprint(); // same name, another key

    // Server side: B pins a certificate that is not A's.
    let calls = Arc::new(AtomicUsize::new(0));
    let b = bind("127.0.0.3", auth2, trust(&ca, vec![PeerRule::pin(other_fp)]), Settings::default());
    tokio::spawn(b.clone().serve(echo(calls.clone())));
    let a = bind("127.0.0.2", auth1, trust(&ca, vec![PeerRule::pin(fp2)]), Settings::default());
    let err = a.request(&peer("auth2", &b), Bytes::from_static(b"x"), soon(5000)).await.unwrap_err();
    assert!(matches!(&err, RpcError::RefusedByPeer(m) if m.contains("access denied")), "{err:?}");
    assert_eq!(b.stats().refused, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Client side: C allows only the name auth9, B is auth2.
    let c = bind("127.0.0.4", auth3, trust(&ca, names(&["auth9"])), Settings::default());
    let err = c.request(&peer("auth2", &b), Bytes::from_static(b"x"), soon(5000)).await.unwrap_err();
    match &err {
        RpcError::PeerNotAuthorized { peer, fingerprint, names } => {
            assert_eq!((peer.as_str(), *fingerprint, names.clone()), ("auth2", fp2, vec!["auth2".to_string()]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.stats().refused, 1);

    // A name-and-pin rule needs both: the right name with another key fails.
    let d = bind("127.0.0.5", identity(&ca, "auth4"), trust(&ca, vec![PeerRule::name_and_pin("auth2", other_fp)]), Settings::default());
    let err = d.request(&peer("auth2", &b), Bytes::from_static(b"x"), soon(5000)).await.unwrap_err();
    assert!(matches!(err, RpcError::PeerNotAuthorized { .. }), "{err:?}");

    // The dialled name must be in the server's certificate.
    let e = bind("127.0.0.6", identity(&ca, "auth5"), trust(&ca, names(&["auth2", "auth3"])), Settings::default());
    let err = e.request(&Peer::new("auth3", b.local_addr().unwrap()), Bytes::from_static(b"x"), soon(5000)).await.unwrap_err();
    assert!(matches!(&err, RpcError::Tls(m) if m.contains("not valid for name")), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The positive case of a pin: a server pinning A's real fingerprint.
    let b2 = bind("127.0.0.7", identity(&ca, "auth2"), trust(&ca, vec![PeerRule::pin(fp1)]), Settings::default());
    tokio::spawn(b2.clone().serve(echo(calls.clone())));
    let a2 = bind("127.0.0.2", auth1_again, trust(&ca, names(&["auth2"])), Settings::default());
    let reply = a2.request(&peer("auth2", &b2), Bytes::from_static(b"ok"), soon(5000)).await.unwrap();
    assert_eq!(reply, format!("auth1 {fp1} | ok").as_bytes(), "a pin-only rule names the peer by its certificate's name");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_fires_against_a_peer_that_never_answers() {
    let ca = ca("test CA");
    let a = bind("127.0.0.2", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), Settings::default());
    let settings = Settings { server_deadline: Duration::from_secs(2), ..Settings::default() };
    let b = bind("127.0.0.3", identity(&ca, "auth2"), trust(&ca, names(&["auth1"])), settings);
    // Accepts the stream, reads the request, never answers "hang".
    tokio::spawn(b.clone().serve(|_peer: PeerIdentity, request: Bytes| async move {
        if &request[..] == b"hang" {
            std::future::pending::<()>().await;
        }
        request
    }));
    let target = peer("auth2", &b);
    a.request(&target, Bytes::from_static(b"warm"), soon(5000)).await.unwrap();

    let start = Instant::now();
    let err = a.request(&target, Bytes::from_static(b"hang"), soon(300)).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(err, RpcError::Timeout);
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1000), "{took:?}");

    // The connection is still good for the next request.
    assert_eq!(a.request(&target, Bytes::from_static(b"next"), soon(5000)).await.unwrap(), &b"next"[..]);
    assert_eq!(a.stats().dialled, 1);

    // Nobody listening at all: the handshake never completes, the deadline still holds.
    let silent = std::net::UdpSocket::bind("127.0.0.5:0").unwrap();
    let start = Instant::now();
    let err = a.request(&Peer::new("auth2", silent.local_addr().unwrap()), Bytes::from_static(b"x"), soon(300)).await.unwrap_err();
    assert_eq!(err, RpcError::Timeout);
    assert!(start.elapsed() < Duration::from_millis(1000));
}

async fn bind_retrying(addr: SocketAddr, identity: &Identity, trust: &Trust) -> Endpoint {
    // The port may take a moment to be free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let config = EndpointConfig { bind: addr, identity: identity.clone(), trust: trust.clone(), settings: Settings::default() };
        match Endpoint::bind(config) {
            Ok(ep) => return ep,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Site B on its own runtime, so that the test can kill it without a
/// goodbye: shutting that runtime down drops the endpoint mid-flight, as a
/// crashed process would, and no CONNECTION_CLOSE is sent.
struct Crashable {
    runtime: tokio::runtime::Runtime,
}

impl Crashable {
    fn start(addr: SocketAddr, identity: &Identity, trust: &Trust, calls: Arc<AtomicUsize>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let ep = bind_retrying(addr, identity, trust).await;
            tokio::spawn(ep.serve(echo(calls)));
        });
        Self { runtime }
    }

    fn crash(self) {
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

#[test]
fn a_peer_that_restarts_is_reconnected_to() {
    let main = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = ca("test CA");
    let a = main.block_on(async { bind("127.0.0.2", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), Settings::default()) });
    let b_identity = identity(&ca, "auth2");
    let b_trust = trust(&ca, names(&["auth1"]));
    // An address of its own: the port is reused across restarts.
    let addr = std::net::UdpSocket::bind("127.0.0.13:0").unwrap().local_addr().unwrap();
    let target = Peer::new("auth2", addr);
    let calls = Arc::new(AtomicUsize::new(0));
    let ask = |body: &'static [u8]| main.block_on(a.request(&target, Bytes::from_static(body), soon(5000)));

    // 1. A clean restart: B closes its connections, so A knows at once.
    main.block_on(async {
        let b = bind_retrying(addr, &b_identity, &b_trust).await;
        tokio::spawn(b.clone().serve(echo(calls.clone())));
        a.request(&target, Bytes::from_static(b"one"), soon(5000)).await.unwrap();
        b.close();
        b.wait_idle().await;
    });
    main.block_on(async {
        let b = bind_retrying(addr, &b_identity, &b_trust).await;
        tokio::spawn(b.clone().serve(echo(calls.clone())));
        a.request(&target, Bytes::from_static(b"two"), soon(5000)).await.unwrap();
        assert_eq!(a.stats().dialled, 2, "reconnected after the clean restart");
        b.close();
        b.wait_idle().await;
    });

    // 2. A crash: no goodbye. The restarted B (same key, hence the same
    // stateless-reset and connection-ID keys) resets the old connection on
    // its first packet, long before the 10 s idle timeout would notice.
    // (Now and then the dying runtime still gets a close out, and A knows
    // before it asks: then the first request simply dials again.)
    let b = Crashable::start(addr, &b_identity, &b_trust, calls.clone());
    ask(b"three").unwrap();
    assert_eq!(a.stats().dialled, 3);
    b.crash();
    let b = Crashable::start(addr, &b_identity, &b_trust, calls.clone());
    let start = Instant::now();
    let first = ask(b"four");
    eprintln!("first request after the crash: {first:?} after {:?}", start.elapsed());
    let answered_four = match &first {
        Ok(reply) => reply.ends_with(b"| four"),
        Err(RpcError::ConnectionLost(m)) => {
            assert!(m.contains("reset by the peer"), "{m}");
            false
        }
        Err(other) => panic!("expected a stateless reset, got {other:?}"),
    };
    assert!(ask(b"five").unwrap().ends_with(b"| five"));
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    assert_eq!(a.stats().dialled, 4, "reconnected after the crash");
    assert_eq!(calls.load(Ordering::SeqCst), 4 + usize::from(answered_four), "one, two, three, (four,) five");
    b.crash();
    drop(a);
    main.shutdown_timeout(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused() {
    let ca = ca("test CA");
    let small = Settings { max_frame: 1024, ..Settings::default() };
    let calls = Arc::new(AtomicUsize::new(0));
    // B accepts at most 1 KiB; its handler answers "big" with 64 KiB.
    let b = bind("127.0.0.3", identity(&ca, "auth2"), trust(&ca, names(&["auth1"])), small.clone());
    let c = calls.clone();
    tokio::spawn(b.clone().serve(move |_peer: PeerIdentity, request: Bytes| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if &request[..] == b"big" {
                Bytes::from(vec![7u8; 1024])
            } else {
                request
            }
        }
    }));
    let a = bind("127.0.0.2", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), Settings::default());
    let target = peer("auth2", &b);

    // The receiver refuses a frame above its limit, without calling the handler.
    let err = a.request(&target, Bytes::from(vec![0u8; 4096]), soon(5000)).await.unwrap_err();
    assert_eq!(err, RpcError::FrameTooLarge { len: 4096, max: None });
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // The sender refuses before sending anything.
    let tiny = bind("127.0.0.4", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), small);
    let err = tiny.request(&target, Bytes::from(vec![0u8; 1025]), soon(5000)).await.unwrap_err();
    assert_eq!(err, RpcError::FrameTooLarge { len: 1025, max: Some(1024) });
    assert_eq!(tiny.stats().dialled, 0);
    // Exactly at the limit is fine; a reply at the limit too.
    assert_eq!(tiny.request(&target, Bytes::from(vec![1u8; 1024]), soon(5000)).await.unwrap().len(), 1024);
    assert_eq!(tiny.request(&target, Bytes::from_static(b"big"), soon(5000)).await.unwrap().len(), 1024);
    let default_max = Settings::default().max_frame;
    assert_eq!(default_max, 16 << 20);
    let err = a.request(&target, Bytes::from(vec![0u8; default_max + 1]), soon(5000)).await.unwrap_err();
    assert_eq!(err, RpcError::FrameTooLarge { len: default_max as u64 + 1, max: Some(default_max as u64) });
    // The connection survives refused frames.
    assert_eq!(a.request(&target, Bytes::from_static(b"still here"), soon(5000)).await.unwrap(), &b"still here"[..]);
    assert_eq!(a.stats().dialled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_is_refused_by_the_client() {
    let ca = ca("test CA");
    let b = bind("127.0.0.3", identity(&ca, "auth2"), trust(&ca, names(&["auth1"])), Settings::default());
    tokio::spawn(b.clone().serve(|_peer: PeerIdentity, request: Bytes| async move {
        if &request[..] == b"big" {
            Bytes::from(vec![7u8; 64 * 1024])
        } else {
            request
        }
    }));
    let small = Settings { max_frame: 1024, ..Settings::default() };
    let a = bind("127.0.0.2", identity(&ca, "auth1"), trust(&ca, names(&["auth2"])), small);
    let target = peer("auth2", &b);
    let err = a.request(&target, Bytes::from_static(b"big"), soon(5000)).await.unwrap_err();
    assert_eq!(err, RpcError::FrameTooLarge { len: 64 * 1024, max: Some(1024) });
    assert_eq!(a.request(&target, Bytes::from_static(b"small"), soon(5000)).await.unwrap(), &b"small"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_within_the_limit_flow() {
    let p = pair("127.0.0.2", "127.0.0.3");
    let body: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let reply = p.a.request(&peer("auth2", &p.b), Bytes::from(body.clone()), soon(30_000)).await.unwrap();
    assert!(reply.ends_with(&body));
}

#[test]
fn the_blocking_client_works_from_blocking_threads() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (client, target) = runtime.block_on(async {
        let p = pair("127.0.0.2", "127.0.0.3");
        let target = peer("auth2", &p.b);
        std::mem::forget(p.b); // keep serving for the whole test
        (BlockingClient::new(p.a, tokio::runtime::Handle::current()), target)
    });
    // From a plain thread.
    let c = client.clone();
    let t = target.clone();
    let reply = std::thread::spawn(move || c.request(&t, Bytes::from_static(b"thread"), soon(5000))).join().unwrap().unwrap();
    assert!(reply.ends_with(b"| thread"));
    // From tokio's blocking pool, as the validator does.
    let reply = runtime
        .block_on(
            async move { tokio::task::spawn_blocking(move || client.request(&target, Bytes::from_static(b"pool"), soon(5000))).await },
        )
        .unwrap()
        .unwrap();
    assert!(reply.ends_with(b"| pool"));
    runtime.shutdown_timeout(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_of_a_small_request_on_loopback() {
    let p = pair("127.0.0.2", "127.0.0.3");
    let target = peer("auth2", &p.b);
    let body = Bytes::from_static(b"0123456789abcdef0123456789abcdef");
    for _ in 0..50 {
        p.a.request(&target, body.clone(), soon(5000)).await.unwrap();
    }
    let mut samples = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let start = Instant::now();
        p.a.request(&target, body.clone(), soon(5000)).await.unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    let (median, p99, max) = (samples[500], samples[990], samples[999]);
    println!(
        "loopback RTT, 32-byte request, 1000 sequential requests on one connection ({} build): median {:?}, p99 {:?}, max {:?}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        median,
        p99,
        max
    );
    assert!(median < Duration::from_millis(50), "median {median:?}");
}

#[test]
fn settings_and_trust_are_checked() {
    let ca = ca("test CA");
    assert!(Trust::new(ca.cert_der().clone(), vec![]).is_err(), "no rules");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = runtime.enter();
    let bad = Settings { keep_alive: Duration::from_secs(5), idle_timeout: Duration::from_secs(10), ..Settings::default() };
    let err = Endpoint::bind(EndpointConfig {
        bind: "127.0.0.2:0".parse().unwrap(),
        identity: identity(&ca, "auth1"),
        trust: trust(&ca, names(&["auth2"])),
        settings: bad,
    })
    .unwrap_err();
    assert!(err.to_string().contains("keep-alive"), "{err}");
}

#[test]
fn ring_is_the_only_crypto_provider() {
    // The same check as `cargo tree -p replication | grep -i aws` (empty),
    // on the lock file of the whole workspace.
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let packages: Vec<&str> = lock.lines().filter_map(|l| l.strip_prefix("name = \"")).map(|l| l.trim_end_matches('"')).collect();
    assert!(packages.contains(&"ring"));
    assert!(packages.contains(&"quinn") && packages.contains(&"rustls"));
    let aws: Vec<_> = packages.iter().filter(|p| p.starts_with("aws-lc")).collect();
    assert!(aws.is_empty(), "aws-lc crept in: {aws:?}");
}
