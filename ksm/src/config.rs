//! `ksm serve` configuration: a TOML file, overridden by flags.
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo never turns
//! into a silently ignored setting. See `ksm/ksm.toml.example`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hsm::config::HsmConfig;
use serde::Deserialize;

use crate::aead_dir::KeyHandleDir;
use crate::serve::{default_options, HttpOptions};

/// The file's contents; every key is optional so that flags can fill in.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// The keystore file (the same as an `[hsm]` table of `type = "soft"`;
    /// not together with one).
    pub keystore: Option<PathBuf>,
    /// File holding the keystore password.
    pub password_file: Option<PathBuf>,
    /// `[hsm]`: the security module, by `type` (`soft`, `pkcs11`, `yhsm1`).
    pub hsm: Option<HsmConfig>,
    /// The SQLite AEAD store.
    pub store: Option<PathBuf>,
    /// A pyhsm-layout AEAD directory (instead of `store`).
    pub aead_dir: Option<PathBuf>,
    /// Key handles to try, in order.
    pub key_handles: Option<Vec<String>>,
    /// Deadline per request, in milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// Async worker threads (0: one per CPU).
    pub workers: Option<usize>,
    /// Threads for blocking security-module calls.
    pub max_blocking_threads: Option<usize>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
}

impl ConfigFile {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Fill every key that `over` sets from it (flags win over the file).
    #[must_use]
    pub fn overridden_by(self, over: Self) -> Self {
        // Naming one AEAD source on the command line replaces the file's.
        let (store, aead_dir) =
            if over.store.is_some() || over.aead_dir.is_some() { (over.store, over.aead_dir) } else { (self.store, self.aead_dir) };
        // A keystore named by a flag replaces the file's security module.
        let (keystore, password_file, hsm) = if over.keystore.is_some() || over.hsm.is_some() {
            (over.keystore, over.password_file.or(self.password_file), over.hsm)
        } else {
            (self.keystore, over.password_file.or(self.password_file), self.hsm)
        };
        Self {
            listen: over.listen.or(self.listen),
            keystore,
            password_file,
            hsm,
            store,
            aead_dir,
            key_handles: over.key_handles.or(self.key_handles),
            request_timeout_ms: over.request_timeout_ms.or(self.request_timeout_ms),
            workers: over.workers.or(self.workers),
            max_blocking_threads: over.max_blocking_threads.or(self.max_blocking_threads),
            max_connections: over.max_connections.or(self.max_connections),
        }
    }

