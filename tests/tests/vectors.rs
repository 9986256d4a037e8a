//! Known-answer vectors: runs every file under `tests/vectors/`.
//!
//! Each file names its `kind:` (which runner checks it) and its `expect:`
//! (`ok`, or the error it must produce). Three tests share one walk:
//! - `known_answer_vectors`: every case gives its expected outcome;
//! - `guard_every_vector_file_ran`: no file was skipped (unknown kind,
//!   unreadable file, empty directory, misfiled kind), every kind has positive
//!   and negative cases, and negatives outnumber positives;
//! - `positives_check_every_value`: changing any value of a positive file
//!   makes it fail, so no value in a positive vector is decorative.
//!
//! The file format is documented in `tests/vectors/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests may panic")]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use appliance_tests::testkit::{self, Case};
use otp::aead_file::{AeadFile, ResolveError};
use otp::crc::crc16;
use otp::decode::decode_otp;
use otp::token::TokenFields;
use otp::yhsm2::Yhsm2OtpAead;
use otp::{modhex, Aead, AeadNonce, Error, HandleKey, KeyHandle, Otp, PublicId, Token, TokenCiphertext, YubiKeyKey};

/// The runners, by `kind:`. A directory under `tests/vectors/` is named after
/// the kind of the files in it.
const KINDS: &[&str] = &["aead", "aead-file", "crc", "key-handle", "ksm", "modhex", "otp", "otp-token", "token-plaintext", "yhsm2"];

/// Kinds whose only checks are positive (a pure function has no error path).
const POSITIVE_ONLY_KINDS: &[&str] = &["crc"];

/// The `expect:` values a negative case may use, and what they mean.
const EXPECTS: &[&str] = &[
    "aead_integrity",
    "bad_crc",
    "bad_key_handle",
    "bad_key_size",
    "bad_length",
    "bad_modhex",
    "bad_public_id",
    "key_handle_mismatch",
    "odd_length",
    "truncated_file",
    "uid_mismatch",
    "unknown_version",
];

/// Files in `tests/vectors/` that are not vectors.
const NOT_VECTORS: &[&str] = &["README.md"];

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

// ------------------------------------------------------------------ outcome

/// Why a runner stopped.
#[derive(Debug)]
enum Fail {
    /// The core refused an input: the outcome a negative case looks for.
    Core(Error),
    /// Resolving an AEAD file against a lookup failed.
    Resolve(ResolveError),
    /// A computed value differed from the file, or the file is malformed.
    Check(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Self::Core(e)
    }
}

impl From<ResolveError> for Fail {
    fn from(e: ResolveError) -> Self {
        Self::Resolve(e)
    }
}

impl From<String> for Fail {
    fn from(e: String) -> Self {
        Self::Check(e)
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Core(e) => write!(f, "{} ({e})", core_code(e)),
            Self::Resolve(e) => write!(f, "{} ({e})", self.code().unwrap_or("?")),
            Self::Check(m) => write!(f, "check failed: {m}"),
        }
    }
}

impl Fail {
    /// The `expect:` name of this failure, if it is a refusal by the core.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::Core(e) | Self::Resolve(ResolveError::Format(e)) => Some(core_code(e)),
            Self::Resolve(ResolveError::KeyHandleMismatch { .. }) => Some("key_handle_mismatch"),
            Self::Resolve(_) => Some("unknown_resolve_error"),
            Self::Check(_) => None,
        }
    }

    fn core(&self) -> Option<&Error> {
        match self {
            Self::Core(e) | Self::Resolve(ResolveError::Format(e)) => Some(e),
            _ => None,
        }
    }
}

fn core_code(e: &Error) -> &'static str {
    match e {
        Error::ModhexCharacter { .. } => "bad_modhex",
        Error::ModhexOddLength { .. } => "odd_length",
        Error::Hex(_) => "bad_hex",
        Error::OtpLength { .. } | Error::Length { .. } => "bad_length",
        Error::PublicIdLength { .. } | Error::PublicIdTooLongForNonce { .. } => "bad_public_id",
        Error::TokenCrc => "bad_crc",
        Error::UidMismatch => "uid_mismatch",
        Error::KeySize(_) => "bad_key_size",
        Error::AeadIntegrity => "aead_integrity",
        Error::KeyHandleSyntax(_) => "bad_key_handle",
        Error::CounterRange(_) => "counter_range",
        Error::FileTruncated { .. } => "truncated_file",
        Error::FileVersion(_) => "unknown_version",
        _ => "unknown_error",
    }
}

