//! Yubico's validation protocol (`verify` 2.0, and 1.x), the wire format
//! only.
//!
//! **I/O contract: no network, no files, no clock.** Callers pass the
//! decoded request pairs (see `httpd::form::pairs`) and the time; this
//! module returns values and strings.
//!
//! What lives here:
//! - [`Status`], the answer's `status=` value;
//! - [`parse_request`]: the request parameters, checked as yubikey-val checks
//!   them, into a [`Request`] or a [`Rejection`];
//! - the HMAC-SHA1 signature of a set of pairs ([`signature`],
//!   [`check_request_signature`], [`signed_query`] for clients);
//! - [`Response`]: the answer's lines, byte for byte as yubikey-val writes
//!   them, signed with the client's key;
//! - [`parse_response`] and [`verify_response`], the client side, for tests
//!   and the load generator.
//!
//! # Decisions
//!
//! - **Repeated parameters** (`otp=a&otp=b`) are refused with
//!   `MISSING_PARAMETER`, the closest status: PHP would silently keep the
//!   last one, and the signature over a sorted list with two equal keys is
//!   ambiguous. A repeated `id` also means the client is not known, so the
//!   answer is signed with the empty key.
//! - **Empty values** count as absent, as in yubikey-val (`nonce=` is a
//!   missing nonce, `h=` an unsigned request, `sl=` and `timeout=` the
//!   server's defaults).
//! - **OTP case and layout.** The OTP is lower-cased (caps lock). A Dvorak
//!   OTP (`jxe.uidchtnbpygk` for `cbdefghijklnrtuv`) is translated only when
//!   it is not already modhex: yubikey-val translates every OTP made only of
//!   Dvorak letters, and since 12 of the 16 modhex letters are also Dvorak
//!   letters it scrambles about one ordinary OTP in 10,000 (a token without
//!   `f`, `l`, `r` or `v`, `(3/4)^32`). Here such an OTP is read as modhex;
//!   the rare Dvorak OTP that is also valid modhex is then refused by the
//!   KSM and the user presses the key again.
//! - **The echoed `otp`** is the request's value as sent (after
//!   percent-decoding), not the normalised one: ykclient compares it with
//!   `strcmp` to the OTP it sent, so echoing a lower-cased or translated OTP
//!   (as yubikey-val does) fails caps-lock and Dvorak logins with rc 104.
//! - **`timestamp`** asks for the session fields only when it is exactly
//!   `1` (PHP's loose `== 1` also takes `01` or `1.0`; no client sends them).
//! - **`sl`** is `fast`, `secure` (any case, as `strcasecmp`) or digits
//!   whose value is 1 to 100. `0` and anything else are `MISSING_PARAMETER`,
//!   as yubikey-val refuses every level below 1.
//! - **`timeout`** must be digits (`MISSING_PARAMETER` otherwise); `0`
//!   means the server's default, as PHP's `if (!$timeout)` does. Huge values
//!   saturate; the server caps them anyway.
//! - **`h`**: a space in `h` is read as `+` (a client that forgot to escape
//!   `+` sends one, and PHP would refuse it); padding is optional; anything
//!   that is not base64 of 20 bytes is `BAD_SIGNATURE`.
//! - **`sessioncounter`** is the 15-bit counter, caps-lock bit dropped: the
//!   value the server orders on and stores ([`otp::Counters`]). yubikey-val
//!   and the KSM line report the raw 16-bit field.
//! - **Protocol 1.x** (`/wsapi/verify`): no nonce is read or required, `sl`
//!   and `timeout` are ignored, nothing is echoed and no `sl` is sent; the
//!   1.x status set has no `REPLAYED_REQUEST`, so that becomes
//!   `REPLAYED_OTP`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use otp::{Otp, OtpDecode};
use sha1::Sha1;

use crate::{ClientId, ClientKey};

type HmacSha1 = Hmac<Sha1>;

/// Length of an HMAC-SHA1 tag in bytes.
pub const SIGNATURE_LEN: usize = 20;

/// Shortest nonce the protocol allows.
pub const NONCE_MIN: usize = 16;
/// Longest nonce the protocol allows.
pub const NONCE_MAX: usize = 40;

/// The modhex alphabet, and the same keys typed on a US Dvorak layout.
const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";
const DVORAK: &[u8; 16] = b"jxe.uidchtnbpygk";

