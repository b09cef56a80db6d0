//! Fusion training runs across vaults: what a consumer asks for, what it sees, and what the
//! vaults' agents are handed and report.

use baygrid_core::{Jurisdiction, Money};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{OutputsTarget, VersionFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FusionTask {
    Psi,
    HomoLr,
    HomoMlp,
    HeteroLr,
}

impl FusionTask {
    pub fn as_str(self) -> &'static str {
        match self {
            FusionTask::Psi => "psi",
            FusionTask::HomoLr => "homo-lr",
            FusionTask::HomoMlp => "homo-mlp",
            FusionTask::HeteroLr => "hetero-lr",
        }
    }
}

/// One party of a run: a name the run's figures use, and the dataset it trains on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FusionParty {
    pub name: String,
    pub dataset: String,
}

/// `POST /api/v1/fusion`: a run over the parties' datasets, each under a `federated`
/// contract of the tenant's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FusionRequest {
    pub task: FusionTask,
    pub parties: Vec<FusionParty>,
    /// The contracts' purpose; needed only when the contracts have several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The trainer's hyper-parameters (rounds, learning_rate, alpha, decay, batch_size,
    /// secure_threshold, plain, dp, seed; `hidden` for homo-mlp).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// The compute the hold covers: this many minutes of every worker (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<u64>,
    /// A priority class named in the server's config (`priority_classes`) for the
    /// workers' jobs in the dispatcher's queue; the default priority when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FusionState {
    Running,
    /// Every party's model is in its vault, released by the rules, and the run charged.
    Succeeded,
    /// A worker failed or the rules withheld the model; the hold is voided.
    Failed,
    Cancelled,
}

impl FusionState {
    pub fn as_str(self) -> &'static str {
        match self {
            FusionState::Running => "running",
            FusionState::Succeeded => "succeeded",
            FusionState::Failed => "failed",
            FusionState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Waiting for an agent at its site.
    Pending,
    Running,
    Done,
    Failed,
}

/// One worker of a run: the aggregator or, in a vertical run, the dealer (index 0), or a
/// party (1..), placed at a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FusionWorker {
    pub index: usize,
    /// `aggregator`, `dealer`, or the party's name.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub site: String,
    pub jurisdiction: Jurisdiction,
    pub state: WorkerState,
    /// The worker's job in the dispatcher's queue, which places it at its site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The cluster whose agent runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Seconds from the worker's start to its last report (its job is metered and
    /// charged as a job).
    #[serde(default)]
    pub seconds: f64,
    /// The derived dataset the party's copy of the model was saved as, in its vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// AUC, KS and accuracy of the final model on the party's own rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub scores: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One round's figures, as the aggregator (horizontal) or the guest (vertical) reports
/// them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FusionRound {
    pub round: usize,
    /// The weighted training loss before the round (horizontal runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The norm of the guest's gradient (vertical runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_norm: Option<f64>,
    pub seconds: f64,
    /// Bytes the reporting worker sent and received in the round.
    pub bytes: usize,
}

/// A line of a run's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FusionEvent {
    pub at: String,
    pub line: String,
}

/// A run and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FusionView {
    pub id: String,
    pub tenant: String,
    pub task: FusionTask,
    pub purpose: String,
    pub state: FusionState,
    /// `plain` or `secure` (with its threshold), once the aggregator has said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<String>,
    pub workers: Vec<FusionWorker>,
    /// Why the aggregator is where it is: each candidate site and the rules' word on it.
    pub placement: Vec<String>,
    /// The rules every `model_update` flow of the run was decided under.
    pub rules: Vec<String>,
    pub rounds: Vec<FusionRound>,
    /// The hold placed at submission (CNY).
    pub held: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// The dataset a party's worker trains on: the version to stage, where, with digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PartyTable {
    pub dataset: String,
    pub upload: String,
    pub files: Vec<VersionFile>,
    pub vault_url: String,
}

/// What a vault's agent is handed: one worker of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FusionWork {
    pub run: String,
    pub task: FusionTask,
    /// 0 for the aggregator or dealer; the party's number otherwise (in a vertical run 1
    /// is the guest, 2 the host).
    pub index: usize,
    pub parties: usize,
    /// The trainer's settings, complete.
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// A party's dataset (none for the aggregator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<PartyTable>,
    /// Where a party saves its copy of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<OutputsTarget>,
    /// How long a worker waits for a message before it gives up on the run.
    pub wait_ms: u64,
}

/// A party's end: its copy of the model in its vault, and its scores on its own rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PartyDone {
    pub files: Vec<VersionFile>,
    #[schema(value_type = Object)]
    pub scores: serde_json::Value,
}

/// `POST /api/v1/agent/fusion/{id}/report?index=N`: one of a round's figures (the
/// aggregator), the aggregation used, a party's end, a worker's end, or its error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FusionReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<FusionRound>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub party: Option<PartyDone>,
    /// The worker has finished its part.
    #[serde(default)]
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
