//! AEAD store imports and exports: pyhsm directories, YK-KSM CSV, the
//! `ksm import/export/store` commands. Real SQLite files, real keystores.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use indicatif::ProgressBar;
use ksm::aead_dir::AeadDir;
use ksm::export::export_aead_dir;
use ksm::import::{import_aead_dir, import_ykksm_csv, CsvImport, ImportError, ImportReport, IssueKind, Location, NoncePolicy};
use ksm::store::AeadStore;
use ksm::Ksm;
use otp::aead_file::{relative_path, AeadRecord, MAGIC, MAGIC_CRLF};
use otp::token::TokenFields;
use otp::{Aead, AeadNonce, HandleKey, KeyHandle, Otp, PublicId, YubiKeyKey};

const KH: KeyHandle = KeyHandle::new(0x2000);
const NOW: i64 = 1_700_000_000;

fn hidden() -> ProgressBar {
    ProgressBar::hidden()
}

fn id(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

/// An AEAD that is only bytes (for directory and store tests, which never
/// decrypt): 30 bytes derived from `seed`, public-id nonce.
fn blob(kh: KeyHandle, n: u64, seed: u8) -> AeadRecord {
    let mut b = [seed; 30];
    b[..8].copy_from_slice(&n.to_le_bytes());
    AeadRecord { key_handle: kh, nonce: id(n).aead_nonce().unwrap(), aead: Aead::from_slice(&b).unwrap() }
}

fn counts(r: &ImportReport) -> (u64, u64, u64, u64) {
    (r.added, r.already_present, r.conflicts, r.errors)
}

fn all_rows(store: &AeadStore) -> Vec<(PublicId, AeadRecord)> {
    let mut rows = Vec::new();
    store
        .for_each(|public_id, record| {
            rows.push((public_id, record));
            Ok::<_, ImportError>(())
        })
        .unwrap();
    rows
}

/// A keystore at `<dir>/ks` (password `pw` in `<dir>/pw`) holding `KH` with
/// `flags` and a fixed key.
fn keystore(dir: &Path, name: &str, flags: Flags) -> Arc<SoftHsm> {
    std::fs::write(dir.join("pw"), "pw\n").unwrap();
    let hsm = SoftHsm::create(&dir.join(name), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, flags, HandleKey::new(&[7; 32]).unwrap())]).unwrap();
    Arc::new(hsm)
}

/// A YubiKey of the test CSVs: public id n, key and uid derived from n and
/// `variant` (another variant is another secret for the same id).
struct Yk {
    public_id: PublicId,
    key: [u8; 16],
    uid: [u8; 6],
}

fn yk(n: u64, variant: u8) -> Yk {
    let mut key = [variant; 16];
    key[..8].copy_from_slice(&n.to_be_bytes());
    Yk { public_id: id(n), key, uid: [0xa0, 1, 2, 3, variant, n as u8] }
}

fn csv_row(seq: u64, y: &Yk) -> String {
    format!("{seq},{},{},{},000000000000,2024-01-01T00:00:00,", y.public_id, hex::encode(y.uid), hex::encode(y.key))
}

fn otp_for(y: &Yk, counter: u16, session_use: u8) -> String {
    let t = TokenFields { uid: y.uid, counter, session_use, timestamp_low: 0x1234, timestamp_high: 0x56, rnd: 9 }.build();
    Otp::new(y.public_id, t.encrypt(&YubiKeyKey::new(y.key))).to_string()
}

fn csv_import(policy: NoncePolicy) -> CsvImport {
    CsvImport { key_handle: KH, nonce: policy, source: "test.csv".to_owned() }
}

