//! Request/response RPC between sites over QUIC with mutual TLS.
//!
//! One [`Endpoint`] per site, bound to one UDP address, both dials
//! ([`Endpoint::request`]) and accepts ([`Endpoint::serve`]). This module
//! moves bytes and decides nothing: what a request means is up to the
//! [`Handler`].
//!
//! # Security
//!
//! - TLS 1.3 only, ring provider only, ALPN [`ALPN`].
//! - **Mutual TLS plus authorization.** Both sides require a certificate
//!   that chains to the private CA ([`Trust::ca`]) *and* matches one of the
//!   [`PeerRule`]s: a pinned SHA-256 [`Fingerprint`] of the end-entity
//!   certificate and/or an allowed DNS name. The server checks the client
//!   inside the handshake (a CA-verified but unauthorized client gets the
//!   TLS alert `access_denied`); the client checks the server's name
//!   against the dialled [`Peer::name`] inside the handshake and the rules
//!   right after it, before any request is sent
//!   ([`RpcError::PeerNotAuthorized`]).
//! - **No 0-RTT, no resumption.** The server's `max_early_data_size` is 0,
//!   `Connecting::into_0rtt` is never called, session tickets are off, so
//!   every connection runs a full handshake with both certificates
//!   verified against the current rules.
//! - Caveat of TLS 1.3: a client whose certificate the server refuses sees
//!   the handshake complete and learns of the refusal on its first request
//!   ([`RpcError::RefusedByPeer`]).
//!
//! # Wire format
//!
//! One bidirectional stream per request. The client writes one frame (a
//! 4-byte big-endian length, then that many bytes) and finishes its send
//! side; the server answers with one frame and finishes. Frames are
//! bounded by [`Settings::max_frame`] (16 MiB by default) on both sides, so
//! no peer can make the other allocate more. A receiver refusing a frame
//! resets the stream with [`codes::FRAME_TOO_LARGE`].
//!
//! # Deadlines and connections
//!
//! Every [`Endpoint::request`] takes a deadline covering connecting,
//! sending and the reply. Connections are dialled on first use, shared by
//! all requests to the same peer, and dialled again once lost. QUIC
//! keep-alives ([`Settings::keep_alive`]) and the idle timeout
//! ([`Settings::idle_timeout`]) detect dead peers; a peer that restarts
//! with the same identity answers packets of the old connection with a
//! stateless reset (the reset and connection-ID keys are derived from the
//! site key), so the
//! first request after a restart fails fast with
//! [`RpcError::ConnectionLost`] and the next one reconnects. Requests are
//! not retried here: only the caller knows whether a request may be
//! repeated.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, ReadError, ReadExactError, VarInt, WriteError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use zeroize::Zeroizing;

use crate::pki::{self, Fingerprint, Identity};

/// The ALPN protocol both sides must offer.
pub const ALPN: &[u8] = b"otp-appliance-repl/1";

/// Default largest frame, in bytes, either way: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// QUIC application error codes used on streams and connections.
pub mod codes {
    use quinn::VarInt;

    /// Connection close: the endpoint shuts down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// Connection close: the peer's certificate matches no authorization rule.
    pub const NOT_AUTHORIZED: VarInt = VarInt::from_u32(1);
    /// Stream reset/stop: a frame was larger than the receiver's limit.
    pub const FRAME_TOO_LARGE: VarInt = VarInt::from_u32(2);
    /// Stream reset: the server gave up on the request (its own deadline).
    pub const SERVER_TIMEOUT: VarInt = VarInt::from_u32(3);
    /// Stream reset/stop: a malformed frame (stream ended inside it).
    pub const BAD_FRAME: VarInt = VarInt::from_u32(4);
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The deadline passed before the reply arrived (connecting included).
    #[error("deadline passed before the reply")]
    Timeout,
    /// The peer's certificate chains to our CA but matches none of our
    /// authorization rules: we refused it and sent nothing.
    #[error("peer {peer} refused: its certificate {fingerprint} (names: {names:?}) matches no authorization rule")]
    PeerNotAuthorized {
        /// The name we dialled.
        peer: String,
        /// Its certificate's fingerprint.
        fingerprint: Fingerprint,
        /// Its certificate's DNS names.
        names: Vec<String>,
    },
    /// The peer refused our certificate (a TLS certificate alert from it:
    /// other CA, not authorized, expired …).
    #[error("the peer refused our certificate: {0}")]
    RefusedByPeer(String),
    /// The TLS handshake failed on our side (peer certificate from another
    /// CA, wrong name, no common ALPN or cipher suite …).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The connection could not be established, or was lost, reset or
    /// closed, or the stream was reset.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// A frame exceeded a size limit: `max` is our limit (our request or the
    /// peer's reply), `None` when the peer refused our request.
    #[error("frame of {len} bytes too large (limit: {})", max.map_or_else(|| "the peer's".to_string(), |m| m.to_string()))]
    FrameTooLarge {
        /// The frame's length.
        len: u64,
        /// Our limit, when we are the one refusing.
        max: Option<u64>,
    },
    /// This endpoint was closed.
    #[error("endpoint closed")]
    Closed,
}