type Run = Result<(), Fail>;

fn same<T: PartialEq + fmt::Debug>(what: &str, got: T, want: T) -> Run {
    if got == want {
        Ok(())
    } else {
        Err(Fail::Check(format!("{what}: got {got:?}, expected {want:?}")))
    }
}

fn same_hex(what: &str, got: &[u8], want: &[u8]) -> Run {
    same(what, hex::encode(got), hex::encode(want))
}

fn ensure(cond: bool, msg: impl Into<String>) -> Run {
    if cond {
        Ok(())
    } else {
        Err(Fail::Check(msg.into()))
    }
}

fn small<T: TryFrom<u64>>(key: &str, v: Option<u64>) -> Result<Option<T>, Fail> {
    v.map(|v| T::try_from(v).map_err(|_| Fail::Check(format!("`{key}` = {v:#x} is out of range")))).transpose()
}

fn key_handle(text: &str) -> Result<KeyHandle, Fail> {
    Ok(text.parse::<KeyHandle>()?)
}

// ---------------------------------------------------------------- runners

/// The token fields a file may list (all required for a positive case).
struct Fields {
    uid: Option<Vec<u8>>,
    counter: Option<u16>,
    timestamp_low: Option<u16>,
    timestamp_high: Option<u8>,
    session_use: Option<u8>,
    rnd: Option<u16>,
    crc: Option<u16>,
}

impl Fields {
    fn read(c: &Case, positive: bool) -> Result<Self, Fail> {
        let f = Self {
            uid: c.hex("uid")?,
            counter: small("counter", c.num("counter")?)?,
            timestamp_low: small("timestamp-low", c.num("timestamp-low")?)?,
            timestamp_high: small("timestamp-high", c.num("timestamp-high")?)?,
            session_use: small("use", c.num("use")?)?,
            rnd: small("rnd", c.num("rnd")?)?,
            crc: small("crc", c.num("crc")?)?,
        };
        if positive && !f.complete() {
            return Err(Fail::Check("a positive token case lists uid, counter, timestamp-low/high, use, rnd and crc".into()));
        }
        Ok(f)
    }

    fn complete(&self) -> bool {
        self.uid.is_some()
            && self.counter.is_some()
            && self.timestamp_low.is_some()
            && self.timestamp_high.is_some()
            && self.session_use.is_some()
            && self.rnd.is_some()
            && self.crc.is_some()
    }

    /// Lay the fields out as a YubiKey would (CRC computed by the core).
    fn build(&self) -> Result<Option<Token>, Fail> {
        if !self.complete() {
            return Ok(None);
        }
        let uid: [u8; 6] = self.uid.as_deref().unwrap_or_default().try_into().map_err(|_| Fail::Check("uid must be 6 bytes".into()))?;
        let token = TokenFields {
            uid,
            counter: self.counter.unwrap_or_default(),
            timestamp_low: self.timestamp_low.unwrap_or_default(),
            timestamp_high: self.timestamp_high.unwrap_or_default(),
            session_use: self.session_use.unwrap_or_default(),
            rnd: self.rnd.unwrap_or_default(),
        }
        .build();
        same("built crc", token.crc(), self.crc.unwrap_or_default())?;
        Ok(Some(token))
    }

    /// Compare a decrypted token with every listed field.
    fn compare(&self, t: &Token) -> Run {
        if let Some(uid) = &self.uid {
            same_hex("uid", t.uid().expose(), uid)?;
        }
        let pairs: [(&str, Option<u64>, u64); 6] = [
            ("counter", self.counter.map(u64::from), u64::from(t.raw_counter())),
            ("timestamp-low", self.timestamp_low.map(u64::from), u64::from(t.timestamp_low())),
            ("timestamp-high", self.timestamp_high.map(u64::from), u64::from(t.timestamp_high())),
            ("use", self.session_use.map(u64::from), u64::from(t.session_use())),
            ("rnd", self.rnd.map(u64::from), u64::from(t.rnd())),
            ("crc", self.crc.map(u64::from), u64::from(t.crc())),
        ];
        for (what, want, got) in pairs {
            if let Some(want) = want {
                same(what, got, want)?;
            }
        }
        Ok(())
    }
}

