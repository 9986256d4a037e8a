//! Independent validation clients against the `validator serve` binary:
//! PyPI's `yubico-client` (through `oracles/yubico_client_verify.py`) and
//! Debian's `ykclient` command line (libykclient-dev). Each signs its
//! requests with the client's key and checks the answer's `h` itself.
//! OTPs come from Debian's `ykgenerate`; the validator's `/metrics` is
//! checked after each step, so that the server's own verdict is known even
//! where a client reports only a signature failure.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/site.rs"]
mod site;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use appliance_tests::tools;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use site::{garbled, Site, TS_HIGH, TS_LOW};

/// The `timestamp` every OTP of the site carries.
const TIMESTAMP: u32 = (TS_HIGH as u32) << 16 | TS_LOW as u32;

/// Does the answer (its lines) carry an `h` that is HMAC-SHA1 under `key`
/// over its other pairs, sorted by name and joined with `&`?
fn signed_with(lines: &[&str], key: &[u8]) -> bool {
    let mut pairs: Vec<(&str, &str)> = lines.iter().map(|l| l.split_once('=').unwrap()).collect();
    pairs.sort_unstable();
    let h = pairs.iter().find(|(k, _)| *k == "h").map(|(_, v)| *v).unwrap();
    let text: Vec<String> = pairs.iter().filter(|(k, _)| *k != "h").map(|(k, v)| format!("{k}={v}")).collect();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
    mac.update(text.join("&").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()) == h
}

/// yubikey-val's `t`: `2008-11-21T06:11:55Z0711` (a literal `0`, then milliseconds).
fn is_ykval_time(t: &str) -> bool {
    let shape = "dddd-dd-ddTdd:dd:ddZ0ddd";
    t.len() == shape.len() && t.chars().zip(shape.chars()).all(|(c, s)| if s == 'd' { c.is_ascii_digit() } else { c == s })
}

// ---------------------------------------------------------------------
// PyPI yubico-client

/// `python3` with `yubico_client` importable.
fn require_yubico_client() -> PathBuf {
    let python = tools::require("python3", "python3");
    let out = Command::new(&python).args(["-c", "import yubico_client"]).output().unwrap();
    assert!(
        out.status.success(),
        "python3 cannot import yubico_client: pip install yubico-client, {}\n{}",
        tools::HINT,
        String::from_utf8_lossy(&out.stderr)
    );
    python
}

/// One `yubico_client.Yubico(...).verify(otp, timestamp=True, ...)` call.
struct PyRequest<'a> {
    client: u64,
    /// The client's base64 key; `None`: the library neither signs nor checks.
    key: Option<&'a str>,
    otp: &'a str,
    /// `return_response=True`.
    response: bool,
}

/// What the library made of one answer.
#[derive(Debug)]
struct PyOutcome {
    /// `result` (`True`, `dict`), or `raised` (the exception class) ...
    fields: BTreeMap<String, String>,
    /// ... and the body the library was handed, one entry per line.
    raw: Vec<String>,
}

impl PyOutcome {
    fn get(&self, name: &str) -> &str {
        self.fields.get(name).unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }

    /// The `status=` line of the raw answer.
    fn raw_status(&self) -> &str {
        self.raw.iter().find_map(|l| l.strip_prefix("status=")).unwrap_or_else(|| panic!("no status in {self:?}"))
    }

    fn raw_lines(&self) -> Vec<&str> {
        self.raw.iter().map(String::as_str).collect()
    }

    #[track_caller]
    fn raised(&self, class: &str) -> &Self {
        assert_eq!(self.fields.get("raised").map(String::as_str), Some(class), "{self:?}");
        self
    }
}