/// Base64 that accepts a missing `=` padding, for `h` from lax clients.
const LAX_BASE64: GeneralPurpose =
    GeneralPurpose::new(&alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

// ------------------------------------------------------------------ status

/// The `status=` of an answer, in the order of yubikey-val's constants
/// (`DELAYED_OTP` is left out: yubikey-val never sends it and ykclient
/// reads it as a parse error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The OTP is valid.
    Ok,
    /// The OTP is invalid.
    BadOtp,
    /// The OTP has already been seen.
    ReplayedOtp,
    /// The request's HMAC signature is wrong.
    BadSignature,
    /// A parameter is missing or malformed.
    MissingParameter,
    /// The client id does not exist (or is disabled).
    NoSuchClient,
    /// The client may not verify OTPs.
    OperationNotAllowed,
    /// The server could not decide (KSM, module, database).
    BackendError,
    /// Too few sync peers answered in time.
    NotEnoughAnswers,
    /// This OTP with this nonce has been seen before.
    ReplayedRequest,
}

impl Status {
    /// Every status, in spec order.
    pub const ALL: [Self; 10] = [
        Self::Ok,
        Self::BadOtp,
        Self::ReplayedOtp,
        Self::BadSignature,
        Self::MissingParameter,
        Self::NoSuchClient,
        Self::OperationNotAllowed,
        Self::BackendError,
        Self::NotEnoughAnswers,
        Self::ReplayedRequest,
    ];

    /// The wire string.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::BadOtp => "BAD_OTP",
            Self::ReplayedOtp => "REPLAYED_OTP",
            Self::BadSignature => "BAD_SIGNATURE",
            Self::MissingParameter => "MISSING_PARAMETER",
            Self::NoSuchClient => "NO_SUCH_CLIENT",
            Self::OperationNotAllowed => "OPERATION_NOT_ALLOWED",
            Self::BackendError => "BACKEND_ERROR",
            Self::NotEnoughAnswers => "NOT_ENOUGH_ANSWERS",
            Self::ReplayedRequest => "REPLAYED_REQUEST",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or(())
    }
}

// ------------------------------------------------------------------ request

/// The protocol version, from the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// `/wsapi/verify`: no nonce, nothing echoed.
    V1,
    /// `/wsapi/2.0/verify`.
    V2,
}

impl Version {
    /// The version served at `path` (the request target without its
    /// query): `/wsapi/2.0/verify` (also with a trailing `/`) is 2.0,
    /// `/wsapi/verify` is 1.x; anything else is not a verify endpoint.
    #[must_use]
    pub fn from_path(path: &str) -> Option<Self> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/wsapi/2.0/verify" => Some(Self::V2),
            "/wsapi/verify" => Some(Self::V1),
            _ => None,
        }
    }
}

/// A request nonce: 16 to 40 ASCII letters and digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nonce(String);

impl Nonce {
    /// Check `text`.
    #[must_use]
    pub fn new(text: &str) -> Option<Self> {
        let ok = (NONCE_MIN..=NONCE_MAX).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| Self(text.to_owned()))
    }

    /// The nonce.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sync level a request asks for (`sl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncLevel {
    /// A percentage of the sync peers, 1 to 100.
    Percent(u8),
    /// `fast`: the server's fast level.
    Fast,
    /// `secure`: the server's secure level.
    Secure,
}

impl SyncLevel {
    /// Parse an `sl` value (see the module docs).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("fast") {
            return Some(Self::Fast);
        }
        if text.eq_ignore_ascii_case("secure") {
            return Some(Self::Secure);
        }
        match parse_digits(text)? {
            n @ 1..=100 => u8::try_from(n).ok().map(Self::Percent),
            _ => None,
        }
    }
}

/// A non-empty run of ASCII digits as a number, saturating.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0'))))
}

/// A well-formed verify request.
#[derive(Clone, Debug)]
pub struct Request {
    version: Version,
    id: ClientId,
    otp: Otp,
    otp_text: String,
    nonce: Option<Nonce>,
    timestamp: bool,
    sync_level: Option<SyncLevel>,
    timeout: Option<Duration>,
    signed: bool,
}

impl Request {
    /// The protocol version it was parsed for.
    #[must_use]
    pub fn version(&self) -> Version {
        self.version
    }

    /// The client.
    #[must_use]
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The OTP, normalised and parsed.
    #[must_use]
    pub fn otp(&self) -> &Otp {
        &self.otp
    }

    /// The `otp` value as sent, which answers echo.
    #[must_use]
    pub fn otp_text(&self) -> &str {
        &self.otp_text
    }

    /// The nonce (always present in 2.0, never read in 1.x).
    #[must_use]
    pub fn nonce(&self) -> Option<&Nonce> {
        self.nonce.as_ref()
    }

    /// `timestamp=1`: the answer carries the session fields.
    #[must_use]
    pub fn timestamp(&self) -> bool {
        self.timestamp
    }