/// `aead`: seal and/or open one YubiHSM 1 AEAD.
fn run_aead(c: &Case, positive: bool) -> Run {
    let key = c.req_hex("aes-key")?;
    let kh = c.req("key-handle")?;
    let nonce = c.req_hex("nonce")?;
    let plaintext = c.hex("plaintext")?;
    let aead = c.hex("aead")?;
    ensure(!positive || (plaintext.is_some() && aead.is_some()), "a positive aead case lists plaintext and aead")?;
    ensure(plaintext.is_some() || aead.is_some(), "an aead case lists plaintext, aead or both")?;

    let hk = HandleKey::new(&key)?;
    let kh = key_handle(kh)?;
    let nonce = AeadNonce::from_slice(&nonce)?;
    if let Some(pt) = &plaintext {
        let sealed = hk.seal(kh, &nonce, pt)?;
        if let Some(want) = &aead {
            same_hex("sealed AEAD", sealed.as_bytes(), want)?;
        }
    }
    if let Some(bytes) = &aead {
        let blob = Aead::from_slice(bytes)?;
        let opened = hk.open(kh, &nonce, &blob)?;
        if let Some(pt) = &plaintext {
            same_hex("opened plaintext", &opened, pt)?;
        }
    }
    Ok(())
}

/// `otp-token`: build a token from its fields and encrypt it; decrypt it back.
fn run_otp_token(c: &Case, positive: bool) -> Run {
    let key = c.req_hex("aes-key")?;
    let text = c.req("token")?;
    let fields = Fields::read(c, positive)?;

    let key = YubiKeyKey::from_slice(&key)?;
    let ciphertext = TokenCiphertext::from_slice(&modhex::decode(text)?)?;
    if let Some(built) = fields.build()? {
        same("encrypted token", built.encrypt(&key).to_modhex(), text.to_owned())?;
    }
    let token = Token::decrypt(&key, &ciphertext)?;
    fields.compare(&token)
}

/// `token-plaintext`: check the CRC residue of a 16-byte plaintext.
fn run_token_plaintext(c: &Case, positive: bool) -> Run {
    let plain = c.req_hex("plaintext")?;
    let fields = Fields::read(c, positive)?;
    let plain: [u8; 16] = plain.try_into().map_err(|_| Fail::Check("plaintext must be 16 bytes".into()))?;
    let token = Token::from_plaintext(plain)?;
    fields.compare(&token)?;
    if let Some(built) = fields.build()? {
        ensure(built == token, "the fields laid out by TokenFields::build differ from the plaintext")?;
    }
    Ok(())
}

/// `crc`: the CRC-16 of some bytes.
fn run_crc(c: &Case, _positive: bool) -> Run {
    let data = c.req_hex("data")?;
    let want = c.req_num("crc")?;
    same("crc16", u64::from(crc16(&data)), want)
}

/// `modhex`: encode and decode.
fn run_modhex(c: &Case, positive: bool) -> Run {
    let text = c.req("modhex")?;
    let bytes = match (c.hex("hex")?, c.get("text")) {
        (Some(b), None) => Some(b),
        (None, Some(t)) => Some(t.as_bytes().to_vec()),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(Fail::Check("list `hex` or `text`, not both".into())),
    };
    ensure(!positive || bytes.is_some(), "a positive modhex case lists hex or text")?;

    let decoded = modhex::decode(text)?;
    let mut into = vec![0u8; text.len() / 2];
    modhex::decode_into(text, &mut into)?;
    same_hex("decode_into", &into, &decoded)?;
    ensure(modhex::is_modhex(text), "is_modhex is false for a decodable string")?;
    if let Some(bytes) = &bytes {
        same_hex("decoded", &decoded, bytes)?;
        same("encoded", modhex::encode(bytes), text.to_owned())?;
    }
    Ok(())
}

