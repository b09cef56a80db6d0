//! Fusion training runs (样本数据融合训练) through the exchange: a run's parties train where
//! their data is. Each worker is a job in the dispatcher's queue, held to one site: a
//! party's to its dataset's vault site, so to its own jurisdiction; the aggregator's to the
//! first party site, cheapest first, to which the rules allow a `model_update` flow from
//! every party's dataset. The dispatcher places the jobs like any other (priority, fair
//! share, quotas, capacity); the agent granted a worker's lease runs it, and the workers
//! talk only through this server's relay (the aggregator sees masked vectors when three or
//! more parties train). Each party's copy of the final model is released by the rules
//! (decided on record, with the model's digest), saved as a derived dataset in its own
//! vault, and the run is charged the data offers' per-use prices; each worker's job
//! settles its own metered compute.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{
    ContractState, FusionEvent, FusionReport, FusionRequest, FusionState, FusionTask, FusionView,
    FusionWork, FusionWorker, OfferMode, OutputsTarget, PartyTable, WorkerState,
};
use baygrid_core::{millis_to_rfc3339, Currency, FusionPart, JobSpec, Money, Principal, Role};
use baygrid_ledger::{names, Transfer, TransferKind};
use baygrid_store::{Ending, FusionRow, RecordFilter};
use serde::{Deserialize, Serialize};

use crate::agent::agent_cluster;
use crate::body::{JsonBody, QueryParams, RawBody};
use crate::catalog::CatalogSnapshot;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{acting_tenant, TenantQuery};
use crate::paging::{self, ListParams};
use crate::queries::json;
use crate::relay::Conversation;
use crate::zone::{dataset_flow, today, FlowEnds};
use crate::AppState;

/// How long a worker waits for the next message before it gives up on the run.
const WORKER_WAIT_MS: u64 = 120_000;

/// A run's stored record: what the consumer sees, and what the server keeps to run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FusionRecord {
    view: FusionView,
    /// The trainer's settings, complete.
    settings: serde_json::Value,
    /// Per party: the per-use price of its offer.
    prices: Vec<Money>,
    /// Per party: its output's files in its vault (none for a psi party not told the
    /// intersection), once it has reported them.
    outputs: Vec<Option<Vec<baygrid_api::VersionFile>>>,
    events: Vec<FusionEvent>,
}

/// An instant the view shows (RFC 3339) in milliseconds.
fn millis(at: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl FusionRecord {
    fn from_row(row: &FusionRow) -> ApiResult<Self> {
        serde_json::from_value(row.body.clone())
            .map_err(|e| ApiError::Unavailable(format!("fusion record {}: {e}", row.id)))
    }

    fn body(&self) -> ApiResult<serde_json::Value> {
        json(self)
    }

    /// When the run last moved: placed, a worker claimed, a round, a report.
    fn last_moved_ms(&self) -> i64 {
        self.events
            .last()
            .and_then(|e| millis(&e.at))
            .unwrap_or_default()
    }

    fn log(&mut self, now: i64, line: String) {
        self.events.push(FusionEvent {
            at: millis_to_rfc3339(now),
            line,
        });
    }

    /// The parties' workers (a psi run has no aggregator or dealer).
    fn parties(&self) -> usize {
        self.view
            .workers
            .iter()
            .filter(|w| w.dataset.is_some())
            .count()
    }

    /// Where worker `index` is in the list.
    fn position(&self, index: usize) -> ApiResult<usize> {
        self.view
            .workers
            .iter()
            .position(|w| w.index == index)
            .ok_or_else(|| {
                ApiError::bad(
                    "index",
                    format!("run `{}` has no worker {index}", self.view.id),
                )
            })
    }
}

/// The datasets a stored run trained on, for its invoice line.
pub(crate) fn datasets_of(row: &FusionRow) -> ApiResult<Vec<String>> {
    Ok(FusionRecord::from_row(row)?
        .view
        .workers
        .into_iter()
        .filter_map(|w| w.dataset)
        .collect())
}

fn sees(who: &Principal, row: &FusionRow) -> bool {
    match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant => who.subject.as_deref() == Some(row.tenant.as_str()),
        _ => false,
    }
}

/// The cheapest price per accelerator-hour (CNY minor units) of the clusters at a site,
/// or none when no cluster there is offered.
fn cheapest_price(catalog: &CatalogSnapshot, site: &str) -> Option<i64> {
    catalog
        .offers
        .values()
        .filter(|o| {
            catalog
                .clusters
                .get(&o.cluster)
                .is_some_and(|c| c.site == site)
        })
        .filter_map(|o| catalog.rates.to_cny(o.price_per_accelerator_hour).ok())
        .map(|m| m.minor)
        .min()
}

/// The dataset a party's output is saved as: its copy of the model, or its intersection.
fn output_name(task: FusionTask, run: &str, party: &str) -> String {
    let suffix = &run[run.len().saturating_sub(8)..];
    let kind = if task == FusionTask::Psi {
        "psi"
    } else {
        "model"
    };
    let mut name = party.to_string();
    name.truncate(63 - 7 - 9);
    format!("{name}-{kind}-{suffix}")
}

/// One output flow as the rules see it: `dataset`'s holder to the consumer (`recipient`)
/// at `site`, in `mode`, for `subjects` individuals when fewer than the dataset's.
#[allow(clippy::too_many_arguments)]
fn output_request<'c>(
    catalog: &'c CatalogSnapshot,
    dataset: &baygrid_api::DatasetSpec,
    recipient: &baygrid_core::Party,
    site: &str,
    mode: baygrid_rules::Mode,
    subjects: Option<u64>,
    purpose: &str,
    today: chrono::NaiveDate,
) -> ApiResult<(baygrid_rules::FlowRequest, &'c baygrid_core::Party)> {
    let holder = catalog.holder(dataset)?;
    let site = catalog
        .sites
        .get(site)
        .ok_or_else(|| ApiError::Conflict(format!("site `{site}` is gone")))?;
    let mut request = dataset_flow(
        catalog,
        dataset,
        FlowEnds {
            holder,
            recipient,
            site,
        },
        mode,
        purpose,
        today,
    );
    if let Some(n) = subjects {
        request.data.subjects = n;
    }
    Ok((request, holder))
}

