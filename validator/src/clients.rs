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
//!
//! **Replication.** Every row has a `version` (1 at creation, one more at
//! every local change: disable, enable, rotate); triggers append the id of
//! every inserted or updated row to `clients_outbox` while a peer is
//! registered in `clients_peer_cursors`. [`ClientSync`] is the dataset for
//! [`replication::sync`]: it opens keys with this site's module and
//! re-seals merged ones under it, so ciphertexts never travel.
//!
//! **Migration.** A database without `clients.version` gets it when
//! opened (`ALTER TABLE clients ADD COLUMN version INTEGER NOT NULL
//! DEFAULT 1`), with the outbox tables and triggers, in one write
//! transaction. Older binaries still read and write the file, but their
//! changes do not bump versions (a peer's copy may then win).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hsm::{DataKey, SecurityModule};
use ksm::outbox::{Outbox, PeerPosition};
use replication::sync::{bucket_of, Changes, Digest, Item, Merged, SyncError, SyncStore};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest as _, Sha256};
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
    notes   TEXT    NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1
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
CREATE TABLE IF NOT EXISTS clients_outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients_peer_cursors (
    peer      TEXT    NOT NULL PRIMARY KEY,
    acked_seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The migration from the schema without row versions: every existing
/// client is at version 1, as a new one is.
const MIGRATE_VERSION: &str = "ALTER TABLE clients ADD COLUMN version INTEGER NOT NULL DEFAULT 1";

/// The outbox triggers (after the migration: they are the same for both
/// schemas). Written only while a peer is registered, like the counters'.
const OUTBOX_TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS clients_outbox_insert AFTER INSERT ON clients
    WHEN EXISTS (SELECT 1 FROM clients_peer_cursors)
    BEGIN INSERT INTO clients_outbox (id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS clients_outbox_update AFTER UPDATE ON clients
    WHEN EXISTS (SELECT 1 FROM clients_peer_cursors)
    BEGIN INSERT INTO clients_outbox (id) VALUES (NEW.id); END;
";

/// The replication outbox and its per-peer cursors.
const OUTBOX: Outbox = Outbox { table: "clients_outbox", cursors: "clients_peer_cursors" };
/// Longest notes accepted by [`ClientDb::add`].
pub const MAX_NOTES_LEN: usize = 1024;

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
    /// Notes given by the operator are too long.
    #[error("client notes: {0} bytes, at most {MAX_NOTES_LEN}")]
    NotesTooLong(usize),
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

/// Create missing tables, add `clients.version` to a database of the
/// previous schema, and create the outbox triggers, in one write
/// transaction (two processes opening one old file migrate it once).
fn migrate(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
    let result = (|| -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)?;
        let has_version: bool = conn
            .query_row("SELECT count(*) FROM pragma_table_info('clients') WHERE name = 'version'", [], |r| r.get::<_, i64>(0))
            .map(|n| n > 0)?;
        if !has_version {
            conn.execute_batch(MIGRATE_VERSION)?;
            tracing::info!("client table migrated: column clients.version added (1 for the existing rows)");
        }
        conn.execute_batch(OUTBOX_TRIGGERS)?;
        conn.execute_batch("COMMIT")
    })();
    result.map_err(|e| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        db_err(e)
    })
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
        migrate(&conn)?;
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
        if notes.len() > MAX_NOTES_LEN {
            return Err(ClientError::NotesTooLong(notes.len()));
        }
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
        let n = self
            .lock()
            .execute("UPDATE clients SET active = ?2, version = version + 1 WHERE id = ?1", params![sql_id(id), i64::from(active)])
            .map_err(db_err)?;
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
        let n = self
            .lock()
            .execute("UPDATE clients SET key = ?2, version = version + 1 WHERE id = ?1", params![sql_id(id), sealed])
            .map_err(db_err)?;
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

// ----------------------------------------------------------------------
// Replication
// ----------------------------------------------------------------------

/// Version byte of the canonical item value.
const CANONICAL_V1: u8 = 1;
/// Bytes of the canonical value before the notes: format, version,
/// disabled, created, notes length.
const CANONICAL_FIXED: usize = 1 + 8 + 1 + 8 + 2;

