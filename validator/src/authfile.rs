//! pam_yubico's authfile from a users → YubiKeys map.
//!
//! The map is YAML: each user name maps to a list of public ids, or to a
//! single id:
//!
//! ```yaml
//! alice: [cccccccccccb, cccccccccccd]
//! bob: cccccccccccf
//! ```
//!
//! The output has one line per user, `user:id1:id2`, users sorted, ids
//! sorted and deduplicated, ending in a newline — the format pam_yubico's
//! `authfile=` reads (Yubico/yubico-pam: util.c `check_user_token`: lines
//! read with a 1024-byte `fgets`, split on `:`, exact `strcmp` of the user
//! and of the first `token_id_length` characters of the OTP).
//!
//! **Checks.** Errors (nothing is written): a user name that is empty,
//! starts with `#` (pam_yubico skips such lines), or holds `:`, whitespace
//! or control characters; an id that is not 2–16 modhex characters of even
//! length; one id under two users; a line longer than pam_yubico's buffer;
//! no user at all; and, when an AEAD store is given, ids it holds no AEAD
//! for ("unknown ids"; a typo, or a key never provisioned) unless
//! [`Options::allow_unknown`]. Warnings: an id listed twice for one user
//! (kept once), upper-case ids (folded: modhex is lower case), ids whose
//! length is not `token_id_length` (pam_yubico would never match them), and
//! users without ids (left out).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hsm::fsutil::{write_atomic, Mode};
use ksm::store::AeadStore;
use otp::{KeyHandle, PublicId};
use serde_yaml::Value;

/// pam_yubico's default `token_id_length`.
pub const DEFAULT_TOKEN_ID_LENGTH: usize = 12;
/// pam_yubico reads lines with `fgets(buf, 1024, …)`: a line of more than
/// 1022 characters (plus its newline) would be split.
pub const MAX_LINE: usize = 1022;
/// Modhex alphabet.
const MODHEX: &str = "cbdefghijklnrtuv";

/// How to build the authfile.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The `token_id_length` pam_yubico is configured with (default 12).
    pub token_id_length: usize,
    /// Report ids without an AEAD as warnings instead of errors.
    pub allow_unknown: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { token_id_length: DEFAULT_TOKEN_ID_LENGTH, allow_unknown: false }
    }
}

/// Whether a public id has an AEAD (and so can ever validate).
pub trait KnownIds {
    /// Is there an AEAD for `public_id`?
    fn is_known(&self, public_id: &PublicId) -> Result<bool, String>;
}

/// [`KnownIds`] over the KSM's SQLite AEAD store: an id is known if it has
/// an AEAD under any key handle in the store.
pub struct StoreIds<'a> {
    store: &'a AeadStore,
    handles: Vec<KeyHandle>,
}

impl<'a> StoreIds<'a> {
    /// Look ids up in `store`.
    pub fn new(store: &'a AeadStore) -> Result<Self, String> {
        let handles = store.count_by_key_handle().map_err(|e| e.to_string())?.into_iter().map(|(kh, _)| kh).collect();
        Ok(Self { store, handles })
    }
}

impl KnownIds for StoreIds<'_> {
    fn is_known(&self, public_id: &PublicId) -> Result<bool, String> {
        for kh in &self.handles {
            if self.store.get(public_id, *kh).map_err(|e| e.to_string())?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A built authfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authfile {
    /// The file's contents.
    pub text: String,
    /// Users written.
    pub users: usize,
    /// Ids written (over all users).
    pub ids: usize,
    /// Warnings, one per line.
    pub warnings: Vec<String>,
}

/// The map was refused: nothing may be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Errors, one per line.
    pub errors: Vec<String>,
    /// Warnings found as well.
    pub warnings: Vec<String>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s): {}", self.errors.len(), self.errors.join("; "))
    }
}

impl std::error::Error for Rejected {}

/// A YAML scalar or node shown in a message.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => serde_yaml::to_string(other).map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned()),
    }
}

/// Why a user name cannot be written, if it cannot.
fn user_problem(user: &str) -> Option<&'static str> {
    if user.is_empty() {
        Some("is empty")
    } else if user.starts_with('#') {
        Some("starts with `#` (pam_yubico skips such lines)")
    } else if user.contains(':') {
        Some("contains `:`")
    } else if user.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else if user.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    }
}

/// Check a public id; returns it in canonical (lower-case) form.
fn parse_id(raw: &str) -> Result<(String, bool), String> {
    let folded = raw.to_ascii_lowercase();
    if let Some(c) = folded.chars().find(|c| !MODHEX.contains(*c)) {
        return Err(format!("{raw:?} is not a public id: {c:?} is not a modhex character ({MODHEX})"));
    }
    // ASCII from here on: bytes are characters.
    if !(2..=16).contains(&folded.len()) || !folded.len().is_multiple_of(2) {
        return Err(format!("{raw:?} is not a public id: it must have 2 to 16 modhex characters, an even number"));
    }
    let changed = folded != raw;
    Ok((folded, changed))
}

