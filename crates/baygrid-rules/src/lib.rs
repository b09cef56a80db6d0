//! The Greater Bay Area cross-border data rule pack.
//!
//! A flow of data (a copy, remote access, a query result, a model update) from an exporter
//! to a recipient is decided by Cedar policies, one or two per rule id of the pack
//! (`rules.cedar`), over facts this crate computes from the request: the running export
//! totals' band, which evidence counts (validity, filing windows, who and what it names),
//! GBA eligibility. Rules that only change the facts (derived outputs, discarded evidence,
//! filing) are reported from a second policy set (`report.cedar`). Both are checked against
//! the schema of the facts (`facts.cedarschema`) when the pack loads.
//!
//! A decision names every rule that applied, the evidence used, the obligations with their
//! due dates and, for a deny, the rules that denied and what evidence would allow the flow.
//! Any deny wins; a flow no rule allows is denied. Pure: no I/O and no clock.

mod cases;

use std::collections::BTreeSet;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, Schema, ValidationMode, Validator,
};
use chrono::{Datelike, Days, Months, NaiveDate, Weekday};
use serde::{Deserialize, Serialize};

pub use cases::CaseOutcome;

const SCHEMA: &str = include_str!("facts.cedarschema");
const RULES: &str = include_str!("rules.cedar");
const REPORTS: &str = include_str!("report.cedar");
const PARAMS: &str = include_str!("../pack/pack.toml");

/// The pack's parameters (`pack/pack.toml`): thresholds, city lists, dates and periods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackParams {
    pub version: String,
    pub gba_mainland_cities: Vec<String>,
    pub exempt_purposes: Vec<String>,
    pub thresholds: Thresholds,
    pub dates: PackDates,
    pub validity: Validity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub personal_contract: u64,
    pub personal_assessment: u64,
    pub sensitive_assessment: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackDates {
    /// GBA contracts to Hong Kong recipients count from this date.
    pub gba_contract_hk_from: NaiveDate,
    /// GBA contracts to Macao recipients count from this date, and only for decisions on or
    /// after it.
    pub gba_contract_mo_from: NaiveDate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validity {
    pub assessment_months: u32,
    pub filing_working_days: u32,
}

impl PackParams {
    /// Reads parameters from the text of a pack file; every field is required.
    pub fn from_toml(text: &str) -> Result<PackParams, RuleError> {
        let params: PackParams = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| RuleError::Pack(format!("pack file: {}: {}", e.path(), e.inner())))?;
        let t = &params.thresholds;
        if !(t.personal_contract < t.personal_assessment && t.sensitive_assessment >= 1) {
            return Err(RuleError::Pack(
                "pack file: thresholds: personal_contract must be below personal_assessment, and sensitive_assessment at least 1".into(),
            ));
        }
        if params.version.trim().is_empty() {
            return Err(RuleError::Pack(
                "pack file: version: must not be empty".into(),
            ));
        }
        Ok(params)
    }

    fn is_gba_city(&self, city: &str) -> bool {
        self.gba_mainland_cities.iter().any(|c| c == city)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("the rule pack does not load: {0}")]
    Pack(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("evaluating the rules failed: {0}")]
    Evaluation(String),
}