/// `otp`: split an OTP string into public id and token.
fn run_otp(c: &Case, positive: bool) -> Run {
    let text = c.req("otp")?;
    let public_id = c.get("public-id");
    let token_hex = c.hex("token-hex")?;
    let token_modhex = c.get("token-modhex");
    ensure(
        !positive || (public_id.is_some() && (token_hex.is_some() || token_modhex.is_some())),
        "a positive otp case lists public-id and token-hex or token-modhex",
    )?;

    let otp = Otp::parse(text)?;
    same("via FromStr", text.parse::<Otp>()?, otp)?;
    same("Display", otp.to_string(), text.to_owned())?;
    if let Some(p) = public_id {
        same("public id", otp.public_id().to_modhex(), p.to_owned())?;
        same("public id bytes", otp.public_id(), PublicId::from_modhex(p)?)?;
    }
    if let Some(t) = &token_hex {
        same_hex("token", otp.token().as_bytes(), t)?;
    }
    if let Some(t) = token_modhex {
        same("token", otp.token().to_modhex(), t.to_owned())?;
    }
    Ok(())
}

/// `ksm`: the whole KSM path, OTP string + AEAD -> KSM answer line.
fn run_ksm(c: &Case, positive: bool) -> Run {
    let hsm_key = c.req_hex("hsm-key")?;
    let kh = c.req("key-handle")?;
    let otp = c.req("otp")?;
    let aead = c.req_hex("aead")?;
    let nonce = c.hex("nonce")?;
    let line = c.get("ksm-line");
    ensure(!positive || line.is_some(), "a positive ksm case lists ksm-line")?;

    let otp = Otp::parse(otp)?;
    let hk = HandleKey::new(&hsm_key)?;
    let kh = key_handle(kh)?;
    let nonce = match nonce {
        Some(n) => AeadNonce::from_slice(&n)?,
        None => otp.public_id().aead_nonce()?,
    };
    let aead = Aead::from_slice(&aead)?;
    let decoded = decode_otp(&hk, kh, &nonce, &aead, otp.token())?;
    if let Some(line) = line {
        same("KSM line", decoded.ksm_line(), line.to_owned())?;
    }
    Ok(())
}

/// `yhsm2`: the 36-byte YubiHSM 2 OTP AEAD and Decrypt-OTP.
fn run_yhsm2(c: &Case, positive: bool) -> Run {
    let hsm_key = c.req_hex("hsm-key")?;
    let nonce_id: u32 = small("nonce-id", Some(c.req_num("nonce-id")?))?.unwrap_or_default();
    let aead36 = c.req_hex("aead36")?;
    let otp = c.req("otp")?;
    let nonce = c.hex("nonce")?;
    let aead = c.hex("aead")?;
    let use_ctr: Option<u16> = small("use-ctr", c.num("use-ctr")?)?;
    let session_ctr: Option<u8> = small("session-ctr", c.num("session-ctr")?)?;
    let high: Option<u8> = small("timestamp-high", c.num("timestamp-high")?)?;
    let low: Option<u16> = small("timestamp-low", c.num("timestamp-low")?)?;
    ensure(
        !positive || (nonce.is_some() && aead.is_some() && use_ctr.is_some() && session_ctr.is_some() && high.is_some() && low.is_some()),
        "a positive yhsm2 case lists nonce, aead, use-ctr, session-ctr, timestamp-high and timestamp-low",
    )?;

    let parsed = Yhsm2OtpAead::parse(&aead36)?;
    same_hex("re-encoded", &parsed.to_bytes(), &aead36)?;
    let record = parsed.to_record(nonce_id);
    same("record key handle", record.key_handle, KeyHandle::new(nonce_id))?;
    if let Some(n) = &nonce {
        same_hex("nonce", record.nonce.as_bytes(), n)?;
    }
    if let Some(a) = &aead {
        same_hex("YubiHSM 1 AEAD", record.aead.as_bytes(), a)?;
    }
    same_hex("from_record", &Yhsm2OtpAead::from_record(&record)?.to_bytes(), &aead36)?;

    let hk = HandleKey::new(&hsm_key)?;
    let otp = Otp::parse(otp)?;
    let d = decode_otp(&hk, record.key_handle, &record.nonce, &record.aead, otp.token())?;
    if let Some(v) = use_ctr {
        same("use-ctr", d.use_ctr, v)?;
    }
    if let Some(v) = session_ctr {
        same("session-ctr", d.session_ctr, v)?;
    }
    if let Some(v) = high {
        same("timestamp-high", d.timestamp_high, v)?;
    }
    if let Some(v) = low {
        same("timestamp-low", d.timestamp_low, v)?;
    }
    Ok(())
}