/// The flows that bring party `k`'s output to its vault: a model (or a hetero party's
/// weights) is a `model_update` from every dataset of the run; an intersection is a copy,
/// from the other party's dataset, of which of its individuals this party holds.
fn output_flows<'d>(
    record: &FusionRecord,
    k: usize,
    datasets: &'d [baygrid_api::DatasetSpec],
) -> Vec<(
    &'d baygrid_api::DatasetSpec,
    baygrid_rules::Mode,
    Option<u64>,
)> {
    if record.view.task != FusionTask::Psi {
        return datasets
            .iter()
            .map(|d| (d, baygrid_rules::Mode::ModelUpdate, None))
            .collect();
    }
    let told = record
        .outputs
        .get(k)
        .and_then(|o| o.as_ref())
        .is_some_and(|f| !f.is_empty());
    if !told {
        return vec![];
    }
    let party = record.view.workers.iter().find(|w| w.index == k + 1);
    let size = party
        .and_then(|w| w.scores.as_ref())
        .and_then(|s| s["intersection"].as_u64());
    datasets
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != k)
        .map(|(_, d)| (d, baygrid_rules::Mode::Copy, size))
        .collect()
}

/// The file a party's output is.
fn output_file(task: FusionTask) -> &'static str {
    if task == FusionTask::Psi {
        "intersection.csv"
    } else {
        "model.json"
    }
}

/// Why `settings` is refused, with the field at fault.
fn settings_error(text: String) -> ApiError {
    match text.split_once(": ") {
        Some((field, message)) if field.starts_with("settings") => {
            ApiError::bad(field.to_string(), message.to_string())
        }
        _ => ApiError::bad("settings", text),
    }
}

