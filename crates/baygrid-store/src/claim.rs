//! One server per store. The server keeps parts of the store in memory (the ledger's
//! balances, the catalog) and on start takes over what the last server left running (it
//! extends leases, fails orphaned fusion runs), so a second server on the same store would
//! fail the first one's runs, place jobs the first has placed and keep a ledger apart.
//! [`Store::claim`] refuses it: a lock file beside a SQLite database, a session-level
//! advisory lock on PostgreSQL, each held for as long as the claim lives.

use std::path::PathBuf;

use baygrid_pidlock::{PidLock, PidLockError};
use sqlx::{AnyConnection, Row};

use crate::{Backend, Result, Store, StoreError};

/// The advisory lock's key on PostgreSQL: "baygrid" in ASCII. Advisory locks are per
/// database, so servers on different databases of one PostgreSQL do not meet.
const ADVISORY_KEY: i64 = 0x0062_6179_6772_6964;

/// This process's claim to be the one server on a store; dropping it lets another start.
#[derive(Debug)]
pub struct ServerClaim {
    _hold: Hold,
}

/// What holds the claim (never read: it is held for its lock).
#[derive(Debug)]
enum Hold {
    File(#[allow(dead_code)] PidLock),
    Session(#[allow(dead_code)] AnyConnection),
    Nothing,
}

/// The database file a SQLite URL names; `None` for an in-memory database.
pub(crate) fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

impl Store {
    /// Claims the store for this process's server, or says which server holds it. Held until the claim is dropped (or the process ends).
    pub async fn claim(&self) -> Result<ServerClaim> {
        let hold = match self.backend {
            Backend::Sqlite => match &self.sqlite_file {
                Some(database) => {
                    let mut lock = database.as_os_str().to_owned();
                    lock.push(".lock");
                    Hold::File(PidLock::take(lock.as_ref()).map_err(|e| match e {
                        PidLockError::Held { holder, .. } => StoreError::Claimed(format!(
                            "another baygrid server{} is running on {}; stop it first",
                            holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
                            database.display()
                        )),
                        io => StoreError::Claimed(io.to_string()),
                    })?)
                }
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
