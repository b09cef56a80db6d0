//! The HTTP API's wire types (`/api/v1`) and a typed client.
//!
//! Only the edge knows the wire format: the server maps domain records to these types, and
//! the CLI and the agent speak through [`Client`].

mod client;
mod dataset;
mod fusion;
mod offer;
mod query;
pub mod relay;

pub use client::{patiently, Client, ClientError, PATIENCE};
pub use dataset::{
    is_file_name, is_file_name_char, Column, ColumnType, DatasetError, DatasetSpec, DatasetVersion,
    DatasetView, NewVersion, VaultView, VersionFile, FILE_NAME_MAX,
};
pub use fusion::{
    FusionEvent, FusionParty, FusionReport, FusionRequest, FusionRound, FusionState, FusionTask,
    FusionView, FusionWork, FusionWorker, PartyDone, PartyTable, WorkerState,
};
pub use offer::{
    ContractRequest, ContractState, ContractView, DataOfferSpec, DataOfferView, FlowReport,
    FlowRequestBody, FlowState, FlowTask, FlowView, ObligationView, OfferMode, OfferPrice,
    QueryTerms, AGGREGATES,
};
pub use query::{
    BudgetView, GroupAnswer, Mechanism, NoiseNote, QueryAnswerBody, QueryCostView, QueryDryRun,
    QueryRequest, QueryResult, QueryState, QueryTable, QueryTask, QueryView, SideAnswer,
};

use baygrid_core::{AcceleratorModel, Allocation, Cluster, JobSpec, JobState, Money, Role, Tenant};
use baygrid_sched::Quote;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error the API returns: a stable machine-readable code, a message, and the field
/// at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A cluster with its agent's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    #[serde(flatten)]
    pub cluster: Cluster,
    pub jurisdiction: baygrid_core::Jurisdiction,
    /// An agent heartbeated within the lease TTL.
    pub online: bool,
    pub agent_seen_at: Option<String>,
    pub accelerators_total: u32,
    pub accelerators_in_use: u32,
    /// What the agent last reported: the engine's own view where it has one (Slurm's
    /// `sinfo`), else the declared capacity.
    pub reported: Option<Capacity>,
}

/// A tenant with what it has spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    #[serde(flatten)]
    pub tenant: Tenant,
    /// Charged to the wallet so far.
    pub spent: Money,
    /// Held for jobs not yet settled.
    pub held: Money,
    /// What the wallet can still cover.
    pub available: Money,
}

/// One transition in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobEventView {
    pub at: String,
    pub from: Option<JobState>,
    pub to: JobState,
    pub reason: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub state: JobState,
    pub reason: String,
    pub priority: i64,
    pub submitted_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub cluster: Option<String>,
    pub site: Option<String>,
    pub engine: Option<String>,
    pub allocation: Option<Allocation>,
    pub attempts: i64,
    pub exit_code: Option<i64>,
    /// Metered cost in CNY, once the job has ended.
    pub cost: Option<Money>,
    pub spec: JobSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<JobEventView>,
}

/// A quote: every cluster's verdict for a spec, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuoteView {
    /// The cluster the job would go to now, if any.
    pub chosen: Option<String>,
    /// Whether some cluster could hold the job, now or later.
    pub feasible: bool,
    pub summary: String,
    #[schema(value_type = Object)]
    pub quote: QuoteBody,
}

/// The candidates of a quote, as plain data on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuoteBody {
    pub candidates: Vec<CandidateView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CandidateView {
    pub cluster: String,
    pub site: String,
    pub jurisdiction: baygrid_core::Jurisdiction,
    pub engine: String,
    pub accelerator: Option<String>,
    pub accelerators: u32,
    pub nodes: u32,
    pub price_per_accelerator_hour: Option<Money>,
    /// The job's estimated duration on this cluster's model (scaled by BF16 TFLOPS from the
    /// reference A800).
    #[serde(default)]
    pub estimated_seconds: Option<u64>,
    /// Compute for the estimated duration, in CNY.
    pub estimated_cost_cny: Option<Money>,
    /// Staging the job's inputs here from their vaults, in CNY (none from the same city).
    #[serde(default)]
    pub transfer_cost_cny: Option<Money>,
    /// The green term (the server's `green_weight` × the site's non-green power share ×
    /// compute), in CNY: it steers the choice and is never billed.
    #[serde(default)]
    pub green_cost_cny: Option<Money>,
    /// What the choice minimises: compute + transfer + green, in CNY.
    #[serde(default)]
    pub total_cost_cny: Option<Money>,
    pub round_trip_ms: Option<u32>,
    /// When the job could start here, ms since the epoch: now if it fits now; for a busy
    /// cluster, when running work is expected to end; absent when unknown.
    #[serde(default)]
    pub estimated_start_ms: Option<i64>,
    /// chosen, fits, waits or rejected.
    pub verdict: String,
    pub reason: String,
    /// For a rejection: the spec field whose demand the cluster cannot meet (`inputs`
    /// when the cross-border rules keep an input from its site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<&Quote> for QuoteBody {
    fn from(quote: &Quote) -> Self {
        let candidates = quote
            .candidates
            .iter()
            .map(|c| CandidateView {
                cluster: c.cluster.clone(),
                site: c.site.clone(),
                jurisdiction: c.jurisdiction,
                engine: c.engine.to_string(),
                accelerator: c.accelerator.clone(),
                accelerators: c.accelerators,
                nodes: c.nodes,
                price_per_accelerator_hour: c.price_per_accelerator_hour,
                estimated_seconds: c.estimated_seconds,
                estimated_cost_cny: c.estimated_cost_cny,
                transfer_cost_cny: c.transfer_cost_cny,
                green_cost_cny: c.green_cost_cny,
                total_cost_cny: c.total_cost_cny,
                round_trip_ms: c.round_trip_ms,
                estimated_start_ms: c.estimated_start_ms,
                verdict: serde_json::to_value(&c.verdict)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                reason: c.reason.clone(),
                field: c.field.clone(),
            })
            .collect();
        QuoteBody { candidates }
    }
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CancelView {
    /// cancelled, requested or already_ended.
    pub outcome: String,
    pub job: JobView,
}

/// A line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLineView {
    pub attempt: i64,
    pub seq: i64,
    pub stream: String,
    pub line: String,
}

