//! Operator accounts, two-factor login and sessions, against real SQLite
//! files and keys and signatures made by the `openssl` command.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm::signing::VerifyingKey;
use hsm::Password;
use personalizer::home::{Home, ModuleSetting};
use personalizer::operators::{AuthData, KdfCost, OperatorDb, OperatorError, OperatorName, SessionToken};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

const T0: u64 = 1_800_000_000;

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An operator's key pair, made by openssl.
struct Key {
    private: PathBuf,
    public: VerifyingKey,
    public_pem: PathBuf,
}

fn key(dir: &Path, name: &str) -> Key {
    let private = dir.join(format!("{name}.key.pem"));
    let public_pem = dir.join(format!("{name}.pub.pem"));
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", s(&private)]);
    openssl(&["pkey", "-in", s(&private), "-pubout", "-out", s(&public_pem)]);
    Key { private, public: VerifyingKey::from_pem_file(&public_pem).unwrap(), public_pem }
}

#[derive(Clone, Copy)]
enum Form {
    Dgst,
    Pkeyutl,
}

/// What an operator does with an authdata file: decode the Digest, sign it
/// with openssl, put the base64 signature back, save the file.
fn sign_file(path: &Path, key: &Key, form: Form) {
    let mut auth = AuthData::read(path).unwrap();
    let dir = path.parent().unwrap();
    let (digest, sig) = (dir.join("digest.bin"), dir.join("digest.sig"));
    std::fs::write(&digest, B64.decode(&auth.data[0].digest).unwrap()).unwrap();
    match form {
        Form::Dgst => openssl(&["dgst", "-sha256", "-sign", s(&key.private), "-out", s(&sig), s(&digest)]),
        Form::Pkeyutl => {
            openssl(&["pkeyutl", "-sign", "-inkey", s(&key.private), "-pkeyopt", "digest:sha256", "-in", s(&digest), "-out", s(&sig)])
        }
    };
    auth.set_signature(&std::fs::read(&sig).unwrap());
    auth.write(path).unwrap();
}

/// Sign an in-memory authdata through a file, like an operator.
fn signed(dir: &Path, auth: &AuthData, key: &Key, form: Form) -> AuthData {
    let path = dir.join("authdata.json");
    auth.write(&path).unwrap();
    sign_file(&path, key, form);
    AuthData::read(&path).unwrap()
}

struct Fx {
    dir: TempDir,
    home: Home,
    db: OperatorDb,
}

fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::create(&dir.path().join("home"), ModuleSetting::Keystore(Path::new("keystore")), "laptop-1").unwrap();
    let db = OperatorDb::open_with_cost(&home, KdfCost::MINIMAL).unwrap();
    Fx { dir, home, db }
}

fn name(n: &str) -> OperatorName {
    n.parse().unwrap()
}

fn pw(p: &str) -> Password {
    Password::new(p).unwrap()
}

impl Fx {
    fn p(&self) -> &Path {
        self.dir.path()
    }

    /// Add `n` (password `<n>-pw`) and register an openssl key as 2FA.
    fn operator(&mut self, n: &str) -> Key {
        let k = key(self.p(), n);
        self.db.add(&name(n), &pw(&format!("{n}-pw")), T0).unwrap();
        let challenge = self.db.begin_set_2fa(&name(n), &pw(&format!("{n}-pw")), &k.public, T0).unwrap();
        let answer = signed(self.p(), &challenge, &k, Form::Dgst);
        self.db.set_2fa(&name(n), &answer, T0).unwrap();
        k
    }

    fn login(&mut self, n: &str, k: &Key, form: Form, now: u64) -> Result<SessionToken, OperatorError> {
        let challenge = self.db.begin_login(&name(n), &pw(&format!("{n}-pw")), now)?;
        let answer = signed(self.p(), &challenge, k, form);
        Ok(self.db.finish_login(&name(n), &answer, now)?.token)
    }
}

