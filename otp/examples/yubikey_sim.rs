//! A YubiKey simulator: prints the OTP a YubiKey with these secrets would
//! type. For demos and tests; a real deployment never needs it.
//!
//! ```text
//! cargo run -p otp --example yubikey_sim -- PUBLIC_ID UID_HEX KEY_HEX COUNTER USE [TIMESTAMP]
//! ```
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use otp::token::TokenFields;
use otp::{Otp, PrivateId, PublicId, YubiKeyKey};

fn run(args: &[String]) -> Result<String, String> {
    let [public_id, uid, key, counter, session_use, rest @ ..] = args else {
        return Err("usage: yubikey_sim PUBLIC_ID UID_HEX KEY_HEX COUNTER USE [TIMESTAMP]".to_owned());
    };
    let public_id = PublicId::from_modhex(public_id).map_err(|e| format!("public id: {e}"))?;
    let uid = PrivateId::from_hex(uid).map_err(|e| format!("uid: {e}"))?;
    let key = YubiKeyKey::from_hex(key).map_err(|e| format!("key: {e}"))?;
    let counter: u16 = counter.parse().map_err(|e| format!("counter: {e}"))?;
    let session_use: u8 = session_use.parse().map_err(|e| format!("use: {e}"))?;
    let timestamp: u32 = match rest.first() {
        Some(t) => t.parse().map_err(|e| format!("timestamp: {e}"))?,
        None => 0x01_2345,
    };
    let fields = TokenFields {
        uid: *uid.expose(),
        counter,
        timestamp_low: (timestamp & 0xffff) as u16,
        timestamp_high: ((timestamp >> 16) & 0xff) as u8,
        session_use,
        // Fixed filler: the simulator is deterministic on purpose.
        rnd: 0x5a5a,
    };
    Ok(Otp::new(public_id, fields.build().encrypt(&key)).to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(otp) => {
            println!("{otp}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
