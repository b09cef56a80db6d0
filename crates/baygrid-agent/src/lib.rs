//! The agent beside a cluster. It registers its cluster, heartbeats capacity and the leases
//! it holds, takes leases on placed jobs, launches them on the cluster's engine, streams
//! their output and status back under the lease's epoch, and stops any copy whose lease is
//! no longer valid.
//!
//! What it runs is persisted in its work directory, one file per job, so a restarted agent
//! re-attaches to jobs that are still running and reports the ones that are gone as lost.

mod fusion;
mod query;
mod retention;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baygrid_pidlock::{PidLock, PidLockError};
use std::sync::Arc;
use std::time::Duration;

use baygrid_api::{
    AgentStatus, Capacity, Client, ClientError, FlowReport, HeartbeatRequest, HeartbeatResponse,
    HeldLease, LeaseGrant, LeaseRequest, LeaseResponse, LogLineIn, RegisterRequest,
    RegisterResponse, ReportRequest,
};
use baygrid_exec::{
    Engine, Folder, JobHandle, JobStatus, LaunchSpec, LocalEngine, LogCursor, SlurmEngine,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read agent config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("agent work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("server refused the agent: {0}")]
    Refused(ClientError),
    #[error(
        "agent work directory {path} is in use by another agent{}; stop it, or give this agent a work_dir of its own",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    WorkDirInUse { path: PathBuf, holder: Option<u32> },
}

/// Takes the work directory for this process: a [`PidLock`] on `agent.lock` in it, held as
/// long as it lives. Two agents on one work directory would re-attach the same jobs,
/// report them twice and overwrite each other's state files.
fn lock_work_dir(work_dir: &Path) -> Result<PidLock, AgentError> {
    PidLock::take(&work_dir.join("agent.lock")).map_err(|e| match e {
        PidLockError::Held { holder, .. } => AgentError::WorkDirInUse {
            path: work_dir.to_path_buf(),
            holder,
        },
        PidLockError::Io { path, source } => AgentError::WorkDir { path, source },
    })
}

/// `baygrid agent --config FILE` (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The server's base URL.
    pub server: String,
    /// The agent token for this cluster (or `token_file`).
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the agent token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where job directories and the agent's state live.
    pub work_dir: PathBuf,
    /// The engine: `local`, `slurm` or (built with the `k8s` feature) `kubernetes`.
    #[serde(default = "default_engine")]
    pub engine: String,
    /// Settings for the Slurm engine.
    #[serde(default)]
    pub slurm: baygrid_exec::SlurmConfig,
    /// Settings for the Kubernetes engine.
    #[serde(default)]
    pub kubernetes: baygrid_exec::KubernetesConfig,
    /// Most jobs running at once.
    #[serde(default = "default_max_running")]
    pub max_running: u32,
    /// Time between polls of the engine and the server.
    #[serde(default = "default_poll", with = "baygrid_core::duration_text")]
    pub poll_interval: Duration,
    /// How much of each attempt's output is shipped to the server (`[output]`: `head_bytes`,
    /// `head_lines`, `tail_bytes`); all of it stays in the job's folder on the cluster.
    #[serde(default)]
    pub output: baygrid_exec::OutputLimits,
    /// How long an ended job's folder (its whole output and working directories) is kept
    /// once nothing in it changes; absent: kept until removed by hand.
    #[serde(
        default,
        with = "baygrid_core::duration_text::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_job_folders: Option<Duration>,
}

/// The engines this build has.
#[cfg(feature = "k8s")]
pub const ENGINES: &[&str] = &["local", "slurm", "kubernetes"];
#[cfg(not(feature = "k8s"))]
pub const ENGINES: &[&str] = &["local", "slurm"];

fn default_engine() -> String {
    "local".into()
}
fn default_max_running() -> u32 {
    64
}
fn default_poll() -> Duration {
    Duration::from_millis(300)
}

impl AgentConfig {
    /// An agent of the local engine with the config file's defaults for everything else.
    pub fn local(server: impl Into<String>, token: Option<String>, work_dir: PathBuf) -> Self {
        AgentConfig {
            server: server.into(),
            token,
            token_file: None,
            work_dir,
            engine: default_engine(),
            slurm: Default::default(),
            kubernetes: Default::default(),
            max_running: default_max_running(),
            poll_interval: default_poll(),
            output: Default::default(),
            keep_job_folders: None,
        }
    }

    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| AgentError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // the folders a job is handed are named by absolute paths, whatever its directory
        config.work_dir =
            std::path::absolute(&config.work_dir).map_err(|e| AgentError::Config {
                path: path.to_path_buf(),
                message: format!("work_dir {}: {e}", config.work_dir.display()),
            })?;
        config.token().map_err(|message| AgentError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        if !ENGINES.contains(&config.engine.as_str()) {
            return Err(AgentError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "engine `{}` is not available in this build: expected one of {}",
                    config.engine,
                    ENGINES.join(", ")
                ),
            });
        }
        if config.max_running == 0 {
            return Err(AgentError::Config {
                path: path.to_path_buf(),
                message: "max_running must be at least 1".into(),
            });
        }
        if config.keep_job_folders.is_some_and(|k| k.is_zero()) {
            return Err(AgentError::Config {
                path: path.to_path_buf(),
                message:
                    "keep_job_folders must be longer than zero (leave it out to keep job folders)"
                        .into(),
            });
        }
        Ok(config)
    }

    fn token(&self) -> Result<String, String> {
        match (&self.token, &self.token_file) {
            (Some(token), None) => Ok(token.clone()),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("token_file {}: {e}", file.display())),
            _ => Err("give exactly one of `token` and `token_file`".into()),
        }
    }
}

