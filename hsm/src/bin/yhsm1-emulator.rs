//! `yhsm1-emulator`: a YubiHSM 1 in HSM mode, emulated on a pseudo-terminal.
//!
//! It opens a pty pair, prints the slave's path (one line) on stdout and
//! answers the YubiHSM 1 protocol on it (see [`hsm::yhsm1::emulator`]) until
//! it is killed (SIGTERM), or, with `--exit-on-stdin-eof`, until its
//! standard input closes. Clients open the printed path like a
//! `/dev/ttyACM0`: pyhsm (`pyhsm.base.YHSM(device=PATH)`), or our serial
//! backend.
//!
//! ```text
//! yhsm1-emulator --keys keys.json --flags 0x7fffffff --flags 0x2000=otp-decode
//! yhsm1-emulator --keys keys.json --locked --master-key 00112233...
//! ```
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hsm::yhsm1::emulator::Emulator;
use hsm::Flags;
use otp::KeyHandle;
use rustix::pty::{grantpt, ioctl_tiocgptpeer, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
use zeroize::Zeroizing;

/// A YubiHSM 1 emulator on a pty.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Key handles in pyhsm's soft-HSM JSON: `{"<key handle>": "<hex AES key>"}`.
    #[arg(long, value_name = "FILE.json")]
    keys: PathBuf,
    /// Permission flags: `FLAGS` sets the default for every handle,
    /// `KH=FLAGS` one handle's. FLAGS is a 0x word or flag names
    /// (`otp-decode,user-nonce`). Default 0x7fffffff (every YubiHSM flag).
    #[arg(long = "flags", value_name = "[KH=]FLAGS")]
    flags: Vec<String>,
    /// Start with the keystore locked (needs --master-key).
    #[arg(long, requires = "master_key")]
    locked: bool,
    /// The master key of YSM_KEY_STORE_DECRYPT, up to 64 hex digits
    /// (zero-padded to 32 bytes, as pyhsm does).
    #[arg(long, value_name = "HEX")]
    master_key: Option<String>,
    /// Exit when standard input reaches end of file (for test harnesses).
    #[arg(long)]
    exit_on_stdin_eof: bool,
}

fn parse_flags(specs: &[String]) -> Result<(Flags, Vec<(KeyHandle, Flags)>), String> {
    let mut default = Flags::from_bits(0x7fff_ffff);
    let mut per_handle = Vec::new();
    for spec in specs {
        match spec.split_once('=') {
            Some((kh, flags)) => {
                let kh: KeyHandle = kh.parse().map_err(|e| format!("--flags {spec}: key handle: {e}"))?;
                per_handle.push((kh, flags.parse().map_err(|e| format!("--flags {spec}: {e}"))?));
            }
            None => default = spec.parse().map_err(|e| format!("--flags {spec}: {e}"))?,
        }
    }
    Ok((default, per_handle))
}

fn master_key(hex_key: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let raw = Zeroizing::new(hex::decode(hex_key.trim()).map_err(|e| format!("--master-key is not hex: {e}"))?);
    if raw.len() > 32 {
        return Err(format!("--master-key is {} bytes; at most 32 (64 hex digits)", raw.len()));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key[..raw.len()].copy_from_slice(&raw);
    Ok(key)
}

/// Open a pty pair in raw mode: (master, slave, slave path).
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd, String)> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let path = ptsname(&master, Vec::new())?.into_string().map_err(|_| std::io::Error::other("the pty path is not UTF-8"))?;
    // Keep a slave descriptor open for the emulator's lifetime, so that
    // clients may close and reopen the path without the master seeing a
    // hang-up.
    let slave = match ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC) {
        Ok(fd) => fd,
        Err(_) => std::fs::OpenOptions::new().read(true).write(true).open(&path)?.into(),
    };
    let mut t = tcgetattr(&slave)?;
    t.make_raw();
    tcsetattr(&slave, OptionalActions::Now, &t)?;
    Ok((master, slave, path))
}

fn run(args: Args) -> Result<(), String> {
    let (default, per_handle) = parse_flags(&args.flags)?;
    let json = Zeroizing::new(std::fs::read_to_string(&args.keys).map_err(|e| format!("{}: {e}", args.keys.display()))?);
    let mut emulator = Emulator::from_pyhsm_json(&json, |kh| per_handle.iter().find(|(h, _)| *h == kh).map_or(default, |(_, f)| *f))
        .map_err(|e| format!("{}: {e}", args.keys.display()))?;
    if args.locked {
        let key = args.master_key.as_deref().ok_or("--locked needs --master-key")?;
        emulator = emulator.locked(master_key(key)?);
    } else if args.master_key.is_some() {
        return Err("--master-key is only used with --locked".to_owned());
    }

    let (master, _slave, path) = open_pty().map_err(|e| format!("cannot open a pty: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{path}").and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))?;
    drop(stdout);

    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            // Whatever stdin brings is ignored; its end (or an error) ends us.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            std::process::exit(0);
        });
    }

    let mut master = std::fs::File::from(master);
    let mut buf = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match master.read(&mut buf[..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the pty: {e}")),
        };
        let (answer, errors) = emulator.handle(&buf[..n]);
        for e in errors {
            eprintln!("yhsm1-emulator: {e}");
        }
        if !answer.is_empty() {
            master.write_all(&answer).map_err(|e| format!("writing the pty: {e}"))?;
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("yhsm1-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
