//! The `SecurityModule` conformance suite, written once and instantiated per
//! backend (STYLE.md §11.7).
//!
//! Backends:
//! - `soft`: the software keystore in a temporary directory;
//! - `yhsm1`: the serial backend on the `yhsm1-emulator` binary's pty (a
//!   separate process, killed to pull the device);
//! - `pkcs11`: the PKCS#11 backend on a throwaway SoftHSM2 token (Debian
//!   package `softhsm2`, installed by `scripts/test.sh`), each check in a
//!   child process of this binary with its own `SOFTHSM2_CONF`;
//! - `pkcs11_key_in_token`: the same with `decode = "key-in-token"` (each
//!   AEAD converted to a token-wrapped key on its first decode, the OTP
//!   decrypted inside the token).
//!
//! Layout:
//! - [`HANDLES`]: the key handles every backend is provisioned with (known
//!   keys, so results can be cross-checked against `otp` directly);
//! - **backend setups** (`soft`, `yhsm1`, `pkcs11`): the only
//!   backend-specific code. Each is a `fn(&[HandleSpec]) -> Fixture` that
//!   provisions the handles with the backend's own admin API and says how to
//!   get a fresh, still locked instance of the same module, how to take the
//!   device away and bring it back, and what the backend can do ([`Caps`]);
//! - the checks: plain functions over a [`Setup`]. Where a backend
//!   legitimately lacks a capability (a YubiHSM 1 cannot export AEADs, has
//!   no data keys, cannot list its handles), a check asserts the documented
//!   refusal there and the full behaviour elsewhere;
//! - [`backend_suite!`]: turns the checks into one `#[test]` each for a
//!   setup, in a module named after the backend, run by [`in_process`] or
//!   [`own_process`].
//!
//! To add a backend: write `fn name(handles: &[HandleSpec]) -> Fixture` and
//! add `backend_suite!(name, name, in_process);` after the others (optional
//! `#[attributes]` at the end apply to every test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::any::Any;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use appliance_tests::softhsm2::TokenDir;
use appliance_tests::yhsm1::{keys_json, Emulator};
use hsm::pkcs11::{DecodeMode, Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::yhsm1::client::{Yhsm1, Yhsm1Options};
use hsm::{DataKey, Error, Flags, HandleInfo, NonceSource, OtpFault, Password, SecurityModule, Status};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{Aead, AeadNonce, HandleKey, KeyHandle, PublicId, TokenCiphertext, YubiKeySecrets};

// ---------------------------------------------------------------------------
// What every backend holds.

/// One key handle to provision: id, flags and the AES key.
#[derive(Clone, Copy, Debug)]
pub struct HandleSpec {
    /// The handle.
    pub kh: KeyHandle,
    /// Its flags.
    pub flags: Flags,
    /// Its AES key (16, 24 or 32 bytes).
    pub key: &'static [u8],
}

/// What a backend can do, where backends legitimately differ. A check that
/// touches one of these asserts the full behaviour where the capability is
/// present and the documented refusal where it is not, so it tests something
/// either way.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// `decrypt_aead` returns plaintexts. Without it (a YubiHSM 1 has no such
    /// command) every call is [`Error::NotPermitted`] needing
    /// [`Flags::EXPORT`], and the suite opens AEADs in software with the
    /// known handle keys instead.
    pub export: bool,
    /// `encrypt_value` / `decrypt_value` work. Without them every call is
    /// [`Error::InvalidInput`] (not a backend failure).
    pub data_keys: bool,
    /// `key_handles` reads the module. Without it (a YubiHSM 1 cannot list
    /// its handles) it returns the configured handles, also while locked.
    pub lists_handles: bool,
    /// An OTP refusal says whether the CRC or the private id failed. Without
    /// it (the device answers one `OTP_INVALID`) every refusal is
    /// [`OtpFault::Crc`].
    pub otp_fault_detail: bool,
    /// A wrong password given to an unlocked module leaves it unlocked.
    /// Without it (a YubiHSM 1's wrong master key locks the keystore) the
    /// module is locked until the right one is given.
    pub wrong_password_keeps_unlocked: bool,
    /// A device that comes back after a fault is usable from the same
    /// process. Without it (SoftHSM2 keeps a pulled token's slot broken for
    /// the life of the process) modules in the process stay backend
    /// failures, and a new process is needed.
    pub recovers_in_process: bool,
}

/// Every capability.
const ALL_CAPS: Caps = Caps {
    export: true,
    data_keys: true,
    lists_handles: true,
    otp_fault_detail: true,
    wrong_password_keeps_unlocked: true,
    recovers_in_process: true,
};

/// A provisioned, unlocked module.
pub struct Fixture {
    /// The module, [`Status::Ready`], holding every [`HANDLES`] entry.
    pub hsm: Box<dyn SecurityModule>,
    /// The password (PIN, master key) that unlocks it.
    pub password: Password,
    /// A password of the right form that does not unlock it.
    pub wrong_password: Password,
    /// A fresh instance of the *same* module (same keys), not yet unlocked.
    pub reopen_locked: Box<dyn Fn() -> Box<dyn SecurityModule>>,
    /// Take the device away under the running module (kill the serial peer,
    /// delete the token, arm the soft module's fault injector).
    pub fault: Box<dyn Fn()>,
    /// Bring the device back (a restarted emulator, the token directory put
    /// back, the fault cleared) and open a new, unlocked instance on it with
    /// the same handle keys.
    pub recover: Box<dyn Fn() -> Result<Box<dyn SecurityModule>, Error>>,
    /// What it can do.
    pub caps: Caps,
    /// Whatever must outlive the module (a temporary directory, a device
    /// emulator process). Dropped last.
    pub _keep: Box<dyn Any>,
}

/// A backend setup.
pub type Setup = fn(&[HandleSpec]) -> Fixture;

const fn kh(n: u32) -> KeyHandle {
    KeyHandle::new(n)
}

/// `000102…1f`: the key of reference vector 5 (otp-and-aead.md §2.2).
const KEY_VECTOR: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
    0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const KEY_128: &[u8] = &[0x09; 16];
const KEY_192: &[u8] = &[0x5a; 24];
const KEY_PERSO: &[u8] = &[0x20; 32];
const KEY_DECODE: &[u8] = &[0x21; 32];
const KEY_OTHER: &[u8] = &[0x77; 32];
/// `20002000…`: the key of reference vectors 1 to 3.
const KEY_2000: &[u8] = &[
    0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0, 0x20, 0,
    0x20, 0,
];

/// Every flag an AEAD operation can use.
const FULL: Flags = Flags::from_bits(
    Flags::AEAD_GENERATE.bits()
        | Flags::BUFFER_AEAD_GENERATE.bits()
        | Flags::RANDOM_AEAD_GENERATE.bits()
        | Flags::OTP_DECODE.bits()
        | Flags::EXPORT.bits()
        | Flags::USER_NONCE.bits()
        | Flags::BUFFER_LOAD.bits(),
);

/// Full handles with AES-256 (the vector key), AES-128 and AES-192.
const KH_VECTOR: KeyHandle = kh(1);
const KH_128: KeyHandle = kh(2);
const KH_192: KeyHandle = kh(3);
/// Holds the same AES key as [`KH_VECTOR`].
const KH_TWIN: KeyHandle = kh(4);
/// [`Flags::PERSONALIZER`].
const KH_PERSO: KeyHandle = kh(0x20);
/// [`Flags::OTP_DECODE`] only.
const KH_DECODE: KeyHandle = kh(0x21);
/// Everything but [`Flags::USER_NONCE`].
const KH_NO_USER_NONCE: KeyHandle = kh(0x22);
/// [`Flags::IMPORT`]: wraps via BUFFER_LOAD + BUFFER_AEAD_GENERATE.
const KH_IMPORT: KeyHandle = kh(0x23);
/// [`Flags::AEAD_GENERATE`] + USER_NONCE: wraps host data, cannot generate.
const KH_AEAD_GEN: KeyHandle = kh(0x24);
/// No flags at all.
const KH_NONE: KeyHandle = kh(0x25);
/// Holds the key of reference vectors 1 to 3 (`2000…`).
const KH_2000: KeyHandle = kh(0x2000);
/// Not provisioned.
const KH_UNKNOWN: KeyHandle = kh(0x99);