#[test]
fn login_with_both_openssl_forms_and_the_cloudhsm_file_shape() {
    let mut f = fx();
    let k = f.operator("alice");

    // Step 1 writes the CloudHSM-shaped file, mode 0600.
    let challenge = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let path = f.p().join("login.json");
    challenge.write(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{json}");
    assert_eq!(json["Version"], "1.0");
    assert_eq!(json["PublicKey"], "");
    let entry = json["Data"][0].as_object().unwrap();
    assert_eq!(entry.len(), 3);
    assert_eq!(entry["HsmId"], "laptop-1");
    assert_eq!(entry["Signature"], "");
    assert_eq!(B64.decode(entry["Digest"].as_str().unwrap()).unwrap().len(), 32);

    // Step 2 with `openssl dgst -sha256 -sign`.
    sign_file(&path, &k, Form::Dgst);
    let new = f.db.finish_login(&name("alice"), &AuthData::read(&path).unwrap(), T0 + 10).unwrap();
    assert_eq!(new.session.operator, name("alice"));
    assert_eq!(new.session.expires_at, T0 + 10 + 900);
    assert_eq!(new.token.expose().len(), 64);
    let session = f.db.session(&new.token, T0 + 11).unwrap();
    assert_eq!(session.operator, name("alice"));
    assert!(!format!("{new:?}").contains(new.token.expose()), "the token is redacted in Debug");

    // And with CloudHSM's `openssl pkeyutl -sign -pkeyopt digest:sha256`.
    let t2 = f.login("alice", &k, Form::Pkeyutl, T0 + 20).unwrap();
    assert_ne!(t2.expose(), new.token.expose());
    f.db.session(&t2, T0 + 21).unwrap();

    // Tokens survive a file round trip and reopening the database.
    let tf = f.p().join("session");
    t2.write(&tf).unwrap();
    assert_eq!(std::fs::metadata(&tf).unwrap().permissions().mode() & 0o777, 0o600);
    let db2 = OperatorDb::open_with_cost(&f.home, KdfCost::MINIMAL).unwrap();
    assert_eq!(db2.session(&SessionToken::read(&tf).unwrap(), T0 + 22).unwrap().operator, name("alice"));
}

#[test]
fn listing_shows_2fa_and_the_openssl_fingerprint_never_hashes() {
    let mut f = fx();
    let k = f.operator("alice");
    f.db.add(&name("bob"), &pw("bob-pw"), T0 + 5).unwrap();
    let list = f.db.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, name("alice"));
    assert!(list[0].two_factor);
    let der = openssl(&["pkey", "-pubin", "-in", s(&k.public_pem), "-outform", "DER"]);
    assert_eq!(list[0].key_fingerprint.as_deref(), Some(hex::encode(Sha256::digest(&der)).as_str()));
    assert_eq!((list[0].created_at, list[0].password_changed_at), (T0, T0));
    assert!(!list[1].two_factor && list[1].key_fingerprint.is_none());
    assert_eq!(list[1].created_at, T0 + 5);
    let json = serde_json::to_string(&list).unwrap();
    assert!(!json.contains("argon2"), "{json}");
    assert_eq!(f.db.operators_with_2fa().unwrap(), 1);
    assert!(matches!(f.db.add(&name("bob"), &pw("x"), T0), Err(OperatorError::Exists(_))));
    let db_mode = std::fs::metadata(f.home.operators_db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(db_mode, 0o600);
}

#[test]
fn wrong_password_and_unknown_name_fail_alike() {
    let mut f = fx();
    f.operator("alice");
    let wrong = f.db.begin_login(&name("alice"), &pw("nope"), T0).unwrap_err();
    let unknown = f.db.begin_login(&name("mallory"), &pw("alice-pw"), T0).unwrap_err();
    assert!(matches!(wrong, OperatorError::WrongCredentials));
    assert!(matches!(unknown, OperatorError::WrongCredentials));
    assert_eq!(wrong.to_string(), unknown.to_string());
    assert_eq!(wrong.to_string(), "wrong operator name or password");
}

#[test]
fn another_operators_key_is_refused_and_uses_up_the_challenge() {
    let mut f = fx();
    let alice = f.operator("alice");
    let bob = f.operator("bob");
    let challenge = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let by_bob = signed(f.p(), &challenge, &bob, Form::Dgst);
    let err = f.db.finish_login(&name("alice"), &by_bob, T0).unwrap_err();
    assert!(matches!(err, OperatorError::BadSignature(_)), "{err}");
    assert_eq!(err.to_string(), "the signature does not verify with the 2FA key of alice");
    // A challenge is answered once, rightly or wrongly.
    let by_alice = signed(f.p(), &challenge, &alice, Form::Dgst);
    assert!(matches!(f.db.finish_login(&name("alice"), &by_alice, T0), Err(OperatorError::ChallengeUsed)));
    // Bob presenting his own signature as bob: not his challenge.
    assert!(matches!(f.db.finish_login(&name("bob"), &by_bob, T0), Err(OperatorError::UnknownChallenge { .. })));
}

#[test]
fn a_signature_over_another_digest_is_refused() {
    let mut f = fx();
    let alice = f.operator("alice");
    let first = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let second = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    assert_ne!(first.digest().unwrap(), second.digest().unwrap());
    let second_signed = signed(f.p(), &second, &alice, Form::Dgst);
    let mut mixed = first.clone();
    mixed.data[0].signature = second_signed.data[0].signature.clone();
    assert!(matches!(f.db.finish_login(&name("alice"), &mixed, T0), Err(OperatorError::BadSignature(_))));
    // A digest the personalizer never issued, signed correctly.
    let mut forged = first.clone();
    forged.data[0].digest = B64.encode([9u8; 32]);
    let forged = signed(f.p(), &forged, &alice, Form::Dgst);
    assert!(matches!(f.db.finish_login(&name("alice"), &forged, T0), Err(OperatorError::UnknownChallenge { .. })));
    // Another module's file.
    let mut elsewhere = signed(f.p(), &second, &alice, Form::Dgst);
    elsewhere.data[0].hsm_id = "laptop-2".to_owned();
    assert!(matches!(f.db.finish_login(&name("alice"), &elsewhere, T0), Err(OperatorError::BadAuthData(_))));
    // The untouched second challenge still works.
    f.db.finish_login(&name("alice"), &second_signed, T0).unwrap();
}

#[test]
fn challenges_expire_and_are_single_use() {
    let mut f = fx();
    let alice = f.operator("alice");
    let ttl = f.home.config().challenge_ttl_secs;
    let late = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let late = signed(f.p(), &late, &alice, Form::Dgst);
    let err = f.db.finish_login(&name("alice"), &late, T0 + ttl).unwrap_err();
    assert!(matches!(err, OperatorError::ChallengeExpired(t) if t == T0 + ttl), "{err}");

    let ok = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let ok = signed(f.p(), &ok, &alice, Form::Pkeyutl);
    f.db.finish_login(&name("alice"), &ok, T0 + ttl - 1).unwrap();
    let again = f.db.finish_login(&name("alice"), &ok, T0 + ttl - 1).unwrap_err();
    assert!(matches!(again, OperatorError::ChallengeUsed), "{again}");
    assert_eq!(again.to_string(), "this challenge was used already; start again");
}

#[test]
fn challenges_are_bound_to_their_purpose() {
    let mut f = fx();
    let alice = f.operator("alice");
    let new_key = key(f.p(), "alice2");
    let session = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    let session = f.db.session(&session, T0).unwrap();
    let rotation = f.db.begin_rotate_2fa(&session, &new_key.public, T0).unwrap();
    let rotation = signed(f.p(), &rotation, &new_key, Form::Dgst);
    // A rotation challenge is no login challenge, and vice versa.
    assert!(matches!(f.db.finish_login(&name("alice"), &rotation, T0), Err(OperatorError::UnknownChallenge { .. })));
    let login = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    let login = signed(f.p(), &login, &alice, Form::Dgst);
    assert!(matches!(f.db.rotate_2fa(&name("alice"), &login, T0), Err(OperatorError::UnknownChallenge { .. })));
    assert!(matches!(f.db.set_2fa(&name("alice"), &login, T0), Err(OperatorError::UnknownChallenge { .. })));
}

#[test]
fn registration_needs_the_password_and_possession_of_the_new_key() {
    let mut f = fx();
    let alice = f.operator("alice");
    let bob_key = key(f.p(), "bob");
    let other = key(f.p(), "other");
    f.db.add(&name("bob"), &pw("bob-pw"), T0).unwrap();
    assert!(matches!(f.db.begin_set_2fa(&name("bob"), &pw("wrong"), &bob_key.public, T0), Err(OperatorError::WrongCredentials)));
    // Without 2FA, no login at all.
    let err = f.db.begin_login(&name("bob"), &pw("bob-pw"), T0).unwrap_err();
    assert!(matches!(err, OperatorError::No2fa(_)), "{err}");
    // The challenge carries the new key and must be signed with it.
    let challenge = f.db.begin_set_2fa(&name("bob"), &pw("bob-pw"), &bob_key.public, T0).unwrap();
    assert_eq!(VerifyingKey::from_pem(&challenge.public_key).unwrap(), bob_key.public);
    let by_other = signed(f.p(), &challenge, &other, Form::Dgst);
    assert!(matches!(f.db.set_2fa(&name("bob"), &by_other, T0), Err(OperatorError::BadSignature(_))));
    assert!(!f.db.list().unwrap()[1].two_factor);
    // Swapping PublicKey in the file for another key does not help.
    let challenge = f.db.begin_set_2fa(&name("bob"), &pw("bob-pw"), &bob_key.public, T0).unwrap();
    let mut swapped = signed(f.p(), &challenge, &other, Form::Dgst);
    swapped.public_key = std::fs::read_to_string(&other.public_pem).unwrap();
    assert!(matches!(f.db.set_2fa(&name("bob"), &swapped, T0), Err(OperatorError::BadAuthData(_))));
    // Alice's key cannot be bob's too.
    let err = f.db.begin_set_2fa(&name("bob"), &pw("bob-pw"), &alice.public, T0).unwrap_err();
    assert!(matches!(err, OperatorError::KeyInUse(ref o) if *o == name("alice")), "{err}");
    // Properly signed with pkeyutl: registered.
    let challenge = f.db.begin_set_2fa(&name("bob"), &pw("bob-pw"), &bob_key.public, T0).unwrap();
    let fp = f.db.set_2fa(&name("bob"), &signed(f.p(), &challenge, &bob_key, Form::Pkeyutl), T0).unwrap();
    assert_eq!(fp, bob_key.public.fingerprint());
    assert!(matches!(f.db.begin_set_2fa(&name("bob"), &pw("bob-pw"), &other.public, T0), Err(OperatorError::Has2fa(_))));
    f.login("bob", &bob_key, Form::Dgst, T0).unwrap();
}

#[test]
fn disabled_2fa_refuses_logins_and_ends_sessions() {
    let mut f = fx();
    let alice = f.operator("alice");
    let token = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    let pending = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    f.db.disable_2fa(&name("alice"), T0 + 1).unwrap();
    let err = f.db.session(&token, T0 + 2).unwrap_err();
    assert!(matches!(err, OperatorError::SessionRevoked(..) | OperatorError::NoSession), "{err}");
    let err = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0 + 2).unwrap_err();
    assert!(matches!(err, OperatorError::No2fa(_)), "{err}");
    assert!(err.to_string().contains("every session needs 2FA"), "{err}");
    // A challenge issued before cannot be finished either.
    let pending = signed(f.p(), &pending, &alice, Form::Dgst);
    assert!(f.db.finish_login(&name("alice"), &pending, T0 + 2).is_err());
    assert!(!f.db.list().unwrap()[0].two_factor);
    assert!(matches!(f.db.disable_2fa(&name("alice"), T0), Err(OperatorError::No2fa(_))));
    assert!(matches!(f.db.disable_2fa(&name("nobody"), T0), Err(OperatorError::NoSuchOperator(_))));
}