/// Errors setting up an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding the UDP socket failed, or no tokio runtime is running.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused (bad key, bad CA certificate …).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Settings out of range.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// An authorization rule with neither a name nor a pin, or no rules.
    #[error("invalid trust configuration: {0}")]
    Trust(String),
}

/// Who may talk to us: one of these must match the peer's end-entity
/// certificate (which must also chain to the CA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRule {
    name: Option<String>,
    pin: Option<Fingerprint>,
}

impl PeerRule {
    /// The certificate must carry this DNS name.
    pub fn name(name: impl Into<String>) -> Self {
        Self { name: Some(name.into()), pin: None }
    }

    /// The certificate must have this SHA-256 fingerprint.
    pub fn pin(fingerprint: Fingerprint) -> Self {
        Self { name: None, pin: Some(fingerprint) }
    }

    /// Both: this name and this fingerprint.
    pub fn name_and_pin(name: impl Into<String>, fingerprint: Fingerprint) -> Self {
        Self { name: Some(name.into()), pin: Some(fingerprint) }
    }

    fn matches(&self, fingerprint: &Fingerprint, names: &[String]) -> bool {
        let name_ok = self.name.as_ref().is_none_or(|n| names.iter().any(|have| have.eq_ignore_ascii_case(n)));
        let pin_ok = self.pin.as_ref().is_none_or(|p| p == fingerprint);
        name_ok && pin_ok
    }
}

/// The CA that signs every site certificate, and the authorization rules.
#[derive(Clone, Debug)]
pub struct Trust {
    ca: CertificateDer<'static>,
    rules: Vec<PeerRule>,
}

/// A certificate that matches no [`PeerRule`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Its DNS names.
    pub names: Vec<String>,
}

impl Trust {
    /// The CA certificate and at least one rule; every rule names a name,
    /// a pin or both.
    pub fn new(ca: CertificateDer<'static>, rules: Vec<PeerRule>) -> Result<Self, Error> {
        if rules.is_empty() {
            return Err(Error::Trust("no authorization rule: no peer could ever connect".into()));
        }
        if rules.iter().any(|r| r.name.is_none() && r.pin.is_none()) {
            return Err(Error::Trust("a rule needs a name, a pin or both".into()));
        }
        Ok(Self { ca, rules })
    }

    /// The CA certificate.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The rules.
    pub fn rules(&self) -> &[PeerRule] {
        &self.rules
    }

    /// Applies the rules to an end-entity certificate already verified
    /// against the CA. The identity's name is the matching rule's name, or
    /// the certificate's first DNS name for a pin-only rule.
    pub fn authorize(&self, end_entity: &[u8]) -> Result<PeerIdentity, Refusal> {
        let fingerprint = Fingerprint::of(end_entity);
        let names = pki::dns_names(end_entity).unwrap_or_default();
        for rule in &self.rules {
            if rule.matches(&fingerprint, &names) {
                let name = rule.name.clone().or_else(|| names.first().cloned()).unwrap_or_default();
                return Ok(PeerIdentity { name, fingerprint });
            }
        }
        Err(Refusal { fingerprint, names })
    }
}