/// The handles every backend is provisioned with.
pub const HANDLES: &[HandleSpec] = &[
    HandleSpec { kh: KH_VECTOR, flags: FULL, key: KEY_VECTOR },
    HandleSpec { kh: KH_128, flags: FULL, key: KEY_128 },
    HandleSpec { kh: KH_192, flags: FULL, key: KEY_192 },
    HandleSpec { kh: KH_TWIN, flags: FULL, key: KEY_VECTOR },
    HandleSpec { kh: KH_PERSO, flags: Flags::PERSONALIZER, key: KEY_PERSO },
    HandleSpec { kh: KH_DECODE, flags: Flags::OTP_DECODE, key: KEY_DECODE },
    HandleSpec { kh: KH_NO_USER_NONCE, flags: Flags::from_bits(FULL.bits() & !Flags::USER_NONCE.bits()), key: KEY_OTHER },
    HandleSpec { kh: KH_IMPORT, flags: Flags::IMPORT, key: KEY_OTHER },
    HandleSpec { kh: KH_AEAD_GEN, flags: Flags::from_bits(Flags::AEAD_GENERATE.bits() | Flags::USER_NONCE.bits()), key: KEY_OTHER },
    HandleSpec { kh: KH_NONE, flags: Flags::NONE, key: KEY_OTHER },
    HandleSpec { kh: KH_2000, flags: FULL, key: KEY_2000 },
];

fn spec(k: KeyHandle) -> HandleSpec {
    *HANDLES.iter().find(|s| s.kh == k).expect("handle in HANDLES")
}

/// The key of a provisioned handle, computed outside the module.
fn handle_key(k: KeyHandle) -> HandleKey {
    HandleKey::new(spec(k).key).unwrap()
}

// ---------------------------------------------------------------------------
// Backend setups: the only backend-specific code.

const SOFT_PASSWORD: &str = "correct horse battery staple";

/// The software keystore in a temporary directory, with cheap KDF
/// parameters. Its faults come from its own fault injector (every operation
/// fails with EIO, as a dead device would).
fn soft(handles: &[HandleSpec]) -> Fixture {
    use hsm::soft::format::KdfParams;
    use hsm::soft::SoftHsm;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore");
    let password = Password::new(SOFT_PASSWORD).unwrap();
    let hsm = SoftHsm::create(&path, &password, KdfParams::INSECURE_FOR_TESTS).unwrap();
    let new: Vec<(KeyHandle, Flags, HandleKey)> = handles.iter().map(|s| (s.kh, s.flags, HandleKey::new(s.key).unwrap())).collect();
    hsm.import_handles(&new).unwrap();
    let (inject, clear) = (hsm.faults().clone(), hsm.faults().clone());
    let (reopen_path, recover_path) = (path.clone(), path);
    Fixture {
        hsm: Box::new(hsm),
        password,
        wrong_password: Password::new("not the password").unwrap(),
        reopen_locked: Box::new(move || Box::new(SoftHsm::open(&reopen_path).unwrap())),
        fault: Box::new(move || inject.fail_all()),
        recover: Box::new(move || {
            clear.clear();
            Ok(Box::new(SoftHsm::open_unlocked(&recover_path, &Password::new(SOFT_PASSWORD).unwrap())?))
        }),
        caps: ALL_CAPS,
        _keep: Box::new(dir),
    }
}

/// The YubiHSM 1 emulator's master key (the keystore password in hex).
const MASTER_KEY_HEX: &str = "2b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56a784d9045190cfe";

/// A `yhsm1-emulator` with `handles` and their flags, its keystore locked
/// under [`MASTER_KEY_HEX`].
fn emulator(handles: &[HandleSpec]) -> Emulator {
    let keys = keys_json(handles.iter().map(|s| (s.kh.get(), s.key)));
    let mut args = vec!["--locked".to_owned(), "--master-key".to_owned(), MASTER_KEY_HEX.to_owned()];
    for s in handles {
        args.extend(["--flags".to_owned(), format!("{:#x}={:#010x}", s.kh.get(), s.flags.bits())]);
    }
    Emulator::start(Path::new(env!("CARGO_BIN_EXE_yhsm1-emulator")), &keys, &args)
}

/// The handles as configured for the client (a YubiHSM 1 cannot list them).
fn yhsm1_options(handles: &[HandleSpec]) -> Yhsm1Options {
    Yhsm1Options {
        timeout: Duration::from_secs(5),
        handles: handles.iter().map(|s| HandleInfo { key_handle: s.kh, flags: s.flags, key_bits: s.key.len() * 8 }).collect(),
    }
}

/// A client on `emu`, its keystore unlocked with the master key.
fn yhsm1_unlocked(emu: &Emulator, handles: &[HandleSpec]) -> Yhsm1 {
    let hsm = Yhsm1::open(emu.path(), yhsm1_options(handles)).unwrap();
    assert_eq!(hsm.status(), Status::Locked, "the emulator starts locked");
    hsm.unlock(&Password::new(MASTER_KEY_HEX).unwrap()).unwrap();
    hsm
}

/// The serial backend on the `yhsm1-emulator` binary's pty. The port is
/// opened exclusively and the keystore lock belongs to the device, so a
/// "reopened" module is a second emulator with the same keys, started
/// locked; a fault kills the emulator process; recovery starts another.
fn yhsm1(handles: &[HandleSpec]) -> Fixture {
    let handles = handles.to_vec();
    let emulators = Rc::new(RefCell::new(vec![emulator(&handles)]));
    let hsm = yhsm1_unlocked(&emulators.borrow()[0], &handles);
    let reopen_locked = {
        let (emulators, handles) = (Rc::clone(&emulators), handles.clone());
        move || {
            let emu = emulator(&handles);
            let hsm = Yhsm1::open(emu.path(), yhsm1_options(&handles)).unwrap();
            emulators.borrow_mut().push(emu);
            Box::new(hsm) as Box<dyn SecurityModule>
        }
    };
    let fault = {
        let emulators = Rc::clone(&emulators);
        move || emulators.borrow_mut()[0].kill()
    };
    let recover = {
        let (emulators, handles) = (Rc::clone(&emulators), handles);
        move || {
            let emu = emulator(&handles);
            let hsm = Yhsm1::open(emu.path(), yhsm1_options(&handles))?;
            emulators.borrow_mut().push(emu);
            hsm.unlock(&Password::new(MASTER_KEY_HEX).unwrap())?;
            Ok(Box::new(hsm) as Box<dyn SecurityModule>)
        }
    };
    Fixture {
        hsm: Box::new(hsm),
        password: Password::new(MASTER_KEY_HEX).unwrap(),
        wrong_password: Password::new("0badc0de").unwrap(),
        reopen_locked: Box::new(reopen_locked),
        fault: Box::new(fault),
        recover: Box::new(recover),
        caps: Caps {
            export: false,
            data_keys: false,
            lists_handles: false,
            otp_fault_detail: false,
            wrong_password_keeps_unlocked: false,
            recovers_in_process: true,
        },
        _keep: Box::new(emulators),
    }
}

const PKCS11_PIN: &str = "246810";
const PKCS11_SO_PIN: &str = "13579";

/// A new SoftHSM2 token labelled `label`, a module on it unlocked with the
/// PIN, the handle keys loaded with the explicit import.
fn pkcs11_token(tokens: &TokenDir, label: &str, handles: &[HandleSpec], decode: DecodeMode) -> (Pkcs11Config, Pkcs11Hsm) {
    let _slot = tokens.init_token(label, PKCS11_PIN, PKCS11_SO_PIN);
    let config = Pkcs11Config { decode, ..Pkcs11Config::for_token(label) };
    let hsm = Pkcs11Hsm::new(config.clone()).unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    hsm.unlock(&Password::new(PKCS11_PIN).unwrap()).unwrap();
    for s in handles {
        hsm.import_handle_key(s.kh, s.flags, &HandleKey::new(s.key).unwrap()).unwrap();
    }
    hsm.create_data_keys().unwrap();
    (config, hsm)
}

