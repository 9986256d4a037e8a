//! M-of-N quorum approvals against a real SQLite file, with operator keys
//! and approval signatures made by the `openssl` command.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm::signing::VerifyingKey;
use hsm::Password;
use personalizer::home::{Home, ModuleSetting};
use personalizer::operators::{AuthData, KdfCost, OperatorDb, OperatorError, OperatorName, Session};
use personalizer::quorum::{policy_context, QuorumOperation as Op, QuorumToken, QUORUM_TOKEN_TTL_SECS};
use tempfile::TempDir;

const T0: u64 = 1_800_000_000;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn name(n: &str) -> OperatorName {
    n.parse().unwrap()
}

fn pw(n: &str) -> Password {
    Password::new(format!("{n}-pw")).unwrap()
}

#[derive(Clone, Copy)]
enum Form {
    Dgst,
    Pkeyutl,
}

/// Sign 32 bytes with an operator's private key file, as they would.
fn openssl_sign(dir: &Path, key: &Path, bytes: &[u8], form: Form) -> Vec<u8> {
    let (data, sig) = (dir.join("to-sign.bin"), dir.join("signature.bin"));
    std::fs::write(&data, bytes).unwrap();
    match form {
        Form::Dgst => openssl(&["dgst", "-sha256", "-sign", s(key), "-out", s(&sig), s(&data)]),
        Form::Pkeyutl => openssl(&["pkeyutl", "-sign", "-inkey", s(key), "-pkeyopt", "digest:sha256", "-in", s(&data), "-out", s(&sig)]),
    }
    std::fs::read(&sig).unwrap()
}

struct Officer {
    name: OperatorName,
    key: PathBuf,
    session: Session,
}

struct Fx {
    dir: TempDir,
    home: Home,
    db: OperatorDb,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::create(&dir.path().join("home"), ModuleSetting::Keystore(Path::new("keystore")), "laptop-1").unwrap();
        let db = OperatorDb::open_with_cost(&home, KdfCost::MINIMAL).unwrap();
        Self { dir, home, db }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn sign_authdata(&self, auth: &AuthData, key: &Path) -> AuthData {
        let mut auth = auth.clone();
        let sig = openssl_sign(self.p(), key, &auth.digest().unwrap(), Form::Dgst);
        auth.set_signature(&sig);
        auth
    }

    /// An operator with an openssl key registered as 2FA, logged in at T0.
    fn officer(&mut self, n: &str) -> Officer {
        let key = self.p().join(format!("{n}.key.pem"));
        let public = self.p().join(format!("{n}.pub.pem"));
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", s(&key)]);
        openssl(&["pkey", "-in", s(&key), "-pubout", "-out", s(&public)]);
        let verifying = VerifyingKey::from_pem_file(&public).unwrap();
        self.db.add(&name(n), &pw(n), T0).unwrap();
        let c = self.db.begin_set_2fa(&name(n), &pw(n), &verifying, T0).unwrap();
        let c = self.sign_authdata(&c, &key);
        self.db.set_2fa(&name(n), &c, T0).unwrap();
        let session = self.login(n, &key, T0);
        Officer { name: name(n), key, session }
    }

    fn login(&mut self, n: &str, key: &Path, now: u64) -> Session {
        let c = self.db.begin_login(&name(n), &pw(n), now).unwrap();
        let c = self.sign_authdata(&c, key);
        self.db.finish_login(&name(n), &c, now).unwrap().session
    }

    /// `officer` approves through the token file, the way the CLI would:
    /// read it, sign the decoded token with openssl, record it.
    fn approve(&mut self, officer: &Officer, file: &Path, form: Form, now: u64) -> Result<(), OperatorError> {
        let mut token = QuorumToken::read(file).unwrap();
        let sig = openssl_sign(self.p(), &officer.key, &token.token_bytes().unwrap(), form);
        self.db.approve(&officer.session, token.id, &sig, now)?;
        token.add_approval(&officer.name, &sig);
        token.write(file).unwrap();
        Ok(())
    }

    fn request(&mut self, requester: &Officer, op: Op, context: &str, now: u64) -> (i64, PathBuf) {
        let token = self.db.request(&requester.session, op, context, now).unwrap();
        let file = self.p().join(format!("quorum-{}.json", token.id));
        token.write(&file).unwrap();
        (token.id, file)
    }
}

fn three() -> (Fx, Officer, Officer, Officer) {
    let mut f = Fx::new();
    let a = f.officer("alice");
    let b = f.officer("bob");
    let c = f.officer("carol");
    (f, a, b, c)
}

