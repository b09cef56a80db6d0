//! The Slurm engine: `sbatch` to submit, `squeue` and `scontrol` (or `sacct` where
//! accounting runs) to track, `scancel` to stop, `sinfo` to discover capacity.
//!
//! A gang of N nodes is one Slurm job with `--nodes N`, one `srun` task per node (or
//! `ntasks_per_node`), and `--gres=gpu:TYPE:COUNT` per node. Each task writes its own output
//! files in the job directory (`rank-%t.out`, `rank-%t.err`), which must sit on a file
//! system the cluster's nodes share. The time limit is the estimated duration times a margin,
//! rounded up to Slurm's one-minute resolution.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::{
    Engine, EngineCapacity, ExecError, JobHandle, JobStatus, LaunchSpec, LogCursor, OutputLine,
};

/// How the agent drives its Slurm cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// Partition to submit to; the cluster's default when empty.
    pub partition: String,
    /// Accelerator model → gres type, e.g. `H800 = "h800"`; the lowercase model by default.
    pub gres_types: BTreeMap<String, String>,
    /// The gres name for accelerators.
    pub gres_name: String,
    /// Tasks started on each node of the gang.
    pub ntasks_per_node: u32,
    /// Time limit = estimated duration × this margin.
    pub time_margin: f64,
    /// Extra `sbatch` arguments, e.g. `["--qos=high"]`.
    pub extra_args: Vec<String>,
    /// Where the Slurm commands live; found on PATH when empty.
    pub bin_dir: String,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: String::new(),
            gres_types: BTreeMap::new(),
            gres_name: "gpu".into(),
            ntasks_per_node: 1,
            time_margin: 1.5,
            extra_args: Vec::new(),
            bin_dir: String::new(),
        }
    }
}

/// Slurm, driven through its commands.
pub struct SlurmEngine {
    work_dir: PathBuf,
    config: SlurmConfig,
}

/// Runs each task: sets the rank variables from Slurm's, then the job's command.
const TASK: &str = r#"BAYGRID_RANK=$SLURM_PROCID; BAYGRID_WORLD_SIZE=$SLURM_NTASKS; BAYGRID_NODE_INDEX=$SLURM_NODEID
BAYGRID_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
export BAYGRID_RANK BAYGRID_WORLD_SIZE BAYGRID_NODE_INDEX BAYGRID_MASTER_ADDR
cmd=$BAYGRID_COMMAND; unset BAYGRID_COMMAND
exec sh -c "$cmd""#;

/// The end of [`TASK`] for a job that must have no network.
const ISOLATED: &str = r#"for how in "--net" "--user --map-root-user --net"; do
  if unshare $how true 2>/dev/null; then exec unshare $how -- sh -c "$cmd"; fi
done
echo "baygrid: this node cannot give the job an empty network namespace" >&2
exit 97"#;

/// A Slurm job state and what it means for baygrid.
pub fn map_state(
    state: &str,
    exit_code: Option<i64>,
    reason: &str,
    cancel_requested: bool,
) -> JobStatus {
    let state = state
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches('+');
    let detail = if reason.is_empty() || reason == "None" {
        String::new()
    } else {
        format!(" ({reason})")
    };
    match state {
        "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "STAGE_OUT"
        | "RESIZING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "SIGNALING" | "STOPPED"
        | "RESV_DEL_HOLD" | "SPECIAL_EXIT" => JobStatus::Running,
        "COMPLETED" => JobStatus::Succeeded,
        "FAILED" => JobStatus::Failed {
            exit_code,
            reason: format!(
                "slurm FAILED with exit code {}{detail}",
                exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into())
            ),
        },
        "TIMEOUT" => JobStatus::Failed {
            exit_code,
            reason: format!("slurm TIMEOUT: the job ran past its time limit{detail}"),
        },
        "OUT_OF_MEMORY" => JobStatus::Failed {
            exit_code,
            reason: format!("slurm OUT_OF_MEMORY{detail}"),
        },
        "DEADLINE" => JobStatus::Failed {
            exit_code,
            reason: format!("slurm DEADLINE: not started before its deadline{detail}"),
        },
        "CANCELLED" if cancel_requested => JobStatus::Cancelled {
            reason: format!("scancel{detail}"),
        },
        "CANCELLED" => JobStatus::Failed {
            exit_code,
            reason: format!("slurm CANCELLED outside baygrid{detail}"),
        },
        "NODE_FAIL" | "BOOT_FAIL" | "PREEMPTED" | "REVOKED" => JobStatus::Lost {
            reason: format!("slurm {state}: lost on the provider's side{detail}"),
        },
        other => JobStatus::Failed {
            exit_code,
            reason: format!("slurm state {other}{detail}"),
        },
    }
}

