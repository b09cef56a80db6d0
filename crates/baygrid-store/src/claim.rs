//! One server per store. The server keeps parts of the store in memory (the ledger's
//! balances, the catalog) and on start takes over what the last server left running (it
//! extends leases, fails orphaned fusion runs), so a second server on the same store would
//! fail the first one's runs, place jobs the first has placed and keep a ledger apart.
//! [`Store::claim`] refuses it: a lock file beside a SQLite database, a session-level
//! advisory lock on PostgreSQL, each held for as long as the claim lives.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sqlx::{AnyConnection, Row};

use crate::{Backend, Result, Store, StoreError};

/// The advisory lock's key on PostgreSQL: "baygrid" in ASCII. Advisory locks are per
/// database, so servers on different databases of one PostgreSQL do not meet.
const ADVISORY_KEY: i64 = 0x0062_6179_6772_6964;

/// This process's claim to be the one server on a store; dropping it lets another start.
pub struct ServerClaim {
    _hold: Hold,
}

// the fields are held for their locks, never read
#[allow(dead_code)]
enum Hold {
    File(std::fs::File),
    Session(AnyConnection),
    Nothing,
}

impl std::fmt::Debug for ServerClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self._hold {
            Hold::File(_) => "lock file",
            Hold::Session(_) => "advisory lock",
            Hold::Nothing => "in memory",
        };
        f.debug_struct("ServerClaim").field("hold", &kind).finish()
    }
}

/// The database file a SQLite URL names; `None` for an in-memory database.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

fn lock_file(database: &Path) -> Result<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let io = |e: std::io::Error| StoreError::Claimed(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Claimed(format!(
                "another baygrid server{} is running on {}; stop it first",
                if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
                database.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(file)
}

impl Store {
    /// Claims the store opened from `url` for this process's server, or says which server
    /// holds it. Held until the claim is dropped (or the process ends).
    pub async fn claim(&self, url: &str) -> Result<ServerClaim> {
        let hold = match self.backend {
            Backend::Sqlite => match sqlite_file(url) {
                Some(database) => Hold::File(lock_file(&database)?),
                None => Hold::Nothing,
            },
            Backend::Postgres => {
                let mut session = self.pool.acquire().await?.detach();
                let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS taken")
                    .bind(ADVISORY_KEY)
                    .fetch_one(&mut session)
                    .await?;
                let taken: bool = row.try_get("taken")?;
                if !taken {
                    return Err(StoreError::Claimed(format!(
                        "another baygrid server is running on this PostgreSQL database (it holds advisory lock {ADVISORY_KEY}); stop it first"
                    )));
                }
                Hold::Session(session)
            }
        };
        Ok(ServerClaim { _hold: hold })
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_file;
    use std::path::PathBuf;

    #[test]
    fn a_sqlite_url_names_its_file() {
        for (url, file) in [
            ("sqlite:///var/lib/baygrid.db", Some("/var/lib/baygrid.db")),
            ("sqlite://data/baygrid.db?mode=rwc", Some("data/baygrid.db")),
            ("sqlite:baygrid.db", Some("baygrid.db")),
            ("sqlite::memory:", None),
            ("sqlite://:memory:?cache=shared", None),
            ("postgres://x/y", None),
        ] {
            assert_eq!(sqlite_file(url), file.map(PathBuf::from), "{url}");
        }
    }
}