#[test]
fn three_officers_two_approvals_with_both_openssl_forms() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);

    // The file: exact fields, mode 0600, the token is 32 bytes.
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["approvals", "context", "expires", "id", "operation", "requester", "token", "version"]);
    assert_eq!(json["version"], "1");
    assert_eq!(json["operation"], "create-key-handle");
    assert_eq!(json["context"], "0x2000");
    assert_eq!(json["requester"], "alice");
    assert_eq!(json["expires"], T0 + QUORUM_TOKEN_TTL_SECS);
    assert_eq!(json["approvals"], serde_json::json!([]));
    assert_eq!(B64.decode(json["token"].as_str().unwrap()).unwrap().len(), 32);

    f.approve(&bob, &file, Form::Dgst, T0 + 1).unwrap();
    let err = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0 + 2).unwrap_err();
    assert!(matches!(err, OperatorError::TooFewApprovals { have: 1, need: 2 }), "{err}");
    assert_eq!(err.to_string(), "1 of 2 approvals; 1 more needed");

    f.approve(&carol, &file, Form::Pkeyutl, T0 + 3).unwrap();
    let status = f.db.request_status(id).unwrap();
    assert_eq!((status.approvers.clone(), status.required, status.used_at), (vec![name("bob"), name("carol")], 2, None));
    assert_eq!(f.db.open_requests(T0 + 3).unwrap().len(), 1);
    let approvers = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0 + 4).unwrap();
    assert_eq!(approvers, vec![name("bob"), name("carol")]);
    assert_eq!(f.db.request_status(id).unwrap().used_at, Some(T0 + 4));
    assert!(f.db.open_requests(T0 + 4).unwrap().is_empty());

    // The file collected both signatures; the database's copy agrees.
    let on_disk = QuorumToken::read(&file).unwrap();
    assert_eq!(on_disk.approvals.len(), 2);
    assert_eq!(f.db.quorum_token(id).unwrap(), on_disk);
}

#[test]
fn a_token_is_used_once() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::ExportKeystore, "backup.ks", T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    f.db.consume(&alice.session, id, Op::ExportKeystore, "backup.ks", T0).unwrap();
    let err = f.db.consume(&alice.session, id, Op::ExportKeystore, "backup.ks", T0 + 1).unwrap_err();
    assert!(matches!(err, OperatorError::RequestUsed(i) if i == id), "{err}");
    assert!(err.to_string().contains("used already"));
    // Nor can it be approved any more.
    let dave = f.officer("dave");
    assert!(matches!(f.approve(&dave, &file, Form::Dgst, T0 + 1), Err(OperatorError::RequestUsed(_))));
}

#[test]
fn the_requester_counts_once_and_approvers_must_be_distinct() {
    let (mut f, alice, bob, _carol) = three();
    let (id, file) = f.request(&alice, Op::PlaintextOutput, "secrets.csv", T0);
    f.approve(&alice, &file, Form::Dgst, T0).unwrap();
    let err = f.approve(&alice, &file, Form::Pkeyutl, T0).unwrap_err();
    assert!(matches!(err, OperatorError::DuplicateApprover { ref operator, .. } if *operator == name("alice")), "{err}");
    let err = f.db.consume(&alice.session, id, Op::PlaintextOutput, "secrets.csv", T0).unwrap_err();
    assert!(matches!(err, OperatorError::TooFewApprovals { have: 1, need: 2 }), "{err}");

    // Bob twice, even with a second session: still one approval.
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    let bob_again = Officer { name: bob.name.clone(), key: bob.key.clone(), session: f.login("bob", &bob.key, T0) };
    assert!(matches!(f.approve(&bob_again, &file, Form::Dgst, T0), Err(OperatorError::DuplicateApprover { .. })));
    let approvers = f.db.consume(&alice.session, id, Op::PlaintextOutput, "secrets.csv", T0).unwrap();
    assert_eq!(approvers, vec![name("alice"), name("bob")]);
}