/// One client as replicated: every column but the local ciphertext, with
/// the key in the clear (zeroized on drop).
struct Canonical {
    id: ClientId,
    version: u64,
    active: bool,
    created: i64,
    notes: String,
    key: ClientKey,
}

impl Canonical {
    /// The item key: the id, u64 big-endian.
    fn item_key(&self) -> Vec<u8> {
        self.id.get().to_be_bytes().to_vec()
    }

    /// format (1) ‖ version (u64 BE) ‖ disabled (0 or 1) ‖ created (i64
    /// BE) ‖ notes length (u16 BE) ‖ notes ‖ `tail` (the key, or its
    /// SHA-256 in the digest). `disabled` rather than `active`: at equal
    /// versions the greater bytes win, so a concurrent disable beats a
    /// concurrent rotate or enable (fail-safe).
    fn encode_with(&self, tail: &[u8]) -> Zeroizing<Vec<u8>> {
        let notes = self.notes.as_bytes();
        let mut v = Zeroizing::new(Vec::with_capacity(CANONICAL_FIXED + notes.len() + tail.len()));
        v.push(CANONICAL_V1);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.push(u8::from(!self.active));
        v.extend_from_slice(&self.created.to_be_bytes());
        // Notes longer than u16 never fit in an item: refused by `item`.
        v.extend_from_slice(&u16::try_from(notes.len()).unwrap_or(u16::MAX).to_be_bytes());
        v.extend_from_slice(notes);
        v.extend_from_slice(tail);
        v
    }

    /// The item value (holds the key in the clear).
    fn value(&self) -> Zeroizing<Vec<u8>> {
        self.encode_with(self.key.expose())
    }

    /// The item, if it fits.
    fn item(&self) -> Result<Item, String> {
        let mut value = self.value();
        if value.len() > replication::sync::MAX_VALUE {
            return Err(format!("client {}: its notes are too long to replicate", self.id));
        }
        // Moved out, not copied: no second plaintext copy is left behind.
        Ok(Item { key: self.item_key(), value: std::mem::take(&mut *value) })
    }

    /// What the digest covers: the value with SHA-256 of the key in place
    /// of the key, so that no digest is computed over the bare secret.
    fn digest_value(&self) -> Zeroizing<Vec<u8>> {
        let key_hash: [u8; 32] = Sha256::digest(self.key.expose()).into();
        self.encode_with(&key_hash)
    }

    /// Decode an item; `None` if it is malformed.
    fn decode(item: &Item) -> Option<Self> {
        let id = ClientId::new(u64::from_be_bytes(item.key.as_slice().try_into().ok()?))?;
        let v = item.value.as_slice();
        if v.len() < CANONICAL_FIXED || v[0] != CANONICAL_V1 {
            return None;
        }
        let version = u64::from_be_bytes(v[1..9].try_into().ok()?);
        i64::try_from(version).ok().filter(|n| *n >= 1)?;
        let active = match v[9] {
            0 => true,
            1 => false,
            _ => return None,
        };
        let created = i64::from_be_bytes(v[10..18].try_into().ok()?);
        let notes_len = usize::from(u16::from_be_bytes(v[18..20].try_into().ok()?));
        let rest = &v[CANONICAL_FIXED..];
        if rest.len() < notes_len {
            return None;
        }
        let (notes, key) = rest.split_at(notes_len);
        let notes = std::str::from_utf8(notes).ok()?.to_owned();
        let key = ClientKey::new(key.to_vec());
        check_key(&key).ok()?;
        Some(Self { id, version, active, created, notes, key })
    }
}

/// A stored row as replication reads it, key still sealed.
struct StoredRow {
    id: ClientId,
    version: i64,
    active: bool,
    created: i64,
    notes: String,
    sealed: Vec<u8>,
}

