//! The local engine: real child processes on this machine.
//!
//! Each rank runs under a small `sh` wrapper in its own process group and working
//! directory. The wrapper captures stdout and stderr to files and writes the exit code to a
//! file when the command ends, so a restarted agent can tell a finished job from a running
//! one without being its parent. A rank's pid is recorded with its start time, so a reused
//! pid is never mistaken for the job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::{Engine, ExecError, JobHandle, JobStatus, LaunchSpec, LogCursor, OutputLine};

const WRAPPER: &str = r#"cmd=$BAYGRID_COMMAND; unset BAYGRID_COMMAND
sh -c "$cmd" >stdout 2>stderr </dev/null
code=$?
echo $code >exit.tmp && mv exit.tmp exit"#;

/// How long a rank gets between SIGTERM and SIGKILL on cancel.
const GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rank {
    pid: i32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start_ticks: u64,
}

/// Real processes under `work_dir`.
pub struct LocalEngine {
    work_dir: PathBuf,
    /// Children this process started, kept so they are reaped.
    children: Mutex<HashMap<String, Vec<Child>>>,
}

impl LocalEngine {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        LocalEngine {
            work_dir: work_dir.into(),
            children: Mutex::new(HashMap::new()),
        }
    }

    fn job_dir(&self, job_id: &str, epoch: i64) -> PathBuf {
        self.work_dir.join(format!("{job_id}.{epoch}"))
    }

    fn ranks(handle: &JobHandle) -> Result<Vec<Rank>, ExecError> {
        serde_json::from_value(handle.detail["ranks"].clone())
            .map_err(|e| ExecError::ForeignHandle(format!("{}: {e}", handle.job_id)))
    }

    fn reap(&self, key: &str) {
        if let Some(children) = self.children.lock().expect("children lock").get_mut(key) {
            for child in children.iter_mut() {
                let _ = child.try_wait();
            }
        }
    }

    fn kill_ranks(ranks: &[Rank], signal: Signal) {
        for rank in ranks {
            if alive(rank) {
                let _ = killpg(Pid::from_raw(rank.pid), signal);
            }
        }
    }
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces; fields resume after the last ')'
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')' the first field is state (field 3); start time is field 22
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(rank: &Rank) -> bool {
    start_ticks(rank.pid) == Some(rank.start_ticks)
}

fn rank_dir(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}"))
}