/// An authorized peer, as the [`Handler`] sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The authorized name.
    pub name: String,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
}

/// A peer to send requests to: its certificate must carry `name` (checked
/// in the handshake, no DNS involved) and match a [`PeerRule`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Its site name (DNS name in its certificate).
    pub name: String,
    /// Its UDP address.
    pub addr: SocketAddr,
}

impl Peer {
    /// A peer.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Self { name: name.into(), addr }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// The first round-trip estimate before any packet came back.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Transport tuning. Use the same values at every site: the effective idle
/// timeout is the smaller of both, and keep-alives must come well within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A connection with no packet from the peer for this long is dead.
    pub idle_timeout: Duration,
    /// Keep-alive interval; at most a third of the idle timeout.
    pub keep_alive: Duration,
    /// Concurrent requests a peer may have open on one connection; more
    /// wait for a free slot (within their deadline).
    pub max_concurrent_requests: u32,
    /// Largest frame accepted or sent, either way.
    pub max_frame: usize,
    /// The server's own limit for reading a request, running the handler
    /// and writing the reply.
    pub server_deadline: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
            max_concurrent_requests: 256,
            max_frame: DEFAULT_MAX_FRAME,
            server_deadline: Duration::from_secs(30),
        }
    }
}

impl Settings {
    fn check(&self) -> Result<(), Error> {
        if self.keep_alive.is_zero() || self.keep_alive.saturating_mul(3) > self.idle_timeout {
            return Err(Error::Settings("keep-alive must be non-zero and at most a third of the idle timeout".into()));
        }
        if self.max_frame == 0 || u32::try_from(self.max_frame).is_err() {
            return Err(Error::Settings("max_frame must be between 1 and 4 GiB - 1".into()));
        }
        if self.max_concurrent_requests == 0 {
            return Err(Error::Settings("max_concurrent_requests must be at least 1".into()));
        }
        Ok(())
    }

    fn transport(&self) -> Result<quinn::TransportConfig, Error> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|e| Error::Settings(format!("idle timeout: {e}")))?;
        let mut t = quinn::TransportConfig::default();
        // quinn's default first RTT guess (333 ms) makes the first
        // retransmission of a handshake wait about a second: a site dialling
        // a peer that is just starting would sit that long. Links between
        // datacenters are far faster; the estimate adapts from the first
        // reply anyway.
        t.initial_rtt(INITIAL_RTT);
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_requests))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        Ok(t)
    }
}

/// What an [`Endpoint`] needs.
#[derive(Debug)]
pub struct EndpointConfig {
    /// The UDP address to bind; requests go out from it too.
    pub bind: SocketAddr,
    /// This site's certificate and key.
    pub identity: Identity,
    /// The CA and the authorization rules for peers.
    pub trust: Trust,
    /// Timeouts and limits.
    pub settings: Settings,
}

/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Bytes> + Send + 'static>>;

