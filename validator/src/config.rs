//! `validator serve` configuration: a TOML file, overridden by flags.
//!
//! Unknown keys are errors (`deny_unknown_fields`). See
//! `validator/validator.toml.example`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hsm::config::HsmConfig;
use httpd::HttpOptions;
use ksm::aead_dir::KeyHandleDir;
use serde::Deserialize;

use crate::counters::Synchronous;

/// Where the service listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8080));

/// The file's contents; every key is optional so that flags can fill in.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// The validator's SQLite database (counters and API clients).
    pub db: Option<PathBuf>,
    /// `full` (default) or `normal`.
    pub synchronous: Option<String>,
    /// The keystore: data keys for API client keys, key handles for the
    /// in-process KSM.
    pub keystore: Option<PathBuf>,
    /// File holding the keystore password.
    pub password_file: Option<PathBuf>,
    /// `[hsm]`: the security module by `type` (`soft`, `pkcs11`; a
    /// `yhsm1` is refused: it has no data keys), instead of `keystore` and
    /// `password_file`.
    pub hsm: Option<HsmConfig>,
    /// Ceiling on the answer time of every request, in milliseconds; a
    /// request's own `timeout` can only shorten it.
    pub request_timeout_ms: Option<u64>,
    /// Async worker threads (0: one per CPU).
    pub workers: Option<usize>,
    /// Threads for blocking calls.
    pub max_blocking_threads: Option<usize>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
    /// Where OTPs are decrypted.
    pub ksm: Option<KsmSection>,
    /// Counter replication to the other site (off when absent).
    pub replication: Option<ReplicationSection>,
}

/// `[ksm]`: the in-process KSM (`store` or `aead_dir`, `key_handles`) or
/// remote KSMs (`urls`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KsmSection {
    /// The SQLite AEAD store.
    pub store: Option<PathBuf>,
    /// A pyhsm-layout AEAD directory.
    pub aead_dir: Option<PathBuf>,
    /// Key handles to try; default: every handle allowed to decode OTPs.
    pub key_handles: Option<Vec<String>>,
    /// Remote KSM URLs ending in `otp=`, instead of an in-process KSM.
    pub urls: Option<Vec<String>>,
    /// Per-KSM connect/read timeout for remote KSMs, in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// What a node of the replication group does.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A full site: verifies OTPs (keystore, KSM, API clients) and
    /// replicates their counters.
    #[default]
    Site,
    /// The counters-only witness of two sites: answers their
    /// compare-and-sets, verifies nothing.
    Witness,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Site => "site",
            Self::Witness => "witness",
        })
    }
}

/// The longest accept-at-risk window [`ConfigFile::resolve_node`] accepts,
/// counted from the start.
pub const MAX_ACCEPT_AT_RISK: Duration = Duration::from_secs(24 * 3600);

/// A point in time as written in the file: an RFC 3339 string, or a TOML
/// offset date-time (the same text unquoted).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Timestamp {
    /// `"2026-11-27T08:00:00Z"`.
    Text(String),
    /// `2026-11-27T08:00:00Z`.
    Toml(toml::value::Datetime),
}

impl Timestamp {
    /// The instant, which must be given in UTC (`Z` or `+00:00`).
    pub fn to_system_time(&self) -> Result<SystemTime, String> {
        match self {
            Self::Text(s) => parse_utc(s),
            Self::Toml(d) => parse_utc(&d.to_string()),
        }
    }
}

/// `[replication]`: this node's QUIC endpoint, role and peers.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// `site` (default) or `witness`.
    pub role: Option<Role>,
    /// This node's id in the group.
    pub site: Option<u16>,
    /// The UDP address the QUIC endpoint binds.
    pub listen: Option<SocketAddr>,
    /// This site's certificate (PEM).
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The private CA's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The longest a request waits for the quorum, in milliseconds (1000).
    pub deadline_ms: Option<u64>,
    /// The name of the peer that is the counters-only witness, if any
    /// (sites only).
    pub witness: Option<String>,
    /// End of an accept-at-risk window (RFC 3339, UTC; sites only, at most
    /// [`MAX_ACCEPT_AT_RISK`] ahead): until then an OTP whose quorum is
    /// missed is accepted anyway, logged and counted.
    pub accept_at_risk_until: Option<Timestamp>,
    /// The other nodes of the group.
    #[serde(default)]
    pub peers: Vec<PeerSection>,
}