    /// The requested sync level, if any.
    #[must_use]
    pub fn sync_level(&self) -> Option<SyncLevel> {
        self.sync_level
    }

    /// The requested `timeout`, if any (`0` counts as none).
    #[must_use]
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Does the request carry a non-empty `h`?
    #[must_use]
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// What an answer to this request repeats.
    #[must_use]
    pub fn echo(&self) -> Echo {
        Echo { version: self.version, otp: self.otp_text.clone(), nonce: self.nonce.clone() }
    }
}

/// A request refused before any key or OTP is looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `MISSING_PARAMETER` or `BAD_OTP`.
    pub status: Status,
    /// Why, for logs (never contains the request's values).
    pub reason: &'static str,
    /// The request's client id, if it had exactly one valid `id`: the answer
    /// is signed with that client's key.
    pub client_id: Option<ClientId>,
}

/// The one value of `key`, `Ok(None)` if absent or empty, `Err` if the key
/// appears more than once.
fn single<'a>(pairs: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, ()> {
    let mut found = None;
    for (k, v) in pairs {
        if k == key {
            if found.is_some() {
                return Err(());
            }
            found = Some(v.as_str());
        }
    }
    Ok(found.filter(|v| !v.is_empty()))
}

fn has_repeated_key(pairs: &[(String, String)]) -> bool {
    let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// The OTP as yubikey-val reads it: lower case, and translated from Dvorak
/// when it is made of Dvorak keys and is not already modhex (see the
/// module docs). Anything else comes back lower-cased, for
/// [`Otp::parse`] to refuse.
#[must_use]
pub fn normalise_otp(raw: &str) -> String {
    let lower = raw.to_ascii_lowercase();
    let is_modhex = lower.bytes().all(|b| MODHEX.contains(&b));
    let is_dvorak = lower.bytes().all(|b| DVORAK.contains(&b));
    if is_modhex || !is_dvorak {
        return lower;
    }
    lower
        .bytes()
        .map(|b| DVORAK.iter().position(|&d| d == b).and_then(|i| MODHEX.get(i)).map_or(char::from(b), |&m| char::from(m)))
        .collect()
}

/// Check a request's parameters in yubikey-val's order, except that a
/// repeated parameter is refused first:
/// 1. any parameter repeated → `MISSING_PARAMETER`;
/// 2. (2.0) no `nonce` → `MISSING_PARAMETER`;
/// 3. no `otp` → `MISSING_PARAMETER`;
/// 4. `otp` not 32–48 modhex characters after normalisation → `BAD_OTP`;
/// 5. `id` not 1–10 digits, or zero → `MISSING_PARAMETER`;
/// 6. (2.0) `timeout` not digits → `MISSING_PARAMETER`;
/// 7. (2.0) `nonce` not 16–40 letters and digits → `MISSING_PARAMETER`;
/// 8. (2.0) `sl` not 1–100, `fast` or `secure` → `MISSING_PARAMETER`.
///
/// Unknown parameters are allowed (and signed over).
pub fn parse_request(pairs: &[(String, String)], version: Version) -> Result<Request, Rejection> {
    let client_id = single(pairs, "id").ok().flatten().and_then(|v| ClientId::from_str(v).ok());
    let reject = |status, reason| Err(Rejection { status, reason, client_id });
    if has_repeated_key(pairs) {
        return reject(Status::MissingParameter, "a parameter is repeated");
    }
    // No key repeats from here on, so `single` cannot fail.
    let get = |key: &str| single(pairs, key).ok().flatten();
    let v2 = version == Version::V2;
    let nonce_text = if v2 { get("nonce") } else { None };
    if v2 && nonce_text.is_none() {
        return reject(Status::MissingParameter, "no nonce");
    }
    let Some(otp_text) = get("otp") else {
        return reject(Status::MissingParameter, "no otp");
    };
    let Ok(otp) = Otp::parse(&normalise_otp(otp_text)) else {
        return reject(Status::BadOtp, "otp is not 32 to 48 modhex characters");
    };
    let Some(id) = client_id else {
        return reject(Status::MissingParameter, "id missing or not 1 to 10 digits");
    };
    let timeout = match if v2 { get("timeout") } else { None } {
        None => None,
        Some(t) => match parse_digits(t) {
            None => return reject(Status::MissingParameter, "timeout is not a number"),
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
        },
    };
    let nonce = match nonce_text {
        None => None,
        Some(n) => match Nonce::new(n) {
            Some(n) => Some(n),
            None => return reject(Status::MissingParameter, "nonce is not 16 to 40 letters and digits"),
        },
    };
    let sync_level = match if v2 { get("sl") } else { None } {
        None => None,
        Some(s) => match SyncLevel::parse(s) {
            Some(level) => Some(level),
            None => return reject(Status::MissingParameter, "sl is not 1 to 100, fast or secure"),
        },
    };
    Ok(Request {
        version,
        id,
        otp,
        otp_text: otp_text.to_owned(),
        nonce,
        timestamp: get("timestamp") == Some("1"),
        sync_level,
        timeout,
        signed: get("h").is_some(),
    })
}

// ------------------------------------------------------------------ signatures

fn mac(key: &[u8]) -> Option<HmacSha1> {
    // HMAC takes keys of any length: this never fails.
    HmacSha1::new_from_slice(key).ok()
}

/// The text a signature covers: every pair but `h`, sorted by key (then
/// value) byte-wise, as `k=v` joined with `&`.
#[must_use]
pub fn signing_input<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut sorted: Vec<(&str, &str)> = pairs.into_iter().filter(|(k, _)| *k != "h").collect();
    sorted.sort_unstable();
    let mut out = String::new();
    for (i, (k, v)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The base64 HMAC-SHA1 of [`signing_input`] under `key` (the decoded API
/// key; empty for an unknown client).
#[must_use]
pub fn signature<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>, key: &[u8]) -> String {
    let Some(mut m) = mac(key) else { return String::new() };
    m.update(signing_input(pairs).as_bytes());
    STANDARD.encode(m.finalize().into_bytes())
}

/// Does `h` (base64) sign `pairs` under `key`? Compared in constant time;
/// a malformed `h` is simply wrong.
#[must_use]
pub fn signature_matches<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>, h: &str, key: &[u8]) -> bool {
    let h = h.replace(' ', "+");
    let Ok(tag) = LAX_BASE64.decode(h.as_bytes()) else { return false };
    if tag.len() != SIGNATURE_LEN {
        return false;
    }
    let Some(mut m) = mac(key) else { return false };
    m.update(signing_input(pairs).as_bytes());
    m.verify_slice(&tag).is_ok()
}

/// How a request's `h` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestSignature {
    /// No `h`, or an empty one: yubikey-val accepts unsigned requests.
    Absent,
    /// `h` signs the other pairs.
    Valid,
    /// `h` is wrong or malformed (or repeated).
    Invalid,
}

