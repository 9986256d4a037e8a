//! Shared helpers for the appliance's end-to-end tests.
//!
//! - [`testkit`] reads the known-answer vector files under `tests/vectors/`
//!   (format: `tests/vectors/README.md`) and tracks which header keys a runner
//!   consumed, so that a misspelt key cannot be silently ignored;
//! - [`softhsm2`] makes throwaway SoftHSM2 token directories;
//! - [`yhsm1`] runs the YubiHSM 1 emulator on a pty for a test;
//! - [`tools`] finds the external programs the oracle tests compare against and
//!   fails loudly, naming the package to install, when one is missing.
//!
//! The tests themselves live in `tests/tests/*.rs`.
#![forbid(unsafe_code)]

pub mod softhsm2;
pub mod testkit;
pub mod tools;
pub mod yhsm1;