fn invalid(field: &str, message: impl Into<String>) -> RuleError {
    RuleError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Where a party is registered, or where data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Region {
    CN,
    HK,
    MO,
    INTL,
}

impl Region {
    pub fn as_str(self) -> &'static str {
        match self {
            Region::CN => "CN",
            Region::HK => "HK",
            Region::MO => "MO",
            Region::INTL => "INTL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    General,
    Important,
    Core,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Personal {
    None,
    Personal,
    Sensitive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Copy,
    RemoteAccess,
    QueryResult,
    ModelUpdate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    SecurityAssessment,
    StandardContract,
    Certification,
    GbaContractHk,
    GbaContractMo,
    SeparateConsent,
    HkPrescribedConsent,
    MoAuthorisation,
    MoConsent,
}

impl EvidenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceKind::SecurityAssessment => "security_assessment",
            EvidenceKind::StandardContract => "standard_contract",
            EvidenceKind::Certification => "certification",
            EvidenceKind::GbaContractHk => "gba_contract_hk",
            EvidenceKind::GbaContractMo => "gba_contract_mo",
            EvidenceKind::SeparateConsent => "separate_consent",
            EvidenceKind::HkPrescribedConsent => "hk_prescribed_consent",
            EvidenceKind::MoAuthorisation => "mo_authorisation",
            EvidenceKind::MoConsent => "mo_consent",
        }
    }

    fn is_contract(self) -> bool {
        matches!(
            self,
            EvidenceKind::StandardContract
                | EvidenceKind::GbaContractHk
                | EvidenceKind::GbaContractMo
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exporter {
    pub name: String,
    pub jurisdiction: Region,
    pub city: String,
    pub ciio: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    pub name: String,
    pub jurisdiction: Region,
    pub city: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFacts {
    pub name: String,
    pub level: Level,
    pub personal: Personal,
    /// Individuals in this flow.
    pub subjects: u64,
    pub collected_abroad: bool,
    pub collection_purposes: Vec<String>,
    /// "" or the kind of contract the data arrived under.
    pub arrived_under: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub mode: Mode,
    pub purpose: String,
    pub destination: Region,
    pub destination_city: String,
    /// Individuals the exporter has already sent out of CN this calendar year, non-sensitive.
    pub exported_personal: u64,
    /// The same, sensitive.
    pub exported_sensitive: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    pub kind: EvidenceKind,
    pub exporter: String,
    pub recipient: String,
    pub effective: NaiveDate,
    /// Contracts: the filing date, or "" while unfiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filed: Option<String>,
    /// The data set it covers; a security assessment must name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

/// Everything a decision needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRequest {
    /// The date the decision is taken on.
    pub today: NaiveDate,
    pub exporter: Exporter,
    pub recipient: Recipient,
    pub data: DataFacts,
    pub flow: Flow,
    #[serde(default)]
    pub evidence: Vec<Evidence>,
}

/// Something an allowed flow obliges a party to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Obligation {
    /// file-standard-contract | impact-assessment | separate-consent | notice |
    /// recipient-records-3y | model-clauses
    pub id: String,
    /// The rule that brings it.
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<NaiveDate>,
}

/// Which export total an allowed flow adds its subjects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportCategory {
    Personal,
    Sensitive,
}

/// A decision, with everything that explains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The rule pack's version the decision was taken under.
    pub pack_version: String,
    pub allowed: bool,
    /// Every rule that applied, in the pack's order.
    pub rules: Vec<String>,
    /// For a deny: the rules that denied.
    pub denied_by: Vec<String>,
    /// For an allow: what it obliges, with due dates.
    pub obligations: Vec<Obligation>,
    /// The evidence that counted, as `kind` (index in the request).
    pub evidence_used: Vec<String>,
    /// For a deny: what would allow the flow, per denying rule.
    pub remedies: Vec<String>,
    pub notes: Vec<String>,
    /// When allowed under a rule whose flows count: the total this flow adds to.
    pub counts: Option<(ExportCategory, u64)>,
}

impl Decision {
    /// A denial in words: the rules that denied, and what would allow the flow.
    pub fn why_denied(&self) -> String {
        let mut why = format!("denied by {}", self.denied_by.join(", "));
        if !self.remedies.is_empty() {
            why.push_str(&format!("; would allow: {}", self.remedies.join("; ")));
        }
        why
    }

    /// The contract an allowed flow rests on, if any: the kind data copied under this
    /// decision arrived under.
    pub fn contract_used(&self) -> Option<EvidenceKind> {
        // `evidence_used` reads `kind (index)`, as `decide` writes it
        self.evidence_used
            .iter()
            .filter_map(|used| used.split_once(' ').map(|(kind, _)| kind))
            .filter_map(|kind| serde_json::from_value::<EvidenceKind>(serde_json::json!(kind)).ok())
            .find(|kind| kind.is_contract())
    }
}

/// What the evidence offered amounts to, after validity and filing.
#[derive(Debug, Default, Clone)]
struct EvidenceFacts {
    counting: BTreeSet<(EvidenceKind, usize)>,
    discarded: Vec<String>,
    filing: Vec<String>,
    /// Contracts that count while their filing is still due, with the due date.
    filing_due: Vec<(EvidenceKind, NaiveDate)>,
}

impl EvidenceFacts {
    fn has(&self, kind: EvidenceKind) -> bool {
        self.counting.iter().any(|(k, _)| *k == kind)
    }
}

/// The `working_days`-th working day (Monday to Friday) after `date`.
pub fn filing_due(date: NaiveDate, working_days: u32) -> NaiveDate {
    let mut day = date;
    let mut counted = 0;
    while counted < working_days {
        day = day + Days::new(1);
        if !matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
            counted += 1;
        }
    }
    day
}

