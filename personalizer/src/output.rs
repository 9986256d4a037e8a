//! Personalisation output: the one place plaintext YubiKey secrets leave
//! the module, to program the keys.
//!
//! Three formats, one line per YubiKey:
//!
//! - [`OutputFormat::YubikeyCsv`]: pyhsm's `yhsm-decrypt-aead --format
//!   yubikey-csv` line, see [`yubikey_csv_line`].
//! - [`OutputFormat::Ykpersonalize`]: a `ykpersonalize` command that programs
//!   slot 1 with the key, see [`ykpersonalize_line`].
//! - [`OutputFormat::Raw`]: the AEAD plaintext per public id, see
//!   [`raw_line`] (`personalizer decrypt-aead --format raw`).
//!
//! A [`SecretsFile`] is only ever a *new regular file*, created mode 0600
//! with `O_EXCL` (which also refuses symlinks); an existing path, `-`
//! (stdout), a directory, a device or a FIFO is refused. Nothing is written
//! to stdout. Lines are built in zeroizing buffers and written out in
//! blocks; the buffer is wiped after each block. A file that is not on a
//! RAM file system (tmpfs) gets a warning: its secrets may outlive the
//! session on disk.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use otp::{PublicId, YubiKeySecrets};
use zeroize::{Zeroize, Zeroizing};

/// `statfs` magic of tmpfs (`TMPFS_MAGIC`, linux/magic.h).
const TMPFS_MAGIC: i128 = 0x0102_1994;
/// `statfs` magic of ramfs (`RAMFS_MAGIC`).
const RAMFS_MAGIC: i128 = 0x8584_58f6;
/// Room for one line of either format (the longest, a yubikey-csv line
/// with a 20-digit number and a 16-character public id, is 117 bytes).
const LINE_ROOM: usize = 128;
/// Lines buffered by [`SecretsFile::create`].
const DEFAULT_LINES: usize = 512;

/// Errors of secrets output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The target is not a path a new private file can be made at.
    #[error("{0}")]
    Refused(String),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a line of secrets output looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// `n,<public id>,<uid hex>,<key hex>,000000000000,,,,,,`
    YubikeyCsv,
    /// `ykpersonalize -1 -ofixed=<public id> -ouid=<uid hex> -a<key hex> -y`
    Ykpersonalize,
    /// `<public id>,<key hex><uid hex>`
    Raw,
}

/// One line of pyhsm's `yhsm-decrypt-aead --format yubikey-csv`:
/// `n,<public id>,<uid hex>,<key hex>,000000000000,,,,,,`.
///
/// pyhsm prints `"%i,%s,%s,%s,%s,%s,,,,,"` with the access code
/// `000000000000` and an empty timestamp as the last two `%s`: eleven
/// fields, six commas after the access code.
pub fn yubikey_csv_line(n: u64, public_id: &PublicId, secrets: &YubiKeySecrets) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(LINE_ROOM));
    // Writing to a String cannot fail; the hex goes straight into the
    // zeroizing line (no temporary string), which never outgrows its room.
    let _ = write!(line, "{n},{public_id},");
    push_hex(&mut line, secrets.uid.expose());
    line.push(',');
    push_hex(&mut line, secrets.key.expose());
    line.push_str(",000000000000,,,,,,\n");
    line
}

/// Lower-case hex of `bytes`, appended without an intermediate string.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// A `ykpersonalize` command programming slot 1 of a YubiKey with this
/// public id (`-ofixed=`, modhex), private id (`-ouid=`, hex) and AES key
/// (`-a`, hex), without asking for confirmation (`-y`).
pub fn ykpersonalize_line(public_id: &PublicId, secrets: &YubiKeySecrets) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(LINE_ROOM));
    let _ = write!(line, "ykpersonalize -1 -ofixed={public_id} -ouid=");
    push_hex(&mut line, secrets.uid.expose());
    line.push_str(" -a");
    push_hex(&mut line, secrets.key.expose());
    line.push_str(" -y\n");
    line
}