/// Check the request's `h` over every other decoded pair, the unknown ones
/// included, as yubikey-val does.
#[must_use]
pub fn check_request_signature(pairs: &[(String, String)], key: &[u8]) -> RequestSignature {
    match single(pairs, "h") {
        Err(()) => RequestSignature::Invalid,
        Ok(None) => RequestSignature::Absent,
        Ok(Some(h)) => {
            if signature_matches(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), h, key) {
                RequestSignature::Valid
            } else {
                RequestSignature::Invalid
            }
        }
    }
}

/// Percent-encode a query component: everything but `A–Z a–z 0–9 - . _ ~`.
#[must_use]
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A client's query string: `pairs` in the order given, then `h` signed
/// with `key` (when there is one), every value percent-encoded, so that
/// `+` in `h` arrives as `+` (ykclient's request shape).
#[must_use]
pub fn signed_query(pairs: &[(&str, &str)], key: Option<&[u8]>) -> String {
    let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect();
    if let Some(key) = key {
        parts.push(format!("h={}", percent_encode(&signature(pairs.iter().copied(), key))));
    }
    parts.join("&")
}

// ------------------------------------------------------------------ response

/// yubikey-val's `t`: UTC, `YYYY-MM-DDTHH:MM:SSZ0` and three millisecond
/// digits, e.g. `2008-11-21T06:11:55Z0711`.
#[must_use]
pub fn format_time(now: SystemTime) -> String {
    let nanos: i128 = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    let millis = nanos.div_euclid(1_000_000);
    let secs = millis.div_euclid(1000);
    let (days, sec_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z0{:03}",
        sec_of_day / 3600,
        sec_of_day / 60 % 60,
        sec_of_day % 60,
        millis.rem_euclid(1000)
    )
}