/// `[[replication.peers]]`: one other node.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// Its certificate's name: the name it is allowed by.
    pub name: String,
    /// Its site id.
    pub site: u16,
    /// Its QUIC (UDP) address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate (hex): pinned in addition to the name.
    pub fingerprint: Option<String>,
}

/// A resolved `[replication]` section. For a witness, `peers` holds the
/// two sites and `witness` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// This node's id.
    pub site: u16,
    /// The UDP address to bind.
    pub listen: SocketAddr,
    /// This site's certificate (PEM).
    pub certificate: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The quorum deadline.
    pub deadline: Duration,
    /// The other full site(s).
    pub peers: Vec<PeerSection>,
    /// The witness, if any.
    pub witness: Option<PeerSection>,
}

/// A resolved `[replication]` section with what [`ReplicationConfig`] does
/// not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationSetup {
    /// Endpoint, identity, peers, deadline.
    pub config: ReplicationConfig,
    /// Site or witness.
    pub role: Role,
    /// End of the accept-at-risk window, if one is configured (sites only;
    /// possibly already past, which means failing closed).
    pub accept_at_risk_until: Option<SystemTime>,
}

impl ReplicationSection {
    /// Check and resolve, ignoring the role and any accept-at-risk window
    /// (see [`Self::resolve_setup`]).
    pub fn resolve(self) -> Result<ReplicationConfig, String> {
        self.resolve_setup(SystemTime::now()).map(|s| s.config)
    }

    /// Check and resolve, `now` being the start:
    ///
    /// - both roles: distinct site ids (this node's included), names and
    ///   addresses, valid pins, a deadline in `(0, 3600 s]`;
    /// - a site: exactly one other full site among the peers, plus the
    ///   optional witness named by `witness`; an accept-at-risk window
    ///   ending at most [`MAX_ACCEPT_AT_RISK`] after `now`;
    /// - a witness: exactly the two sites as peers, no `witness`, no
    ///   accept-at-risk window (it decides nothing).
    pub fn resolve_setup(self, now: SystemTime) -> Result<ReplicationSetup, String> {
        let need = |v: Option<PathBuf>, what: &str| v.ok_or_else(|| format!("replication: `{what}` is required"));
        let role = self.role.unwrap_or_default();
        let site = self.site.ok_or("replication: `site` is required")?;
        let listen = self.listen.ok_or("replication: `listen` is required")?;
        let (certificate, key, ca) = (need(self.certificate, "certificate")?, need(self.key, "key")?, need(self.ca, "ca")?);
        let deadline = Duration::from_millis(positive(self.deadline_ms.unwrap_or(1000), "replication deadline_ms")?);
        if deadline > replication::quorum::MAX_DEADLINE {
            return Err(format!("replication: deadline_ms must be at most {}", replication::quorum::MAX_DEADLINE.as_millis()));
        }
        let mut seen = std::collections::BTreeSet::from([site]);
        let mut names = std::collections::BTreeSet::new();
        let mut addrs = std::collections::BTreeSet::new();
        for p in &self.peers {
            if !seen.insert(p.site) {
                let whose = if p.site == site { " (it is this node's own `site`)" } else { "" };
                return Err(format!("replication: site id {} appears twice{whose}", p.site));
            }
            if !names.insert(p.name.to_ascii_lowercase()) {
                return Err(format!("replication: peer name {:?} appears twice", p.name));
            }
            if !addrs.insert(p.addr) {
                return Err(format!("replication: two peers have the address {}", p.addr));
            }
            if let Some(f) = &p.fingerprint {
                f.parse::<replication::pki::Fingerprint>().map_err(|e| format!("replication: peer {:?} fingerprint: {e}", p.name))?;
            }
        }
        let accept_at_risk_until = self.accept_at_risk_until.as_ref().map(Timestamp::to_system_time).transpose()?;
        let config = match role {
            Role::Witness => {
                if let Some(w) = &self.witness {
                    return Err(format!(
                        "replication: role = \"witness\" with `witness = {w:?}`: this node is the witness; remove `witness`"
                    ));
                }
                if accept_at_risk_until.is_some() {
                    return Err("replication: a witness decides no OTP: `accept_at_risk_until` belongs to a site".to_owned());
                }
                if self.peers.len() != 2 {
                    return Err(format!(
                        "replication: a witness needs exactly the two sites as [[replication.peers]], {} given",
                        self.peers.len()
                    ));
                }
                ReplicationConfig { site, listen, certificate, key, ca, deadline, peers: self.peers, witness: None }
            }
            Role::Site => {
                if self.peers.is_empty() {
                    return Err("replication: a site needs its peer site: add a [[replication.peers]] for the other site".to_owned());
                }
                let (witness, peers): (Vec<_>, Vec<_>) =
                    self.peers.into_iter().partition(|p| self.witness.as_deref() == Some(p.name.as_str()));
                if let Some(w) = &self.witness {
                    if witness.is_empty() {
                        return Err(format!("replication: witness {w:?} is not among the peers"));
                    }
                }
                if peers.len() != 1 {
                    return Err(format!("replication: exactly one other full site is supported, {} given", peers.len()));
                }
                if let Some(until) = accept_at_risk_until {
                    if until.duration_since(now).is_ok_and(|ahead| ahead > MAX_ACCEPT_AT_RISK) {
                        return Err(format!(
                            "replication: accept_at_risk_until = {} is more than {} h ahead: an accept-at-risk window is an \
                             emergency measure of at most 24 h",
                            format_utc(until),
                            MAX_ACCEPT_AT_RISK.as_secs() / 3600
                        ));
                    }
                }
                ReplicationConfig { site, listen, certificate, key, ca, deadline, peers, witness: witness.into_iter().next() }
            }
        };
        Ok(ReplicationSetup { config, role, accept_at_risk_until })
    }
}