/// The PKCS#11 backend on a throwaway SoftHSM2 token. SoftHSM2 reads
/// `SOFTHSM2_CONF` once per process and a deleted token upsets its slot list
/// for the whole process, so each check runs in a process of its own
/// ([`own_process`]) with its own token directory. A fault deletes the
/// token; recovery initialises another one with the same keys.
fn pkcs11(handles: &[HandleSpec]) -> Fixture {
    pkcs11_decoding(handles, DecodeMode::Ccm)
}

/// The same with `decode = "key-in-token"`: each AEAD converted on its
/// first decode, the OTP decrypted inside the token.
fn pkcs11_key_in_token(handles: &[HandleSpec]) -> Fixture {
    pkcs11_decoding(handles, DecodeMode::KeyInToken)
}

fn pkcs11_decoding(handles: &[HandleSpec], decode: DecodeMode) -> Fixture {
    assert!(std::env::var_os(CHILD_VAR).is_some(), "the pkcs11 setup runs only in a process of its own");
    let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
    // Before the module is first loaded; this process runs one test only.
    tokens.use_in_this_process();
    let (config, hsm) = pkcs11_token(&tokens, "suite", handles, decode);
    // The token's directory (SoftHSM2 names it by a UUID), and where a fault
    // moves it.
    let token_dir = std::fs::read_dir(tokens.tokens()).unwrap().next().unwrap().unwrap().path();
    let away = tokens.root().join("token-pulled");
    let (pull, put_back) = ((token_dir.clone(), away.clone()), (away, token_dir));
    let recover_config = config.clone();
    let recover_conf = tokens.conf().to_owned();
    Fixture {
        hsm: Box::new(hsm),
        password: Password::new(PKCS11_PIN).unwrap(),
        wrong_password: Password::new("000000").unwrap(),
        reopen_locked: Box::new(move || Box::new(Pkcs11Hsm::new(config.clone()).unwrap())),
        fault: Box::new(move || std::fs::rename(&pull.0, &pull.1).unwrap()),
        recover: Box::new(move || {
            std::fs::rename(&put_back.0, &put_back.1).unwrap();
            // The token is back for a new process (a restarted service)...
            pkcs11_check_in_new_process(&recover_conf);
            // ...not for this one.
            let hsm = Pkcs11Hsm::new(recover_config.clone())?;
            hsm.unlock(&Password::new(PKCS11_PIN).unwrap())?;
            Ok(Box::new(hsm) as Box<dyn SecurityModule>)
        }),
        caps: Caps { recovers_in_process: false, ..ALL_CAPS },
        _keep: Box::new(tokens),
    }
}

/// Set, to a `SOFTHSM2_CONF`, in the child process that runs
/// [`pkcs11_token_back_in_a_new_process`].
const RECOVER_CONF_VAR: &str = "OTP_APPLIANCE_BACKEND_SUITE_RECOVER_CONF";
const RECOVER_TEST: &str = "pkcs11_token_back_in_a_new_process";

/// Run [`pkcs11_token_back_in_a_new_process`] on the token of `conf` in a
/// child process; it must pass.
fn pkcs11_check_in_new_process(conf: &Path) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([RECOVER_TEST, "--exact", "--nocapture", "--test-threads=1", "--ignored"])
        .env(CHILD_VAR, RECOVER_TEST)
        .env(RECOVER_CONF_VAR, conf)
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "the token put back does not work in a new process:\n{text}");
}

