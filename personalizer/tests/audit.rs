//! The audit log against real SQLite files: a clean log verifies, and each
//! kind of tampering done with the `sqlite3` shell (as an attacker would)
//! is detected, with the first bad entry named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hsm::signing::SigningKey;
use personalizer::audit::{self, AuditEntry, AuditError, AuditLog, Checkpoint, Problem, UNSIGNED_FOUND_ACTION};
use personalizer::event::{AuditEvent, AuditSink};
use serde_json::json;

/// A password used elsewhere in the test, which must never reach the log.
const PASSWORD: &str = "Tr0ub4dor&3-never-in-the-audit-log";

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

fn other_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
    head: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let head = dir.path().join("audit.head");
        Self { _dir: dir, db, head }
    }

    fn open(&self) -> AuditLog {
        AuditLog::open(&self.db).unwrap()
    }

    fn verify(&self) -> audit::VerifyReport {
        audit::verify(&self.db, &self.head, &key().verifying_key())
    }

    /// Four commands, each ending with a checkpoint: 9 entries, 4
    /// checkpoints (#1 through 2, #2 through 4, #3 through 7, #4 through 9).
    fn populate(&self) {
        let mut log = self.open();
        // init + operator setup
        log.record(&AuditEvent::ok(None, "init", json!({ "hsm_id": "laptop-1" }))).unwrap();
        log.record(&AuditEvent::ok(None, "operator.add", json!({ "name": "alice", "role": "crypto-officer" }))).unwrap();
        log.checkpoint(key()).unwrap();
        // a refused and a successful login
        let mut log = self.open();
        log.record(&AuditEvent::refused(None, "login", "wrong password for operator alice")).unwrap();
        log.record(&AuditEvent::ok(Some("alice"), "login", json!({}))).unwrap();
        log.checkpoint(key()).unwrap();
        // a quorum-approved generate
        let mut log = self.open();
        log.record(&AuditEvent::ok(Some("bob"), "quorum.approve", json!({ "request": 1 }))).unwrap();
        log.record(&AuditEvent::ok(Some("carol"), "quorum.approve", json!({ "request": 1 }))).unwrap();
        let generate = AuditEvent::ok(
            Some("alice"),
            "generate",
            json!({ "count": 100_000, "first_public_id": "cccccccccccb", "last_public_id": "ccccccchbrnc", "key_handles": [1, 2] }),
        )
        .approved_by(vec!["bob".to_owned(), "carol".to_owned()]);
        log.record(&generate).unwrap();
        log.checkpoint(key()).unwrap();
        // export
        let mut log = self.open();
        log.record(&AuditEvent::ok(Some("alice"), "export", json!({ "count": 10, "format": "yubikey-csv" }))).unwrap();
        log.record(&AuditEvent::ok(Some("alice"), "logout", json!({}))).unwrap();
        log.checkpoint(key()).unwrap();
    }

    /// Run SQL with the `sqlite3` shell, dropping the append-only triggers
    /// first as an attacker would.
    fn tamper(&self, sql: &str) {
        let script = format!(
            "DROP TRIGGER IF EXISTS entries_no_update; DROP TRIGGER IF EXISTS entries_no_delete; \
             DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete; {sql}"
        );
        sqlite3(&self.db, &script);
    }
}

/// The `sqlite3` shell (scripts/test.sh installs it).
fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell is needed for these tests (apt-get install sqlite3; scripts/test.sh does)");
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn assert_fails(report: &audit::VerifyReport, first_bad: Option<u64>, what: &str) {
    assert!(!report.is_ok(), "{what} went unnoticed: {report}");
    assert_eq!(report.first_bad_seq(), first_bad, "{what}: {report}");
    let text = report.to_string();
    assert!(text.starts_with("audit log FAILED verification"), "{text}");
    if let Some(seq) = first_bad {
        assert!(text.contains(&format!("first bad entry is {seq}")), "{text}");
    }
}