#[test]
fn rotation_replaces_the_key_and_ends_old_sessions() {
    let mut f = fx();
    let old = f.operator("alice");
    let new = key(f.p(), "alice-new");
    let t1 = f.login("alice", &old, Form::Dgst, T0).unwrap();
    let t2 = f.login("alice", &old, Form::Pkeyutl, T0).unwrap();
    let s1 = f.db.session(&t1, T0).unwrap();

    assert!(matches!(f.db.begin_rotate_2fa(&s1, &old.public, T0), Err(OperatorError::SameKey(_))));
    // The rotation challenge must be signed with the new key, not the old.
    let challenge = f.db.begin_rotate_2fa(&s1, &new.public, T0).unwrap();
    let with_old = signed(f.p(), &challenge, &old, Form::Dgst);
    assert!(matches!(f.db.rotate_2fa(&name("alice"), &with_old, T0), Err(OperatorError::BadSignature(_))));
    f.db.session(&t1, T0).unwrap();
    let challenge = f.db.begin_rotate_2fa(&s1, &new.public, T0).unwrap();
    f.db.rotate_2fa(&name("alice"), &signed(f.p(), &challenge, &new, Form::Dgst), T0 + 1).unwrap();

    for t in [&t1, &t2] {
        let err = f.db.session(t, T0 + 2).unwrap_err();
        assert!(matches!(err, OperatorError::SessionRevoked(..) | OperatorError::NoSession), "{err}");
    }
    assert!(f.db.begin_rotate_2fa(&s1, &key(f.p(), "third").public, T0 + 2).is_err(), "the old session cannot rotate again");
    let err = f.login("alice", &old, Form::Dgst, T0 + 3).unwrap_err();
    assert!(matches!(err, OperatorError::BadSignature(_)), "{err}");
    let t3 = f.login("alice", &new, Form::Dgst, T0 + 3).unwrap();
    assert_eq!(f.db.session(&t3, T0 + 4).unwrap().operator, name("alice"));
    assert_eq!(f.db.list().unwrap()[0].key_fingerprint.as_deref(), Some(new.public.fingerprint().as_str()));
}

