//! Cluster engines behind one trait. baygrid federates engines; it never replaces them.
//!
//! An engine launches a job's gang, reports its status, hands over its output and stops it.
//! A [`JobHandle`] is plain data: the agent persists it, and after a restart gives it back to
//! [`Engine::status`] to re-attach to a job that is still running.

#[cfg(feature = "k8s")]
pub mod kubernetes;
mod kubernetes_config;
mod local;
mod output;
mod slurm;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[cfg(feature = "k8s")]
pub use kubernetes::KubernetesEngine;
pub use kubernetes_config::{KubernetesConfig, WorkVolume};
pub use local::LocalEngine;
pub use output::{LogCursor, OutputLimits, LINE_BYTES, READ_BYTES, READ_LINES};
pub use slurm::{map_state as map_slurm_state, SlurmConfig, SlurmEngine};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("launch failed: {0}")]
    Launch(String),
    #[error("engine i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("engine refused the job: {0}")]
    Refused(String),
    #[error("job handle is not this engine's: {0}")]
    ForeignHandle(String),
}

/// What to run: one command on each of `nodes` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub job_id: String,
    /// The tenant the job runs for (engines with namespaces keep tenants apart by it).
    pub tenant: String,
    pub epoch: i64,
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub image: Option<String>,
    pub nodes: u32,
    /// Node indices in the cluster, one per rank.
    pub node_indices: Vec<u32>,
    /// The accelerator model each node uses, if any.
    pub accelerator: Option<String>,
    pub accelerators_per_node: u32,
    pub cpus_per_node: u32,
    pub memory_gb_per_node: u32,
    /// The job's estimated duration; engines with time limits derive theirs from it.
    pub time_limit: Option<std::time::Duration>,
    /// How long the job's hold pays for: an engine's own limit never exceeds it (beyond the
    /// engine's resolution, such as Slurm's minute).
    pub held: Option<std::time::Duration>,
    /// The job reads personal, important or core data: it must run with no network
    /// access. An engine that cannot isolate it refuses the job.
    pub no_network: bool,
    /// Folders on the agent's machine the job reads or writes at the paths its environment
    /// names (its staged inputs, its outputs). An engine that cannot show them to the job
    /// at those paths refuses it.
    pub folders: Vec<Folder>,
}

/// A folder of the agent's that a job sees at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folder {
    pub path: PathBuf,
    /// The job writes into it (its outputs); otherwise it only reads (staged inputs).
    pub writable: bool,
}

/// What an engine reports about its cluster's capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineCapacity {
    /// Nodes that can take work.
    pub nodes: u32,
    pub accelerators_per_node: u32,
    pub cpus_per_node: u32,
    pub memory_gb_per_node: u32,
}

/// Everything needed to find a launched job again, even from a new agent process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHandle {
    pub job_id: String,
    pub epoch: i64,
    pub engine: String,
    pub dir: PathBuf,
    /// Engine-specific data (process ids, a Slurm job id, a Kubernetes Job name).
    pub detail: serde_json::Value,
}

/// Where a launched job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    Running,
    Succeeded,
    Failed {
        exit_code: Option<i64>,
        reason: String,
    },
    Cancelled {
        reason: String,
    },
    /// The engine has no trace of the job.
    Lost {
        reason: String,
    },
}

impl JobStatus {
    pub fn is_final(&self) -> bool {
        !matches!(self, JobStatus::Running)
    }
}

/// A line of output, from a stream such as `stdout` (rank 0) or `stderr.2` (rank 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: String,
    pub line: String,
}

/// A cluster engine.
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// `local`, `slurm` or `kubernetes`.
    fn kind(&self) -> &'static str;

    /// Starts every rank of the gang, or none.
    async fn launch(&self, spec: &LaunchSpec) -> Result<JobHandle, ExecError>;

    /// Where the job stands; also how a restarted agent re-attaches.
    async fn status(&self, handle: &JobHandle) -> Result<JobStatus, ExecError>;

    /// Output written since `cursor`; complete lines only.
    async fn read_output(
        &self,
        handle: &JobHandle,
        cursor: &mut LogCursor,
    ) -> Result<Vec<OutputLine>, ExecError>;

    /// Stops every rank.
    async fn cancel(&self, handle: &JobHandle) -> Result<(), ExecError>;

    /// Whether the engine stops a job at its time limit itself (Slurm does); otherwise the
    /// agent stops it when its hold runs out.
    fn enforces_time_limit(&self) -> bool {
        false
    }

    /// The cluster's capacity as the engine sees it; `None` when the engine has no view of
    /// its own (the local engine runs within the cluster's declared capacity).
    async fn capacity(&self) -> Result<Option<EngineCapacity>, ExecError> {
        Ok(None)
    }
}
