//! The crypto officers' command line end to end: `init`, operators with
//! 2FA keys made and used by the `openssl` command, login sessions, quorum
//! approvals guarding the key-handle ceremony, and the audit log that
//! records all of it, refusals included.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{openssl, s, Laptop};
use hsm::soft::SoftHsm;
use hsm::{Flags, Password, SecurityModule};
use otp::KeyHandle;

#[test]
fn ceremony_with_two_factors_and_quorum_all_audited() {
    let l = Laptop::new();
    l.officer("alice", None);
    // After the first officer, adding one needs a session.
    let err = l.refused_as(None, &["operator", "add", "mallory", "--password-file", s(&l.path("ks.pw"))]);
    assert!(err.contains("needs a session"), "{err}");
    l.login("alice");
    l.officer("bob", Some("alice"));
    l.officer("carol", Some("alice"));
    l.login("bob");
    l.login("carol");
    let list = l.ok(&["operator", "list"]);
    assert!(list.contains("alice") && list.contains("carol") && !list.contains("argon2"), "{list}");

    // Creating a key handle needs a quorum (default M = 2).
    let err = l.refused_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2000"]);
    assert!(err.contains("quorum approval is required for create-key-handle"), "{err}");
    let one = l.approval("alice", "create-key-handle", "0x2000", &["bob"]);
    let err = l.refused_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2000", "--approval", s(&one)]);
    assert!(err.contains("1 more needed"), "{err}");
    let two = l.approval("alice", "create-key-handle", "0x2000", &["alice", "carol"]);
    // Approved for 0x2000, not for another handle.
    let err = l.refused_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2001", "--approval", s(&two)]);
    assert!(!err.is_empty());
    let out = l.ok_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2000", "--approval", s(&two)]);
    assert!(out.contains("created key handle 0x2000 (AES-256"), "{out}");
    // Single use.
    let err = l.refused_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2000", "--approval", s(&two)]);
    assert!(err.to_lowercase().contains("used"), "{err}");

    // The servers' keystore: decode-only, under a password given now.
    std::fs::write(l.path("servers.pw"), "servers keystore password\n").unwrap();
    let servers = l.path("servers.keystore");
    let export = l.approval("bob", "export-keystore", "0x2000", &["alice", "carol"]);
    let args = ["key-handle", "export-servers", "--key-handles", "0x2000", "--out", s(&servers)];
    let out = l.ok_as(Some("bob"), &[&args[..], &["--export-password-file", s(&l.path("servers.pw")), "--approval", s(&export)]].concat());
    assert!(out.contains("exported 1 decode-only"), "{out}");
    let server = SoftHsm::open_unlocked(&servers, &Password::new("servers keystore password").unwrap()).unwrap();
    let handles = server.key_handles().unwrap();
    assert_eq!((handles.len(), handles[0].key_handle, handles[0].flags), (1, KeyHandle::new(0x2000), Flags::OTP_DECODE));

    // Everything above is in the log, refusals and approvers included,
    // and the chain and checkpoints verify.
    let entries = l.audit_json();
    let actions: Vec<&str> = entries.iter().filter(|e| e["type"] == "entry").map(|e| e["action"].as_str().unwrap()).collect();
    for a in [
        "init",
        "operator.add",
        "operator.set-2fa",
        "login",
        "quorum.request",
        "quorum.approve",
        "key-handle.create",
        "key-handle.export-servers",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let created: Vec<&serde_json::Value> = entries.iter().filter(|e| e["action"] == "key-handle.create" && e["outcome"] == "ok").collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["operator"], "alice");
    assert_eq!(created[0]["approvers"], serde_json::json!(["alice", "carol"]));
    let refused = entries.iter().filter(|e| e["action"] == "key-handle.create" && e["outcome"] == "refused").count();
    assert_eq!(refused, 4);
    let verify = l.ok(&["audit", "verify"]);
    assert!(verify.to_lowercase().contains("ok"), "{verify}");
    // No password or session token ever reaches the log.
    let db = std::fs::read(l.home.join("audit.db")).unwrap();
    let token = std::fs::read_to_string(l.path("alice.session")).unwrap();
    for secret in ["alice password", "keystore password", token.trim()] {
        assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} in the audit log");
    }

    // Tampering with the log is found and exits 1.
    let conn = rusqlite::Connection::open(l.home.join("audit.db")).unwrap();
    let triggers: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in triggers {
        conn.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    let changed =
        conn.execute("UPDATE entries SET operator = 'mallory' WHERE action = 'key-handle.create' AND outcome = 'ok'", []).unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let out = l.run(None, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn sessions_need_both_factors() {
    let l = Laptop::new();
    l.officer("alice", None);
    std::fs::write(l.path("wrong.pw"), "not the password\n").unwrap();
    let (auth, session) = (l.path("a.json"), l.path("alice.session"));
    let err = l.refused_as(
        None,
        &["login", "alice", "--authdata", s(&auth), "--password-file", s(&l.path("wrong.pw")), "--session-out", s(&session)],
    );
    assert!(err.contains("wrong operator name or password"), "{err}");
    // Right password, then a signature by another key.
    l.ok(&["login", "alice", "--authdata", s(&auth), "--password-file", s(&l.path("alice.pw")), "--session-out", s(&session)]);
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", s(&l.path("eve.key.pem"))]);
    l.sign_authdata("eve", &auth);
    l.refused_as(None, &["login", "alice", "--authdata", s(&auth), "--session-out", s(&session)]);
    assert!(!session.exists());
    // A privileged command without a session, or with a logged-out one.
    let err = l.refused_as(None, &["quorum", "request", "--operation", "plaintext-output", "--context", "x", "--token-out", "t"]);
    assert!(err.contains("needs a session"), "{err}");
    l.login("alice");
    l.ok_as(Some("alice"), &["logout"]);
    l.refused_as(Some("alice"), &["quorum", "request", "--operation", "plaintext-output", "--context", "x", "--token-out", "t"]);
    let entries = l.audit_json();
    assert!(entries.iter().any(|e| e["action"] == "login" && e["outcome"] == "refused"));
    assert!(l.ok(&["audit", "verify"]).to_lowercase().contains("ok"));
}