/// After a fault and the token's return: a new process opens it with the
/// same keys and gets the right verdicts on the fault check's inputs.
#[test]
#[ignore = "run by pkcs11::fault_is_a_backend_error_then_recovers in a child process"]
fn pkcs11_token_back_in_a_new_process() {
    let Some(conf) = std::env::var_os(RECOVER_CONF_VAR) else {
        // Run by hand (`--ignored`): run the fault check that runs this.
        let name = "pkcs11::fault_is_a_backend_error_then_recovers";
        return own_process(name, || panic!("{name} runs in a child process"));
    };
    std::env::set_var("SOFTHSM2_CONF", conf);
    let hsm = Pkcs11Hsm::new(Pkcs11Config::for_token("suite")).unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    hsm.unlock(&Password::new(PKCS11_PIN).unwrap()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    let listed = hsm.key_handles().unwrap();
    assert_eq!(listed.len(), HANDLES.len());
    let (rec, good, tampered, bad_otp) = fault_inputs();
    assert_eq!(hsm.decode_otp(&rec, &good).unwrap().use_ctr, 21);
    assert!(matches!(hsm.decode_otp(&tampered, &good), Err(Error::AeadInvalid(_))));
    assert!(matches!(hsm.decode_otp(&rec, &bad_otp), Err(Error::OtpInvalid(_))));
}

// ---------------------------------------------------------------------------
// The suite.

/// Instantiate every check for one backend setup: `backend_suite!(name,
/// setup_fn, runner, #[attributes applied to every test]*)`, where the
/// runner is [`in_process`] or [`own_process`].
macro_rules! backend_suite {
    ($name:ident, $setup:ident, $runner:ident $(, #[$attr:meta])* $(,)?) => {
        mod $name {
            backend_suite!(@tests $name, $setup, $runner, [$(#[$attr])*],
                key_handles_listed,
                random_fills_and_differs,
                generate_wraps_one_secret_under_every_handle,
                generate_with_random_nonce,
                generate_produces_fresh_secrets,
                generated_secret_decodes_otps,
                aead_bound_to_key_handle_and_nonce,
                import_matches_otp_seal,
                import_reference_vector_5,
                aeads_identical_to_the_soft_backend,
                import_rejects_bad_plaintext_length,
                decode_only_handle_only_decodes,
                personalizer_handle_cannot_decode,
                user_nonce_flag_enforced,
                import_flag_alternatives,
                handle_without_flags_can_do_nothing,
                all_or_nothing_generate,
                tampered_aead_is_invalid,
                bad_otps_are_verdicts,
                decode_refuses_non_yubikey_aead,
                unknown_key_handle,
                values_round_trip,
                values_bound_to_purpose,
                tampered_values_are_invalid,
                locked_until_unlocked,
                fault_is_a_backend_error_then_recovers,
            );
        }
    };
    (@tests $name:ident, $setup:ident, $runner:ident, $attrs:tt, $($test:ident),* $(,)?) => {
        $( backend_suite!(@one $name, $setup, $runner, $attrs, $test); )*
    };
    (@one $name:ident, $setup:ident, $runner:ident, [$(#[$attr:meta])*], $test:ident) => {
        #[test]
        $(#[$attr])*
        fn $test() {
            super::$runner(concat!(stringify!($name), "::", stringify!($test)), || super::$test(super::$setup));
        }
    };
}

/// Set (to the test's name) in a child process running one check.
const CHILD_VAR: &str = "OTP_APPLIANCE_BACKEND_SUITE_CHILD";

/// Run the check in this test process.
fn in_process(_name: &str, check: impl FnOnce()) {
    check();
}

/// Run the check in a child process of this test binary that runs this one
/// test only (for backends with process-wide state, such as a PKCS#11
/// module initialised once per process).
fn own_process(name: &str, check: impl FnOnce()) {
    if std::env::var(CHILD_VAR).as_deref() == Ok(name) {
        return check();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
        .env(CHILD_VAR, name)
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{name} failed in its child process:\n{text}");
}

backend_suite!(soft, soft, in_process);
backend_suite!(yhsm1, yhsm1, in_process);
backend_suite!(pkcs11, pkcs11, own_process);
backend_suite!(pkcs11_key_in_token, pkcs11_key_in_token, own_process);

// ---------------------------------------------------------------------------
// Helpers.

/// The public id used as a nonce in these tests, and its nonce.
fn public_id() -> PublicId {
    PublicId::from_modhex("vvccccbbdd").unwrap()
}

fn public_nonce() -> AeadNonce {
    public_id().aead_nonce().unwrap()
}

fn assert_not_permitted(e: Error, handle: KeyHandle, needs: Flags) {
    assert!(e.is_backend_failure(), "NotPermitted is a backend failure: {e:?}");
    match e {
        Error::NotPermitted { key_handle, needs: n, .. } => {
            assert_eq!(key_handle, handle);
            assert!(n.contains(needs), "needs {n} should include {needs}");
        }
        other => panic!("expected NotPermitted for {handle}, got {other:?}"),
    }
}

fn assert_aead_invalid(r: Result<impl std::fmt::Debug, Error>, what: &str) {
    match r {
        Err(e @ Error::AeadInvalid(_)) => assert!(!e.is_backend_failure(), "{what}: a verdict is not a backend failure"),
        other => panic!("{what}: expected AeadInvalid, got {other:?}"),
    }
}

/// An AEAD's plaintext, exported by the module; where the module cannot
/// export, its documented refusal is checked and the AEAD is opened in
/// software with the known handle key.
fn plaintext(f: &Fixture, rec: &AeadRecord) -> Vec<u8> {
    if f.caps.export {
        return f.hsm.decrypt_aead(rec).unwrap().to_vec();
    }
    assert_not_permitted(f.hsm.decrypt_aead(rec).unwrap_err(), rec.key_handle, Flags::EXPORT);
    handle_key(rec.key_handle).open(rec.key_handle, &rec.nonce, &rec.aead).unwrap().to_vec()
}

/// Export of a bad AEAD: refused as invalid, or (no export) not permitted.
fn assert_export_invalid(f: &Fixture, rec: &AeadRecord, what: &str) {
    if f.caps.export {
        assert_aead_invalid(f.hsm.decrypt_aead(rec), what);
    } else {
        assert_not_permitted(f.hsm.decrypt_aead(rec).unwrap_err(), rec.key_handle, Flags::EXPORT);
    }
}

/// Without data keys: check every value operation is refused and say so.
fn refuses_values(f: &Fixture) -> bool {
    if f.caps.data_keys {
        return false;
    }
    for key in DataKey::ALL {
        assert_no_data_keys(f.hsm.encrypt_value(key, b"a value"), &format!("encrypt_value {key:?}"));
        assert_no_data_keys(f.hsm.decrypt_value(key, &[1; 45]), &format!("decrypt_value {key:?}"));
    }
    true
}

/// The refusal of a module without data keys.
fn assert_no_data_keys(r: Result<impl std::fmt::Debug, Error>, what: &str) {
    match r {
        Err(e @ Error::InvalidInput(_)) => assert!(!e.is_backend_failure(), "{what}"),
        other => panic!("{what}: expected InvalidInput (no data keys), got {other:?}"),
    }
}

fn token(secrets: &YubiKeySecrets, counter: u16, session_use: u8, ts: u32) -> TokenCiphertext {
    let fields = TokenFields {
        uid: *secrets.uid.expose(),
        counter,
        timestamp_low: (ts & 0xffff) as u16,
        timestamp_high: (ts >> 16) as u8,
        session_use,
        rnd: 0x1234,
    };
    fields.build().encrypt(&secrets.key)
}

/// A YubiKey AEAD from the module, plus its secrets (exported).
fn yubikey(f: &Fixture, handle: KeyHandle) -> (AeadRecord, YubiKeySecrets) {
    let rec = f.hsm.generate_yubikey_aeads(&[handle], NonceSource::Given(public_nonce())).unwrap().remove(0);
    let plain = plaintext(f, &rec);
    (rec, YubiKeySecrets::from_plaintext(&plain).unwrap())
}

/// Every AEAD operation, by name, against one handle.
fn every_aead_operation(f: &Fixture, handle: KeyHandle) -> Vec<(&'static str, Result<(), Error>)> {
    let rec = AeadRecord {
        key_handle: handle,
        nonce: public_nonce(),
        aead: handle_key(KH_VECTOR).seal(handle, &public_nonce(), &[7; 22]).unwrap(),
    };
    let tok = TokenCiphertext::new([0; 16]);
    vec![
        ("generate/given", f.hsm.generate_yubikey_aeads(&[handle], NonceSource::Given(public_nonce())).map(drop)),
        ("generate/random", f.hsm.generate_yubikey_aeads(&[handle], NonceSource::Random).map(drop)),
        ("import/given", f.hsm.import_aead(handle, NonceSource::Given(public_nonce()), &[1; 22]).map(drop)),
        ("import/random", f.hsm.import_aead(handle, NonceSource::Random, &[1; 22]).map(drop)),
        ("decode", f.hsm.decode_otp(&rec, &tok).map(drop)),
        ("export", f.hsm.decrypt_aead(&rec).map(drop)),
    ]
}

// ---------------------------------------------------------------------------
// Checks.

fn key_handles_listed(setup: Setup) {
    let f = setup(HANDLES);
    assert_eq!(f.hsm.status(), Status::Ready);
    let listed = f.hsm.key_handles().unwrap();
    for s in HANDLES {
        let info = listed.iter().find(|i| i.key_handle == s.kh).unwrap_or_else(|| panic!("{} not listed", s.kh));
        assert_eq!(info.flags, s.flags, "{}", s.kh);
        assert_eq!(info.key_bits, s.key.len() * 8, "{}", s.kh);
    }
    assert!(listed.iter().all(|i| i.key_handle != KH_UNKNOWN));
}

fn random_fills_and_differs(setup: Setup) {
    let f = setup(HANDLES);
    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    f.hsm.random(&mut a).unwrap();
    f.hsm.random(&mut b).unwrap();
    assert_ne!(a, [0; 64]);
    assert_ne!(a, b);
    f.hsm.random(&mut []).unwrap();
}

fn generate_wraps_one_secret_under_every_handle(setup: Setup) {
    let f = setup(HANDLES);
    let handles = [KH_VECTOR, KH_128, KH_192, KH_TWIN, KH_PERSO];
    let recs = f.hsm.generate_yubikey_aeads(&handles, NonceSource::Given(public_nonce())).unwrap();
    assert_eq!(recs.len(), handles.len());
    let mut secret: Option<Vec<u8>> = None;
    for (rec, handle) in recs.iter().zip(handles) {
        assert_eq!(rec.key_handle, handle, "records come in the order of the handles");
        assert_eq!(rec.nonce, public_nonce(), "a given nonce is used as is");
        assert_eq!(rec.aead.len(), otp::aead::YUBIKEY_AEAD_LEN);
        let plain = plaintext(&f, rec);
        assert_eq!(plain.len(), otp::secrets::SECRETS_LEN);
        // The AEAD is a genuine YubiHSM 1 AEAD: it opens in software too.
        assert_eq!(*handle_key(handle).open(handle, &rec.nonce, &rec.aead).unwrap(), *plain);
        match &secret {
            None => secret = Some(plain.to_vec()),
            Some(s) => assert_eq!(s[..], plain[..], "every AEAD wraps the same secret ({handle})"),
        }
    }
    let secret = secret.unwrap();
    assert_ne!(secret[..16], [0; 16], "the YubiKey key is random");
    assert_ne!(secret[16..], [0; 6], "the private id is random");
    // Same key, other handle: the AEADs still differ (the handle is in the CCM nonce).
    assert_ne!(recs[0].aead, recs[3].aead);
    assert!(f.hsm.generate_yubikey_aeads(&[], NonceSource::Random).is_err(), "no handles");
}

fn generate_with_random_nonce(setup: Setup) {
    let f = setup(HANDLES);
    let handles = [KH_VECTOR, KH_PERSO];
    let a = f.hsm.generate_yubikey_aeads(&handles, NonceSource::Random).unwrap();
    let b = f.hsm.generate_yubikey_aeads(&handles, NonceSource::Random).unwrap();
    for rec in a.iter().chain(&b) {
        assert!(!rec.nonce.is_zero(), "a random nonce is never zero");
        assert_ne!(rec.nonce, public_nonce());
        let plain = plaintext(&f, rec);
        assert_eq!(*handle_key(rec.key_handle).open(rec.key_handle, &rec.nonce, &rec.aead).unwrap(), *plain);
    }
    assert_ne!(a[0].nonce, b[0].nonce, "random nonces differ between calls");
    assert_ne!(a[1].nonce, b[1].nonce, "random nonces differ between calls");
    assert_eq!(plaintext(&f, &a[0]), plaintext(&f, &a[1]));
    // An all-zero given nonce means "the module chooses": a random one.
    let z = f.hsm.generate_yubikey_aeads(&[KH_VECTOR], NonceSource::Given(AeadNonce::new([0; 6]))).unwrap();
    assert!(!z[0].nonce.is_zero());
    plaintext(&f, &z[0]);
}

fn generate_produces_fresh_secrets(setup: Setup) {
    let f = setup(HANDLES);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let rec = f.hsm.generate_yubikey_aeads(&[KH_VECTOR], NonceSource::Given(public_nonce())).unwrap();
        assert!(seen.insert(plaintext(&f, &rec[0])), "secret repeated");
    }
}

fn generated_secret_decodes_otps(setup: Setup) {
    let f = setup(HANDLES);
    let handles = [KH_VECTOR, KH_128, KH_192, KH_TWIN];
    let recs = f.hsm.generate_yubikey_aeads(&handles, NonceSource::Given(public_nonce())).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&plaintext(&f, &recs[0])).unwrap();
    for (counter, session_use, ts) in [(1u16, 0u8, 0u32), (1, 1, 0x0001_0001), (0x7fff, 0xff, 0xff_ffff), (0x8005, 3, 0x12_3456)] {
        let otp = token(&secrets, counter, session_use, ts);
        for rec in &recs {
            let d = f.hsm.decode_otp(rec, &otp).unwrap();
            assert_eq!(d.use_ctr, counter, "raw counter, caps-lock bit kept ({})", rec.key_handle);
            assert_eq!(d.session_ctr, session_use);
            assert_eq!(d.timestamp(), ts);
            assert_eq!(d.counters(), otp::Counters::from_raw(counter, session_use));
        }
    }
    // An OTP typed by a YubiKey programmed with these secrets, as a string.
    let otp = otp::Otp::new(public_id(), token(&secrets, 9, 2, 77));
    let parsed = otp::Otp::parse(&otp.to_string()).unwrap();
    let rec = &recs[1];
    assert_eq!(parsed.public_id().aead_nonce().unwrap(), rec.nonce);
    assert_eq!(f.hsm.decode_otp(rec, parsed.token()).unwrap().ksm_line(), "OK counter=0009 low=004d high=00 use=02");
}

fn aead_bound_to_key_handle_and_nonce(setup: Setup) {
    let f = setup(HANDLES);
    let (rec, secrets) = yubikey(&f, KH_VECTOR);
    let otp = token(&secrets, 5, 1, 100);
    f.hsm.decode_otp(&rec, &otp).unwrap();
    // KH_TWIN holds the very same AES key, yet the AEAD does not open there.
    assert_eq!(handle_key(KH_TWIN).expose(), handle_key(KH_VECTOR).expose());
    let moved = AeadRecord { key_handle: KH_TWIN, ..rec };
    assert_export_invalid(&f, &moved, "export under the twin handle");
    assert_aead_invalid(f.hsm.decode_otp(&moved, &otp), "decode under the twin handle");
    // Nor under a handle with another key, nor with another nonce.
    let other = AeadRecord { key_handle: KH_128, ..rec };
    assert_export_invalid(&f, &other, "export under another key");
    assert_aead_invalid(f.hsm.decode_otp(&other, &otp), "decode under another key");
    for i in 0..6 {
        let mut n = *rec.nonce.as_bytes();
        n[i] ^= 0x01;
        let renonced = AeadRecord { nonce: AeadNonce::new(n), ..rec };
        assert_export_invalid(&f, &renonced, "export with another nonce");
        assert_aead_invalid(f.hsm.decode_otp(&renonced, &otp), "decode with another nonce");
    }
}

fn import_matches_otp_seal(setup: Setup) {
    let f = setup(HANDLES);
    let plaintexts: [&[u8]; 4] = [&[0x42], &[0x41; 22], &[0x00; 16], &[0xff; 64]];
    for handle in [KH_VECTOR, KH_128, KH_192, KH_TWIN, KH_PERSO, KH_IMPORT, KH_AEAD_GEN] {
        let key = handle_key(handle);
        for pt in plaintexts {
            for nonce in [public_nonce(), AeadNonce::new([0x4d; 6]), AeadNonce::new([0, 0, 0, 0, 0, 1])] {
                let rec = f.hsm.import_aead(handle, NonceSource::Given(nonce), pt).unwrap();
                assert_eq!(rec.key_handle, handle);
                assert_eq!(rec.nonce, nonce);
                assert_eq!(rec.aead, key.seal(handle, &nonce, pt).unwrap(), "{handle} {} bytes", pt.len());
            }
            for source in [NonceSource::Random, NonceSource::Given(AeadNonce::new([0; 6]))] {
                let rec = f.hsm.import_aead(handle, source, pt).unwrap();
                assert!(!rec.nonce.is_zero(), "{source:?}: the module chose a nonce");
                assert_eq!(rec.aead, key.seal(handle, &rec.nonce, pt).unwrap());
            }
        }
    }
    // An imported YubiKey secret decodes its OTPs like a generated one.
    let secrets = YubiKeySecrets::from_plaintext(&[0x11; 22]).unwrap();
    let rec = f.hsm.import_aead(KH_128, NonceSource::Given(public_nonce()), &*secrets.to_plaintext()).unwrap();
    assert_eq!(plaintext(&f, &rec), [0x11; 22]);
    assert_eq!(f.hsm.decode_otp(&rec, &token(&secrets, 3, 4, 5)).unwrap().use_ctr, 3);
}

fn import_reference_vector_5(setup: Setup) {
    let f = setup(HANDLES);
    let pt = hex::decode("000102030405060708090a0b0c0d0e0f010203040506").unwrap();
    let nonce = AeadNonce::new([0, 0, 0, 0, 0, 1]);
    let expected = "e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75";
    let rec = f.hsm.import_aead(KH_VECTOR, NonceSource::Given(nonce), &pt).unwrap();
    assert_eq!(hex::encode(rec.aead.as_bytes()), expected);
    assert_eq!(rec.to_v1_bytes().len(), 54);
    // And the full chain of §6.6: the libyubikey test OTP decodes through it.
    let otp = otp::Otp::parse("cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn").unwrap();
    assert_eq!(otp.public_id().aead_nonce().unwrap(), nonce);
    let given = AeadRecord { key_handle: KH_VECTOR, nonce, aead: Aead::from_slice(&hex::decode(expected).unwrap()).unwrap() };
    assert_eq!(f.hsm.decode_otp(&given, otp.token()).unwrap().ksm_line(), "OK counter=0001 low=0001 high=01 use=01");
    assert_eq!(plaintext(&f, &given), pt[..]);
    // Under handle 4 (same key), the same inputs give another AEAD.
    let twin = f.hsm.import_aead(KH_TWIN, NonceSource::Given(nonce), &pt).unwrap();
    assert_ne!(hex::encode(twin.aead.as_bytes()), expected);
}

fn import_rejects_bad_plaintext_length(setup: Setup) {
    let f = setup(HANDLES);
    for len in [0usize, 65, 100] {
        let e = f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &vec![1; len]).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{len} bytes: {e:?}");
        assert!(!e.is_backend_failure());
    }
}

fn decode_only_handle_only_decodes(setup: Setup) {
    let f = setup(HANDLES);
    for (op, r) in every_aead_operation(&f, KH_DECODE) {
        if op == "decode" {
            continue;
        }
        let needs = match op {
            "export" => Flags::EXPORT,
            "import/given" | "import/random" => Flags::AEAD_GENERATE,
            _ => Flags::BUFFER_AEAD_GENERATE,
        };
        assert_not_permitted(r.expect_err(op), KH_DECODE, needs);
    }
    // It decodes AEADs made elsewhere under the same handle and key: the
    // validation server's half of the personalisation workflow.
    let secrets = YubiKeySecrets::from_plaintext(&[0x33; 22]).unwrap();
    let aead = handle_key(KH_DECODE).seal(KH_DECODE, &public_nonce(), &*secrets.to_plaintext()).unwrap();
    let rec = AeadRecord { key_handle: KH_DECODE, nonce: public_nonce(), aead };
    let d = f.hsm.decode_otp(&rec, &token(&secrets, 42, 7, 1000)).unwrap();
    assert_eq!((d.use_ctr, d.session_ctr, d.timestamp()), (42, 7, 1000));
    assert_not_permitted(f.hsm.decrypt_aead(&rec).unwrap_err(), KH_DECODE, Flags::EXPORT);
}

fn personalizer_handle_cannot_decode(setup: Setup) {
    let f = setup(HANDLES);
    let (rec, secrets) = yubikey(&f, KH_PERSO);
    f.hsm.generate_yubikey_aeads(&[KH_PERSO], NonceSource::Random).unwrap();
    f.hsm.import_aead(KH_PERSO, NonceSource::Given(public_nonce()), &[5; 22]).unwrap();
    assert_not_permitted(f.hsm.decode_otp(&rec, &token(&secrets, 1, 0, 0)).unwrap_err(), KH_PERSO, Flags::OTP_DECODE);
    // Refused before looking at the AEAD: same error for garbage.
    let garbage = AeadRecord { aead: Aead::from_slice(&[0; 30]).unwrap(), ..rec };
    assert_not_permitted(f.hsm.decode_otp(&garbage, &token(&secrets, 1, 0, 0)).unwrap_err(), KH_PERSO, Flags::OTP_DECODE);
}

fn user_nonce_flag_enforced(setup: Setup) {
    let f = setup(HANDLES);
    let given = NonceSource::Given(public_nonce());
    let e = f.hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], given).unwrap_err();
    assert_not_permitted(e, KH_NO_USER_NONCE, Flags::USER_NONCE);
    let e = f.hsm.import_aead(KH_NO_USER_NONCE, given, &[1; 22]).unwrap_err();
    assert_not_permitted(e, KH_NO_USER_NONCE, Flags::USER_NONCE);
    // A random nonce, or an all-zero one (module chooses), needs no flag.
    for source in [NonceSource::Random, NonceSource::Given(AeadNonce::new([0; 6]))] {
        let recs = f.hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], source).unwrap();
        assert!(!recs[0].nonce.is_zero(), "{source:?}");
        let secrets = YubiKeySecrets::from_plaintext(&plaintext(&f, &recs[0])).unwrap();
        f.hsm.decode_otp(&recs[0], &token(&secrets, 1, 1, 1)).unwrap();
        let rec = f.hsm.import_aead(KH_NO_USER_NONCE, source, &[1; 22]).unwrap();
        assert!(!rec.nonce.is_zero(), "{source:?}");
        assert_eq!(rec.aead, handle_key(KH_NO_USER_NONCE).seal(KH_NO_USER_NONCE, &rec.nonce, &[1; 22]).unwrap());
    }
}

fn import_flag_alternatives(setup: Setup) {
    let f = setup(HANDLES);
    // Flags::IMPORT (BUFFER_LOAD + BUFFER_AEAD_GENERATE): import and generate, nothing else.
    f.hsm.import_aead(KH_IMPORT, NonceSource::Given(public_nonce()), &[2; 22]).unwrap();
    let rec = f.hsm.generate_yubikey_aeads(&[KH_IMPORT], NonceSource::Given(public_nonce())).unwrap().remove(0);
    assert_not_permitted(f.hsm.decrypt_aead(&rec).unwrap_err(), KH_IMPORT, Flags::EXPORT);
    assert_not_permitted(f.hsm.decode_otp(&rec, &TokenCiphertext::new([0; 16])).unwrap_err(), KH_IMPORT, Flags::OTP_DECODE);
    // AEAD_GENERATE alone: wraps host data, but generating needs BUFFER_AEAD_GENERATE.
    f.hsm.import_aead(KH_AEAD_GEN, NonceSource::Given(public_nonce()), &[2; 22]).unwrap();
    for source in [NonceSource::Given(public_nonce()), NonceSource::Random] {
        let e = f.hsm.generate_yubikey_aeads(&[KH_AEAD_GEN], source).unwrap_err();
        assert_not_permitted(e, KH_AEAD_GEN, Flags::BUFFER_AEAD_GENERATE);
    }
}

fn handle_without_flags_can_do_nothing(setup: Setup) {
    let f = setup(HANDLES);
    let ops = every_aead_operation(&f, KH_NONE);
    assert_eq!(ops.len(), 6);
    for (op, r) in ops {
        let e = r.expect_err(op);
        assert!(matches!(e, Error::NotPermitted { key_handle, .. } if key_handle == KH_NONE), "{op}: {e:?}");
        assert!(e.is_backend_failure(), "{op}");
    }
}

fn all_or_nothing_generate(setup: Setup) {
    let f = setup(HANDLES);
    for bad in [KH_DECODE, KH_NO_USER_NONCE, KH_UNKNOWN] {
        let r = f.hsm.generate_yubikey_aeads(&[KH_VECTOR, bad, KH_128], NonceSource::Given(public_nonce()));
        let e = r.expect_err("one refused handle fails the whole call");
        assert!(e.is_backend_failure(), "{e:?}");
        match bad {
            KH_UNKNOWN => assert!(matches!(e, Error::UnknownKeyHandle(k) if k == KH_UNKNOWN), "{e:?}"),
            _ => assert!(matches!(e, Error::NotPermitted { key_handle, .. } if key_handle == bad), "{e:?}"),
        }
    }
}

fn tampered_aead_is_invalid(setup: Setup) {
    let f = setup(HANDLES);
    let (rec, secrets) = yubikey(&f, KH_VECTOR);
    let otp = token(&secrets, 1, 1, 1);
    f.hsm.decode_otp(&rec, &otp).unwrap();
    let bytes = rec.aead.as_bytes().to_vec();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            let bad = AeadRecord { aead: Aead::from_slice(&b).unwrap(), ..rec };
            assert_aead_invalid(f.hsm.decode_otp(&bad, &otp), &format!("decode, byte {i} ^ {mask:#x}"));
            assert_export_invalid(&f, &bad, &format!("export, byte {i} ^ {mask:#x}"));
        }
    }
    // Truncated or extended AEADs: never a decode.
    for len in otp::aead::MAC_LEN + 1..bytes.len() {
        let bad = AeadRecord { aead: Aead::from_slice(&bytes[..len]).unwrap(), ..rec };
        assert_aead_invalid(f.hsm.decode_otp(&bad, &otp), &format!("decode, truncated to {len}"));
        assert_export_invalid(&f, &bad, &format!("export, truncated to {len}"));
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let bad = AeadRecord { aead: Aead::from_slice(&longer).unwrap(), ..rec };
    assert_aead_invalid(f.hsm.decode_otp(&bad, &otp), "decode, extended");
    assert_export_invalid(&f, &bad, "export, extended");
}

