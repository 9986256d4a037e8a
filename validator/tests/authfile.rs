//! `validator authfile`: pam_yubico's authfile from a users → YubiKeys map.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ksm::store::AeadStore;
use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};
use validator::authfile::{build, write, KnownIds, Options, StoreIds};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_validator")).arg("authfile").args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn map_file(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("users.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

fn errors(yaml: &str) -> Vec<String> {
    build(yaml, &Options::default(), None).unwrap_err().errors
}

#[test]
fn sorted_deduplicated_output() {
    let yaml = "
zoe: [cccccccccccf, cccccccccccb]
alice:
  - vvvvvvvvvvvv
  - cccccccccccd
  - cccccccccccd
bob: cccccccccccc
carol: []
";
    let file = build(yaml, &Options::default(), None).unwrap();
    assert_eq!(file.text, "alice:cccccccccccd:vvvvvvvvvvvv\nbob:cccccccccccc\nzoe:cccccccccccb:cccccccccccf\n");
    assert_eq!((file.users, file.ids), (3, 5));
    assert_eq!(file.warnings.len(), 2, "{:?}", file.warnings);
    assert!(file.warnings.iter().any(|w| w.contains("cccccccccccd is listed twice")), "{:?}", file.warnings);
    assert!(file.warnings.iter().any(|w| w.contains("\"carol\" has no public ids")), "{:?}", file.warnings);
}

#[test]
fn warnings_for_case_and_length() {
    let file = build("alice: [CCCCCCCCCCCB, cccccccc]\n", &Options::default(), None).unwrap();
    assert_eq!(file.text, "alice:cccccccc:cccccccccccb\n");
    assert!(file.warnings.iter().any(|w| w.contains("lower case")), "{:?}", file.warnings);
    assert!(file.warnings.iter().any(|w| w.contains("cccccccc has 8 characters")), "{:?}", file.warnings);
    // With token_id_length=8 only the other one is reported.
    let file = build("alice: [cccccccc, cccccccccccb]\n", &Options { token_id_length: 8, ..Options::default() }, None).unwrap();
    assert_eq!(file.warnings.len(), 1, "{:?}", file.warnings);
    assert!(file.warnings[0].contains("cccccccccccb has 12"), "{:?}", file.warnings);
}

#[test]
fn duplicates_across_users_are_errors() {
    let e = errors("alice: [cccccccccccb, cccccccccccd]\nbob: [cccccccccccb]\ncarol: cccccccccccb\n");
    assert_eq!(e, ["cccccccccccb is listed for several users: alice, bob, carol"]);
    // A YAML map with the same user twice is refused by the parser.
    let e = errors("alice: cccccccccccb\nalice: cccccccccccd\n");
    assert!(e[0].contains("duplicate"), "{e:?}");
}

#[test]
fn bad_ids_and_users_are_errors() {
    for (yaml, expect) in [
        ("alice: [cccccccccccx]\n", "'x' is not a modhex character"),
        ("alice: [ccccccccccc]\n", "even number"),
        ("alice: [c]\n", "2 to 16"),
        ("alice: [cccccccccccccccccc]\n", "2 to 16"),
        ("alice: ['']\n", "2 to 16"),
        ("alice: [123456]\n", "non-string"),
        ("alice: [true]\n", "non-string"),
        ("alice: [ccccccccccéc]\n", "not a modhex character"),
        ("alice: {a: b}\n", "expected a public id or a list"),
        ("'al:ice': cccccccccccb\n", "contains `:`"),
        ("'al ice': cccccccccccb\n", "whitespace"),
        ("\"al\\tice\": cccccccccccb\n", "whitespace"),
        ("\"al\\u0007ice\": cccccccccccb\n", "control"),
        ("'': cccccccccccb\n", "is empty"),
        ("'#alice': cccccccccccb\n", "starts with `#`"),
        ("1234: cccccccccccb\n", "not a string"),
        ("- alice\n- bob\n", "expected a map"),
        ("", "empty"),
        ("alice: []\n", "empty authfile"),
        ("alice: [cccccccccccb\n", "not a YAML map"),
    ] {
        let e = errors(yaml);
        assert!(e.iter().any(|m| m.contains(expect)), "{yaml:?}: expected {expect:?} in {e:?}");
    }
    // A line pam_yubico's 1024-byte buffer would split.
    let many: Vec<String> = (0..80u64).map(|n| PublicId::from_number(n, 6).unwrap().to_modhex()).collect();
    let e = errors(&format!("alice: [{}]\n", many.join(", ")));
    assert!(e[0].contains("pam_yubico reads at most 1022"), "{e:?}");
}