/// Starts a fusion run: the parties' contracts checked, the aggregator placed where the
/// rules allow every party's model updates to go, the hold placed, the workers handed to
/// the vaults' agents.
#[utoipa::path(post, path = "/api/v1/fusion", params(TenantQuery), request_body = FusionRequest, responses((status = 201, body = FusionView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(params): QueryParams<TenantQuery>,
    JsonBody(ask): JsonBody<FusionRequest>,
) -> ApiResult<(StatusCode, Json<FusionView>)> {
    let tenant = acting_tenant(&who, params.tenant.as_deref())?;
    let vertical = ask.task == FusionTask::HeteroLr;
    let psi = ask.task == FusionTask::Psi;
    if (vertical || psi) && ask.parties.len() != 2 {
        return Err(ApiError::bad(
            "parties",
            format!(
                "{} takes two parties, the guest then the host, not {}",
                ask.task.as_str(),
                ask.parties.len()
            ),
        ));
    }
    if !(2..=16).contains(&ask.parties.len()) {
        return Err(ApiError::bad(
            "parties",
            format!("a run takes 2 to 16 parties, not {}", ask.parties.len()),
        ));
    }
    for (i, p) in ask.parties.iter().enumerate() {
        if !baygrid_core::ids::is_valid_name(&p.name) || p.name.len() > 40 || p.name == "aggregator"
        {
            return Err(ApiError::bad(
                format!("parties[{i}].name"),
                "1–40 lowercase letters, digits and `-`, and not `aggregator`",
            ));
        }
        if ask.parties[..i].iter().any(|q| q.name == p.name) {
            return Err(ApiError::bad(format!("parties[{i}].name"), "named twice"));
        }
        if ask.parties[..i].iter().any(|q| q.dataset == p.dataset) {
            return Err(ApiError::bad(
                format!("parties[{i}].dataset"),
                "the same dataset twice",
            ));
        }
    }
    let settings = if psi {
        let cfg: baygrid_fusion::psi::PsiSettings = baygrid_fusion::settings_over(
            Some(&baygrid_fusion::psi::PsiSettings::default()),
            ask.settings.clone(),
        )
        .map_err(settings_error)?;
        json(&cfg)?
    } else if vertical {
        let base = baygrid_fusion::hetero::HeteroConfig::fate();
        let cfg =
            baygrid_fusion::hetero::HeteroConfig::from_settings(ask.settings.clone(), Some(&base))
                .map_err(|e| settings_error(e.to_string()))?;
        json(&cfg)?
    } else {
        let base = baygrid_fusion::homo::HomoConfig::fate_lr();
        let mlp = ask.task == FusionTask::HomoMlp;
        let cfg = baygrid_fusion::homo::config_from(mlp, ask.settings.clone(), Some(&base))
            .map_err(|e| settings_error(e.to_string()))?;
        json(&cfg)?
    };
    let max_minutes = ask.max_minutes.unwrap_or(30);
    if !(1..=1440).contains(&max_minutes) {
        return Err(ApiError::bad("max_minutes", "must be from 1 to 1440"));
    }
    let priority = match &ask.priority_class {
        None => 0,
        Some(class) => crate::jobs::priority_of(&state, class)?,
    };
    let catalog = state.catalog();
    let today = today(&state)?;
    let recipient = catalog
        .tenant_party(&tenant)
        .ok_or_else(|| ApiError::bad("tenant", format!("unknown tenant `{tenant}`")))?;
    let federated = |dataset: &str| {
        catalog
            .contracts
            .values()
            .filter(|c| {
                c.tenant == tenant
                    && c.dataset == dataset
                    && c.state == ContractState::Active
                    && c.request.mode == OfferMode::Federated
                    && c.expires > today
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let purpose = match &ask.purpose {
        Some(p) => p.clone(),
        None => {
            let mut purposes: Vec<String> = federated(&ask.parties[0].dataset)
                .into_iter()
                .map(|c| c.request.purpose)
                .collect();
            purposes.sort();
            purposes.dedup();
            match purposes.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(ApiError::Forbidden(format!(
                        "tenant `{tenant}` has no active federated contract on `{}`",
                        ask.parties[0].dataset
                    )))
                }
                many => {
                    return Err(ApiError::bad(
                        "purpose",
                        format!("name one of the contracts' purposes: {}", many.join(", ")),
                    ))
                }
            }
        }
    };
    let mut datasets = Vec::new();
    let mut contracts = Vec::new();
    let mut prices = Vec::new();
    for (i, p) in ask.parties.iter().enumerate() {
        let dataset = catalog.datasets.get(&p.dataset).ok_or_else(|| {
            ApiError::bad(
                format!("parties[{i}].dataset"),
                format!("unknown dataset `{}`", p.dataset),
            )
        })?;
        if catalog
            .versions
            .get(&p.dataset)
            .is_none_or(|v| v.is_empty())
        {
            return Err(ApiError::Conflict(format!(
                "`{}` has no uploaded version yet",
                p.dataset
            )));
        }
        let contract = federated(&p.dataset)
            .into_iter()
            .find(|c| c.request.purpose == purpose)
            .ok_or_else(|| {
                ApiError::Forbidden(format!(
                    "tenant `{tenant}` has no active federated contract on `{}` for {purpose}",
                    p.dataset
                ))
            })?;
        let offer = catalog
            .data_offers
            .get(&contract.request.offer)
            .ok_or_else(|| {
                ApiError::Conflict(format!("offer `{}` is withdrawn", contract.request.offer))
            })?;
        if vertical {
            let labelled = dataset.schema.iter().any(|c| c.name == "y");
            match (i, labelled) {
                (0, false) => {
                    return Err(ApiError::bad(
                        "parties[0].dataset",
                        format!("the guest's dataset `{}` has no label column `y`", p.dataset),
                    ))
                }
                (1, true) => {
                    return Err(ApiError::bad(
                        "parties[1].dataset",
                        format!(
                            "the host's dataset `{}` holds labels (`y`): a vertical run's host never has them",
                            p.dataset
                        ),
                    ))
                }
                _ => {}
            }
        }
        prices.push(offer.price.per_use.unwrap_or(Money::new(0, Currency::CNY)));
        contracts.push(contract.id.clone());
        datasets.push(dataset);
    }
    // the rules decide every flow before anything is placed: for a model, each party's
    // updates to the aggregator's site and the final model to every party's vault; for an
    // intersection, the other party's membership to each party that learns it
    let decide_as = |dataset: &baygrid_api::DatasetSpec,
                     site: &str,
                     mode: baygrid_rules::Mode,
                     subjects: Option<u64>|
     -> ApiResult<baygrid_rules::Decision> {
        let (request, _) = output_request(
            &catalog, dataset, recipient, site, mode, subjects, &purpose, today,
        )?;
        state
            .rules
            .decide(&request)
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    };
    let decide = |dataset: &baygrid_api::DatasetSpec, site: &str| {
        decide_as(dataset, site, baygrid_rules::Mode::ModelUpdate, None)
    };
    let mut rules = Vec::new();
    if psi {
        let reveal: baygrid_fusion::psi::PsiSettings = serde_json::from_value(settings.clone())
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        for (k, party) in datasets.iter().enumerate() {
            if k == 1 && reveal.reveal == baygrid_fusion::psi::Reveal::Designated {
                continue; // only the guest learns it
            }
            let peer = datasets[1 - k];
            // at most the smaller set's individuals are in the intersection
            let bound = catalog.subjects_of(peer).min(catalog.subjects_of(party));
            let decision = decide_as(peer, &party.vault, baygrid_rules::Mode::Copy, Some(bound))?;
            if !decision.allowed {
                return Err(ApiError::Forbidden(format!(
                    "the rules would not let which of `{}`'s individuals are in `{}` reach {}: {}",
                    party.name,
                    peer.name,
                    party.vault,
                    decision.why_denied()
                )));
            }
            rules.extend(decision.rules.iter().map(|r| r.to_string()));
        }
    }
    for d in datasets.iter().filter(|_| !psi) {
        for party_site in datasets.iter().map(|d| d.vault.as_str()) {
            let decision = decide(d, party_site)?;
            if !decision.allowed {
                return Err(ApiError::Forbidden(format!(
                    "the rules would not let a model trained on `{}` reach {party_site}: {}",
                    d.name,
                    decision.why_denied()
                )));
            }
            rules.extend(decision.rules.iter().map(|r| r.to_string()));
        }
    }
    let mut candidates: Vec<&str> = Vec::new();
    for d in &datasets {
        if !candidates.contains(&d.vault.as_str()) {
            candidates.push(&d.vault);
        }
    }
    candidates.sort_by_key(|site| cheapest_price(&catalog, site).unwrap_or(i64::MAX));
    let mut placement = Vec::new();
    let mut chosen = None;
    if psi {
        placement.push(
            "no aggregator: the two parties' workers exchange blinded points through the relay"
                .to_string(),
        );
        candidates.clear();
    }
    if vertical {
        // the dealer receives two shapes and nothing derived from a row; it goes to the
        // cheapest party site
        let site = candidates[0];
        let jurisdiction = catalog.sites.get(site).map(|s| s.jurisdiction);
        placement.push(format!(
            "{site} ({}): the dealer; it receives only the aligned tables' shapes",
            jurisdiction.map(|j| j.to_string()).unwrap_or_default()
        ));
        chosen = Some(site.to_string());
        candidates.clear();
    }
    for site in candidates {
        let mut denied = Vec::new();
        let mut site_rules = Vec::new();
        for d in &datasets {
            let decision = decide(d, site)?;
            site_rules.extend(decision.rules.iter().map(|r| r.to_string()));
            if !decision.allowed {
                denied.push(format!("{}: {}", d.name, decision.why_denied()));
            }
        }
        let jurisdiction = catalog.sites.get(site).map(|s| s.jurisdiction);
        if denied.is_empty() {
            site_rules.sort();
            site_rules.dedup();
            placement.push(format!(
                "{site} ({}): every party's updates may come, under {}",
                jurisdiction.map(|j| j.to_string()).unwrap_or_default(),
                site_rules.join(", ")
            ));
            if chosen.is_none() {
                chosen = Some(site.to_string());
                rules.extend(site_rules);
            }
        } else {
            placement.push(format!(
                "{site} ({}): refused: {}",
                jurisdiction.map(|j| j.to_string()).unwrap_or_default(),
                denied.join("; ")
            ));
        }
    }
    if chosen.is_none() && !psi {
        return Err(ApiError::Forbidden(format!(
            "no party's site may receive every party's model updates: {}",
            placement.join(" | ")
        )));
    }
    rules.sort();
    rules.dedup();
    // the run's hold: every offer's per-use price (each worker's job holds its compute)
    let mut held_cny = 0i64;
    for price in &prices {
        held_cny += catalog
            .rates
            .to_cny(*price)
            .map_err(|e| ApiError::Conflict(format!("cannot price the run: {e}")))?
            .minor;
    }
    let now = state.now();
    let id = baygrid_core::new_id("fu").replace('_', "-");
    let hold = (held_cny > 0).then(|| Transfer {
        id: names::hold(&id),
        debit_account: names::wallet(&tenant).id,
        credit_account: names::clearing(Currency::CNY).id,
        amount: held_cny,
        currency: Currency::CNY,
        kind: TransferKind::Pending {
            expires_at: now + state.config.hold_timeout.as_millis() as i64,
        },
        linked: false,
        reference: format!("fusion:{id}"),
    });
    let worker = |index: usize, role: &str, dataset: Option<String>, site: &str| FusionWorker {
        index,
        role: role.to_string(),
        dataset,
        site: site.to_string(),
        jurisdiction: catalog
            .sites
            .get(site)
            .map(|s| s.jurisdiction)
            .unwrap_or(baygrid_core::Jurisdiction::CN),
        state: WorkerState::Pending,
        job: None,
        cluster: None,
        started_at: None,
        seconds: 0.0,
        model: None,
        model_sha256: None,
        scores: None,
        error: None,
    };
    let mut workers: Vec<FusionWorker> = chosen
        .iter()
        .map(|site| {
            let role = if vertical { "dealer" } else { "aggregator" };
            worker(0, role, None, site)
        })
        .collect();
    for (i, (p, d)) in ask.parties.iter().zip(&datasets).enumerate() {
        workers.push(worker(i + 1, &p.name, Some(d.name.clone()), &d.vault));
    }
    // each worker is a job in the dispatcher's queue, held to its site
    let actor = crate::auth::actor(&who);
    let mut jobs = Vec::new();
    for w in &mut workers {
        let job = worker_job(
            &state,
            &catalog,
            &id,
            w,
            &tenant,
            (max_minutes, priority),
            &actor,
            now,
        )
        .await?;
        w.job = Some(job.id.clone());
        jobs.push(job);
    }
    let mut record = FusionRecord {
        view: FusionView {
            id: id.clone(),
            tenant: tenant.clone(),
            task: ask.task,
            purpose: purpose.clone(),
            state: FusionState::Running,
            aggregation: None,
            workers,
            placement,
            rules,
            rounds: vec![],
            held: Money::new(held_cny, Currency::CNY),
            charged: None,
            error: None,
            created_at: millis_to_rfc3339(now),
            finished_at: None,
        },
        settings,
        prices,
        outputs: vec![None; ask.parties.len()],
        events: vec![],
    };
    for w in &record.view.workers.clone() {
        record.log(
            now,
            format!("{} placed at {} ({})", w.role, w.site, w.jurisdiction),
        );
    }
    let payload = serde_json::json!({
        "run": id,
        "tenant": tenant,
        "task": ask.task.as_str(),
        "purpose": purpose,
        "datasets": datasets.iter().map(|d| &d.name).collect::<Vec<_>>(),
        "contracts": contracts,
        "sites": record.view.workers.iter().map(|w| &w.site).collect::<Vec<_>>(),
        "rules": record.view.rules,
    });
    let holds: i128 = hold
        .iter()
        .chain(jobs.iter().filter_map(|j| j.hold.as_ref()))
        .map(|h| h.amount as i128)
        .sum();
    let wallet = names::wallet(&tenant).id;
    let short = |available: i128| ApiError::Unprocessable {
        code: "insufficient_funds",
        field: Some("max_minutes".into()),
        message: format!(
            "tenant `{tenant}` has {} available in {wallet}; the run holds {} (the offers' \
             per-use prices, and each worker's compute for max_minutes × margin): deposit \
             funds, or lower max_minutes",
            Money::new(available.clamp(0, i64::MAX as i128) as i64, Currency::CNY),
            Money::new(holds.min(i64::MAX as i128) as i64, Currency::CNY),
        ),
    };
    let available = state.store.ledger_available(&wallet).unwrap_or(0);
    if holds > available {
        return Err(short(available));
    }
    state
        .store
        .accept_fusion(
            FusionRow {
                id: id.clone(),
                tenant: tenant.clone(),
                state: FusionState::Running.as_str().into(),
                created_ms: now,
                finished_ms: None,
                body: record.body()?,
            },
            hold,
            jobs,
            actor,
            payload,
        )
        .await
        .map_err(|e| match e {
            // spent meanwhile: nothing of the run was written
            baygrid_store::StoreError::Ledger {
                error: baygrid_ledger::TransferError::ExceedsCredits { .. },
                ..
            } => short(state.store.ledger_available(&wallet).unwrap_or(0)),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(record.view)))
}

/// A worker's job: one accelerator of any model its site offers, for `max_minutes` at
/// `priority`, held to the site (so to its jurisdiction: the data never moves), with its
/// own hold.
#[allow(clippy::too_many_arguments)]
async fn worker_job(
    state: &AppState,
    catalog: &CatalogSnapshot,
    run: &str,
    worker: &FusionWorker,
    tenant: &str,
    (max_minutes, priority): (u64, i32),
    actor: &str,
    now: i64,
) -> ApiResult<baygrid_store::NewJob> {
    let mut models: Vec<String> = catalog
        .clusters
        .values()
        .filter(|c| c.site == worker.site)
        .map(|c| c.accelerator.clone())
        .collect();
    models.sort();
    models.dedup();
    let spec = JobSpec {
        name: format!(
            "fusion-{}-{}",
            &run[run.len().saturating_sub(8)..],
            worker.index
        ),
        resources: baygrid_core::Resources {
            accelerators: baygrid_core::AcceleratorRequest {
                alternatives: models.into_iter().map(|m| (m, 1)).collect(),
            },
            nodes: 1,
            cpus: 2,
            memory_gb: 4,
        },
        command: format!(
            ": the {} of fusion run {run}, run by the site's agent",
            worker.role
        ),
        env: Default::default(),
        image: None,
        estimated_duration: baygrid_core::job::HumanDuration(Duration::from_secs(max_minutes * 60)),
        max_price_per_hour: None,
        deadline: None,
        priority,
        priority_class: None,
        latency_sensitive: false,
        preemptible: false,
        allowed_jurisdictions: Some(vec![worker.jurisdiction]),
        inputs: vec![],
        purpose: None,
        sites: Some(vec![worker.site.clone()]),
        fusion: Some(FusionPart {
            run: run.to_string(),
            index: worker.index,
        }),
    };
    spec.validate()
        .map_err(|e| ApiError::Unavailable(format!("a worker's job: {e}")))?;
    let id = baygrid_core::new_id("job");
    let hold = crate::jobs::admission(state, catalog, tenant, &spec, &id, now)
        .await
        .map_err(|e| {
            ApiError::Conflict(format!(
                "the {}'s job at {} cannot be queued: {e}",
                worker.role, worker.site
            ))
        })?;
    Ok(baygrid_store::NewJob {
        id,
        tenant: tenant.to_string(),
        idempotency_key: None,
        spec,
        actor: actor.to_string(),
        now,
        hold,
    })
}

async fn record_of(state: &AppState, id: &str) -> ApiResult<(FusionRow, FusionRecord)> {
    let row = state
        .store
        .fusion_row(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fusion run `{id}`")))?;
    let record = FusionRecord::from_row(&row)?;
    Ok((row, record))
}

async fn visible(state: &AppState, who: &Principal, id: &str) -> ApiResult<FusionRecord> {
    let (row, record) = record_of(state, id).await?;
    if !sees(who, &row) {
        return Err(ApiError::NotFound(format!("no fusion run `{id}`")));
    }
    Ok(record)
}

/// A run the caller may see and its log, from one read of its record.
pub(crate) async fn view_and_log(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> ApiResult<(FusionView, Vec<FusionEvent>)> {
    let record = visible(state, who, id).await?;
    Ok((record.view, record.events))
}

#[utoipa::path(get, path = "/api/v1/fusion/{id}", params(("id" = String, Path)), responses((status = 200, body = FusionView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<FusionView>> {
    Ok(Json(visible(&state, &who, &id).await?.view))
}

/// The run's log: placement, workers claimed, every round, the release.
#[utoipa::path(get, path = "/api/v1/fusion/{id}/logs", params(("id" = String, Path)), responses((status = 200, body = [FusionEvent]), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<FusionEvent>>> {
    Ok(Json(visible(&state, &who, &id).await?.events))
}

/// The caller's runs, newest first (operators and regulators: everyone's).
#[utoipa::path(get, path = "/api/v1/fusion", params(ListParams), responses((status = 200, body = [FusionView]), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(params): QueryParams<ListParams>,
) -> ApiResult<Json<Vec<FusionView>>> {
    let wanted = params.state_in(&["running", "succeeded", "failed", "cancelled"])?;
    let tenant = match who.role {
        Role::Operator | Role::Regulator => params.tenant.clone(),
        Role::Tenant => who.subject.clone(),
        _ => {
            return Err(ApiError::Forbidden(
                "tenants, operators and regulators only".into(),
            ))
        }
    };
    let limit = params.limit()?;
    let before = match &params.before {
        Some(id) => {
            let row = state.store.fusion_row(id).await?;
            Some(paging::below_record("fusion run", id, row, |r| {
                sees(&who, r)
            })?)
        }
        None => None,
    };
    let rows = state
        .store
        .fusion_rows(&RecordFilter {
            tenant: tenant.as_deref(),
            state: wanted,
            before: before.as_ref(),
            limit,
        })
        .await?;
    rows.iter()
        .map(|r| FusionRecord::from_row(r).map(|f| f.view))
        .collect::<ApiResult<Vec<_>>>()
        .map(Json)
}