#[test]
fn clean_log_verifies_ok_and_files_are_private() {
    let f = Fixture::new();
    f.populate();
    let report = f.verify();
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.entries, report.checkpoints, report.signed_through), (9, 4, 9));
    assert_eq!(report.head_number, Some(4));
    assert_eq!(report.first_bad_seq(), None);
    let text = report.to_string();
    assert!(text.starts_with("audit log OK: 9 entries, 4 checkpoints, signed through entry 9"), "{text}");
    assert!(text.contains(&key().verifying_key().fingerprint()), "{text}");
    for p in [&f.db, &f.head] {
        assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
    }
    // The entries read back as recorded, contiguous and chained.
    let entries = f.open().entries().unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    assert_eq!(entries[0].prev_hash, audit::genesis_hash());
    for pair in entries.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    let generate = &entries[6];
    assert_eq!(generate.action, "generate");
    assert_eq!(generate.operator.as_deref(), Some("alice"));
    assert_eq!(generate.approvers, ["bob", "carol"]);
    assert_eq!(entries[2].outcome, "refused");
    // Re-opening a consistent log adds nothing.
    let log = f.open();
    assert_eq!(log.unsigned_at_open(), None);
    assert_eq!(log.entries().unwrap().len(), 9);
    // An empty log with no head is fine too.
    let empty = Fixture::new();
    empty.open();
    let report = empty.verify();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.entries, 0);
}