fn weigh_evidence(request: &FlowRequest, params: &PackParams) -> Result<EvidenceFacts, RuleError> {
    let today = request.today;
    let mut facts = EvidenceFacts::default();
    for (i, e) in request.evidence.iter().enumerate() {
        let label = format!("{} ({i})", e.kind.as_str());
        let field = |name: &str| format!("evidence[{i}].{name}");
        if e.exporter != request.exporter.name || e.recipient != request.recipient.name {
            facts.discarded.push(format!(
                "{label} names {} → {}, not this exporter and recipient",
                e.exporter, e.recipient
            ));
            continue;
        }
        match (&e.dataset, e.kind) {
            (Some(d), _) if *d != request.data.name => {
                facts.discarded.push(format!(
                    "{label} covers data set {d}, not {}",
                    request.data.name
                ));
                continue;
            }
            (None, EvidenceKind::SecurityAssessment) => {
                facts.discarded.push(format!("{label} names no data set"));
                continue;
            }
            _ => {}
        }
        if e.effective > today {
            facts
                .discarded
                .push(format!("{label} takes effect only on {}", e.effective));
            continue;
        }
        if matches!(
            e.kind,
            EvidenceKind::SecurityAssessment | EvidenceKind::Certification
        ) {
            let expiry = e
                .effective
                .checked_add_months(Months::new(params.validity.assessment_months))
                .ok_or_else(|| invalid(&field("effective"), "out of range"))?;
            if today >= expiry {
                facts.discarded.push(format!(
                    "{label} of {} expired on {expiry} (valid {} months)",
                    e.effective, params.validity.assessment_months
                ));
                continue;
            }
        }
        let (hk_from, mo_from) = (
            params.dates.gba_contract_hk_from,
            params.dates.gba_contract_mo_from,
        );
        if e.kind == EvidenceKind::GbaContractHk && e.effective < hk_from {
            facts.discarded.push(format!(
                "{label} predates the GBA contract for Hong Kong ({hk_from})"
            ));
            continue;
        }
        if e.kind == EvidenceKind::GbaContractMo && (e.effective < mo_from || today < mo_from) {
            facts.discarded.push(format!(
                "{label} predates the GBA contract for Macao ({mo_from})"
            ));
            continue;
        }
        if e.kind.is_contract() {
            let due = filing_due(e.effective, params.validity.filing_working_days);
            let filed = match e.filed.as_deref() {
                None | Some("") => None,
                Some(text) => Some(NaiveDate::from_str(text).map_err(|_| {
                    invalid(
                        &field("filed"),
                        format!("`{text}` is not a date (YYYY-MM-DD)"),
                    )
                })?),
            };
            match filed {
                Some(f) if f <= due => {}
                Some(f) => {
                    facts.filing.push(format!(
                        "{label} was filed on {f}, after its due date {due}: it counts from {f}"
                    ));
                    if today < f {
                        continue;
                    }
                }
                None if today <= due => {
                    facts
                        .filing
                        .push(format!("{label} is not filed yet: filing due {due}"));
                    facts.filing_due.push((e.kind, due));
                }
                None => {
                    facts.filing.push(format!(
                        "{label} was not filed by its due date {due}: it no longer counts"
                    ));
                    continue;
                }
            }
        } else if e.filed.as_deref().is_some_and(|f| !f.is_empty()) {
            return Err(invalid(&field("filed"), "only contracts are filed"));
        }
        facts.counting.insert((e.kind, i));
    }
    Ok(facts)
}