fn bad_otps_are_verdicts(setup: Setup) {
    let f = setup(HANDLES);
    // Fixed secrets keep this deterministic: a random key would let one of
    // the 128 flipped tokens pass the CRC once in a few hundred runs.
    let secrets = YubiKeySecrets::from_plaintext(&hex::decode("6a0b5d3c1e2f40718293a4b5c6d7e8f9f1e2d3c4b5a6").unwrap()).unwrap();
    let rec = f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &*secrets.to_plaintext()).unwrap();
    let good = token(&secrets, 10, 2, 3);
    f.hsm.decode_otp(&rec, &good).unwrap();
    let check = |otp: &TokenCiphertext, fault: OtpFault, what: &str| match f.hsm.decode_otp(&rec, otp) {
        Err(e @ Error::OtpInvalid(got)) => {
            assert_eq!(got, fault, "{what}");
            assert!(!e.is_backend_failure(), "{what}");
        }
        other => panic!("{what}: expected OtpInvalid({fault:?}), got {other:?}"),
    };
    // Any single bit flipped in the ciphertext garbles the whole block.
    for i in 0..16 {
        for bit in 0..8 {
            let mut c = *good.as_bytes();
            c[i] ^= 1 << bit;
            check(&TokenCiphertext::new(c), OtpFault::Crc, &format!("byte {i} bit {bit}"));
        }
    }
    // A valid token under another YubiKey key.
    let other = YubiKeySecrets::from_plaintext(&[0x99; 22]).unwrap();
    check(&token(&other, 10, 2, 3), OtpFault::Crc, "another key");
    // The right key but another private id.
    let mut wrong_uid = secrets.to_plaintext();
    wrong_uid[16] ^= 1;
    let wrong_uid = YubiKeySecrets::from_plaintext(&*wrong_uid).unwrap();
    // A module that cannot tell the two faults apart reports a CRC failure.
    let uid_fault = if f.caps.otp_fault_detail { OtpFault::UidMismatch } else { OtpFault::Crc };
    check(&token(&wrong_uid, 10, 2, 3), uid_fault, "another uid");
    // A good token checked against the AEAD of another YubiKey.
    let rec2 = f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &*other.to_plaintext()).unwrap();
    assert!(matches!(f.hsm.decode_otp(&rec2, &good), Err(Error::OtpInvalid(OtpFault::Crc))));
}