/// The AEAD plaintext of a YubiKey, `key ‖ uid`, after its public id:
/// `<public id>,<key hex><uid hex>`.
pub fn raw_line(public_id: &PublicId, secrets: &YubiKeySecrets) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(LINE_ROOM));
    let _ = write!(line, "{public_id},");
    push_hex(&mut line, secrets.key.expose());
    push_hex(&mut line, secrets.uid.expose());
    line.push('\n');
    line
}

/// Is `file` on a RAM file system (tmpfs or ramfs)?
pub fn on_tmpfs(file: &File) -> std::io::Result<bool> {
    let st = rustix::fs::fstatfs(file)?;
    let kind = i128::from(st.f_type);
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
}

/// Check that `path` names nothing yet and could be a new private file:
/// refuses `-`, and any existing path (file, symlink, dangling or not,
/// directory, device, FIFO, socket) with a sentence saying what it is.
pub fn check_new_path(path: &Path) -> Result<(), OutputError> {
    if path.as_os_str() == "-" {
        return Err(OutputError::Refused("secrets are never written to stdout: give a new file name, not -".to_owned()));
    }
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(OutputError::Refused(format!("{} is not a file name", path.display())));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            let what = if t.is_symlink() {
                "is a symbolic link"
            } else if t.is_dir() {
                "is a directory"
            } else if t.is_fifo() {
                "is a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "is a device"
            } else if t.is_socket() {
                "is a socket"
            } else {
                "exists already"
            };
            Err(OutputError::Refused(format!("{} {what}; secrets go only to a new regular file, refusing to overwrite it", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OutputError::Io { path: path.to_path_buf(), source: e }),
    }
}

/// A new file of secrets output.
pub struct SecretsFile {
    file: File,
    path: PathBuf,
    format: OutputFormat,
    buf: Zeroizing<Vec<u8>>,
    lines: u64,
}

impl std::fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsFile").field("path", &self.path).field("format", &self.format).field("lines", &self.lines).finish()
    }
}

impl SecretsFile {
    /// Create `path` as a new regular file, mode 0600 (see
    /// [`check_new_path`] for what is refused). Warns, in the log and on
    /// stderr, when the file is not on a tmpfs.
    pub fn create(path: &Path, format: OutputFormat) -> Result<Self, OutputError> {
        Self::create_buffered(path, format, DEFAULT_LINES)
    }