/// A page of output; pass `next` as `after` to read on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogsView {
    pub lines: Vec<LogLineView>,
    pub next: String,
    /// The job has ended and every line so far is in this page or before it.
    pub done: bool,
    pub state: JobState,
    /// When the job's output was deleted under the server's log retention (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    pub role: Role,
    /// The tenant, provider, party or cluster the token acts for.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    /// How long the token is good for (`90days`, `12h`); it never expires when absent.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A new token. The secret is shown once and stored only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssuedToken {
    pub id: String,
    pub token: String,
    pub role: Role,
    pub subject: Option<String>,
    /// RFC 3339; none when the token does not expire.
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub role: Role,
    pub subject: Option<String>,
    pub label: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// Capacity an agent reports for its cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub engine: String,
    pub nodes: u32,
    pub accelerators_per_node: u32,
    pub cpus_per_node: u32,
    pub memory_gb_per_node: u32,
    pub running_jobs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub capacity: Capacity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    pub cluster: Cluster,
    pub lease_ttl_ms: i64,
    pub heartbeat_ms: i64,
}

/// A lease an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeldLease {
    pub job_id: String,
    pub epoch: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub capacity: Capacity,
    pub held: Vec<HeldLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub renewed: Vec<String>,
    /// Stop these at once: the lease is no longer yours.
    pub stale: Vec<String>,
    /// Stop these: the tenant cancelled them.
    pub cancel: Vec<String>,
    /// Copies out of this site's vaults for the agent to make, claimed for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfers: Vec<offer::FlowTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub max: u32,
}

/// A job granted to an agent, with the epoch every report must carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseGrant {
    pub job_id: String,
    pub tenant: String,
    pub epoch: i64,
    pub ttl_ms: i64,
    pub spec: JobSpec,
    pub allocation: Allocation,
    /// How long the job's hold pays for at the placed price: the engine stops the job
    /// when it runs out. None when the job holds nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_seconds: Option<u64>,
    /// The job's inputs, for the agent to stage into the job's folder before launch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<StagedInput>,
    /// The job reads personal, important or core data: it runs with no network access.
    #[serde(default)]
    pub no_network: bool,
    /// For such a job, where its outputs and logs go: they stay at the site, as a derived
    /// dataset in its vault, and leave only as flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<OutputsTarget>,
    /// For a fusion run's worker job: the worker, which the agent runs itself. None for
    /// such a job whose run has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<FusionWork>,
}

/// The site's vault and the derived dataset a protected job's outputs become.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutputsTarget {
    pub vault_url: String,
    pub dataset: String,
}

/// One input of a job: the version to stage, where it is, and each file's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StagedInput {
    pub dataset: String,
    pub version: u32,
    /// The vault holding it.
    pub vault_url: String,
    pub upload: String,
    pub files: Vec<VersionFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    pub leases: Vec<LeaseGrant>,
}

/// What the agent says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The agent no longer has the job (it restarted and the job was gone).
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogLineIn {
    pub seq: i64,
    pub stream: String,
    pub line: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    pub epoch: i64,
    /// Absent when the report only carries log lines.
    #[serde(default)]
    pub status: Option<AgentStatus>,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub logs: Vec<LogLineIn>,
    /// With the final status of a protected job: the files it left in the site's vault.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<VersionFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartyRequest {
    pub name: String,
    pub jurisdiction: baygrid_core::Jurisdiction,
    pub city: String,
    #[serde(default)]
    pub ciio: bool,
}

/// Re-exported so clients need only this crate for catalog types.
pub type AcceleratorView = AcceleratorModel;

/// Health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub store: String,
    pub version: String,
}