/// Answers requests. Called once per request, concurrently, on the tokio
/// runtime; the returned reply is sent back as one frame. Slow or
/// blocking work belongs in `spawn_blocking`. Any
/// `Fn(PeerIdentity, Bytes) -> impl Future<Output = Bytes>` closure is a
/// handler.
pub trait Handler: Send + Sync + 'static {
    /// The reply to `request` from `peer`.
    fn handle(&self, peer: PeerIdentity, request: Bytes) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(PeerIdentity, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send + 'static,
{
    fn handle(&self, peer: PeerIdentity, request: Bytes) -> HandlerFuture {
        Box::pin(self(peer, request))
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// Connection counters of an [`Endpoint`] since it was bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections we dialled that completed and were authorized.
    pub dialled: u64,
    /// Incoming connections that completed and were authorized.
    pub accepted: u64,
    /// Peers refused by our checks, either way (CA or authorization rule).
    pub refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dialled: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// One more on a statistics counter (relaxed: read only for reports).
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    trust: Arc<Trust>,
    settings: Settings,
    connections: Mutex<HashMap<Peer, Slot>>,
    counters: Arc<Counters>,
}

/// A site's QUIC endpoint: requests out, [`serve`](Self::serve) in. Cheap
/// to clone (shared state).
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("local_addr", &self.local_addr().ok()).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side's client verifier: the CA (WebPKI, client auth EKU)
/// then the rules, both inside the handshake.
#[derive(Debug)]
struct AuthorizingClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust: Arc<Trust>,
    counters: Arc<Counters>,
}

impl ClientCertVerifier for AuthorizingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.webpki.verify_client_cert(end_entity, intermediates, now).inspect_err(|e| {
            bump(&self.counters.refused);
            tracing::warn!(fingerprint = %Fingerprint::of(end_entity), error = %e, "client certificate refused");
        })?;
        match self.trust.authorize(end_entity) {
            Ok(_) => Ok(verified),
            Err(refusal) => {
                bump(&self.counters.refused);
                tracing::warn!(
                    fingerprint = %refusal.fingerprint,
                    names = ?refusal.names,
                    "client certificate from our CA matches no authorization rule: refused"
                );
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The client side's server verifier: WebPKI (CA, server auth EKU, the
/// dialled name), counting refusals. The rules are applied after the
/// handshake, in [`Endpoint::request`], to report a typed error.
#[derive(Debug)]
struct CountingServerVerifier {
    webpki: Arc<dyn ServerCertVerifier>,
    counters: Arc<Counters>,
}

impl ServerCertVerifier for CountingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).inspect_err(|e| {
            bump(&self.counters.refused);
            tracing::warn!(fingerprint = %Fingerprint::of(end_entity), error = %e, "server certificate refused");
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Per-site secrets derived from the site key, stable across restarts:
/// the QUIC stateless-reset key, and the key of the connection-ID
/// generator that tells our own connection IDs from junk. Both must survive
/// a restart so that a restarted peer recognises packets of connections it
/// has forgotten and resets them, instead of leaving them to the idle
/// timeout.
fn derived_endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let key = identity.key();
    let derive = |label: &[u8]| {
        let mut h = Sha256::new();
        h.update(b"otp-appliance-repl/1 ");
        h.update(label);
        h.update([0u8]);
        h.update(key.secret_der());
        Zeroizing::new(<[u8; 32]>::from(h.finalize()))
    };
    let reset = derive(b"stateless reset key");
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref())));
    let cid = derive(b"connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

fn tls_configs(
    identity: &Identity,
    trust: &Arc<Trust>,
    counters: &Arc<Counters>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), Error> {
    let tls_err = |e: rustls::Error| Error::Tls(e.to_string());
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(trust.ca.clone()).map_err(tls_err)?;
    let roots = Arc::new(roots);

    let webpki_client =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().map_err(|e| Error::Tls(e.to_string()))?;
    let verifier = Arc::new(AuthorizingClientVerifier { webpki: webpki_client, trust: trust.clone(), counters: counters.clone() });
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der().clone()], identity.key())
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT (replayable) and no resumption: every connection verifies
    // both certificates against the current rules.
    server.max_early_data_size = 0;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});

    let webpki_server: Arc<dyn ServerCertVerifier> =
        WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build().map_err(|e| Error::Tls(e.to_string()))?;
    // `dangerous()` only because the verifier is a wrapper: it is WebPKI
    // with our CA as the only root, unchanged.
    let server_verifier = Arc::new(CountingServerVerifier { webpki: webpki_server, counters: counters.clone() });
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.key())
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.resumption = Resumption::disabled();
    Ok((server, client))
}