/// The facts the policies read, as Cedar's context.
fn context(
    request: &FlowRequest,
    evidence: &EvidenceFacts,
    params: &PackParams,
) -> serde_json::Value {
    let t = &params.thresholds;
    let flow = &request.flow;
    let data = &request.data;
    let derived = matches!(flow.mode, Mode::QueryResult | Mode::ModelUpdate);
    let personal = if derived {
        Personal::None
    } else {
        data.personal
    };
    let pi_tier = match personal {
        Personal::None => "exempt",
        Personal::Sensitive => {
            if flow.exported_sensitive.saturating_add(data.subjects) >= t.sensitive_assessment {
                "assessment"
            } else {
                "contract"
            }
        }
        Personal::Personal => {
            let total = flow.exported_personal.saturating_add(data.subjects);
            if total >= t.personal_assessment {
                "assessment"
            } else if total >= t.personal_contract {
                "contract"
            } else {
                "exempt"
            }
        }
    };
    let destination_gba_city =
        flow.destination == Region::CN && params.is_gba_city(&flow.destination_city);
    let arrived_under_gba = matches!(
        data.arrived_under.as_str(),
        "gba_contract_hk" | "gba_contract_mo"
    );
    let onward_outside_gba = arrived_under_gba
        && (flow.destination == Region::INTL
            || (flow.destination == Region::CN && !destination_gba_city));
    let recipient = request.recipient.jurisdiction;
    let gba_sc_eligible = request.exporter.jurisdiction == Region::CN
        && params.is_gba_city(&request.exporter.city)
        && (recipient == Region::HK
            || (recipient == Region::MO && request.today >= params.dates.gba_contract_mo_from))
        && flow.destination == recipient
        && data.level == Level::General
        && !request.exporter.ciio;
    let gba_contract = match recipient {
        Region::HK => evidence.has(EvidenceKind::GbaContractHk),
        Region::MO => evidence.has(EvidenceKind::GbaContractMo),
        _ => false,
    };
    serde_json::json!({
        "source": request.exporter.jurisdiction.as_str(),
        "destination": flow.destination.as_str(),
        "destination_gba_city": destination_gba_city,
        "level": match data.level { Level::General => "general", Level::Important => "important", Level::Core => "core" },
        "personal": match personal { Personal::None => "none", Personal::Personal => "personal", Personal::Sensitive => "sensitive" },
        "mode": match flow.mode { Mode::Copy => "copy", Mode::RemoteAccess => "remote_access", Mode::QueryResult => "query_result", Mode::ModelUpdate => "model_update" },
        "exporter_ciio": request.exporter.ciio,
        "collected_abroad": data.collected_abroad,
        "purpose_exempt": params.exempt_purposes.contains(&flow.purpose),
        "purpose_collected": data.collection_purposes.contains(&flow.purpose),
        "pi_tier": pi_tier,
        "gba_sc_eligible": gba_sc_eligible,
        "onward_outside_gba": onward_outside_gba,
        "evidence_discarded": !evidence.discarded.is_empty(),
        "filing_issue": !evidence.filing.is_empty(),
        "evidence": {
            "security_assessment": evidence.has(EvidenceKind::SecurityAssessment),
            "standard_contract": evidence.has(EvidenceKind::StandardContract),
            "certification": evidence.has(EvidenceKind::Certification),
            "separate_consent": evidence.has(EvidenceKind::SeparateConsent),
            "hk_prescribed_consent": evidence.has(EvidenceKind::HkPrescribedConsent),
            "mo_consent": evidence.has(EvidenceKind::MoConsent),
            "mo_authorisation": evidence.has(EvidenceKind::MoAuthorisation),
            "gba_contract": gba_contract,
            "gba_contract_hk": evidence.has(EvidenceKind::GbaContractHk),
            "gba_contract_mo": evidence.has(EvidenceKind::GbaContractMo),
        },
    })
}

