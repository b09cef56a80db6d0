//! Data offers (what a holder lets others do with a dataset, at what price) and contracts
//! (a consumer's use of an offer, decided by the rules and approved by the holder).

use std::collections::BTreeMap;

use baygrid_core::{Jurisdiction, Money};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dataset::{bad, is_identifier, DatasetError, DatasetSpec};

/// How a consumer may use a dataset under an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OfferMode {
    /// The bytes are copied to the consumer's site.
    Copy,
    /// The consumer reads the data where it is.
    RemoteAccess,
    /// Approved aggregate queries run at the data; only their results leave.
    Query,
    /// Federated training at the data; only model updates leave.
    Federated,
}

impl OfferMode {
    /// The flow mode the rules decide this use as.
    pub fn flow_mode(self) -> baygrid_rules::Mode {
        match self {
            OfferMode::Copy => baygrid_rules::Mode::Copy,
            OfferMode::RemoteAccess => baygrid_rules::Mode::RemoteAccess,
            OfferMode::Query => baygrid_rules::Mode::QueryResult,
            OfferMode::Federated => baygrid_rules::Mode::ModelUpdate,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OfferMode::Copy => "copy",
            OfferMode::RemoteAccess => "remote_access",
            OfferMode::Query => "query",
            OfferMode::Federated => "federated",
        }
    }
}

/// The price of an offer, in the holder's currency: per use, or per GB moved or read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfferPrice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_use: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_gb: Option<Money>,
}

/// The aggregate functions a query offer may allow: `count` covers COUNT(*) and
/// COUNT(DISTINCT subject). MIN and MAX are not among them: one individual decides them, so
/// no noise calibrated to a bounded contribution covers them.
pub const AGGREGATES: &[&str] = &["count", "sum", "avg"];

/// What a query offer allows, for the compute-to-data engine to enforce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryTerms {
    /// The smallest group a result may describe (at least 10).
    pub k_min: u32,
    /// The differential-privacy budget per refresh period.
    pub epsilon: f64,
    pub delta: f64,
    /// How often the budget refills, e.g. `30d`.
    pub refresh: String,
    /// count | sum | avg | min | max
    pub aggregates: Vec<String>,
    /// Columns results may be grouped by.
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// Columns queries may filter on.
    #[serde(default)]
    pub filters: Vec<String>,
    /// Declared ranges, per numeric column, that values are clamped to.
    #[serde(default)]
    pub ranges: BTreeMap<String, (f64, f64)>,
    /// The most rows one individual may contribute (and the most groups it may appear in).
    pub max_rows_per_subject: u32,
    /// The budget per period shared by every consumer of the dataset, so that colluding
    /// accounts cannot multiply `epsilon`; `epsilon` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_epsilon: Option<f64>,
    /// The shared δ per period; `delta` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_delta: Option<f64>,
}

/// A data offer, as its holder publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataOfferSpec {
    pub name: String,
    pub dataset: String,
    pub modes: Vec<OfferMode>,
    /// Purposes a consumer may use the data for.
    pub purposes: Vec<String>,
    /// Jurisdictions the data (or its results) may go to.
    #[schema(value_type = Vec<String>)]
    pub destinations: Vec<Jurisdiction>,
    pub price: OfferPrice,
    /// YYYY-MM-DD: no contract is made, and none stays active, after this day.
    #[schema(value_type = String)]
    pub expires: chrono::NaiveDate,
    /// Required when `modes` has `query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryTerms>,
    /// Contracts the rules allow become active without the holder's approval.
    #[serde(default)]
    pub auto_approve: bool,
}