#[test]
fn aead_dir_conflict_keeps_the_original_and_quarantines_the_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let first = AeadDir::new(dir.path().join("first"));
    for n in 1..=3 {
        first.write(&KH.into(), &id(n), &blob(KH, n, 1)).unwrap();
    }
    let r = import_aead_dir(&store, first.base(), NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (3, 0, 0, 0), "{r:?}");
    assert!(r.is_clean());

    // Another directory holds other bytes for public id 2.
    let second = AeadDir::new(dir.path().join("second"));
    second.write(&KH.into(), &id(2), &blob(KH, 2, 9)).unwrap();
    second.write(&KH.into(), &id(4), &blob(KH, 4, 9)).unwrap();
    let r = import_aead_dir(&store, second.base(), NOW + 1, &hidden()).unwrap();
    assert_eq!(counts(&r), (1, 0, 1, 0), "{r:?}");
    assert_eq!(r.to_string(), "added 1, already present 0, conflicts 1, errors 0");
    assert_eq!(r.issues.len(), 1);
    assert_eq!(r.issues[0].kind, IssueKind::Conflict);
    assert_eq!(r.issues[0].location, Location::Path(second.base().join(relative_path("0x2000", &id(2)))));

    // The original is kept; the newcomer is visible in quarantine, once.
    assert_eq!(store.get(&id(2), KH).unwrap(), Some(blob(KH, 2, 1)));
    let again = import_aead_dir(&store, second.base(), NOW + 2, &hidden()).unwrap();
    assert_eq!(counts(&again), (0, 1, 1, 0));
    let conflicts = store.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!((c.public_id, c.refused, c.seen), (id(2), blob(KH, 2, 9), NOW + 1));
    assert!(c.origin.starts_with("aead-dir:") && c.origin.ends_with("second"), "{}", c.origin);
    let (stored, created, origin) = c.stored.clone().unwrap();
    assert_eq!((stored, created), (blob(KH, 2, 1), NOW));
    assert!(origin.ends_with("first"), "{origin}");
}

#[test]
fn reimport_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aeads.db");
    let aeads = AeadDir::new(dir.path().join("aeads"));
    for n in 1..=25 {
        aeads.write(&KH.into(), &id(n), &blob(KH, n, 3)).unwrap();
        aeads.write(&"KSM1".parse().unwrap(), &id(n), &blob("KSM1".parse().unwrap(), n, 4)).unwrap();
    }
    let store = AeadStore::open(&path).unwrap();
    assert_eq!(counts(&import_aead_dir(&store, aeads.base(), NOW, &hidden()).unwrap()), (50, 0, 0, 0));
    let before = all_rows(&store);
    drop(store);
    let store = AeadStore::open(&path).unwrap();
    let second = import_aead_dir(&store, aeads.base(), NOW + 5, &hidden()).unwrap();
    assert_eq!(counts(&second), (0, 50, 0, 0));
    assert!(second.is_clean() && second.issues.is_empty());
    assert_eq!(all_rows(&store), before);
    assert_eq!(store.count().unwrap(), 50);
    assert_eq!(store.count_by_key_handle().unwrap(), [(KH, 25), ("KSM1".parse().unwrap(), 25)]);
}

#[test]
fn export_then_import_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let source = AeadStore::open(&dir.path().join("source.db")).unwrap();
    let other = KeyHandle::new(1);
    let mut rows: Vec<_> = (1..=40).map(|n| (id(n), blob(KH, n, 5))).collect();
    rows.extend((1..=10).map(|n| (id(n), blob(other, n, 6))));
    // A random-nonce AEAD travels with its nonce.
    rows.push((id(77), AeadRecord { nonce: AeadNonce::new([9, 8, 7, 6, 5, 4]), ..blob(KH, 77, 7) }));
    source.put_many(&rows, "test", NOW).unwrap();

    let out = dir.path().join("export");
    let r = export_aead_dir(&source, &out, &[], &hidden()).unwrap();
    assert_eq!(counts(&r), (51, 0, 0, 0));
    // pyhsm layout, canonical key-handle directory, v1 files, mode 0600.
    let file = out.join(relative_path("0x2000", &id(77)));
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(MAGIC) && bytes.len() == 54);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(out.join(relative_path("0x1", &id(10))).is_file());

    let copy = AeadStore::open(&dir.path().join("copy.db")).unwrap();
    assert_eq!(counts(&import_aead_dir(&copy, &out, NOW, &hidden()).unwrap()), (51, 0, 0, 0));
    assert_eq!(all_rows(&copy), all_rows(&source));

    // Exporting again changes nothing; a file holding other bytes is a
    // conflict and stays as it is.
    assert_eq!(counts(&export_aead_dir(&source, &out, &[], &hidden()).unwrap()), (0, 51, 0, 0));
    let tampered = out.join(relative_path("0x2000", &id(3)));
    let mut t = std::fs::read(&tampered).unwrap();
    *t.last_mut().unwrap() ^= 1;
    std::fs::write(&tampered, &t).unwrap();
    let r = export_aead_dir(&source, &out, &[], &hidden()).unwrap();
    assert_eq!(counts(&r), (0, 50, 1, 0));
    assert_eq!(r.issues[0].location, Location::Path(tampered.clone()));
    assert_eq!(std::fs::read(&tampered).unwrap(), t);

    // Only some key handles.
    let only = dir.path().join("only");
    assert_eq!(counts(&export_aead_dir(&source, &only, &[other], &hidden()).unwrap()), (10, 0, 0, 0));
    assert!(!only.join("0x2000").exists());
}

