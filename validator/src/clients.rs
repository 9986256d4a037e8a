//! Validation API clients in SQLite, keys encrypted by the security module.
//!
//! **At rest.** The `clients` table holds, per client, its id, whether it is
//! active, when it was created, free-form notes and its key as
//! [`SecurityModule::encrypt_value`] output under [`DataKey::Config`]. The
//! plaintext that is encrypted is `0x01 ‖ id (8 bytes, big-endian) ‖ key`:
//! binding the id means a ciphertext copied onto another client's row does
//! not decrypt as that client's key. Plaintext keys exist only in
//! [`ClientKey`] values, which zeroize on drop and never print.
//!
//! **Serving.** [`SqliteClients`] keeps every client, key decrypted, in
//! memory: [`ClientStore::client`] is a map lookup. Changes made by *other
//! processes* (`validator client add` while the server runs) are noticed
//! through a version number that triggers on the `clients` table bump on
//! every insert, update and delete (so even a hand-made SQL change counts).
//! The version is read at most once per refresh interval
//! ([`DEFAULT_REFRESH`], 500 ms), by whichever request comes first after
//! the interval; when it changed, the table is reloaded and decrypted.
//! **Propagation delay:** a change committed by another process is in
//! force for every request that starts more than one refresh interval
//! (plus one reload, a few milliseconds) after the commit. Changes made
//! through the same [`SqliteClients`] are in force at once.
//!
//! [`ClientDb`] is the table without the cache, for the command line:
//! listing and disabling need no keystore.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hsm::{DataKey, SecurityModule};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use zeroize::Zeroizing;

use crate::counters::{create_private, open_read_write, Synchronous, DEFAULT_BUSY_TIMEOUT};
use crate::{ApiClient, BackendFailure, ClientId, ClientKey, ClientStore};

/// Size of a new client key: 20 random bytes, as yubikey-val's
/// `ykval-gen-clients` makes (28 base64 characters).
pub const KEY_LEN: usize = 20;
/// Shortest key accepted from an operator (`--key`).
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted from an operator.
pub const MAX_KEY_LEN: usize = 64;
/// How often, at most, the server looks for changes by other processes.
pub const DEFAULT_REFRESH: Duration = Duration::from_millis(500);