fn check_request(request: &FlowRequest) -> Result<(), RuleError> {
    let nonempty = |field: &str, value: &str| {
        if value.trim().is_empty() {
            Err(invalid(field, "must not be empty"))
        } else {
            Ok(())
        }
    };
    nonempty("exporter.name", &request.exporter.name)?;
    nonempty("exporter.city", &request.exporter.city)?;
    nonempty("recipient.name", &request.recipient.name)?;
    nonempty("recipient.city", &request.recipient.city)?;
    nonempty("data.name", &request.data.name)?;
    nonempty("flow.purpose", &request.flow.purpose)?;
    nonempty("flow.destination_city", &request.flow.destination_city)?;
    if !matches!(
        request.data.arrived_under.as_str(),
        "" | "standard_contract" | "gba_contract_hk" | "gba_contract_mo"
    ) {
        return Err(invalid(
            "data.arrived_under",
            format!(
                "`{}` is not a contract kind: \"\", standard_contract, gba_contract_hk or gba_contract_mo",
                request.data.arrived_under
            ),
        ));
    }
    if request.data.personal == Personal::None && request.data.subjects > 0 {
        return Err(invalid(
            "data.subjects",
            "data with no personal information has no subjects",
        ));
    }
    Ok(())
}

/// A fact as a Cedar value: booleans, integers, strings, sets and records.
fn restricted(value: serde_json::Value) -> Result<cedar_policy::RestrictedExpression, RuleError> {
    use cedar_policy::RestrictedExpression as R;
    Ok(match value {
        serde_json::Value::Bool(b) => R::new_bool(b),
        serde_json::Value::Number(n) => {
            R::new_long(n.as_i64().ok_or_else(|| {
                RuleError::Evaluation(format!("facts: {n} is not a whole number"))
            })?)
        }
        serde_json::Value::String(s) => R::new_string(s),
        serde_json::Value::Array(items) => R::new_set(
            items
                .into_iter()
                .map(restricted)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        serde_json::Value::Object(fields) => R::new_record(
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, restricted(v)?)))
                .collect::<Result<Vec<_>, RuleError>>()?,
        )
        .map_err(|e| RuleError::Evaluation(format!("facts: {e}")))?,
        serde_json::Value::Null => return Err(RuleError::Evaluation("facts: a null fact".into())),
    })
}

/// One policy set with what each policy says about itself.
struct Policies {
    set: PolicySet,
    /// Every decision and report policy as a `permit`, so that one evaluation names every
    /// policy whose conditions hold (Cedar reports only the permits when nothing forbids);
    /// the decision is then taken from what each matched policy was.
    all: PolicySet,
    /// Per policy of `all`: what the original policy says about itself.
    origin: std::collections::HashMap<cedar_policy::PolicyId, Meta>,
}

/// A policy's annotations, read once at load (Cedar parses the key on every lookup).
#[derive(Debug, Clone)]
struct Meta {
    rule: String,
    needs: Option<String>,
    obligations: Option<String>,
    from: Origin,
    /// The rule's place in the pack, then the policy's own id, for a stable order.
    order: (usize, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Permit,
    Forbid,
    Report,
}

/// The loaded rule pack.
pub struct RulePack {
    params: PackParams,
    schema: Schema,
    rules: Policies,
    order: Vec<String>,
    /// The request's action and entity types, parsed once (Cedar's parser is costly).
    action: EntityUid,
    party: EntityTypeName,
    dataset: EntityTypeName,
}

fn parse(text: &str, what: &str) -> Result<PolicySet, RuleError> {
    PolicySet::from_str(text).map_err(|e| RuleError::Pack(format!("{what}: {e}")))
}

impl RulePack {
    /// Loads the pack with its built-in parameters (`pack/pack.toml`).
    pub fn load() -> Result<RulePack, RuleError> {
        RulePack::with_params(PackParams::from_toml(PARAMS)?)
    }

    /// Loads the pack with the parameters in a pack file, read now: a changed file changes
    /// decisions without a rebuild.
    pub fn from_file(text: &str) -> Result<RulePack, RuleError> {
        RulePack::with_params(PackParams::from_toml(text)?)
    }