/// Parse an RFC 3339 date-time in UTC (`Z`, or an offset of zero), with
/// the `time` crate.
pub fn parse_utc(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("{text:?} is not an RFC 3339 UTC time such as \"2026-11-27T08:00:00Z\"");
    let t =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339).map_err(|e| format!("{}: {e}", bad()))?;
    if !t.offset().is_utc() {
        return Err(format!("{}: give the time in UTC (ending in `Z`)", bad()));
    }
    if t.year() < 1970 {
        return Err(bad());
    }
    Ok(SystemTime::from(t))
}

/// `YYYY-MM-DDTHH:MM:SSZ` (whole seconds, UTC; before 1970 shown as 1970).
#[must_use]
pub fn format_utc(t: SystemTime) -> String {
    format_unix(t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (out of range: the epoch).
#[must_use]
pub fn format_unix(t: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

/// Where OTPs are decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KsmSource {
    /// In this process, from the SQLite AEAD store.
    Store {
        /// The store.
        path: PathBuf,
        /// Key handles to try; empty = every decode-permitted handle.
        key_handles: Vec<KeyHandleDir>,
    },
    /// In this process, from a pyhsm-layout directory.
    Dir {
        /// The directory.
        path: PathBuf,
        /// Key handles to try; empty = every decode-permitted handle.
        key_handles: Vec<KeyHandleDir>,
    },
    /// Remote KSMs.
    Remote {
        /// URLs ending in `otp=`.
        urls: Vec<String>,
        /// Per-KSM timeout.
        timeout: Duration,
    },
}

/// A complete service configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The validator database.
    pub db: PathBuf,
    /// Its durability.
    pub synchronous: Synchronous,
    /// The security module: data keys for API client keys, key handles
    /// for an in-process KSM.
    pub hsm: HsmConfig,
    /// The KSM.
    pub ksm: KsmSource,
    /// HTTP settings; `request_timeout` is the answer-time ceiling.
    pub http: HttpOptions,
    /// Counter replication, when configured.
    pub replication: Option<ReplicationConfig>,
}

/// A full site: the service, and its accept-at-risk window if any.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// Everything but the window.
    pub serve: ServeConfig,
    /// End of the accept-at-risk window (needs `serve.replication`).
    pub accept_at_risk_until: Option<SystemTime>,
}

/// A counters-only witness: a counter database, its replication endpoint
/// and HTTP for `/health`, `/metrics` and `/status`. No keystore, no KSM,
/// no API clients.
#[derive(Clone, Debug)]
pub struct WitnessConfig {
    /// The counter database.
    pub db: PathBuf,
    /// Its durability.
    pub synchronous: Synchronous,
    /// HTTP settings.
    pub http: HttpOptions,
    /// The witness's endpoint and the two sites (`peers`).
    pub replication: ReplicationConfig,
}