/// The proleptic Gregorian date of a day number (0 = 1970-01-01).
///
/// Counted in 400-year cycles of 146,097 days that start on 1 March, so
/// that the leap day is the last day of a cycle year: within a cycle, the
/// year is found by removing the leap days before it, and the month from
/// the day of that March-based year with the 153-days-per-5-months rule.
#[must_use]
pub fn civil_from_days(days: i128) -> (i128, u32, u32) {
    // Day 0 of the count below is 0000-03-01.
    let from_march_0000 = days + 719_468;
    let cycle = from_march_0000.div_euclid(146_097);
    let day_of_cycle = from_march_0000.rem_euclid(146_097); // 0 ..= 146_096
    let year_of_cycle = (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524 - day_of_cycle / 146_096) / 365; // 0 ..= 399
    let day_of_year = day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100); // 0 ..= 365, from 1 March
    let month_from_march = (5 * day_of_year + 2) / 153; // 0 ..= 11
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1; // 1 ..= 31
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = cycle * 400 + year_of_cycle + i128::from(month <= 2);
    // Both are in range by construction.
    (year, u32::try_from(month).unwrap_or(1), u32::try_from(day).unwrap_or(1))
}

/// What an answer repeats from its request: `otp` and `nonce` in 2.0,
/// nothing in 1.x.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Echo {
    version: Version,
    otp: String,
    nonce: Option<Nonce>,
}

impl Echo {
    /// Built from a parsed request with [`Request::echo`]; this is for
    /// callers that build answers by hand (tests, the replication layer).
    #[must_use]
    pub fn new(version: Version, otp: &str, nonce: Option<Nonce>) -> Self {
        Self { version, otp: otp.to_owned(), nonce }
    }

    fn push_otp_nonce(&self, fields: &mut Vec<(&'static str, String)>) {
        if self.version == Version::V2 {
            fields.push(("otp", self.otp.clone()));
            if let Some(n) = &self.nonce {
                fields.push(("nonce", n.0.clone()));
            }
        }
    }
}

/// The YubiKey's own fields that `timestamp=1` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionFields {
    /// The 24-bit 8 Hz timestamp, `(high << 16) + low`.
    pub timestamp: u32,
    /// The 15-bit power-up counter (caps-lock bit dropped).
    pub session_counter: u16,
    /// The use within the power-up.
    pub session_use: u8,
}

impl SessionFields {
    /// From a KSM decode.
    #[must_use]
    pub fn from_decode(d: &OtpDecode) -> Self {
        let counters = d.counters();
        Self { timestamp: d.timestamp(), session_counter: counters.counter(), session_use: counters.session_use() }
    }
}

/// An answer: its status, its fields, the time it was made and the key
/// that signs it. [`Response::render`] gives the exact body.
#[derive(Clone, Debug)]
pub struct Response {
    status: Status,
    time: SystemTime,
    extras: Vec<(&'static str, String)>,
    key: Option<ClientKey>,
}

impl Response {
    /// An answer without extra fields: every error status, where
    /// yubikey-val sends none. Signed with the empty key until
    /// [`Self::signed_with`].
    #[must_use]
    pub fn bare(status: Status, now: SystemTime) -> Self {
        Self { status, time: now, extras: Vec::new(), key: None }
    }

    /// `OK`: in 2.0 `otp`, `nonce`, `sl`; then the session fields if asked.
    #[must_use]
    pub fn ok(echo: &Echo, sl: u8, session: Option<SessionFields>, now: SystemTime) -> Self {
        let mut extras = Vec::new();
        echo.push_otp_nonce(&mut extras);
        if echo.version == Version::V2 {
            extras.push(("sl", sl.to_string()));
        }
        if let Some(s) = session {
            extras.push(("timestamp", s.timestamp.to_string()));
            extras.push(("sessioncounter", s.session_counter.to_string()));
            extras.push(("sessionuse", s.session_use.to_string()));
        }
        Self { status: Status::Ok, time: now, extras, key: None }
    }

    /// `REPLAYED_OTP`, or `REPLAYED_REQUEST` when `same_request`; in 2.0
    /// with `otp` and `nonce`. 1.x has no `REPLAYED_REQUEST`: it gets
    /// `REPLAYED_OTP`.
    #[must_use]
    pub fn replayed(echo: &Echo, same_request: bool, now: SystemTime) -> Self {
        let status = if same_request && echo.version == Version::V2 { Status::ReplayedRequest } else { Status::ReplayedOtp };
        let mut extras = Vec::new();
        echo.push_otp_nonce(&mut extras);
        Self { status, time: now, extras, key: None }
    }

    /// `NOT_ENOUGH_ANSWERS`: in 2.0 with `otp`, `nonce` and `sl`.
    #[must_use]
    pub fn not_enough_answers(echo: &Echo, sl: u8, now: SystemTime) -> Self {
        let mut extras = Vec::new();
        echo.push_otp_nonce(&mut extras);
        if echo.version == Version::V2 {
            extras.push(("sl", sl.to_string()));
        }
        Self { status: Status::NotEnoughAnswers, time: now, extras, key: None }
    }

