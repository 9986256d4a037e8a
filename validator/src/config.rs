//! `validator serve` configuration: a TOML file, overridden by flags.
//!
//! Unknown keys are errors (`deny_unknown_fields`). See
//! `validator/validator.toml.example`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// `[replication]`: this site's QUIC endpoint and its peers.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// This site's id in the group.
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
    /// The name of the peer that is the counters-only witness, if any.
    pub witness: Option<String>,
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

/// A resolved `[replication]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// This site's id.
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

impl ReplicationSection {
    /// Check and resolve: exactly one other full site, an optional witness
    /// named among the peers, distinct site ids and names.
    pub fn resolve(self) -> Result<ReplicationConfig, String> {
        let need = |v: Option<PathBuf>, what: &str| v.ok_or_else(|| format!("replication: `{what}` is required"));
        let site = self.site.ok_or("replication: `site` is required")?;
        let listen = self.listen.ok_or("replication: `listen` is required")?;
        let (certificate, key, ca) = (need(self.certificate, "certificate")?, need(self.key, "key")?, need(self.ca, "ca")?);
        let deadline = Duration::from_millis(positive(self.deadline_ms.unwrap_or(1000), "replication deadline_ms")?);
        let mut seen = std::collections::BTreeSet::from([site]);
        let mut names = std::collections::BTreeSet::new();
        for p in &self.peers {
            if !seen.insert(p.site) {
                return Err(format!("replication: site id {} appears twice", p.site));
            }
            if !names.insert(p.name.to_ascii_lowercase()) {
                return Err(format!("replication: peer name {:?} appears twice", p.name));
            }
            if let Some(f) = &p.fingerprint {
                f.parse::<replication::pki::Fingerprint>().map_err(|e| format!("replication: peer {:?} fingerprint: {e}", p.name))?;
            }
        }
        let (witness, peers): (Vec<_>, Vec<_>) = self.peers.into_iter().partition(|p| self.witness.as_deref() == Some(p.name.as_str()));
        if let Some(w) = &self.witness {
            if witness.is_empty() {
                return Err(format!("replication: witness {w:?} is not among the peers"));
            }
        }
        if peers.len() != 1 {
            return Err(format!("replication: exactly one other full site is supported, {} given", peers.len()));
        }
        Ok(ReplicationConfig { site, listen, certificate, key, ca, deadline, peers, witness: witness.into_iter().next() })
    }
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
    /// The keystore.
    pub keystore: PathBuf,
    /// Its password file (prompted for when absent).
    pub password_file: Option<PathBuf>,
    /// The KSM.
    pub ksm: KsmSource,
    /// HTTP settings; `request_timeout` is the answer-time ceiling.
    pub http: HttpOptions,
    /// Counter replication, when configured.
    pub replication: Option<ReplicationConfig>,
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
        Self {
            listen: over.listen.or(self.listen),
            db: over.db.or(self.db),
            synchronous: over.synchronous.or(self.synchronous),
            keystore: over.keystore.or(self.keystore),
            password_file: over.password_file.or(self.password_file),
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

    /// Check completeness.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let db = self.db.ok_or("no database: give --db or `db` in the config")?;
        let keystore = self.keystore.ok_or("no keystore: give --keystore or `keystore` in the config")?;
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
        let d = HttpOptions::new(DEFAULT_LISTEN);
        let http = HttpOptions {
            listen: self.listen.unwrap_or(d.listen),
            request_timeout: Duration::from_millis(positive(self.request_timeout_ms.unwrap_or(5000), "request_timeout_ms")?),
            workers: self.workers.unwrap_or(d.workers),
            max_blocking_threads: self.max_blocking_threads.unwrap_or(d.max_blocking_threads).max(1),
            max_connections: self.max_connections.unwrap_or(d.max_connections).max(1),
        };
        let synchronous = self.synchronous.as_deref().map(str::parse).transpose()?.unwrap_or_default();
        let replication = self.replication.map(ReplicationSection::resolve).transpose()?;
        Ok(ServeConfig { db, synchronous, keystore, password_file: self.password_file, ksm, http, replication })
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