/// Parses `ExitCode=2:0` (code:signal) into the exit code, or 128+signal.
fn parse_exit(text: &str) -> Option<i64> {
    let (code, signal) = text.split_once(':').unwrap_or((text, "0"));
    let code: i64 = code.trim().parse().ok()?;
    let signal: i64 = signal.trim().parse().unwrap_or(0);
    Some(if signal > 0 { 128 + signal } else { code })
}

/// `Key=Value` pairs of `scontrol show job` output.
fn scontrol_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for token in text.split_whitespace() {
        if let Some((key, value)) = token.split_once('=') {
            fields
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
    }
    fields
}

impl SlurmEngine {
    pub fn new(work_dir: impl Into<PathBuf>, config: SlurmConfig) -> Self {
        SlurmEngine {
            work_dir: work_dir.into(),
            config,
        }
    }

    fn bin(&self, name: &str) -> PathBuf {
        if self.config.bin_dir.is_empty() {
            PathBuf::from(name)
        } else {
            Path::new(&self.config.bin_dir).join(name)
        }
    }

    async fn run(&self, name: &str, args: &[&str]) -> Result<(bool, String, String), ExecError> {
        let output = Command::new(self.bin(name))
            .args(args)
            .output()
            .await
            .map_err(|e| ExecError::Launch(format!("cannot run {name}: {e}")))?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }

    fn slurm_id(handle: &JobHandle) -> Result<String, ExecError> {
        handle.detail["slurm_job_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ExecError::ForeignHandle(format!("{}: no slurm job id", handle.job_id)))
    }

    /// The batch script for a launch.
    pub fn batch_script(&self, spec: &LaunchSpec, dir: &Path) -> String {
        let mut lines = vec!["#!/bin/sh".to_string()];
        let mut directive = |d: String| lines.push(format!("#SBATCH {d}"));
        directive(format!("--job-name=baygrid-{}", spec.job_id));
        directive(format!("--nodes={}", spec.nodes.max(1)));
        directive(format!(
            "--ntasks-per-node={}",
            self.config.ntasks_per_node.max(1)
        ));
        directive(format!("--cpus-per-task={}", spec.cpus_per_node.max(1)));
        directive(format!("--mem={}G", spec.memory_gb_per_node.max(1)));
        if let (Some(model), count) = (&spec.accelerator, spec.accelerators_per_node) {
            if count > 0 {
                let gres_type = self
                    .config
                    .gres_types
                    .get(model)
                    .cloned()
                    .unwrap_or_else(|| model.to_lowercase());
                directive(format!(
                    "--gres={}:{gres_type}:{count}",
                    self.config.gres_name
                ));
            }
        }
        if let Some(limit) = spec.time_limit {
            let mut seconds = limit.as_secs_f64() * self.config.time_margin;
            if let Some(held) = spec.held {
                seconds = seconds.min(held.as_secs_f64());
            }
            let minutes = (seconds / 60.0).ceil().max(1.0) as u64;
            directive(format!("--time={minutes}"));
        }
        if !self.config.partition.is_empty() {
            directive(format!("--partition={}", self.config.partition));
        }
        directive(format!("--chdir={}", dir.display()));
        directive(format!("--output={}", dir.join("slurm-%j.out").display()));
        directive(format!("--error={}", dir.join("slurm-%j.err").display()));
        directive("--export=ALL".into());
        // with no network, each task runs its command in its own empty network namespace
        // (a user namespace too where the node's user may not make one alone); a node that
        // can do neither fails the task rather than run it connected
        let task = if spec.no_network {
            TASK.replace("exec sh -c \"$cmd\"", ISOLATED)
        } else {
            TASK.to_string()
        };
        lines.push(format!(
            "exec srun --kill-on-bad-exit=1 --output={} --error={} sh -c '{}'",
            dir.join("rank-%t.out").display(),
            dir.join("rank-%t.err").display(),
            task.replace('\'', r"'\''")
        ));
        lines.join("\n") + "\n"
    }
}

#[async_trait::async_trait]
impl Engine for SlurmEngine {
    fn kind(&self) -> &'static str {
        "slurm"
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<JobHandle, ExecError> {
        if let Some(image) = &spec.image {
            return Err(ExecError::Refused(format!(
                "this Slurm cluster has no container runtime for image `{image}`"
            )));
        }

        let dir = self
            .work_dir
            .join(format!("{}.{}", spec.job_id, spec.epoch));
        std::fs::create_dir_all(&dir)?;
        let script = dir.join("job.sbatch");
        std::fs::write(&script, self.batch_script(spec, &dir))?;
        let mut command = Command::new(self.bin("sbatch"));
        command
            .arg("--parsable")
            .args(&self.config.extra_args)
            .arg(&script)
            .envs(&spec.env)
            .env("BAYGRID_COMMAND", &spec.command)
            .env("BAYGRID_JOB_ID", &spec.job_id);
        let output = command
            .output()
            .await
            .map_err(|e| ExecError::Launch(format!("cannot run sbatch: {e}")))?;
        if !output.status.success() {
            return Err(ExecError::Refused(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = stdout.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(ExecError::Launch(format!(
                "sbatch printed no job id: {stdout:?}"
            )));
        }
        Ok(JobHandle {
            job_id: spec.job_id.clone(),
            epoch: spec.epoch,
            engine: "slurm".into(),
            dir,
            detail: serde_json::json!({ "slurm_job_id": id }),
        })
    }

    async fn status(&self, handle: &JobHandle) -> Result<JobStatus, ExecError> {
        let id = SlurmEngine::slurm_id(handle)?;
        let cancel_requested = handle.dir.join("cancelled").exists();
        // squeue knows live jobs; scontrol keeps ended ones for MinJobAge; sacct has history
        let (ok, out, err) = self
            .run("squeue", &["-h", "-j", &id, "-o", "%T|%r"])
            .await?;
        if ok {
            if let Some(line) = out.lines().find(|l| !l.trim().is_empty()) {
                let (state, reason) = line.split_once('|').unwrap_or((line, ""));
                let status = map_state(state.trim(), None, reason.trim(), cancel_requested);
                if status == JobStatus::Running {
                    return Ok(status);
                }
            }
        } else if !err.contains("Invalid job id") {
            return Err(ExecError::Launch(format!("squeue: {err}")));
        }
        let (ok, out, _) = self
            .run("scontrol", &["show", "job", &id, "--oneliner"])
            .await?;
        if ok && !out.trim().is_empty() {
            let fields = scontrol_fields(&out);
            let state = fields.get("JobState").cloned().unwrap_or_default();
            let exit = fields.get("ExitCode").and_then(|e| parse_exit(e));
            let reason = fields.get("Reason").cloned().unwrap_or_default();
            return Ok(map_state(&state, exit, &reason, cancel_requested));
        }
        let (ok, out, _) = self
            .run(
                "sacct",
                &["-n", "-P", "-X", "-j", &id, "-o", "State,ExitCode,Reason"],
            )
            .await?;
        if ok {
            if let Some(line) = out.lines().find(|l| !l.trim().is_empty()) {
                let parts: Vec<&str> = line.split('|').collect();
                let exit = parts.get(1).and_then(|e| parse_exit(e));
                return Ok(map_state(
                    parts.first().copied().unwrap_or(""),
                    exit,
                    parts.get(2).copied().unwrap_or(""),
                    cancel_requested,
                ));
            }
        }
        Ok(JobStatus::Lost {
            reason: format!("slurm has no record of job {id}"),
        })
    }

    async fn read_output(
        &self,
        handle: &JobHandle,
        cursor: &mut LogCursor,
    ) -> Result<Vec<OutputLine>, ExecError> {
        let id = SlurmEngine::slurm_id(handle)?;
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&handle.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stream = if let Some(rank) = name
                .strip_prefix("rank-")
                .and_then(|n| n.strip_suffix(".out"))
            {
                if rank == "0" {
                    "stdout".to_string()
                } else {
                    format!("stdout.{rank}")
                }
            } else if let Some(rank) = name
                .strip_prefix("rank-")
                .and_then(|n| n.strip_suffix(".err"))
            {
                if rank == "0" {
                    "stderr".to_string()
                } else {
                    format!("stderr.{rank}")
                }
            } else if name == format!("slurm-{id}.err") || name == format!("slurm-{id}.out") {
                "slurm".to_string()
            } else {
                continue;
            };
            files.push((stream, entry.path()));
        }
        files.sort();
        let ended = self
            .status(handle)
            .await
            .map(|s| s.is_final())
            .unwrap_or(false);
        let mut lines = Vec::new();
        for (stream, path) in files {
            let key = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for line in cursor.read_new_lines(&path, &key, ended) {
                lines.push(OutputLine {
                    stream: stream.clone(),
                    line,
                });
            }
        }
        Ok(lines)
    }

    fn enforces_time_limit(&self) -> bool {
        true
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<(), ExecError> {
        let id = SlurmEngine::slurm_id(handle)?;
        std::fs::write(handle.dir.join("cancelled"), b"")?;
        let (ok, _, err) = self.run("scancel", &[&id]).await?;
        if !ok && !err.contains("Invalid job id") && !err.contains("already completing") {
            return Err(ExecError::Launch(format!("scancel {id}: {err}")));
        }
        Ok(())
    }

    async fn capacity(&self) -> Result<Option<EngineCapacity>, ExecError> {
        let mut args = vec!["-h", "-N", "-o", "%N|%c|%m|%G|%T"];
        if !self.config.partition.is_empty() {
            args.push("-p");
            args.push(&self.config.partition);
        }
        let (ok, out, err) = self.run("sinfo", &args).await?;
        if !ok {
            return Err(ExecError::Launch(format!("sinfo: {err}")));
        }
        let mut capacity = EngineCapacity::default();
        let mut seen = std::collections::BTreeSet::new();
        for line in out.lines() {
            let parts: Vec<&str> = line.split('|').collect();
            if parts.len() < 5 || !seen.insert(parts[0].to_string()) {
                continue;
            }
            let usable = !parts[4].starts_with("down")
                && !parts[4].starts_with("drain")
                && !parts[4].starts_with("inval");
            if !usable {
                continue;
            }
            capacity.nodes += 1;
            let cpus: u32 = parts[1].trim().parse().unwrap_or(0);
            let memory_gb = parts[2]
                .trim()
                .trim_end_matches('+')
                .parse::<u64>()
                .unwrap_or(0)
                / 1024;
            let accelerators = gres_count(parts[3], &self.config.gres_name);
            capacity.cpus_per_node = if capacity.nodes == 1 {
                cpus
            } else {
                capacity.cpus_per_node.min(cpus)
            };
            capacity.memory_gb_per_node = if capacity.nodes == 1 {
                memory_gb as u32
            } else {
                capacity.memory_gb_per_node.min(memory_gb as u32)
            };
            capacity.accelerators_per_node = if capacity.nodes == 1 {
                accelerators
            } else {
                capacity.accelerators_per_node.min(accelerators)
            };
        }
        Ok(Some(capacity))
    }
}

/// The count of `name` generic resources in a `%G` field such as `gpu:h800:8(S:0)`.
fn gres_count(field: &str, name: &str) -> u32 {
    field
        .split(',')
        .filter_map(|item| {
            let item = item.split('(').next().unwrap_or(item);
            let mut parts = item.split(':');
            if parts.next()? != name {
                return None;
            }
            parts.next_back()?.parse::<u32>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_slurm_state_maps_with_its_reason() {
        let cases = [
            ("PENDING", "running"),
            ("RUNNING", "running"),
            ("COMPLETING", "running"),
            ("CONFIGURING", "running"),
            ("SUSPENDED", "running"),
            ("COMPLETED", "succeeded"),
            ("FAILED", "failed"),
            ("TIMEOUT", "failed"),
            ("OUT_OF_MEMORY", "failed"),
            ("DEADLINE", "failed"),
            ("CANCELLED", "failed"),
            ("CANCELLED+", "failed"),
            ("NODE_FAIL", "lost"),
            ("BOOT_FAIL", "lost"),
            ("PREEMPTED", "lost"),
        ];
        for (state, expected) in cases {
            let got = match map_state(state, Some(1), "Reason", false) {
                JobStatus::Running => "running",
                JobStatus::Succeeded => "succeeded",
                JobStatus::Failed { reason, .. } => {
                    assert!(reason.contains(state.trim_end_matches('+')), "{reason}");
                    "failed"
                }
                JobStatus::Cancelled { .. } => "cancelled",
                JobStatus::Lost { reason } => {
                    assert!(reason.contains(state), "{reason}");
                    "lost"
                }
            };
            assert_eq!(got, expected, "{state}");
        }
        assert!(matches!(
            map_state("CANCELLED by 0", None, "", true),
            JobStatus::Cancelled { .. }
        ));
    }

    #[test]
    fn exit_codes_and_gres() {
        assert_eq!(parse_exit("3:0"), Some(3));
        assert_eq!(parse_exit("0:9"), Some(137));
        assert_eq!(gres_count("gpu:h800:8(S:0)", "gpu"), 8);
        assert_eq!(gres_count("gpu:a:2,gpu:b:4,mps:100", "gpu"), 6);
        assert_eq!(gres_count("(null)", "gpu"), 0);
        let fields = scontrol_fields(
            "JobId=5 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0",
        );
        assert_eq!(fields["JobState"], "FAILED");
        assert_eq!(fields["ExitCode"], "3:0");
    }

    #[test]
    fn the_batch_script_maps_the_gang() {
        let engine = SlurmEngine::new(
            "/shared/baygrid",
            SlurmConfig {
                partition: "gpu".into(),
                ..SlurmConfig::default()
            },
        );
        let spec = LaunchSpec {
            job_id: "job_x".into(),
            tenant: "t".into(),
            epoch: 2,
            command: "python train.py".into(),
            env: BTreeMap::new(),
            image: None,
            nodes: 4,
            node_indices: vec![0, 1, 2, 3],
            accelerator: Some("H800".into()),
            accelerators_per_node: 8,
            cpus_per_node: 32,
            memory_gb_per_node: 256,
            time_limit: Some(Duration::from_secs(3600)),
            held: None,
            no_network: false,
            folders: vec![],
        };
        let script = engine.batch_script(&spec, Path::new("/shared/baygrid/job_x.2"));
        for expected in [
            "--nodes=4",
            "--gres=gpu:h800:8",
            "--cpus-per-task=32",
            "--mem=256G",
            "--time=90",
            "--partition=gpu",
            "--chdir=/shared/baygrid/job_x.2",
            "srun --kill-on-bad-exit=1",
        ] {
            assert!(
                script.contains(expected),
                "{expected} missing from\n{script}"
            );
        }
        // the limit never exceeds what the hold pays for (to Slurm's minute)
        let held = LaunchSpec {
            held: Some(Duration::from_secs(61 * 60)),
            no_network: false,
            ..spec
        };
        let script = engine.batch_script(&held, Path::new("/shared/baygrid/job_x.2"));
        assert!(script.contains("--time=61"), "{script}");
        assert!(!script.contains("unshare"), "{script}");
        // a job that must have no network runs its command inside unshare, or not at all
        let isolated = LaunchSpec {
            no_network: true,
            ..held
        };
        let script = engine.batch_script(&isolated, Path::new("/shared/baygrid/job_x.2"));
        assert!(
            script.contains(r#"exec unshare $how -- sh -c "$cmd""#) && script.contains("exit 97"),
            "{script}"
        );
        assert!(!script.contains(r#"exec sh -c "$cmd""#), "{script}");
    }
}