#[test]
fn v0_v1_and_garbled_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let base = dir.path().join("aeads");
    let put = |kh_dir: &str, name: &str, bytes: &[u8]| -> PathBuf {
        let p = base.join(kh_dir).join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let at = |kh_dir: &str, n: u64| relative_path(kh_dir, &id(n)).strip_prefix(kh_dir).unwrap().to_str().unwrap().to_owned();

    // v0 under the decimal directory name pyhsm writes when typed so: the
    // key handle comes from the directory, the nonce from the public id.
    put("8192", &at("8192", 1), blob(KH, 1, 1).aead.as_bytes());
    // v1, and v1 with Windows pyhsm's CRLF marker.
    put("0x2000", &at("0x2000", 2), &blob(KH, 2, 1).to_v1_bytes());
    let mut crlf = MAGIC_CRLF.to_vec();
    crlf.extend_from_slice(&blob(KH, 3, 1).to_v1_bytes()[MAGIC.len()..]);
    put("0x2000", &at("0x2000", 3), &crlf);
    // A 4-character handle name.
    let ksm1: KeyHandle = "KSM1".parse().unwrap();
    put("KSM1", &at("KSM1", 4), &blob(ksm1, 4, 1).to_v1_bytes());
    // Errors: a v1 file in another handle's directory, garbage, a truncated
    // v1 file, an unknown version, a name that is not modhex, a huge file,
    // a directory that is not a key handle.
    let mismatch = put("0x2001", &at("0x2001", 5), &blob(KH, 5, 1).to_v1_bytes());
    let garbage = put("0x2000", &at("0x2000", 6), &[0x55; 200]);
    let truncated = put("0x2000", &at("0x2000", 7), &blob(KH, 7, 1).to_v1_bytes()[..20]);
    let mut v2 = blob(KH, 8, 1).to_v1_bytes();
    v2[13] = 2;
    let version = put("0x2000", &at("0x2000", 8), &v2);
    let badname = put("0x2000", "cc/notmodhex", &blob(KH, 9, 1).to_v1_bytes());
    let huge = put("0x2000", &at("0x2000", 10), &vec![0; 100_000]);
    let badkh = put("zz", &at("zz", 11), &blob(KH, 11, 1).to_v1_bytes());
    // Skipped: a hidden temporary file and a file outside any key-handle directory.
    put("0x2000", &format!("cc/.{}.tmp-0102", id(12)), b"partial");
    std::fs::write(base.join("README"), "not an AEAD").unwrap();

    let r = import_aead_dir(&store, &base, NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (4, 0, 0, 7), "{:#?}", r.issues);
    assert_eq!(r.skipped, 2);
    assert_eq!(r.to_string(), "added 4, already present 0, conflicts 0, errors 7");
    let error_paths: Vec<PathBuf> = r
        .issues
        .iter()
        .map(|i| match &i.location {
            Location::Path(p) => p.clone(),
            Location::Line(_) => panic!("{i}"),
        })
        .collect();
    for p in [&mismatch, &garbage, &truncated, &version, &badname, &huge] {
        assert!(error_paths.contains(p), "{} not reported in {error_paths:?}", p.display());
    }
    assert!(error_paths.contains(&base.join("zz")), "{error_paths:?}");
    assert!(!error_paths.contains(&badkh));
    let mismatch_reason = &r.issues.iter().find(|i| i.location == Location::Path(mismatch.clone())).unwrap().reason;
    assert!(mismatch_reason.contains("0x2000") && mismatch_reason.contains("0x2001"), "{mismatch_reason}");

    assert_eq!(store.get(&id(1), KH).unwrap(), Some(blob(KH, 1, 1)));
    assert_eq!(store.get(&id(2), KH).unwrap(), Some(blob(KH, 2, 1)));
    assert_eq!(store.get(&id(3), KH).unwrap(), Some(blob(KH, 3, 1)));
    assert_eq!(store.get(&id(4), ksm1).unwrap(), Some(blob(ksm1, 4, 1)));
    assert_eq!(store.count().unwrap(), 4);
    // A directory that is not there at all stops the import.
    assert!(matches!(import_aead_dir(&store, &dir.path().join("none"), NOW, &hidden()), Err(ImportError::Io { .. })));
}

