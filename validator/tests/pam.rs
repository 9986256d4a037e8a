//! Real pam_yubico (Debian's libpam-yubico, with libykclient) against the
//! `validator serve` binary, driven by `pamtester` through throwaway PAM
//! service files (validation-protocol.md §6).
//!
//! Needs root: PAM reads its services from `/etc/pam.d`. CI runs the suite
//! as root; anywhere else these tests fail and say so. Every service file is
//! removed by a guard, also when an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/pam.rs"]
mod pam;
#[path = "oracles/site.rs"]
mod site;

use std::path::PathBuf;

use pam::{require_pam_yubico, require_root, PamService, AUTHINFO_UNAVAIL, AUTH_ERR, SUCCESS, USER_UNKNOWN};
use site::{garbled, Server, Site};

/// pam_yubico's authfile, written by `validator authfile` from a YAML map,
/// giving alice the first YubiKey and bob the second.
fn authfile(site: &Site) -> PathBuf {
    let (alice, bob) = (&site.yubikeys[0].public_id, &site.yubikeys[1].public_id);
    let map = site.dir.path().join("users.yaml");
    std::fs::write(&map, format!("alice: [{alice}]\nbob: {bob}\n")).unwrap();
    let out_file = site.dir.path().join("authfile");
    let out = site.validator(&["authfile", "--map", site::path(&map), "--out", site::path(&out_file), "--store", site::path(&site.store)]);
    assert!(out.status.success(), "validator authfile: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), format!("alice:{alice}\nbob:{bob}\n"));
    out_file
}

/// A site with two YubiKeys (alice's and bob's) and API client 1 (its
/// key), their authfile, `validator serve`, and a PAM service asking it.
fn pam_site() -> (Site, String, PathBuf, Server, PamService) {
    require_root();
    require_pam_yubico();
    let site = Site::new(2);
    let key = site.add_client(1);
    let auth = authfile(&site);
    let server = site.serve();
    let pam = PamService::new(site.dir.path(), 1, &key, &[server.url()], &auth);
    (site, key, auth, server, pam)
}

/// A fresh OTP logs in; the same OTP again, and an older counter, fail
/// with REPLAYED_OTP (PAM_AUTH_ERR); a newer one logs in again; a
/// password typed before the OTP is split off; bob logs in with his own
/// YubiKey. The validator's /metrics agrees with each verdict.
#[test]
fn pam_yubico_logs_in_once_per_otp() {
    let (site, _, _, server, pam) = pam_site();
    let (alice, bob) = (&site.yubikeys[0], &site.yubikeys[1]);

    let fresh = alice.otp(0x0010, 3);
    let before = server.counts();
    pam.login("alice", &fresh)
        .expect(SUCCESS)
        .ykclient_rc(0, "OK")
        .logged("Match user/token as alice/")
        .logged("done. [Success]")
        .logged(&format!("&otp={fresh}&timestamp=1&h="));
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 1)]);

    let before = server.counts();
    pam.login("alice", &fresh).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    assert_eq!(server.moved_since(&before), [("REPLAYED_OTP".to_owned(), 1)]);

    // An OTP the YubiKey made before the accepted one, never sent.
    let before = server.counts();
    pam.login("alice", &alice.otp(0x000f, 9)).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    // Same counter, earlier session use.
    pam.login("alice", &alice.otp(0x0010, 2)).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    assert_eq!(server.moved_since(&before), [("REPLAYED_OTP".to_owned(), 2)]);

    // The next press of the key logs in again.
    let before = server.counts();
    pam.login("alice", &alice.otp(0x0010, 4)).expect(SUCCESS);
    pam.login("alice", &alice.otp(0x0011, 0)).expect(SUCCESS);

    // Password and OTP typed together: pam_yubico keeps the leading bytes
    // as the system password and validates the OTP.
    pam.login("alice", &format!("hunter2{}", alice.otp(0x0011, 1)))
        .expect(SUCCESS)
        .logged("Skipping first 7 bytes")
        .logged("Extracted a probable system password");
    // Bob's own YubiKey.
    pam.login("bob", &bob.otp(0x0001, 0)).expect(SUCCESS).logged("Match user/token as bob/");
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 4)]);

    // A garbled OTP of alice's YubiKey: BAD_OTP, also PAM_AUTH_ERR.
    let before = server.counts();
    pam.login("alice", &garbled(&alice.otp(0x0012, 0))).expect(AUTH_ERR).ykclient_rc(1, "BAD_OTP");
    assert_eq!(server.moved_since(&before), [("BAD_OTP".to_owned(), 1)]);

    drop(pam);
    server.stop();
}