fn decode_refuses_non_yubikey_aead(setup: Setup) {
    let f = setup(HANDLES);
    let tok = TokenCiphertext::new([0; 16]);
    for len in [1usize, 16, 21, 23, 64] {
        let rec = f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &vec![3; len]).unwrap();
        assert_aead_invalid(f.hsm.decode_otp(&rec, &tok), &format!("{len}-byte plaintext"));
        // It is still a valid AEAD: export opens it.
        assert_eq!(plaintext(&f, &rec).len(), len);
    }
}

fn unknown_key_handle(setup: Setup) {
    let f = setup(HANDLES);
    let ops = every_aead_operation(&f, KH_UNKNOWN);
    assert_eq!(ops.len(), 6);
    for (op, r) in ops {
        let e = r.expect_err(op);
        if op == "export" && !f.caps.export {
            // Refused before any handle is looked up.
            assert_not_permitted(e, KH_UNKNOWN, Flags::EXPORT);
            continue;
        }
        assert!(matches!(e, Error::UnknownKeyHandle(k) if k == KH_UNKNOWN), "{op}: {e:?}");
        assert!(e.is_backend_failure(), "{op}");
    }
}

fn values_round_trip(setup: Setup) {
    let f = setup(HANDLES);
    if refuses_values(&f) {
        return;
    }
    let samples: [&[u8]; 4] = [b"", b"x", b"a token secret: 3132333435363738393031323334353637383930", &[0xa5; 4096]];
    for key in DataKey::ALL {
        for pt in samples {
            let ct = f.hsm.encrypt_value(key, pt).unwrap();
            assert!(ct.len() > pt.len(), "{key:?}: ciphertext carries nonce and tag");
            if pt.len() >= 8 {
                assert!(!ct.windows(pt.len()).any(|w| w == pt), "{key:?}: plaintext visible in ciphertext");
            }
            assert_eq!(*f.hsm.decrypt_value(key, &ct).unwrap(), *pt, "{key:?}");
            let again = f.hsm.encrypt_value(key, pt).unwrap();
            assert_ne!(ct, again, "{key:?}: two encryptions of one value differ");
            assert_eq!(*f.hsm.decrypt_value(key, &again).unwrap(), *pt);
        }
    }
}