/// Stops a running run: its workers' next message fails, the hold is voided.
#[utoipa::path(post, path = "/api/v1/fusion/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = FusionView), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<FusionView>> {
    if !matches!(who.role, Role::Operator | Role::Tenant) {
        return Err(ApiError::Forbidden("tenants and operators only".into()));
    }
    let _serial = state.queries.fusion_writes.lock().await;
    let record = visible(&state, &who, &id).await?;
    if record.view.state != FusionState::Running {
        return Err(ApiError::Conflict(format!(
            "fusion run `{id}` has ended ({})",
            record.view.state.as_str()
        )));
    }
    let who_name = crate::auth::actor(&who);
    let view = end_unfinished(
        &state,
        record,
        FusionState::Cancelled,
        format!("cancelled by {who_name}"),
        who_name,
    )
    .await?;
    Ok(Json(view))
}

/// Ends a running run without a model (failed, withheld or cancelled): the hold is voided,
/// the workers' unfinished jobs cancelled, the relay's messages dropped, the audit entry
/// says why.
async fn end_unfinished(
    state: &AppState,
    mut record: FusionRecord,
    outcome: FusionState,
    error: String,
    actor: String,
) -> ApiResult<FusionView> {
    let now = state.now();
    record.view.state = outcome;
    record.view.error = Some(error.clone());
    record.view.finished_at = Some(millis_to_rfc3339(now));
    record.log(now, format!("{}: {error}", outcome.as_str()));
    let id = record.view.id.clone();
    let transfers = crate::ledger::void_hold(
        &id,
        &record.view.tenant,
        record.view.held.minor,
        format!("fusion:{id}"),
    );
    let kind = match outcome {
        FusionState::Cancelled => "fusion.cancelled",
        _ => "fusion.failed",
    };
    // the workers' jobs still queued or running are cancelled with the run
    let unfinished: Vec<String> = record
        .view
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Done)
        .filter_map(|w| w.job.clone())
        .collect();
    state
        .store
        .finish_fusion(
            id.clone(),
            Ending {
                state: outcome.as_str().into(),
                body: record.body()?,
                transfers,
                actor,
                now,
                kind,
                payload: serde_json::json!({ "run": id, "tenant": record.view.tenant, "reason": error }),
            },
            unfinished,
        )
        .await?;
    state.queries.relay.ended(Conversation::Fusion(&id));
    Ok(record.view)
}