#[test]
fn expired_tokens_are_refused() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::ImportKeyHandle, "0x2001", T0);
    f.approve(&bob, &file, Form::Dgst, T0 + QUORUM_TOKEN_TTL_SECS - 1).unwrap();
    let err = f.approve(&carol, &file, Form::Dgst, T0 + QUORUM_TOKEN_TTL_SECS).unwrap_err();
    assert!(matches!(err, OperatorError::RequestExpired { expires, .. } if expires == T0 + 600), "{err}");
    // Both approvals in time, but consumed too late (sessions renewed so
    // only the token has expired).
    let (id2, file2) = f.request(&alice, Op::ImportKeyHandle, "0x2001", T0);
    f.approve(&bob, &file2, Form::Dgst, T0 + 10).unwrap();
    f.approve(&carol, &file2, Form::Dgst, T0 + 10).unwrap();
    let late = T0 + QUORUM_TOKEN_TTL_SECS;
    let alice_late = f.login("alice", &alice.key, late);
    let err = f.db.consume(&alice_late, id2, Op::ImportKeyHandle, "0x2001", late).unwrap_err();
    assert!(matches!(err, OperatorError::RequestExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired"));
    f.db.consume(&alice_late, id2, Op::ImportKeyHandle, "0x2001", late - 1).unwrap();
    assert!(matches!(f.db.consume(&alice.session, id, Op::ImportKeyHandle, "0x2001", late), Err(OperatorError::RequestExpired { .. })));
}

#[test]
fn approvers_need_2fa_and_a_valid_session_of_their_own() {
    let (mut f, alice, bob, carol) = three();
    // Dave has no 2FA: he cannot get a session, hence cannot approve.
    f.db.add(&name("dave"), &pw("dave"), T0).unwrap();
    assert!(matches!(f.db.begin_login(&name("dave"), &pw("dave"), T0), Err(OperatorError::No2fa(_))));

    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    // Carol signs, but with an expired session.
    let ttl = f.home.config().session_ttl_secs;
    let err = f.approve(&carol, &file, Form::Dgst, T0 + ttl).unwrap_err();
    assert!(matches!(err, OperatorError::SessionExpired { .. }), "{err}");
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    // Bob's 2FA is disabled after he approved: his approval stops counting.
    f.approve(&carol, &file, Form::Dgst, T0 + 1).unwrap();
    f.db.disable_2fa(&name("bob"), T0 + 2).unwrap();
    let err = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0 + 3).unwrap_err();
    assert!(matches!(err, OperatorError::ApprovalInvalid(ref o, _) if *o == name("bob")), "{err}");
    assert!(err.to_string().contains("no 2FA key"), "{err}");
    // And his old session cannot approve anything else.
    let (_, other) = f.request(&alice, Op::CreateKeyHandle, "0x2002", T0 + 3);
    let err = f.approve(&bob, &other, Form::Dgst, T0 + 3).unwrap_err();
    assert!(matches!(err, OperatorError::SessionRevoked(..) | OperatorError::NoSession), "{err}");
}

#[test]
fn a_rotated_key_voids_earlier_approvals() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    let new_key = f.p().join("carol2.key.pem");
    let new_pub = f.p().join("carol2.pub.pem");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", s(&new_key)]);
    openssl(&["pkey", "-in", s(&new_key), "-pubout", "-out", s(&new_pub)]);
    let c = f.db.begin_rotate_2fa(&carol.session, &VerifyingKey::from_pem_file(&new_pub).unwrap(), T0).unwrap();
    let c = f.sign_authdata(&c, &new_key);
    f.db.rotate_2fa(&name("carol"), &c, T0).unwrap();
    let err = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0).unwrap_err();
    assert!(matches!(err, OperatorError::ApprovalInvalid(ref o, _) if *o == name("carol")), "{err}");
}

#[test]
fn bad_signatures_are_refused() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    let token = QuorumToken::read(&file).unwrap();
    // Bob's session with carol's signature.
    let by_carol = openssl_sign(f.p(), &carol.key, &token.token_bytes().unwrap(), Form::Dgst);
    let err = f.db.approve(&bob.session, id, &by_carol, T0).unwrap_err();
    assert!(matches!(err, OperatorError::BadApproval { ref operator, .. } if *operator == name("bob")), "{err}");
    // Bob's key over another request's token.
    let (_, other) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    let other_bytes = QuorumToken::read(&other).unwrap().token_bytes().unwrap();
    assert_ne!(other_bytes, token.token_bytes().unwrap());
    let wrong = openssl_sign(f.p(), &bob.key, &other_bytes, Form::Dgst);
    assert!(matches!(f.db.approve(&bob.session, id, &wrong, T0), Err(OperatorError::BadApproval { .. })));
    assert!(matches!(f.db.approve(&bob.session, id, b"garbage", T0), Err(OperatorError::BadApproval { .. })));
    assert!(f.db.request_status(id).unwrap().approvers.is_empty());
    assert!(matches!(f.db.approve(&bob.session, 999, &wrong, T0), Err(OperatorError::NoSuchRequest(999))));
}

#[test]
fn operation_context_and_requester_must_match() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    let err = f.db.consume(&alice.session, id, Op::ImportKeyHandle, "0x2000", T0).unwrap_err();
    assert!(matches!(err, OperatorError::WrongOperation { expected: Op::ImportKeyHandle, actual: Op::CreateKeyHandle, .. }), "{err}");
    assert!(err.to_string().contains("create-key-handle"), "{err}");
    let err = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2001", T0).unwrap_err();
    assert!(matches!(err, OperatorError::WrongContext { .. }), "{err}");
    let err = f.db.consume(&bob.session, id, Op::CreateKeyHandle, "0x2000", T0).unwrap_err();
    assert!(matches!(err, OperatorError::WrongRequester { .. }), "{err}");
    // None of that used the token up.
    f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0).unwrap();
}

