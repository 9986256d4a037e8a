//! Replication between the datacenters over QUIC: counters with no replay
//! window, AEADs and API clients.
//!
//! - [`quorum`]: the counter safety rule as a pure, sans-IO state machine
//!   (`handle(now, input) -> actions`), driven by tests with a fake clock,
//!   drops and reordering, and by the QUIC I/O in production;
//! - [`pki`]: the private CA and site certificates;
//! - [`transport`]: quinn with rustls (ring), mutual TLS plus a pinned
//!   authorization check, one bidirectional stream per request, a deadline
//!   on every request.
//! - [`wire`]: the versioned, bounded binary codec of [`quorum::Message`].
//! - [`node`]: the async driver of one site (machine, transport, peers, store).
//! - [`sync`]: catch-up (outbox pull) and anti-entropy (bucketed digests)
//!   of counters, AEADs and API clients behind one store trait.
//! - [`syncer`]: the sync exchange driven by the node (pullers per peer and
//!   dataset, serving, status).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod node;
pub mod pki;
pub mod quorum;
pub mod sync;
pub mod syncer;
pub mod transport;
pub mod wire;