#[test]
fn sessions_expire_and_end_at_logout() {
    let mut f = fx();
    let alice = f.operator("alice");
    let ttl = f.home.config().session_ttl_secs;
    let t = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    assert_eq!(f.db.session(&t, T0 + ttl - 1).unwrap().expires_at, T0 + ttl);
    let err = f.db.session(&t, T0 + ttl).unwrap_err();
    assert!(matches!(err, OperatorError::SessionExpired { expires_at, .. } if expires_at == T0 + ttl), "{err}");

    let t = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    let other = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    f.db.logout(&t).unwrap();
    assert!(matches!(f.db.session(&t, T0 + 1), Err(OperatorError::NoSession)));
    f.db.session(&other, T0 + 1).unwrap();
    f.db.logout(&t).unwrap();
    let made_up = SessionToken::parse(&"ab".repeat(32)).unwrap();
    assert!(matches!(f.db.session(&made_up, T0), Err(OperatorError::NoSession)));
    assert!(f.db.purge_expired(T0 + ttl).unwrap() >= 1);
}

#[test]
fn password_change_ends_sessions_and_voids_pending_challenges() {
    let mut f = fx();
    let alice = f.operator("alice");
    let t = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    let pending = f.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    assert!(matches!(f.db.passwd(&name("alice"), &pw("wrong"), &pw("new-pw"), T0 + 1), Err(OperatorError::WrongCredentials)));
    f.db.session(&t, T0 + 1).unwrap();
    f.db.passwd(&name("alice"), &pw("alice-pw"), &pw("new-pw"), T0 + 1).unwrap();
    assert!(f.db.session(&t, T0 + 2).is_err());
    let pending = signed(f.p(), &pending, &alice, Form::Dgst);
    assert!(matches!(f.db.finish_login(&name("alice"), &pending, T0 + 2), Err(OperatorError::ChallengeVoided(_))));
    assert!(matches!(f.db.begin_login(&name("alice"), &pw("alice-pw"), T0 + 2), Err(OperatorError::WrongCredentials)));
    let c = f.db.begin_login(&name("alice"), &pw("new-pw"), T0 + 2).unwrap();
    f.db.finish_login(&name("alice"), &signed(f.p(), &c, &alice, Form::Dgst), T0 + 2).unwrap();
    assert_eq!(f.db.list().unwrap()[0].password_changed_at, T0 + 1);
}