/// What `validator serve` runs, by `[replication] role`.
#[derive(Clone, Debug)]
// Built once at start-up: the size of a site's variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum NodeConfig {
    /// A full site (with or without replication).
    Site(SiteConfig),
    /// A counters-only witness.
    Witness(WitnessConfig),
}

impl NodeConfig {
    /// The role.
    #[must_use]
    pub fn role(&self) -> Role {
        match self {
            Self::Site(_) => Role::Site,
            Self::Witness(_) => Role::Witness,
        }
    }

    /// Its HTTP settings.
    #[must_use]
    pub fn http(&self) -> &HttpOptions {
        match self {
            Self::Site(s) => &s.serve.http,
            Self::Witness(w) => &w.http,
        }
    }
}

impl From<ServeConfig> for NodeConfig {
    fn from(serve: ServeConfig) -> Self {
        Self::Site(SiteConfig { serve, accept_at_risk_until: None })
    }
}

impl ConfigFile {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Keys set in `over` (the flags) win over this file's.
    #[must_use]
    pub fn overridden_by(self, over: Self) -> Self {
        let file_ksm = self.ksm.unwrap_or_default();
        let flag_ksm = over.ksm.unwrap_or_default();
        // Naming a KSM source on the command line replaces the file's.
        let source_given = flag_ksm.store.is_some() || flag_ksm.aead_dir.is_some() || flag_ksm.urls.is_some();
        let (store, aead_dir, urls) = if source_given {
            (flag_ksm.store, flag_ksm.aead_dir, flag_ksm.urls)
        } else {
            (file_ksm.store, file_ksm.aead_dir, file_ksm.urls)
        };
        // A keystore named by a flag replaces the file's security module.
        let (keystore, hsm) =
            if over.keystore.is_some() || over.hsm.is_some() { (over.keystore, over.hsm) } else { (self.keystore, self.hsm) };
        Self {
            listen: over.listen.or(self.listen),
            db: over.db.or(self.db),
            synchronous: over.synchronous.or(self.synchronous),
            keystore,
            password_file: over.password_file.or(self.password_file),
            hsm,
            request_timeout_ms: over.request_timeout_ms.or(self.request_timeout_ms),
            workers: over.workers.or(self.workers),
            max_blocking_threads: over.max_blocking_threads.or(self.max_blocking_threads),
            max_connections: over.max_connections.or(self.max_connections),
            ksm: Some(KsmSection {
                store,
                aead_dir,
                urls,
                key_handles: flag_ksm.key_handles.or(file_ksm.key_handles),
                timeout_ms: flag_ksm.timeout_ms.or(file_ksm.timeout_ms),
            }),
            replication: over.replication.or(self.replication),
        }
    }

    /// Check completeness of a site's configuration (any accept-at-risk
    /// window is left out: fail closed). A witness configuration is
    /// refused; see [`Self::resolve_node`].
    pub fn resolve(self) -> Result<ServeConfig, String> {
        match self.resolve_node()? {
            NodeConfig::Site(s) => Ok(s.serve),
            NodeConfig::Witness(_) => Err("this is a witness configuration ([replication] role = \"witness\")".to_owned()),
        }
    }

    /// Check completeness, by role; accept-at-risk windows are measured
    /// from now.
    pub fn resolve_node(self) -> Result<NodeConfig, String> {
        self.resolve_node_at(SystemTime::now())
    }

