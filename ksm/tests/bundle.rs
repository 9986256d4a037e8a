//! Signed transfer bundles: writing, verifying, refusing altered, truncated
//! and foreign bundles, importing them (library and `ksm import --bundle`).
//! Real files, real SQLite stores, real RSA keys, the real `ksm` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use hsm::signing::{SigningKey, VerifyingKey};
use indicatif::ProgressBar;
use ksm::bundle::{import_bundle, read_verified, verify, BundleError, BundleWriter, Manifest, CHUNK_ENTRIES, SIGNATURE_DOMAIN};
use ksm::import::{IssueKind, Location};
use ksm::store::AeadStore;
use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};

const KH1: KeyHandle = KeyHandle::new(0x2000);
const KH2: KeyHandle = KeyHandle::new(0x2001);
const NOW: i64 = 1_700_000_000;

/// The personalizer's key (made once: RSA generation is the slow part).
fn signer() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

/// Another key, trusted by nobody.
fn stranger() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

fn trust() -> VerifyingKey {
    signer().verifying_key()
}

fn id(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

/// The AEADs of YubiKey `n`: one per handle, distinct bytes (30 for the
/// first handle, 9 to 72 for the second, so every size is exercised).
fn records(n: u64) -> [AeadRecord; 2] {
    let mut a = [0x5a; 30];
    a[..8].copy_from_slice(&n.to_le_bytes());
    let len = 9 + (n % 64) as usize;
    let mut b = vec![0xc3; len];
    b[..8].copy_from_slice(&n.to_be_bytes());
    [
        AeadRecord { key_handle: KH1, nonce: id(n).aead_nonce().unwrap(), aead: Aead::from_slice(&a).unwrap() },
        AeadRecord { key_handle: KH2, nonce: AeadNonce::new([n as u8, 1, 2, 3, 4, 5]), aead: Aead::from_slice(&b).unwrap() },
    ]
}

/// A bundle of YubiKeys `1..=n` signed by `key`.
fn write_bundle(path: &Path, n: u64, key: &SigningKey) -> Manifest {
    let mut w = BundleWriter::create(path, &[KH1, KH2], "personalizer test batch").unwrap();
    for i in 1..=n {
        w.add(&id(i), &records(i)).unwrap();
    }
    w.finish(key).unwrap()
}

fn hidden() -> ProgressBar {
    ProgressBar::hidden()
}

fn store_at(dir: &Path) -> AeadStore {
    AeadStore::open(&dir.join("aeads.db")).unwrap()
}

/// The line (1-based) of `path` starting with `prefix`, and its byte offset.
fn find_line(bytes: &[u8], prefix: &str) -> (usize, usize) {
    let mut offset = 0;
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if line.starts_with(prefix.as_bytes()) {
            return (i + 1, offset);
        }
        offset += line.len();
    }
    panic!("no line starts with {prefix:?}");
}

/// Replace the byte at `at` with `to` (which must differ).
fn with_byte(bytes: &[u8], at: usize, to: u8) -> Vec<u8> {
    assert_ne!(bytes[at], to);
    let mut out = bytes.to_vec();
    out[at] = to;
    out
}