#[test]
fn a_request_edited_in_the_database_no_longer_verifies() {
    let (mut f, alice, bob, carol) = three();
    let (id, file) = f.request(&alice, Op::PlaintextOutput, "harmless.csv", T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    let conn = rusqlite::Connection::open(f.home.operators_db()).unwrap();
    conn.execute("UPDATE quorum_requests SET context = 'all-secrets.csv' WHERE id = ?1", [id]).unwrap();
    drop(conn);
    let err = f.db.consume(&alice.session, id, Op::PlaintextOutput, "all-secrets.csv", T0).unwrap_err();
    assert!(matches!(err, OperatorError::ApprovalInvalid(..)), "{err}");
}

#[test]
fn policy_changes_need_a_quorum_and_stay_in_range() {
    let (mut f, alice, bob, carol) = three();
    assert_eq!(f.db.policy(Op::CreateKeyHandle).unwrap(), 2);
    assert_eq!(f.db.policies().unwrap().len(), 5);
    for m in [0, 1, 9, 100] {
        let err = f.db.set_policy(&alice.session, 1, Op::CreateKeyHandle, m, T0).unwrap_err();
        assert!(matches!(err, OperatorError::PolicyOutOfRange(x) if x == m), "{err}");
        assert!(err.to_string().contains("between 2 and 8"), "{err}");
    }
    let err = f.db.set_policy(&alice.session, 1, Op::CreateKeyHandle, 4, T0).unwrap_err();
    assert!(matches!(err, OperatorError::PolicyTooLarge { m: 4, n: 3 }), "{err}");

    // Approved for 3, applied as 2: refused, the token kept.
    let (id, file) = f.request(&alice, Op::ChangePolicy, &policy_context(Op::CreateKeyHandle, 3), T0);
    assert!(matches!(f.db.set_policy(&alice.session, id, Op::CreateKeyHandle, 3, T0), Err(OperatorError::TooFewApprovals { .. })));
    assert_eq!(f.db.policy(Op::CreateKeyHandle).unwrap(), 2);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Pkeyutl, T0).unwrap();
    assert!(matches!(f.db.set_policy(&alice.session, id, Op::CreateKeyHandle, 2, T0), Err(OperatorError::WrongContext { .. })));
    assert!(matches!(f.db.set_policy(&alice.session, id, Op::ExportKeystore, 3, T0), Err(OperatorError::WrongContext { .. })));
    let approvers = f.db.set_policy(&alice.session, id, Op::CreateKeyHandle, 3, T0).unwrap();
    assert_eq!(approvers, vec![name("bob"), name("carol")]);
    assert_eq!(f.db.policy(Op::CreateKeyHandle).unwrap(), 3);
    assert_eq!(f.db.policy(Op::ExportKeystore).unwrap(), 2);
    assert!(matches!(f.db.set_policy(&alice.session, id, Op::CreateKeyHandle, 3, T0), Err(OperatorError::RequestUsed(_))));

    // Now creating a key handle needs three.
    let (id, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    let err = f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0).unwrap_err();
    assert_eq!(err.to_string(), "2 of 3 approvals; 1 more needed");
    f.approve(&alice, &file, Form::Dgst, T0).unwrap();
    assert_eq!(f.db.consume(&alice.session, id, Op::CreateKeyHandle, "0x2000", T0).unwrap().len(), 3);

    // A plain approval of another operation is no policy change.
    let (id, file) = f.request(&alice, Op::ExportKeystore, &policy_context(Op::ExportKeystore, 3), T0);
    f.approve(&bob, &file, Form::Dgst, T0).unwrap();
    f.approve(&carol, &file, Form::Dgst, T0).unwrap();
    let err = f.db.set_policy(&alice.session, id, Op::ExportKeystore, 3, T0).unwrap_err();
    assert!(matches!(err, OperatorError::WrongOperation { .. }), "{err}");
}

#[test]
fn token_files_are_strict() {
    let (mut f, alice, _bob, _carol) = three();
    let (_, file) = f.request(&alice, Op::CreateKeyHandle, "0x2000", T0);
    let text = std::fs::read_to_string(&file).unwrap();
    let tampered = text.replacen("\"version\"", "\"surprise\": 1,\n  \"version\"", 1);
    std::fs::write(&file, tampered).unwrap();
    assert!(matches!(QuorumToken::read(&file), Err(OperatorError::BadQuorumToken(_))));
    std::fs::write(&file, text.replace("create-key-handle", "delete-everything")).unwrap();
    assert!(matches!(QuorumToken::read(&file), Err(OperatorError::BadQuorumToken(_))));
    assert!(matches!(f.db.request(&alice.session, Op::CreateKeyHandle, "", T0), Err(OperatorError::BadContext)));
    assert!(matches!(f.db.request(&alice.session, Op::CreateKeyHandle, "a\nb", T0), Err(OperatorError::BadContext)));
}