impl StoredRow {
    const COLUMNS: &'static str = "id, version, active, created, notes, key";

    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, i64, i64, i64, String, Vec<u8>)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
    }

    fn checked((id, version, active, created, notes, sealed): (i64, i64, i64, i64, String, Vec<u8>)) -> Result<Self, ClientError> {
        Ok(Self { id: client_id(id)?, version, active: active != 0, created, notes, sealed })
    }

    /// Decrypt the key: the canonical form.
    fn open(&self, hsm: &dyn SecurityModule) -> Result<Canonical, ClientError> {
        let version = u64::try_from(self.version)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| ClientError::Database(format!("client {}: malformed version {}", self.id, self.version)))?;
        Ok(Canonical {
            id: self.id,
            version,
            active: self.active,
            created: self.created,
            notes: self.notes.clone(),
            key: open_key(hsm, self.id, &self.sealed)?,
        })
    }
}

impl ClientDb {
    /// Record that `peer` holds every outbox row up to `acked` (registering
    /// it if unknown; `None` only registers), compact what every known
    /// peer holds, and answer its cursor ([`Outbox`]). A pull that moves
    /// nothing takes no write lock (this table may share its file with the
    /// counter store's writer).
    pub fn ack_peer(&self, peer: &str, acked: Option<u64>) -> Result<PeerPosition, ClientError> {
        let mut conn = self.lock();
        if let Some(position) = OUTBOX.unchanged(&conn, peer, acked).map_err(db_err)? {
            return Ok(position);
        }
        OUTBOX.ack(&mut conn, peer, acked).map_err(db_err)
    }

    /// Register `peer` (cursor 0) if it is unknown: from now on changes are
    /// kept in the outbox until it acknowledges them.
    pub fn add_peer(&self, peer: &str) -> Result<(), ClientError> {
        self.ack_peer(peer, None).map(drop)
    }

    /// Forget `peer`: it no longer holds back compaction.
    pub fn remove_peer(&self, peer: &str) -> Result<(), ClientError> {
        OUTBOX.remove(&self.lock(), peer).map_err(db_err)
    }

    /// Every known peer and its acknowledged cursor, by name.
    pub fn peer_cursors(&self) -> Result<Vec<(String, u64)>, ClientError> {
        OUTBOX.cursors(&self.lock()).map_err(db_err)
    }

    /// Up to `limit` outbox rows after `after`: (seq, client id), in order.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, ClientId)>, ClientError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT seq, id FROM clients_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2").map_err(db_err)?;
        let rows = stmt.query_map(params![after, limit], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).map_err(db_err)?;
        rows.map(|r| {
            let (seq, id) = r.map_err(db_err)?;
            Ok((u64::try_from(seq).unwrap_or(0), client_id(id)?))
        })
        .collect()
    }

    /// The highest `seq` ever appended to the outbox (0 before the first).
    pub fn outbox_last_seq(&self) -> Result<u64, ClientError> {
        OUTBOX.head(&self.lock()).map_err(db_err)
    }

    /// The replication version of a client's row (1 at creation, one more
    /// for every local change; a merged row takes its origin's).
    pub fn row_version(&self, id: ClientId) -> Result<Option<u64>, ClientError> {
        let v: Option<i64> = self
            .lock()
            .query_row("SELECT version FROM clients WHERE id = ?1", params![sql_id(id)], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        Ok(v.map(|v| u64::try_from(v).unwrap_or(0)))
    }

    /// Stored rows, `id` alone or all of them.
    fn stored_rows(&self, id: Option<ClientId>) -> Result<Vec<StoredRow>, ClientError> {
        let conn = self.lock();
        let rows = match id {
            Some(id) => {
                let mut stmt = conn.prepare_cached(&format!("SELECT {} FROM clients WHERE id = ?1", StoredRow::COLUMNS)).map_err(db_err)?;
                let rows = stmt.query_map(params![sql_id(id)], StoredRow::from_sql).map_err(db_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_err)?
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!("SELECT {} FROM clients", StoredRow::COLUMNS)).map_err(db_err)?;
                let rows = stmt.query_map([], StoredRow::from_sql).map_err(db_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_err)?
            }
        };
        rows.into_iter().map(StoredRow::checked).collect()
    }
}

/// What the merge rule decided for one incoming client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Insert,
    Replace,
    Keep,
}