impl Endpoint {
    /// Binds the UDP socket and builds the TLS configuration. Must be called
    /// from within a tokio runtime (multi-threaded, with I/O and time
    /// enabled); the endpoint lives on that runtime.
    pub fn bind(config: EndpointConfig) -> Result<Self, Error> {
        config.settings.check()?;
        let trust = Arc::new(config.trust);
        let counters = Arc::new(Counters::default());
        let (server_tls, client_tls) = tls_configs(&config.identity, &trust, &counters)?;
        let transport = Arc::new(config.settings.transport()?);

        let server_crypto = QuicServerConfig::try_from(server_tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        // Sites have fixed addresses; a migrating peer is suspicious.
        server.migration(false);

        let client_crypto = QuicClientConfig::try_from(client_tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let endpoint_config = derived_endpoint_config(&config.identity);
        let bind_err = |source| Error::Bind { addr: config.bind, source };
        Handle::try_current().map_err(|e| bind_err(std::io::Error::other(e)))?;
        let socket = std::net::UdpSocket::bind(config.bind).map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime)).map_err(bind_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                client,
                trust,
                settings: config.settings,
                connections: Mutex::new(HashMap::new()),
                counters,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Connection counters since the endpoint was bound.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            dialled: c.dialled.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }

    /// QUIC's smoothed round-trip estimate of the connection to `peer`
    /// (the network path alone, no request processing), if one is up.
    #[must_use]
    pub fn path_rtt(&self, peer: &Peer) -> Option<Duration> {
        let slot = self.inner.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(peer).cloned()?;
        let guard = slot.try_lock().ok()?;
        guard.as_ref().filter(|c| c.close_reason().is_none()).map(quinn::Connection::rtt)
    }

    /// Closes every connection (peers see [`codes::SHUTDOWN`]) and stops
    /// [`serve`](Self::serve). Requests in flight fail.
    pub fn close(&self) {
        self.inner.endpoint.close(codes::SHUTDOWN, b"shutdown");
    }

    /// Waits until every connection has finished closing (after
    /// [`close`](Self::close)), so that the peers heard of it.
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }

    /// Sends `request` to `peer` and returns its reply, or fails by
    /// `deadline` at the latest. Dials the peer if no connection is up.
    pub async fn request(&self, peer: &Peer, request: Bytes, deadline: Instant) -> Result<Bytes, RpcError> {
        let max = self.inner.settings.max_frame;
        if request.len() > max {
            return Err(RpcError::FrameTooLarge { len: request.len() as u64, max: Some(max as u64) });
        }
        let work = async {
            let conn = self.connection(peer).await?;
            exchange(&conn, request, max).await
        };
        match tokio::time::timeout_at(deadline.into(), work).await {
            Ok(Err(e @ RpcError::RefusedByPeer(_))) => {
                // TLS 1.3: the handshake looked fine to us; this is the
                // first sign that the peer does not accept our certificate.
                tracing::warn!(%peer, error = %e, "request refused: the peer does not accept our certificate");
                Err(e)
            }
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout),
        }
    }

    /// A live connection to `peer`: the cached one, or a new one. One dial
    /// at a time per peer; concurrent requests wait for it.
    async fn connection(&self, peer: &Peer) -> Result<quinn::Connection, RpcError> {
        let slot = {
            let mut map = self.inner.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry(peer.clone()).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
            tracing::debug!(%peer, "connection lost; dialling again");
        }
        *guard = None;
        let conn = self.dial(peer).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, peer: &Peer) -> Result<quinn::Connection, RpcError> {
        let server_name =
            ServerName::try_from(peer.name.clone()).map_err(|e| RpcError::Tls(format!("invalid peer name {:?}: {e}", peer.name)))?;
        let connecting =
            self.inner.endpoint.connect_with(self.inner.client.clone(), peer.addr, &server_name.to_str()).map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => RpcError::Closed,
                e => RpcError::ConnectionLost(format!("cannot dial {peer}: {e}")),
            })?;
        let conn = connecting.await.map_err(|e| {
            let err = connection_error(e);
            tracing::warn!(%peer, error = %err, "connecting failed");
            err
        })?;
        let leaf = leaf_certificate(&conn).ok_or_else(|| RpcError::Tls("peer presented no certificate".into()))?;
        match self.inner.trust.authorize(&leaf) {
            Ok(identity) => {
                bump(&self.inner.counters.dialled);
                tracing::info!(%peer, fingerprint = %identity.fingerprint, "connected");
                Ok(conn)
            }
            Err(refusal) => {
                bump(&self.inner.counters.refused);
                conn.close(codes::NOT_AUTHORIZED, b"not authorized");
                tracing::warn!(%peer, fingerprint = %refusal.fingerprint, names = ?refusal.names,
                    "peer certificate from our CA matches no authorization rule: refused");
                Err(RpcError::PeerNotAuthorized { peer: peer.name.clone(), fingerprint: refusal.fingerprint, names: refusal.names })
            }
        }
    }

    /// Accepts connections and answers their requests with `handler`
    /// until the endpoint is [closed](Self::close). Run it as a task:
    /// `tokio::spawn(endpoint.clone().serve(handler))`. Each connection and
    /// each request runs in its own task; a request gets
    /// [`Settings::server_deadline`] for reading, handling and replying.
    pub async fn serve<H: Handler>(self, handler: H) {
        let handler: Arc<dyn Handler> = Arc::new(handler);
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let handler = handler.clone();
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "incoming connection failed");
                        return;
                    }
                };
                let identity = match leaf_certificate(&conn).map(|leaf| inner.trust.authorize(&leaf)) {
                    Some(Ok(identity)) => identity,
                    _ => {
                        // The verifier already refused these; defence in depth.
                        bump(&inner.counters.refused);
                        conn.close(codes::NOT_AUTHORIZED, b"not authorized");
                        tracing::warn!(%remote, "connection without an authorized certificate closed");
                        return;
                    }
                };
                bump(&inner.counters.accepted);
                tracing::info!(%remote, peer = %identity.name, fingerprint = %identity.fingerprint, "peer connected");
                serve_connection(conn, identity, handler, inner.settings.clone()).await;
            });
        }
    }
}

