//! Signed transfer bundles: the one file that carries AEADs from the
//! air-gapped personalisation laptop to the KSM and auth servers.
//!
//! A bundle holds, for every YubiKey, its public id and one AEAD per key
//! handle, followed by a manifest signed with the personalizer's RSA-2048 /
//! SHA-256 key ([`hsm::signing::SigningKey`]). [`BundleWriter`] streams the
//! entries to disk and signs at the end; [`verify`], [`read_verified`] and
//! [`import_bundle`] check the signature with a trusted public key *before*
//! anything is handed out or imported.
//!
//! # Format (version 1)
//!
//! Text, one record per line, every line ends with `\n` (no `\r`, no
//! trailing spaces, hex in lower case). `<kh>` is a key handle as exactly 8
//! hex digits (the big-endian `u32`, e.g. `00002000`).
//!
//! | Line | Bytes | Covered by |
//! |---|---|---|
//! | 1 (header) | `ksm-aead-bundle 1 <kh>[ <kh>…]\n`: the magic word, the format version, then 1 to [`MAX_KEY_HANDLES`] distinct key handles separated by single spaces | body hash |
//! | 2 … count+1 (entries) | `<public id> <kh>:<nonce>:<aead>[ <kh>:<nonce>:<aead>…]\n`: the public id in modhex (1 to 8 bytes, 2 to 16 characters), then exactly one field per header key handle, in header order; `<nonce>` is 12 hex digits (6 bytes), `<aead>` 18 to 144 hex digits (9 to 72 bytes) | body hash |
//! | count+2 (manifest) | `manifest <JSON>\n`: one line of JSON, see [`Manifest`] | signature |
//! | count+3 (signature) | `signature <base64>\n`: standard base64 (with padding) of the 256-byte RSASSA-PKCS1-v1_5 SHA-256 signature | — |
//!
//! Nothing may follow the signature line. Every line is at most
//! [`MAX_LINE`] bytes; a bundle holds 1 to [`MAX_ENTRIES`] entries.
//!
//! The **body** is lines 1 to count+1 exactly as stored; the manifest
//! carries its SHA-256. The manifest JSON has exactly these fields:
//! `format` (`"ksm-aead-bundle"`), `version` (1), `origin` (who made it, at
//! most [`MAX_ORIGIN`] characters, no control characters), `created` (Unix
//! seconds), `key_handles` (canonical `0x…` strings, as in the header),
//! `count`, `first_public_id` and `last_public_id` (modhex, the first and
//! last entry as written, not sorted), `body_sha256` (hex) and `signer`
//! (the signing key's fingerprint, [`VerifyingKey::fingerprint`]).
//!
//! The **signature** is over [`SIGNATURE_DOMAIN`] followed by the manifest
//! JSON bytes exactly as they appear on the line, so a bundle signature can
//! never be mistaken for any other signature the same key makes.
//!
//! # Verification order
//!
//! One streaming pass reads the whole file: it frames the lines, hashes the
//! body and parses the entries (remembering only the first bad entry). Then,
//! in this order: the signature must verify with the trusted key (else
//! [`BundleError::BadSignature`], or [`BundleError::WrongSigner`] when the
//! manifest names another key), the manifest must be well formed and name
//! the trusted key, the body hash must match the manifest (else
//! [`BundleError::HashMismatch`]), and only then are parse errors of the
//! entries, the key handles, the count and the first and last public ids
//! checked. A file that ends early is [`BundleError::Truncated`].
//!
//! # Reading twice without trusting the disk twice
//!
//! [`read_verified`] and [`import_bundle`] read the file a second time to
//! hand out the entries. The first pass keeps the body hash *so far* after
//! every [`CHUNK_ENTRIES`] entries (32 bytes per chunk: 32 KiB for a
//! million entries; nothing else grows with the bundle). The second pass
//! holds one chunk at a time and hands out its entries only after the hash
//! so far matches the one verified; so every entry handed out is byte for
//! byte one that was verified, and a file changed in between is refused
//! with [`BundleError::Changed`] before any entry of the changed chunk is
//! used. The second pass reads through the file descriptor the first pass
//! opened: a bundle replaced under its name in between is not read at all.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hsm::signing::{SigningError, SigningKey, VerifyingKey};
use indicatif::ProgressBar;
use otp::aead::MAX_AEAD;
use otp::aead_file::AeadRecord;
use otp::otp::MAX_PUBLIC_ID_CHARS;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::import::{ImportReport, Location, BATCH};
use crate::store::{AeadStore, PutOutcome};
use crate::LookupError;

/// The magic word that starts a bundle (and names it in the manifest).
pub const MAGIC: &str = "ksm-aead-bundle";
/// The only format version.
pub const VERSION: u32 = 1;
/// Prefix of the signed message, before the manifest JSON.
pub const SIGNATURE_DOMAIN: &[u8] = b"ksm-aead-bundle manifest v1\n";
/// Most key handles a bundle lists.
pub const MAX_KEY_HANDLES: usize = 16;
/// Most entries (YubiKeys) in one bundle.
pub const MAX_ENTRIES: u64 = 100_000_000;
/// Longest line, `\n` included. An entry with [`MAX_KEY_HANDLES`] AEADs of
/// the largest size fits.
pub const MAX_LINE: usize = 4096;
/// Longest origin string, in characters.
pub const MAX_ORIGIN: usize = 256;
/// Entries per chunk of the second pass (see the module docs).
pub const CHUNK_ENTRIES: u64 = 1024;