/// The API clients dataset ([`replication::sync::Dataset::CLIENTS`]):
/// [`ClientDb`] and the security module that opens and re-seals keys
/// (each site's keystore has its own config data key: ciphertexts never
/// travel).
///
/// **Items.** Key: the client id (u64 big-endian). Value, canonical:
/// format `1` ‖ version (u64 BE) ‖ disabled (0 or 1) ‖ created (i64 BE) ‖
/// notes length (u16 BE) ‖ notes ‖ the key in the clear. Values hold a
/// secret: they travel only over the mutually authenticated transport,
/// are built in zeroizing buffers, and [`Item`]'s `Debug` never prints
/// them.
///
/// **Digest.** Over the same bytes with SHA-256 of the key in place of
/// the key: equal at two sites holding the same clients, and no digest is
/// computed over a bare key.
///
/// **Rule.** The higher version wins; at equal versions with different
/// bytes, the greater canonical value wins (the same choice at every
/// site; a disable beats a concurrent enable or rotation). A winning row
/// is re-sealed under the local config key, in one transaction per page.
/// Every local change bumps the row's version ([`ClientDb::set_active`],
/// [`ClientDb::rotate`]; 1 at [`ClientDb::add`]). Two sites adding a
/// client with the *same id* while cut off both make version 1: one of
/// the two keys is lost everywhere, so give sites disjoint ids (`--id`)
/// or add clients at one site.
///
/// **Outbox.** SQLite triggers append the id of every inserted or updated
/// row to `clients_outbox` while a peer is registered, whoever writes (the
/// server, `validator client …` in another process, a merge). A merged
/// row therefore enters the puller's outbox as well; its origin pulls it
/// back and finds it unchanged, so nothing bounces further. A running
/// [`SqliteClients`] sees merged rows within its refresh interval (the
/// table's change counter moves).
pub struct ClientSync {
    db: ClientDb,
    hsm: Arc<dyn SecurityModule>,
}

impl fmt::Debug for ClientSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSync").field("db", &self.db).finish()
    }
}

fn sync_err(e: ClientError) -> SyncError {
    SyncError(e.to_string())
}

impl ClientSync {
    /// The dataset of the database at `path` (created if missing), with
    /// this site's module.
    pub fn open(path: &Path, hsm: Arc<dyn SecurityModule>) -> Result<Self, ClientError> {
        Ok(Self::new(ClientDb::open(path)?, hsm))
    }

    /// The dataset of an open table.
    #[must_use]
    pub fn new(db: ClientDb, hsm: Arc<dyn SecurityModule>) -> Self {
        Self { db, hsm }
    }

    /// The table underneath.
    #[must_use]
    pub fn db(&self) -> &ClientDb {
        &self.db
    }

    /// Every row that opens, canonical; one that does not (another
    /// keystore's key, a damaged row) is logged and left out: the peer's
    /// copy then repairs it.
    fn canonical_rows(&self, id: Option<ClientId>, bucket: Option<u8>) -> Result<Vec<Canonical>, SyncError> {
        let rows = self.db.stored_rows(id).map_err(sync_err)?;
        let mut out = Vec::with_capacity(rows.len());
        // Only the rows of the bucket asked for are decrypted.
        for row in rows.into_iter().filter(|r| bucket.is_none_or(|b| bucket_of(&r.id.get().to_be_bytes()) == b)) {
            match row.open(self.hsm.as_ref()) {
                Ok(c) => out.push(c),
                Err(e @ (ClientError::Undecryptable { .. } | ClientError::Database(_))) => {
                    tracing::error!(client = %row.id, error = %e, "API client not replicated: its row does not open");
                }
                Err(e) => return Err(sync_err(e)),
            }
        }
        Ok(out)
    }