fn values_bound_to_purpose(setup: Setup) {
    let f = setup(HANDLES);
    if refuses_values(&f) {
        return;
    }
    for from in DataKey::ALL {
        let ct = f.hsm.encrypt_value(from, b"client api key").unwrap();
        for to in DataKey::ALL {
            let r = f.hsm.decrypt_value(to, &ct);
            if from == to {
                assert_eq!(*r.unwrap(), *b"client api key");
            } else {
                let e = r.expect_err("another purpose's value");
                assert!(matches!(e, Error::ValueInvalid), "{from:?} -> {to:?}: {e:?}");
                assert!(!e.is_backend_failure());
            }
        }
    }
}

fn tampered_values_are_invalid(setup: Setup) {
    let f = setup(HANDLES);
    if refuses_values(&f) {
        return;
    }
    let pt = b"0123456789abcdef";
    for key in DataKey::ALL {
        let ct = f.hsm.encrypt_value(key, pt).unwrap();
        let invalid = |bytes: &[u8], what: &str| {
            let e = f.hsm.decrypt_value(key, bytes).expect_err(what);
            assert!(matches!(e, Error::ValueInvalid), "{key:?} {what}: {e:?}");
            assert!(!e.is_backend_failure());
        };
        for i in 0..ct.len() {
            for mask in [0x01u8, 0x80] {
                let mut b = ct.clone();
                b[i] ^= mask;
                invalid(&b, &format!("byte {i} ^ {mask:#x}"));
            }
        }
        for len in 0..ct.len() {
            invalid(&ct[..len], &format!("truncated to {len}"));
        }
        let mut longer = ct.clone();
        longer.push(0);
        invalid(&longer, "extended");
        invalid(&[], "empty");
    }
}

fn locked_until_unlocked(setup: Setup) {
    let f = setup(HANDLES);
    let caps = f.caps;
    // Made while unlocked, checked after reopening: the keys persist.
    let (rec, secrets) = yubikey(&f, KH_VECTOR);
    let value = if caps.data_keys { f.hsm.encrypt_value(DataKey::Config, b"kept").unwrap() } else { vec![1; 45] };
    let otp = token(&secrets, 7, 0, 0);

    let hsm = (f.reopen_locked)();
    assert_eq!(hsm.status(), Status::Locked);
    let key_handles = hsm.key_handles();
    if !caps.lists_handles {
        // The configured list, locked or not.
        assert_eq!(*key_handles.as_ref().unwrap(), f.hsm.key_handles().unwrap());
    }
    let mut locked: Vec<(&str, Result<(), Error>)> = vec![
        ("generate", hsm.generate_yubikey_aeads(&[KH_VECTOR], NonceSource::Random).map(drop)),
        ("generate/given", hsm.generate_yubikey_aeads(&[KH_VECTOR], NonceSource::Given(public_nonce())).map(drop)),
        ("import", hsm.import_aead(KH_VECTOR, NonceSource::Random, &[1; 22]).map(drop)),
        ("import/given", hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &[1; 22]).map(drop)),
        ("decode", hsm.decode_otp(&rec, &otp).map(drop)),
        ("decode/unknown handle", hsm.decode_otp(&AeadRecord { key_handle: KH_UNKNOWN, ..rec }, &otp).map(drop)),
    ];
    if caps.lists_handles {
        locked.push(("key_handles", key_handles.map(drop)));
    }
    if caps.export {
        locked.push(("export", hsm.decrypt_aead(&rec).map(drop)));
        locked.push(("export/unknown handle", hsm.decrypt_aead(&AeadRecord { key_handle: KH_UNKNOWN, ..rec }).map(drop)));
    } else {
        assert_not_permitted(hsm.decrypt_aead(&rec).unwrap_err(), KH_VECTOR, Flags::EXPORT);
    }
    if caps.data_keys {
        locked.push(("encrypt_value", hsm.encrypt_value(DataKey::Token, b"x").map(drop)));
        locked.push(("decrypt_value", hsm.decrypt_value(DataKey::Config, &value).map(drop)));
    } else {
        assert_no_data_keys(hsm.encrypt_value(DataKey::Token, b"x"), "encrypt_value while locked");
        assert_no_data_keys(hsm.decrypt_value(DataKey::Config, &value), "decrypt_value while locked");
    }
    for (op, r) in locked {
        let e = r.expect_err(op);
        assert!(matches!(e, Error::Locked), "{op}: {e:?}");
        assert!(e.is_backend_failure(), "{op}: Locked is a backend failure");
    }
    assert_eq!(hsm.status(), Status::Locked);
    // The generator works without the keys.
    let mut buf = [0u8; 32];
    hsm.random(&mut buf).unwrap();
    assert_ne!(buf, [0; 32]);

    let e = hsm.unlock(&f.wrong_password).unwrap_err();
    assert!(matches!(e, Error::WrongPassword), "{e:?}");
    assert!(e.is_backend_failure());
    assert_eq!(hsm.status(), Status::Locked, "a wrong password leaves the module locked");
    assert!(matches!(hsm.decode_otp(&rec, &otp), Err(Error::Locked)));

    hsm.unlock(&f.password).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.key_handles().unwrap().len(), f.hsm.key_handles().unwrap().len());
    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 7);
    if caps.export {
        assert_eq!(*hsm.decrypt_aead(&rec).unwrap(), *secrets.to_plaintext());
    }
    if caps.data_keys {
        assert_eq!(*hsm.decrypt_value(DataKey::Config, &value).unwrap(), *b"kept");
    }
    // Unlocking again with the right password is harmless; a wrong one fails.
    hsm.unlock(&f.password).unwrap();
    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 7);
    assert!(matches!(hsm.unlock(&f.wrong_password), Err(Error::WrongPassword)));
    if caps.wrong_password_keeps_unlocked {
        assert_eq!(hsm.status(), Status::Ready);
        assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 7);
    } else {
        // The device locked its keystore again: nothing decodes until the
        // right password comes.
        assert_eq!(hsm.status(), Status::Locked);
        assert!(matches!(hsm.decode_otp(&rec, &otp), Err(Error::Locked)));
        hsm.unlock(&f.password).unwrap();
        assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 7);
    }
}

