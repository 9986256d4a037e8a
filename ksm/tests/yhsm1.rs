//! `ksm serve` on a YubiHSM 1 — the `yhsm1-emulator` binary on a pty, which
//! python pyhsm checks in the `hsm` package's tests — chosen with
//! `--hsm-config` (`type = "yhsm1"`), its keystore unlocked with the
//! master key file: the stick decodes OTPs over HTTP, refuses bad ones with
//! verdicts, and once the stick is gone every answer is `ERR Backend error`,
//! never a verdict, and `/health` says so.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use appliance_tests::yhsm1::{emulator_binary, keys_json, Emulator};
use common::Server;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::aead_dir::AeadDir;
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};

const KH: KeyHandle = KeyHandle::new(0x2000);
const KEY: [u8; 32] = [0x6b; 32];
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[test]
fn ksm_serve_decodes_on_a_yubihsm1_and_reports_its_loss_as_a_backend_error() {
    let mut stick = Emulator::start(
        &emulator_binary(),
        &keys_json([(KH.get(), KEY.as_slice())]),
        &["--flags", "0x2000=otp-decode", "--locked", "--master-key", MASTER_KEY],
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // The AEAD of one YubiKey, made by a soft keystore holding the same key.
    let soft = SoftHsm::create(&root.join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    soft.import_handles(&[(KH, Flags::PERSONALIZER, HandleKey::new(&KEY).unwrap())]).unwrap();
    let id = PublicId::from_number(7, 6).unwrap();
    let rec = soft.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
    let secrets = YubiKeySecrets::from_plaintext(&soft.decrypt_aead(&rec).unwrap()).unwrap();
    let aeads = root.join("aeads");
    AeadDir::new(&aeads).write(&KH.into(), &id, &rec).unwrap();

    std::fs::write(root.join("master-key"), format!("{MASTER_KEY}\n")).unwrap();
    let table = root.join("hsm.toml");
    std::fs::write(
        &table,
        format!(
            "[hsm]\ntype = \"yhsm1\"\ndevice = {:?}\nmaster_key_file = {:?}\ntimeout_ms = 2000\nkey_handles = [{{ id = \"0x2000\", flags = \"otp-decode\" }}]\n",
            stick.path().to_str().unwrap(),
            root.join("master-key").to_str().unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(
        &[
            "--hsm-config",
            table.to_str().unwrap(),
            "--aead-dir",
            aeads.to_str().unwrap(),
            "--key-handles",
            "0x2000",
            "--listen",
            "127.0.0.1:0",
            "--request-timeout-ms",
            "3000",
        ],
        &[],
    );

    let otp = |counter: u16, uid: [u8; 6]| {
        let t = TokenFields { uid, counter, session_use: 1, timestamp_low: 0x1234, timestamp_high: 0x56, rnd: 9 }.build();
        Otp::new(id, t.encrypt(&secrets.key)).to_string()
    };
    let good = otp(40, *secrets.uid.expose());
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get(&format!("/wsapi/decrypt?otp={good}")), (200, "OK counter=0028 low=1234 high=56 use=01\n".to_owned()));
    let (_, wrong_uid) = server.get(&format!("/wsapi/decrypt?otp={}", otp(41, [1; 6])));
    assert_eq!(wrong_uid, "ERR Corrupt OTP\n");

    // The stick is pulled: its device path disappears.
    stick.kill();
    assert!(!stick.path().exists());
    for _ in 0..2 {
        let (_, body) = server.get(&format!("/wsapi/decrypt?otp={good}"));
        assert_eq!(body, "ERR Backend error\n", "a lost stick is never a verdict");
        let (_, body) = server.get(&format!("/wsapi/decrypt?otp={}", otp(42, [1; 6])));
        assert_eq!(body, "ERR Backend error\n", "not ERR Corrupt OTP either");
    }
    assert_ne!(server.get("/health").0, 200);
}