/// A job this agent runs, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tracked {
    handle: JobHandle,
    cursor: LogCursor,
    next_seq: i64,
    /// Set once the engine says the job ended; the file goes once the server has it.
    final_status: Option<FinalStatus>,
    /// When the job's hold runs out (Unix ms): the agent stops the job then, whatever
    /// the engine's own time limit.
    #[serde(default)]
    stop_at_ms: Option<i64>,
    /// A protected job's outputs: where they go, and the folder the job writes them to.
    /// Its logs go there too instead of to the server.
    #[serde(default)]
    outputs: Option<(baygrid_api::OutputsTarget, PathBuf)>,
    /// Those outputs as written to the vault, once they are (so a report sent again, or
    /// an agent restarted, does not write them twice).
    #[serde(default)]
    kept: Option<Vec<baygrid_api::VersionFile>>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FinalStatus {
    status: AgentStatus,
    exit_code: Option<i64>,
    reason: String,
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let token = config.token().map_err(|message| AgentError::Config {
        path: PathBuf::from("agent config"),
        message,
    })?;
    let client = Client::new(&config.server, Some(token));
    let state_dir = config.work_dir.join("state");
    std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::WorkDir {
        path: state_dir.clone(),
        source,
    })?;
    let work_dir_lock = lock_work_dir(&config.work_dir)?;
    let engine: Arc<dyn Engine> = match config.engine.as_str() {
        "slurm" => Arc::new(SlurmEngine::new(
            config.work_dir.join("jobs"),
            config.slurm.clone(),
        )),
        #[cfg(feature = "k8s")]
        "kubernetes" => Arc::new(
            baygrid_exec::KubernetesEngine::connect(
                config.kubernetes.clone(),
                config.work_dir.join("jobs"),
            )
            .await
            .map_err(|e| AgentError::Config {
                path: PathBuf::from("kubernetes"),
                message: e.to_string(),
            })?,
        ),
        _ => Arc::new(LocalEngine::new(config.work_dir.join("jobs"))),
    };
    let mut agent = Agent {
        workers: Arc::new(fusion::Workers::new(
            client.clone(),
            config.work_dir.clone(),
        )),
        client,
        staging: BTreeMap::new(),
        keeping: BTreeMap::new(),
        engine,
        state_dir,
        config,
        tracked: BTreeMap::new(),
        capacity: Capacity::default(),
        lease_ttl: Duration::from_secs(15),
        last_renewed: std::time::Instant::now(),
        fenced: false,
        _work_dir_lock: work_dir_lock,
    };
    let registered = loop {
        match agent.register().await {
            Ok(r) => break r,
            Err(
                e @ ClientError::Api {
                    status: 401 | 403 | 404,
                    ..
                },
            ) => return Err(AgentError::Refused(e)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(cluster = %registered.cluster.name, "agent registered");
    agent.lease_ttl = Duration::from_millis(registered.lease_ttl_ms.max(0) as u64);
    agent.last_renewed = std::time::Instant::now();
    agent.reattach().await;
    let mut last_sweep: Option<std::time::Instant> = None;
    let mut sweeping: Option<tokio::task::JoinHandle<Vec<PathBuf>>> = None;
    tokio::spawn(query::serve(
        agent.client.clone(),
        agent.config.work_dir.clone(),
        shutdown.clone(),
    ));
    loop {
        match agent.step().await {
            Ok(()) => {
                agent.last_renewed = std::time::Instant::now();
                agent.fenced = false;
            }
            // its token revoked or expired, its cluster gone: no lease can be renewed,
            // so its copies stop now, and the agent ends saying why
            Err(
                e @ ClientError::Api {
                    status: 401 | 403 | 404,
                    ..
                },
            ) => {
                tracing::error!(error = %e, "the server refuses this agent: stopping its jobs");
                agent.fence("the server refuses this agent").await;
                return Err(AgentError::Refused(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent step failed; will retry");
                agent.fence_if_expired().await;
            }
        }
        // old job folders go beside the loop, one sweep at a time
        if let Some(keep) = agent.config.keep_job_folders {
            if let Some(done) = sweeping.take_if(|task| task.is_finished()) {
                let removed = done.await.unwrap_or_default();
                if !removed.is_empty() {
                    tracing::info!(
                        count = removed.len(),
                        "removed job folders past keep_job_folders"
                    );
                }
            }
            let due = last_sweep.is_none_or(|at| at.elapsed() >= retention::sweep_every(keep));
            if due && sweeping.is_none() {
                last_sweep = Some(std::time::Instant::now());
                let live: std::collections::BTreeSet<PathBuf> = agent
                    .tracked
                    .values()
                    .map(|t| t.handle.dir.clone())
                    .collect();
                let jobs = agent.config.work_dir.join("jobs");
                sweeping = Some(tokio::task::spawn_blocking(move || {
                    retention::sweep(&jobs, &live, keep, std::time::SystemTime::now())
                }));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(agent.config.poll_interval) => {}
            _ = shutdown.changed() => break,
        }
    }
    Ok(())
}

type KeptOutputs = Result<Vec<baygrid_api::VersionFile>, baygrid_vault::VaultError>;

/// A granted job whose inputs are being copied from their vaults into `dir`.
struct Staging {
    grant: LeaseGrant,
    env: BTreeMap<String, String>,
    outputs: Option<(baygrid_api::OutputsTarget, PathBuf)>,
    dir: PathBuf,
    task: tokio::task::JoinHandle<Result<(), baygrid_vault::VaultError>>,
}

struct Agent {
    /// This process's hold on its work directory.
    _work_dir_lock: PidLock,
    client: Client,
    /// Jobs granted here whose inputs are still being staged; their leases are held.
    staging: BTreeMap<String, Staging>,
    /// Ended protected jobs whose outputs are being written to the site's vault.
    keeping: BTreeMap<String, tokio::task::JoinHandle<KeptOutputs>>,
    engine: Arc<dyn Engine>,
    /// The fusion workers placed here, which the agent runs itself.
    workers: Arc<fusion::Workers>,
    state_dir: PathBuf,
    config: AgentConfig,
    tracked: BTreeMap<String, Tracked>,
    capacity: Capacity,
    /// How long the server keeps a lease without a heartbeat.
    lease_ttl: Duration,
    /// When the server last renewed this agent's leases.
    last_renewed: std::time::Instant,
    /// Whether this agent has stopped its jobs for want of renewal.
    fenced: bool,
}

impl Agent {
    /// The engine a job runs on: the cluster's, or the agent's own for fusion workers.
    fn engine_of(&self, handle: &JobHandle) -> Arc<dyn Engine> {
        if handle.engine == fusion::ENGINE {
            self.workers.clone()
        } else {
            self.engine.clone()
        }
    }

    /// Past the lease TTL without a renewal, the server has requeued this agent's jobs
    /// elsewhere: stop every copy here, so a job never runs twice across a partition.
    async fn fence_if_expired(&mut self) {
        if self.fenced || self.last_renewed.elapsed() < self.lease_ttl {
            return;
        }
        self.fence("leases not renewed within the TTL").await;
    }

    /// Stops every copy this agent runs and every staging, since the server gives (or
    /// has given) their jobs to others.
    async fn fence(&mut self, why: &str) {
        self.fenced = true;
        let staging: Vec<String> = self.staging.keys().cloned().collect();
        for job_id in staging {
            tracing::warn!(job_id, "{why}: stopped staging");
            self.drop_staging(&job_id);
        }
        for (job_id, tracked) in &self.tracked {
            if tracked.final_status.is_none() {
                tracing::warn!(job_id, "{why}: stopping this copy");
                let _ = self
                    .engine_of(&tracked.handle)
                    .cancel(&tracked.handle)
                    .await;
            }
        }
    }

    async fn register(&mut self) -> Result<RegisterResponse, ClientError> {
        // the capacity the cluster declares; the local engine runs within it
        let probe: RegisterResponse = self
            .client
            .post(
                "/api/v1/agent/register",
                &RegisterRequest {
                    capacity: self.capacity.clone(),
                },
            )
            .await?;
        let c = &probe.cluster;
        self.capacity = Capacity {
            engine: self.engine.kind().to_string(),
            nodes: c.nodes,
            accelerators_per_node: c.accelerators_per_node,
            cpus_per_node: c.cpus_per_node,
            memory_gb_per_node: c.memory_gb_per_node,
            running_jobs: 0,
        };
        Ok(probe)
    }

    fn state_file(&self, job_id: &str) -> PathBuf {
        self.state_dir.join(format!("{job_id}.json"))
    }

    /// Keeps a job's state for a restarted agent: written aside, then renamed over the old.
    /// Progress (how far its output was read) is written as it goes; a process crash keeps
    /// it, and after a power loss the agent reads and resends some lines again, which the
    /// server keeps once.
    fn persist(&self, job_id: &str, tracked: &Tracked) {
        self.write_state(job_id, tracked, false);
    }

    /// [`Agent::persist`], on disk before it returns: for a job just launched, whose handle
    /// is the only way back to it (lost, a Slurm or Kubernetes job would run on unseen while
    /// the server gave it to another cluster).
    fn persist_durably(&self, job_id: &str, tracked: &Tracked) {
        self.write_state(job_id, tracked, true);
    }

    fn write_state(&self, job_id: &str, tracked: &Tracked, durable: bool) {
        use std::io::Write;
        let path = self.state_file(job_id);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(tracked).expect("agent state serializes");
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&text)?;
            if durable {
                file.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            if durable {
                std::fs::File::open(&self.state_dir)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = written {
            tracing::error!(job_id, error = %e, "cannot persist job state");
        }
    }

    /// Stops this agent's copy of a job whose lease it no longer holds, and forgets it.
    async fn stop_copy(&mut self, job_id: &str) {
        if let Some(tracked) = self.tracked.get(job_id) {
            let _ = self
                .engine_of(&tracked.handle)
                .cancel(&tracked.handle)
                .await;
        }
        self.forget(job_id);
    }

    fn forget(&mut self, job_id: &str) {
        self.workers.forget(job_id);
        if let Some(task) = self.keeping.remove(job_id) {
            task.abort();
        }
        if let Some(tracked) = self.tracked.remove(job_id) {
            // staged inputs leave with the job; only its results stay
            let staged = self
                .config
                .work_dir
                .join("inputs")
                .join(format!("{job_id}.{}", tracked.handle.epoch));
            let _ = std::fs::remove_dir_all(staged);
            if let Some((_, dir)) = &tracked.outputs {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        let _ = std::fs::remove_file(self.state_file(job_id));
    }

    /// Picks up the jobs a previous run of this agent left behind.
    async fn reattach(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let Ok(tracked) = serde_json::from_slice::<Tracked>(&text) else {
                tracing::error!(path = %path.display(), "unreadable job state; leaving it aside");
                let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                continue;
            };
            let job_id = tracked.handle.job_id.clone();
            let mut tracked = tracked;
            match self
                .engine_of(&tracked.handle)
                .status(&tracked.handle)
                .await
            {
                Ok(JobStatus::Running) => tracing::info!(job_id, "re-attached to a running job"),
                // gone without an exit code while the agent was away: lost, not failed
                Ok(JobStatus::Failed {
                    exit_code: None,
                    reason,
                }) if tracked.final_status.is_none() => {
                    tracing::warn!(job_id, %reason, "job vanished while the agent was away: reporting it lost");
                    tracked.final_status = Some(FinalStatus {
                        status: AgentStatus::Lost,
                        exit_code: None,
                        reason,
                    });
                }
                Ok(other) => {
                    tracing::info!(job_id, status = ?other, "job ended while the agent was away")
                }
                Err(e) => tracing::warn!(job_id, error = %e, "cannot read job status"),
            }
            self.tracked.insert(job_id, tracked);
        }
    }

    async fn step(&mut self) -> Result<(), ClientError> {
        self.capacity.running_jobs = (self.tracked.len() + self.staging.len()) as u32;
        match self.engine.capacity().await {
            Ok(Some(seen)) => {
                self.capacity.nodes = seen.nodes;
                self.capacity.accelerators_per_node = seen.accelerators_per_node;
                self.capacity.cpus_per_node = seen.cpus_per_node;
                self.capacity.memory_gb_per_node = seen.memory_gb_per_node;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the engine's capacity"),
        }
        let held = self
            .tracked
            .values()
            .map(|t| HeldLease {
                job_id: t.handle.job_id.clone(),
                epoch: t.handle.epoch,
            })
            .chain(self.staging.values().map(|s| HeldLease {
                job_id: s.grant.job_id.clone(),
                epoch: s.grant.epoch,
            }))
            .collect();
        let beat: HeartbeatResponse = self
            .client
            .post(
                "/api/v1/agent/heartbeat",
                &HeartbeatRequest {
                    capacity: self.capacity.clone(),
                    held,
                },
            )
            .await?;
        for task in beat.transfers {
            // copies run beside the loop, so heartbeats go on however big the data is
            let client = self.client.clone();
            tokio::spawn(async move {
                let report = match copy(&task).await {
                    Ok(()) => FlowReport {
                        ok: true,
                        error: None,
                    },
                    Err(e) => {
                        tracing::warn!(flow = %task.id, error = %e, "copy failed");
                        FlowReport {
                            ok: false,
                            error: Some(e.to_string()),
                        }
                    }
                };
                let path = format!("/api/v1/agent/flows/{}/report", task.id);
                if let Err(e) = client.post::<_, serde_json::Value>(&path, &report).await {
                    // unreported, the server hands the copy out again later
                    tracing::warn!(flow = %task.id, error = %e, "copy report not delivered");
                }
            });
        }
        for job_id in beat.stale {
            if self.drop_staging(&job_id).is_some() {
                tracing::warn!(job_id, "lease no longer valid: stopped staging its inputs");
                continue;
            }
            if self.tracked.contains_key(&job_id) {
                tracing::warn!(job_id, "lease no longer valid: stopping this copy");
            }
            self.stop_copy(&job_id).await;
        }
        for job_id in beat.cancel {
            if let Some(staging) = self.drop_staging(&job_id) {
                tracing::info!(
                    job_id,
                    "cancelling on request, before its inputs were staged"
                );
                let report = ReportRequest {
                    epoch: staging.grant.epoch,
                    status: Some(AgentStatus::Cancelled),
                    exit_code: None,
                    reason: Some("cancelled while its inputs were being staged".into()),
                    logs: vec![],
                    outputs: vec![],
                };
                self.send_report(&job_id, &report).await;
                continue;
            }
            if let Some(tracked) = self.tracked.get(&job_id) {
                if tracked.final_status.is_none() {
                    tracing::info!(job_id, "cancelling on request");
                    let _ = self
                        .engine_of(&tracked.handle)
                        .cancel(&tracked.handle)
                        .await;
                }
            }
        }
        let free = self
            .config
            .max_running
            .saturating_sub((self.tracked.len() + self.staging.len()) as u32);
        if free > 0 {
            let leases: LeaseResponse = self
                .client
                .post("/api/v1/agent/lease", &LeaseRequest { max: free })
                .await?;
            for grant in leases.leases {
                self.launch(grant).await;
            }
        }
        self.start_staged().await;
        let ids: Vec<String> = self.tracked.keys().cloned().collect();
        for job_id in ids {
            self.sync(&job_id).await;
        }
        Ok(())
    }

    async fn launch(&mut self, grant: LeaseGrant) {
        let mut env = grant.spec.env.clone();
        let outputs = grant.outputs.clone().map(|target| {
            let dir = self
                .config
                .work_dir
                .join("outputs")
                .join(format!("{}.{}", grant.job_id, grant.epoch));
            (target, dir)
        });
        if let Some((_, dir)) = &outputs {
            if let Err(e) = std::fs::create_dir_all(dir) {
                let report = ReportRequest {
                    epoch: grant.epoch,
                    status: Some(AgentStatus::Failed),
                    exit_code: None,
                    reason: Some(format!("outputs folder {}: {e}", dir.display())),
                    logs: vec![],
                    outputs: vec![],
                };
                self.send_report(&grant.job_id, &report).await;
                return;
            }
            env.insert("BAYGRID_OUTPUTS".into(), dir.display().to_string());
        }
        if grant.inputs.is_empty() {
            self.start(grant, env, outputs, None).await;
            return;
        }
        // inputs are copied beside the loop, so heartbeats go on however big they are; the
        // job starts on a later step, once they are all here
        let dir = self
            .config
            .work_dir
            .join("inputs")
            .join(format!("{}.{}", grant.job_id, grant.epoch));
        let task = tokio::spawn({
            let dir = dir.clone();
            let inputs = grant.inputs.clone();
            async move { stage_inputs(&dir, &inputs).await }
        });
        self.staging.insert(
            grant.job_id.clone(),
            Staging {
                grant,
                env,
                outputs,
                dir,
                task,
            },
        );
    }

    /// Starts the jobs whose inputs have all been staged; fails those whose staging failed.
    async fn start_staged(&mut self) {
        let done: Vec<String> = self
            .staging
            .iter()
            .filter(|(_, s)| s.task.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for job_id in done {
            let Some(staging) = self.staging.remove(&job_id) else {
                continue;
            };
            let Staging {
                grant,
                mut env,
                outputs,
                dir,
                task,
            } = staging;
            let staged = match task.await {
                Ok(staged) => staged.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the copy stopped: {e}")),
            };
            match staged {
                Ok(()) => {
                    env.insert("BAYGRID_INPUTS".into(), dir.display().to_string());
                    for input in &grant.inputs {
                        env.insert(
                            input_variable(&input.dataset),
                            dir.join(&input.dataset).display().to_string(),
                        );
                    }
                    self.start(grant, env, outputs, Some(dir)).await;
                }
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "staging inputs failed");
                    remove_folders(Some(&dir), outputs.as_ref().map(|(_, d)| d));
                    let report = ReportRequest {
                        epoch: grant.epoch,
                        status: Some(AgentStatus::Failed),
                        exit_code: None,
                        reason: Some(format!("staging inputs: {e}")),
                        logs: vec![],
                        outputs: vec![],
                    };
                    self.send_report(&job_id, &report).await;
                }
            }
        }
    }

    /// Stops staging a job's inputs and removes what it had copied (the job never started).
    fn drop_staging(&mut self, job_id: &str) -> Option<Staging> {
        let staging = self.staging.remove(job_id)?;
        staging.task.abort();
        remove_folders(Some(&staging.dir), staging.outputs.as_ref().map(|(_, d)| d));
        Some(staging)
    }

    /// Launches a granted job whose inputs, if any, are staged in `staged`.
    async fn start(
        &mut self,
        grant: LeaseGrant,
        env: BTreeMap<String, String>,
        outputs: Option<(baygrid_api::OutputsTarget, PathBuf)>,
        staged: Option<PathBuf>,
    ) {
        let spec = LaunchSpec {
            job_id: grant.job_id.clone(),
            tenant: grant.tenant.clone(),
            epoch: grant.epoch,
            command: grant.spec.command.clone(),
            env,
            image: grant.spec.image.clone(),
            nodes: grant.spec.resources.nodes,
            node_indices: grant.allocation.nodes.clone(),
            accelerator: grant.allocation.accelerator.clone(),
            accelerators_per_node: grant.allocation.accelerators_per_node,
            cpus_per_node: grant.allocation.cpus_per_node,
            memory_gb_per_node: grant.allocation.memory_gb_per_node,
            time_limit: Some(grant.spec.estimated_duration.0),
            held: grant.held_seconds.map(std::time::Duration::from_secs),
            no_network: grant.no_network,
            folders: staged
                .iter()
                .map(|path| Folder {
                    path: path.clone(),
                    writable: false,
                })
                .chain(outputs.iter().map(|(_, dir)| Folder {
                    path: dir.clone(),
                    writable: true,
                }))
                .collect(),
        };
        // a fusion worker's job runs the worker its lease carries, inside this agent
        let (engine, launched): (Arc<dyn Engine>, _) = match (&grant.spec.fusion, grant.fusion.clone()) {
            (None, _) => (self.engine.clone(), self.engine.launch(&spec).await),
            (Some(_), Some(work)) => (
                self.workers.clone(),
                Ok(self.workers.start(&grant.job_id, grant.epoch, work)),
            ),
            (Some(part), None) => (
                self.workers.clone(),
                Err(baygrid_exec::ExecError::Refused(format!(
                    "no work came with fusion run {}'s worker {}: the run has ended, the worker started before and cannot rejoin it, or the server could not start it (its log says why)",
                    part.run, part.index
                ))),
            ),
        };
        match launched {
            Ok(handle) => {
                let tracked = Tracked {
                    handle,
                    // a protected job's log stays at the site, whole, among its outputs
                    cursor: LogCursor::new(match outputs {
                        Some(_) => baygrid_exec::OutputLimits::whole(),
                        None => self.config.output,
                    }),
                    next_seq: 1,
                    final_status: None,
                    // an engine without limits of its own is stopped by the agent
                    stop_at_ms: grant
                        .held_seconds
                        .filter(|_| !engine.enforces_time_limit())
                        .map(|s| unix_ms() + (s as i64).saturating_mul(1000)),
                    outputs,
                    kept: None,
                };
                self.persist_durably(&grant.job_id, &tracked);
                self.tracked.insert(grant.job_id.clone(), tracked);
                let report = ReportRequest {
                    epoch: grant.epoch,
                    status: Some(AgentStatus::Running),
                    exit_code: None,
                    reason: None,
                    logs: vec![],
                    outputs: vec![],
                };
                self.send_report(&grant.job_id, &report).await;
            }
            Err(e) => {
                tracing::warn!(job_id = %grant.job_id, error = %e, "launch failed");
                remove_folders(staged.as_ref(), outputs.as_ref().map(|(_, d)| d));
                let report = ReportRequest {
                    epoch: grant.epoch,
                    status: Some(AgentStatus::Failed),
                    exit_code: None,
                    reason: Some(format!("{} engine: {e}", engine.kind())),
                    logs: vec![],
                    outputs: vec![],
                };
                self.send_report(&grant.job_id, &report).await;
            }
        }
    }

    /// Sends a report; a stale lease stops and forgets the job. Returns whether it landed.
    async fn send_report(&mut self, job_id: &str, report: &ReportRequest) -> bool {
        matches!(self.try_report(job_id, report).await, Sent::Delivered)
    }

    /// Sends a report, and in place of one the server refuses for good (400, 413, 422:
    /// resent, it would be refused for ever and the job would never end) what
    /// [`refused_fallback`] makes of it.
    async fn try_report(&mut self, job_id: &str, report: &ReportRequest) -> Sent {
        match self.post_report(job_id, report).await {
            Sent::Refused(e) => {
                tracing::error!(job_id, error = %e, "the server refused the job's report; sending what it can take");
                self.post_report(job_id, &refused_fallback(report, &e))
                    .await
            }
            sent => sent,
        }
    }

    async fn post_report(&mut self, job_id: &str, report: &ReportRequest) -> Sent {
        let path = format!("/api/v1/agent/jobs/{job_id}/report");
        match self
            .client
            .post::<_, serde_json::Value>(&path, report)
            .await
        {
            Ok(_) => Sent::Delivered,
            Err(e) if matches!(e.status(), Some(409 | 404)) => {
                tracing::warn!(job_id, error = %e, "server refused the report: stopping this copy");
                self.stop_copy(job_id).await;
                Sent::Stale
            }
            Err(e) if matches!(e.status(), Some(400 | 413 | 422)) => Sent::Refused(e),
            Err(e) => {
                tracing::warn!(job_id, error = %e, "report not delivered; will resend");
                Sent::Later
            }
        }
    }

    /// Ships new output and, once the job has ended, its final status.
    async fn sync(&mut self, job_id: &str) {
        let Some(mut tracked) = self.tracked.get(job_id).cloned() else {
            return;
        };
        // a protected job's outputs are written to the vault beside the loop (heartbeats go
        // on however big they are); once they are, its final report can go
        if let Some(task) = self.keeping.get(job_id) {
            if !task.is_finished() {
                return;
            }
            let task = self.keeping.remove(job_id).expect("seen just now");
            let kept = match task.await {
                Ok(kept) => kept.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the upload stopped: {e}")),
            };
            match kept {
                Ok(files) => tracked.kept = Some(files),
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "cannot keep the job's outputs");
                    tracked.final_status = Some(FinalStatus {
                        status: AgentStatus::Failed,
                        exit_code: None,
                        reason: format!("keeping outputs in the site's vault: {e}"),
                    });
                    tracked.kept = Some(Vec::new());
                }
            }
            self.persist(job_id, &tracked);
            self.tracked.insert(job_id.to_string(), tracked.clone());
        }
        if tracked.final_status.is_none() {
            match self
                .engine_of(&tracked.handle)
                .status(&tracked.handle)
                .await
            {
                Ok(JobStatus::Running) => {
                    if tracked.stop_at_ms.is_some_and(|at| unix_ms() >= at) {
                        tracing::info!(job_id, "the job's hold ran out; stopping it");
                        if let Err(e) = self
                            .engine_of(&tracked.handle)
                            .cancel(&tracked.handle)
                            .await
                        {
                            tracing::warn!(job_id, error = %e, "cannot stop the job");
                            return;
                        }
                        tracked.final_status = Some(FinalStatus {
                            status: AgentStatus::Failed,
                            exit_code: None,
                            reason: "stopped: the job ran for all the time its hold pays for"
                                .into(),
                        });
                    }
                }
                Ok(status) => tracked.final_status = Some(final_of(status)),
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "cannot read job status");
                    return;
                }
            }
        }
        let mut cursor = tracked.cursor.clone();
        let lines = if tracked.kept.is_some() {
            // the outputs, its log among them, are in the vault as they were
            Vec::new()
        } else {
            match self
                .engine_of(&tracked.handle)
                .read_output(&tracked.handle, &mut cursor)
                .await
            {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "cannot read job output");
                    Vec::new()
                }
            }
        };
        // an ended job whose output is not all read yet reports it over the next steps, each
        // a bounded piece, and its last report waits for the rest
        let draining = cursor.is_behind();
        // a protected job's output stays at the site: appended to its log file among its
        // outputs (the cursor kept at once, so no line is written twice)
        let lines = match &tracked.outputs {
            Some((_, dir)) => {
                if let Err(e) = append_log(dir, &lines) {
                    tracing::warn!(job_id, error = %e, "cannot keep the job's output");
                    return;
                }
                tracked.cursor = cursor.clone();
                self.persist(job_id, &tracked);
                Vec::new()
            }
            None => lines,
        };
        let mut kept = Vec::new();
        if let (Some((target, dir)), Some(_), false) =
            (&tracked.outputs, &tracked.final_status, draining)
        {
            match &tracked.kept {
                Some(files) => kept = files.clone(),
                None => {
                    let task = tokio::spawn({
                        let (target, dir, job_id) =
                            (target.clone(), dir.clone(), job_id.to_string());
                        async move { keep_outputs(&target, &dir, &job_id).await }
                    });
                    self.keeping.insert(job_id.to_string(), task);
                    self.persist(job_id, &tracked);
                    self.tracked.insert(job_id.to_string(), tracked);
                    return;
                }
            }
        }
        let mut logs = Vec::with_capacity(lines.len());
        let mut seq = tracked.next_seq;
        for line in lines {
            logs.push(LogLineIn {
                seq,
                stream: line.stream,
                line: line.line,
            });
            seq += 1;
        }
        // ship output in pages, then the status with the last page
        let pages = pages(logs);
        let page_count = pages.len();
        for (i, page) in pages.into_iter().enumerate() {
            let last = i + 1 == page_count && !draining;
            let status = if last {
                tracked.final_status.as_ref()
            } else {
                None
            };
            if page.is_empty() && status.is_none() {
                continue;
            }
            let report = ReportRequest {
                epoch: tracked.handle.epoch,
                status: status.map(|s| s.status),
                exit_code: status.and_then(|s| s.exit_code),
                reason: status.map(|s| s.reason.clone()),
                logs: page,
                outputs: if last { kept.clone() } else { vec![] },
            };
            let sent = self.try_report(job_id, &report).await;
            if let Sent::Refused(e) = &sent {
                // not even the fallback was taken: this copy cannot report, so it stops,
                // and the server takes the job back when the lease lapses
                tracing::error!(job_id, error = %e, "the server refused the job's reports: stopping this copy");
                self.stop_copy(job_id).await;
                return;
            }
            if !matches!(sent, Sent::Delivered) {
                // keep what was not delivered for the next step (if the job is still ours)
                if let Some(kept) = self.tracked.get_mut(job_id) {
                    kept.final_status = tracked.final_status.clone();
                    let snapshot = kept.clone();
                    self.persist(job_id, &snapshot);
                }
                return;
            }
        }
        tracked.cursor = cursor;
        tracked.next_seq = seq;
        if tracked.final_status.is_some() && !draining {
            self.forget(job_id);
        } else {
            self.persist(job_id, &tracked);
            self.tracked.insert(job_id.to_string(), tracked);
        }
    }
}

/// What became of a report.
enum Sent {
    Delivered,
    /// The lease is no longer this copy's: the job was stopped and forgotten here.
    Stale,
    /// Refused for what it carries; sent again it would be refused again.
    Refused(ClientError),
    /// Not delivered now (the server unreachable or failing): kept to send again.
    Later,
}

/// What an agent sends in place of a report the server refused for what it carries: one
/// line saying so in place of its output lines and, where it carried a protected job's
/// outputs (which the exchange would not register), the job failed with the refusal as
/// its reason and no outputs. A status without outputs stands.
fn refused_fallback(report: &ReportRequest, error: &ClientError) -> ReportRequest {
    let logs = report
        .logs
        .first()
        .map(|first| LogLineIn {
            seq: first.seq,
            stream: "stderr".into(),
            line: format!(
                "[{} lines of output were not kept: the exchange refused them: {error}]",
                report.logs.len()
            ),
        })
        .into_iter()
        .collect();
    let refused_outputs = !report.outputs.is_empty();
    ReportRequest {
        epoch: report.epoch,
        status: if refused_outputs {
            Some(AgentStatus::Failed)
        } else {
            report.status
        },
        exit_code: report.exit_code,
        reason: if refused_outputs {
            Some(format!(
                "the exchange refused the job's outputs at the site: {error}"
            ))
        } else {
            report.reason.clone()
        },
        logs,
        outputs: vec![],
    }
}

/// The most lines in one report.
const PAGE_LINES: usize = 2_000;
/// The most bytes of lines in one report, as JSON writes them: well inside the server's
/// limit on a request body, however long the lines (each is at most
/// [`baygrid_exec::LINE_BYTES`] and a note, at most six bytes a character in JSON).
const PAGE_BYTES: usize = 1 << 20;

/// Output lines in reports' pages; one empty page when there are none, to carry a status.
fn pages(logs: Vec<LogLineIn>) -> Vec<Vec<LogLineIn>> {
    let mut pages = vec![Vec::new()];
    let mut bytes = 0;
    for line in logs {
        let size = json_size(&line);
        let last = pages.last_mut().expect("one page at least");
        if !last.is_empty() && (last.len() >= PAGE_LINES || bytes + size > PAGE_BYTES) {
            pages.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        pages.last_mut().expect("just pushed").push(line);
    }
    pages
}

/// About what a line takes in a report's JSON: its text as escaped (a control character is
/// six bytes, `"` and `\` two), its stream and the fields around them.
fn json_size(line: &LogLineIn) -> usize {
    let escaped = |text: &str| -> usize {
        text.chars()
            .map(|c| match c {
                '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            })
            .sum()
    };
    escaped(&line.line) + escaped(&line.stream) + 48
}

fn final_of(status: JobStatus) -> FinalStatus {
    match status {
        JobStatus::Running => unreachable!("only called for ended jobs"),
        JobStatus::Succeeded => FinalStatus {
            status: AgentStatus::Succeeded,
            exit_code: Some(0),
            reason: "exit code 0".into(),
        },
        JobStatus::Failed { exit_code, reason } => FinalStatus {
            status: AgentStatus::Failed,
            exit_code,
            reason,
        },
        JobStatus::Cancelled { reason } => FinalStatus {
            status: AgentStatus::Cancelled,
            exit_code: None,
            reason: format!("cancelled: {reason}"),
        },
        JobStatus::Lost { reason } => FinalStatus {
            status: AgentStatus::Lost,
            exit_code: None,
            reason,
        },
    }
}

/// `BAYGRID_INPUT_<NAME>`: the folder one input is staged in (`-` becomes `_`).
fn input_variable(dataset: &str) -> String {
    format!(
        "BAYGRID_INPUT_{}",
        dataset.to_ascii_uppercase().replace('-', "_")
    )
}

/// Copies each input's files from its vault into `dir/<dataset>/`, checking every file
/// against the digest recorded at upload.
/// Removes a job's staged inputs and outputs folders, when it will not run here.
fn remove_folders(staged: Option<&PathBuf>, outputs: Option<&PathBuf>) {
    for dir in staged.into_iter().chain(outputs) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn stage_inputs(
    dir: &std::path::Path,
    inputs: &[baygrid_api::StagedInput],
) -> Result<(), baygrid_vault::VaultError> {
    for input in inputs {
        baygrid_vault::Vault::open(&input.vault_url)?
            .get_upload(
                &input.dataset,
                &input.upload,
                &input.files,
                &dir.join(&input.dataset),
            )
            .await?;
    }
    Ok(())
}

/// Copies each file of a flow from the source vault to the destination's, digests checked.
async fn copy(task: &baygrid_api::FlowTask) -> Result<(), baygrid_vault::VaultError> {
    let from = baygrid_vault::Vault::open(&task.source_url)?;
    let to = baygrid_vault::Vault::open(&task.destination_url)?;
    for file in &task.files {
        from.copy_to(
            &baygrid_vault::object_key(&task.dataset, &task.upload, &file.name),
            &file.sha256,
            &to,
            &baygrid_vault::object_key(&task.copy_as, &task.copy_upload, &file.name),
        )
        .await?;
    }
    Ok(())
}

/// Appends a protected job's output lines to `job.log` among its outputs.
fn append_log(dir: &std::path::Path, lines: &[baygrid_exec::OutputLine]) -> std::io::Result<()> {
    use std::io::Write;
    if lines.is_empty() {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("job.log"))?;
    for line in lines {
        writeln!(file, "{}: {}", line.stream, line.line)?;
    }
    file.sync_all()
}

/// Writes every file a protected job left in its outputs folder (and its log) to the
/// site's vault under the derived dataset, with digests.
async fn keep_outputs(
    target: &baygrid_api::OutputsTarget,
    dir: &std::path::Path,
    job_id: &str,
) -> Result<Vec<baygrid_api::VersionFile>, baygrid_vault::VaultError> {
    let vault = baygrid_vault::Vault::open(&target.vault_url)?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| baygrid_vault::VaultError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    let safe_names = vault_names(&names);
    let mut files = Vec::new();
    for (name, safe) in names.into_iter().zip(safe_names) {
        let path = dir.join(&name);
        let Some(safe) = safe else {
            tracing::warn!(job_id, name, "an output file with no name to keep it under");
            continue;
        };
        let stored = vault
            .put_file(
                &baygrid_vault::object_key(&target.dataset, job_id, &safe),
                &path,
            )
            .await?;
        let csv = safe.to_ascii_lowercase().ends_with(".csv");
        let rows = if csv {
            std::fs::read_to_string(&path)
                .map(|t| t.lines().count().saturating_sub(1) as u64)
                .unwrap_or(0)
        } else {
            0
        };
        files.push(baygrid_api::VersionFile {
            name: safe,
            bytes: stored.bytes,
            sha256: stored.sha256,
            rows,
            format: if csv { "csv" } else { "file" }.into(),
        });
    }
    Ok(files)
}

/// The names a protected job's output files are kept under, in the order given. What the
/// job names its files is its own business, but the exchange accepts a version's files
/// only under distinct names it takes ([`baygrid_api::is_file_name`]). Such a name is
/// kept; any other has each character a name may not hold replaced by `_` and its leading
/// dots dropped, is cut to fit (its extension kept), and takes `-2`, `-3`, … before its
/// extension where that name is taken. None where nothing is left of it.
fn vault_names(names: &[String]) -> Vec<Option<String>> {
    use baygrid_api::{is_file_name, is_file_name_char, FILE_NAME_MAX};
    let mut taken: std::collections::BTreeSet<String> =
        names.iter().filter(|n| is_file_name(n)).cloned().collect();
    names
        .iter()
        .map(|name| {
            if is_file_name(name) {
                return Some(name.clone());
            }
            let replaced: String = name
                .chars()
                .map(|c| if is_file_name_char(c) { c } else { '_' })
                .collect();
            let replaced = replaced.trim_start_matches('.');
            if replaced.is_empty() {
                return None;
            }
            // the extension, when it is short, survives the cut and the numbering
            let (stem, extension) = match replaced.rfind('.') {
                Some(dot) if dot > 0 && replaced.len() - dot <= 16 => replaced.split_at(dot),
                _ => (replaced, ""),
            };
            (1..)
                .map(|n| {
                    let suffix = if n == 1 {
                        String::new()
                    } else {
                        format!("-{n}")
                    };
                    let room = FILE_NAME_MAX - extension.len() - suffix.len();
                    format!("{}{suffix}{extension}", &stem[..stem.len().min(room)])
                })
                .find(|candidate| !taken.contains(candidate))
                .inspect(|chosen| {
                    taken.insert(chosen.clone());
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_report_is_replaced_by_one_the_exchange_can_take() {
        let refused = ClientError::Api {
            status: 400,
            code: "bad_request".into(),
            message: "`a b` is not a file name".into(),
            field: Some("outputs: files[0].name".into()),
        };
        let line = |seq| LogLineIn {
            seq,
            stream: "stdout".into(),
            line: format!("line {seq}"),
        };
        let file = baygrid_api::VersionFile {
            name: "a b".into(),
            bytes: 1,
            sha256: "0".repeat(64),
            rows: 0,
            format: "file".into(),
        };
        // a final report with outputs: the job fails, saying why, and keeps no outputs
        let last = ReportRequest {
            epoch: 3,
            status: Some(AgentStatus::Succeeded),
            exit_code: Some(0),
            reason: Some("exit code 0".into()),
            logs: vec![line(10), line(11)],
            outputs: vec![file],
        };
        let fallback = refused_fallback(&last, &refused);
        assert_eq!(fallback.epoch, 3);
        assert_eq!(fallback.status, Some(AgentStatus::Failed));
        assert_eq!(fallback.exit_code, Some(0));
        let reason = fallback.reason.unwrap();
        assert!(reason.contains("refused the job's outputs"), "{reason}");
        assert!(reason.contains("is not a file name"), "{reason}");
        assert!(fallback.outputs.is_empty());
        assert_eq!(fallback.logs.len(), 1);
        assert_eq!(fallback.logs[0].seq, 10);
        assert!(fallback.logs[0]
            .line
            .starts_with("[2 lines of output were not kept"));
        // a page of lines alone: one line in their place, and no status
        let page = ReportRequest {
            status: None,
            exit_code: None,
            reason: None,
            outputs: vec![],
            ..last.clone()
        };
        let fallback = refused_fallback(&page, &refused);
        assert_eq!((fallback.status, fallback.reason), (None, None));
        assert_eq!(fallback.logs.len(), 1);
        // a status alone stands
        let status = ReportRequest {
            logs: vec![],
            outputs: vec![],
            ..last
        };
        let fallback = refused_fallback(&status, &refused);
        assert_eq!(fallback.status, Some(AgentStatus::Succeeded));
        assert_eq!(fallback.reason.as_deref(), Some("exit code 0"));
        assert!(fallback.logs.is_empty());
    }

    #[test]
    fn output_files_are_kept_under_distinct_names_the_exchange_accepts() {
        let long = format!("{}.csv", "r".repeat(200));
        let names: Vec<String> = [
            "counts.csv",
            "my results.csv",
            "my_results.csv",
            "my?results.csv",
            "结果.parquet",
            "...",
            long.as_str(),
            "job.log",
        ]
        .map(str::to_string)
        .to_vec();
        let kept = vault_names(&names);
        let expected_long = format!("{}.csv", "r".repeat(124));
        assert_eq!(
            kept,
            [
                Some("counts.csv"),
                // the file truly named my_results.csv keeps its name
                Some("my_results-2.csv"),
                Some("my_results.csv"),
                Some("my_results-3.csv"),
                Some("__.parquet"),
                None,
                Some(expected_long.as_str()),
                Some("job.log"),
            ]
            .map(|n| n.map(str::to_string))
        );
        // every name kept is one a dataset version accepts, together
        let files = kept
            .iter()
            .flatten()
            .map(|name| baygrid_api::VersionFile {
                name: name.clone(),
                bytes: 1,
                sha256: "0".repeat(64),
                rows: 0,
                format: "file".into(),
            })
            .collect();
        let version = baygrid_api::NewVersion {
            upload: "u1".into(),
            files,
            subjects: None,
        };
        version.validate().unwrap();
    }

    #[test]
    fn a_page_of_any_output_stays_within_its_size_as_json() {
        let texts = [
            "plain text".to_string(),
            "\u{1}".repeat(baygrid_exec::LINE_BYTES),
            "\"quoted\\\" \t tabbed \r".repeat(700),
            "\u{fffd}中文".repeat(2000),
        ];
        for text in texts {
            let line = LogLineIn {
                seq: 1_000_000,
                stream: "stderr.15".into(),
                line: text,
            };
            let written = serde_json::to_string(&line).unwrap().len() + 1;
            assert!(
                json_size(&line) >= written,
                "{} < {written}",
                json_size(&line)
            );
            let logs = vec![line; 400];
            for page in pages(logs) {
                let body = serde_json::to_string(&page).unwrap().len();
                assert!(body <= PAGE_BYTES + 16_384 * 6 + 64, "{body}");
            }
        }
    }
}
