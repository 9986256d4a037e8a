//! The replication PKI through the `replication` binary and the library:
//! file modes, no overwriting, certificate contents, and the fingerprint
//! that `cert show` prints being the one the transport pins.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use replication::pki::{self, Ca, CertInfo, Fingerprint, Identity};
use replication::transport::{PeerRule, Trust};

fn replication(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replication")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = replication(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn refused(args: &[&str]) -> String {
    let out = replication(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The value after `label:` in the binary's output.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(label)).map(str::trim).unwrap_or_else(|| panic!("no {label} in {out}"))
}

#[test]
fn ca_init_writes_a_0600_key_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = ok(&["ca", "init", "--dir", s(&dir)]);
    let key = dir.join(pki::CA_KEY_FILE);
    let cert = dir.join(pki::CA_CERT_FILE);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&dir), 0o700);
    let info = CertInfo::load(&cert).unwrap();
    assert!(info.is_ca);
    assert_eq!(info.subject, format!("CN={}", pki::DEFAULT_CA_NAME));
    assert_eq!(field(&out, "CA fingerprint:"), info.fingerprint.to_string());

    let (key_before, cert_before) = (fs::read(&key).unwrap(), fs::read(&cert).unwrap());
    let err = refused(&["ca", "init", "--dir", s(&dir)]);
    assert!(err.contains("already exists"), "{err}");
    // Even with only one of the two files present.
    fs::remove_file(&cert).unwrap();
    let err = refused(&["ca", "init", "--dir", s(&dir)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read(&key).unwrap(), key_before, "the key was not touched");
    fs::write(&cert, &cert_before).unwrap();
    // No temporary files left behind.
    let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem"]);
    // And the library refuses the same way.
    let err = Ca::generate("x", Duration::from_secs(86_400)).unwrap().write(&dir).unwrap_err();
    assert!(matches!(err, pki::Error::AlreadyExists(_)), "{err}");
}

#[test]
fn cert_issue_writes_a_0600_key_and_a_site_certificate_for_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("sites");
    ok(&["ca", "init", "--dir", s(&ca_dir), "--common-name", "test replication CA", "--days", "30"]);
    let out = ok(&["cert", "issue", "--ca-dir", s(&ca_dir), "--name", "auth1", "--out", s(&out_dir), "--days", "3650"]);
    let key = out_dir.join("auth1.key");
    let cert = out_dir.join("auth1.pem");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);

    let info = CertInfo::load(&cert).unwrap();
    let ca_info = CertInfo::load(&ca_dir.join(pki::CA_CERT_FILE)).unwrap();
    assert_eq!(info.subject, "CN=auth1");
    assert_eq!(info.issuer, "CN=test replication CA");
    assert_eq!(info.dns_names, ["auth1"]);
    assert!(info.client_auth && info.server_auth && !info.is_ca);
    assert!(info.not_after <= ca_info.not_after, "a site certificate never outlives its CA");
    assert_eq!(field(&out, "fingerprint:"), info.fingerprint.to_string());

    // The pair loads as a transport identity.
    let identity = Identity::load(&cert, &key).unwrap();
    assert_eq!(identity.fingerprint(), info.fingerprint);
    assert!(!format!("{identity:?}").contains("PRIVATE"), "Debug never shows the key");

    // Never overwrites, bad names are refused before anything is written.
    let err = refused(&["cert", "issue", "--ca-dir", s(&ca_dir), "--name", "auth1", "--out", s(&out_dir)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(Identity::load(&cert, &key).unwrap().fingerprint(), info.fingerprint);
    for bad in ["../evil", "Auth1", "a/b", "-x", ""] {
        let err = refused(&["cert", "issue", "--ca-dir", s(&ca_dir), &format!("--name={bad}"), "--out", s(&out_dir)]);
        assert!(err.contains("invalid site name"), "{bad}: {err}");
    }
    assert!(!tmp.path().join("evil.key").exists());
    // Without a CA.
    let err = refused(&["cert", "issue", "--ca-dir", s(&tmp.path().join("nope")), "--name", "auth2", "--out", s(&out_dir)]);
    assert!(err.contains("ca.pem"), "{err}");
}

#[test]
fn cert_show_prints_the_fingerprint_the_pin_check_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    ok(&["ca", "init", "--dir", s(&ca_dir)]);
    ok(&["cert", "issue", "--ca-dir", s(&ca_dir), "--name", "auth2", "--out", s(tmp.path())]);
    let cert = tmp.path().join("auth2.pem");
    let out = ok(&["cert", "show", s(&cert)]);
    assert_eq!(field(&out, "subject:"), "CN=auth2");
    assert_eq!(field(&out, "dns names:"), "auth2");
    assert_eq!(field(&out, "usage:"), "server auth, client auth");
    assert!(field(&out, "not after:").ends_with("UTC"));
    let printed: Fingerprint = field(&out, "fingerprint:").parse().unwrap();

    // It is SHA-256 over the DER, and exactly what the transport's
    // authorization check computes and compares.
    let der = pki::load_certificate(&cert).unwrap();
    assert_eq!(printed, Fingerprint::of(&der));
    let ca = pki::load_certificate(&ca_dir.join(pki::CA_CERT_FILE)).unwrap();
    let pinned = Trust::new(ca.clone(), vec![PeerRule::pin(printed)]).unwrap();
    let identity = pinned.authorize(&der).unwrap();
    assert_eq!((identity.name.as_str(), identity.fingerprint), ("auth2", printed));
    let other = Fingerprint::of(b"another certificate");
    let refusal = Trust::new(ca, vec![PeerRule::pin(other)]).unwrap().authorize(&der).unwrap_err();
    assert_eq!(refusal.fingerprint, printed);

    // OpenSSL agrees, where it is installed.
    if let Ok(o) = Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in", s(&cert)]).output() {
        if o.status.success() {
            let text = String::from_utf8(o.stdout).unwrap();
            let hex = text.trim().split('=').nth(1).unwrap();
            assert_eq!(hex.parse::<Fingerprint>().unwrap(), printed);
        }
    }

    // Not a certificate.
    let junk = tmp.path().join("junk.pem");
    fs::write(&junk, "hello").unwrap();
    assert!(refused(&["cert", "show", s(&junk)]).contains("CERTIFICATE"));
    // A key file is not shown as a certificate either.
    assert!(!replication(&["cert", "show", s(&tmp.path().join("auth2.key"))]).status.success());
}