/// `aead-file`: parse a pyhsm AEAD file, resolve it, open it.
fn run_aead_file(c: &Case, positive: bool) -> Run {
    let file = c.req_hex("file")?;
    let version = c.num("version")?;
    let reencoded = c.hex("reencoded")?;
    let lookup = c.get("lookup-key-handle");
    let public_id = c.get("public-id");
    let want_kh = c.get("key-handle");
    let want_nonce = c.hex("nonce")?;
    let want_aead = c.hex("aead")?;
    let aes_key = c.hex("aes-key")?;
    let plaintext = c.hex("plaintext")?;
    ensure(!positive || version.is_some(), "a positive aead-file case lists version")?;
    ensure(plaintext.is_none() || aes_key.is_some(), "plaintext needs aes-key")?;

    let parsed = AeadFile::parse(&file)?;
    let direct = match parsed {
        AeadFile::V0(aead) => {
            if let Some(v) = version {
                same("version", 0, v)?;
            }
            same_hex("v0 AEAD", aead.as_bytes(), &file)?;
            None
        }
        AeadFile::V1(record) => {
            if let Some(v) = version {
                same("version", 1, v)?;
            }
            same_hex("re-encoded v1 file", &record.to_v1_bytes(), reencoded.as_deref().unwrap_or(&file))?;
            Some(record)
        }
    };
    let record = match lookup {
        Some(l) => {
            let pid = match public_id {
                Some(p) => PublicId::from_modhex(p)?,
                None => PublicId::from_bytes(&[])?,
            };
            Some(parsed.resolve(key_handle(l)?, &pid)?)
        }
        None => direct,
    };
    let Some(record) = record else {
        ensure(
            want_kh.is_none() && want_nonce.is_none() && want_aead.is_none() && aes_key.is_none(),
            "a v0 file needs lookup-key-handle (and public-id) before it can be compared or opened",
        )?;
        return Ok(());
    };
    if let Some(kh) = want_kh {
        same("key handle", record.key_handle, key_handle(kh)?)?;
    }
    if let Some(n) = &want_nonce {
        same_hex("nonce", record.nonce.as_bytes(), n)?;
    }
    if let Some(a) = &want_aead {
        same_hex("AEAD", record.aead.as_bytes(), a)?;
    }
    if let Some(k) = &aes_key {
        let opened = HandleKey::new(k)?.open(record.key_handle, &record.nonce, &record.aead)?;
        if let Some(pt) = &plaintext {
            same_hex("plaintext", &opened, pt)?;
        }
    }
    Ok(())
}

/// `key-handle`: pyhsm's key-handle syntax.
fn run_key_handle(c: &Case, positive: bool) -> Run {
    let text = c.req("text")?;
    let value = c.num("value")?;
    ensure(!positive || value.is_some(), "a positive key-handle case lists value")?;
    let kh = key_handle(text)?;
    if let Some(v) = value {
        same("value", u64::from(kh.get()), v)?;
    }
    same("canonical form parses back", key_handle(&kh.canonical())?, kh)
}

// ----------------------------------------------------------------- driver