/// Version byte of the encrypted key plaintext.
const KEY_FORMAT_V1: u8 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clients (
    id      INTEGER PRIMARY KEY,
    active  INTEGER NOT NULL DEFAULT 1,
    created INTEGER NOT NULL,
    key     BLOB    NOT NULL,
    notes   TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS clients_version (
    one     INTEGER PRIMARY KEY CHECK (one = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO clients_version (one, version) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS clients_version_insert AFTER INSERT ON clients
    BEGIN UPDATE clients_version SET version = version + 1; END;
CREATE TRIGGER IF NOT EXISTS clients_version_update AFTER UPDATE ON clients
    BEGIN UPDATE clients_version SET version = version + 1; END;
CREATE TRIGGER IF NOT EXISTS clients_version_delete AFTER DELETE ON clients
    BEGIN UPDATE clients_version SET version = version + 1; END;
";

/// Errors of the client table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A client with this id exists already.
    #[error("client {0} exists already")]
    Exists(ClientId),
    /// No client with this id.
    #[error("no client {0}")]
    NotFound(ClientId),
    /// Every id up to 9,999,999,999 is taken.
    #[error("no client id is free")]
    IdsExhausted,
    /// A key given by the operator is unusable.
    #[error("invalid client key: {0}")]
    InvalidKey(String),
    /// A stored key does not decrypt with this module's config key.
    #[error("the key of client {id} cannot be decrypted: another keystore's config key, or a damaged row ({reason})")]
    Undecryptable {
        /// The client.
        id: ClientId,
        /// Why.
        reason: String,
    },
    /// The security module failed.
    #[error("security module: {0}")]
    Module(#[from] hsm::Error),
    /// The database failed, or holds a malformed row.
    #[error("client database: {0}")]
    Database(String),
}

fn db_err(e: rusqlite::Error) -> ClientError {
    ClientError::Database(e.to_string())
}

/// A client as listed: never its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Its id.
    pub id: ClientId,
    /// Disabled clients get `NO_SUCH_CLIENT`.
    pub active: bool,
    /// Creation time (Unix seconds).
    pub created: i64,
    /// Free-form notes.
    pub notes: String,
}

/// One stored row, key still encrypted.
struct Row {
    id: ClientId,
    active: bool,
    sealed: Vec<u8>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn client_id(n: i64) -> Result<ClientId, ClientError> {
    u64::try_from(n).ok().and_then(ClientId::new).ok_or_else(|| ClientError::Database(format!("malformed client id {n} in the table")))
}

fn sql_id(id: ClientId) -> i64 {
    // ClientId is at most 9,999,999,999: always fits.
    i64::try_from(id.get()).unwrap_or(i64::MAX)
}

/// Check an operator-supplied key's length.
pub fn check_key(key: &ClientKey) -> Result<(), ClientError> {
    let n = key.expose().len();
    if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&n) {
        Ok(())
    } else {
        Err(ClientError::InvalidKey(format!("{n} bytes; a key has {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes (yubikey-val makes {KEY_LEN})")))
    }
}

/// Encrypt `key` for client `id` under the config data key.
fn seal(hsm: &dyn SecurityModule, id: ClientId, key: &ClientKey) -> Result<Vec<u8>, ClientError> {
    let mut plain = Zeroizing::new(Vec::with_capacity(9 + key.expose().len()));
    plain.push(KEY_FORMAT_V1);
    plain.extend_from_slice(&id.get().to_be_bytes());
    plain.extend_from_slice(key.expose());
    Ok(hsm.encrypt_value(DataKey::Config, &plain)?)
}

/// Decrypt a stored key and check that it belongs to `id`.
fn open_key(hsm: &dyn SecurityModule, id: ClientId, sealed: &[u8]) -> Result<ClientKey, ClientError> {
    let plain = hsm.decrypt_value(DataKey::Config, sealed).map_err(|e| match e {
        hsm::Error::ValueInvalid => ClientError::Undecryptable { id, reason: e.to_string() },
        other => ClientError::Module(other),
    })?;
    let bad = |reason: &str| ClientError::Undecryptable { id, reason: reason.to_owned() };
    match plain.split_first() {
        Some((&KEY_FORMAT_V1, rest)) if rest.len() > 8 => {
            let (bound, key) = rest.split_at(8);
            if bound != id.get().to_be_bytes() {
                return Err(bad("the key is bound to another client id"));
            }
            Ok(ClientKey::new(key.to_vec()))
        }
        _ => Err(bad("unknown key format")),
    }
}

/// The `clients` table, without a cache: for the command line and as the
/// backing of [`SqliteClients`].
pub struct ClientDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl fmt::Debug for ClientDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientDb").field("path", &self.path).finish()
    }
}

