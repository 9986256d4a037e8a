//! API clients: encrypted at rest, served from memory, changes by other
//! processes noticed, and the `validator client` command line.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Password, SecurityModule};
use validator::clients::{ClientDb, ClientError, SqliteClients, KEY_LEN};
use validator::counters::SqliteCounters;
use validator::{ClientId, ClientKey, ClientStore, CounterStore};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Fixture {
    dir: tempfile::TempDir,
    keystore: PathBuf,
    password_file: PathBuf,
    hsm: Arc<SoftHsm>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keystore = dir.path().join("v.ks");
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, "correct horse\n").unwrap();
        let hsm = Arc::new(SoftHsm::create(&keystore, &Password::new("correct horse").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap());
        Self { dir, keystore, password_file, hsm }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("validator.db")
    }

    fn module(&self) -> Arc<dyn SecurityModule> {
        self.hsm.clone()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_validator"));
        cmd.args(args).env_remove("OTP_KEYSTORE").env_remove("OTP_KEYSTORE_PASSWORD_FILE").env_remove("OTP_VALIDATOR_DB");
        cmd.output().unwrap()
    }

    /// `client …` with --db, and --keystore/--password-file when `keyed`.
    fn client_cli(&self, keyed: bool, args: &[&str]) -> Output {
        let db = self.db().display().to_string();
        let (ks, pw) = (self.keystore.display().to_string(), self.password_file.display().to_string());
        let mut all: Vec<&str> = vec!["client"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&["--db", &db]);
        if keyed {
            all.extend_from_slice(&["--keystore", &ks, "--password-file", &pw]);
        }
        all.extend_from_slice(&args[1..]);
        self.cli(&all)
    }
}