/// The same import inputs give the same AEAD bytes as the soft backend (and
/// the published reference vectors) on every backend; so do generated
/// secrets re-imported at the same nonce.
fn aeads_identical_to_the_soft_backend(setup: Setup) {
    let f = setup(HANDLES);
    let reference = soft(HANDLES);
    // otp-and-aead.md §2.2, vectors 1 to 3 (key 2000…, handle 0x2000).
    let mut padded_foo = vec![0u8; 16];
    padded_foo[..3].copy_from_slice(b"foo");
    let vectors: [(Vec<u8>, &str); 3] = [
        (padded_foo, "6657738b1501b25e455387c9a4e05ad94f84d3975ef2f942"),
        (vec![0x41; 22], "41795dca5440f31f0412c688e5a11b98488d6b8e001ca913a9b559d0cb68"),
        (
            vec![0x41; 64],
            "41795dca5440f31f0412c688e5a11b98488d6b8e001c2f118c244f7c70e5857b0faee31a66d20269dc7dadfd6a59416cf7d07c71e8585fa510bc20b10e05ab5ba27627068bf99cf7",
        ),
    ];
    for (i, (pt, expected)) in vectors.iter().enumerate() {
        let rec = f.hsm.import_aead(KH_2000, NonceSource::Given(AeadNonce::new([0x4d; 6])), pt).unwrap();
        assert_eq!(hex::encode(rec.aead.as_bytes()), *expected, "vector {}", i + 1);
    }
    for handle in [KH_VECTOR, KH_128, KH_192, KH_TWIN, KH_PERSO, KH_IMPORT, KH_AEAD_GEN, KH_2000] {
        for len in [1usize, 2, 15, 16, 17, 21, 22, 23, 31, 32, 33, 48, 63, 64] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31 + len + handle.get() as usize) as u8).collect();
            for nonce in [public_nonce(), AeadNonce::new([len as u8, 0xff, 0, 0x80, 1, 2])] {
                let ours = f.hsm.import_aead(handle, NonceSource::Given(nonce), &pt).unwrap();
                let theirs = reference.hsm.import_aead(handle, NonceSource::Given(nonce), &pt).unwrap();
                assert_eq!(ours, theirs, "{handle}, {len} bytes");
            }
        }
    }
    let handles = [KH_VECTOR, KH_128, KH_192, KH_PERSO, KH_2000];
    let recs = f.hsm.generate_yubikey_aeads(&handles, NonceSource::Given(public_nonce())).unwrap();
    let secret = plaintext(&f, &recs[0]);
    for rec in &recs {
        let again = reference.hsm.import_aead(rec.key_handle, NonceSource::Given(rec.nonce), &secret).unwrap();
        assert_eq!(again, *rec, "{}: a generated AEAD is the soft backend's AEAD of its secret", rec.key_handle);
    }
}

/// The device goes away under a running module: every call is a backend
/// failure (never a verdict on the OTP or AEAD, right or wrong), the status
/// says not ready, and a new instance on a device that is back works.
/// The fault check's fixed inputs, made in software: a YubiKey AEAD under
/// [`KH_VECTOR`], a good OTP (counter 21), the AEAD tampered, an OTP of
/// another YubiKey.
fn fault_inputs() -> (AeadRecord, TokenCiphertext, AeadRecord, TokenCiphertext) {
    let secrets = YubiKeySecrets::from_plaintext(&hex::decode(FAULT_SECRETS).unwrap()).unwrap();
    let aead = handle_key(KH_VECTOR).seal(KH_VECTOR, &public_nonce(), &*secrets.to_plaintext()).unwrap();
    let rec = AeadRecord { key_handle: KH_VECTOR, nonce: public_nonce(), aead };
    let mut tampered_bytes = rec.aead.as_bytes().to_vec();
    tampered_bytes[3] ^= 0x10;
    let tampered = AeadRecord { aead: Aead::from_slice(&tampered_bytes).unwrap(), ..rec };
    let bad_otp = token(&YubiKeySecrets::from_plaintext(&[0x99; 22]).unwrap(), 21, 4, 99);
    (rec, token(&secrets, 21, 4, 99), tampered, bad_otp)
}

const FAULT_SECRETS: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2c3d4e5f6";

fn fault_is_a_backend_error_then_recovers(setup: Setup) {
    let f = setup(HANDLES);
    let (rec, good, tampered, bad_otp) = fault_inputs();
    let secrets = YubiKeySecrets::from_plaintext(&hex::decode(FAULT_SECRETS).unwrap()).unwrap();
    assert_eq!(f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &*secrets.to_plaintext()).unwrap(), rec);
    assert_eq!(f.hsm.decode_otp(&rec, &good).unwrap().use_ctr, 21);
    assert!(matches!(f.hsm.decode_otp(&tampered, &good), Err(Error::AeadInvalid(_))));
    assert!(matches!(f.hsm.decode_otp(&rec, &bad_otp), Err(Error::OtpInvalid(_))));

    (f.fault)();
    assert_eq!(f.hsm.status(), Status::NotReady);
    for round in 0..2 {
        let calls: Vec<(&str, Result<(), Error>)> = vec![
            ("decode", f.hsm.decode_otp(&rec, &good).map(drop)),
            ("decode a tampered AEAD", f.hsm.decode_otp(&tampered, &good).map(drop)),
            ("decode a bad OTP", f.hsm.decode_otp(&rec, &bad_otp).map(drop)),
            ("generate", f.hsm.generate_yubikey_aeads(&[KH_VECTOR], NonceSource::Random).map(drop)),
            ("import", f.hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &[1; 22]).map(drop)),
        ];
        for (op, r) in calls {
            let e = r.expect_err(op);
            assert!(e.is_backend_failure(), "{op} (round {round}): {e:?}");
            assert!(!matches!(e, Error::AeadInvalid(_) | Error::OtpInvalid(_) | Error::ValueInvalid), "{op}: a verdict: {e:?}");
        }
        assert_eq!(f.hsm.status(), Status::NotReady, "round {round}");
    }

    let recovered = (f.recover)();
    if !f.caps.recovers_in_process {
        // The device is back, but not for this process: still backend
        // failures, from the old instance and for a new one, never verdicts.
        let e = recovered.expect_err("a new instance in the same process");
        assert!(e.is_backend_failure(), "{e:?}");
        for (op, r) in [("decode", f.hsm.decode_otp(&rec, &good)), ("decode a bad OTP", f.hsm.decode_otp(&rec, &bad_otp))] {
            let e = r.expect_err(op);
            assert!(e.is_backend_failure() && !matches!(e, Error::OtpInvalid(_) | Error::AeadInvalid(_)), "{op}: {e:?}");
        }
        assert_eq!(f.hsm.status(), Status::NotReady);
        return;
    }
    let hsm = recovered.unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.decode_otp(&rec, &good).unwrap().use_ctr, 21, "an AEAD made before the fault decodes");
    assert!(matches!(hsm.decode_otp(&tampered, &good), Err(Error::AeadInvalid(_))));
    assert!(matches!(hsm.decode_otp(&rec, &bad_otp), Err(Error::OtpInvalid(_))));
    let again = hsm.import_aead(KH_VECTOR, NonceSource::Given(public_nonce()), &*secrets.to_plaintext()).unwrap();
    assert_eq!(again, rec);
}