/// OTPs of imported secrets decode through `Ksm::decrypt` on the store.
fn assert_decodes(store_path: &Path, hsm: &Arc<SoftHsm>, yks: &[Yk]) {
    let ksm = Ksm::new(hsm.clone(), Box::new(AeadStore::open(store_path).unwrap()), vec![KH.into()]);
    for y in yks {
        assert_eq!(ksm.answer(&otp_for(y, 0x21, 4)), "OK counter=0021 low=1234 high=56 use=04", "{}", y.public_id);
    }
    // ykgenerate (Debian libyubikey-dev), an independent token encoder.
    let Ok(out) = Command::new("ykgenerate")
        .args([hex::encode(yks[0].key), hex::encode(yks[0].uid), "0007".into(), "beef".into(), "12".into(), "03".into()])
        .output()
    else {
        println!("note: ykgenerate is not on PATH (apt-get install libyubikey-dev); skipped its OTP");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.len(), 32, "{token}");
    assert_eq!(ksm.answer(&format!("{}{token}", yks[0].public_id)), "OK counter=0007 low=beef high=12 use=03");
}

#[test]
fn ykksm_csv_import_decrypts_and_reimport_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = keystore(dir.path(), "ks", Flags::IMPORT | Flags::OTP_DECODE);
    let path = dir.path().join("aeads.db");
    let store = AeadStore::open(&path).unwrap();
    let yks: Vec<Yk> = (1..=3).map(|n| yk(n, 1)).collect();
    let key = hex::encode(yks[0].key);
    let csv = [
        "# ykksm 1".to_owned(),
        "# serialnr,publicname,internalname,aeskey,lockcode,created,accessed".to_owned(),
        csv_row(1, &yks[0]),
        csv_row(2, &yks[1]),
        String::new(),
        format!("3,cccccccccccc,{},{key},", hex::encode(yks[0].uid)), // public id 0: skipped
        format!("4,not-modhex,010203040506,{key},"),                  // line 7
        "5,cccccccccccd,010203040506,0011,".to_owned(),               // line 8: short key
        "6,cccccccccccd".to_owned(),                                  // line 9: too few fields
        format!("{}\r", csv_row(7, &yks[2])),                         // CRLF line ending
    ]
    .join("\n");
    let r = import_ykksm_csv(&store, hsm.as_ref(), csv.as_bytes(), &csv_import(NoncePolicy::PublicId), NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (3, 0, 0, 3), "{:#?}", r.issues);
    assert_eq!(r.skipped, 1);
    let lines: Vec<_> = r.issues.iter().map(|i| (i.kind, i.location.clone())).collect();
    assert_eq!(
        lines,
        [(IssueKind::Error, Location::Line(7)), (IssueKind::Error, Location::Line(8)), (IssueKind::Error, Location::Line(9))]
    );
    for i in &r.issues {
        assert!(!i.reason.contains(&key[..8]), "secret in {i}");
    }
    // Public-id nonces, as pyhsm makes them.
    for y in &yks {
        assert_eq!(store.get(&y.public_id, KH).unwrap().unwrap().nonce, y.public_id.aead_nonce().unwrap());
    }
    let rows = all_rows(&store);
    assert_decodes(&path, &hsm, &yks);

    // The same CSV again: nothing added, same bytes, the bad lines again.
    let r = import_ykksm_csv(&store, hsm.as_ref(), csv.as_bytes(), &csv_import(NoncePolicy::PublicId), NOW + 1, &hidden()).unwrap();
    assert_eq!(counts(&r), (0, 3, 0, 3));
    assert_eq!(r.unverified, 0);
    assert_eq!(all_rows(&store), rows);

    // Another secret for a stored public id: a conflict, reported with its
    // line and written nowhere (its AEAD would share the stored nonce).
    let changed = format!("# ykksm 1\n{}\n{}\n", csv_row(1, &yk(1, 2)), csv_row(4, &yk(4, 1)));
    let r = import_ykksm_csv(&store, hsm.as_ref(), changed.as_bytes(), &csv_import(NoncePolicy::PublicId), NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (1, 0, 1, 0));
    assert_eq!((r.issues[0].kind, &r.issues[0].location), (IssueKind::Conflict, &Location::Line(2)));
    assert_eq!(store.conflict_count().unwrap(), 0);
    assert_eq!(store.get(&id(1), KH).unwrap(), rows.iter().find(|(p, _)| *p == id(1)).map(|(_, r)| *r));
    assert_decodes(&path, &hsm, &yks[..1]);
}