/// Fails the running runs that have not moved for `vault_answer_timeout`: a worker whose
/// job no cluster at its site started, or workers that went silent together.
pub(crate) async fn expire(state: &AppState) -> ApiResult<()> {
    let limit = state.config.vault_answer_timeout;
    let now = state.now();
    let running = state
        .store
        .every_fusion_row(FusionState::Running.as_str())
        .await?;
    let idle = |record: &FusionRecord, created_ms: i64| {
        now - record.last_moved_ms().max(created_ms) > limit.as_millis() as i64
    };
    for row in running {
        // a run younger than the limit cannot have been idle that long: its record is not read
        if now - row.created_ms <= limit.as_millis() as i64
            || !idle(&FusionRecord::from_row(&row)?, row.created_ms)
        {
            continue;
        }
        let _serial = state.queries.fusion_writes.lock().await;
        let (row, record) = record_of(state, &row.id).await?;
        if row.state != FusionState::Running.as_str() || !idle(&record, row.created_ms) {
            continue;
        }
        let pending: Vec<String> = record
            .view
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Pending)
            .map(|w| {
                format!(
                    "the {}'s job {} at {}",
                    w.role,
                    w.job.as_deref().unwrap_or("-"),
                    w.site
                )
            })
            .collect();
        let within = humantime::format_duration(limit);
        let error = if pending.is_empty() {
            format!("no word from the workers for {within}")
        } else {
            format!(
                "no cluster started {} within {within}",
                pending.join(" or ")
            )
        };
        end_unfinished(state, record, FusionState::Failed, error, "server".into()).await?;
    }
    Ok(())
}

