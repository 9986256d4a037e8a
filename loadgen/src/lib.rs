//! Load generator for the appliance's HTTP services (KSM, validator).
//!
//! - [`http`]: `httpd`'s small blocking HTTP/1.x client with a pure response parser;
//! - [`run`]: closed-loop load on `c` threads with per-request latency;
//! - [`stats`]: nearest-rank percentiles and run summaries;
//! - [`fleet`]: YubiKeys provisioned through a security module, emitting
//!   unique OTPs with known decoded fields;
//! - [`ksm_answer`]: parsing and checking KSM protocol answers.
//!
//! Load is meant for servers on this machine (loopback); every run is
//! bounded in request count and time.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod fleet;
pub use httpd::client as http;
pub mod ksm_answer;
pub mod run;
pub mod stats;
