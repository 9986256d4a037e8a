//! Load generator for the appliance's HTTP services (KSM, validator).
//!
//! - [`http`]: `httpd`'s small blocking HTTP/1.x client with a pure response parser;
//! - [`run`]: closed-loop load on `c` threads with per-request latency;
//! - [`stats`]: nearest-rank percentiles and run summaries;
//! - [`fleet`]: YubiKeys provisioned through a security module, emitting
//!   unique OTPs with known decoded fields;
//! - [`ksm_answer`]: parsing and checking KSM protocol answers;
//! - [`verify_answer`]: signed validation protocol 2.0 requests and strict
//!   checks of their answers;
//! - [`prometheus`]: reading `/metrics` scrapes back, for differences;
//! - [`harness`]: what the benchmark binaries share (child processes,
//!   ports, `/proc` memory, a cached large AEAD store).
//!
//! Load is meant for servers on this machine (loopback); every run is
//! bounded in request count and time.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod fleet;
pub mod harness;
pub use httpd::client as http;
pub mod ksm_answer;
pub mod prometheus;
pub mod run;
pub mod stats;
pub mod verify_answer;
