//! The validator's remote-KSM client against a real `ksm serve` on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use ksm::{Ksm, KsmError};
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, OtpDecode, PublicId, YubiKeySecrets};
use validator::remote_ksm::RemoteKsm;
use validator::OtpDecoder;

const KH: KeyHandle = KeyHandle::new(1);

#[test]
fn decodes_through_a_real_ksm_and_tells_verdicts_from_failures() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[9; 32]).unwrap())]).unwrap();
    let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
    let id = PublicId::from_number(42, 6).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
    store.put(&id, &rec, "test", 0).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
    let otp = |id: PublicId, counter: u16| {
        let t =
            TokenFields { uid: *secrets.uid.expose(), counter, session_use: 3, timestamp_low: 0x0102, timestamp_high: 4, rnd: 5 }.build();
        Otp::new(id, t.encrypt(&secrets.key)).to_string()
    };
    let ksm = Ksm::new(Arc::new(hsm), Box::new(store), vec![KH.into()]);
    let server = ksm::serve::start(Arc::new(ksm), ksm::serve::HttpOptions::new("127.0.0.1:0".parse().unwrap())).unwrap();
    let url = format!("http://{}/wsapi/decrypt?otp=", server.local_addr());
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/wsapi/decrypt?otp=", l.local_addr().unwrap())
    };

    let remote = RemoteKsm::new(std::slice::from_ref(&url), Duration::from_secs(2)).unwrap();
    let want = OtpDecode { use_ctr: 7, session_ctr: 3, timestamp_high: 4, timestamp_low: 0x0102 };
    for _ in 0..3 {
        // Kept-alive connections are reused across calls.
        assert_eq!(remote.decode(&otp(id, 7)).unwrap(), want);
    }
    let stranger = PublicId::from_number(43, 6).unwrap();
    assert!(matches!(remote.decode(&otp(stranger, 1)), Err(KsmError::UnknownYubikey(p)) if p == stranger));
    let mut garbled = otp(id, 1);
    let flipped = if &garbled[20..21] == "c" { "b" } else { "c" };
    garbled.replace_range(20..21, flipped);
    assert!(matches!(remote.decode(&garbled), Err(KsmError::CorruptOtp(_))));

    // The first OK wins even when another KSM is down ...
    let both = RemoteKsm::new(&[dead.clone(), url.clone()], Duration::from_secs(2)).unwrap();
    assert_eq!(both.decode(&otp(id, 8)).unwrap().use_ctr, 8);
    // ... but "unknown" is not believed while a KSM that might know is down.
    let e = both.decode(&otp(stranger, 1)).unwrap_err();
    assert!(e.is_backend_failure(), "{e:?}");
    // Nothing listening at all: a backend failure, never a verdict.
    let none = RemoteKsm::new(&[dead], Duration::from_millis(500)).unwrap();
    assert!(none.decode(&otp(id, 9)).unwrap_err().is_backend_failure());
    server.shutdown();
    // The KSM gone: the kept-alive connection fails and so does a reconnect.
    assert!(remote.decode(&otp(id, 10)).unwrap_err().is_backend_failure());
}