    /// The pack's parameters.
    pub fn params(&self) -> &PackParams {
        &self.params
    }

    /// Loads the policies with these parameters and checks every policy against the facts'
    /// schema.
    pub fn with_params(params: PackParams) -> Result<RulePack, RuleError> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| RuleError::Pack(format!("schema: {e}")))?;
        let set = parse(RULES, "rules.cedar")?;
        let reports = parse(REPORTS, "report.cedar")?;
        let validator = Validator::new(schema.clone());
        for (name, policies) in [("rules.cedar", &set), ("report.cedar", &reports)] {
            let result = validator.validate(policies, ValidationMode::Strict);
            if !result.validation_passed() {
                let errors: Vec<String> =
                    result.validation_errors().map(|e| e.to_string()).collect();
                return Err(RuleError::Pack(format!("{name}: {}", errors.join("; "))));
            }
        }
        let mut order = Vec::new();
        let mut all = PolicySet::new();
        let mut origin = std::collections::HashMap::new();
        let as_permit = |policy: &cedar_policy::Policy, n: usize| {
            let mut json = policy
                .to_json()
                .map_err(|e| RuleError::Pack(format!("policy {}: {e}", policy.id())))?;
            json["effect"] = serde_json::json!("permit");
            let id = cedar_policy::PolicyId::new(format!("p{n}"));
            cedar_policy::Policy::from_json(Some(id), json)
                .map_err(|e| RuleError::Pack(format!("policy {}: {e}", policy.id())))
        };
        for (policy, from) in set
            .policies()
            .map(|p| {
                let from = if p.effect() == cedar_policy::Effect::Permit {
                    Origin::Permit
                } else {
                    Origin::Forbid
                };
                (p, from)
            })
            .chain(reports.policies().map(|p| (p, Origin::Report)))
        {
            let id = policy
                .annotation("id")
                .ok_or_else(|| RuleError::Pack(format!("policy {} has no @id", policy.id())))?;
            if !order.iter().any(|o| o == id) {
                order.push(id.to_string());
            }
            let permit = as_permit(policy, origin.len())?;
            let meta = Meta {
                rule: id.to_string(),
                needs: policy.annotation("needs").map(str::to_string),
                obligations: policy.annotation("obligations").map(str::to_string),
                from,
                order: (
                    order.iter().position(|o| o == id).unwrap_or(usize::MAX),
                    policy.id().to_string(),
                ),
            };
            origin.insert(permit.id().clone(), meta);
            all.add(permit)
                .map_err(|e| RuleError::Pack(e.to_string()))?;
        }
        Ok(RulePack {
            params,
            schema,
            rules: Policies { set, all, origin },
            order,
            action: EntityUid::from_str(r#"Action::"flow""#)
                .map_err(|e| RuleError::Pack(e.to_string()))?,
            party: EntityTypeName::from_str("Party").map_err(|e| RuleError::Pack(e.to_string()))?,
            dataset: EntityTypeName::from_str("Dataset")
                .map_err(|e| RuleError::Pack(e.to_string()))?,
        })
    }

    /// Every rule id in the pack, in its order.
    pub fn rule_ids(&self) -> &[String] {
        &self.order
    }

    /// The Cedar request for a flow's facts; with the schema, the facts are checked
    /// against it (tests and benchmarks), without, they are trusted as built here.
    fn build_request(
        &self,
        request: &FlowRequest,
        facts: serde_json::Value,
        schema: Option<&Schema>,
    ) -> Result<Request, RuleError> {
        let action = &self.action;
        let context = match schema {
            // checked against the schema: through Cedar's JSON reader
            Some(schema) => Context::from_json_value(facts, Some((schema, action)))
                .map_err(|e| RuleError::Evaluation(format!("facts: {e}")))?,
            // built here in the schema's shape: straight to Cedar values
            None => {
                let serde_json::Value::Object(fields) = facts else {
                    return Err(RuleError::Evaluation("facts: not a record".into()));
                };
                let pairs = fields
                    .into_iter()
                    .map(|(k, v)| Ok((k, restricted(v)?)))
                    .collect::<Result<Vec<_>, RuleError>>()?;
                Context::from_pairs(pairs)
                    .map_err(|e| RuleError::Evaluation(format!("facts: {e}")))?
            }
        };
        Request::new(
            EntityUid::from_type_name_and_id(
                self.party.clone(),
                EntityId::new(&request.exporter.name),
            ),
            action.clone(),
            EntityUid::from_type_name_and_id(
                self.dataset.clone(),
                EntityId::new(&request.data.name),
            ),
            context,
            schema,
        )
        .map_err(|e| RuleError::Evaluation(e.to_string()))
    }