const MANIFEST_PREFIX: &[u8] = b"manifest ";
const SIGNATURE_PREFIX: &[u8] = b"signature ";
const READ_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// Why a bundle could not be written, verified or imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The signature does not verify with the trusted key.
    #[error(
        "the bundle's signature does not verify with the trusted key {trusted}: \
         its manifest or signature was altered"
    )]
    BadSignature {
        /// Fingerprint of the trusted key.
        trusted: String,
    },
    /// The file changed between the verification and the second reading.
    #[error("the bundle changed on disk after it was verified ({0}); nothing from that point on was used")]
    Changed(String),
    /// The bundle to write exists already.
    #[error("{} already exists; a transfer bundle is never overwritten", .0.display())]
    Exists(PathBuf),
    /// The body is not the one the signed manifest describes.
    #[error("the bundle's entries do not match its signed manifest (SHA-256 {found}, signed {expected}): they were altered")]
    HashMismatch {
        /// SHA-256 the manifest carries, hex.
        expected: String,
        /// SHA-256 of the body as read, hex.
        found: String,
    },
    /// What was given to the writer cannot go into a bundle.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of the bundle is not what the format allows.
    #[error("bundle line {line}: {what}")]
    Malformed {
        /// The line (1-based).
        line: u64,
        /// What is wrong with it.
        what: String,
    },
    /// The signing key failed.
    #[error("cannot sign the bundle: {0}")]
    Signing(#[from] SigningError),
    /// The AEAD store failed.
    #[error(transparent)]
    Store(#[from] LookupError),
    /// The file ends before its signature line does.
    #[error("the bundle is truncated: {0}")]
    Truncated(String),
    /// The manifest names another signing key, and the signature does not
    /// verify with the trusted one.
    #[error("the bundle's signature is by key {found} (as its manifest says), not by the trusted key {expected}")]
    WrongSigner {
        /// Fingerprint of the trusted key.
        expected: String,
        /// Fingerprint the manifest names.
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// A bundle's signed manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Who made the bundle (free text given to [`BundleWriter::create`]).
    pub origin: String,
    /// When it was signed, Unix seconds.
    pub created: i64,
    /// The key handles of every entry, in order.
    pub key_handles: Vec<KeyHandle>,
    /// Number of entries (YubiKeys); each holds one AEAD per key handle.
    pub count: u64,
    /// Public id of the first entry.
    pub first_public_id: PublicId,
    /// Public id of the last entry.
    pub last_public_id: PublicId,
    /// SHA-256 of the body (header and entry lines).
    pub body_sha256: [u8; 32],
    /// Fingerprint of the signing key ([`VerifyingKey::fingerprint`]).
    pub signer: String,
}

/// The manifest as JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireManifest {
    format: String,
    version: u32,
    origin: String,
    created: i64,
    key_handles: Vec<String>,
    count: u64,
    first_public_id: String,
    last_public_id: String,
    body_sha256: String,
    signer: String,
}

/// Only the signer, read from a manifest whose signature failed, to name it.
#[derive(Deserialize)]
struct ClaimedSigner {
    signer: String,
}

impl From<&Manifest> for WireManifest {
    fn from(m: &Manifest) -> Self {
        Self {
            format: MAGIC.to_owned(),
            version: m.version,
            origin: m.origin.clone(),
            created: m.created,
            key_handles: m.key_handles.iter().map(|kh| kh.canonical()).collect(),
            count: m.count,
            first_public_id: m.first_public_id.to_modhex(),
            last_public_id: m.last_public_id.to_modhex(),
            body_sha256: hex::encode(m.body_sha256),
            signer: m.signer.clone(),
        }
    }
}

impl WireManifest {
    fn into_manifest(self) -> Result<Manifest, String> {
        if self.format != MAGIC {
            return Err(format!("the manifest's format is {:?}, not {MAGIC:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!("manifest version {} is not supported (this ksm reads version {VERSION})", self.version));
        }
        check_origin(&self.origin).map_err(|e| format!("manifest {e}"))?;
        let mut key_handles = Vec::with_capacity(self.key_handles.len());
        for text in &self.key_handles {
            match text.parse::<KeyHandle>() {
                Ok(kh) if kh.canonical() == *text => key_handles.push(kh),
                _ => return Err(format!("manifest key handle {text:?} is not in the canonical 0x-hex form")),
            }
        }
        let id = |text: &str, what: &str| {
            PublicId::from_modhex(text).map_err(|e| format!("manifest {what} {text:?}: {e}")).and_then(|id| {
                if id.as_bytes().is_empty() {
                    Err(format!("manifest {what} is empty"))
                } else {
                    Ok(id)
                }
            })
        };
        let first_public_id = id(&self.first_public_id, "first public id")?;
        let last_public_id = id(&self.last_public_id, "last public id")?;
        let mut body_sha256 = [0u8; 32];
        hex::decode_to_slice(&self.body_sha256, &mut body_sha256).map_err(|_| "manifest body_sha256 is not 64 hex digits".to_owned())?;
        Ok(Manifest {
            version: self.version,
            origin: self.origin,
            created: self.created,
            key_handles,
            count: self.count,
            first_public_id,
            last_public_id,
            body_sha256,
            signer: self.signer,
        })
    }
}

fn check_origin(origin: &str) -> Result<(), String> {
    if origin.chars().count() > MAX_ORIGIN {
        return Err(format!("origin is longer than {MAX_ORIGIN} characters"));
    }
    if origin.chars().any(char::is_control) {
        return Err("origin contains control characters".to_owned());
    }
    Ok(())
}

fn check_key_handles(key_handles: &[KeyHandle]) -> Result<(), String> {
    if key_handles.is_empty() {
        return Err("a bundle needs at least one key handle".to_owned());
    }
    if key_handles.len() > MAX_KEY_HANDLES {
        return Err(format!("{} key handles: a bundle lists at most {MAX_KEY_HANDLES}", key_handles.len()));
    }
    for (i, kh) in key_handles.iter().enumerate() {
        if key_handles[..i].contains(kh) {
            return Err(format!("key handle {kh} is listed twice"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ writing

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0x0f)]);
    }
}

fn push_key_handle(out: &mut Vec<u8>, kh: KeyHandle) {
    push_hex(out, &kh.get().to_be_bytes());
}

/// Streams a bundle to disk; see the [module docs](self) for the format.
///
/// Entries go through a buffer to a hidden temporary file in the target
/// directory (mode 0600); [`BundleWriter::finish`] signs, syncs and renames
/// it into place. Dropping the writer without finishing removes the
/// temporary file: a bundle exists under its final name only when complete.
pub struct BundleWriter {
    path: PathBuf,
    out: BufWriter<tempfile::NamedTempFile>,
    key_handles: Vec<KeyHandle>,
    origin: String,
    body: Sha256,
    count: u64,
    first: Option<PublicId>,
    last: Option<PublicId>,
    line: Vec<u8>,
}

impl fmt::Debug for BundleWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleWriter")
            .field("path", &self.path)
            .field("key_handles", &self.key_handles)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl BundleWriter {
    /// Start a bundle at `path`, which must not exist, for AEADs under
    /// `key_handles` (1 to [`MAX_KEY_HANDLES`], distinct, in the order
    /// every entry will give them). `origin` says who makes it (for
    /// example the personalizer's host and batch).
    pub fn create(path: &Path, key_handles: &[KeyHandle], origin: &str) -> Result<Self, BundleError> {
        check_key_handles(key_handles).map_err(BundleError::Invalid)?;
        check_origin(origin).map_err(BundleError::Invalid)?;
        match path.symlink_metadata() {
            Ok(_) => return Err(BundleError::Exists(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        let name = path.file_name().ok_or_else(|| BundleError::Invalid(format!("{} is not a file name", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let tmp = tempfile::Builder::new().prefix(&prefix).suffix(".partial").tempfile_in(dir).map_err(io_err(dir))?;
        let mut writer = Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(WRITE_BUFFER, tmp),
            key_handles: key_handles.to_vec(),
            origin: origin.to_owned(),
            body: Sha256::new(),
            count: 0,
            first: None,
            last: None,
            line: Vec::with_capacity(MAX_LINE),
        };
        writer.line.extend_from_slice(MAGIC.as_bytes());
        writer.line.extend_from_slice(format!(" {VERSION}").as_bytes());
        for kh in key_handles {
            writer.line.push(b' ');
            push_key_handle(&mut writer.line, *kh);
        }
        writer.line.push(b'\n');
        writer.write_line()?;
        Ok(writer)
    }

    fn write_line(&mut self) -> Result<(), BundleError> {
        self.body.update(&self.line);
        let path = &self.path;
        self.out.write_all(&self.line).map_err(io_err(path))
    }

    /// Add one YubiKey: its public id (1 to 8 bytes) and one AEAD per key
    /// handle, in the order given to [`BundleWriter::create`].
    pub fn add(&mut self, public_id: &PublicId, records: &[AeadRecord]) -> Result<(), BundleError> {
        let entry = self.count + 1;
        if public_id.as_bytes().is_empty() {
            return Err(BundleError::Invalid(format!("entry {entry}: the public id is empty")));
        }
        if records.len() != self.key_handles.len() {
            return Err(BundleError::Invalid(format!(
                "entry {entry} (public id {public_id}): {} AEADs given, the bundle has {} key handles",
                records.len(),
                self.key_handles.len()
            )));
        }
        for (i, (record, kh)) in records.iter().zip(&self.key_handles).enumerate() {
            if record.key_handle != *kh {
                return Err(BundleError::Invalid(format!(
                    "entry {entry} (public id {public_id}): AEAD {} is for key handle {}, the bundle lists {kh} in that place",
                    i + 1,
                    record.key_handle
                )));
            }
        }
        if self.count >= MAX_ENTRIES {
            return Err(BundleError::Invalid(format!("a bundle holds at most {MAX_ENTRIES} entries")));
        }
        self.line.clear();
        self.line.extend_from_slice(public_id.to_modhex().as_bytes());
        for record in records {
            self.line.push(b' ');
            push_key_handle(&mut self.line, record.key_handle);
            self.line.push(b':');
            push_hex(&mut self.line, record.nonce.as_bytes());
            self.line.push(b':');
            push_hex(&mut self.line, record.aead.as_bytes());
        }
        self.line.push(b'\n');
        self.write_line()?;
        self.count += 1;
        self.first.get_or_insert(*public_id);
        self.last = Some(*public_id);
        Ok(())
    }

    /// Entries added so far.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Write the manifest, sign it with `key`, sync the file and rename it
    /// to its final name (refused if something took that name meanwhile),
    /// then sync the directory. A bundle needs at least one entry.
    pub fn finish(self, key: &SigningKey) -> Result<Manifest, BundleError> {
        let Self { path, mut out, key_handles, origin, body, count, first, last, .. } = self;
        let (Some(first_public_id), Some(last_public_id)) = (first, last) else {
            return Err(BundleError::Invalid("the bundle holds no entries; nothing to sign".to_owned()));
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let manifest = Manifest {
            version: VERSION,
            origin,
            created,
            key_handles,
            count,
            first_public_id,
            last_public_id,
            body_sha256: body.finalize().into(),
            signer: key.verifying_key().fingerprint(),
        };
        let json = serde_json::to_string(&WireManifest::from(&manifest))
            .map_err(|e| BundleError::Invalid(format!("cannot encode the manifest: {e}")))?;
        let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + json.len());
        message.extend_from_slice(SIGNATURE_DOMAIN);
        message.extend_from_slice(json.as_bytes());
        let signature = BASE64.encode(key.sign(&message)?);
        let mut trailer = Vec::with_capacity(json.len() + signature.len() + 32);
        trailer.extend_from_slice(MANIFEST_PREFIX);
        trailer.extend_from_slice(json.as_bytes());
        trailer.push(b'\n');
        trailer.extend_from_slice(SIGNATURE_PREFIX);
        trailer.extend_from_slice(signature.as_bytes());
        trailer.push(b'\n');
        out.write_all(&trailer).map_err(io_err(&path))?;
        let tmp = out.into_inner().map_err(|e| io_err(&path)(e.into_error()))?;
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        match tmp.persist_noclobber(&path) {
            Ok(_) => {}
            Err(e) if e.error.kind() == ErrorKind::AlreadyExists => return Err(BundleError::Exists(path)),
            Err(e) => return Err(io_err(&path)(e.error)),
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        Ok(manifest)
    }
}

// ------------------------------------------------------------------ reading

/// What [`next_line`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framed {
    /// A complete line, `\n` included.
    Line,
    /// End of file, nothing read.
    Eof,
    /// End of file inside a line.
    Partial,
    /// No `\n` within [`MAX_LINE`] bytes (the reader stops mid-line).
    TooLong,
}

/// Read one line, `\n` included, into `line` (at most [`MAX_LINE`] bytes).
fn next_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<Framed> {
    line.clear();
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() { Framed::Eof } else { Framed::Partial });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Ok(Framed::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(Framed::Line);
        }
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_key_handle(text: &str) -> Option<KeyHandle> {
    if text.len() != 8 || !is_lower_hex(text) {
        return None;
    }
    u32::from_str_radix(text, 16).ok().map(KeyHandle::new)
}

/// The header line without its `\n`: the key handles after the magic word
/// and version. `Err((fatal, what))`: a fatal error means this is not a
/// bundle this code can read at all.
fn parse_header(line: &[u8]) -> Result<Vec<KeyHandle>, (bool, String)> {
    let Some(rest) = line.strip_prefix(MAGIC.as_bytes()).and_then(|r| r.strip_prefix(b" ")) else {
        return Err((true, format!("not a transfer bundle: the file does not start with `{MAGIC} {VERSION}`")));
    };
    let rest = std::str::from_utf8(rest).map_err(|_| (true, "the header is not ASCII text".to_owned()))?;
    let (version, handles) = rest.split_once(' ').unwrap_or((rest, ""));
    if version != VERSION.to_string() {
        let shown: String = version.chars().take(12).collect();
        return Err((true, format!("bundle format version {shown:?} is not supported (this ksm reads version {VERSION})")));
    }
    let mut key_handles = Vec::new();
    for (i, text) in handles.split(' ').enumerate() {
        if i >= MAX_KEY_HANDLES {
            return Err((false, format!("the header lists more than {MAX_KEY_HANDLES} key handles")));
        }
        let Some(kh) = parse_key_handle(text) else {
            return Err((false, format!("header key handle {} is not 8 lowercase hex digits", i + 1)));
        };
        key_handles.push(kh);
    }
    check_key_handles(&key_handles).map_err(|e| (false, format!("header: {e}")))?;
    Ok(key_handles)
}

/// One entry line without its `\n`, into `records` (cleared first).
fn parse_entry(line: &[u8], key_handles: &[KeyHandle], records: &mut Vec<AeadRecord>) -> Result<PublicId, String> {
    records.clear();
    let text = std::str::from_utf8(line).map_err(|_| "the entry is not ASCII text".to_owned())?;
    let fields = text.split(' ').count().saturating_sub(1);
    let mut parts = text.split(' ');
    let id_text = parts.next().unwrap_or_default();
    if id_text.is_empty() {
        return Err("the public id is missing".to_owned());
    }
    if id_text.len() > MAX_PUBLIC_ID_CHARS {
        return Err(format!("the public id is longer than {MAX_PUBLIC_ID_CHARS} characters"));
    }
    let public_id = PublicId::from_modhex(id_text).map_err(|e| format!("public id {id_text:?}: {e}"))?;
    if fields != key_handles.len() {
        return Err(format!("public id {public_id}: {fields} AEADs, the header lists {} key handles", key_handles.len()));
    }
    for (i, (field, kh)) in parts.zip(key_handles).enumerate() {
        let n = i + 1;
        let bad = |what: &str| format!("public id {public_id}, AEAD {n}: {what}");
        let mut pieces = field.split(':');
        let (Some(kh_text), Some(nonce_text), Some(aead_text), None) = (pieces.next(), pieces.next(), pieces.next(), pieces.next()) else {
            return Err(bad("expected <key handle>:<nonce>:<aead>"));
        };
        let found = parse_key_handle(kh_text).ok_or_else(|| bad("the key handle is not 8 lowercase hex digits"))?;
        if found != *kh {
            return Err(bad(&format!("is for key handle {found}, the header lists {kh} in that place")));
        }
        let mut nonce = [0u8; 6];
        if nonce_text.len() != 12 || !is_lower_hex(nonce_text) || hex::decode_to_slice(nonce_text, &mut nonce).is_err() {
            return Err(bad("the nonce is not 12 lowercase hex digits"));
        }
        let mut buf = [0u8; MAX_AEAD];
        let bytes = match buf.get_mut(..aead_text.len() / 2) {
            Some(bytes) if aead_text.len().is_multiple_of(2) && aead_text.len() >= 18 && is_lower_hex(aead_text) => bytes,
            _ => return Err(bad("the AEAD is not 18 to 144 lowercase hex digits (9 to 72 bytes)")),
        };
        hex::decode_to_slice(aead_text, bytes).map_err(|e| bad(&format!("the AEAD is not hex: {e}")))?;
        let aead = Aead::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
        records.push(AeadRecord { key_handle: *kh, nonce: AeadNonce::new(nonce), aead });
    }
    Ok(public_id)
}

/// The line without its `\n` (callers only pass complete lines).
fn content(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// The first pass's result: the verified manifest, the body hash so far
/// after each full chunk, and the open file for the second pass.
struct Verified {
    manifest: Manifest,
    checkpoints: Vec<[u8; 32]>,
    file: File,
    path: PathBuf,
}

/// The first pass: frame, hash, parse, then check in the documented order.
fn verify_file(path: &Path, trust: &VerifyingKey) -> Result<Verified, BundleError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, &file);
    let mut line = Vec::with_capacity(MAX_LINE);
    let read = |reader: &mut BufReader<&File>, line: &mut Vec<u8>| next_line(reader, line).map_err(io_err(path));
    let too_long = |n: u64| BundleError::Malformed { line: n, what: format!("longer than {MAX_LINE} bytes") };

    // Line 1: the header.
    match read(&mut reader, &mut line)? {
        Framed::Line => {}
        Framed::Eof => return Err(BundleError::Truncated("the file is empty".to_owned())),
        Framed::Partial if MAGIC.as_bytes().starts_with(&line) || line.starts_with(MAGIC.as_bytes()) => {
            return Err(BundleError::Truncated("the file ends inside line 1".to_owned()));
        }
        Framed::Partial => {
            return Err(BundleError::Malformed { line: 1, what: format!("not a transfer bundle (no `{MAGIC}` header line)") });
        }
        Framed::TooLong => return Err(too_long(1)),
    }
    let mut body = Sha256::new();
    body.update(&line);
    // The first problem of the body, reported only if the signature and the
    // hash hold (an altered body is a hash mismatch first).
    let mut first_error: Option<(u64, String)> = None;
    let key_handles = match parse_header(content(&line)) {
        Ok(k) => k,
        Err((true, what)) => return Err(BundleError::Malformed { line: 1, what }),
        Err((false, what)) => {
            first_error = Some((1, what));
            Vec::new()
        }
    };

    // Entries, up to the manifest line.
    let mut number = 1u64;
    let mut count = 0u64;
    let mut first: Option<PublicId> = None;
    let mut last: Option<PublicId> = None;
    let mut checkpoints = Vec::new();
    let mut records = Vec::with_capacity(MAX_KEY_HANDLES);
    loop {
        number += 1;
        match read(&mut reader, &mut line)? {
            Framed::Line => {}
            Framed::Eof => {
                return Err(BundleError::Truncated(format!("the file ends after line {} without a manifest", number - 1)));
            }
            Framed::Partial => return Err(BundleError::Truncated(format!("the file ends inside line {number}"))),
            Framed::TooLong => return Err(too_long(number)),
        }
        if line.starts_with(MANIFEST_PREFIX) {
            break;
        }
        body.update(&line);
        count += 1;
        if count > MAX_ENTRIES {
            return Err(BundleError::Malformed { line: number, what: format!("a bundle holds at most {MAX_ENTRIES} entries") });
        }
        if first_error.is_none() {
            match parse_entry(content(&line), &key_handles, &mut records) {
                Ok(id) => {
                    first.get_or_insert(id);
                    last = Some(id);
                }
                Err(what) => first_error = Some((number, what)),
            }
        }
        if count.is_multiple_of(CHUNK_ENTRIES) {
            checkpoints.push(body.clone().finalize().into());
        }
    }
    let manifest_line = number;
    let json = content(&line)[MANIFEST_PREFIX.len()..].to_vec();

    // The signature line, then the end of the file.
    number += 1;
    match read(&mut reader, &mut line)? {
        Framed::Line => {}
        Framed::Eof => return Err(BundleError::Truncated("the file ends after the manifest, without a signature".to_owned())),
        Framed::Partial => return Err(BundleError::Truncated(format!("the file ends inside the signature (line {number})"))),
        Framed::TooLong => return Err(too_long(number)),
    }
    let Some(encoded) = content(&line).strip_prefix(SIGNATURE_PREFIX) else {
        return Err(BundleError::Malformed { line: number, what: "expected the signature line after the manifest".to_owned() });
    };
    let mut extra = [0u8; 1];
    if reader.read(&mut extra).map_err(io_err(path))? != 0 {
        return Err(BundleError::Malformed { line: number + 1, what: "nothing may follow the signature line".to_owned() });
    }
    let signature = BASE64
        .decode(encoded)
        .map_err(|_| BundleError::Malformed { line: number, what: "the signature is not standard base64".to_owned() })?;

    // The signature first: nothing else in the manifest is believed before.
    let trusted = trust.fingerprint();
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + json.len());
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(&json);
    if trust.verify(&message, &signature).is_err() {
        return Err(match serde_json::from_slice::<ClaimedSigner>(&json) {
            Ok(claimed) if claimed.signer != trusted => {
                let found: String = claimed.signer.chars().filter(char::is_ascii_alphanumeric).take(64).collect();
                BundleError::WrongSigner { expected: trusted, found }
            }
            _ => BundleError::BadSignature { trusted },
        });
    }
    let malformed_manifest = |what: String| BundleError::Malformed { line: manifest_line, what };
    let wire: WireManifest = serde_json::from_slice(&json).map_err(|e| malformed_manifest(format!("manifest: {e}")))?;
    let manifest = wire.into_manifest().map_err(malformed_manifest)?;
    if manifest.signer != trusted {
        return Err(malformed_manifest(format!(
            "the manifest names signer {} but is signed by the trusted key {trusted}",
            manifest.signer
        )));
    }
    let computed: [u8; 32] = body.finalize().into();
    if !bool::from(computed.ct_eq(&manifest.body_sha256)) {
        return Err(BundleError::HashMismatch { expected: hex::encode(manifest.body_sha256), found: hex::encode(computed) });
    }
    if let Some((line, what)) = first_error {
        return Err(BundleError::Malformed { line, what });
    }
    if manifest.key_handles != key_handles {
        return Err(malformed_manifest("the manifest's key handles differ from the header's".to_owned()));
    }
    if manifest.count != count {
        return Err(malformed_manifest(format!("the manifest counts {} entries, the bundle holds {count}", manifest.count)));
    }
    if first != Some(manifest.first_public_id) || last != Some(manifest.last_public_id) {
        return Err(malformed_manifest("the manifest's first or last public id differs from the entries".to_owned()));
    }
    drop(reader);
    Ok(Verified { manifest, checkpoints, file, path: path.to_path_buf() })
}

/// The second pass: re-read the same open file one chunk at a time and hand
/// out a chunk's entries (with their line numbers) only once the body hash
/// so far matches the first pass's.
fn replay(verified: &Verified, mut f: impl FnMut(&PublicId, &[AeadRecord], u64) -> Result<(), BundleError>) -> Result<(), BundleError> {
    let path = verified.path.as_path();
    let mut file = &verified.file;
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut chunk: Vec<u8> = Vec::new();
    let mut body = Sha256::new();
    let changed = |what: String| BundleError::Changed(what);
    if next_line(&mut reader, &mut line).map_err(io_err(path))? != Framed::Line {
        return Err(changed("line 1 is no longer complete".to_owned()));
    }
    body.update(&line);
    let key_handles = &verified.manifest.key_handles;
    let mut records = Vec::with_capacity(key_handles.len());
    let mut checkpoints = verified.checkpoints.iter();
    let (mut number, mut count, mut chunk_start) = (1u64, 0u64, 2u64);
    loop {
        number += 1;
        if next_line(&mut reader, &mut line).map_err(io_err(path))? != Framed::Line {
            return Err(changed(format!("line {number} is no longer complete")));
        }
        let at_manifest = line.starts_with(MANIFEST_PREFIX);
        if !at_manifest {
            body.update(&line);
            chunk.extend_from_slice(&line);
            count += 1;
            if count > verified.manifest.count {
                return Err(changed(format!("line {number} is a new entry")));
            }
        }
        if at_manifest || count.is_multiple_of(CHUNK_ENTRIES) {
            let so_far: [u8; 32] = body.clone().finalize().into();
            let expected = if at_manifest { Some(&verified.manifest.body_sha256) } else { checkpoints.next() };
            if !expected.is_some_and(|e| bool::from(so_far.ct_eq(e))) {
                return Err(changed(format!("lines {chunk_start} to {number} differ from what was verified")));
            }
            for (i, raw) in chunk.split_inclusive(|&b| b == b'\n').enumerate() {
                let at = chunk_start + i as u64;
                let public_id = parse_entry(content(raw), key_handles, &mut records)
                    .map_err(|what| changed(format!("line {at} no longer parses: {what}")))?;
                f(&public_id, &records, at)?;
            }
            chunk.clear();
            chunk_start = number + 1;
        }
        if at_manifest {
            return Ok(());
        }
    }
}

/// Verify a bundle completely (framing, signature with `trust`, manifest,
/// body hash, every entry, counts) without importing anything.
pub fn verify(path: &Path, trust: &VerifyingKey) -> Result<Manifest, BundleError> {
    verify_file(path, trust).map(|v| v.manifest)
}

/// Verify a bundle as [`verify`] does, then call `f` for each entry (public
/// id and its AEADs, one per key handle in manifest order), reading the file
/// a second time; refused with [`BundleError::Changed`] if it changed since
/// (see the module docs). An error from `f` stops the reading.
pub fn read_verified(
    path: &Path,
    trust: &VerifyingKey,
    mut f: impl FnMut(&PublicId, &[AeadRecord]) -> Result<(), BundleError>,
) -> Result<Manifest, BundleError> {
    let verified = verify_file(path, trust)?;
    replay(&verified, |public_id, records, _| f(public_id, records))?;
    Ok(verified.manifest)
}

/// What [`import_bundle`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleImport {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The import's counts (one per AEAD, not per YubiKey), as for the
    /// other import sources.
    pub report: ImportReport,
}

/// Verify a bundle with `trust`, then import its AEADs into `store` as the
/// other imports do: idempotent, a pair held with other bytes is a conflict
/// (the newcomer quarantined, nothing overwritten), batches of [`BATCH`]
/// rows per transaction. Nothing is imported unless the whole bundle
/// verifies. If it changes on disk during the import
/// ([`BundleError::Changed`]) the batches committed before stay: every one
/// of their rows was verified. Rows get the origin `bundle:<absolute path>`
/// followed by the signer's fingerprint (16 digits) and the manifest's
/// origin, and creation time `now`. `progress` counts YubiKeys.
pub fn import_bundle(
    store: &AeadStore,
    path: &Path,
    trust: &VerifyingKey,
    now: i64,
    progress: &ProgressBar,
) -> Result<BundleImport, BundleError> {
    progress.set_message("verifying bundle");
    let verified = verify_file(path, trust)?;
    let manifest = &verified.manifest;
    progress.set_message("importing bundle");
    progress.set_length(manifest.count);
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let signer: String = manifest.signer.chars().take(16).collect();
    let origin = format!("bundle:{} signer={signer} origin={}", absolute.display(), manifest.origin);
    let mut report = ImportReport::default();
    let mut rows: Vec<(PublicId, AeadRecord)> = Vec::with_capacity(BATCH);
    let mut lines: Vec<u64> = Vec::with_capacity(BATCH);
    let flush = |rows: &mut Vec<(PublicId, AeadRecord)>, lines: &mut Vec<u64>, report: &mut ImportReport| {
        let outcomes = store.put_many(rows, &origin, now)?;
        for ((outcome, (public_id, record)), line) in outcomes.into_iter().zip(rows.iter()).zip(lines.iter()) {
            match outcome {
                PutOutcome::Added => report.added += 1,
                PutOutcome::AlreadyPresent => report.already_present += 1,
                PutOutcome::Conflict => report.conflict(
                    Location::Line(*line),
                    format!(
                        "public id {public_id} under key handle {}: the store holds a different AEAD; kept it, quarantined this one",
                        record.key_handle
                    ),
                ),
            }
        }
        rows.clear();
        lines.clear();
        Ok::<_, BundleError>(())
    };
    replay(&verified, |public_id, records, line| {
        for record in records {
            rows.push((*public_id, *record));
            lines.push(line);
        }
        if rows.len() >= BATCH {
            flush(&mut rows, &mut lines, &mut report)?;
        }
        progress.inc(1);
        Ok(())
    })?;
    flush(&mut rows, &mut lines, &mut report)?;
    Ok(BundleImport { manifest: verified.manifest, report })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const KH1: KeyHandle = KeyHandle::new(0x2000);
    const KH2: KeyHandle = KeyHandle::new(0x2001);

    fn line(fields: &[&str]) -> Vec<u8> {
        fields.join(" ").into_bytes()
    }

    fn field(kh: &str, nonce: &str, aead: &str) -> String {
        format!("{kh}:{nonce}:{aead}")
    }

    const AEAD: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d";

    #[test]
    fn header() {
        assert_eq!(parse_header(b"ksm-aead-bundle 1 00002000 00002001").unwrap(), [KH1, KH2]);
        let fatal = |l: &[u8]| parse_header(l).unwrap_err().0;
        assert!(fatal(b"ksm-aead-bundle"));
        assert!(fatal(b"something else 1 00002000"));
        assert!(fatal(b"ksm-aead-bundle 2 00002000"));
        let err = |l: &[u8]| {
            let (fatal, what) = parse_header(l).unwrap_err();
            assert!(!fatal, "{what}");
            what
        };
        assert!(err(b"ksm-aead-bundle 1").contains("8 lowercase hex"));
        assert!(err(b"ksm-aead-bundle 1 0x2000").contains("8 lowercase hex"));
        assert!(err(b"ksm-aead-bundle 1 0000200A").contains("8 lowercase hex"));
        assert!(err(b"ksm-aead-bundle 1 00002000  00002001").contains("header key handle 2"));
        assert!(err(b"ksm-aead-bundle 1 00002000 00002000").contains("listed twice"));
        let many: Vec<String> = (0..=MAX_KEY_HANDLES).map(|i| format!("{i:08x}")).collect();
        assert!(err(format!("ksm-aead-bundle 1 {}", many.join(" ")).as_bytes()).contains("more than 16"));
        let most = &many[..MAX_KEY_HANDLES];
        assert_eq!(parse_header(format!("ksm-aead-bundle 1 {}", most.join(" ")).as_bytes()).unwrap().len(), MAX_KEY_HANDLES);
    }

    #[test]
    fn entries() {
        let khs = [KH1, KH2];
        let mut records = Vec::new();
        let good = line(&["cccccccccccb", &field("00002000", "000000000001", AEAD), &field("00002001", "0a0b0c0d0e0f", &AEAD[..18])]);
        let id = parse_entry(&good, &khs, &mut records).unwrap();
        assert_eq!(id.to_modhex(), "cccccccccccb");
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].key_handle, records[1].key_handle), (KH1, KH2));
        assert_eq!(records[0].nonce, AeadNonce::new([0, 0, 0, 0, 0, 1]));
        assert_eq!(hex::encode(records[0].aead.as_bytes()), AEAD);
        assert_eq!(records[1].aead.len(), 9);

        let f1 = field("00002000", "000000000001", AEAD);
        let f2 = field("00002001", "000000000001", AEAD);
        let long_aead = "ab".repeat(73);
        let max_aead = "ab".repeat(72);
        for (bad, expect) in [
            (line(&[]), "public id is missing"),
            (line(&["", &f1, &f2]), "public id is missing"),
            (line(&["cccccccccccbcccccc", &f1, &f2]), "longer than 16"),
            (line(&["xyz", &f1, &f2]), "public id \"xyz\""),
            (line(&["cccccccccccb", &f1]), "1 AEADs, the header lists 2"),
            (line(&["cccccccccccb", &f1, &f2, &f2]), "3 AEADs, the header lists 2"),
            (line(&["cccccccccccb", &f1, &f2, ""]), "3 AEADs"),
            (line(&["cccccccccccb", &f2, &f1]), "AEAD 1: is for key handle 0x2001, the header lists 0x2000"),
            (line(&["cccccccccccb", &f1, "00002001:000000000001"]), "AEAD 2: expected"),
            (line(&["cccccccccccb", &f1, &format!("{f2}:00")]), "AEAD 2: expected"),
            (line(&["cccccccccccb", &f1, &field("2001", "000000000001", AEAD)]), "key handle is not"),
            (line(&["cccccccccccb", &f1, &field("00002001", "00000000001", AEAD)]), "nonce"),
            (line(&["cccccccccccb", &f1, &field("00002001", "00000000000G", AEAD)]), "nonce"),
            (line(&["cccccccccccb", &f1, &field("00002001", "00000000000A", AEAD)]), "nonce"),
            (line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &AEAD[..16])]), "18 to 144"),
            (line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &AEAD[..19])]), "18 to 144"),
            (line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &long_aead)]), "18 to 144"),
            (line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &AEAD.replace('a', "A"))]), "18 to 144"),
            (line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &AEAD.replace('a', "z"))]), "18 to 144"),
            (b"cccccccccccb \xff".to_vec(), "not ASCII"),
            (format!("cccccccccccb {f1} {f2}\r").into_bytes(), "18 to 144"),
        ] {
            let e = parse_entry(&bad, &khs, &mut records).unwrap_err();
            assert!(e.contains(expect), "{:?}: {e}", String::from_utf8_lossy(&bad));
        }
        let max = line(&["cccccccccccb", &f1, &field("00002001", "000000000001", &max_aead)]);
        parse_entry(&max, &khs, &mut records).unwrap();
        assert_eq!(records[1].aead.len(), MAX_AEAD);
    }

    #[test]
    fn framing_is_bounded() {
        let frames = |input: &[u8]| {
            let mut reader = BufReader::with_capacity(7, input);
            let mut line = Vec::new();
            let mut out = Vec::new();
            loop {
                let f = next_line(&mut reader, &mut line).unwrap();
                out.push((f, String::from_utf8_lossy(&line).into_owned()));
                if f != Framed::Line {
                    return out;
                }
            }
        };
        let s = String::from;
        assert_eq!(frames(b""), [(Framed::Eof, s(""))]);
        assert_eq!(frames(b"ab\ncdefghijkl\n"), [(Framed::Line, s("ab\n")), (Framed::Line, s("cdefghijkl\n")), (Framed::Eof, s(""))]);
        assert_eq!(frames(b"ab\ncd"), [(Framed::Line, s("ab\n")), (Framed::Partial, s("cd"))]);
        let exact = format!("{}\n", "x".repeat(MAX_LINE - 1));
        assert_eq!(frames(exact.as_bytes())[0], (Framed::Line, exact.clone()));
        let over = format!("{}\n", "x".repeat(MAX_LINE));
        assert_eq!(frames(over.as_bytes()).last().unwrap().0, Framed::TooLong);
    }

    #[test]
    fn manifest_json_round_trip_and_checks() {
        let m = Manifest {
            version: VERSION,
            origin: "laptop batch 7".to_owned(),
            created: 1_700_000_000,
            key_handles: vec![KH1, KH2],
            count: 3,
            first_public_id: PublicId::from_number(1, 6).unwrap(),
            last_public_id: PublicId::from_number(3, 6).unwrap(),
            body_sha256: [9; 32],
            signer: "ab".repeat(32),
        };
        let json = serde_json::to_string(&WireManifest::from(&m)).unwrap();
        assert!(!json.contains('\n'));
        let back: WireManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_manifest().unwrap(), m);
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<WireManifest>(&extra).is_err());
        let mut wire = WireManifest::from(&m);
        wire.key_handles = vec!["8192".to_owned()];
        assert!(wire.into_manifest().unwrap_err().contains("canonical"));
        let mut wire = WireManifest::from(&m);
        wire.version = 2;
        assert!(wire.into_manifest().unwrap_err().contains("version 2"));
        let mut wire = WireManifest::from(&m);
        wire.origin = "a\u{1b}[31m".to_owned();
        assert!(wire.into_manifest().unwrap_err().contains("control"));
        let mut wire = WireManifest::from(&m);
        wire.first_public_id = String::new();
        assert!(wire.into_manifest().unwrap_err().contains("empty"));
    }

    #[test]
    fn writer_refuses_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bundle");
        let invalid = |r: Result<BundleWriter, BundleError>| match r {
            Err(BundleError::Invalid(what)) => what,
            other => panic!("{other:?}"),
        };
        assert!(invalid(BundleWriter::create(&path, &[], "x")).contains("at least one"));
        assert!(invalid(BundleWriter::create(&path, &[KH1, KH1], "x")).contains("twice"));
        assert!(invalid(BundleWriter::create(&path, &[KH1], "a\nb")).contains("control"));
        assert!(invalid(BundleWriter::create(&path, &[KH1], &"o".repeat(MAX_ORIGIN + 1))).contains("longer"));
        std::fs::write(dir.path().join("taken"), b"").unwrap();
        assert!(matches!(BundleWriter::create(&dir.path().join("taken"), &[KH1], "x"), Err(BundleError::Exists(_))));

        let mut w = BundleWriter::create(&path, &[KH1, KH2], "x").unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        let rec = |kh| AeadRecord { key_handle: kh, nonce: id.aead_nonce().unwrap(), aead: Aead::from_slice(&[1; 30]).unwrap() };
        let e = w.add(&id, &[rec(KH1)]).unwrap_err().to_string();
        assert!(e.contains("1 AEADs given, the bundle has 2 key handles"), "{e}");
        let e = w.add(&id, &[rec(KH2), rec(KH1)]).unwrap_err().to_string();
        assert!(e.contains("AEAD 1 is for key handle 0x2001"), "{e}");
        let e = w.add(&PublicId::from_bytes(&[]).unwrap(), &[rec(KH1), rec(KH2)]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert_eq!(w.count(), 0);
        // The temporary file is hidden, and gone when the writer is dropped.
        let names = || std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect::<Vec<_>>();
        assert!(names().iter().any(|n| n.starts_with(".b.bundle.") && n.ends_with(".partial")), "{:?}", names());
        drop(w);
        assert_eq!(names(), ["taken"]);
    }
}