/// A ledger account with its balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub owner: String,
    /// tenant_wallet | provider_revenue | data_holder_revenue | platform_fees | fx |
    /// external_funding | clearing
    pub kind: String,
    /// Whether debits (posted and pending) may never exceed credits.
    pub limited: bool,
    pub debits_posted: Money,
    pub credits_posted: Money,
    pub debits_pending: Money,
    pub credits_pending: Money,
    /// Credits less debits, posted only.
    pub balance: Money,
    /// What can still be spent: the balance less pending debits.
    pub available: Money,
}

/// Funds an account from outside the exchange (operator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// The account to fund, e.g. `wallet:gz-lab`.
    pub account: String,
    /// In the account's currency, e.g. `5000.00 CNY`.
    pub amount: Money,
    /// A client-chosen id: a retry with the same id and body changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One recorded transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TransferView {
    pub seq: i64,
    pub id: String,
    /// single | pending | post | void | expire
    pub kind: String,
    pub debit: String,
    pub credit: String,
    pub amount: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_id: Option<String>,
    pub reference: String,
    pub at: String,
}

/// The transfers that touched an account in a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatementView {
    pub account: String,
    pub from: String,
    pub to: String,
    pub lines: Vec<StatementLineView>,
    /// What posted transfers in the whole period moved in (credits) and out (debits).
    pub net: Money,
    /// When more lines may follow: pass it as `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatementLineView {
    #[serde(flatten)]
    pub transfer: TransferView,
    /// Positive when the account was credited, negative when debited; 0 for holds.
    pub signed_amount: Money,
}

/// A tenant's charges for the jobs that ended in one month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceView {
    pub tenant: String,
    /// YYYY-MM, UTC.
    pub month: String,
    /// Jobs that ended in the month.
    pub lines: Vec<InvoiceLine>,
    /// Queries at the data and fusion runs that ended in the month.
    #[serde(default)]
    pub data_uses: Vec<DataUseLine>,
    /// Jobs and data uses together.
    pub total: Money,
}

/// A query or a fusion run on an invoice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DataUseLine {
    /// `query` or `fusion`
    pub kind: String,
    pub id: String,
    /// How it ended: released, withheld, failed (a query); succeeded, failed, cancelled
    /// (a fusion run). Only released queries and succeeded runs are charged.
    pub state: String,
    pub datasets: Vec<String>,
    /// What the tenant's wallet was charged (posted), in its currency.
    pub amount: Money,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceLine {
    pub job: String,
    pub name: String,
    pub state: JobState,
    pub site: Option<String>,
    pub cluster: Option<String>,
    pub accelerator: Option<String>,
    pub accelerators: u32,
    /// Metered seconds, from the lease's start and end events.
    pub seconds: f64,
    /// The offer's price per accelerator-hour, in the offer's currency.
    pub price_per_accelerator_hour: Option<Money>,
    /// What the tenant's wallet was charged (posted), in its currency.
    pub amount: Money,
    pub finished_at: Option<String>,
}

/// A record that a legal basis for data flows exists (data zone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRecord {
    /// A client-chosen id (lowercase letters, digits and `-`); made when absent.
    #[serde(default)]
    pub id: String,
    /// security_assessment | standard_contract | certification | gba_contract_hk |
    /// gba_contract_mo | separate_consent | hk_prescribed_consent | mo_authorisation |
    /// mo_consent
    #[schema(value_type = String)]
    pub kind: baygrid_rules::EvidenceKind,
    /// The exporting party.
    pub exporter: String,
    /// The receiving party.
    pub recipient: String,
    /// YYYY-MM-DD.
    #[schema(value_type = String)]
    pub effective: chrono::NaiveDate,
    /// Contracts: the filing date, or "" while unfiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filed: Option<String>,
    /// The data set it covers; a security assessment must name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

impl EvidenceRecord {
    pub fn evidence(&self) -> baygrid_rules::Evidence {
        baygrid_rules::Evidence {
            kind: self.kind,
            exporter: self.exporter.clone(),
            recipient: self.recipient.clone(),
            effective: self.effective,
            filed: self.filed.clone(),
            dataset: self.dataset.clone(),
        }
    }
}

/// A flow to decide: the parties by name; the date, the exporter's running totals and the
/// evidence on record are the exchange's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowAsk {
    pub exporter: String,
    pub recipient: String,
    /// name, level, personal, subjects, collected_abroad, collection_purposes, arrived_under
    #[schema(value_type = Object)]
    pub data: baygrid_rules::DataFacts,
    pub flow: FlowAt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowAt {
    /// copy | remote_access | query_result | model_update
    #[schema(value_type = String)]
    pub mode: baygrid_rules::Mode,
    pub purpose: String,
    /// CN | HK | MO | INTL
    #[schema(value_type = String)]
    pub destination: baygrid_rules::Region,
    pub destination_city: String,
}

/// A flow decision as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowDecisionView {
    /// YYYY-MM-DD (UTC), the date decided on.
    pub today: String,
    /// The exporter's totals for the year before this flow: non-sensitive, sensitive.
    pub exported_personal: i64,
    pub exported_sensitive: i64,
    #[schema(value_type = Object)]
    pub decision: baygrid_rules::Decision,
}