fn read_exit(dir: &Path) -> Option<i64> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The `unshare` arguments that give a process an empty network namespace here: as root,
/// a new network namespace; otherwise inside a new user namespace. Tried once with `true`,
/// so a machine that allows neither refuses the job with why instead of running it
/// connected.
async fn network_namespace_args() -> Result<Vec<&'static str>, ExecError> {
    static CHOSEN: tokio::sync::OnceCell<Result<Vec<&'static str>, String>> =
        tokio::sync::OnceCell::const_new();
    CHOSEN
        .get_or_init(|| async {
            let mut errors = Vec::new();
            for args in [vec!["--net"], vec!["--user", "--map-root-user", "--net"]] {
                match Command::new("unshare")
                    .args(&args)
                    .arg("--")
                    .arg("true")
                    .output()
                    .await
                {
                    Ok(out) if out.status.success() => return Ok(args),
                    Ok(out) => errors.push(format!(
                        "unshare {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => errors.push(format!("unshare: {e}")),
                }
            }
            Err(errors.join("; "))
        })
        .await
        .clone()
        .map_err(|why| {
            ExecError::Refused(format!(
                "the job reads protected data and must run with no network, but this machine cannot give it a network namespace ({why})"
            ))
        })
}

#[async_trait::async_trait]
impl Engine for LocalEngine {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<JobHandle, ExecError> {
        if let Some(image) = &spec.image {
            return Err(ExecError::Refused(format!(
                "the local engine has no container runtime for image `{image}`"
            )));
        }
        let isolate = if spec.no_network {
            Some(network_namespace_args().await?)
        } else {
            None
        };
        let dir = self.job_dir(&spec.job_id, spec.epoch);
        std::fs::create_dir_all(&dir)?;
        let world = spec.nodes.max(1);
        let mut children = Vec::new();
        let mut ranks = Vec::new();
        for rank in 0..world as usize {
            let rank_dir = rank_dir(&dir, rank);
            std::fs::create_dir_all(&rank_dir)?;
            let node = spec.node_indices.get(rank).copied().unwrap_or(rank as u32);
            // with no network, each rank runs in its own empty network namespace
            // (only a loopback, down): `unshare` execs the shell in place
            let mut command = match &isolate {
                Some(args) => {
                    let mut c = Command::new("unshare");
                    c.args(args).arg("--").arg("sh");
                    c
                }
                None => Command::new("sh"),
            };
            command
                .arg("-c")
                .arg(WRAPPER)
                .current_dir(&rank_dir)
                .envs(&spec.env)
                .env("BAYGRID_COMMAND", &spec.command)
                .env("BAYGRID_JOB_ID", &spec.job_id)
                .env("BAYGRID_RANK", rank.to_string())
                .env("BAYGRID_WORLD_SIZE", world.to_string())
                .env("BAYGRID_MASTER_ADDR", "127.0.0.1")
                .env("BAYGRID_NODE_INDEX", node.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0);
            match command.spawn() {
                Ok(child) => {
                    let pid = child.id().map(|p| p as i32).unwrap_or(0);
                    let ticks = start_ticks(pid).unwrap_or(0);
                    ranks.push(Rank {
                        pid,
                        start_ticks: ticks,
                    });
                    children.push(child);
                }
                Err(e) => {
                    // all or nothing: stop the ranks already started
                    LocalEngine::kill_ranks(&ranks, Signal::SIGKILL);
                    for mut child in children {
                        let _ = child.kill().await;
                    }
                    return Err(ExecError::Launch(format!("rank {rank}: {e}")));
                }
            }
        }
        let key = format!("{}.{}", spec.job_id, spec.epoch);
        self.children
            .lock()
            .expect("children lock")
            .insert(key, children);
        Ok(JobHandle {
            job_id: spec.job_id.clone(),
            epoch: spec.epoch,
            engine: "local".into(),
            dir,
            detail: serde_json::json!({ "ranks": ranks }),
        })
    }

    async fn status(&self, handle: &JobHandle) -> Result<JobStatus, ExecError> {
        if handle.engine != "local" {
            return Err(ExecError::ForeignHandle(handle.engine.clone()));
        }
        self.reap(&format!("{}.{}", handle.job_id, handle.epoch));
        let ranks = LocalEngine::ranks(handle)?;
        let cancelled = handle.dir.join("cancelled").exists();
        let mut running = 0;
        let mut first_failure: Option<(usize, Option<i64>)> = None;
        for (index, rank) in ranks.iter().enumerate() {
            match read_exit(&rank_dir(&handle.dir, index)) {
                Some(0) => {}
                Some(code) => {
                    first_failure.get_or_insert((index, Some(code)));
                }
                None if alive(rank) => running += 1,
                None => {
                    first_failure.get_or_insert((index, None));
                }
            }
        }
        if cancelled {
            if running > 0 {
                return Ok(JobStatus::Running);
            }
            return Ok(JobStatus::Cancelled {
                reason: "stopped on request".into(),
            });
        }
        if let Some((rank, code)) = first_failure {
            // a gang fails together: stop the ranks still running
            if running > 0 {
                LocalEngine::kill_ranks(&ranks, Signal::SIGKILL);
            }
            let reason = match code {
                Some(code) => format!("rank {rank} exited with code {code}"),
                None => format!("rank {rank} vanished without an exit code (killed from outside)"),
            };
            return Ok(JobStatus::Failed {
                exit_code: code,
                reason,
            });
        }
        if running > 0 {
            return Ok(JobStatus::Running);
        }
        Ok(JobStatus::Succeeded)
    }

    async fn read_output(
        &self,
        handle: &JobHandle,
        cursor: &mut LogCursor,
    ) -> Result<Vec<OutputLine>, ExecError> {
        let ranks = LocalEngine::ranks(handle)?;
        let mut lines = Vec::new();
        for index in 0..ranks.len() {
            for stream in ["stdout", "stderr"] {
                let path = rank_dir(&handle.dir, index).join(stream);
                let key = format!("{index}/{stream}");
                // complete lines only, unless the rank has ended
                let ended = read_exit(&rank_dir(&handle.dir, index)).is_some();
                let name = if index == 0 {
                    stream.to_string()
                } else {
                    format!("{stream}.{index}")
                };
                for line in cursor.read_new_lines(&path, &key, ended) {
                    lines.push(OutputLine {
                        stream: name.clone(),
                        line,
                    });
                }
            }
        }
        Ok(lines)
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<(), ExecError> {
        let ranks = LocalEngine::ranks(handle)?;
        std::fs::write(handle.dir.join("cancelled"), b"")?;
        LocalEngine::kill_ranks(&ranks, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + GRACE;
        while ranks.iter().any(alive) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.reap(&format!("{}.{}", handle.job_id, handle.epoch));
        }
        LocalEngine::kill_ranks(&ranks, Signal::SIGKILL);
        self.reap(&format!("{}.{}", handle.job_id, handle.epoch));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str, nodes: u32) -> LaunchSpec {
        LaunchSpec {
            job_id: "job_t".into(),
            tenant: "t".into(),
            epoch: 1,
            command: command.into(),
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            image: None,
            nodes,
            node_indices: (0..nodes).collect(),
            accelerator: None,
            accelerators_per_node: 0,
            cpus_per_node: 1,
            memory_gb_per_node: 1,
            time_limit: None,
            held: None,
            no_network: false,
            folders: vec![],
        }
    }

    async fn wait_final(engine: &LocalEngine, handle: &JobHandle) -> JobStatus {
        for _ in 0..200 {
            let status = engine.status(handle).await.unwrap();
            if status.is_final() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("job did not end");
    }

    #[tokio::test]
    async fn a_job_without_network_sees_only_a_loopback() {
        // the interfaces a process can see, from the kernel's own table
        let interfaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '";
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let mut isolated = spec(interfaces, 1);
        isolated.no_network = true;
        let handle = engine.launch(&isolated).await.unwrap();
        assert_eq!(wait_final(&engine, &handle).await, JobStatus::Succeeded);
        let lines = engine
            .read_output(&handle, &mut LogCursor::default())
            .await
            .unwrap();
        let seen: Vec<&str> = lines.iter().map(|l| l.line.trim()).collect();
        assert_eq!(seen, ["lo"]);

        // the same command with the network sees the machine's interfaces too
        let mut connected = spec(interfaces, 1);
        connected.job_id = "job_u".into();
        let handle = engine.launch(&connected).await.unwrap();
        assert_eq!(wait_final(&engine, &handle).await, JobStatus::Succeeded);
        let lines = engine
            .read_output(&handle, &mut LogCursor::default())
            .await
            .unwrap();
        assert!(
            lines[0].line.split(' ').filter(|s| !s.is_empty()).count() > 1,
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn runs_a_gang_with_rank_variables_and_captures_output() {
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let handle = engine
            .launch(&spec("echo $GREETING rank=$BAYGRID_RANK of $BAYGRID_WORLD_SIZE at $BAYGRID_MASTER_ADDR; echo oops >&2", 2))
            .await
            .unwrap();
        assert_eq!(wait_final(&engine, &handle).await, JobStatus::Succeeded);
        let mut cursor = LogCursor::default();
        let mut lines = engine.read_output(&handle, &mut cursor).await.unwrap();
        lines.sort_by(|a, b| a.stream.cmp(&b.stream));
        let text: Vec<String> = lines
            .iter()
            .map(|l| format!("{}:{}", l.stream, l.line))
            .collect();
        assert_eq!(
            text,
            vec![
                "stderr:oops",
                "stderr.1:oops",
                "stdout:hi rank=0 of 2 at 127.0.0.1",
                "stdout.1:hi rank=1 of 2 at 127.0.0.1"
            ]
        );
        assert!(engine
            .read_output(&handle, &mut cursor)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn reports_the_exit_code_and_fails_the_whole_gang() {
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let handle = engine
            .launch(&spec(
                "if [ $BAYGRID_RANK = 1 ]; then exit 3; fi; sleep 30",
                2,
            ))
            .await
            .unwrap();
        match wait_final(&engine, &handle).await {
            JobStatus::Failed { exit_code, reason } => {
                assert_eq!(exit_code, Some(3));
                assert!(reason.contains("rank 1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let ranks = LocalEngine::ranks(&handle).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        engine.reap("job_t.1");
        assert!(!ranks.iter().any(alive), "rank 0 was stopped with the gang");
    }

    #[tokio::test]
    async fn cancel_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let handle = engine
            .launch(&spec("sleep 60 & sleep 60; wait", 1))
            .await
            .unwrap();
        assert_eq!(engine.status(&handle).await.unwrap(), JobStatus::Running);
        engine.cancel(&handle).await.unwrap();
        assert!(matches!(
            wait_final(&engine, &handle).await,
            JobStatus::Cancelled { .. }
        ));
    }

    #[tokio::test]
    async fn a_new_engine_reattaches_by_handle() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalEngine::new(dir.path());
        let handle = first
            .launch(&spec("sleep 0.3; echo done", 1))
            .await
            .unwrap();
        let stored = serde_json::to_string(&handle).unwrap();
        let second = LocalEngine::new(dir.path());
        let handle: JobHandle = serde_json::from_str(&stored).unwrap();
        assert_eq!(second.status(&handle).await.unwrap(), JobStatus::Running);
        assert_eq!(wait_final(&second, &handle).await, JobStatus::Succeeded);
        first.reap("job_t.1");
    }

    #[tokio::test]
    async fn a_vanished_process_is_a_failure_not_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let handle = engine.launch(&spec("sleep 60", 1)).await.unwrap();
        let ranks = LocalEngine::ranks(&handle).unwrap();
        // kill the wrapper and its command from outside, so no exit file is written
        let _ = killpg(Pid::from_raw(ranks[0].pid), Signal::SIGKILL);
        match wait_final(&engine, &handle).await {
            JobStatus::Failed {
                exit_code: None,
                reason,
            } => assert!(reason.contains("vanished")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn refuses_images() {
        let dir = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(dir.path());
        let mut s = spec("true", 1);
        s.image = Some("pytorch:2".into());
        assert!(matches!(
            engine.launch(&s).await,
            Err(ExecError::Refused(_))
        ));
    }
}