/// Starts the worker that job `job_id` is, on `cluster`, as the job's lease is granted:
/// the work its agent runs. None when there is nothing to run: the run has ended, or the
/// worker had started already (a copy lost mid-run cannot rejoin its protocol, so the run
/// fails).
pub(crate) async fn start_worker(
    state: &AppState,
    part: &FusionPart,
    job_id: &str,
    cluster: &str,
) -> ApiResult<Option<FusionWork>> {
    let catalog = state.catalog();
    let _serial = state.queries.fusion_writes.lock().await;
    let Some(row) = state.store.fusion_row(&part.run).await? else {
        return Ok(None);
    };
    let mut record = FusionRecord::from_row(&row)?;
    if record.view.state != FusionState::Running {
        return Ok(None);
    }
    let i = record.position(part.index)?;
    let w = &record.view.workers[i];
    if w.job.as_deref() != Some(job_id) {
        return Ok(None);
    }
    if w.state != WorkerState::Pending {
        let error = format!(
            "the {}'s job {job_id} was lost on {} and placed again; a worker cannot rejoin a run mid-protocol",
            w.role,
            w.cluster.as_deref().unwrap_or("its cluster")
        );
        end_unfinished(state, record, FusionState::Failed, error, "server".into()).await?;
        return Ok(None);
    }
    let site = w.site.clone();
    let (table, model) = match &w.dataset {
        None => (None, None),
        Some(name) => {
            let version = catalog
                .versions
                .get(name)
                .and_then(|v| v.last())
                .ok_or_else(|| ApiError::Conflict(format!("`{name}` has no version")))?;
            let vault_url = state.config.vault_url(&site);
            (
                Some(PartyTable {
                    dataset: name.clone(),
                    upload: version.upload.clone(),
                    files: version.files.clone(),
                    vault_url: vault_url.clone(),
                }),
                Some(OutputsTarget {
                    vault_url,
                    dataset: output_name(record.view.task, &record.view.id, &w.role),
                }),
            )
        }
    };
    let work = FusionWork {
        run: record.view.id.clone(),
        task: record.view.task,
        index: w.index,
        parties: record.parties(),
        settings: record.settings.clone(),
        table,
        model,
        wait_ms: WORKER_WAIT_MS,
    };
    let now = state.now();
    let w = &mut record.view.workers[i];
    w.state = WorkerState::Running;
    w.cluster = Some(cluster.to_string());
    w.started_at = Some(millis_to_rfc3339(now));
    let line = format!("{} started on {cluster} at {site} (job {job_id})", w.role);
    record.log(now, line);
    state
        .store
        .update_fusion(row.id.clone(), record.body()?)
        .await?;
    Ok(Some(work))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WorkerParams {
    /// The worker: 0 for the aggregator, the party's number otherwise.
    pub index: usize,
    /// On send: the worker the message is for.
    pub to: Option<usize>,
    /// On send: the sender's number for the message, counting its messages to that worker
    /// from 0 (a message resent after a lost answer keeps its number, and is not delivered
    /// twice).
    pub n: Option<u64>,
    /// On receive: the first message wanted (numbered from 0).
    #[serde(default)]
    pub from: usize,
    /// On receive: how long to wait for a message (milliseconds, at most 30,000).
    #[serde(default)]
    pub wait_ms: u64,
}

/// The running run's worker `index`, which this agent's cluster claimed.
async fn claimed_worker(
    state: &AppState,
    id: &str,
    index: usize,
    cluster: &str,
) -> ApiResult<FusionRecord> {
    let (_, record) = record_of(state, id).await?;
    if record.view.state != FusionState::Running {
        return Err(ApiError::Conflict(format!(
            "fusion run `{id}` has ended ({})",
            record.view.state.as_str()
        )));
    }
    let worker = &record.view.workers[record.position(index)?];
    if worker.cluster.as_deref() != Some(cluster) {
        return Err(ApiError::Forbidden(format!(
            "worker {index} of run `{id}` is not this cluster's"
        )));
    }
    Ok(record)
}

/// A message from one worker of a run to another, kept in the store until it is
/// acknowledged or the run ends.
#[utoipa::path(post, path = "/api/v1/agent/fusion/{id}/relay", params(("id" = String, Path), WorkerParams), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 204), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn relay_send(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<WorkerParams>,
    RawBody(bytes): RawBody,
) -> ApiResult<StatusCode> {
    let cluster = agent_cluster(&who)?;
    let record = claimed_worker(&state, &id, params.index, &cluster).await?;
    let to = params
        .to
        .filter(|t| *t != params.index && record.view.workers.iter().any(|w| w.index == *t))
        .ok_or_else(|| ApiError::bad("to", "another worker of the run"))?;
    let mut body = (params.index as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&bytes);
    state
        .queries
        .relay
        .post(
            &state,
            Conversation::Fusion(&id),
            &to.to_string(),
            &params.index.to_string(),
            params.n,
            body,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The messages addressed to a worker from `from` on, waiting up to `wait_ms` for one:
/// each framed as the sender's number (4 bytes, little-endian) and the message. Asking
/// from `from` acknowledges the ones before it, which are dropped.
#[utoipa::path(get, path = "/api/v1/agent/fusion/{id}/relay", params(("id" = String, Path), WorkerParams), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn relay_receive(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<WorkerParams>,
) -> ApiResult<Vec<u8>> {
    let cluster = agent_cluster(&who)?;
    claimed_worker(&state, &id, params.index, &cluster).await?;
    let wait = Duration::from_millis(params.wait_ms.min(30_000));
    let body = state
        .queries
        .relay
        .receive(
            &state,
            Conversation::Fusion(&id),
            &params.index.to_string(),
            params.from,
            wait,
        )
        .await?;
    // a run that ended while this worker waited is answered as ended
    claimed_worker(&state, &id, params.index, &cluster).await?;
    Ok(body)
}

/// A worker's report: a round's figures (the aggregator), a party's model in its vault,
/// its end, or its error. When every worker is done the models are released and the run
/// is charged.
#[utoipa::path(post, path = "/api/v1/agent/fusion/{id}/report", params(("id" = String, Path), WorkerParams), request_body = FusionReport, responses((status = 200, body = FusionView), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn report(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<WorkerParams>,
    JsonBody(report): JsonBody<FusionReport>,
) -> ApiResult<Json<FusionView>> {
    let cluster = agent_cluster(&who)?;
    let _serial = state.queries.fusion_writes.lock().await;
    let mut record = claimed_worker(&state, &id, params.index, &cluster).await?;
    let i = record.position(params.index)?;
    let now = state.now();
    let actor = crate::auth::actor(&who);
    if let Some(error) = report.error {
        let role = record.view.workers[i].role.clone();
        record.view.workers[i].state = WorkerState::Failed;
        record.view.workers[i].error = Some(error.clone());
        let view = end_unfinished(
            &state,
            record,
            FusionState::Failed,
            format!("{role} failed: {error}"),
            actor,
        )
        .await?;
        return Ok(Json(view));
    }
    if let Some(round) = report.round {
        let reporter = if record.view.task == FusionTask::HeteroLr {
            1
        } else {
            0
        };
        if params.index != reporter || record.view.task == FusionTask::Psi {
            return Err(ApiError::bad(
                "round",
                "rounds come from the aggregator, or a vertical run's guest",
            ));
        }
        let figure = match (round.loss, round.gradient_norm) {
            (Some(loss), _) => format!("loss {loss:.5}"),
            (None, Some(norm)) => format!("guest gradient norm {norm:.5}"),
            (None, None) => "no figure".into(),
        };
        record.log(
            now,
            format!(
                "round {}: {figure}, {:.3} s, {} bytes",
                round.round, round.seconds, round.bytes
            ),
        );
        record.view.rounds.retain(|r| r.round != round.round);
        record.view.rounds.push(round);
    }
    if let Some(aggregation) = report.aggregation {
        record.log(now, format!("aggregation: {aggregation}"));
        record.view.aggregation = Some(aggregation);
    }
    if let Some(done) = report.party {
        if params.index == 0 {
            return Err(ApiError::bad(
                "party",
                "the aggregator or dealer keeps no model",
            ));
        }
        let expected = output_file(record.view.task);
        let output = done.files.iter().find(|f| f.name == expected);
        if output.is_none() && !(record.view.task == FusionTask::Psi && done.files.is_empty()) {
            return Err(ApiError::bad(
                "party.files",
                format!("no `{expected}` among them"),
            ));
        }
        let w = &mut record.view.workers[i];
        w.model_sha256 = output.map(|f| f.sha256.clone());
        w.scores = Some(done.scores.clone());
        let line = match output {
            Some(f) => format!("{} saved its {expected} ({})", w.role, f.sha256),
            None => format!("{} was not told the intersection", w.role),
        };
        record.outputs[params.index - 1] = Some(done.files);
        record.log(now, line);
    }
    if report.done {
        let w = &mut record.view.workers[i];
        let started = w.started_at.as_deref().and_then(millis).unwrap_or(now);
        if params.index > 0 && record.outputs[params.index - 1].is_none() {
            return Err(ApiError::bad("done", "a party reports its model first"));
        }
        w.state = WorkerState::Done;
        w.seconds = (now - started).max(0) as f64 / 1000.0;
        let line = format!("{} done after {:.1} s", w.role, w.seconds);
        record.log(now, line);
    }
    if record
        .view
        .workers
        .iter()
        .all(|w| w.state == WorkerState::Done)
    {
        let view = release(&state, record, &who, actor).await?;
        return Ok(Json(view));
    }
    state.store.update_fusion(id, record.body()?).await?;
    Ok(Json(record.view))
}

