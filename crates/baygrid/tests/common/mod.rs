//! Helpers for tests that start the real `baygrid` binary.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_baygrid");

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `baygrid ARGS` to completion.
pub fn baygrid(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("BAYGRID_TOKEN")
        .env_remove("BAYGRID_SERVER")
        .env_remove("BAYGRID_DATA_DIR");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// Starts `baygrid ARGS` in the background, its output in `log`.
pub fn spawn(args: &[&str], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(args)
        .env_remove("BAYGRID_TOKEN")
        .env("BAYGRID_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// Waits until `url/healthz` answers.
pub fn wait_healthy(url: &str, timeout: Duration) {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(response) = reqwest::blocking_get(&format!("{url}/healthz")) {
            if response {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not become healthy in {timeout:?}");
}

mod reqwest {
    /// A health probe with a plain TCP request, so these helpers need no async runtime.
    pub fn blocking_get(url: &str) -> Result<bool, std::io::Error> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let mut stream = std::net::TcpStream::connect(host)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.starts_with("HTTP/1.1 200"))
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