/// Parse and check `yaml`; build the authfile, or say why not.
pub fn build(yaml: &str, options: &Options, known: Option<&dyn KnownIds>) -> Result<Authfile, Rejected> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let doc: Value = match serde_yaml::from_str(yaml) {
        Ok(v) => v,
        Err(e) => return Err(Rejected { errors: vec![format!("not a YAML map of users: {e}")], warnings }),
    };
    let map = match doc {
        Value::Mapping(m) => m,
        Value::Null => return Err(Rejected { errors: vec!["the map is empty: no users".to_owned()], warnings }),
        other => {
            return Err(Rejected { errors: vec![format!("expected a map of user names to public ids, found {}", show(&other))], warnings })
        }
    };
    // user -> ids, and id -> the users holding it.
    let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, value) in &map {
        let Value::String(user) = key else {
            errors.push(format!("user name {} is not a string; quote it", show(key)));
            continue;
        };
        if let Some(problem) = user_problem(user) {
            errors.push(format!("user name {user:?} {problem}"));
            continue;
        }
        let raw_ids: Vec<&Value> = match value {
            Value::Sequence(items) => items.iter().collect(),
            Value::Null => Vec::new(),
            scalar @ (Value::String(_) | Value::Number(_) | Value::Bool(_)) => vec![scalar],
            other => {
                errors.push(format!("user {user:?}: expected a public id or a list of them, found {}", show(other)));
                continue;
            }
        };
        let ids = users.entry(user.clone()).or_default();
        for raw in raw_ids {
            let Value::String(raw) = raw else {
                errors.push(format!("user {user:?}: {} is not a public id (YAML read it as a non-string; quote it)", show(raw)));
                continue;
            };
            let id = match parse_id(raw) {
                Ok((id, folded)) => {
                    if folded {
                        warnings.push(format!("user {user:?}: {raw:?} written in lower case as {id} (modhex is lower case)"));
                    }
                    id
                }
                Err(e) => {
                    errors.push(format!("user {user:?}: {e}"));
                    continue;
                }
            };
            if id.len() != options.token_id_length {
                warnings.push(format!(
                    "user {user:?}: {id} has {} characters; pam_yubico with token_id_length={} will never match it",
                    id.len(),
                    options.token_id_length
                ));
            }
            if !ids.insert(id.clone()) {
                warnings.push(format!("user {user:?}: {id} is listed twice; written once"));
            }
            holders.entry(id).or_default().insert(user.clone());
        }
    }
    for (id, who) in &holders {
        if who.len() > 1 {
            let who: Vec<&str> = who.iter().map(String::as_str).collect();
            errors.push(format!("{id} is listed for several users: {}", who.join(", ")));
        }
    }
    if let Some(known) = known {
        for id in holders.keys() {
            let verdict = PublicId::from_modhex(id).map_err(|e| e.to_string()).and_then(|p| known.is_known(&p));
            match verdict {
                Ok(true) => {}
                Ok(false) if options.allow_unknown => warnings.push(format!("{id} has no AEAD in the store (unknown id)")),
                Ok(false) => errors.push(format!("{id} has no AEAD in the store (unknown id; --allow-unknown to write it anyway)")),
                Err(e) => errors.push(format!("{id}: cannot look it up in the AEAD store: {e}")),
            }
        }
    }
    let mut text = String::new();
    let (mut written_users, mut written_ids) = (0, 0);
    for (user, ids) in &users {
        if ids.is_empty() {
            warnings.push(format!("user {user:?} has no public ids; left out"));
            continue;
        }
        let line = format!("{user}:{}", ids.iter().map(String::as_str).collect::<Vec<_>>().join(":"));
        if line.len() > MAX_LINE {
            errors.push(format!("the line of user {user:?} has {} characters; pam_yubico reads at most {MAX_LINE}", line.len()));
        }
        text.push_str(&line);
        text.push('\n');
        written_users += 1;
        written_ids += ids.len();
    }
    if written_users == 0 && errors.is_empty() {
        errors.push("no user has a public id: refusing to write an empty authfile".to_owned());
    }
    if errors.is_empty() {
        Ok(Authfile { text, users: written_users, ids: written_ids, warnings })
    } else {
        Err(Rejected { errors, warnings })
    }
}

/// Write `text` to `path` atomically (a reader sees the old file or the new
/// one), mode 0644: pam_yubico may read it as the user; it holds no secret.
/// Returns `false`, writing nothing, when the file already holds `text`.
pub fn write(path: &Path, text: &str) -> Result<bool, String> {
    let chmod = || {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| format!("{}: chmod 644: {e}", path.display()))
    };
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        chmod()?;
        return Ok(false);
    }
    // write_atomic creates the file 0600; it is made 0644 once in place.
    write_atomic(path, text.as_bytes(), Mode::Replace).map_err(|e| e.to_string())?;
    chmod()?;
    Ok(true)
}