async fn serve_connection(conn: quinn::Connection, identity: PeerIdentity, handler: Arc<dyn Handler>, settings: Settings) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::info!(peer = %identity.name, reason = %e, "peer connection ended");
                return;
            }
        };
        let handler = handler.clone();
        let identity = identity.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let max = settings.max_frame;
            let work = async {
                let request = match read_frame(&mut recv, max).await {
                    Ok(request) => request,
                    Err(FrameError::TooLarge(len)) => {
                        tracing::warn!(peer = %identity.name, len, max, "request frame too large: refused");
                        let _ = recv.stop(codes::FRAME_TOO_LARGE);
                        let _ = send.reset(codes::FRAME_TOO_LARGE);
                        return;
                    }
                    Err(FrameError::Truncated) => {
                        let _ = send.reset(codes::BAD_FRAME);
                        return;
                    }
                    Err(FrameError::Read(e)) => {
                        tracing::debug!(peer = %identity.name, error = %e, "reading request failed");
                        return;
                    }
                };
                let reply = handler.handle(identity.clone(), request).await;
                if reply.len() > max {
                    tracing::error!(peer = %identity.name, len = reply.len(), max, "reply frame too large: not sent");
                    let _ = send.reset(codes::FRAME_TOO_LARGE);
                    return;
                }
                if let Err(e) = write_frame(&mut send, reply).await {
                    tracing::debug!(peer = %identity.name, error = %e, "writing reply failed");
                }
            };
            if tokio::time::timeout(settings.server_deadline, work).await.is_err() {
                tracing::warn!(peer = %identity.name, "request not answered within the server deadline: stream reset");
                let _ = send.reset(codes::SERVER_TIMEOUT);
                let _ = recv.stop(codes::SERVER_TIMEOUT);
            }
        });
    }
}

fn leaf_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// One request on a new stream: frame out, finish, frame back.
async fn exchange(conn: &quinn::Connection, request: Bytes, max: usize) -> Result<Bytes, RpcError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(connection_error)?;
    let len = request.len() as u64;
    match write_frame(&mut send, request).await {
        Ok(()) => {}
        // The peer stopped reading: its answer (a reset code) is on the
        // receive side.
        Err(WriteError::Stopped(code)) if code == codes::FRAME_TOO_LARGE => {
            return Err(RpcError::FrameTooLarge { len, max: None });
        }
        Err(e) => return Err(write_error(e, &mut recv, len).await),
    }
    match read_frame(&mut recv, max).await {
        Ok(reply) => Ok(reply),
        Err(FrameError::TooLarge(reply_len)) => {
            let _ = recv.stop(codes::FRAME_TOO_LARGE);
            Err(RpcError::FrameTooLarge { len: reply_len, max: Some(max as u64) })
        }
        Err(FrameError::Truncated) => Err(RpcError::ConnectionLost("the peer ended the stream without a complete reply".into())),
        Err(FrameError::Read(ReadError::Reset(code))) if code == codes::FRAME_TOO_LARGE => Err(RpcError::FrameTooLarge { len, max: None }),
        Err(FrameError::Read(e)) => Err(read_error(e)),
    }
}