fn id(n: u64) -> ClientId {
    ClientId::new(n).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// `id=N` and `key=B64` from `client add`/`rotate`.
fn printed_key(o: &Output) -> (ClientId, Vec<u8>) {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    let out = stdout(o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let n = lines[0].strip_prefix("id=").unwrap().parse().unwrap();
    let key = B64.decode(lines[1].strip_prefix("key=").unwrap()).unwrap();
    (id(n), key)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every byte SQLite wrote for the database: the file, its WAL and shm.
fn db_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(PathBuf::from(p)) {
            all.extend(b);
        }
    }
    all
}

#[test]
fn add_list_disable_enable_rotate() {
    let f = Fixture::new();
    let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
    let (one, key1) = clients.add(None, None).unwrap();
    assert_eq!(one, id(1));
    assert_eq!(key1.expose().len(), KEY_LEN);
    let given = ClientKey::new((100u8..120).collect());
    let (seven, key7) = clients.add(Some(id(7)), Some(given.clone())).unwrap();
    assert_eq!((seven, key7.expose()), (id(7), given.expose()));
    let (eight, _) = clients.add(None, None).unwrap();
    assert_eq!(eight, id(8), "max + 1");
    assert!(matches!(clients.add(Some(id(7)), None), Err(ClientError::Exists(i)) if i == id(7)));
    assert!(matches!(clients.add(None, Some(ClientKey::new(vec![1; 8]))), Err(ClientError::InvalidKey(_))));

    let c1 = clients.client(one).unwrap().unwrap();
    assert!(c1.active);
    assert_eq!(c1.key.expose(), key1.expose());
    assert_eq!(clients.client(id(7)).unwrap().unwrap().key.expose(), given.expose());
    assert!(clients.client(id(2)).unwrap().is_none());
    assert_eq!(format!("{:?}", c1.key), "ClientKey(REDACTED)");

    clients.disable(seven).unwrap();
    let c7 = clients.client(seven).unwrap().unwrap();
    assert!(!c7.active, "a disabled client is returned, inactive");
    let listed = clients.list().unwrap();
    assert_eq!(listed.iter().map(|c| (c.id, c.active)).collect::<Vec<_>>(), [(one, true), (seven, false), (eight, true)]);
    assert!(listed.iter().all(|c| c.created > 1_600_000_000));
    clients.enable(seven).unwrap();
    assert!(clients.client(seven).unwrap().unwrap().active);

    let rotated = clients.rotate(one).unwrap();
    assert_eq!(rotated.expose().len(), KEY_LEN);
    assert_ne!(rotated.expose(), key1.expose());
    assert_eq!(clients.client(one).unwrap().unwrap().key.expose(), rotated.expose());
    assert!(matches!(clients.rotate(id(99)), Err(ClientError::NotFound(_))));
    assert!(matches!(clients.disable(id(99)), Err(ClientError::NotFound(_))));

    // Reopened: the same clients and keys.
    drop(clients);
    let again = SqliteClients::open(&f.db(), f.module()).unwrap();
    assert_eq!(again.client(one).unwrap().unwrap().key.expose(), rotated.expose());
    assert_eq!(again.list().unwrap().len(), 3);
}

#[test]
fn keys_are_never_stored_in_plaintext() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
    let mut keys = vec![clients.add(None, Some(ClientKey::new(b"a very recognisable!".to_vec()))).unwrap().1];
    for _ in 0..20 {
        keys.push(clients.add(None, None).unwrap().1);
    }
    keys.push(clients.rotate(id(3)).unwrap());
    // While open (pages in the WAL) and after closing (checkpointed).
    let mut clients = Some(clients);
    for round in 0..2 {
        let bytes = db_bytes(&f.db());
        assert!(bytes.len() > 4096);
        for key in &keys {
            assert!(!contains(&bytes, key.expose()), "round {round}: a key is in the database in plaintext");
            let b64 = B64.encode(key.expose());
            assert!(!contains(&bytes, b64.as_bytes()), "round {round}: a key is in the database in base64");
        }
        drop(clients.take());
    }
    assert_eq!(std::fs::metadata(f.db()).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn another_keystore_cannot_decrypt_and_rows_cannot_be_swapped() {
    let f = Fixture::new();
    {
        let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
        clients.add(None, None).unwrap();
        clients.add(None, None).unwrap();
    }
    let other_path = f.dir.path().join("other.ks");
    let other: Arc<dyn SecurityModule> =
        Arc::new(SoftHsm::create(&other_path, &Password::new("other").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap());
    let e = SqliteClients::open(&f.db(), other).unwrap_err();
    assert!(matches!(e, ClientError::Undecryptable { id: i, .. } if i == id(1)), "{e}");
    assert!(e.to_string().contains("1 more client"), "{e}");

    // Client 1's ciphertext copied onto client 2's row does not become
    // client 2's key: the id is bound into the ciphertext.
    let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
    let conn = rusqlite::Connection::open(f.db()).unwrap();
    conn.execute("UPDATE clients SET key = (SELECT key FROM clients WHERE id = 1) WHERE id = 2", []).unwrap();
    clients.reload().unwrap();
    assert!(clients.client(id(1)).unwrap().is_some());
    let e = clients.client(id(2)).unwrap_err();
    assert!(e.0.contains("another client id"), "{e}");
    assert!(SqliteClients::open(&f.db(), f.module()).is_err());
}

#[test]
fn counters_and_clients_share_one_database() {
    let f = Fixture::new();
    let counters = SqliteCounters::open(&f.db()).unwrap();
    let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
    let (cid, _) = clients.add(None, None).unwrap();
    let u = validator::CounterUpdate {
        public_id: otp::PublicId::from_number(5, 6).unwrap(),
        counters: otp::Counters::new(1, 1).unwrap(),
        timestamp_high: 0,
        timestamp_low: 0,
        nonce: "nonce-nonce-nonce".to_owned(),
        otp_digest: [0; 32],
        now: 1,
    };
    assert_eq!(counters.compare_and_set(&u).unwrap(), validator::CasOutcome::Accepted);
    assert!(clients.client(cid).unwrap().is_some());
    drop((counters, clients));
    let counters = SqliteCounters::open(&f.db()).unwrap();
    assert!(counters.get(&u.public_id).unwrap().is_some());
    assert_eq!(ClientDb::open_existing(&f.db()).unwrap().list().unwrap().len(), 1);
}

/// Wait until `f` is true; returns how long it took after `since`.
fn wait_until(since: Instant, limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    while since.elapsed() < limit {
        if f() {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn changes_by_another_process_are_seen_within_the_refresh_interval() {
    let f = Fixture::new();
    let refresh = Duration::from_millis(300);
    let clients = SqliteClients::open_with_refresh(&f.db(), f.module(), refresh).unwrap();
    let (one, _) = clients.add(None, None).unwrap();
    // Keep the server busy with requests meanwhile.
    assert!(clients.client(id(2)).unwrap().is_none());

    let out = f.client_cli(true, &["add", "--id", "2"]);
    let (two, key2) = printed_key(&out);
    let committed = Instant::now();
    assert_eq!(two, id(2));
    let seen =
        wait_until(committed, Duration::from_secs(5), || clients.client(two).unwrap().is_some()).expect("the new client never appeared");
    assert_eq!(clients.client(two).unwrap().unwrap().key.expose(), key2);

    let out = f.client_cli(false, &["disable", "--id", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = Instant::now();
    let disabled = wait_until(committed, Duration::from_secs(5), || !clients.client(one).unwrap().unwrap().active)
        .expect("the disable never appeared");

    let out = f.client_cli(true, &["rotate", "--id", "2"]);
    let (_, rotated) = printed_key(&out);
    let committed = Instant::now();
    let rotation =
        wait_until(committed, Duration::from_secs(5), || clients.client(two).unwrap().unwrap().key.expose() == rotated.as_slice())
            .expect("the rotation never appeared");
    println!("seen after: add {seen:?}, disable {disabled:?}, rotate {rotation:?} (refresh {refresh:?})");
    for d in [seen, disabled, rotation] {
        assert!(d <= refresh + Duration::from_millis(200), "{d:?} is beyond the documented delay");
    }
}

#[test]
fn command_line_round_trip() {
    let f = Fixture::new();
    let db = f.db();
    // `client list` on a missing database fails and creates nothing.
    let out = f.client_cli(false, &["list"]);
    assert!(!out.status.success());
    assert!(!db.exists());

    // A keystore made by this binary, as the quickstart does.
    let ks2 = f.dir.path().join("made.ks");
    let out = f.cli(&[
        "keystore",
        "init",
        "--keystore",
        ks2.to_str().unwrap(),
        "--password-file",
        f.password_file.to_str().unwrap(),
        "--kdf-memory-mib",
        "1",
        "--kdf-iterations",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ks2.exists());

    let (one, key1) = printed_key(&f.client_cli(true, &["add"]));
    assert_eq!((one, key1.len()), (id(1), KEY_LEN));
    // A yubikey-val key, kept as given.
    let val_key = "kZnHRvDD6K4SBHOl5qGUQi4YiV8=";
    let (seven, key7) = printed_key(&f.client_cli(true, &["add", "--id", "7", "--key", val_key, "--notes", "bastion-1"]));
    assert_eq!((seven, key7.as_slice()), (id(7), B64.decode(val_key).unwrap().as_slice()));
    let key_file = f.dir.path().join("key.b64");
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhM\n").unwrap();
    let (eight, key8) = printed_key(&f.client_cli(true, &["add", "--key-file", key_file.to_str().unwrap()]));
    assert_eq!((eight, key8), (id(8), (0u8..20).collect::<Vec<_>>()));

    for (args, why) in [
        (vec!["add", "--id", "7"], "exists"),
        (vec!["add", "--key", "c2hvcnQ="], "16 to 64"),
        (vec!["add", "--key", "not base64!"], "base64"),
        (vec!["add", "--id", "0"], "client id"),
        (vec!["add", "--id", "12345678901"], "client id"),
    ] {
        let out = f.client_cli(true, &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?}: nothing on stdout");
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
    }

    let out = f.client_cli(false, &["disable", "--id", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = f.client_cli(false, &["disable", "--id", "5"]);
    assert!(!out.status.success() && stderr(&out).contains("no client 5"), "{}", stderr(&out));

    let out = f.client_cli(false, &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 3, "{list}");
    assert_eq!((rows[0][0], rows[0][1]), ("1", "active"));
    assert_eq!((rows[1][0], rows[1][1], rows[1].get(3).copied()), ("7", "disabled", Some("bastion-1")));
    assert_eq!((rows[2][0], rows[2][1]), ("8", "active"));
    assert!(!list.contains(val_key), "list never shows keys");

    let (rotated_id, rotated) = printed_key(&f.client_cli(true, &["rotate", "--id", "1"]));
    assert_eq!(rotated_id, one);
    assert_ne!(rotated, key1);

    // The server's view agrees.
    let clients = SqliteClients::open(&db, f.module()).unwrap();
    assert_eq!(clients.client(one).unwrap().unwrap().key.expose(), rotated);
    assert!(!clients.client(seven).unwrap().unwrap().active);
    assert_eq!(clients.client(seven).unwrap().unwrap().key.expose(), key7);

    // The wrong password opens nothing and changes nothing.
    let bad_pw = f.dir.path().join("bad-pw");
    std::fs::write(&bad_pw, "wrong\n").unwrap();
    let out = f.cli(&[
        "client",
        "rotate",
        "--db",
        db.to_str().unwrap(),
        "--keystore",
        f.keystore.to_str().unwrap(),
        "--password-file",
        bad_pw.to_str().unwrap(),
        "--id",
        "1",
    ]);
    assert!(!out.status.success() && stdout(&out).is_empty());
    clients.reload().unwrap();
    assert_eq!(clients.client(one).unwrap().unwrap().key.expose(), rotated);
}

#[test]
fn a_database_without_row_versions_is_migrated() {
    let f = Fixture::new();
    let (one, key) = {
        let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
        clients.add(None, None).unwrap()
    };
    // Back to the previous schema: no version column, no outbox.
    {
        let conn = rusqlite::Connection::open(f.db()).unwrap();
        conn.execute_batch(
            "DROP TRIGGER clients_outbox_insert; DROP TRIGGER clients_outbox_update; DROP TABLE clients_outbox; \
             DROP TABLE clients_peer_cursors; ALTER TABLE clients DROP COLUMN version;",
        )
        .unwrap();
        let n: i64 = conn.query_row("SELECT count(*) FROM pragma_table_info('clients') WHERE name = 'version'", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }
    let clients = SqliteClients::open(&f.db(), f.module()).unwrap();
    assert_eq!(clients.db().row_version(one).unwrap(), Some(1));
    assert_eq!(clients.client(one).unwrap().unwrap().key.expose(), key.expose());
    clients.disable(one).unwrap();
    assert_eq!(clients.db().row_version(one).unwrap(), Some(2));
    // The outbox is written once a peer is registered.
    clients.db().add_peer("site-2").unwrap();
    clients.enable(one).unwrap();
    assert_eq!(clients.db().outbox_after(0, 10).unwrap(), [(1, one)]);
    assert_eq!(clients.db().row_version(one).unwrap(), Some(3));
}
