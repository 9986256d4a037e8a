//! The YubiHSM 1 in HSM mode, over its USB serial line.
//!
//! - [`proto`]: the frame codec and the typed commands, without I/O;
//! - [`client`]: [`client::Yhsm1`], the backend on a serial line;
//! - [`daemon`]: one process owns the port and shares it on a Unix socket;
//! - [`emulator`]: a YubiHSM 1 emulated in software, for tests (served on a
//!   pty by the `yhsm1-emulator` binary).

pub mod client;
pub mod daemon;
pub mod emulator;
pub mod proto;
