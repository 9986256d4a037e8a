//! The personalisation laptop on a PKCS#11 token: a throwaway SoftHSM2
//! token named in personalizer.toml's `[hsm]` table. The same ceremony as
//! on the soft keystore (officers, quorum, key handle, servers' keystore,
//! generation, audit), the handle key generated in the token and never
//! readable there; OTPs made by Debian's `ykgenerate` from the
//! personalisation CSV decode against the exported servers' keystore.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use appliance_tests::tools;
use common::{s, Laptop};
use hsm::admin::KeyAdmin;
use hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use hsm::soft::SoftHsm;
use hsm::{Flags, HandleInfo, Password, SecurityModule};
use ksm::aead_dir::AeadDir;
use ksm::Ksm;
use otp::KeyHandle;

#[test]
fn the_key_ceremony_and_generation_run_on_a_softhsm2_token() {
    let l = Laptop::on_softhsm2().officers();
    let config = std::fs::read_to_string(l.home.join("personalizer.toml")).unwrap();
    assert!(config.contains("[hsm]") && config.contains("type = \"pkcs11\"") && !config.contains("keystore ="), "{config}");

    let create = l.approval("alice", "create-key-handle", "0x2000", &["alice", "bob"]);
    let out = l.ok_as(Some("alice"), &["key-handle", "create", "--key-handle", "0x2000", "--approval", s(&create)]);
    assert!(out.contains("created key handle 0x2000"), "{out}");
    let listed = l.ok_as(Some("bob"), &["key-handle", "list"]);
    assert!(listed.contains("0x2000") && listed.contains("AES-256"), "{listed}");

    // The servers' keystore: decode-only, under its own password.
    let servers = l.path("servers.keystore");
    std::fs::write(l.path("servers.pw"), "servers password\n").unwrap();
    // Bob exports `handle` to `out` under a fresh 2-of-2 approval.
    let export_servers = |handle: &str, out: &Path| {
        let export = l.approval("bob", "export-keystore", handle, &["alice", "bob"]);
        l.ok_as(
            Some("bob"),
            &[
                "key-handle",
                "export-servers",
                "--key-handles",
                handle,
                "--out",
                s(out),
                "--export-password-file",
                s(&l.path("servers.pw")),
                "--kdf-memory-mib",
                "1",
                "--kdf-iterations",
                "1",
                "--approval",
                s(&export),
            ],
        );
    };
    export_servers("0x2000", &servers);

    // A migrated key (pyhsm's key file) joins the token the same way: it
    // can go to the servers too.
    let json = l.path("pyhsm-keys.json");
    std::fs::write(&json, format!("{{\"12288\": \"{}\"}}", "5e".repeat(32))).unwrap();
    let import = l.approval("alice", "import-key-handle", "pyhsm-keys.json", &["alice", "bob"]);
    l.ok_as(Some("alice"), &["key-handle", "import-pyhsm", "--json", s(&json), "--flags", "personalizer", "--approval", s(&import)]);
    let migrated = l.path("migrated.keystore");
    export_servers("0x3000", &migrated);
    let keys = SoftHsm::open_unlocked(&migrated, &Password::new("servers password").unwrap())
        .unwrap()
        .export_handle_keys(&[KeyHandle::new(0x3000)])
        .unwrap();
    assert_eq!(keys[0].2.expose(), [0x5e; 32].as_slice(), "the migrated key, unchanged");

    // Secrets made in the token, wrapped under the handle; the CSV once.
    let (aeads, csv, bundle) = (l.path("aeads"), l.path("secrets.csv"), l.path("keys.bundle"));
    let plaintext = l.plaintext_approval(&[s(&csv)]);
    l.ok_as(
        Some("alice"),
        &[
            "generate",
            "--count",
            "3",
            "--start-public-id",
            "1",
            "--key-handles",
            "0x2000",
            "--out",
            s(&aeads),
            "--bundle",
            s(&bundle),
            "--yubikey-csv",
            s(&csv),
            "--approval",
            &plaintext,
        ],
    );
    // Every step is in the log, checkpoints signed by the key the token
    // sealed (`ok` requires exit 0: the chain and signatures verify).
    l.ok(&["audit", "verify"]);
    let actions: Vec<String> = l.audit_json().iter().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect();
    for a in ["init", "key-handle.create", "key-handle.export-servers", "generate"] {
        assert!(actions.iter().any(|x| x == a), "{a} not in {actions:?}");
    }

    // The token's view: the key was generated there, is sensitive, and can
    // leave only wrapped; its value cannot be read.
    l.softhsm2.as_ref().unwrap().use_in_this_process();
    let token = Pkcs11Hsm::open(Pkcs11Config { pin_file: Some(l.path("token.pin")), ..Pkcs11Config::for_token("laptop") }).unwrap();
    let p = token.key_protection(KeyHandle::new(0x2000)).unwrap();
    assert!(p.local && p.sensitive && p.extractable && !p.value_readable, "{p:?}");
    assert!(token.key_handles().unwrap().contains(&HandleInfo {
        key_handle: KeyHandle::new(0x2000),
        flags: Flags::PERSONALIZER,
        key_bits: 256
    }));

    // YubiKeys programmed from the CSV: their OTPs decode on the servers.
    let servers = SoftHsm::open_unlocked(&servers, &Password::new("servers password").unwrap()).unwrap();
    assert_eq!(servers.key_handles().unwrap()[0].flags, Flags::OTP_DECODE);
    let ksm = Ksm::new(Arc::new(servers), Box::new(AeadDir::new(&aeads)), vec!["0x2000".parse().unwrap()]);
    let ykgenerate = tools::require("ykgenerate", "libyubikey-dev");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 3);
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let counter = 5 + i;
        let out = Command::new(&ykgenerate).args([f[3], f[2], &format!("{counter:04x}"), "c0a8", "3e", "01"]).output().unwrap();
        let otp = format!("{}{}", f[1], String::from_utf8(out.stdout).unwrap().trim());
        assert_eq!(ksm.answer(&otp), format!("OK counter={counter:04x} low=c0a8 high=3e use=01"), "{otp}");
    }
    assert!(Path::new(&bundle).exists());
}