struct Known(Vec<&'static str>);

impl KnownIds for Known {
    fn is_known(&self, id: &PublicId) -> Result<bool, String> {
        Ok(self.0.contains(&id.to_modhex().as_str()))
    }
}

#[test]
fn unknown_ids_are_errors_unless_allowed() {
    let yaml = "alice: [cccccccccccb, cccccccccccd]\nbob: cccccccccccf\n";
    let known = Known(vec!["cccccccccccb", "cccccccccccf"]);
    let e = build(yaml, &Options::default(), Some(&known)).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e:?}");
    assert!(e.errors[0].contains("cccccccccccd has no AEAD"), "{e:?}");
    let file = build(yaml, &Options { allow_unknown: true, ..Options::default() }, Some(&known)).unwrap();
    assert_eq!(file.text, "alice:cccccccccccb:cccccccccccd\nbob:cccccccccccf\n");
    assert!(file.warnings[0].contains("unknown id"), "{:?}", file.warnings);
}

fn record(kh: u32) -> AeadRecord {
    AeadRecord { key_handle: KeyHandle::new(kh), nonce: AeadNonce::new([0, 0, 0, 0, 0, 1]), aead: Aead::from_slice(&[7u8; 30]).unwrap() }
}

#[test]
fn the_command_writes_atomically_checks_the_store_and_writes_nothing_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("aeads.db");
    {
        let store = AeadStore::open(&store_path).unwrap();
        // Two key handles; an id is known under either.
        store.put(&"cccccccccccb".parse().unwrap(), &record(1), "test", 1).unwrap();
        store.put(&"cccccccccccd".parse().unwrap(), &record(2), "test", 1).unwrap();
        let ids = StoreIds::new(&store).unwrap();
        assert!(ids.is_known(&"cccccccccccd".parse().unwrap()).unwrap());
        assert!(!ids.is_known(&"cccccccccccf".parse().unwrap()).unwrap());
    }
    let out = dir.path().join("yubikey_mappings");
    let out_s = out.to_str().unwrap();
    let store_s = store_path.to_str().unwrap();

    let map = map_file(dir.path(), "bob: cccccccccccd\nalice: [cccccccccccb]\n");
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s, "--store", store_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "alice:cccccccccccb\nbob:cccccccccccd\n");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(stderr(&o).contains("wrote"), "{}", stderr(&o));
    let inode = std::fs::metadata(&out).unwrap();

    // The same again: unchanged, not rewritten.
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s, "--store", store_s]);
    assert!(o.status.success() && stderr(&o).contains("unchanged"), "{}", stderr(&o));
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&out).unwrap()), std::os::unix::fs::MetadataExt::ino(&inode));

    // An unknown id: error, the old file stays.
    let map = map_file(dir.path(), "bob: cccccccccccd\nalice: [cccccccccccb, cccccccccccf]\n");
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s, "--store", store_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cccccccccccf has no AEAD"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "alice:cccccccccccb\nbob:cccccccccccd\n");
    // ... written with --allow-unknown, replacing the file atomically (a new inode).
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s, "--store", store_s, "--allow-unknown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning:"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "alice:cccccccccccb:cccccccccccf\nbob:cccccccccccd\n");
    assert_ne!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&out).unwrap()), std::os::unix::fs::MetadataExt::ino(&inode));
    // Without a store nothing is looked up.
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Errors: nothing written, every error reported.
    let map = map_file(dir.path(), "alice: [cccccccccccb, xyz]\nbob: cccccccccccb\n");
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("\"xyz\" is not a public id") && err.contains("listed for several users"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "alice:cccccccccccb:cccccccccccf\nbob:cccccccccccd\n");
    let fresh = dir.path().join("never");
    let o = run(&["--map", map.to_str().unwrap(), "--out", fresh.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!fresh.exists());

    // A missing map or store is an error too; no temporary files are left.
    let o = run(&["--map", dir.path().join("none.yaml").to_str().unwrap(), "--out", out_s]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&["--map", map.to_str().unwrap(), "--out", out_s, "--store", dir.path().join("none.db").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!dir.path().join("none.db").exists());
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn write_replaces_and_reports_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("authfile");
    assert!(write(&p, "a:cccccccccccb\n").unwrap());
    assert!(!write(&p, "a:cccccccccccb\n").unwrap());
    assert!(write(&p, "b:cccccccccccb\n").unwrap());
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "b:cccccccccccb\n");
    assert!(write(&dir.path().join("missing/authfile"), "x").is_err());
}