/// Run one case. `Ok(())` if it behaved as its `expect:` says.
fn execute(c: &Case) -> Result<(), String> {
    let kind = c.req("kind")?;
    let expect = c.req("expect")?;
    let source = c.req("source")?;
    let position = c.num("position")?;
    ensure_ok(!source.is_empty(), "`source` is empty")?;
    ensure_ok(expect == "ok" || EXPECTS.contains(&expect), &format!("unknown expect {expect:?}"))?;
    ensure_ok(position.is_none() || expect == "bad_modhex", "`position` only goes with bad_modhex")?;
    let positive = expect == "ok";
    let run: fn(&Case, bool) -> Run = match kind {
        "aead" => run_aead,
        "aead-file" => run_aead_file,
        "crc" => run_crc,
        "key-handle" => run_key_handle,
        "ksm" => run_ksm,
        "modhex" => run_modhex,
        "otp" => run_otp,
        "otp-token" => run_otp_token,
        "token-plaintext" => run_token_plaintext,
        "yhsm2" => run_yhsm2,
        other => return Err(format!("unknown kind {other:?}")),
    };
    let outcome = run(c, positive);
    let unused = c.unused();
    if !unused.is_empty() {
        return Err(format!("keys not read by the `{kind}` runner: {unused:?}"));
    }
    match outcome {
        Ok(()) if positive => Ok(()),
        Ok(()) => Err(format!("expected {expect}, but every step succeeded")),
        Err(Fail::Check(m)) => Err(format!("check failed: {m}")),
        Err(f) if positive => Err(format!("expected ok, got {f}")),
        Err(f) if f.code() != Some(expect) => Err(format!("expected {expect}, got {f}")),
        Err(f) => match (position, f.core()) {
            (None, _) => Ok(()),
            (Some(p), Some(Error::ModhexCharacter { position: got, .. })) if *got as u64 == p => Ok(()),
            (Some(p), _) => Err(format!("expected bad_modhex at position {p}, got {f}")),
        },
    }
}

fn ensure_ok(cond: bool, msg: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg.to_owned())
    }
}

/// What happened to one file.
struct Ran {
    path: PathBuf,
    kind: Option<String>,
    positive: bool,
    /// The file was parsed and handed to a known runner.
    executed: bool,
    result: Result<(), String>,
}

struct Report {
    walk: testkit::Walk,
    ran: Vec<Ran>,
}

impl Report {
    fn count(&self, positive: bool) -> usize {
        self.ran.iter().filter(|r| r.executed && r.positive == positive).count()
    }