/// Run the requests in order through one Python process.
fn yubico_client(url: &str, requests: &[PyRequest<'_>]) -> Vec<PyOutcome> {
    let python = require_yubico_client();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/yubico_client_verify.py");
    let mut child =
        Command::new(python).arg(script).arg(url).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let input: String = requests
        .iter()
        .map(|r| format!("{} {} {} {}\n", r.client, r.key.unwrap_or("-"), r.otp, if r.response { "response" } else { "bool" }))
        .collect();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "yubico_client_verify.py failed:\n{stderr}");
    let outcomes: Vec<PyOutcome> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (fields, raw) = line.rsplit_once(" raw=").unwrap_or_else(|| panic!("no raw= in {line:?}"));
            let fields = fields.split(' ').map(|t| t.split_once('=').unwrap()).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            let raw = raw.split('|').filter(|l| !l.is_empty()).map(str::to_owned).collect();
            PyOutcome { fields, raw }
        })
        .collect();
    assert_eq!(outcomes.len(), requests.len(), "stderr:\n{stderr}");
    outcomes
}

/// yubico-client verifies fresh OTPs (the timestamp fields right), raises
/// REPLAYED_OTP for replays and older counters, a signature error for a
/// wrong key and for an unknown client (answered with the empty key, as
/// yubikey-val), InvalidClientIdError for a disabled client (answered with
/// its own key) and reports BAD_OTP only as "no valid answers".
#[test]
fn python_yubico_client_verifies_against_the_validator() {
    let site = Site::new(1);
    let key = site.add_client(1);
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(&key).unwrap();
    let server = site.serve();
    let url = server.url();
    let yk = &site.yubikeys[0];
    let req = |client, key, otp, response| PyRequest { client, key, otp, response };

    let (first, second, older) = (yk.otp(0x0020, 4), yk.otp(0x0021, 0), yk.otp(0x001f, 9));
    let before = server.counts();
    let got = yubico_client(
        &url,
        &[
            req(1, Some(&key), &first, true),
            req(1, Some(&key), &second, false),
            req(1, Some(&key), &first, false),
            req(1, Some(&key), &older, false),
        ],
    );
    let ok = &got[0];
    assert_eq!(ok.get("result"), "dict", "{ok:?}");
    assert_eq!(ok.get("status"), "OK");
    assert_eq!(ok.get("otp"), first);
    assert_eq!(ok.get("timestamp"), TIMESTAMP.to_string());
    assert_eq!(ok.get("sessioncounter"), "32");
    assert_eq!(ok.get("sessionuse"), "4");
    assert_eq!(ok.get("sl"), "0");
    assert_eq!(ok.get("nonce").len(), 25, "the library's nonce, echoed");
    assert!(is_ykval_time(ok.get("t")), "{ok:?}");
    assert!(signed_with(&ok.raw_lines(), &key_bytes));
    assert_eq!(got[1].get("result"), "True", "{:?}", got[1]);
    for replay in &got[2..] {
        replay.raised("StatusCodeError");
        assert_eq!(replay.get("status_code"), "REPLAYED_OTP");
        assert_eq!(replay.raw_status(), "REPLAYED_OTP");
        assert!(signed_with(&replay.raw_lines(), &key_bytes));
    }
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 2), ("REPLAYED_OTP".to_owned(), 2)]);

    // A wrong key: the server refuses the request's h and signs its
    // BAD_SIGNATURE with the real key; the library, checking with the
    // wrong one, raises. The OTP is not spent.
    let wrong = "AAECAwQFBgcICQoLDA0ODxAREhM=";
    let third = yk.otp(0x0022, 0);
    let before = server.counts();
    let got = yubico_client(&url, &[req(1, Some(wrong), &third, false), req(1, Some(&key), &third, false)]);
    got[0].raised("SignatureVerificationError");
    assert_eq!(got[0].raw_status(), "BAD_SIGNATURE");
    assert!(signed_with(&got[0].raw_lines(), &key_bytes));
    assert_eq!(got[1].get("result"), "True", "{:?}", got[1]);
    assert_eq!(server.moved_since(&before), [("BAD_SIGNATURE".to_owned(), 1), ("OK".to_owned(), 1)]);

    // A garbled OTP: BAD_OTP, which the library does not raise as a status;
    // it drops the answer and gives up with a bare Exception.
    let fourth = yk.otp(0x0023, 0);
    let before = server.counts();
    let bad = garbled(&fourth);
    let got = yubico_client(&url, &[req(1, Some(&key), &bad, false)]);
    got[0].raised("Exception");
    assert_eq!(got[0].get("message"), "NO_VALID_ANSWERS");
    assert_eq!(got[0].raw_status(), "BAD_OTP");
    assert!(signed_with(&got[0].raw_lines(), &key_bytes));
    assert_eq!(server.moved_since(&before), [("BAD_OTP".to_owned(), 1)]);

    // An unknown client: NO_SUCH_CLIENT signed with the empty key. With a
    // key the library sees a signature failure; without one, the status.
    let before = server.counts();
    let got = yubico_client(&url, &[req(7, Some(&key), &fourth, false), req(7, None, &fourth, false)]);
    got[0].raised("SignatureVerificationError");
    got[1].raised("InvalidClientIdError");
    for g in &got {
        assert_eq!(g.raw_status(), "NO_SUCH_CLIENT");
        assert!(signed_with(&g.raw_lines(), b""), "{g:?}");
    }
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 2)]);

    // A disabled client: NO_SUCH_CLIENT signed with its own key, so the
    // library reads the status even while checking signatures.
    site.disable_client(1);
    server.wait_for_status(1, &garbled(&fourth), "NO_SUCH_CLIENT");
    let before = server.counts();
    let got = yubico_client(&url, &[req(1, Some(&key), &fourth, false)]);
    got[0].raised("InvalidClientIdError");
    assert_eq!(got[0].raw_status(), "NO_SUCH_CLIENT");
    assert!(signed_with(&got[0].raw_lines(), &key_bytes));
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    let log = server.stop();
    assert!(!log.contains("ERROR"), "the validator logged errors:\n{log}");
}