#[test]
fn ykksm_csv_with_random_nonces() {
    let dir = tempfile::tempdir().unwrap();
    // Import-only, without user-nonce and without otp-decode.
    let import_only = keystore(dir.path(), "import-only", Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE);
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let yks: Vec<Yk> = (1..=4).map(|n| yk(n, 1)).collect();
    let csv = format!("# ykksm 1\n{}\n", yks.iter().enumerate().map(|(i, y)| csv_row(i as u64, y)).collect::<Vec<_>>().join("\n"));
    let random = csv_import(NoncePolicy::Random);
    let r = import_ykksm_csv(&store, import_only.as_ref(), csv.as_bytes(), &random, NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (4, 0, 0, 0));
    let rows = all_rows(&store);
    assert!(rows.iter().all(|(p, r)| r.nonce != p.aead_nonce().unwrap()), "random nonces");

    // Again: not wrapped again; present, but unverifiable without otp-decode.
    let r = import_ykksm_csv(&store, import_only.as_ref(), csv.as_bytes(), &random, NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (0, 4, 0, 0));
    assert_eq!(r.unverified, 4);
    assert_eq!(all_rows(&store), rows);

    // A handle that can also decode checks each stored AEAD against the CSV:
    // the same secrets are present (whatever the nonce policy), another
    // secret is a conflict.
    let decoder = keystore(dir.path(), "decoder", Flags::IMPORT | Flags::OTP_DECODE);
    for policy in [NoncePolicy::Random, NoncePolicy::PublicId] {
        let r = import_ykksm_csv(&store, decoder.as_ref(), csv.as_bytes(), &csv_import(policy), NOW, &hidden()).unwrap();
        assert_eq!((counts(&r), r.unverified), ((0, 4, 0, 0), 0), "{policy:?}");
    }
    let changed = format!("# ykksm 1\n{}\n{}\n", csv_row(1, &yks[0]), csv_row(2, &yk(2, 7)));
    let r = import_ykksm_csv(&store, decoder.as_ref(), changed.as_bytes(), &random, NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (0, 1, 1, 0));
    assert_eq!(r.issues[0].location, Location::Line(3));
    assert_eq!(all_rows(&store), rows);
    assert_decodes(&dir.path().join("aeads.db"), &decoder, &yks);

    // The same public id twice in one file: the second row meets the first.
    let store2 = AeadStore::open(&dir.path().join("twice.db")).unwrap();
    let twice = format!("# ykksm 1\n{}\n{}\n", csv_row(1, &yks[0]), csv_row(2, &yks[0]));
    let r = import_ykksm_csv(&store2, decoder.as_ref(), twice.as_bytes(), &random, NOW, &hidden()).unwrap();
    assert_eq!(counts(&r), (1, 1, 0, 0));
}

