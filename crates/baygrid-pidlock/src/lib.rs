//! An exclusive lock on a file that names its holder's pid, so that one process at a time
//! uses a resource: a server its store, an agent its work directory. The lock is held
//! while the [`PidLock`] lives and the kernel lets go of it when the process ends, however
//! it ends; the file itself stays.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidLockError {
    #[error("{path} is held by {}", holder.map(|pid| format!("pid {pid}")).unwrap_or_else(|| "another process".into()))]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock; dropping it lets the next process take it.
#[derive(Debug)]
pub struct PidLock {
    _file: File,
}

impl PidLock {
    /// Takes the lock on `path` (created if missing) and writes this process's pid in it,
    /// or says which pid holds it.
    pub fn take(path: &Path) -> Result<PidLock, PidLockError> {
        let io = |source| PidLockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(PidLockError::Held {
                    path: path.to_path_buf(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(PidLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_named_by_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = PidLock::take(&path).unwrap();
        // a second open file description conflicts as another process's would
        match PidLock::take(&path) {
            Err(PidLockError::Held { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("{other:?}"),
        }
        drop(held);
        let again = PidLock::take(&path).unwrap();
        drop(again);
        assert!(matches!(
            PidLock::take(&dir.path().join("missing/x.lock")),
            Err(PidLockError::Io { .. })
        ));
    }
}
