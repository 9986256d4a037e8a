//! Deployment pieces: the systemd unit's command line and the shipped
//! example configuration are accepted by the binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_systemd_unit_command_line_is_accepted() {
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/otp-validator.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(|a| a.replace("%d", root).replace("/etc/otp-appliance", root)).collect();
    assert_eq!(args[0], "serve");
    // Flags parse; the (here missing) config file is what stops it.
    let out = Command::new(env!("CARGO_BIN_EXE_validator")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{root}/validator.toml: No such file")), "{stderr}");

    // With the shipped example in place, it gets as far as the keystore it names.
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("validator.toml.example"), dir.path().join("validator.toml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_validator")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("security module") && stderr.contains("validator.keystore"), "{stderr}");
}