#[test]
fn modified_entry_is_named() {
    let f = Fixture::new();
    f.populate();
    f.tamper(r#"UPDATE entries SET detail = '{"count":10,"first_public_id":"cccccccccccb"}' WHERE seq = 7;"#);
    let report = f.verify();
    assert_fails(&report, Some(7), "a modified entry");
    assert!(report.problems.contains(&Problem::EntryModified { seq: 7 }), "{report}");
    assert!(report.to_string().contains("entry 7 was modified"), "{report}");
    // The next command refuses to sign over it.
    let err = f.open().checkpoint(key()).unwrap_err();
    assert!(matches!(err, AuditError::Tampered(_)), "{err}");
    assert!(err.to_string().contains("entry 7"), "{err}");
}

#[test]
fn modified_entry_with_recomputed_hashes_is_caught_by_the_checkpoint() {
    // An attacker who knows the chain rule rewrites an entry and every
    // hash after it; only the signatures catch that.
    let f = Fixture::new();
    f.populate();
    let mut entries = f.open().entries().unwrap();
    entries[4].operator = Some("mallory".to_owned());
    let mut prev = entries[3].hash;
    let mut sql = String::new();
    for e in &mut entries[4..] {
        e.prev_hash = prev;
        e.hash = e.computed_hash();
        prev = e.hash;
        sql.push_str(&format!(
            "UPDATE entries SET operator = '{}', prev_hash = X'{}', hash = X'{}' WHERE seq = {};",
            e.operator.as_deref().unwrap_or(""),
            hex::encode(e.prev_hash),
            hex::encode(e.hash),
            e.seq
        ));
    }
    f.tamper(&sql);
    let report = f.verify();
    // Checkpoint #3 covers entries 5..=7.
    assert_fails(&report, Some(5), "a rewritten chain");
    assert!(matches!(report.problems[0], Problem::CheckpointMismatch { number: 3, first_seq: 5, last_seq: 7, .. }), "{report}");
}

#[test]
fn deleted_middle_entry_is_named() {
    let f = Fixture::new();
    f.populate();
    f.tamper("DELETE FROM entries WHERE seq = 3;");
    let report = f.verify();
    assert_fails(&report, Some(3), "a deleted entry");
    assert!(report.problems.contains(&Problem::EntryMissing { seq: 3, next: 4 }), "{report}");
    assert!(report.to_string().contains("entry 3 is missing"), "{report}");
}

#[test]
fn reordered_entries_are_named() {
    let f = Fixture::new();
    f.populate();
    // Swap entries 5 and 6 (each keeps its content and hashes).
    f.tamper(
        "UPDATE entries SET seq = -5 WHERE seq = 5; UPDATE entries SET seq = 5 WHERE seq = 6; UPDATE entries SET seq = 6 WHERE seq = -5;",
    );
    let actions = sqlite3(&f.db, "SELECT action || ':' || operator FROM entries WHERE seq IN (5, 6) ORDER BY seq;");
    assert_eq!(actions, "quorum.approve:carol\nquorum.approve:bob\n", "the swap happened");
    let report = f.verify();
    assert_fails(&report, Some(5), "reordered entries");
    assert!(report.problems.contains(&Problem::ChainBroken { seq: 5, follows: Some(6) }), "{report}");
    assert!(report.to_string().contains("reordered"), "{report}");
}

fn forge_append(f: &Fixture) -> AuditEntry {
    let entries = f.open().entries().unwrap();
    let last = entries.last().unwrap();
    let mut forged = AuditEntry {
        seq: last.seq + 1,
        time: last.time + 1,
        operator: Some("alice".to_owned()),
        action: "export".to_owned(),
        approvers: vec![],
        outcome: "ok".to_owned(),
        detail: r#"{"count":1}"#.to_owned(),
        prev_hash: last.hash,
        hash: [0; 32],
    };
    forged.hash = forged.computed_hash();
    // INSERT is not blocked by the triggers: no need to drop them.
    sqlite3(
        &f.db,
        &format!(
            "INSERT INTO entries (seq, time, operator, action, approvers, outcome, detail, prev_hash, hash) \
             VALUES ({}, {}, 'alice', 'export', '[]', 'ok', '{}', X'{}', X'{}');",
            forged.seq,
            forged.time,
            forged.detail,
            hex::encode(forged.prev_hash),
            hex::encode(forged.hash)
        ),
    );
    forged
}

#[test]
fn appended_entry_without_checkpoint_is_unsigned() {
    let f = Fixture::new();
    f.populate();
    let forged = forge_append(&f);
    assert_eq!(forged.seq, 10);
    let report = f.verify();
    assert_fails(&report, Some(10), "an appended, unsigned entry");
    assert_eq!(report.problems, [Problem::Unsigned { first: 10, last: 10 }], "{report}");
    let text = report.to_string();
    assert!(text.contains("entry 10 is not covered by a valid signed checkpoint"), "{text}");
    assert!(text.contains("cannot be told apart"), "{text}");

    // The next command's open says so in the log itself before signing.
    let mut log = f.open();
    assert_eq!(log.unsigned_at_open(), Some((10, 10)));
    let entries = log.entries().unwrap();
    let marker = entries.last().unwrap();
    assert_eq!((marker.seq, marker.action.as_str()), (11, UNSIGNED_FOUND_ACTION));
    let detail: serde_json::Value = serde_json::from_str(&marker.detail).unwrap();
    assert_eq!((detail["first_seq"].as_u64(), detail["last_seq"].as_u64()), (Some(10), Some(10)));
    log.checkpoint(key()).unwrap();
    let report = f.verify();
    assert!(report.is_ok(), "{report}");
    assert!(report.notes.iter().any(|n| n.contains("entry 11 records that entry 10 was found without a checkpoint")), "{report}");
}

#[test]
fn truncated_tail_is_detected() {
    let f = Fixture::new();
    f.populate();
    // Delete the last command: entries 8, 9 and checkpoint #4.
    f.tamper("DELETE FROM entries WHERE seq >= 8; DELETE FROM checkpoints WHERE number = 4;");
    let report = f.verify();
    assert_fails(&report, Some(8), "a truncated tail");
    assert!(
        report.problems.contains(&Problem::Truncated { head_number: 4, head_last_seq: 9, db_last_number: 3, db_last_seq: 7 }),
        "{report}"
    );
    assert!(report.to_string().contains("the database is behind the head file"), "{report}");
    // No command may extend it (which would overwrite the head).
    let err = AuditLog::open(&f.db).unwrap_err();
    assert!(matches!(err, AuditError::Tampered(_)), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    // Deleting only entries under a checkpoint that survives is caught
    // by the checkpoint itself.
    let g = Fixture::new();
    g.populate();
    g.tamper("DELETE FROM entries WHERE seq = 9;");
    let report = g.verify();
    // Entry 8 can no longer be checked against checkpoint #4 either.
    assert_fails(&report, Some(8), "a deleted last entry");
    assert_eq!(
        report.problems,
        [Problem::EntriesDeleted { number: 4, last_seq: 9, db_last_seq: 8 }, Problem::Unsigned { first: 8, last: 8 }],
        "{report}"
    );

    // A checkpoint row deleted from the middle.
    let g = Fixture::new();
    g.populate();
    g.tamper("DELETE FROM checkpoints WHERE number = 2;");
    let report = g.verify();
    assert_fails(&report, Some(3), "a deleted checkpoint");
    assert_eq!(report.problems, [Problem::CheckpointMissing { number: 2 }, Problem::Unsigned { first: 3, last: 9 }], "{report}");

    // A whole database replaced by a fresh one is behind the head as well.
    let h = Fixture::new();
    h.populate();
    std::fs::remove_file(&h.db).unwrap();
    let _ = std::fs::remove_file(h.db.with_extension("db-wal"));
    let _ = std::fs::remove_file(h.db.with_extension("db-shm"));
    assert!(matches!(AuditLog::open(&h.db), Err(AuditError::Tampered(_))));
    let report = h.verify();
    assert!(!report.is_ok());
    assert!(matches!(report.problems.as_slice(), [Problem::Truncated { head_number: 4, db_last_seq: 0, .. }]), "{report}");
    assert_eq!(report.first_bad_seq(), Some(1));
}

#[test]
fn forged_checkpoint_signature_is_detected() {
    // A checkpoint signed by another key, stored and put in the head file
    // as an attacker would (the library refuses to sign with a key that
    // does not verify the previous checkpoint).
    let f = Fixture::new();
    f.populate();
    let mut log = f.open();
    log.record(&AuditEvent::ok(Some("mallory"), "export", json!({ "count": 5 }))).unwrap();
    let err = log.checkpoint(other_key()).unwrap_err();
    assert!(err.to_string().contains("checkpoint #1 has a bad or forged signature"), "{err}");
    let previous = log.last_checkpoint().unwrap().unwrap();
    let last = log.entries().unwrap().pop().unwrap();
    let mut forged = Checkpoint {
        number: 5,
        last_seq: last.seq,
        head_hash: last.hash,
        count: last.seq,
        time: last.time,
        prev_signature_hash: previous.signature_hash(),
        key_fingerprint: key().verifying_key().fingerprint(),
        signature: Vec::new(),
    };
    forged.signature = other_key().sign(&forged.signed_bytes()).unwrap();
    sqlite3(
        &f.db,
        &format!(
            "INSERT INTO checkpoints (number, last_seq, head_hash, count, time, prev_signature_hash, key_fingerprint, signature) \
             VALUES (5, {}, X'{}', {}, {}, X'{}', '{}', X'{}');",
            forged.last_seq,
            hex::encode(forged.head_hash),
            forged.count,
            forged.time,
            hex::encode(forged.prev_signature_hash),
            forged.key_fingerprint,
            hex::encode(&forged.signature)
        ),
    );
    std::fs::write(&f.head, serde_json::to_vec(&forged.to_json()).unwrap()).unwrap();
    let report = f.verify();
    assert_fails(&report, Some(10), "a checkpoint signed by another key");
    assert!(
        report.problems.contains(&Problem::CheckpointBadSignature { number: 5, claimed_fingerprint: key().verifying_key().fingerprint() }),
        "{report}"
    );
    assert!(report.problems.contains(&Problem::Unsigned { first: 10, last: 10 }), "{report}");
    assert!(report.problems.iter().any(|p| matches!(p, Problem::HeadBadSignature { number: 5, .. })), "{report}");
    assert!(report.to_string().contains("checkpoint #5 has a bad or forged signature"), "{report}");
    // The same checkpoint signed with the right key passes: the test's
    // forgery differs only in the key.
    assert!(forged.verifies(&other_key().verifying_key()));
    assert!(!forged.verifies(&key().verifying_key()));
    // The real key will not sign on top of it.
    let err = f.open().checkpoint(key()).unwrap_err();
    assert!(err.to_string().contains("checkpoint #5 has a bad or forged signature"), "{err}");

    // A corrupted signature in the middle of the checkpoint chain.
    let g = Fixture::new();
    g.populate();
    let sig = sqlite3(&g.db, "SELECT hex(signature) FROM checkpoints WHERE number = 2;");
    let mut bytes = hex::decode(sig.trim()).unwrap();
    bytes[100] ^= 0x01;
    g.tamper(&format!("UPDATE checkpoints SET signature = X'{}' WHERE number = 2;", hex::encode(bytes)));
    let report = g.verify();
    assert_fails(&report, Some(3), "a corrupted checkpoint signature");
    assert!(matches!(report.problems[0], Problem::CheckpointBadSignature { number: 2, .. }), "{report}");
    assert_eq!(report.signed_through, 2);
}

#[test]
fn missing_or_corrupt_head_file_is_detected() {
    let f = Fixture::new();
    f.populate();
    std::fs::remove_file(&f.head).unwrap();
    let report = f.verify();
    assert_fails(&report, None, "a missing head file");
    assert_eq!(report.problems, [Problem::HeadMissing { path: f.head.clone() }], "{report}");
    assert!(report.to_string().contains("audit.head is missing"), "{report}");
    let err = AuditLog::open(&f.db).unwrap_err();
    assert!(err.to_string().contains("audit.head is missing"), "{err}");

    std::fs::write(&f.head, b"{ not json").unwrap();
    let report = f.verify();
    assert!(matches!(report.problems.as_slice(), [Problem::HeadUnreadable { .. }]), "{report}");
    assert!(report.to_string().contains("is corrupt"), "{report}");
    assert!(AuditLog::open(&f.db).is_err());
}

#[test]
fn triggers_refuse_update_and_delete() {
    let f = Fixture::new();
    f.populate();
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    for sql in [
        "UPDATE entries SET detail = '{}' WHERE seq = 1",
        "DELETE FROM entries WHERE seq = 9",
        "UPDATE checkpoints SET time = 0 WHERE number = 1",
        "DELETE FROM checkpoints",
    ] {
        let err = conn.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    drop(conn);
    // The shell is refused the same way.
    let out = Command::new("sqlite3").arg(&f.db).arg("DELETE FROM entries WHERE seq = 9;").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("append-only"), "{out:?}");
    assert!(f.verify().is_ok());
    // Dropped triggers come back on the next open.
    sqlite3(&f.db, "DROP TRIGGER entries_no_delete;");
    f.open();
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    assert!(conn.execute("DELETE FROM entries WHERE seq = 9", []).is_err());
}

#[test]
fn export_writes_json_lines_matching_the_entries() {
    let f = Fixture::new();
    f.populate();
    let mut out = Vec::new();
    let summary = audit::export(&f.db, &mut out).unwrap();
    assert_eq!((summary.entries, summary.checkpoints), (9, 4));
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 13);
    let entries = f.open().entries().unwrap();
    let exported: Vec<_> = lines.iter().filter(|l| l["type"] == "entry").collect();
    assert_eq!(exported.len(), entries.len());
    for (line, e) in exported.iter().zip(&entries) {
        assert_eq!(line["seq"], e.seq);
        assert_eq!(line["time"], e.time);
        assert_eq!(line["time_utc"], audit::rfc3339(e.time));
        assert_eq!(line["operator"].as_str(), e.operator.as_deref());
        assert_eq!(line["action"], e.action.as_str());
        assert_eq!(line["approvers"], json!(e.approvers));
        assert_eq!(line["outcome"], e.outcome.as_str());
        assert_eq!(line["detail"], serde_json::from_str::<serde_json::Value>(&e.detail).unwrap());
        assert_eq!(line["prev_hash"], hex::encode(e.prev_hash));
        assert_eq!(line["hash"], hex::encode(e.hash));
    }
    assert_eq!(exported[6]["detail"]["count"], 100_000);
    assert!(exported[6]["time_utc"].as_str().unwrap().ends_with('Z'));
    // Checkpoints follow the entry they end on: #1 after entry 2, ….
    let order: Vec<String> = lines
        .iter()
        .map(|l| match l["type"].as_str().unwrap() {
            "entry" => format!("e{}", l["seq"]),
            "checkpoint" => format!("c{}", l["number"]),
            other => panic!("unexpected type {other}"),
        })
        .collect();
    assert_eq!(order, ["e1", "e2", "c1", "e3", "e4", "c2", "e5", "e6", "e7", "c3", "e8", "e9", "c4"]);
    let last = lines.last().unwrap();
    assert_eq!(last["last_seq"], 9);
    assert_eq!(last["head_hash"], hex::encode(entries[8].hash));
    // The head file holds the same record as the last export line.
    let head: serde_json::Value = serde_json::from_slice(&std::fs::read(&f.head).unwrap()).unwrap();
    assert_eq!(&head, last);
}

#[test]
fn no_secret_reaches_the_log() {
    let f = Fixture::new();
    // The password is used for something else in the test (here: a
    // password-protected soft module would take it); the commands only
    // log who did what.
    let hashed = hsm::password::Password::new(PASSWORD).unwrap();
    assert_eq!(hashed.expose(), PASSWORD.as_bytes());
    let mut log = f.open();
    log.record(&AuditEvent::ok(Some("alice"), "login", json!({ "method": "password+signature" }))).unwrap();
    log.record(&AuditEvent::ok(
        Some("alice"),
        "generate",
        json!({ "count": 3, "first_public_id": "cccccccccccb", "last_public_id": "cccccccccccd" }),
    ))
    .unwrap();
    log.checkpoint(key()).unwrap();
    drop(hashed);
    let mut bytes = std::fs::read(&f.db).unwrap();
    if let Ok(wal) = std::fs::read(f.db.with_extension("db-wal")) {
        bytes.extend(wal);
    }
    bytes.extend(std::fs::read(&f.head).unwrap());
    let mut export = Vec::new();
    audit::export(&f.db, &mut export).unwrap();
    bytes.extend(&export);
    assert!(!bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes()), "the password is in the audit files");
    // …but what was recorded is (so the search above could find text).
    assert!(bytes.windows(12).any(|w| w == b"cccccccccccd"));
}