impl DataOfferSpec {
    /// Checks the offer against its dataset (columns) and the holder's home currency,
    /// on `today`; errors name the field.
    pub fn validate(
        &self,
        dataset: &DatasetSpec,
        holder_jurisdiction: Jurisdiction,
        today: chrono::NaiveDate,
    ) -> Result<(), DatasetError> {
        if !baygrid_core::ids::is_valid_name(&self.name) {
            return Err(bad(
                "name",
                format!(
                    "`{}` is not a name: use 1-63 lowercase letters, digits and `-`",
                    self.name
                ),
            ));
        }
        if self.modes.is_empty() {
            return Err(bad(
                "modes",
                "name at least one of copy, remote_access, query, federated",
            ));
        }
        for (i, mode) in self.modes.iter().enumerate() {
            if self.modes[..i].contains(mode) {
                return Err(bad(
                    format!("modes[{i}]"),
                    format!("`{}` is listed twice", mode.as_str()),
                ));
            }
        }
        if self.purposes.is_empty() {
            return Err(bad("purposes", "name at least one purpose"));
        }
        for (i, purpose) in self.purposes.iter().enumerate() {
            if !is_identifier(purpose) {
                return Err(bad(
                    format!("purposes[{i}]"),
                    format!("`{purpose}` is not a purpose: use letters, digits, `_` and `-`"),
                ));
            }
        }
        if self.destinations.is_empty() {
            return Err(bad("destinations", "name at least one jurisdiction"));
        }
        let home = holder_jurisdiction.home_currency();
        match (&self.price.per_use, &self.price.per_gb) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(bad("price", "give exactly one of per_use and per_gb"))
            }
            (Some(price), None) | (None, Some(price)) => {
                let field = if self.price.per_use.is_some() {
                    "price.per_use"
                } else {
                    "price.per_gb"
                };
                if price.minor <= 0 {
                    return Err(bad(field, "must be positive"));
                }
                if price.currency != home {
                    return Err(bad(
                        field,
                        format!("is in {}; the holder prices in {home}", price.currency),
                    ));
                }
            }
        }
        if self.expires <= today {
            return Err(bad(
                "expires",
                format!("{} is not in the future", self.expires),
            ));
        }
        let has_query = self.modes.contains(&OfferMode::Query);
        match (&self.query, has_query) {
            (None, true) => return Err(bad("query", "a query offer must give its terms")),
            (Some(_), false) => {
                return Err(bad("query", "terms are for offers with the query mode"))
            }
            (Some(terms), true) => terms.validate(dataset)?,
            (None, false) => {}
        }
        Ok(())
    }
}

impl QueryTerms {
    /// The budget per period shared by all consumers.
    pub fn shared(&self) -> (f64, f64) {
        (
            self.shared_epsilon.unwrap_or(self.epsilon),
            self.shared_delta.unwrap_or(self.delta),
        )
    }

    /// The refresh period in milliseconds (checked when the offer was published).
    pub fn period_ms(&self) -> i64 {
        humantime::parse_duration(&self.refresh)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(30 * 86_400_000)
    }

    fn validate(&self, dataset: &DatasetSpec) -> Result<(), DatasetError> {
        if self.k_min < 10 {
            return Err(bad("query.k_min", "must be at least 10"));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 100.0) {
            return Err(bad("query.epsilon", "must be above 0 and at most 100"));
        }
        if !(self.delta.is_finite() && (0.0..1.0).contains(&self.delta)) {
            return Err(bad("query.delta", "must be at least 0 and below 1"));
        }
        if let Some(shared) = self.shared_epsilon {
            if !(shared.is_finite() && shared >= self.epsilon && shared <= 100.0) {
                return Err(bad(
                    "query.shared_epsilon",
                    "must be at least `epsilon` and at most 100",
                ));
            }
        }
        if let Some(shared) = self.shared_delta {
            if !(shared.is_finite() && shared >= self.delta && shared < 1.0) {
                return Err(bad(
                    "query.shared_delta",
                    "must be at least `delta` and below 1",
                ));
            }
        }
        match humantime::parse_duration(&self.refresh) {
            Ok(d) if d.as_secs() >= 3600 => {}
            Ok(_) => return Err(bad("query.refresh", "must be at least an hour")),
            Err(e) => {
                return Err(bad(
                    "query.refresh",
                    format!("`{}` is not a duration ({e})", self.refresh),
                ))
            }
        }
        if self.aggregates.is_empty() {
            return Err(bad("query.aggregates", "allow at least one"));
        }
        for (i, aggregate) in self.aggregates.iter().enumerate() {
            if !AGGREGATES.contains(&aggregate.as_str()) {
                return Err(bad(
                    format!("query.aggregates[{i}]"),
                    format!("`{aggregate}`: use {}", AGGREGATES.join(", ")),
                ));
            }
        }
        let column = |name: &str| dataset.schema.iter().find(|c| c.name == name);
        for (list, columns) in [
            ("query.dimensions", &self.dimensions),
            ("query.filters", &self.filters),
        ] {
            for (i, name) in columns.iter().enumerate() {
                if column(name).is_none() {
                    return Err(bad(
                        format!("{list}[{i}]"),
                        format!("`{name}` is not a column of `{}`", dataset.name),
                    ));
                }
                if dataset.subject_column.as_deref() == Some(name.as_str()) {
                    return Err(bad(
                        format!("{list}[{i}]"),
                        format!("`{name}` identifies individuals"),
                    ));
                }
            }
        }
        for (name, (lo, hi)) in &self.ranges {
            let field = format!("query.ranges.{name}");
            match column(name) {
                None => {
                    return Err(bad(
                        field,
                        format!("`{name}` is not a column of `{}`", dataset.name),
                    ))
                }
                Some(c)
                    if !matches!(
                        c.kind,
                        crate::dataset::ColumnType::Int | crate::dataset::ColumnType::Float
                    ) =>
                {
                    return Err(bad(field, "only numeric columns have ranges"))
                }
                Some(_) => {}
            }
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(bad(field, "give [low, high] with low below high"));
            }
        }
        if self.max_rows_per_subject == 0 {
            return Err(bad("query.max_rows_per_subject", "must be at least 1"));
        }
        Ok(())
    }
}