#[test]
fn ykksm_csv_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let csv = format!("# ykksm 1\n{}\n", csv_row(1, &yk(1, 1)));
    let run = |hsm: &SoftHsm, policy, input: &str| import_ykksm_csv(&store, hsm, input.as_bytes(), &csv_import(policy), NOW, &hidden());

    // A decode-only handle may not import.
    let decode_only = keystore(dir.path(), "decode-only", Flags::OTP_DECODE);
    let e = run(&decode_only, NoncePolicy::PublicId, &csv).unwrap_err();
    assert!(matches!(e, ImportError::Module(hsm::Error::NotPermitted { key_handle: KH, .. })), "{e:?}");
    assert!(e.to_string().contains("not permitted"), "{e}");
    // Choosing nonces needs user-nonce; random nonces do not.
    let no_user_nonce = keystore(dir.path(), "no-user-nonce", Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE);
    assert!(matches!(run(&no_user_nonce, NoncePolicy::PublicId, &csv), Err(ImportError::Module(hsm::Error::NotPermitted { .. }))));
    // An unknown handle, and a locked module.
    let other = SoftHsm::create(&dir.path().join("other"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    assert!(matches!(run(&other, NoncePolicy::PublicId, &csv), Err(ImportError::Module(hsm::Error::UnknownKeyHandle(KH)))));
    let locked = SoftHsm::open(&dir.path().join("decode-only")).unwrap();
    assert!(matches!(run(&locked, NoncePolicy::PublicId, &csv), Err(ImportError::Module(hsm::Error::Locked))));
    // Not a YK-KSM export: the header is required, and never echoed.
    let importer = keystore(dir.path(), "importer", Flags::IMPORT);
    for bad in [String::new(), "# ykksm 2\n".to_owned(), csv_row(1, &yk(1, 1)), format!(" # ykksm 1\n{}", csv_row(1, &yk(1, 1)))] {
        let e = run(&importer, NoncePolicy::PublicId, &bad).unwrap_err();
        assert!(matches!(e, ImportError::Format(_)), "{bad:?}: {e:?}");
        assert!(!e.to_string().contains(&hex::encode(yk(1, 1).key)), "{e}");
    }
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(counts(&run(&no_user_nonce, NoncePolicy::Random, &csv).unwrap()), (1, 0, 0, 0));
}

// ------------------------------------------------------------ the binary

fn ksm(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksm"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("OTP_KEYSTORE")
        .env_remove("OTP_KEYSTORE_PASSWORD_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_import_export_and_store_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    let hsm = keystore(dir.path(), "ks", Flags::IMPORT | Flags::OTP_DECODE);
    let yks: Vec<Yk> = (1..=3).map(|n| yk(n, 1)).collect();
    let rows: Vec<String> = yks.iter().enumerate().map(|(i, y)| csv_row(i as u64 + 1, y)).collect();
    std::fs::write(d("keys.csv"), format!("# ykksm 1\n{}\n", rows.join("\n"))).unwrap();
    let ks = ["--keystore", &d("ks"), "--password-file", &d("pw")];
    let csv_import = |db: &str, csv: &str, stdin: Option<&str>| {
        ksm(&[&["import", "--store", db, "--ykksm-csv", csv, "--key-handle", "0x2000"][..], &ks].concat(), stdin)
    };

    let (code, stdout, stderr) = outcome(&csv_import(&d("a.db"), &d("keys.csv"), None));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 3, already present 0, conflicts 0, errors 0\n"), "{stderr}");
    assert_eq!(std::fs::metadata(d("a.db")).unwrap().permissions().mode() & 0o777, 0o600);
    // Again, from stdin.
    let (code, stdout, _) = outcome(&csv_import(&d("a.db"), "-", Some(&format!("# ykksm 1\n{}\n", rows.join("\n")))));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 0, already present 3, conflicts 0, errors 0\n"));
    // A bad line: the rest is imported, the line is named, exit status 1.
    let bad = format!("# ykksm 1\n{}\n4,cccccccccccf,zz,00\n", csv_row(9, &yk(9, 1)));
    let (code, stdout, stderr) = outcome(&csv_import(&d("a.db"), "-", Some(&bad)));
    assert_eq!((code, stdout.as_str()), (Some(1), "added 1, already present 0, conflicts 0, errors 1\n"));
    assert!(stderr.contains("error: line 3: "), "{stderr}");

    // Export, then decrypt from the exported directory with `ksm decrypt`.
    let (code, stdout, stderr) = outcome(&ksm(&["export", "--store", &d("a.db"), "--aead-dir", &d("out")], None));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 4, already present 0, conflicts 0, errors 0\n"), "{stderr}");
    let otp = otp_for(&yks[1], 3, 1);
    let (code, stdout, _) =
        outcome(&ksm(&[&["decrypt"][..], &ks, &["--aead-dir", &d("out"), "--key-handle", "0x2000", &otp]].concat(), None));
    assert_eq!((code, stdout.as_str()), (Some(0), "OK counter=0003 low=1234 high=56 use=01\n"));
    let (code, stdout, _) = outcome(&ksm(&["export", "--store", &d("a.db"), "--aead-dir", &d("out"), "--key-handle", "0x2000,1"], None));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 0, already present 4, conflicts 0, errors 0\n"));

    // Import the export into a fresh store; then a conflicting file.
    let (code, stdout, _) = outcome(&ksm(&["import", "--store", &d("b.db"), "--aead-dir", &d("out")], None));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 4, already present 0, conflicts 0, errors 0\n"));
    let other = AeadDir::new(d("other"));
    other.write(&"0x2000".parse().unwrap(), &yks[0].public_id, &blob(KH, 1, 0)).unwrap();
    std::fs::write(dir.path().join("other/garbage"), "x").unwrap();
    let (code, stdout, stderr) = outcome(&ksm(&["import", "--store", &d("b.db"), "--aead-dir", &d("other")], None));
    assert_eq!((code, stdout.as_str()), (Some(1), "added 0, already present 0, conflicts 1, errors 0\n"), "{stderr}");
    assert!(stderr.contains("conflict: ") && stderr.contains("skipped 1"), "{stderr}");

    let (code, stdout, _) = outcome(&ksm(&["store", "stats", "--store", &d("b.db")], None));
    assert_eq!(code, Some(0));
    assert!(stdout.lines().any(|l| l.split_whitespace().eq(["0x2000", "8192", "4"])), "{stdout}");
    assert!(stdout.contains("conflicts 1"), "{stdout}");
    let (code, stdout, _) = outcome(&ksm(&["store", "conflicts", "--store", &d("b.db")], None));
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&format!("{} 0x2000 seen=", yks[0].public_id)) && stdout.contains("origin=aead-dir:"), "{stdout}");

    // Could not run: exit status 2, and nothing created.
    let decode_only = keystore(dir.path(), "decode.ks", Flags::OTP_DECODE);
    drop(decode_only);
    let refused = ksm(
        &[
            "import",
            "--store",
            &d("c.db"),
            "--ykksm-csv",
            &d("keys.csv"),
            "--key-handle",
            "0x2000",
            "--keystore",
            &d("decode.ks"),
            "--password-file",
            &d("pw"),
        ],
        None,
    );
    let (code, stdout, stderr) = outcome(&refused);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(stderr.contains("not permitted"), "{stderr}");
    assert!(!dir.path().join("c.db").exists());
    let (code, _, stderr) = outcome(&ksm(&["store", "stats", "--store", &d("missing.db")], None));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!dir.path().join("missing.db").exists());
    let (code, _, stderr) =
        outcome(&ksm(&["import", "--store", &d("c.db"), "--ykksm-csv", &d("keys.csv"), "--key-handle", "0x2000"], None));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--keystore"), "{stderr}");
    let (code, _, _) = outcome(&ksm(&["import", "--store", &d("c.db")], None));
    assert_eq!(code, Some(2));
    let (code, _, stderr) = outcome(&ksm(&["import", "--store", &d("c.db"), "--aead-dir", &d("nothere")], None));
    assert_eq!(code, Some(2), "{stderr}");
    drop(hsm);
}