async fn write_error(e: WriteError, recv: &mut quinn::RecvStream, len: u64) -> RpcError {
    match e {
        WriteError::ConnectionLost(c) => connection_error(c),
        WriteError::Stopped(code) => {
            // See whether the peer also reset its side with a reason.
            let mut byte = [0u8; 1];
            match recv.read(&mut byte).await {
                Err(ReadError::Reset(c)) if c == codes::FRAME_TOO_LARGE => RpcError::FrameTooLarge { len, max: None },
                _ => RpcError::ConnectionLost(format!("the peer stopped the stream (code {code})")),
            }
        }
        e => RpcError::ConnectionLost(e.to_string()),
    }
}

fn read_error(e: ReadError) -> RpcError {
    match e {
        ReadError::ConnectionLost(c) => connection_error(c),
        ReadError::Reset(code) if code == codes::SERVER_TIMEOUT => {
            RpcError::ConnectionLost("the peer gave up on the request (its server deadline)".into())
        }
        ReadError::Reset(code) => RpcError::ConnectionLost(format!("the peer reset the stream (code {code})")),
        e => RpcError::ConnectionLost(e.to_string()),
    }
}

/// TLS alerts a peer sends when it refuses our certificate.
fn is_certificate_alert(alert: u8) -> bool {
    // bad_certificate, unsupported_certificate, certificate_revoked,
    // certificate_expired, certificate_unknown, unknown_ca, access_denied,
    // certificate_required.
    matches!(alert, 42..=46 | 48 | 49 | 116)
}

fn alert_name(alert: u8) -> &'static str {
    match alert {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired",
        46 => "certificate unknown",
        48 => "unknown CA",
        49 => "access denied (not authorized)",
        116 => "certificate required",
        120 => "no application protocol (ALPN)",
        _ => "handshake failure",
    }
}

fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let raw = u64::from(code);
    (0x100..0x200).contains(&raw).then_some((raw & 0xff) as u8)
}

fn connection_error(e: ConnectionError) -> RpcError {
    match e {
        ConnectionError::TransportError(t) => match crypto_alert(t.code) {
            Some(_) => RpcError::Tls(t.reason.clone()),
            None => RpcError::ConnectionLost(t.to_string()),
        },
        ConnectionError::ConnectionClosed(close) => match crypto_alert(close.error_code) {
            Some(alert) if is_certificate_alert(alert) => RpcError::RefusedByPeer(format!("TLS alert {alert}: {}", alert_name(alert))),
            Some(alert) => RpcError::Tls(format!("the peer aborted the handshake: TLS alert {alert}: {}", alert_name(alert))),
            None => RpcError::ConnectionLost(format!("aborted by the peer: {close}")),
        },
        ConnectionError::ApplicationClosed(close) if close.error_code == codes::NOT_AUTHORIZED => {
            RpcError::RefusedByPeer("the peer closed the connection: not authorized".into())
        }
        ConnectionError::ApplicationClosed(close) => RpcError::ConnectionLost(format!("closed by the peer: {close}")),
        ConnectionError::Reset => RpcError::ConnectionLost("reset by the peer (restarted?)".into()),
        ConnectionError::TimedOut => RpcError::ConnectionLost("no packet from the peer within the idle timeout".into()),
        ConnectionError::LocallyClosed => RpcError::Closed,
        e => RpcError::ConnectionLost(e.to_string()),
    }
}

enum FrameError {
    TooLarge(u64),
    Truncated,
    Read(ReadError),
}

