//! `yhsm1-daemon`: one process owns a YubiHSM 1 and shares it.
//!
//! A YubiHSM 1 answers one command at a time on one serial line, and only
//! one process may hold `/dev/ttyACM0`. This daemon opens the device,
//! listens on a Unix socket (mode 0660: give the group of the services that
//! may use the stick) and runs each client's commands whole, one client at
//! a time (see [`hsm::yhsm1::daemon`]). Services then use
//! `Yhsm1::connect(socket, …)` instead of opening the device.
//!
//! ```text
//! yhsm1-daemon --device /dev/yubihsm --socket /run/yhsm1/yhsm1.sock
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Share a YubiHSM 1 between processes through a Unix socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The stick's serial device.
    #[arg(long, default_value = "/dev/ttyACM0", value_name = "PATH")]
    device: PathBuf,
    /// The Unix socket to serve (a stale one is replaced, a live one refused).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Deadline of one command on the serial line, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    let args = Args::parse();
    match hsm::yhsm1::daemon::run(&args.device, &args.socket, Duration::from_millis(args.timeout_ms)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