// ---------------------------------------------------------------------
// Debian ykclient

/// `ykclient --debug --url URL [--apikey KEY] CLIENT OTP`.
struct YkClient {
    /// Exit status: 0 OK, 2 replayed, 3 other failures, 1 hard failure.
    code: Option<i32>,
    /// stdout and stderr.
    output: String,
}

impl YkClient {
    fn run(url: &str, client: u64, apikey: Option<&str>, otp: &str) -> Self {
        let mut cmd = Command::new(tools::require("ykclient", "libykclient-dev"));
        cmd.args(["--debug", "--url", url]);
        if let Some(k) = apikey {
            cmd.args(["--apikey", k]);
        }
        let out = cmd.arg(client.to_string()).arg(otp).output().unwrap();
        Self {
            code: out.status.code(),
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// Exit status `code`, and ykclient's return code `rc` (with its name,
    /// e.g. `REPLAYED_OTP`) in the debug output.
    #[track_caller]
    fn expect(&self, code: i32, rc: u32, name: &str) -> &Self {
        let line = self.output.lines().find(|l| l.starts_with("Verification output (")).unwrap_or("");
        let want = if rc == 0 { "Verification output (0): Success".to_owned() } else { format!("Verification output ({rc}): ") };
        assert!(
            self.code == Some(code) && line.starts_with(&want) && (rc == 0 || line.ends_with(&format!("({name})"))),
            "wanted exit {code} with rc {rc} {name}, got exit {:?}:\n{}",
            self.code,
            self.output
        );
        self
    }

    /// A `  name: value` line of the printed answer.
    fn field(&self, name: &str) -> &str {
        let prefix = format!("  {name}: ");
        self.output.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("no {name}:\n{}", self.output))
    }
}

/// ykclient: a fresh OTP is 0, a replay or an older counter 2 (exit
/// status), a garbled OTP BAD_OTP (3), a wrong API key a server signature
/// failure (rc 107, exit 3) while the server says BAD_SIGNATURE, an unknown
/// client rc 107 with a key (empty-key answer) and NO_SUCH_CLIENT without,
/// and a disabled client NO_SUCH_CLIENT with its key.
#[test]
fn ykclient_cli_verifies_against_the_validator() {
    let site = Site::new(1);
    let key = site.add_client(1);
    let server = site.serve();
    let url = server.url();
    let yk = &site.yubikeys[0];

    let first = yk.otp(0x0030, 2);
    let before = server.counts();
    let ok = YkClient::run(&url, 1, Some(&key), &first);
    ok.expect(0, 0, "OK");
    // The request was signed; the answer's h was checked with the key.
    assert!(ok.output.contains("?id=1&nonce=") && ok.output.contains(&format!("&otp={first}&timestamp=1&h=")), "{}", ok.output);
    assert_eq!(ok.field("status"), "OK");
    assert_eq!(ok.field("otp"), first);
    assert_eq!(ok.field("timestamp"), TIMESTAMP.to_string());
    assert_eq!(ok.field("sessioncounter"), "48");
    assert_eq!(ok.field("sessionuse"), "2");
    assert_eq!(ok.field("sl"), "0");
    assert!(is_ykval_time(ok.field("t")), "{}", ok.output);
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 1)]);

    let before = server.counts();
    YkClient::run(&url, 1, Some(&key), &first).expect(2, 2, "REPLAYED_OTP");
    YkClient::run(&url, 1, Some(&key), &yk.otp(0x002f, 7)).expect(2, 2, "REPLAYED_OTP");
    YkClient::run(&url, 1, Some(&key), &yk.otp(0x0030, 1)).expect(2, 2, "REPLAYED_OTP");
    assert_eq!(server.moved_since(&before), [("REPLAYED_OTP".to_owned(), 3)]);

    let before = server.counts();
    YkClient::run(&url, 1, Some(&key), &garbled(&yk.otp(0x0031, 0))).expect(3, 1, "BAD_OTP");
    assert_eq!(server.moved_since(&before), [("BAD_OTP".to_owned(), 1)]);

    // A wrong API key: the server refuses the request's h and answers
    // BAD_SIGNATURE under the real key; ykclient checks that answer with
    // the wrong key and reports the server's signature as invalid.
    let second = yk.otp(0x0031, 1);
    let before = server.counts();
    YkClient::run(&url, 1, Some("AAECAwQFBgcICQoLDA0ODxAREhM="), &second).expect(3, 107, "BAD_SERVER_SIGNATURE");
    assert_eq!(server.moved_since(&before), [("BAD_SIGNATURE".to_owned(), 1)]);
    // The OTP was not spent.
    YkClient::run(&url, 1, Some(&key), &second).expect(0, 0, "OK");

    // An unknown client: answered with the empty key. ykclient checks every
    // answer's h when it has a key, so it cannot read the status ...
    let third = yk.otp(0x0032, 0);
    let before = server.counts();
    YkClient::run(&url, 9, Some(&key), &third).expect(3, 107, "BAD_SERVER_SIGNATURE");
    // ... and without a key it reads it (and sends no h).
    let unsigned = YkClient::run(&url, 9, None, &third);
    unsigned.expect(3, 5, "NO_SUCH_CLIENT");
    assert!(unsigned.output.contains(&format!("&otp={third}&timestamp=1\n")), "{}", unsigned.output);
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 2)]);

    // A disabled client is answered with its own key: ykclient, checking
    // the signature, reads NO_SUCH_CLIENT.
    site.disable_client(1);
    server.wait_for_status(1, &garbled(&third), "NO_SUCH_CLIENT");
    let before = server.counts();
    YkClient::run(&url, 1, Some(&key), &third).expect(3, 5, "NO_SUCH_CLIENT");
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    let log = server.stop();
    assert!(!log.contains("ERROR"), "the validator logged errors:\n{log}");
}