#[test]
fn corrupt_database_gives_a_clear_error() {
    let f = Fixture::new();
    std::fs::write(&f.db, vec![0x5a; 8192]).unwrap();
    let err = AuditLog::open(&f.db).unwrap_err().to_string();
    assert!(err.contains("audit.db") && err.contains("not"), "{err}");
    let report = f.verify();
    assert!(matches!(report.problems.as_slice(), [Problem::Database(_)]), "{report}");
    assert!(audit::export(&f.db, &mut Vec::new()).is_err());
    // A missing database is not created by verify or export.
    let g = Fixture::new();
    assert!(!g.verify().is_ok());
    assert!(audit::export(&g.db, &mut Vec::new()).is_err());
    assert!(!g.db.exists());
    // A row with the wrong type is reported, not a panic.
    let h = Fixture::new();
    h.populate();
    h.tamper("UPDATE entries SET prev_hash = 'short' WHERE seq = 4;");
    let report = h.verify();
    assert_fails(&report, Some(4), "an unreadable row");
    assert!(matches!(report.problems[0], Problem::EntryUnreadable { seq: 4, .. }), "{report}");
    // Out-of-range sequence numbers are reported, not a panic.
    for (seq, first_bad) in [(0, 0), (-5, 1)] {
        let g = Fixture::new();
        g.populate();
        g.tamper(&format!(
            "INSERT INTO entries (seq, time, operator, action, approvers, outcome, detail, prev_hash, hash) \
             SELECT {seq}, time, operator, action, approvers, outcome, detail, prev_hash, hash FROM entries WHERE seq = 1;"
        ));
        let report = g.verify();
        assert_fails(&report, Some(first_bad), "an out-of-range seq");
        assert!(matches!(report.problems[0], Problem::EntryUnreadable { .. }), "{report}");
        let err = g.open().checkpoint(key()).unwrap_err();
        assert!(matches!(err, AuditError::Tampered(_)), "{err}");
    }
    // Deleting the first entry.
    let g = Fixture::new();
    g.populate();
    g.tamper("DELETE FROM entries WHERE seq = 1;");
    let report = g.verify();
    assert_fails(&report, Some(1), "a deleted first entry");
    assert!(report.to_string().contains("entry 1 is missing (deleted): the log starts at entry 2"), "{report}");
}