    /// Check completeness and turn into a [`ServeConfig`].
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let hsm = resolve_hsm(self.hsm, self.keystore, self.password_file)?;
        let aeads = match (self.store, self.aead_dir) {
            (Some(s), None) => AeadSource::Store(s),
            (None, Some(d)) => AeadSource::Dir(d),
            (None, None) => return Err("no AEADs: give --store or --aead-dir (or `store`/`aead_dir` in the config)".to_owned()),
            (Some(_), Some(_)) => return Err("give either `store` or `aead_dir`, not both".to_owned()),
        };
        let key_handles = self
            .key_handles
            .filter(|k| !k.is_empty())
            .ok_or("no key handles: give --key-handles or `key_handles` in the config")?
            .iter()
            .map(|k| k.parse::<KeyHandleDir>().map_err(|e| format!("key handle {k:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let d = default_options();
        let timeout_ms = self.request_timeout_ms.unwrap_or(u64::try_from(d.request_timeout.as_millis()).unwrap_or(5000));
        if timeout_ms == 0 {
            return Err("request_timeout_ms must be positive".to_owned());
        }
        let http = HttpOptions {
            listen: self.listen.unwrap_or(d.listen),
            request_timeout: Duration::from_millis(timeout_ms),
            workers: self.workers.unwrap_or(d.workers),
            max_blocking_threads: self.max_blocking_threads.unwrap_or(d.max_blocking_threads).max(1),
            max_connections: self.max_connections.unwrap_or(d.max_connections).max(1),
        };
        Ok(ServeConfig { hsm, aeads, key_handles, http })
    }
}

/// The security module of a configuration: an `[hsm]` table, or the older
/// top-level `keystore` and `password_file` keys (a soft keystore), never
/// both.
pub fn resolve_hsm(hsm: Option<HsmConfig>, keystore: Option<PathBuf>, password_file: Option<PathBuf>) -> Result<HsmConfig, String> {
    match (hsm, keystore, password_file) {
        (Some(_), Some(_), _) | (Some(_), None, Some(_)) => {
            Err("the security module is given twice: use either an [hsm] table or the top-level `keystore`/`password_file` keys \
             (and their flags), not both"
                .to_owned())
        }
        (Some(hsm), None, None) => {
            hsm.check().map_err(|e| format!("[hsm] {}: {e}", hsm.kind()))?;
            Ok(hsm)
        }
        (None, Some(keystore), password_file) => Ok(HsmConfig::soft(&keystore, password_file.as_deref())),
        (None, None, _) => Err("no security module: give --keystore, `keystore` or an [hsm] table in the config".to_owned()),
    }
}

/// Where the AEADs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AeadSource {
    /// The SQLite AEAD store.
    Store(PathBuf),
    /// A pyhsm-layout directory.
    Dir(PathBuf),
}

/// A complete service configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The security module.
    pub hsm: HsmConfig,
    /// The AEADs.
    pub aeads: AeadSource,
    /// Key handles to try, in order.
    pub key_handles: Vec<KeyHandleDir>,
    /// HTTP settings.
    pub http: HttpOptions,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_resolves() {
        let example = ConfigFile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("ksm.toml.example")).unwrap();
        let c = example.resolve().unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:8002".parse().unwrap());
        assert!(matches!(c.aeads, AeadSource::Store(_)));
        assert_eq!(c.key_handles.len(), 1);
    }

    #[test]
    fn unknown_keys_and_incomplete_configs_are_refused() {
        let e = toml::from_str::<ConfigFile>("listen = \"127.0.0.1:1\"\nkey_handel = [\"1\"]\n").unwrap_err();
        assert!(e.to_string().contains("key_handel"), "{e}");
        let base = ConfigFile { keystore: Some("ks".into()), key_handles: Some(vec!["1".into()]), ..ConfigFile::default() };
        assert!(base.clone_with(|c| c.store = Some("s".into())).resolve().is_ok());
        assert!(base.clone_with(|_| {}).resolve().unwrap_err().contains("no AEADs"));
        let both = base.clone_with(|c| {
            c.store = Some("s".into());
            c.aead_dir = Some("d".into());
        });
        assert!(both.resolve().unwrap_err().contains("not both"));
        let bad_kh = base.clone_with(|c| {
            c.store = Some("s".into());
            c.key_handles = Some(vec!["0xzz".into()]);
        });
        assert!(bad_kh.resolve().unwrap_err().contains("0xzz"));
        let zero = base.clone_with(|c| {
            c.store = Some("s".into());
            c.request_timeout_ms = Some(0);
        });
        assert!(zero.resolve().is_err());
    }

    /// The example's commented `[hsm]` tables, uncommented, one per type.
    fn example_hsm_tables() -> Vec<String> {
        let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ksm.toml.example")).unwrap();
        let start = example.find("# ---- The security module").unwrap();
        let mut tables: Vec<String> = Vec::new();
        for line in example[start..].lines().filter_map(|l| l.strip_prefix("# ")) {
            if line == "[hsm]" {
                tables.push(String::new());
            } else if let (Some(t), Some((key, _))) = (tables.last_mut(), line.split_once(" = ")) {
                if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    t.push_str(line);
                    t.push('\n');
                }
            }
        }
        tables
    }

    #[test]
    fn hsm_tables_and_the_older_keys() {
        let tables = example_hsm_tables();
        let kinds: Vec<&str> = tables
            .iter()
            .map(|t| {
                let text = format!("store = \"s\"\nkey_handles = [\"1\"]\n[hsm]\n{t}");
                let c = toml::from_str::<ConfigFile>(&text).unwrap_or_else(|e| panic!("{t}: {e}")).resolve().unwrap();
                c.hsm.kind()
            })
            .collect();
        assert_eq!(kinds, ["soft", "pkcs11", "yhsm1"]);

        let old = ConfigFile {
            keystore: Some("ks".into()),
            password_file: Some("pw".into()),
            store: Some("s".into()),
            key_handles: Some(vec!["1".into()]),
            ..ConfigFile::default()
        };
        assert_eq!(old.clone().resolve().unwrap().hsm, HsmConfig::soft(Path::new("ks"), Some(Path::new("pw"))));
        let table = HsmConfig::soft(Path::new("other"), None);
        let both = old.clone_with(|c| c.hsm = Some(table.clone()));
        assert!(both.resolve().unwrap_err().contains("not both"));
        let pw_and_table = old.clone_with(|c| {
            c.keystore = None;
            c.hsm = Some(table.clone());
        });
        assert!(pw_and_table.resolve().unwrap_err().contains("not both"));
        let none = old.clone_with(|c| {
            c.keystore = None;
            c.password_file = None;
        });
        assert!(none.resolve().unwrap_err().contains("no security module"));
        // A keystore flag replaces the file's [hsm] table.
        let file = old.clone_with(|c| {
            c.keystore = None;
            c.password_file = None;
            c.hsm = Some(table.clone());
        });
        let flag = ConfigFile { keystore: Some("flag.ks".into()), ..ConfigFile::default() };
        assert_eq!(file.overridden_by(flag).resolve().unwrap().hsm, HsmConfig::soft(Path::new("flag.ks"), None));
        let e = toml::from_str::<ConfigFile>("[hsm]\ntype = \"yhsm1\"\ndevice = \"/dev/x\"\nsocket = \"/s\"\n").unwrap();
        let e = e.clone_with(|c| {
            c.store = Some("s".into());
            c.key_handles = Some(vec!["1".into()]);
        });
        assert!(e.resolve().unwrap_err().contains("not both"));
        let typo = toml::from_str::<ConfigFile>("[hsm]\ntype = \"pkcs11\"\npin_fil = \"p\"\n").unwrap_err();
        assert!(typo.to_string().contains("pin_fil"), "{typo}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = ConfigFile { store: Some("file.db".into()), listen: Some("127.0.0.1:1".parse().unwrap()), ..ConfigFile::default() };
        let flags = ConfigFile { aead_dir: Some("dir".into()), ..ConfigFile::default() };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.store, None);
        assert_eq!(merged.aead_dir, Some("dir".into()));
        assert_eq!(merged.listen, Some("127.0.0.1:1".parse().unwrap()));
    }

    impl ConfigFile {
        fn clone_with(&self, f: impl FnOnce(&mut Self)) -> Self {
            let mut c = self.clone();
            f(&mut c);
            c
        }
    }
}