#[test]
fn round_trip_write_verify_import() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batch.bundle");
    // More than two chunks, and not a multiple of the chunk size.
    let n = 2 * CHUNK_ENTRIES + 300;
    let written = write_bundle(&path, n, signer());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["batch.bundle"]);

    assert_eq!(written.count, n);
    assert_eq!(written.key_handles, [KH1, KH2]);
    assert_eq!((written.first_public_id, written.last_public_id), (id(1), id(n)));
    assert_eq!(written.signer, trust().fingerprint());
    assert_eq!(written.origin, "personalizer test batch");
    assert!(written.created > NOW, "{}", written.created);
    assert_eq!(verify(&path, &trust()).unwrap(), written);

    // The text is what the module docs say.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, n + 3);
    assert_eq!(lines[0], "ksm-aead-bundle 1 00002000 00002001");
    let [r1, r2] = records(1);
    assert_eq!(
        lines[1],
        format!(
            "{} 00002000:{}:{} 00002001:{}:{}",
            id(1),
            hex::encode(r1.nonce.as_bytes()),
            hex::encode(r1.aead.as_bytes()),
            hex::encode(r2.nonce.as_bytes()),
            hex::encode(r2.aead.as_bytes())
        )
    );
    let manifest_json = lines[n as usize + 1].strip_prefix("manifest ").unwrap();
    let json: serde_json::Value = serde_json::from_str(manifest_json).unwrap();
    assert_eq!(json["count"], n);
    assert_eq!(json["key_handles"], serde_json::json!(["0x2000", "0x2001"]));
    assert_eq!(json["body_sha256"], hex::encode(written.body_sha256));
    // The signature is plain RSA/SHA-256 over the domain and the JSON line.
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::STANDARD.decode(lines[n as usize + 2].strip_prefix("signature ").unwrap()).unwrap();
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(manifest_json.as_bytes());
    trust().verify(&message, &sig).unwrap();
    assert!(trust().verify(manifest_json.as_bytes(), &sig).is_err(), "the domain is part of the signed message");

    // read_verified hands out every entry, in order.
    let mut seen = 0u64;
    read_verified(&path, &trust(), |public_id, recs| {
        seen += 1;
        assert_eq!(*public_id, id(seen));
        assert_eq!(recs, records(seen));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);

    // Import: every AEAD in the store, byte for byte.
    let store = store_at(dir.path());
    let imported = import_bundle(&store, &path, &trust(), NOW, &hidden()).unwrap();
    assert_eq!(imported.manifest, written);
    let r = &imported.report;
    assert_eq!((r.added, r.already_present, r.conflicts, r.errors), (2 * n, 0, 0, 0));
    assert_eq!(store.count().unwrap(), 2 * n);
    for i in 1..=n {
        let [a, b] = records(i);
        assert_eq!(store.get(&id(i), KH1).unwrap(), Some(a), "{i}");
        assert_eq!(store.get(&id(i), KH2).unwrap(), Some(b), "{i}");
    }
    // Idempotent.
    let again = import_bundle(&store, &path, &trust(), NOW + 1, &hidden()).unwrap().report;
    assert_eq!((again.added, again.already_present, again.conflicts, again.errors), (0, 2 * n, 0, 0));
}

#[test]
fn conflicts_are_quarantined_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    write_bundle(&path, 5, signer());
    let store = store_at(dir.path());
    let mut other = records(3)[1];
    other.aead = Aead::from_slice(&[0xee; 30]).unwrap();
    store.put(&id(3), &other, "earlier", NOW - 10).unwrap();
    let report = import_bundle(&store, &path, &trust(), NOW, &hidden()).unwrap().report;
    assert_eq!((report.added, report.already_present, report.conflicts, report.errors), (9, 0, 1, 0));
    assert_eq!(report.issues.len(), 1);
    assert_eq!(report.issues[0].kind, IssueKind::Conflict);
    // Entry 3 is line 4 (line 1 is the header).
    assert_eq!(report.issues[0].location, Location::Line(4));
    assert_eq!(store.get(&id(3), KH2).unwrap(), Some(other), "what was stored is kept");
    let conflicts = store.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].refused, records(3)[1]);
    assert!(
        conflicts[0].origin.starts_with("bundle:") && conflicts[0].origin.contains("personalizer test batch"),
        "{}",
        conflicts[0].origin
    );
}

/// Import `bytes` as a bundle into a store that already holds one AEAD;
/// the error, after checking that nothing was imported.
fn refused(bytes: &[u8]) -> BundleError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bundle");
    std::fs::write(&path, bytes).unwrap();
    let store = store_at(dir.path());
    store.put(&id(999), &records(999)[0], "earlier", NOW).unwrap();
    let verified = verify(&path, &trust());
    let mut calls = 0;
    let read = read_verified(&path, &trust(), |_, _| {
        calls += 1;
        Ok(())
    });
    let err = import_bundle(&store, &path, &trust(), NOW, &hidden()).unwrap_err();
    assert!(verified.is_err() && read.is_err());
    assert_eq!(calls, 0, "no entry is handed out");
    assert_eq!(store.count().unwrap(), 1, "nothing imported: {err}");
    assert_eq!(store.conflict_count().unwrap(), 0);
    err
}

fn good_bundle(n: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.bundle");
    write_bundle(&path, n, signer());
    std::fs::read(path).unwrap()
}