#[test]
fn database_one_checkpoint_ahead_of_the_head_file_is_accepted() {
    // A command that stopped after storing its checkpoint but before
    // replacing the head file leaves the head one checkpoint behind.
    let f = Fixture::new();
    f.populate();
    let old_head = std::fs::read(&f.head).unwrap();
    let mut log = f.open();
    log.record(&AuditEvent::ok(Some("alice"), "status", json!({}))).unwrap();
    log.checkpoint(key()).unwrap();
    std::fs::write(&f.head, &old_head).unwrap();
    let report = f.verify();
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.signed_through, report.head_number), (10, Some(4)));
    assert!(report.to_string().contains("newer than the head file's #4"), "{report}");
    // The next command carries on and brings the head file up to date.
    let mut log = f.open();
    assert_eq!(log.unsigned_at_open(), None);
    assert_eq!(log.checkpoint(key()).unwrap().number, 6);
    let report = f.verify();
    assert!(report.is_ok() && report.notes.is_empty(), "{report}");
    assert_eq!(report.head_number, Some(6));
    // The -wal and -shm files SQLite made are as private as the database.
    for suffix in ["db-wal", "db-shm"] {
        if let Ok(meta) = std::fs::metadata(f.db.with_extension(suffix)) {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{suffix}");
        }
    }
}

#[test]
fn two_handles_append_to_one_chain() {
    let f = Fixture::new();
    let mut a = f.open();
    let mut b = f.open();
    for i in 0..5 {
        let sink: &mut dyn AuditSink = if i % 2 == 0 { &mut a } else { &mut b };
        sink.record(&AuditEvent::ok(Some("alice"), "status", json!({ "i": i }))).unwrap();
    }
    let cp = b.checkpoint(key()).unwrap();
    assert_eq!((cp.number, cp.last_seq, cp.count), (1, 5, 5));
    let cp = a.checkpoint(key()).unwrap();
    assert_eq!((cp.number, cp.last_seq), (2, 5), "a checkpoint with nothing new is still taken");
    let report = f.verify();
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.entries, report.checkpoints), (5, 2));
}