#[test]
fn the_session_token_is_stored_only_as_its_sha256() {
    let mut f = fx();
    let alice = f.operator("alice");
    let t = f.login("alice", &alice, Form::Dgst, T0).unwrap();
    let raw = hex::decode(t.expose()).unwrap();
    let conn = rusqlite::Connection::open(f.home.operators_db()).unwrap();
    let hashes: Vec<Vec<u8>> =
        conn.prepare("SELECT token_hash FROM sessions").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert_eq!(hashes, vec![Sha256::digest(t.expose().as_bytes()).to_vec()]);
    drop(conn);
    // Neither the text nor the raw bytes are anywhere in the files.
    let mut seen = 0;
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", f.home.operators_db().display()));
        if let Ok(bytes) = std::fs::read(&path) {
            seen += 1;
            assert!(!contains(&bytes, t.expose().as_bytes()), "{} holds the token", path.display());
            assert!(!contains(&bytes, &raw), "{} holds the token bytes", path.display());
        }
    }
    assert!(seen >= 1);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_hash_copied_into_another_installation_does_not_verify() {
    let mut a = fx();
    a.operator("alice");
    let mut b = fx();
    b.operator("alice");
    assert_ne!(a.home.config().pepper, b.home.config().pepper);
    let hash_a: String = rusqlite::Connection::open(a.home.operators_db())
        .unwrap()
        .query_row("SELECT password_hash FROM operators WHERE name = 'alice'", [], |r| r.get(0))
        .unwrap();
    assert!(hash_a.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{hash_a}");
    assert!(!hash_a.contains(&a.home.config().pepper));
    // A DBA of B plants A's hash, whose password they know: useless without
    // A's personalizer.toml.
    let conn = rusqlite::Connection::open(b.home.operators_db()).unwrap();
    conn.execute("UPDATE operators SET password_hash = ?1 WHERE name = 'alice'", [&hash_a]).unwrap();
    drop(conn);
    assert!(matches!(b.db.begin_login(&name("alice"), &pw("alice-pw"), T0), Err(OperatorError::WrongCredentials)));
    // The same row still verifies where its pepper is.
    a.db.begin_login(&name("alice"), &pw("alice-pw"), T0).unwrap();
    // And a second Home over A's database with another pepper refuses it.
    let other_home_dir = a.p().join("other");
    std::fs::create_dir(&other_home_dir).unwrap();
    let other = Home::create(&other_home_dir, ModuleSetting::Keystore(Path::new("keystore")), "laptop-1").unwrap();
    std::fs::copy(a.home.operators_db(), other.operators_db()).unwrap();
    let mut other_db = OperatorDb::open_with_cost(&other, KdfCost::MINIMAL).unwrap();
    assert!(matches!(other_db.begin_login(&name("alice"), &pw("alice-pw"), T0), Err(OperatorError::WrongCredentials)));
}

#[test]
fn the_default_cost_is_recorded_in_the_hash() {
    // Open with the real default, then hash with cheap parameters (fast
    // tests) and check what is recorded.
    let f = fx();
    let mut db = OperatorDb::open(&f.home).unwrap();
    assert_eq!(KdfCost::default(), KdfCost { memory_kib: 65536, iterations: 3, parallelism: 1 });
    assert!(db.set_kdf_cost(KdfCost { memory_kib: 1, iterations: 1, parallelism: 1 }).is_err());
    db.set_kdf_cost(KdfCost { memory_kib: 16, iterations: 2, parallelism: 1 }).unwrap();
    db.add(&name("carol"), &pw("pw"), T0).unwrap();
    let hash: String = rusqlite::Connection::open(f.home.operators_db())
        .unwrap()
        .query_row("SELECT password_hash FROM operators", [], |r| r.get(0))
        .unwrap();
    assert!(hash.starts_with("$argon2id$v=19$m=16,t=2,p=1$"), "{hash}");
}