#[test]
fn altered_bundles_are_refused() {
    let good = good_bundle(40);
    // A hex digit of an AEAD in the body, still well formed: a hash mismatch.
    let (_, at) = find_line(&good, &id(20).to_string());
    let aead_digit = at + 12 + 1 + 8 + 1 + 12 + 1 + 4;
    let to = if good[aead_digit] == b'0' { b'1' } else { b'0' };
    let err = refused(&with_byte(&good, aead_digit, to));
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("altered"), "{err}");
    // The same byte made malformed: still reported as an alteration.
    let err = refused(&with_byte(&good, aead_digit, b'z'));
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");
    // The header's key handle.
    let err = refused(&with_byte(&good, "ksm-aead-bundle 1 0000200".len(), b'2'));
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");
    // A line removed from the body.
    let (_, start) = find_line(&good, &id(7).to_string());
    let (_, end) = find_line(&good, &id(8).to_string());
    let mut dropped = good[..start].to_vec();
    dropped.extend_from_slice(&good[end..]);
    assert!(matches!(refused(&dropped), BundleError::HashMismatch { .. }));

    // A byte of the manifest (its origin): the signature fails.
    let (_, manifest) = find_line(&good, "manifest ");
    let origin = manifest + find_sub(&good[manifest..], b"test batch");
    let err = refused(&with_byte(&good, origin, b'T'));
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("signature does not verify") && err.to_string().contains(&trust().fingerprint()), "{err}");
    // The manifest's count.
    let count = manifest + find_sub(&good[manifest..], b"\"count\":40");
    let err = refused(&with_byte(&good, count + "\"count\":".len(), b'5'));
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");

    // A base64 character of the signature.
    let (sig_line, sig) = find_line(&good, "signature ");
    let b64 = sig + "signature ".len() + 100;
    let to = if good[b64] == b'A' { b'B' } else { b'A' };
    assert!(matches!(refused(&with_byte(&good, b64, to)), BundleError::BadSignature { .. }));
    // Not base64 at all.
    match refused(&with_byte(&good, b64, b'*')) {
        BundleError::Malformed { line, what } => assert_eq!((line, what.contains("base64")), (sig_line as u64, true)),
        other => panic!("{other}"),
    }
    // Something after the signature.
    let mut extra = good.clone();
    extra.extend_from_slice(b"x");
    assert!(matches!(refused(&extra), BundleError::Malformed { line, .. } if line == sig_line as u64 + 1));
    // Not a bundle.
    let err = refused(b"# ykksm 1\n1,cccccccccccb,010203040506,000102030405060708090a0b0c0d0e0f\n");
    assert!(matches!(err, BundleError::Malformed { line: 1, .. }) && err.to_string().contains("not a transfer bundle"), "{err}");
    let err = refused(&good.replacen_first(b"ksm-aead-bundle 1", b"ksm-aead-bundle 2"));
    assert!(err.to_string().contains("version \"2\" is not supported"), "{err}");
}

fn find_sub(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).unwrap()
}