impl ClientDb {
    /// Open the database at `path`, creating it (mode 0600) if missing. It
    /// may be the validator's counter database: the tables are separate.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        create_private(path).map_err(ClientError::Database)?;
        Self::open_existing(path)
    }

    /// Open an existing database; a missing file is an error.
    pub fn open_existing(path: &Path) -> Result<Self, ClientError> {
        if !path.is_file() {
            return Err(ClientError::Database(format!("{}: no such database file", path.display())));
        }
        let conn = open_read_write(path, Synchronous::Full, DEFAULT_BUSY_TIMEOUT).map_err(ClientError::Database)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(Self { path: path.to_path_buf(), conn: Mutex::new(conn) })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every client, by id; never keys.
    pub fn list(&self) -> Result<Vec<ClientInfo>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT id, active, created, notes FROM clients ORDER BY id").map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)))
            .map_err(db_err)?;
        rows.map(|row| {
            let (id, active, created, notes) = row.map_err(db_err)?;
            Ok(ClientInfo { id: client_id(id)?, active: active != 0, created, notes })
        })
        .collect()
    }

    /// Add a client. Without `id`, the next one after the largest in use;
    /// without `key`, [`KEY_LEN`] bytes from the module's random generator.
    /// Returns the id and the key (to be shown once).
    pub fn add(
        &self,
        hsm: &dyn SecurityModule,
        id: Option<ClientId>,
        key: Option<ClientKey>,
        notes: &str,
    ) -> Result<(ClientId, ClientKey), ClientError> {
        let key = match key {
            Some(k) => {
                check_key(&k)?;
                k
            }
            None => {
                let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
                hsm.random(&mut bytes)?;
                ClientKey::new(bytes.to_vec())
            }
        };
        let mut conn = self.lock();
        // IMMEDIATE: the id choice and the insert see no other writer between them.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let id = match id {
            Some(id) => {
                if tx
                    .query_row("SELECT 1 FROM clients WHERE id = ?1", params![sql_id(id)], |_| Ok(()))
                    .optional()
                    .map_err(db_err)?
                    .is_some()
                {
                    return Err(ClientError::Exists(id));
                }
                id
            }
            None => {
                let max: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM clients", [], |r| r.get(0)).map_err(db_err)?;
                u64::try_from(max).ok().and_then(|m| m.checked_add(1)).and_then(ClientId::new).ok_or(ClientError::IdsExhausted)?
            }
        };
        let sealed = seal(hsm, id, &key)?;
        tx.execute(
            "INSERT INTO clients (id, active, created, key, notes) VALUES (?1, 1, ?2, ?3, ?4)",
            params![sql_id(id), unix_now(), sealed, notes],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(client = %id, "added API client");
        Ok((id, key))
    }

    /// Enable or disable a client.
    pub fn set_active(&self, id: ClientId, active: bool) -> Result<(), ClientError> {
        let n =
            self.lock().execute("UPDATE clients SET active = ?2 WHERE id = ?1", params![sql_id(id), i64::from(active)]).map_err(db_err)?;
        if n == 0 {
            return Err(ClientError::NotFound(id));
        }
        tracing::info!(client = %id, active, "API client changed");
        Ok(())
    }

    /// Disable a client: it gets `NO_SUCH_CLIENT` from then on.
    pub fn disable(&self, id: ClientId) -> Result<(), ClientError> {
        self.set_active(id, false)
    }

    /// Enable a disabled client again.
    pub fn enable(&self, id: ClientId) -> Result<(), ClientError> {
        self.set_active(id, true)
    }

    /// Give a client a new random key; the old one stops working.
    pub fn rotate(&self, hsm: &dyn SecurityModule, id: ClientId) -> Result<ClientKey, ClientError> {
        let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
        hsm.random(&mut bytes)?;
        let key = ClientKey::new(bytes.to_vec());
        let sealed = seal(hsm, id, &key)?;
        let n = self.lock().execute("UPDATE clients SET key = ?2 WHERE id = ?1", params![sql_id(id), sealed]).map_err(db_err)?;
        if n == 0 {
            return Err(ClientError::NotFound(id));
        }
        tracing::info!(client = %id, "rotated API client key");
        Ok(key)
    }

    /// The change counter of the table.
    pub fn version(&self) -> Result<i64, ClientError> {
        self.lock().query_row("SELECT version FROM clients_version", [], |r| r.get(0)).map_err(db_err)
    }

    /// The version and every row, read in one transaction (consistent).
    fn load(&self) -> Result<(i64, Vec<Row>), ClientError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(db_err)?;
        let version: i64 = tx.query_row("SELECT version FROM clients_version", [], |r| r.get(0)).map_err(db_err)?;
        let rows = {
            let mut stmt = tx.prepare_cached("SELECT id, active, key FROM clients").map_err(db_err)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?))).map_err(db_err)?;
            rows.map(|row| {
                let (id, active, sealed) = row.map_err(db_err)?;
                Ok(Row { id: client_id(id)?, active: active != 0, sealed })
            })
            .collect::<Result<Vec<_>, ClientError>>()?
        };
        tx.commit().map_err(db_err)?;
        Ok((version, rows))
    }
}

/// A cached client, or the reason its key is unusable.
enum Entry {
    Ready(ApiClient),
    Broken(String),
}

struct Cache {
    version: i64,
    clients: HashMap<ClientId, Entry>,
}

