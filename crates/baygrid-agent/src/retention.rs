//! Job folders past their keeping time: an ended job's folder (its ranks' output and working
//! directories) is removed once nothing in it has changed for `keep_job_folders`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the agent looks for folders to remove: as often as one could have come due, at
/// least every second and at most every ten minutes.
pub fn sweep_every(keep: Duration) -> Duration {
    keep.clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Removes the folders under `jobs` that belong to no job in `live` and in which nothing
/// has changed for `keep` (the folder, its entries and theirs). Returns the folders removed.
pub fn sweep(
    jobs: &Path,
    live: &BTreeSet<PathBuf>,
    keep: Duration,
    now: SystemTime,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(jobs) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || live.contains(&dir) {
            continue;
        }
        let Some(changed) = last_change(&dir, 2) else {
            continue;
        };
        if now.duration_since(changed).is_ok_and(|idle| idle >= keep) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(dir),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old job folder")
                }
            }
        }
    }
    removed
}

/// The latest modification time of `path` and what lies under it, `depth` levels down.
fn last_change(path: &Path, depth: usize) -> Option<SystemTime> {
    let mut latest = std::fs::symlink_metadata(path).ok()?.modified().ok()?;
    if depth > 0 && path.is_dir() {
        for entry in std::fs::read_dir(path).ok()?.flatten() {
            if let Some(t) = last_change(&entry.path(), depth - 1) {
                latest = latest.max(t);
            }
        }
    }
    Some(latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idle_folders_of_ended_jobs_go() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path();
        for name in ["job_old.1", "job_live.1", "job_busy.1"] {
            std::fs::create_dir_all(jobs.join(name).join("rank-0")).unwrap();
            std::fs::write(jobs.join(name).join("rank-0/stdout"), "out\n").unwrap();
        }
        let live: BTreeSet<PathBuf> = [jobs.join("job_live.1")].into();
        let later = SystemTime::now() + Duration::from_secs(3600);
        // an hour on, nothing is older than two hours
        assert!(sweep(jobs, &live, Duration::from_secs(7200), later).is_empty());
        // its output written just now, a folder is not idle
        std::thread::sleep(Duration::from_millis(20));
        let busy_at = SystemTime::now();
        std::fs::write(jobs.join("job_busy.1/rank-0/stdout"), "more\n").unwrap();
        let idle_for = busy_at.duration_since(SystemTime::UNIX_EPOCH).unwrap()
            - std::fs::metadata(jobs.join("job_old.1/rank-0/stdout"))
                .unwrap()
                .modified()
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
        let removed = sweep(jobs, &live, idle_for, busy_at);
        assert_eq!(removed, [jobs.join("job_old.1")]);
        assert!(jobs.join("job_live.1").exists() && jobs.join("job_busy.1").exists());
        assert_eq!(
            sweep_every(Duration::from_millis(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_every(Duration::from_secs(30 * 86_400)),
            Duration::from_secs(600)
        );
    }
}
