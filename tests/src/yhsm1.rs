//! The `yhsm1-emulator` binary, run for a test.
//!
//! The emulator prints the path of its pty's slave (`/dev/pts/N`) and serves
//! the YubiHSM 1 protocol there. Test threads start and kill emulators
//! concurrently, and the kernel hands a freed pty number to the next pty
//! opened, so a client reconnecting to the path of a killed emulator could
//! reach another test's one. [`Emulator`] therefore holds a descriptor of
//! its slave from start to drop: while it is open the number stays taken,
//! and after a kill the path is simply gone, as a pulled stick's
//! `/dev/ttyACM0` is.

// A fixture that cannot be set up fails the test that asked for it.
#![allow(clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `yhsm1-emulator` binary, for tests outside the `hsm` package (which
/// get it as `CARGO_BIN_EXE_yhsm1-emulator`): in the test executable's
/// target directory, where `cargo test --workspace` builds it.
///
/// # Panics
/// If it has not been built, saying how to build it.
#[must_use]
pub fn emulator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("a target directory");
    let bin = profile_dir.join("yhsm1-emulator");
    assert!(
        bin.is_file(),
        "{} is missing: run the workspace tests (`cargo test --workspace`) or `cargo build -p hsm --bin yhsm1-emulator` first",
        bin.display()
    );
    bin
}

/// A running emulator; killed and reaped on drop.
pub struct Emulator {
    child: Child,
    path: PathBuf,
    _pin: File,
    _dir: tempfile::TempDir,
}

/// pyhsm's key file (`{"1": "hex key", ...}`) for these key handles.
#[must_use]
pub fn keys_json<'a>(keys: impl IntoIterator<Item = (u32, &'a [u8])>) -> String {
    let entries: Vec<String> = keys.into_iter().map(|(kh, key)| format!("\"{kh}\": \"{}\"", hex::encode(key))).collect();
    format!("{{{}}}", entries.join(", "))
}

impl Emulator {
    /// Start `binary` (the test's `CARGO_BIN_EXE_yhsm1-emulator`) on the key
    /// file `keys_json`, with `args` added (flags, lock). It ends with this
    /// process too (`--exit-on-stdin-eof`).
    ///
    /// # Panics
    /// If it does not start and print a pty path.
    #[must_use]
    pub fn start<S: AsRef<std::ffi::OsStr>>(binary: &Path, keys_json: &str, args: &[S]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, keys_json).expect("keys.json");
        let mut child = Command::new(binary)
            .arg("--keys")
            .arg(&keys)
            .arg("--exit-on-stdin-eof")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the emulator's pty path");
        let path = PathBuf::from(line.trim());
        assert!(path.starts_with("/dev/pts/"), "yhsm1-emulator printed {line:?}, not a pty path");
        // Neither read nor written: it only keeps the pty number taken.
        let pin = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { child, path, _pin: pin, _dir: dir }
    }

    /// The pty to open, like a `/dev/ttyACM0`.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stick pulled: the process is killed and its path disappears (the
    /// number stays taken until drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
    }
}