    /// The Cedar request a flow request becomes, with its facts checked against the schema
    /// (for tests and benchmarks).
    pub fn cedar_request(&self, request: &FlowRequest) -> Result<Request, RuleError> {
        let facts = self.facts(request)?;
        self.build_request(request, facts, Some(&self.schema))
    }

    /// Checks a request as a decision would, without deciding: a bad field is the error.
    pub fn validate(&self, request: &FlowRequest) -> Result<(), RuleError> {
        self.facts(request).map(|_| ())
    }

    fn facts(&self, request: &FlowRequest) -> Result<serde_json::Value, RuleError> {
        check_request(request)?;
        let evidence = weigh_evidence(request, &self.params)?;
        Ok(context(request, &evidence, &self.params))
    }

    /// For benchmarks: one bare Cedar evaluation of the decision policies; true for allow.
    pub fn evaluate_bare(&self, request: &Request) -> bool {
        Authorizer::new()
            .is_authorized(request, &self.rules.set, &Entities::empty())
            .decision()
            == CedarDecision::Allow
    }

    /// For benchmarks: the one evaluation a decision makes (every policy as a permit) on a
    /// request built beforehand; the number of policies that matched.
    pub fn evaluate_merged(&self, request: &Request) -> usize {
        Authorizer::new()
            .is_authorized(request, &self.rules.all, &Entities::empty())
            .diagnostics()
            .reason()
            .count()
    }

    /// For benchmarks: a decision's first half, the facts weighed and built into the Cedar
    /// request it evaluates.
    pub fn prepare(&self, request: &FlowRequest) -> Result<Request, RuleError> {
        let facts = self.facts(request)?;
        self.build_request(request, facts, None)
    }

    /// Decides a flow.
    pub fn decide(&self, request: &FlowRequest) -> Result<Decision, RuleError> {
        check_request(request)?;
        let evidence = weigh_evidence(request, &self.params)?;
        let facts = context(request, &evidence, &self.params);
        // the facts are built here, in the shape the schema declares (the property test
        // checks them against it); parsing them against the schema again on every request
        // would cost more than the evaluations
        let cedar_request = self.build_request(request, facts.clone(), None)?;
        // one evaluation: every policy whose conditions hold, as permits
        let response =
            Authorizer::new().is_authorized(&cedar_request, &self.rules.all, &Entities::empty());
        if let Some(error) = response.diagnostics().errors().next() {
            return Err(RuleError::Evaluation(error.to_string()));
        }
        // Cedar reports the matched policies as a set: put them in the pack's order
        let mut matched: Vec<&Meta> = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.rules.origin.get(id))
            .collect();
        matched.sort_by(|a, b| a.order.cmp(&b.order));
        let of = |wanted: Origin| -> Vec<&Meta> {
            matched
                .iter()
                .filter(|m| m.from == wanted)
                .copied()
                .collect()
        };
        let allowing = of(Origin::Permit);
        let forbidding = of(Origin::Forbid);
        let reported = of(Origin::Report);
        // Cedar's own semantics: a forbid that holds wins; otherwise a permit must hold
        let allowed = forbidding.is_empty() && !allowing.is_empty();
        let decisive = if allowed {
            allowing.clone()
        } else {
            forbidding
        };

        let id_of = |m: &&Meta| m.rule.clone();
        let mut applied: BTreeSet<String> = BTreeSet::new();
        applied.extend(allowing.iter().map(id_of));
        applied.extend(reported.iter().map(id_of));
        let denied_by: Vec<String> = if allowed {
            Vec::new()
        } else {
            let mut ids: Vec<String> = decisive.iter().map(id_of).collect();
            ids.dedup();
            applied.extend(ids.iter().cloned());
            ids
        };
        let rules: Vec<String> = self
            .order
            .iter()
            .filter(|id| applied.contains(*id))
            .cloned()
            .collect();

