//! A `ksm serve` process for the tests that run it on a security module
//! of their own (a SoftHSM2 token, the YubiHSM 1 emulator), and a plain
//! HTTP GET against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// A running `ksm serve`; killed on drop.
pub struct Server {
    child: Child,
    /// `127.0.0.1:port`, as the server reported it.
    pub addr: String,
}

impl Server {
    /// Start `ksm serve` with `args` (after `serve`; give `--listen
    /// 127.0.0.1:0`) and `env`, and wait until it says where it listens.
    /// Its log is drained so it never blocks on a full pipe.
    pub fn start(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ksm"));
        cmd.env("RUST_LOG", "warn").arg("serve").args(args).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "ksm serve exited before listening");
            if let Some(rest) = line.split("serving http://").nth(1) {
                break rest.split('/').next().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in stderr.lines() {});
        Self { child, addr }
    }

    /// (status code, body) of `GET target`.
    pub fn get(&self, target: &str) -> (u16, String) {
        let mut conn = TcpStream::connect(&self.addr).unwrap();
        write!(conn, "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr).unwrap();
        let mut raw = String::new();
        conn.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