/// `cargo test --release -p ksm --test import -- --ignored --nocapture bulk`
/// (`BULK_ROWS` to change the size): put_many into a fresh store, then a
/// full scan and random lookups.
#[test]
#[ignore = "measurement"]
fn bulk_put_many_measurement() {
    let n: u64 = std::env::var("BULK_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aeads.db");
    let store = AeadStore::open(&path).unwrap();
    let started = std::time::Instant::now();
    let mut batch = Vec::with_capacity(ksm::import::BATCH);
    for i in 1..=n {
        batch.push((id(i), blob(KH, i, 0x5a)));
        if batch.len() == ksm::import::BATCH || i == n {
            store.put_many(&batch, "aead-dir:/var/cache/yubikey-ksm/aeads", NOW).unwrap();
            batch.clear();
        }
    }
    let put = started.elapsed();
    let wal = std::fs::metadata(dir.path().join("aeads.db-wal")).map_or(0, |m| m.len());
    drop(store);
    let size = std::fs::metadata(&path).unwrap().len();
    let store = AeadStore::open(&path).unwrap();
    let started = std::time::Instant::now();
    let mut rows = 0u64;
    store
        .for_each(|_, _| {
            rows += 1;
            Ok::<_, ImportError>(())
        })
        .unwrap();
    let scan = started.elapsed();
    let started = std::time::Instant::now();
    let lookups = 100_000u64;
    for i in 0..lookups {
        let k = (i * 7919) % n + 1;
        assert!(store.get(&id(k), KH).unwrap().is_some());
    }
    let get = started.elapsed();
    assert_eq!((rows, store.count().unwrap()), (n, n));
    println!(
        "put_many: {n} AEADs in {:.2} s ({:.0}/s, batches of {}); database {:.1} MB ({:.0} bytes/AEAD), WAL before close {:.1} MB; \
         full scan {:.2} s; {lookups} lookups {:.2} s ({:.1} µs each, one thread)",
        put.as_secs_f64(),
        n as f64 / put.as_secs_f64(),
        ksm::import::BATCH,
        size as f64 / 1e6,
        size as f64 / n as f64,
        wal as f64 / 1e6,
        scan.as_secs_f64(),
        get.as_secs_f64(),
        get.as_secs_f64() * 1e6 / lookups as f64
    );
}