/// Every worker is done: each party's copy of the model is released by the rules (decided
/// on record with its digest) and registered as a derived dataset in its vault, and the
/// run is charged.
async fn release(
    state: &AppState,
    mut record: FusionRecord,
    who: &Principal,
    actor: String,
) -> ApiResult<FusionView> {
    let catalog = state.catalog();
    let today = today(state)?;
    let id = record.view.id.clone();
    let recipient = catalog
        .tenant_party(&record.view.tenant)
        .ok_or_else(|| ApiError::Conflict(format!("tenant `{}` is gone", record.view.tenant)))?
        .clone();
    // the parties' workers, in party order, and their datasets
    let parties: Vec<usize> = (0..record.view.workers.len())
        .filter(|&p| record.view.workers[p].dataset.is_some())
        .collect();
    let datasets: Vec<baygrid_api::DatasetSpec> = parties
        .iter()
        .filter_map(|&p| record.view.workers[p].dataset.as_ref())
        .map(|d| {
            catalog
                .datasets
                .get(d)
                .cloned()
                .ok_or_else(|| ApiError::Conflict(format!("dataset `{d}` is gone")))
        })
        .collect::<ApiResult<_>>()?;
    let mut rules = record.view.rules.clone();
    let mut denied = Vec::new();
    for (k, &p) in parties.iter().enumerate() {
        let w = &record.view.workers[p];
        for (d, mode, subjects) in output_flows(&record, k, &datasets) {
            let (request, holder) = output_request(
                &catalog,
                d,
                &recipient,
                &w.site,
                mode,
                subjects,
                &record.view.purpose,
                today,
            )?;
            let answer = crate::zone::decide_recorded(
                state,
                request,
                holder.name.clone(),
                serde_json::json!({ "fusion": id, "party": w.role, "output_sha256": w.model_sha256 }),
                actor.clone(),
            )
            .await?;
            let decision: baygrid_rules::Decision =
                serde_json::from_value(answer["decision"].clone())
                    .map_err(|e| ApiError::Unavailable(format!("decision record: {e}")))?;
            rules.extend(decision.rules.iter().map(|r| r.to_string()));
            if !decision.allowed {
                denied.push(format!(
                    "{} to {}: {}",
                    d.name,
                    w.site,
                    decision.why_denied()
                ));
            }
        }
    }
    rules.sort();
    rules.dedup();
    record.view.rules = rules;
    if !denied.is_empty() {
        let what = if record.view.task == FusionTask::Psi {
            "the intersection"
        } else {
            "the model"
        };
        return end_unfinished(
            state,
            record,
            FusionState::Failed,
            format!("the rules withheld {what}: {}", denied.join(" | ")),
            actor,
        )
        .await;
    }
    let inputs: Vec<String> = datasets.iter().map(|d| d.name.clone()).collect();
    for (k, &p) in parties.iter().enumerate() {
        let w = &record.view.workers[p];
        let files = record.outputs[w.index - 1].clone().unwrap_or_default();
        if files.is_empty() {
            // a psi party that was not told the intersection keeps nothing
            continue;
        }
        let derived = crate::zone::Derived {
            name: output_name(record.view.task, &id, &w.role),
            holder: datasets[k].holder.clone(),
            site: w.site.clone(),
            inputs: inputs.clone(),
            purpose: record.view.purpose.clone(),
            // a model is decided not personal under DERIVED-MODEL; an intersection lists
            // individuals, so it keeps its inputs' profile
            personal: (record.view.task != FusionTask::Psi)
                .then_some(baygrid_rules::Personal::None),
            upload: id.clone(),
        };
        let name = crate::zone::register_derived(state, derived, &files, who).await?;
        record.view.workers[p].model = Some(name);
    }
    // the charge: the offers' per-use prices to their holders, at most the hold (each
    // worker's job settles its own metered compute)
    let now = state.now();
    let reference = format!("fusion:{id}");
    let mut payees: Vec<(String, i64, baygrid_ledger::Account)> = Vec::new();
    for (d, price) in datasets.iter().zip(&record.prices) {
        let cny = catalog
            .rates
            .to_cny(*price)
            .map_err(|e| ApiError::Conflict(format!("cannot price the run: {e}")))?
            .minor;
        payees.push((
            format!("{id}:{}", d.name),
            cny,
            names::holder(&d.holder, price.currency),
        ));
    }
    let mut left = record.view.held.minor;
    let mut charged = 0;
    let mut transfers = Vec::new();
    let mut accounts = Vec::new();
    for (key, cny, payee) in &payees {
        let cny = (*cny).min(left);
        if cny <= 0 {
            continue;
        }
        left -= cny;
        charged += cny;
        if state.store.ledger_account(&payee.id).is_none() && !accounts.contains(payee) {
            accounts.push(payee.clone());
        }
        crate::ledger::pay_out(state, &mut transfers, key, cny, payee, &reference)?;
    }
    if charged > 0 {
        transfers.insert(
            0,
            Transfer {
                id: format!("post:{id}"),
                debit_account: names::wallet(&record.view.tenant).id,
                credit_account: names::clearing(Currency::CNY).id,
                amount: charged,
                currency: Currency::CNY,
                kind: TransferKind::Post {
                    pending_id: names::hold(&id),
                },
                linked: true,
                reference: reference.clone(),
            },
        );
        transfers.last_mut().expect("a post at least").linked = false;
    } else {
        transfers = crate::ledger::void_hold(
            &id,
            &record.view.tenant,
            record.view.held.minor,
            reference.clone(),
        );
    }
    if !accounts.is_empty() {
        state.store.open_accounts(accounts, now).await?;
    }
    record.view.charged = Some(Money::new(charged, Currency::CNY));
    record.view.state = FusionState::Succeeded;
    record.view.finished_at = Some(millis_to_rfc3339(now));
    record.log(
        now,
        format!(
            "released under {}; charged {}",
            record.view.rules.join(", "),
            Money::new(charged, Currency::CNY)
        ),
    );
    let models: Vec<serde_json::Value> = record
        .view
        .workers
        .iter()
        .filter(|w| w.dataset.is_some())
        .map(|w| serde_json::json!({ "party": w.role, "dataset": w.model, "sha256": w.model_sha256, "site": w.site }))
        .collect();
    state
        .store
        .finish_fusion(
            id.clone(),
            Ending {
                state: FusionState::Succeeded.as_str().into(),
                body: record.body()?,
                transfers,
                actor,
                now,
                kind: "fusion.finished",
                payload: serde_json::json!({
                    "run": id,
                    "tenant": record.view.tenant,
                    "models": models,
                    "rules": record.view.rules,
                    "rounds": record.view.rounds.len(),
                    "charged": record.view.charged,
                }),
            },
            vec![],
        )
        .await?;
    state.queries.relay.ended(Conversation::Fusion(&id));
    Ok(record.view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_valid_dataset_names() {
        let run = "fu-01jabcdefghijklmnopqrstuvw";
        let name = output_name(FusionTask::HomoLr, run, &"a".repeat(40));
        assert!(baygrid_core::ids::is_valid_name(&name), "{name}");
        assert_eq!(
            output_name(FusionTask::HomoLr, run, "hk-hospital"),
            "hk-hospital-model-pqrstuvw"
        );
        assert_eq!(
            output_name(FusionTask::Psi, run, "hk-hospital"),
            "hk-hospital-psi-pqrstuvw"
        );
    }
}