#[test]
fn ca_load_checks_that_the_key_belongs_to_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    fs::create_dir(&one).unwrap();
    fs::create_dir(&two).unwrap();
    let day = Duration::from_secs(86_400);
    let ca1 = Ca::generate("one", day * 10).unwrap();
    ca1.write(&one).unwrap();
    Ca::generate("two", day * 10).unwrap().write(&two).unwrap();
    let loaded = Ca::load(&one).unwrap();
    assert_eq!(loaded.fingerprint(), ca1.fingerprint());
    // A certificate issued by the loaded CA has the generated CA as issuer.
    let site = loaded.issue("witness", day).unwrap();
    assert_eq!(CertInfo::from_der(site.cert_der()).unwrap().issuer, "CN=one");
    // Swap in the other CA's key.
    fs::remove_file(one.join(pki::CA_KEY_FILE)).unwrap();
    fs::copy(two.join(pki::CA_KEY_FILE), one.join(pki::CA_KEY_FILE)).unwrap();
    let err = Ca::load(&one).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    // A site certificate is not a CA.
    let site_dir = tmp.path().join("site");
    fs::create_dir(&site_dir).unwrap();
    let files = ca1.issue("auth1", day).unwrap().write(&site_dir).unwrap();
    fs::rename(&files.cert, site_dir.join(pki::CA_CERT_FILE)).unwrap();
    fs::rename(&files.key, site_dir.join(pki::CA_KEY_FILE)).unwrap();
    assert!(Ca::load(&site_dir).unwrap_err().to_string().contains("not a CA"));
    // Debug never shows keys.
    assert!(format!("{ca1:?} {site:?}").contains("REDACTED"));
}

#[test]
fn help_lists_the_subcommands() {
    let top = ok(&["--help"]);
    for word in ["ca", "cert"] {
        assert!(top.contains(word), "{top}");
    }
    let cert = ok(&["cert", "--help"]);
    assert!(cert.contains("issue") && cert.contains("show"), "{cert}");
    let issue = ok(&["cert", "issue", "--help"]);
    for flag in ["--ca-dir", "--name", "--out", "--days"] {
        assert!(issue.contains(flag), "{issue}");
    }
    assert!(ok(&["ca", "init", "--help"]).contains("0600"));
}