    /// Sign with `key` (a client's), or the empty key for `None`.
    #[must_use]
    pub fn signed_with(mut self, key: Option<ClientKey>) -> Self {
        self.key = key;
        self
    }

    /// The status, for metrics.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status
    }

    /// Is it signed with a client's key (rather than the empty key)?
    #[must_use]
    pub fn has_client_key(&self) -> bool {
        self.key.is_some()
    }

    /// Every field but `h`, in the order they are written: `t`, the
    /// extras, `status`.
    #[must_use]
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(self.extras.len() + 2);
        out.push(("t", format_time(self.time)));
        out.extend(self.extras.iter().cloned());
        out.push(("status", self.status.as_str().to_owned()));
        out
    }

    /// The body: `h` first, then [`Self::fields`], each line ending in
    /// CRLF, then an empty CRLF line.
    #[must_use]
    pub fn render(&self) -> String {
        let fields = self.fields();
        let key = self.key.as_ref().map_or(&[][..], ClientKey::expose);
        let h = signature(fields.iter().map(|(k, v)| (*k, v.as_str())), key);
        let mut out = format!("h={h}\r\n");
        for (k, v) in &fields {
            let _ = write!(out, "{k}={v}\r\n");
        }
        out.push_str("\r\n");
        out
    }
}

// ------------------------------------------------------------------ client side

/// Why an answer body could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// The body does not end in a newline (ykclient: rc 101).
    NoFinalNewline,
    /// A non-empty line without `=`, or with an empty key.
    MalformedLine,
    /// A key appears twice.
    RepeatedKey,
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoFinalNewline => "the body does not end in a newline",
            Self::MalformedLine => "a line is not key=value",
            Self::RepeatedKey => "a key appears twice",
        })
    }
}

impl std::error::Error for ResponseError {}

/// An answer's `key=value` lines (LF or CRLF), empty lines skipped.
pub fn parse_response(body: &str) -> Result<BTreeMap<String, String>, ResponseError> {
    if !body.ends_with('\n') {
        return Err(ResponseError::NoFinalNewline);
    }
    let mut out = BTreeMap::new();
    for line in body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=').ok_or(ResponseError::MalformedLine)?;
        if k.is_empty() {
            return Err(ResponseError::MalformedLine);
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(ResponseError::RepeatedKey);
        }
    }
    Ok(out)
}