    /// The rule for one incoming client against the stored row.
    fn verdict(&self, tx: &rusqlite::Transaction<'_>, incoming: &Canonical) -> Result<Verdict, ClientError> {
        let row = tx
            .query_row(
                &format!("SELECT {} FROM clients WHERE id = ?1", StoredRow::COLUMNS),
                params![sql_id(incoming.id)],
                StoredRow::from_sql,
            )
            .optional()
            .map_err(db_err)?;
        let Some(row) = row else { return Ok(Verdict::Insert) };
        let row = StoredRow::checked(row)?;
        let local_version = u64::try_from(row.version).unwrap_or(0);
        if incoming.version != local_version {
            return Ok(if incoming.version > local_version { Verdict::Replace } else { Verdict::Keep });
        }
        match row.open(self.hsm.as_ref()) {
            Ok(local) => Ok(if *incoming.value() > *local.value() { Verdict::Replace } else { Verdict::Keep }),
            Err(e @ (ClientError::Undecryptable { .. } | ClientError::Database(_))) => {
                tracing::warn!(client = %row.id, error = %e, "stored API client does not open; replaced by the peer's copy");
                Ok(Verdict::Replace)
            }
            Err(e) => Err(e),
        }
    }

    /// Apply decoded clients in one transaction.
    fn apply(&self, incoming: &[Canonical]) -> Result<Merged, ClientError> {
        let mut conn = self.db.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let mut merged = Merged::default();
        for c in incoming {
            let verdict = self.verdict(&tx, c)?;
            if verdict == Verdict::Keep {
                merged.unchanged += 1;
                continue;
            }
            let sealed = seal(self.hsm.as_ref(), c.id, &c.key)?;
            let version = i64::try_from(c.version).unwrap_or(i64::MAX);
            let sql = if verdict == Verdict::Insert {
                "INSERT INTO clients (id, active, created, key, notes, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            } else {
                "UPDATE clients SET active = ?2, created = ?3, key = ?4, notes = ?5, version = ?6 WHERE id = ?1"
            };
            tx.execute(sql, params![sql_id(c.id), i64::from(c.active), c.created, sealed, c.notes, version]).map_err(db_err)?;
            merged.applied += 1;
        }
        tx.commit().map_err(db_err)?;
        Ok(merged)
    }
}

impl SyncStore for ClientSync {
    fn changes(&self, peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError> {
        let position = self.db.ack_peer(peer, after).map_err(sync_err)?;
        // After what the puller says it holds (it may say less than it
        // acknowledged before: it lost state); without it, after its cursor.
        let from = after.map_or(position.cursor, |n| n.min(position.head));
        let rows = self.db.outbox_after(from, limit).map_err(sync_err)?;
        let last = rows.last().map_or(from, |r| r.0);
        let mut items = Vec::with_capacity(rows.len());
        // The current state of each changed client (a later change of the
        // same client carries the same state: harmless).
        for (_, id) in rows {
            for c in self.canonical_rows(Some(id), None)? {
                match c.item() {
                    Ok(item) => items.push(item),
                    Err(e) => tracing::error!(error = %e, "API client not replicated"),
                }
            }
        }
        Ok(Changes { items, last, head: position.head.max(last) })
    }

    fn digest(&self) -> Result<Digest, SyncError> {
        let mut digest = Digest::default();
        for c in self.canonical_rows(None, None)? {
            digest.add(&c.item_key(), &c.digest_value());
        }
        Ok(digest)
    }

    fn bucket(&self, bucket: u8) -> Result<Vec<Item>, SyncError> {
        let mut items = Vec::new();
        for c in self.canonical_rows(None, Some(bucket))? {
            match c.item() {
                Ok(item) => items.push(item),
                Err(e) => tracing::error!(error = %e, "API client not replicated"),
            }
        }
        Ok(items)
    }

    fn merge(&self, peer: &str, items: &[Item]) -> Result<Merged, SyncError> {
        let incoming = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                Canonical::decode(item).ok_or_else(|| SyncError(format!("API clients from {peer}: item {i} is malformed; nothing merged")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let merged = self.apply(&incoming).map_err(sync_err)?;
        if merged.applied > 0 {
            tracing::info!(peer, applied = merged.applied, "API clients merged from a peer");
        }
        Ok(merged)
    }
}

impl SqliteClients {
    /// The clients dataset of this server's database, with its module (a
    /// connection of its own; merged rows reach this cache within the
    /// refresh interval).
    pub fn sync_store(&self) -> Result<ClientSync, ClientError> {
        ClientSync::open(self.db.path(), self.hsm.clone())
    }
}