/// The replication outbox is filled by a trigger: `ksm import` in another
/// process is covered, pairs merged from a peer are not appended, and an
/// acknowledgement compacts.
#[test]
fn cli_import_in_another_process_fills_the_replication_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    let aeads = AeadDir::new(d("dir"));
    for n in 1..=3 {
        aeads.write(&"0x2000".parse().unwrap(), &id(n), &blob(KH, n, 1)).unwrap();
    }
    // Imported before any peer is known: no outbox.
    let (code, _, stderr) = outcome(&ksm(&["import", "--store", &d("a.db"), "--aead-dir", &d("dir")], None));
    assert_eq!(code, Some(0), "{stderr}");
    let store = AeadStore::open(Path::new(&d("a.db"))).unwrap();
    assert!(store.outbox_after(0, 100).unwrap().is_empty());
    store.add_peer("site-2").unwrap();
    for n in 4..=5 {
        aeads.write(&"0x2000".parse().unwrap(), &id(n), &blob(KH, n, 1)).unwrap();
    }
    let (code, stdout, stderr) = outcome(&ksm(&["import", "--store", &d("a.db"), "--aead-dir", &d("dir")], None));
    assert_eq!((code, stdout.as_str()), (Some(0), "added 2, already present 3, conflicts 0, errors 0\n"), "{stderr}");
    let outbox = store.outbox_after(0, 100).unwrap();
    assert_eq!(
        outbox.iter().map(|o| (o.seq, o.public_id, o.record)).collect::<Vec<_>>(),
        [(1, id(4), Some(blob(KH, 4, 1))), (2, id(5), Some(blob(KH, 5, 1)))]
    );
    // Merged from a peer: stored, not appended; a conflict quarantined once.
    use ksm::store::PutOutcome::*;
    let merged = store.merge_from_peer("site-2", &[(id(9), blob(KH, 9, 1)), (id(4), blob(KH, 4, 2))], NOW).unwrap();
    assert_eq!(merged, [Added, Conflict]);
    assert_eq!(store.merge_from_peer("site-2", &[(id(4), blob(KH, 4, 2))], NOW).unwrap(), [Conflict]);
    assert_eq!(store.conflict_count().unwrap(), 1);
    assert_eq!(store.conflicts().unwrap()[0].origin, "peer:site-2");
    assert_eq!(store.outbox_last_seq().unwrap(), 2);
    // Acknowledged: compacted; the cursor only moves forward.
    assert_eq!(store.ack_peer("site-2", Some(2)).unwrap(), ksm::store::PeerPosition { cursor: 2, head: 2 });
    assert_eq!(store.ack_peer("site-2", Some(1)).unwrap().cursor, 2);
    assert!(store.outbox_after(0, 100).unwrap().is_empty());
    assert_eq!(store.peer_cursors().unwrap(), [("site-2".to_owned(), 2)]);
}
