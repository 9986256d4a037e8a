//! Shared helpers for the appliance's end-to-end tests.
//!
//! - [`testkit`] reads the known-answer vector files under `tests/vectors/`
//!   (format: `tests/vectors/README.md`) and tracks which header keys a runner
//!   consumed, so that a misspelt key cannot be silently ignored;
//! - [`tools`] finds the external programs the oracle tests compare against and
//!   fails loudly, naming the package to install, when one is missing.
//!
//! The tests themselves live in `tests/tests/*.rs`.
#![forbid(unsafe_code)]

pub mod testkit;
pub mod tools;
