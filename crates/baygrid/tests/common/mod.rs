//! Helpers for tests that start the real `baygrid` binary.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_baygrid");

/// A started process that is killed when the test lets go of it, whether it passes or
/// panics: a failed test leaves no server or agent behind.
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
pub fn spawn(args: &[&str], log: &Path) -> Spawned {
    let file = std::fs::File::create(log).unwrap();
    Spawned(
        Command::new(BIN)
            .args(args)
            .env_remove("BAYGRID_TOKEN")
            .env("BAYGRID_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    )
}

/// Starts `baygrid up` on a port the system picks, its output in `log`; the child and
/// the server's URL, read from what it prints once it is up. A port chosen ahead by the
/// test could be taken by another test's server in the meantime.
pub fn spawn_up(data_dir: &str, log: &Path) -> (Spawned, String) {
    let child = spawn(
        &["up", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        log,
    );
    let url = url_from_log(log, Duration::from_secs(60));
    (child, url)
}

/// Starts `baygrid server --config CONFIG` (its `listen` on port 0), its output in `log`;
/// the child and the URL it listens on.
pub fn spawn_server(config: &Path, log: &Path) -> (Spawned, String) {
    let child = spawn(&["server", "--config", config.to_str().unwrap()], log);
    let url = url_from_log(log, Duration::from_secs(60));
    wait_healthy(&url, Duration::from_secs(30));
    (child, url)
}

/// The URL a starting `baygrid up` or `baygrid server` announces in `log`.
fn url_from_log(log: &Path, timeout: Duration) -> String {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        for line in text.lines() {
            if let Some(url) = line.strip_prefix("baygrid is up on ") {
                return url.trim().to_string();
            }
            if line.contains("baygrid server listening") {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                {
                    return format!("http://{addr}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no listening address in {} after {timeout:?}:\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `text` without terminal colour sequences (ESC [ … letter).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