    /// [`SecretsFile::create`], holding up to `lines` lines in memory:
    /// nothing reaches the file before [`SecretsFile::flush`] unless more
    /// lines are written. The buffer is allocated once (it never grows, so
    /// no copy of a secret is left behind in freed memory).
    pub fn create_buffered(path: &Path, format: OutputFormat, lines: usize) -> Result<Self, OutputError> {
        check_new_path(path)?;
        // O_CREAT|O_EXCL: fails on anything that appeared meanwhile,
        // symlinks included, and never follows one.
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => OutputError::Refused(format!(
                "{} exists already; secrets go only to a new regular file, refusing to overwrite it",
                path.display()
            )),
            _ => OutputError::Io { path: path.to_path_buf(), source: e },
        })?;
        match on_tmpfs(&file) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(path = %path.display(), "secrets output is not on a tmpfs");
                eprintln!(
                    "warning: {} is not on a tmpfs: the YubiKey secrets written to it may survive on disk; \
                     write them to a RAM file system (e.g. under /dev/shm) and shred them after programming",
                    path.display()
                );
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot tell the file system of the secrets output"),
        }
        let room = lines.max(1).saturating_mul(LINE_ROOM);
        Ok(Self { file, path: path.to_path_buf(), format, buf: Zeroizing::new(Vec::with_capacity(room)), lines: 0 })
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines written so far.
    #[must_use]
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Add the line of YubiKey number `n` (from 1).
    pub fn write(&mut self, n: u64, public_id: &PublicId, secrets: &YubiKeySecrets) -> Result<(), OutputError> {
        let line = match self.format {
            OutputFormat::YubikeyCsv => yubikey_csv_line(n, public_id, secrets),
            OutputFormat::Ykpersonalize => ykpersonalize_line(public_id, secrets),
            OutputFormat::Raw => raw_line(public_id, secrets),
        };
        if self.buf.len() + line.len() > self.buf.capacity() {
            self.flush_block()?;
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.lines += 1;
        Ok(())
    }

    /// Write what is buffered to the file (without fsync).
    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.flush_block()
    }

    fn flush_block(&mut self) -> Result<(), OutputError> {
        let r = self.file.write_all(&self.buf);
        // Wipes the whole capacity and empties the buffer; the capacity is kept.
        self.buf.zeroize();
        r.map_err(|e| OutputError::Io { path: self.path.clone(), source: e })
    }

    /// Give up: wipe what is buffered and remove the file (an output that
    /// failed half-way is not left behind).
    pub fn discard(mut self) {
        self.buf.zeroize();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Write what is buffered and make the file durable.
    pub fn finish(mut self) -> Result<PathBuf, OutputError> {
        self.flush_block()?;
        self.file.sync_all().map_err(|e| OutputError::Io { path: self.path.clone(), source: e })?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secrets() -> YubiKeySecrets {
        YubiKeySecrets::from_plaintext(&hex::decode("000102030405060708090a0b0c0d0e0f010203040506").unwrap()).unwrap()
    }

    #[test]
    fn line_formats() {
        let id = PublicId::from_number(1, 6).unwrap();
        assert_eq!(
            &*yubikey_csv_line(8, &id, &secrets()),
            "8,cccccccccccb,010203040506,000102030405060708090a0b0c0d0e0f,000000000000,,,,,,\n"
        );
        assert_eq!(
            &*ykpersonalize_line(&id, &secrets()),
            "ykpersonalize -1 -ofixed=cccccccccccb -ouid=010203040506 -a000102030405060708090a0b0c0d0e0f -y\n"
        );
    }

    #[test]
    fn the_longest_lines_fit_their_room() {
        let id = PublicId::from_number(u64::MAX, 8).unwrap();
        for line in [yubikey_csv_line(u64::MAX, &id, &secrets()), ykpersonalize_line(&id, &secrets())] {
            assert!(line.len() <= LINE_ROOM, "{}", line.len());
            assert_eq!(line.capacity(), LINE_ROOM, "never reallocated");
        }
    }

    #[test]
    fn only_new_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        std::fs::write(p("old"), "x").unwrap();
        std::os::unix::fs::symlink(p("old"), p("link")).unwrap();
        std::os::unix::fs::symlink(p("nowhere"), p("dangling")).unwrap();
        let refused = |path: &Path| SecretsFile::create(path, OutputFormat::YubikeyCsv).unwrap_err().to_string();
        assert!(refused(&p("old")).contains("exists already"));
        assert!(refused(&p("link")).contains("symbolic link"));
        assert!(refused(&p("dangling")).contains("symbolic link"));
        assert!(!p("nowhere").exists(), "a dangling symlink is not followed");
        assert!(refused(dir.path()).contains("is a directory"));
        assert!(refused(Path::new("-")).contains("stdout"));
        assert!(refused(Path::new("/dev/null")).contains("device"));
        assert_eq!(std::fs::read(p("old")).unwrap(), b"x");

        let mut f = SecretsFile::create(&p("new"), OutputFormat::Ykpersonalize).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        for n in 1..=2000 {
            f.write(n, &id, &secrets()).unwrap();
        }
        assert_eq!(f.lines(), 2000);
        f.finish().unwrap();
        let text = std::fs::read_to_string(p("new")).unwrap();
        assert_eq!(text.lines().count(), 2000);
        assert!(text.lines().all(|l| l == ykpersonalize_line(&id, &secrets()).trim_end()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(p("new")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn tmpfs_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        let on_disk = on_tmpfs(&f).unwrap();
        // /dev/shm is a tmpfs on every Linux system with glibc's shm_open.
        if let Ok(shm) = tempfile::tempfile_in("/dev/shm") {
            assert!(on_tmpfs(&shm).unwrap());
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let tmp_is_tmpfs = mounts.lines().any(|l| l.split(' ').nth(4) == Some("/tmp") && l.contains(" - tmpfs "));
        if std::env::temp_dir() == Path::new("/tmp") {
            assert_eq!(on_disk, tmp_is_tmpfs, "statfs and mountinfo disagree about /tmp");
        }
    }
}