trait ReplaceFirst {
    fn replacen_first(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
}

impl ReplaceFirst for Vec<u8> {
    fn replacen_first(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = find_sub(self, from);
        let mut out = self[..at].to_vec();
        out.extend_from_slice(to);
        out.extend_from_slice(&self[at + from.len()..]);
        out
    }
}

#[test]
fn truncated_bundles_are_refused() {
    let good = good_bundle(30);
    let truncated = |bytes: &[u8]| match refused(bytes) {
        BundleError::Truncated(what) => what,
        other => panic!("expected truncated, got: {other}"),
    };
    assert!(truncated(b"").contains("empty"));
    assert!(truncated(&good[..10]).contains("inside line 1"));
    // Cut in the middle of an entry.
    let (line, at) = find_line(&good, &id(12).to_string());
    assert!(truncated(&good[..at + 40]).contains(&format!("inside line {line}")));
    // Cut between two entries: no manifest.
    assert!(truncated(&good[..at]).contains("without a manifest"));
    // Cut before the signature, and inside it.
    let (_, sig) = find_line(&good, "signature ");
    assert!(truncated(&good[..sig]).contains("without a signature"));
    assert!(truncated(&good[..good.len() - 1]).contains("inside the signature"));
    assert!(truncated(&good[..sig + 50]).contains("inside the signature"));
    // Cut inside the manifest.
    let (_, manifest) = find_line(&good, "manifest ");
    assert!(truncated(&good[..manifest + 30]).contains("inside line"));
    let err = BundleError::Truncated("x".to_owned()).to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn a_bundle_signed_by_another_key_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.bundle");
    write_bundle(&path, 3, stranger());
    // It verifies with its own key …
    verify(&path, &stranger().verifying_key()).unwrap();
    // … not with the trusted one.
    let err = refused(&std::fs::read(&path).unwrap());
    match &err {
        BundleError::WrongSigner { expected, found } => {
            assert_eq!(expected, &trust().fingerprint());
            assert_eq!(found, &stranger().verifying_key().fingerprint());
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&trust().fingerprint()) && msg.contains(&stranger().verifying_key().fingerprint()), "{msg}");
    assert!(msg.contains("signature"), "{msg}");

    // A stranger's bundle whose manifest claims the trusted fingerprint: the
    // signature still decides.
    let bytes = std::fs::read(&path).unwrap();
    let forged = bytes.replacen_first(stranger().verifying_key().fingerprint().as_bytes(), trust().fingerprint().as_bytes());
    assert!(matches!(refused(&forged), BundleError::BadSignature { .. }));
}

#[test]
fn a_bundle_changed_between_the_passes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    let n = 5 * CHUNK_ENTRIES;
    write_bundle(&path, n, signer());
    let good = std::fs::read(&path).unwrap();
    // Entry 4000 altered in place (same length) while the first entries are
    // handed out: it is in the fourth chunk.
    let (_, at) = find_line(&good, &id(4000).to_string());
    let digit = at + 12 + 1 + 8 + 1 + 12 + 1 + 20;
    let altered = with_byte(&good, digit, if good[digit] == b'0' { b'1' } else { b'0' });
    let mut seen = 0u64;
    let err = read_verified(&path, &trust(), |public_id, _| {
        seen += 1;
        assert!(public_id.to_number() < 4000, "the altered entry is never handed out");
        if seen == 1 {
            // Rewritten in place: the same file, as the second pass sees it.
            std::fs::write(&path, &altered).unwrap();
        }
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(err, BundleError::Changed(_)), "{err}");
    assert!(err.to_string().contains(&format!("lines {} to {}", 3 * CHUNK_ENTRIES + 2, 4 * CHUNK_ENTRIES + 1)), "{err}");
    // Only whole verified chunks before it were handed out.
    assert_eq!(seen, 3 * CHUNK_ENTRIES);

    // Shortened in place: refused too.
    std::fs::write(&path, &good).unwrap();
    let (_, cut) = find_line(&good, &id(2000).to_string());
    let mut seen = 0u64;
    let err = read_verified(&path, &trust(), |_, _| {
        seen += 1;
        if seen == 1 {
            std::fs::write(&path, &good[..cut]).unwrap();
        }
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(err, BundleError::Changed(_)), "{err}");
    assert_eq!(seen, CHUNK_ENTRIES);

    // Replaced by another file under the same name: the open file is read,
    // so exactly the verified bundle is handed out.
    std::fs::write(&path, &good).unwrap();
    let replacement = dir.path().join("other.bundle");
    let mut seen = 0u64;
    read_verified(&path, &trust(), |public_id, recs| {
        seen += 1;
        if seen == 1 {
            std::fs::write(&replacement, &altered).unwrap();
            std::fs::rename(&replacement, &path).unwrap();
        }
        assert_eq!(recs, records(public_id.to_number()));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);
}

#[test]
fn the_writer_never_leaves_a_partial_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    let mut w = BundleWriter::create(&path, &[KH1], "x").unwrap();
    w.add(&id(1), &records(1)[..1]).unwrap();
    assert!(!path.exists(), "nothing under the final name before finish");
    // Something took the name meanwhile: finish refuses, keeps it, cleans up.
    std::fs::write(&path, b"someone else's").unwrap();
    assert!(matches!(w.finish(signer()), Err(BundleError::Exists(p)) if p == path));
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // An empty bundle is not signed.
    let empty = BundleWriter::create(&dir.path().join("empty.bundle"), &[KH1], "x").unwrap();
    assert!(matches!(empty.finish(signer()), Err(BundleError::Invalid(_))));
    assert!(!dir.path().join("empty.bundle").exists());
    // An AEAD of a key handle the bundle does not list.
    let mut w = BundleWriter::create(&dir.path().join("c.bundle"), &[KH1], "x").unwrap();
    let err = w.add(&id(1), &records(1)[1..]).unwrap_err().to_string();
    assert!(err.contains("key handle 0x2001") && err.contains("0x2000"), "{err}");
}

// ------------------------------------------------------------------ CLI

fn ksm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ksm")).args(args).env_remove("OTP_KEYSTORE").env_remove("RUST_LOG").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pem_file(dir: &Path, name: &str, key: &SigningKey) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, key.verifying_key().to_pem().unwrap()).unwrap();
    path
}

#[test]
fn cli_imports_a_verified_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("batch.bundle");
    let written = write_bundle(&bundle, 25, signer());
    let trusted = pem_file(dir.path(), "personalizer.pem", signer());
    let db = dir.path().join("aeads.db");
    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&trusted), "--store", s(&db)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "added 50, already present 0, conflicts 0, errors 0\n");
    for expected in [
        "verified bundle".to_owned(),
        "25 YubiKeys".to_owned(),
        "key handles 0x2000,0x2001".to_owned(),
        format!("public ids {} to {}", id(1), id(25)),
        format!("signed by {}", written.signer),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} in {stderr}");
    }
    let store = AeadStore::open_existing(&db).unwrap();
    assert_eq!(store.count().unwrap(), 50);
    assert_eq!(store.get(&id(25), KH2).unwrap(), Some(records(25)[1]));
    drop(store);
    let again = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&trusted), "--store", s(&db)]);
    assert!(again.status.success());
    assert_eq!(text(&again.stdout), "added 0, already present 50, conflicts 0, errors 0\n");
}

