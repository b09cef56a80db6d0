//! Aggregate queries at the data (可用不可见): the consumer's request, the cost and budget a
//! dry run shows, the released result, and what the vault's agent is handed and answers.

use baygrid_core::Money;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{DatasetSpec, QueryTerms, VersionFile};

/// The noise added to every released number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Laplace noise of scale sensitivity / ε.
    #[default]
    Laplace,
    /// Gaussian noise with the smallest σ the analytic Gaussian mechanism (Balle and Wang,
    /// 2018) allows for the aggregate's (ε, δ).
    Gaussian,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }
}

/// A consumer's query. The SQL names datasets as tables, writing each `-` of a dataset's
/// name as `_`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// The dataset asked about; a query across two vaults names the other in its SQL.
    pub dataset: String,
    pub sql: String,
    /// The purpose of the query contract; when absent, that of the consumer's only active
    /// query contract on the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The query's ε, split over its aggregations (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The query's δ when it groups or uses the Gaussian mechanism (default: a hundredth
    /// of the offer's δ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// The noise on released numbers: `laplace` (ε-DP, the default) or `gaussian`
    /// ((ε, δ)-DP, the analytic Gaussian mechanism; spends δ even ungrouped).
    #[serde(default)]
    pub mechanism: Mechanism,
    /// Show the cost and the budgets left; spend nothing and run nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// How long the request waits for the answer before returning the running query
    /// (milliseconds, default 30,000, at most 120,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// One dataset's budget this period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BudgetView {
    pub dataset: String,
    /// The consumer's own budget per period, and what is left of it.
    pub epsilon: f64,
    pub epsilon_left: f64,
    pub delta: f64,
    pub delta_left: f64,
    /// The budget every consumer of the dataset shares, and what is left of it.
    pub shared_epsilon: f64,
    pub shared_epsilon_left: f64,
    pub shared_delta: f64,
    pub shared_delta_left: f64,
    /// RFC 3339: when the period ends and both refill.
    pub resets_at: String,
}

/// What a query costs one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryCostView {
    pub dataset: String,
    /// The vault's site, where this side runs.
    pub site: String,
    pub contract: String,
    pub epsilon: f64,
    pub delta: f64,
    /// Equal shares ε is split into: the individuals' threshold count and each aggregate's
    /// own (AVG takes two).
    pub shares: u32,
    /// Per share.
    pub epsilon_each: f64,
    pub budget: BudgetView,
}

/// A dry run's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryDryRun {
    pub columns: Vec<String>,
    pub cost: Vec<QueryCostView>,
    /// Whether both budgets of every dataset have room for it now.
    pub fits: bool,
    /// The price of running it, per dataset's offer.
    pub price: Vec<Money>,
}

/// The noise on one released column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NoiseNote {
    pub output: String,
    pub mechanism: String,
    /// The Laplace scale b (standard deviation b·√2), or the Gaussian's standard
    /// deviation σ.
    pub scale: f64,
}

/// The released answer: the rows of the groups that passed their thresholds. Nothing in
/// it tells how many groups were held back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryResult {
    pub columns: Vec<String>,
    #[schema(value_type = Vec<Vec<Object>>)]
    pub rows: Vec<Vec<serde_json::Value>>,
    pub noise: Vec<NoiseNote>,
}

impl QueryResult {
    /// SHA-256 of the result's JSON: what the audit log records at release.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).expect("a result serialises");
        hex::encode(sha2::Sha256::digest(bytes))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueryState {
    /// Accepted and spent; the vaults' agents are answering.
    Running,
    /// The result left the vault.
    Released,
    /// The rules did not let the result leave: nothing was released or charged.
    Withheld,
    /// A vault could not answer; nothing was released or charged (the budget stays spent).
    Failed,
}

impl QueryState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryState::Running => "running",
            QueryState::Released => "released",
            QueryState::Withheld => "withheld",
            QueryState::Failed => "failed",
        }
    }
}

/// A query and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryView {
    pub id: String,
    pub tenant: String,
    pub sql: String,
    pub purpose: String,
    pub state: QueryState,
    pub cost: Vec<QueryCostView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<QueryResult>,
    /// SHA-256 of the result, as the audit log records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_sha256: Option<String>,
    /// The rules that decided the result's release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charged: Vec<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// A dataset as a query's side reads it: its facts, its offer's terms and its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryTable {
    pub dataset: DatasetSpec,
    pub terms: QueryTerms,
    pub upload: String,
    pub files: Vec<VersionFile>,
    pub vault_url: String,
}

/// What a vault's agent answers: one side of a query, over its own dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryTask {
    pub query: String,
    /// The dataset this agent answers for.
    pub dataset: String,
    pub sql: String,
    /// Every dataset the query reads (the agent plans and checks the whole query again).
    pub tables: Vec<QueryTable>,
    pub epsilon: f64,
    pub delta: f64,
    #[serde(default)]
    pub mechanism: Mechanism,
    /// For a query across two vaults: this side's role in the private set intersection
    /// (`sender` or `receiver`); absent for one vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi_role: Option<String>,
}

/// One released group of a side's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupAnswer {
    #[schema(value_type = Vec<Object>)]
    pub key: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub values: Vec<serde_json::Value>,
    /// The noisy count of individuals the threshold was tested on.
    pub subjects: f64,
}

/// One side's answer: its released groups only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SideAnswer {
    /// The dataset's name as a table in SQL.
    pub table: String,
    pub groups: Vec<GroupAnswer>,
    pub threshold: f64,
    /// Per aggregate: the Laplace scale, or the Gaussian's σ.
    pub scales: Vec<f64>,
    #[serde(default)]
    pub mechanism: Mechanism,
}

/// The agent's word on its side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryAnswerBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<SideAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