async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Bytes, FrameError> {
    let exact = |e: ReadExactError| match e {
        ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        ReadExactError::ReadError(e) => FrameError::Read(e),
    };
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(exact)?;
    let len = u32::from_be_bytes(header);
    if len as usize > max {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    let mut body = vec![0u8; len as usize];
    recv.read_exact(&mut body).await.map_err(exact)?;
    Ok(Bytes::from(body))
}

async fn write_frame(send: &mut quinn::SendStream, payload: Bytes) -> Result<(), WriteError> {
    // Callers check the length against max_frame, which fits in u32.
    let len = u32::try_from(payload.len()).map_err(|_| WriteError::ClosedStream)?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(&payload).await?;
    send.finish().map_err(|_| WriteError::ClosedStream)
}

/// [`Endpoint::request`] for blocking code, such as the validator's
/// decisions on tokio's blocking pool.
///
/// Call it from a thread that is **not** running async code: a
/// `tokio::task::spawn_blocking` closure or a plain `std::thread`. The
/// request runs on the endpoint's runtime through `Handle::block_on`, which
/// panics if called from inside an async task (tokio's own check), and
/// would otherwise stall a runtime worker.
#[derive(Clone, Debug)]
pub struct BlockingClient {
    endpoint: Endpoint,
    handle: Handle,
}

impl BlockingClient {
    /// `handle` is the runtime the endpoint was bound on.
    pub fn new(endpoint: Endpoint, handle: Handle) -> Self {
        Self { endpoint, handle }
    }

    /// Blocks until the reply, an error, or `deadline`.
    pub fn request(&self, peer: &Peer, request: Bytes, deadline: Instant) -> Result<Bytes, RpcError> {
        self.handle.block_on(self.endpoint.request(peer, request, deadline))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::pki::Ca;

    #[test]
    fn tls_configs_have_no_early_data_and_one_alpn() {
        // TLS 1.2 is not even compiled in: rustls' `tls12` feature is off.
        let ca = Ca::generate("t", Duration::from_secs(86_400)).unwrap();
        let identity = ca.issue("auth1", Duration::from_secs(86_400)).unwrap().identity().unwrap();
        let trust = Arc::new(Trust::new(ca.cert_der().clone(), vec![PeerRule::name("auth2")]).unwrap());
        let (server, client) = tls_configs(&identity, &trust, &Arc::new(Counters::default())).unwrap();
        assert_eq!(server.max_early_data_size, 0, "no 0-RTT");
        assert_eq!(server.send_tls13_tickets, 0, "no resumption");
        assert!(!client.enable_early_data);
        assert_eq!(server.alpn_protocols, [ALPN.to_vec()]);
        assert_eq!(client.alpn_protocols, [ALPN.to_vec()]);
        assert!(client.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn rules() {
        let fp = Fingerprint::of(b"cert");
        let names = vec!["auth1".to_string()];
        assert!(PeerRule::name("auth1").matches(&fp, &names));
        assert!(PeerRule::name("AUTH1").matches(&fp, &names), "DNS names ignore case");
        assert!(!PeerRule::name("auth2").matches(&fp, &names));
        assert!(PeerRule::pin(fp).matches(&fp, &[]));
        assert!(!PeerRule::pin(Fingerprint::of(b"other")).matches(&fp, &names));
        assert!(PeerRule::name_and_pin("auth1", fp).matches(&fp, &names));
        assert!(!PeerRule::name_and_pin("auth1", fp).matches(&Fingerprint::of(b"other"), &names));
        assert!(!PeerRule::name_and_pin("auth2", fp).matches(&fp, &names));
    }

    #[test]
    fn alerts_are_classified() {
        let closed = |alert: u8| {
            connection_error(ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(alert),
                frame_type: None,
                reason: Bytes::new(),
            }))
        };
        assert!(matches!(closed(48), RpcError::RefusedByPeer(m) if m.contains("unknown CA")));
        assert!(matches!(closed(49), RpcError::RefusedByPeer(m) if m.contains("access denied")));
        assert!(matches!(closed(120), RpcError::Tls(m) if m.contains("ALPN")));
        assert_eq!(connection_error(ConnectionError::LocallyClosed), RpcError::Closed);
        assert!(matches!(connection_error(ConnectionError::TimedOut), RpcError::ConnectionLost(_)));
    }
}
