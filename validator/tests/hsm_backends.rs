//! `validator serve --config` with an `[hsm]` table: a PKCS#11 token
//! (a throwaway SoftHSM2 token, Debian package `softhsm2`) holding a key
//! handle imported with a known key and the data keys, AEADs made by the
//! soft backend with that key, and an OTP validated, then refused as a
//! replay. A YubiHSM 1 is refused at start: it has no data keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "oracles/site.rs"]
mod site;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use appliance_tests::softhsm2::TokenDir;
use hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use otp::{HandleKey, PublicId, YubiKeySecrets};
use validator::clients::SqliteClients;
use validator::ClientId;

use site::{path, ticket, LoadKey, Server, KH};

const LABEL: &str = "validator-e2e";
const PIN: &str = "2468";
/// The handle key, known to both backends.
const HANDLE_KEY: [u8; 32] = [0x5c; 32];
const CLIENT: u64 = 7;

#[test]
fn validator_serves_from_a_pkcs11_token_chosen_in_toml() {
    let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
    let _slot = tokens.init_token(LABEL, PIN, "1357");
    let root = tokens.root();
    // The only test of this binary; the server inherits it.
    tokens.use_in_this_process();
    let pin_file = root.join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();

    // The token: the known handle key, the data keys, the API client (its
    // key sealed under the token's config data key).
    let db = root.join("validator.db");
    {
        let token = Pkcs11Hsm::open(Pkcs11Config { pin_file: Some(pin_file.clone()), ..Pkcs11Config::for_token(LABEL) }).unwrap();
        token.import_handle_key(KH, Flags::OTP_DECODE, &HandleKey::new(&HANDLE_KEY).unwrap()).unwrap();
        token.create_data_keys().unwrap();
        let clients = SqliteClients::open(&db, Arc::new(token)).unwrap();
        clients.add(Some(ClientId::new(CLIENT).unwrap()), None).unwrap();
    }

    // The AEAD, made by the soft backend holding the same handle key.
    let soft = SoftHsm::create(&root.join("soft.keystore"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    soft.import_handles(&[(KH, Flags::IMPORT | Flags::OTP_DECODE, HandleKey::new(&HANDLE_KEY).unwrap())]).unwrap();
    let id = PublicId::from_number(0x0a0b_0c0d_0e0f, 6).unwrap();
    let plaintext: Vec<u8> = (0u8..22).map(|i| i.wrapping_mul(17).wrapping_add(3)).collect();
    let record = soft.import_aead(KH, NonceSource::Given(id.aead_nonce().unwrap()), &plaintext).unwrap();
    let store = root.join("aeads.db");
    AeadStore::open(&store).unwrap().put(&id, &record, "test", 0).unwrap();
    let yubikey = LoadKey { id, secrets: YubiKeySecrets::from_plaintext(&plaintext).unwrap() };

    let config = root.join("validator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndb = {:?}\n\n[hsm]\ntype = \"pkcs11\"\nmodule = {DEFAULT_MODULE:?}\ntoken_label = {LABEL:?}\npin_file = {:?}\n\n[ksm]\nstore = {:?}\nkey_handles = [\"{}\"]\n",
            path(&db),
            path(&pin_file),
            path(&store),
            KH.canonical()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_validator"));
    cmd.args(["serve", "--config", path(&config)]).env("SOFTHSM2_CONF", tokens.conf()).env("RUST_LOG", "info");
    let server = Server::spawn(cmd);
    let otp = yubikey.otp(ticket(0));
    assert_eq!(server.status_of(CLIENT, &otp), "OK", "{}", server.log());
    // The same OTP again, in a new request (another nonce): a replay.
    let (code, body) = server.get(&format!("/wsapi/2.0/verify?id={CLIENT}&otp={otp}&nonce=anotheranotheranother"));
    assert_eq!(code, 200, "{body}");
    assert!(body.lines().any(|l| l == "status=REPLAYED_OTP"), "{body}\n{}", server.log());
    assert_eq!(server.status_of(CLIENT, &yubikey.otp(ticket(1))), "OK", "{}", server.log());
    let log = server.stop();
    assert!(!log.contains(PIN), "the PIN reached the log:\n{log}");

    // Both an [hsm] table and the older keystore key: refused.
    let both = root.join("both.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&both, format!("keystore = \"ks\"\n{text}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_validator")).args(["serve", "--config", path(&both)]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not both"), "{stderr}");

    // A YubiHSM 1 cannot hold the API client keys: refused before any
    // device is opened.
    let yhsm1 = root.join("yhsm1.toml");
    std::fs::write(
        &yhsm1,
        format!(
            "db = {:?}\n[hsm]\ntype = \"yhsm1\"\ndevice = \"/dev/ttyACM9\"\nkey_handles = [{{ id = \"0x2000\", flags = \"otp-decode\" }}]\n[ksm]\nstore = {:?}\n",
            path(&db),
            path(&store)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_validator")).args(["serve", "--config", path(&yhsm1)]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("a YubiHSM 1 has no data keys: "), "{stderr}");
}