    fn per_kind(&self) -> BTreeMap<String, (usize, usize)> {
        let mut m: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for r in self.ran.iter().filter(|r| r.executed) {
            let e = m.entry(r.kind.clone().unwrap_or_default()).or_default();
            if r.positive {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        m
    }

    fn summary(&self) -> String {
        let mut s = format!("{} vector files: {} positive, {} negative\n", self.ran.len(), self.count(true), self.count(false));
        for (kind, (p, n)) in self.per_kind() {
            s.push_str(&format!("  {kind:<16} {p:>3} positive {n:>3} negative\n"));
        }
        s
    }
}

fn relative(p: &Path) -> String {
    p.strip_prefix(vectors_dir()).unwrap_or(p).display().to_string()
}

fn run_all() -> Report {
    let root = vectors_dir();
    let walk = testkit::walk(&root).unwrap_or_else(|e| panic!("cannot walk {}: {e}", root.display()));
    let mut ran = Vec::new();
    for path in &walk.files {
        if path.parent() == Some(root.as_path()) && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| NOT_VECTORS.contains(&n)) {
            continue;
        }
        let case = match Case::load(path) {
            Ok(c) => c,
            Err(e) => {
                ran.push(Ran { path: path.clone(), kind: None, positive: false, executed: false, result: Err(e) });
                continue;
            }
        };
        let kind = case.get("kind").map(str::to_owned);
        let positive = case.get("expect") == Some("ok");
        let known = kind.as_deref().is_some_and(|k| KINDS.contains(&k));
        let in_own_dir = path.parent().and_then(Path::file_name).and_then(|d| d.to_str()) == kind.as_deref();
        let result = if !known {
            Err(format!("unknown or missing kind {kind:?}"))
        } else if !in_own_dir {
            Err(format!("a `{}` vector must live in tests/vectors/{}/", kind.as_deref().unwrap_or(""), kind.as_deref().unwrap_or("")))
        } else {
            execute(&case)
        };
        ran.push(Ran { path: path.clone(), kind, positive, executed: known && in_own_dir, result });
    }
    Report { walk, ran }
}

#[test]
fn known_answer_vectors() {
    let report = run_all();
    println!("{}", report.summary());
    let failures: Vec<String> =
        report.ran.iter().filter_map(|r| r.result.as_ref().err().map(|e| format!("{}: {e}", relative(&r.path)))).collect();
    assert!(failures.is_empty(), "{} of {} vectors failed:\n{}", failures.len(), report.ran.len(), failures.join("\n"));
}

#[test]
fn guard_every_vector_file_ran() {
    let report = run_all();
    let (positives, negatives) = (report.count(true), report.count(false));
    println!("{}", report.summary());

    assert!(report.walk.empty_dirs.is_empty(), "empty directories under tests/vectors/: {:?}", report.walk.empty_dirs);
    assert!(report.walk.others.is_empty(), "non-file entries under tests/vectors/: {:?}", report.walk.others);
    let skipped: Vec<String> = report
        .ran
        .iter()
        .filter(|r| !r.executed)
        .map(|r| format!("{}: {}", relative(&r.path), r.result.as_ref().err().map_or("?", String::as_str)))
        .collect();
    assert!(skipped.is_empty(), "vector files that did not run:\n{}", skipped.join("\n"));
    for name in NOT_VECTORS {
        assert!(vectors_dir().join(name).is_file(), "tests/vectors/{name} is missing");
    }
    let vector_files = report.walk.files.len() - NOT_VECTORS.len();
    assert_eq!(report.ran.len(), vector_files, "every file except {NOT_VECTORS:?} is a vector");
    assert_eq!(positives + negatives, vector_files);

    let per_kind = report.per_kind();
    for kind in KINDS {
        let (p, n) = per_kind.get(*kind).copied().unwrap_or_default();
        assert!(p > 0, "kind `{kind}` has no positive vector");
        assert!(n > 0 || POSITIVE_ONLY_KINDS.contains(kind), "kind `{kind}` has no negative vector");
    }
    assert!(negatives > positives, "negative vectors ({negatives}) must outnumber positive ones ({positives})");
}

/// Replace the last character of a value by another of the same class.
fn mutate(value: &str) -> Option<String> {
    let last = value.chars().last()?;
    let next = if value.bytes().all(|b| modhex::nibble(b).is_some()) {
        let i = modhex::nibble(last as u8)?;
        modhex::ALPHABET[usize::from((i + 1) % 16)] as char
    } else if value.bytes().all(|b| b.is_ascii_digit()) {
        char::from_digit((last.to_digit(10)? + 1) % 10, 10)?
    } else if last.is_ascii_hexdigit() {
        char::from_digit((last.to_digit(16)? + 1) % 16, 16)?
    } else if last.is_ascii_lowercase() {
        char::from(b'a' + (last as u8 - b'a' + 1) % 26)
    } else if last.is_ascii_uppercase() {
        char::from(b'A' + (last as u8 - b'A' + 1) % 26)
    } else {
        return None;
    };
    let mut out: String = value.chars().take(value.chars().count() - 1).collect();
    out.push(next);
    Some(out)
}

#[test]
fn positives_check_every_value() {
    let report = run_all();
    let mut unchecked = Vec::new();
    let mut mutations = 0;
    for r in report.ran.iter().filter(|r| r.executed && r.positive) {
        let case = Case::load(&r.path).unwrap();
        let keys: Vec<String> = case.keys().map(str::to_owned).collect();
        for key in keys.iter().filter(|k| !matches!(k.as_str(), "kind" | "expect" | "source")) {
            let original = case.get(key).unwrap_or_default();
            let Some(changed) = mutate(original) else {
                unchecked.push(format!("{}: `{key}` has no mutable last character", relative(&r.path)));
                continue;
            };
            mutations += 1;
            if execute(&case.with_value(key, &changed)).is_ok() {
                unchecked.push(format!("{}: `{key}` changed to {changed:?} still passes", relative(&r.path)));
            }
        }
    }
    println!("{mutations} single-value mutations of positive vectors, all detected");
    assert!(mutations > 100, "too few mutations ({mutations}): did the positive vectors go missing?");
    assert!(unchecked.is_empty(), "values of positive vectors that are not checked:\n{}", unchecked.join("\n"));
}