/// A published data offer with its dataset's holder and vault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DataOfferView {
    #[serde(flatten)]
    pub spec: DataOfferSpec,
    pub holder: String,
    pub vault: String,
}

/// What a consumer asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContractRequest {
    pub offer: String,
    pub mode: OfferMode,
    pub purpose: String,
    /// The site the data (or its results) goes to.
    pub site: String,
}

/// Where a contract stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContractState {
    /// The rules allowed it; the holder has not approved it yet.
    Pending,
    Active,
    /// The rules denied it; the decision says why.
    Denied,
    Revoked,
}

/// A contract: the request, the rules' decision on it, and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContractView {
    pub id: String,
    #[serde(flatten)]
    pub request: ContractRequest,
    pub dataset: String,
    /// The holder (exporter).
    pub holder: String,
    /// The consumer tenant and its party (recipient).
    pub tenant: String,
    pub recipient: String,
    pub state: ContractState,
    /// The rules' decision when it was requested.
    #[schema(value_type = Object)]
    pub decision: baygrid_rules::Decision,
    pub requested_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The offer's expiry: the contract ends with it.
    #[schema(value_type = String)]
    pub expires: chrono::NaiveDate,
}

/// A consumer's request to copy a dataset to a site under its contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowRequestBody {
    pub dataset: String,
    /// The destination site: its vault receives the copy.
    pub site: String,
    pub purpose: String,
    /// The copy's name in the destination vault; `<dataset>-<site>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "as")]
    pub copy_as: Option<String>,
}

/// Where a copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// The rules denied it: nothing moves.
    Denied,
    /// Allowed and counted; waiting for the source site's agent.
    Pending,
    /// An agent at the source site is copying it.
    Copying,
    /// The copy is in the destination vault, registered as the recipient's dataset.
    Done,
    /// The copy failed; a compensating record took it out of the totals.
    Failed,
}

/// A copy of a dataset version from its vault to another site's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowView {
    pub id: String,
    pub dataset: String,
    pub version: u32,
    pub source_site: String,
    pub site: String,
    pub purpose: String,
    pub contract: String,
    pub tenant: String,
    /// The exporter and the recipient.
    pub holder: String,
    pub recipient: String,
    /// The copy's dataset name at the destination.
    pub copy_as: String,
    pub state: FlowState,
    #[schema(value_type = Object)]
    pub decision: baygrid_rules::Decision,
    /// What the flow added to the holder's export totals (category, individuals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<(String, u64)>,
    pub upload: String,
    pub files: Vec<crate::VersionFile>,
    pub requested_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a source site's agent copies: each file from the source vault to the
/// destination's, digests checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowTask {
    pub id: String,
    pub dataset: String,
    pub upload: String,
    pub files: Vec<crate::VersionFile>,
    pub source_url: String,
    pub destination_url: String,
    /// The copy's dataset name and upload id at the destination.
    pub copy_as: String,
    pub copy_upload: String,
}

/// The agent's word on a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowReport {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Something an allowed flow obliges a party to do, with where it stands today.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ObligationView {
    pub id: i64,
    /// RFC 3339: when the flow was decided.
    pub decided_at: String,
    pub exporter: String,
    pub recipient: String,
    pub dataset: String,
    /// file-standard-contract | impact-assessment | separate-consent | notice |
    /// recipient-records-3y | model-clauses
    pub obligation: String,
    /// The rule that brings it.
    pub rule: String,
    /// YYYY-MM-DD, when it has a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// due (deadline ahead), overdue (deadline passed) or standing (no deadline).
    pub status: String,
}