/// The API clients for the server: a [`ClientStore`] served from memory.
/// See the [module docs](self) for how changes propagate.
pub struct SqliteClients {
    db: ClientDb,
    hsm: Arc<dyn SecurityModule>,
    refresh: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` at which the version is next read.
    next_check_ms: AtomicU64,
    cache: RwLock<Arc<Cache>>,
}

impl fmt::Debug for SqliteClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteClients").field("db", &self.db).field("refresh", &self.refresh).finish()
    }
}

impl SqliteClients {
    /// Open (creating if missing) and load every client, decrypting the keys
    /// with `hsm`. Fails if any stored key does not decrypt (the wrong
    /// keystore, most likely), naming the clients.
    pub fn open(path: &Path, hsm: Arc<dyn SecurityModule>) -> Result<Self, ClientError> {
        Self::open_with_refresh(path, hsm, DEFAULT_REFRESH)
    }

    /// As [`Self::open`], looking for other processes' changes at most every
    /// `refresh`.
    pub fn open_with_refresh(path: &Path, hsm: Arc<dyn SecurityModule>, refresh: Duration) -> Result<Self, ClientError> {
        let db = ClientDb::open(path)?;
        let cache = build_cache(&db, hsm.as_ref())?;
        let mut broken: Vec<(ClientId, &str)> = cache
            .clients
            .iter()
            .filter_map(|(id, e)| match e {
                Entry::Broken(reason) => Some((*id, reason.as_str())),
                Entry::Ready(_) => None,
            })
            .collect();
        broken.sort_unstable();
        if let Some((first, reason)) = broken.first() {
            let others = if broken.len() > 1 { format!("; {} more client(s) as well", broken.len() - 1) } else { String::new() };
            return Err(ClientError::Undecryptable { id: *first, reason: format!("{reason}{others}") });
        }
        let epoch = Instant::now();
        let first_check = u64::try_from(refresh.as_millis()).unwrap_or(u64::MAX);
        Ok(Self { db, hsm, refresh, epoch, next_check_ms: AtomicU64::new(first_check), cache: RwLock::new(Arc::new(cache)) })
    }

    /// The table underneath.
    #[must_use]
    pub fn db(&self) -> &ClientDb {
        &self.db
    }

    /// Every client; never keys.
    pub fn list(&self) -> Result<Vec<ClientInfo>, ClientError> {
        self.db.list()
    }

    /// Add a client (see [`ClientDb::add`]); in force at once.
    pub fn add(&self, id: Option<ClientId>, key: Option<ClientKey>) -> Result<(ClientId, ClientKey), ClientError> {
        let added = self.db.add(self.hsm.as_ref(), id, key, "")?;
        self.reload()?;
        Ok(added)
    }

    /// Disable a client; in force at once.
    pub fn disable(&self, id: ClientId) -> Result<(), ClientError> {
        self.db.disable(id)?;
        self.reload()
    }

    /// Enable a client; in force at once.
    pub fn enable(&self, id: ClientId) -> Result<(), ClientError> {
        self.db.enable(id)?;
        self.reload()
    }

    /// New random key for a client; in force at once.
    pub fn rotate(&self, id: ClientId) -> Result<ClientKey, ClientError> {
        let key = self.db.rotate(self.hsm.as_ref(), id)?;
        self.reload()?;
        Ok(key)
    }

    /// Reload the table now.
    pub fn reload(&self) -> Result<(), ClientError> {
        let cache = build_cache(&self.db, self.hsm.as_ref())?;
        for (id, entry) in &cache.clients {
            if let Entry::Broken(reason) = entry {
                tracing::error!(client = %id, reason, "API client key unusable; the client gets BACKEND_ERROR");
            }
        }
        *self.cache.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(cache);
        Ok(())
    }

    fn snapshot(&self) -> Arc<Cache> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Read the version if the interval has passed (one caller does, the
    /// others use the cache meanwhile); reload if it changed.
    fn refresh_if_due(&self) -> Result<(), BackendFailure> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let due = self.next_check_ms.load(Ordering::Acquire);
        if now < due {
            return Ok(());
        }
        let next = now.saturating_add(u64::try_from(self.refresh.as_millis()).unwrap_or(u64::MAX));
        if self.next_check_ms.compare_exchange(due, next, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Ok(()); // another request is checking
        }
        let result = match self.db.version() {
            Ok(v) if v == self.snapshot().version => Ok(()),
            Ok(_) => self.reload(),
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            // Check again on the next request.
            self.next_check_ms.store(0, Ordering::Release);
            BackendFailure(format!("API clients: {e}"))
        })
    }
}

/// Read and decrypt the whole table. A key that does not decrypt makes its
/// client [`Entry::Broken`]; a module or database failure is an error.
fn build_cache(db: &ClientDb, hsm: &dyn SecurityModule) -> Result<Cache, ClientError> {
    let (version, rows) = db.load()?;
    let mut clients = HashMap::with_capacity(rows.len());
    for row in rows {
        let entry = match open_key(hsm, row.id, &row.sealed) {
            Ok(key) => Entry::Ready(ApiClient { id: row.id, active: row.active, key }),
            Err(ClientError::Undecryptable { reason, .. }) => Entry::Broken(reason),
            Err(e) => return Err(e),
        };
        clients.insert(row.id, entry);
    }
    Ok(Cache { version, clients })
}

impl ClientStore for SqliteClients {
    fn client(&self, id: ClientId) -> Result<Option<ApiClient>, BackendFailure> {
        self.refresh_if_due()?;
        match self.snapshot().clients.get(&id) {
            None => Ok(None),
            Some(Entry::Ready(client)) => Ok(Some(client.clone())),
            Some(Entry::Broken(reason)) => Err(BackendFailure(format!("API client {id}: key unusable: {reason}"))),
        }
    }
}