/// Does the answer parse and carry an `h` that signs every other line
/// under `key` (empty for an unsigned client)? As ykclient checks it.
#[must_use]
pub fn verify_response(body: &str, key: &[u8]) -> bool {
    let Ok(fields) = parse_response(body) else { return false };
    let Some(h) = fields.get("h") else { return false };
    // ykclient wants exactly 20 bytes of canonical base64.
    match STANDARD.decode(h) {
        Ok(tag) if tag.len() == SIGNATURE_LEN => {}
        _ => return false,
    }
    signature_matches(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())), h, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    const OTP: &str = "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn";
    const NONCE: &str = "goowtddubeilltjtawmeezumwrsyagoh";

    #[test]
    fn status_strings_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert_eq!("DELAYED_OTP".parse::<Status>(), Err(()));
    }

    #[test]
    fn versions_from_paths() {
        assert_eq!(Version::from_path("/wsapi/2.0/verify"), Some(Version::V2));
        assert_eq!(Version::from_path("/wsapi/2.0/verify/"), Some(Version::V2));
        assert_eq!(Version::from_path("/wsapi/verify"), Some(Version::V1));
        assert_eq!(Version::from_path("/wsapi/2/verify"), None);
        assert_eq!(Version::from_path("/wsapi/decrypt"), None);
    }

    #[test]
    fn nonce_rules() {
        assert!(Nonce::new(&"a".repeat(16)).is_some());
        assert!(Nonce::new(&"Z9".repeat(20)).is_some());
        assert!(Nonce::new(&"a".repeat(15)).is_none());
        assert!(Nonce::new(&"a".repeat(41)).is_none());
        assert!(Nonce::new("aaaaaaaaaaaaaaa-").is_none());
        assert!(Nonce::new("ééééééééé").is_none());
    }

    #[test]
    fn sync_levels() {
        assert_eq!(SyncLevel::parse("fast"), Some(SyncLevel::Fast));
        assert_eq!(SyncLevel::parse("SECURE"), Some(SyncLevel::Secure));
        assert_eq!(SyncLevel::parse("1"), Some(SyncLevel::Percent(1)));
        assert_eq!(SyncLevel::parse("100"), Some(SyncLevel::Percent(100)));
        assert_eq!(SyncLevel::parse("050"), Some(SyncLevel::Percent(50)));
        for bad in ["0", "101", "-1", "+5", " 5", "5 ", "1e2", "99999999999999999999999", "fastest", ""] {
            assert_eq!(SyncLevel::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn otp_normalisation() {
        assert_eq!(normalise_otp(&OTP.to_ascii_uppercase()), OTP);
        // The same keys typed on a Dvorak layout.
        let dvorak: String = OTP.bytes().map(|b| char::from(DVORAK[MODHEX.iter().position(|&m| m == b).unwrap()])).collect();
        assert_eq!(dvorak, "jjjjjjjjjjjxekiycxnutxiygp.junnx.ppktcbbjybb");
        assert_eq!(normalise_otp(&dvorak), OTP);
        assert_eq!(normalise_otp(&dvorak.to_ascii_uppercase()), OTP);
        // Modhex made only of letters Dvorak shares is left alone
        // (yubikey-val would translate it).
        let shared = "cccccccccccbdeghijkntucbdeghijkntucbdeghijknt";
        assert_eq!(normalise_otp(shared), shared);
        // Neither: lower-cased, for the parser to refuse.
        assert_eq!(normalise_otp("ABC=é"), "abc=é");
    }

    #[test]
    fn time_format() {
        let t = UNIX_EPOCH + Duration::from_millis(1_227_247_915_711);
        assert_eq!(format_time(t), "2008-11-21T06:11:55Z0711");
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00Z0000");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_nanos(999_999)), "1970-01-01T00:00:00Z0000");
        assert_eq!(format_time(UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59Z0999");
        // Leap days, century rules, the end of the 32-bit era.
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z0000");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(1_709_164_800)), "2024-02-29T00:00:00Z0000");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(4_107_542_400)), "2100-03-01T00:00:00Z0000");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(2_147_483_647)), "2038-01-19T03:14:07Z0000");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(253_402_300_799)), "9999-12-31T23:59:59Z0000");
    }

    #[test]
    fn civil_dates_walk_day_by_day() {
        // An independent count: step one day at a time from 1970-01-01,
        // forwards and backwards, for 1,000 years each way.
        let leap = |y: i128| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i128, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970i128, 1u32, 1u32);
        for days in 0..366_000i128 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        let (mut y, mut m, mut d) = (1970i128, 1u32, 1u32);
        for days in (-366_000i128..=0).rev() {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            if d > 1 {
                d -= 1;
            } else {
                if m > 1 {
                    m -= 1;
                } else {
                    m = 12;
                    y -= 1;
                }
                d = month_len(y, m);
            }
        }
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let _ = format_time(UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2));
        let _ = format_time(UNIX_EPOCH - Duration::from_secs(i64::MAX as u64 / 2));
    }

    #[test]
    fn parse_minimal_v2() {
        let r = parse_request(&pairs(&[("id", "1"), ("otp", OTP), ("nonce", NONCE)]), Version::V2).unwrap();
        assert_eq!(r.id().get(), 1);
        assert_eq!(r.otp().to_string(), OTP);
        assert_eq!(r.nonce().map(Nonce::as_str), Some(NONCE));
        assert!(!r.timestamp());
        assert!(!r.is_signed());
        assert_eq!(r.sync_level(), None);
        assert_eq!(r.timeout(), None);
    }

    #[test]
    fn parse_options() {
        let base = [("id", "1"), ("otp", OTP), ("nonce", NONCE)];
        let with = |extra: &[(&str, &str)]| {
            let mut p = pairs(&base);
            p.extend(pairs(extra));
            parse_request(&p, Version::V2)
        };
        assert!(with(&[("timestamp", "1")]).unwrap().timestamp());
        assert!(!with(&[("timestamp", "01")]).unwrap().timestamp());
        assert!(!with(&[("timestamp", "yes")]).unwrap().timestamp());
        assert_eq!(with(&[("timeout", "8")]).unwrap().timeout(), Some(Duration::from_secs(8)));
        assert_eq!(with(&[("timeout", "0")]).unwrap().timeout(), None);
        assert_eq!(with(&[("timeout", "")]).unwrap().timeout(), None);
        assert_eq!(with(&[("timeout", "99999999999999999999999")]).unwrap().timeout(), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(with(&[("timeout", "1.5")]).unwrap_err().status, Status::MissingParameter);
        assert_eq!(with(&[("sl", "secure")]).unwrap().sync_level(), Some(SyncLevel::Secure));
        assert_eq!(with(&[("sl", "0")]).unwrap_err().status, Status::MissingParameter);
        assert_eq!(with(&[("sl", "")]).unwrap().sync_level(), None);
        assert!(with(&[("h", "x")]).unwrap().is_signed());
        assert!(!with(&[("h", "")]).unwrap().is_signed());
        assert!(with(&[("unknown", "whatever é")]).is_ok());
    }

    #[test]
    fn rejections_in_order() {
        let rej = |list: &[(&str, &str)]| parse_request(&pairs(list), Version::V2).unwrap_err();
        let r = rej(&[("id", "1"), ("otp", OTP), ("otp", OTP), ("nonce", NONCE)]);
        assert_eq!((r.status, r.client_id.map(ClientId::get)), (Status::MissingParameter, Some(1)));
        let r = rej(&[("id", "1"), ("id", "1"), ("otp", OTP), ("nonce", NONCE)]);
        assert_eq!((r.status, r.client_id), (Status::MissingParameter, None));
        // The missing nonce is found before the bad OTP, the bad OTP
        // before the bad id, as in yubikey-val.
        assert_eq!(rej(&[("id", "x"), ("otp", "bad")]).reason, "no nonce");
        assert_eq!(rej(&[("id", "x"), ("nonce", NONCE)]).reason, "no otp");
        let r = rej(&[("id", "x"), ("otp", "bad"), ("nonce", "n")]);
        assert_eq!((r.status, r.client_id), (Status::BadOtp, None));
        let r = rej(&[("id", "0"), ("otp", OTP), ("nonce", "n")]);
        assert_eq!((r.status, r.reason), (Status::MissingParameter, "id missing or not 1 to 10 digits"));
        let r = rej(&[("id", "7"), ("otp", OTP), ("nonce", "short"), ("timeout", "x")]);
        assert_eq!((r.reason, r.client_id.map(ClientId::get)), ("timeout is not a number", Some(7)));
        assert_eq!(rej(&[("id", "7"), ("otp", OTP), ("nonce", "short"), ("sl", "x")]).reason, "nonce is not 16 to 40 letters and digits");
        assert_eq!(rej(&[("id", "7"), ("otp", OTP), ("nonce", NONCE), ("sl", "x")]).reason, "sl is not 1 to 100, fast or secure");
        for id in ["", "12345678901", "-1", "1.0", "٣"] {
            assert_eq!(rej(&[("id", id), ("otp", OTP), ("nonce", NONCE)]).status, Status::MissingParameter, "{id:?}");
        }
    }

    #[test]
    fn version_1_ignores_nonce_sl_timeout() {
        let r =
            parse_request(&pairs(&[("id", "1"), ("otp", OTP), ("sl", "junk"), ("timeout", "junk"), ("nonce", "x")]), Version::V1).unwrap();
        assert_eq!((r.nonce(), r.sync_level(), r.timeout()), (None, None, None));
    }

    #[test]
    fn signing_input_sorts_and_skips_h() {
        assert_eq!(signing_input([("b", "1"), ("a", "2"), ("c", "3"), ("h", "x")]), "a=2&b=1&c=3");
        // Byte-wise: upper case sorts before lower case, shorter first.
        assert_eq!(signing_input([("nonce", "1"), ("Z", "2"), ("n", "3")]), "Z=2&n=3&nonce=1");
    }

    #[test]
    fn lax_h_forms() {
        let key = b"0123456789abcdefghij";
        let p = [("a", "1")];
        let h = signature(p, key);
        assert!(signature_matches(p, &h, key));
        assert!(signature_matches(p, h.trim_end_matches('='), key));
        if h.contains('+') {
            assert!(signature_matches(p, &h.replace('+', " "), key));
        }
        assert!(!signature_matches(p, "", key));
        assert!(!signature_matches(p, "!!!!", key));
        assert!(!signature_matches(p, &STANDARD.encode([0u8; 19]), key));
        assert!(!signature_matches(p, &h, b"other key"));
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a+b/c=d e~"), "a%2Bb%2Fc%3Dd%20e~");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn response_parse_errors() {
        assert_eq!(parse_response("status=OK"), Err(ResponseError::NoFinalNewline));
        assert_eq!(parse_response("status\r\n"), Err(ResponseError::MalformedLine));
        assert_eq!(parse_response("=x\n"), Err(ResponseError::MalformedLine));
        assert_eq!(parse_response("a=1\na=2\n"), Err(ResponseError::RepeatedKey));
        let m = parse_response("h=ab=\r\nstatus=OK\r\n\r\n").unwrap();
        assert_eq!(m.get("h").map(String::as_str), Some("ab="));
    }
}