        let mut obligations = Vec::new();
        let mut remedies = Vec::new();
        let mut needed: BTreeSet<String> = BTreeSet::new();
        for policy in &allowing {
            if let Some(needs) = policy.needs.as_deref() {
                needed.extend(needs.split('|').map(str::to_string));
            }
        }
        if allowed {
            for policy in &allowing {
                let rule = id_of(policy);
                for id in policy
                    .obligations
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                {
                    if !obligations
                        .iter()
                        .any(|o: &Obligation| o.id == id && o.rule == rule)
                    {
                        obligations.push(Obligation {
                            id: id.to_string(),
                            rule: rule.clone(),
                            due: None,
                        });
                    }
                }
            }
            // a contract the allow rests on that is not filed yet must be filed by its due date
            for (kind, due) in &evidence.filing_due {
                let used = match kind {
                    EvidenceKind::StandardContract => needed.contains("standard_contract"),
                    _ => {
                        rules.iter().any(|r| r == "GBA-SC" || r == "HK-GBA")
                            || needed.contains(kind.as_str())
                    }
                };
                if used {
                    obligations.push(Obligation {
                        id: "file-standard-contract".into(),
                        rule: "SC-FILING".into(),
                        due: Some(*due),
                    });
                }
            }
        } else {
            for policy in &decisive {
                let rule = id_of(policy);
                // only evidence that could apply to this flow is offered as a remedy
                let possible = |kind: &&str| match *kind {
                    "gba_contract" => facts["gba_sc_eligible"] == true,
                    "gba_contract_mo" => facts["destination_gba_city"] == true,
                    _ => true,
                };
                let remedy = match policy.needs.as_deref() {
                    Some(needs) => format!(
                        "{rule}: needs evidence that counts: {}",
                        needs
                            .split('|')
                            .filter(possible)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                    None => format!("{rule}: no evidence can allow this flow"),
                };
                if !remedies.contains(&remedy) {
                    remedies.push(remedy);
                }
            }
            if decisive.is_empty() {
                remedies.push("no rule of the pack allows this flow".into());
            }
        }
        let evidence_used: Vec<String> = evidence
            .counting
            .iter()
            .filter(|(kind, _)| {
                needed.contains(kind.as_str())
                    || (matches!(
                        kind,
                        EvidenceKind::GbaContractHk | EvidenceKind::GbaContractMo
                    ) && (needed.contains("gba_contract")
                        || rules.iter().any(|r| r == "GBA-SC" || r == "HK-GBA")))
            })
            .map(|(kind, i)| format!("{} ({i})", kind.as_str()))
            .collect();
        let mut notes = Vec::new();
        notes.extend(
            evidence
                .discarded
                .iter()
                .map(|d| format!("not counted: {d}")),
        );
        notes.extend(evidence.filing.iter().cloned());
        if rules.iter().any(|r| r == "IN-OTHER") {
            notes.push("the source's own law is outside this pack".into());
        }
        if rules
            .iter()
            .any(|r| r == "DERIVED-ANON" || r == "DERIVED-MODEL")
        {
            notes.push("a derived output: decided as carrying no personal information".into());
        }
        let counting_rule = rules.iter().any(|r| {
            matches!(
                r.as_str(),
                "CN-PI-EXEMPT" | "CN-PI-SC" | "CN-PI-SA" | "GBA-SC"
            )
        });
        let counts = (allowed && counting_rule).then(|| {
            let category = if request.data.personal == Personal::Sensitive {
                ExportCategory::Sensitive
            } else {
                ExportCategory::Personal
            };
            (category, request.data.subjects)
        });
        Ok(Decision {
            pack_version: self.params.version.clone(),
            allowed,
            rules,
            denied_by,
            obligations,
            evidence_used,
            remedies,
            notes,
            counts,
        })
    }
}

#[cfg(test)]
mod tests;
