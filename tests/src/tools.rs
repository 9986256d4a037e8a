//! Locating the external programs used as oracles.
//!
//! A missing oracle is a test failure, never a skip: the message names the
//! Debian package that provides it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The hint appended to every "missing tool" message.
pub const HINT: &str = "or run the README's test command, which installs the test dependencies";

/// Search `PATH` for an executable file called `name`.
#[must_use]
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(p: &std::path::Path) -> bool {
    p.is_file()
}

/// The path of `name`, or a panic telling which package to install.
///
/// # Panics
/// If `name` is not on `PATH`.
#[must_use]
pub fn require(name: &str, package: &str) -> PathBuf {
    match find_in_path(name) {
        Some(p) => p,
        None => panic!("{name} not found on PATH: apt-get install {package}, {HINT}"),
    }
}

/// `python3`, checked to have the `cryptography` module.
///
/// # Panics
/// If `python3` is missing, or cannot import `cryptography`'s AESCCM.
#[must_use]
pub fn require_python_cryptography() -> PathBuf {
    let python = require("python3", "python3");
    let out = Command::new(&python)
        .args(["-c", "from cryptography.hazmat.primitives.ciphers.aead import AESCCM"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "python3 cannot import cryptography's AESCCM: apt-get install python3-cryptography (or pip install cryptography), {HINT}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    python
}