#[test]
fn cli_refuses_a_tampered_or_foreign_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("batch.bundle");
    write_bundle(&bundle, 10, signer());
    let trusted = pem_file(dir.path(), "personalizer.pem", signer());
    let db = dir.path().join("aeads.db");
    let good = std::fs::read(&bundle).unwrap();
    let (_, manifest) = find_line(&good, "manifest ");
    let origin = manifest + find_sub(&good[manifest..], b"test batch");
    std::fs::write(&bundle, with_byte(&good, origin, b'T')).unwrap();

    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&trusted), "--store", s(&db)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("signature does not verify") && stderr.contains("nothing was imported"), "{stderr}");
    assert!(!db.exists(), "verified before the store is created");

    // Trusting another key: both fingerprints are named.
    std::fs::write(&bundle, &good).unwrap();
    let other = pem_file(dir.path(), "other.pem", stranger());
    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&other), "--store", s(&db)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&trust().fingerprint()) && stderr.contains(&stranger().verifying_key().fingerprint()), "{stderr}");
    assert!(!db.exists(), "verified before the store is created");

    // --bundle needs --trust; a missing or unreadable key is an error.
    let out = ksm(&["import", "--bundle", s(&bundle), "--store", s(&db)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--trust"), "{}", text(&out.stderr));
    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&dir.path().join("none.pem")), "--store", s(&db)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("trusted key"), "{}", text(&out.stderr));
    // An existing store is left as it was.
    let store = AeadStore::open(&db).unwrap();
    store.put(&id(999), &records(999)[0], "earlier", NOW).unwrap();
    drop(store);
    std::fs::write(&bundle, with_byte(&good, origin, b'T')).unwrap();
    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&trusted), "--store", s(&db)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(AeadStore::open_existing(&db).unwrap().count().unwrap(), 1);
    // Only one source at a time.
    let out = ksm(&["import", "--bundle", s(&bundle), "--trust", s(&trusted), "--aead-dir", s(dir.path()), "--store", s(&db)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
    assert_eq!(AeadStore::open_existing(&db).unwrap().count().unwrap(), 1);
}

/// `cargo test -p ksm --release --test bundle -- --ignored --nocapture`;
/// `BUNDLE_MEASURE_ENTRIES` changes the number of entries (100,000).
#[test]
#[ignore = "a measurement: writes 100,000 entries"]
fn measure_100k_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bundle");
    let n: u64 = std::env::var("BUNDLE_MEASURE_ENTRIES").map_or(100_000, |v| v.parse().unwrap());
    let start = Instant::now();
    let mut w = BundleWriter::create(&path, &[KH1, KH2], "measurement").unwrap();
    for i in 1..=n {
        w.add(&id(i), &records(i)).unwrap();
    }
    w.finish(signer()).unwrap();
    let write = start.elapsed();
    let size = std::fs::metadata(&path).unwrap().len();
    let start = Instant::now();
    verify(&path, &trust()).unwrap();
    let verify_time = start.elapsed();
    let start = Instant::now();
    let mut seen = 0u64;
    read_verified(&path, &trust(), |_, _| {
        seen += 1;
        Ok(())
    })
    .unwrap();
    let read_time = start.elapsed();
    let store = store_at(dir.path());
    let start = Instant::now();
    let report = import_bundle(&store, &path, &trust(), NOW, &hidden()).unwrap().report;
    let import_time = start.elapsed();
    assert_eq!((seen, report.added), (n, 2 * n));
    println!(
        "{n} entries x 2 key handles ({} MB): write+sign {:.2?} ({:.0} entries/s), verify {:.2?}, verify+read {:.2?}, verify+import {:.2?}",
        size / 1_000_000,
        write,
        n as f64 / write.as_secs_f64(),
        verify_time,
        read_time,
        import_time
    );
    assert!(write.as_secs_f64() < 20.0 * n as f64 / 100_000.0, "far below 20 s per 100,000 entries");
}