    /// [`Self::resolve_node`] as if started at `now`.
    pub fn resolve_node_at(self, now: SystemTime) -> Result<NodeConfig, String> {
        let http = self.http()?;
        let synchronous = self.synchronous.as_deref().map(str::parse).transpose()?.unwrap_or_default();
        let setup = self.replication.map(|r| r.resolve_setup(now)).transpose()?;
        if let Some(ReplicationSetup { config, role: Role::Witness, .. }) = setup {
            let ksm = self.ksm.unwrap_or_default();
            let ksm_keys = [
                ("ksm.store", ksm.store.is_some()),
                ("ksm.aead_dir", ksm.aead_dir.is_some()),
                ("ksm.urls", ksm.urls.is_some()),
                ("ksm.key_handles", ksm.key_handles.is_some()),
                ("ksm.timeout_ms", ksm.timeout_ms.is_some()),
                ("keystore", self.keystore.is_some()),
                ("password_file", self.password_file.is_some()),
                ("[hsm]", self.hsm.is_some()),
            ];
            let given: Vec<&str> = ksm_keys.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect();
            if !given.is_empty() {
                return Err(format!(
                    "a witness verifies no OTP and holds no keys: remove {} (role = \"witness\" needs only `db`, `listen` and [replication])",
                    given.join(", ")
                ));
            }
            let db = self.db.ok_or("no database: give --db or `db` in the config (the witness's counters)")?;
            return Ok(NodeConfig::Witness(WitnessConfig { db, synchronous, http, replication: config }));
        }
        let db = self.db.ok_or("no database: give --db or `db` in the config")?;
        let hsm = ksm::config::resolve_hsm(self.hsm, self.keystore, self.password_file)?;
        if !hsm.has_data_keys() {
            return Err(format!(
                "a YubiHSM 1 has no data keys: the validator keeps its API client keys encrypted under the module's config \
                 data key, so [hsm] type = \"{}\" cannot serve it; use type = \"soft\" or \"pkcs11\" (a YubiHSM 1 can still \
                 decode OTPs behind a remote KSM: `ksm serve` with it, and [ksm] urls here)",
                hsm.kind()
            ));
        }
        let k = self.ksm.unwrap_or_default();
        let key_handles = k
            .key_handles
            .unwrap_or_default()
            .iter()
            .map(|s| s.parse::<KeyHandleDir>().map_err(|e| format!("key handle {s:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let ksm = match (k.store, k.aead_dir, k.urls) {
            (Some(path), None, None) => KsmSource::Store { path, key_handles },
            (None, Some(path), None) => KsmSource::Dir { path, key_handles },
            (None, None, Some(urls)) if !urls.is_empty() => {
                if !key_handles.is_empty() {
                    return Err("key handles belong to an in-process KSM, not to remote KSM URLs".to_owned());
                }
                KsmSource::Remote { urls, timeout: Duration::from_millis(positive(k.timeout_ms.unwrap_or(2000), "ksm timeout_ms")?) }
            }
            (None, None, None | Some(_)) => {
                return Err("no KSM: give --store or --aead-dir (in-process) or --ksm-url (remote)".to_owned());
            }
            _ => return Err("give one KSM: --store, --aead-dir or --ksm-url".to_owned()),
        };
        let (replication, accept_at_risk_until) = match setup {
            Some(s) => (Some(s.config), s.accept_at_risk_until),
            None => (None, None),
        };
        let serve = ServeConfig { db, synchronous, hsm, ksm, http, replication };
        Ok(NodeConfig::Site(SiteConfig { serve, accept_at_risk_until }))
    }

    /// The HTTP settings, defaults filled in.
    pub fn http(&self) -> Result<HttpOptions, String> {
        let d = HttpOptions::new(DEFAULT_LISTEN);
        Ok(HttpOptions {
            listen: self.listen.unwrap_or(d.listen),
            request_timeout: Duration::from_millis(positive(self.request_timeout_ms.unwrap_or(5000), "request_timeout_ms")?),
            workers: self.workers.unwrap_or(d.workers),
            max_blocking_threads: self.max_blocking_threads.unwrap_or(d.max_blocking_threads).max(1),
            max_connections: self.max_connections.unwrap_or(d.max_connections).max(1),
        })
    }
}

fn positive(ms: u64, what: &str) -> Result<u64, String> {
    if ms == 0 {
        Err(format!("{what} must be positive"))
    } else {
        Ok(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ConfigFile {
        ConfigFile { db: Some("v.db".into()), keystore: Some("ks".into()), ..ConfigFile::default() }
    }

    fn with_ksm(k: KsmSection) -> ConfigFile {
        ConfigFile { ksm: Some(k), ..base() }
    }

    #[test]
    fn the_shipped_example_parses_and_resolves() {
        let c = ConfigFile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("validator.toml.example")).unwrap().resolve().unwrap();
        assert_eq!(c.http.listen, DEFAULT_LISTEN);
        assert_eq!(c.synchronous, Synchronous::Full);
        assert!(matches!(c.ksm, KsmSource::Store { ref key_handles, .. } if key_handles.len() == 1));
    }

    #[test]
    fn refusals() {
        let e = toml::from_str::<ConfigFile>("[ksm]\nstor = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("stor"), "{e}");
        let off =
            ConfigFile { synchronous: Some("off".into()), ..with_ksm(KsmSection { store: Some("s".into()), ..KsmSection::default() }) };
        assert!(off.resolve().unwrap_err().contains("off"));
        assert!(base().resolve().unwrap_err().contains("no KSM"));
        assert!(ConfigFile::default().resolve().unwrap_err().contains("no database"));
        let two =
            with_ksm(KsmSection { store: Some("s".into()), urls: Some(vec!["http://127.0.0.1:1/otp=".into()]), ..KsmSection::default() });
        assert!(two.resolve().unwrap_err().contains("give one KSM"));
        let remote_kh = with_ksm(KsmSection { urls: Some(vec!["u".into()]), key_handles: Some(vec!["1".into()]), ..KsmSection::default() });
        assert!(remote_kh.resolve().is_err());
        let zero = ConfigFile { request_timeout_ms: Some(0), ..with_ksm(KsmSection { store: Some("s".into()), ..KsmSection::default() }) };
        assert!(zero.resolve().is_err());
    }

    #[test]
    fn hsm_tables_replace_the_keystore_keys() {
        let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("validator.toml.example")).unwrap();
        let start = example.find("# The security module as an [hsm] table").unwrap();
        let end = start + example[start..].find("\n[ksm]").unwrap();
        let mut tables: Vec<String> = Vec::new();
        for line in example[start..end].lines().filter_map(|l| l.strip_prefix("# ")) {
            if line == "[hsm]" {
                tables.push(String::new());
            } else if let (Some(t), Some((key, _))) = (tables.last_mut(), line.split_once(" = ")) {
                if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    t.push_str(line);
                    t.push('\n');
                }
            }
        }
        let keys = "db = \"v.db\"\n[ksm]\nstore = \"s\"\n";
        let kinds: Vec<&str> = tables
            .iter()
            .map(|t| toml::from_str::<ConfigFile>(&format!("{keys}[hsm]\n{t}")).unwrap().resolve().unwrap().hsm.kind())
            .collect();
        assert_eq!(kinds, ["soft", "pkcs11"]);

        let yhsm1 = format!("{keys}[hsm]\ntype = \"yhsm1\"\ndevice = \"/dev/ttyACM0\"\n");
        let e = toml::from_str::<ConfigFile>(&yhsm1).unwrap().resolve().unwrap_err();
        assert!(e.starts_with("a YubiHSM 1 has no data keys: "), "{e}");
        let both = format!("keystore = \"ks\"\n{keys}[hsm]\ntype = \"soft\"\nkeystore = \"ks\"\n");
        assert!(toml::from_str::<ConfigFile>(&both).unwrap().resolve().unwrap_err().contains("not both"));
        let none = toml::from_str::<ConfigFile>(keys).unwrap().resolve().unwrap_err();
        assert!(none.contains("no security module"), "{none}");
        let file = toml::from_str::<ConfigFile>(&format!("{keys}[hsm]\ntype = \"pkcs11\"\ntoken_label = \"T\"\n")).unwrap();
        let flag = ConfigFile { keystore: Some("flag.ks".into()), ..ConfigFile::default() };
        assert_eq!(file.overridden_by(flag).resolve().unwrap().hsm, HsmConfig::soft(Path::new("flag.ks"), None));
    }

    #[test]
    fn flags_win_and_a_flag_source_replaces_the_files() {
        let file = ConfigFile {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ksm: Some(KsmSection { store: Some("file.db".into()), key_handles: Some(vec!["1".into()]), ..KsmSection::default() }),
            ..base()
        };
        let flags = ConfigFile { ksm: Some(KsmSection { aead_dir: Some("dir".into()), ..KsmSection::default() }), ..ConfigFile::default() };
        let c = file.overridden_by(flags).resolve().unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:1".parse().unwrap());
        assert!(matches!(c.ksm, KsmSource::Dir { ref path, ref key_handles } if path == Path::new("dir") && key_handles.len() == 1));
    }

    const REPLICATION: &str = r#"
db = "v.db"
keystore = "ks"
[ksm]
store = "s"
[replication]
site = 1
listen = "127.0.0.1:4433"
certificate = "auth1.pem"
key = "auth1.key"
ca = "ca.pem"
witness = "w"
[[replication.peers]]
name = "auth2"
site = 2
addr = "127.0.0.2:4433"
fingerprint = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
[[replication.peers]]
name = "w"
site = 3
addr = "127.0.0.3:4433"
"#;

    /// The commented-out TOML lines of `text` (after `from`, before `to`),
    /// uncommented; prose comments and the placeholder pin dropped.
    fn commented_toml(text: &str, from: &str, to: &str) -> String {
        let start = text.find(from).unwrap();
        let end = text[start..].find(to).map_or(text.len(), |e| start + e);
        text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with("fingerprint"))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_examples_replication_blocks_resolve() {
        let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("validator.toml.example")).unwrap();
        let site = commented_toml(&example, "# [replication]", "# ----");
        let keys = "db = \"v.db\"\nkeystore = \"ks\"\n[ksm]\nstore = \"s\"\n";
        let day_before = parse_utc("2026-11-26T09:00:00Z").unwrap();
        let c = toml::from_str::<ConfigFile>(&format!("{keys}{site}")).unwrap().resolve_node_at(day_before).unwrap();
        let NodeConfig::Site(s) = c else { panic!("not a site") };
        assert_eq!(s.accept_at_risk_until, Some(parse_utc("2026-11-27T08:00:00Z").unwrap()));
        assert_eq!(s.serve.replication.unwrap().witness.unwrap().name, "witness");
        let too_early = parse_utc("2026-11-26T07:59:59Z").unwrap();
        let e = toml::from_str::<ConfigFile>(&format!("{keys}{site}")).unwrap().resolve_node_at(too_early).unwrap_err();
        assert!(e.contains("at most 24 h"), "{e}");

        let witness = commented_toml(&example, "Its own file:", "\u{0}");
        let c = toml::from_str::<ConfigFile>(&witness).unwrap().resolve_node().unwrap();
        let NodeConfig::Witness(w) = c else { panic!("not a witness") };
        assert_eq!(w.replication.peers.iter().map(|p| p.site).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(w.http.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn utc_times_parse_and_format() {
        for t in [0u64, 951_782_400, 1_764_158_461, 253_402_300_799] {
            let text = format_unix(i64::try_from(t).unwrap());
            assert_eq!(parse_utc(&text).unwrap(), UNIX_EPOCH + Duration::from_secs(t), "{text}");
            assert_eq!(format_utc(UNIX_EPOCH + Duration::from_secs(t)), text);
        }
        let base = parse_utc("2026-11-27T08:00:00Z").unwrap();
        assert_eq!(parse_utc("2026-11-27T08:00:00.5Z").unwrap(), base + Duration::from_millis(500));
        assert_eq!(parse_utc("2026-11-27t08:00:00+00:00").unwrap(), base);
        assert!(parse_utc("2024-02-29T00:00:00Z").is_ok());
        for bad in [
            "2026-11-27T08:00:00",
            "2026-11-27T08:00:00+01:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "26-11-27T08:00:00Z",
            "2026-11-27T08:00:00.Z",
            "+026-11-27T08:00:00Z",
            "x",
            "",
        ] {
            assert!(parse_utc(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replication_section_resolves_and_is_off_when_absent() {
        assert!(with_ksm(KsmSection { store: Some("s".into()), ..KsmSection::default() }).resolve().unwrap().replication.is_none());
        let c = toml::from_str::<ConfigFile>(REPLICATION).unwrap().resolve().unwrap();
        let r = c.replication.unwrap();
        assert_eq!((r.site, r.deadline), (1, Duration::from_millis(1000)));
        assert_eq!(r.peers.len(), 1);
        assert_eq!(r.peers[0].name, "auth2");
        assert_eq!(r.witness.map(|w| w.site), Some(3));
        let typo = REPLICATION.replace("witness = ", "witnes = ");
        assert!(toml::from_str::<ConfigFile>(&typo).unwrap_err().to_string().contains("witnes"));
        let bad_witness = REPLICATION.replace("witness = \"w\"", "witness = \"nobody\"");
        assert!(toml::from_str::<ConfigFile>(&bad_witness).unwrap().resolve().unwrap_err().contains("nobody"));
        let dup = REPLICATION.replace("site = 3", "site = 2");
        assert!(toml::from_str::<ConfigFile>(&dup).unwrap().resolve().unwrap_err().contains("twice"));
        let pin = REPLICATION.replace("sha256:00", "zz");
        assert!(toml::from_str::<ConfigFile>(&pin).unwrap().resolve().unwrap_err().contains("fingerprint"));
    }
}