/// The mapping decides before the server is asked: a YubiKey listed for
/// another user, or a user with no YubiKey, fails with no request at all.
/// A wrong client key fails on the server's signature (ykclient rc 107),
/// and a disabled client reads NO_SUCH_CLIENT (signed with its key, so not
/// a signature failure as with yubikey-val).
#[test]
fn pam_yubico_refuses_unmapped_tokens_wrong_keys_and_disabled_clients() {
    let (site, key, auth, server, pam) = pam_site();
    let (alice, bob) = (&site.yubikeys[0], &site.yubikeys[1]);

    // Alice with bob's YubiKey: the token is not hers.
    let bobs = bob.otp(0x0005, 0);
    let before = server.counts();
    pam.login("alice", &bobs).expect(AUTH_ERR).logged("Unauthorized token for this user").no_request();
    // Carol has no YubiKey at all: refused before the prompt is even read.
    pam.login("carol", &alice.otp(0x0005, 0)).expect(USER_UNKNOWN).logged("No tokens found for user").no_request();
    assert_eq!(server.moved_since(&before), [], "a request reached the validator");
    // Bob's OTP was never sent, so it still logs bob in.
    pam.login("bob", &bobs).expect(SUCCESS);

    // A service configured with another key than the client's: the server
    // refuses the request's h (BAD_SIGNATURE, signed with the client's
    // real key), and ykclient, checking with the wrong key, reports the
    // answer's signature as invalid.
    let wrong_key = "AAECAwQFBgcICQoLDA0ODxAREhM=";
    assert_ne!(wrong_key, key);
    let wrong = PamService::new(site.dir.path(), 1, wrong_key, &[server.url()], &auth);
    let otp = alice.otp(0x0006, 0);
    let before = server.counts();
    wrong.login("alice", &otp).expect(AUTHINFO_UNAVAIL).ykclient_rc(107, "BAD_SERVER_SIGNATURE");
    assert_eq!(server.moved_since(&before), [("BAD_SIGNATURE".to_owned(), 1)]);
    // The refused request did not spend the OTP.
    pam.login("alice", &otp).expect(SUCCESS);

    // An unknown client id (its answer is signed with the empty key, as
    // yubikey-val does): a signature failure for pam_yubico.
    let stranger = PamService::new(site.dir.path(), 2, &key, &[server.url()], &auth);
    let before = server.counts();
    stranger.login("alice", &alice.otp(0x0007, 0)).expect(AUTHINFO_UNAVAIL).ykclient_rc(107, "BAD_SERVER_SIGNATURE");
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    // Client 1 disabled while the server runs.
    site.disable_client(1);
    server.wait_for_status(1, &garbled(&alice.otp(0x0100, 0)), "NO_SUCH_CLIENT");
    let before = server.counts();
    pam.login("alice", &alice.otp(0x0007, 0)).expect(AUTHINFO_UNAVAIL).ykclient_rc(5, "NO_SUCH_CLIENT");
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    drop((pam, wrong, stranger));
    let log = server.stop();
    assert!(!log.contains("ERROR"), "the validator logged errors:\n{log}");
}

/// The guard removes its service file even when the test panics.
#[test]
fn pam_service_files_are_removed_on_panic() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = std::panic::catch_unwind(|| {
        let pam = PamService::new(dir.path(), 1, "AAAA", &["http://127.0.0.1:9/wsapi/2.0/verify".to_owned()], &dir.path().join("authfile"));
        assert!(pam.file.is_file());
        std::panic::panic_any(pam.file.clone());
    })
    .unwrap_err()
    .downcast::<PathBuf>()
    .unwrap();
    assert!(file.starts_with("/etc/pam.d") && !file.exists(), "{} left behind", file.display());
}
