//! Aggregate queries at the data (可用不可见). The server plans a query over the datasets'
//! schemas (it never holds their rows), checks its shape against the query offers, prices
//! it in ε and δ, has the rules pre-decide the result's release, and spends the budgets in
//! one transaction with the query's record and a hold on the consumer's wallet. The agent
//! at each dataset's vault runs its side over the files there and answers only noisy,
//! thresholded groups; the server puts the sides together, has the rules decide the
//! `query_result` flow, and releases the result with its hash in the audit log and the
//! charge in the ledger, in one transaction.
//!
//! A query across two vaults joins their datasets on the subject columns: the two agents
//! align their individuals by private set intersection through the server's relay (which
//! sees only blinded points) and each answers with its own columns.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{
    BudgetView, ContractState, DataOfferSpec, DatasetSpec, OfferMode, QueryAnswerBody,
    QueryCostView, QueryDryRun, QueryRequest, QueryResult, QueryState, QueryTable, QueryTask,
    QueryTerms, QueryView, SideAnswer,
};
use baygrid_core::{millis_to_rfc3339, Currency, Money, Principal, Role};
use baygrid_ledger::{names, Transfer, TransferKind};
use baygrid_query::{sql_name, Refusal, Shape, Table};
use baygrid_store::{Ending, QueryRow, RecordFilter, Spend, Spent, DELTA_UNIT, EPSILON_UNIT};
use serde::{Deserialize, Serialize};

use crate::agent::agent_cluster;
use crate::body::{JsonBody, QueryParams, RawBody};
use crate::catalog::CatalogSnapshot;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{acting_tenant, TenantQuery};
use crate::paging::{self, ListParams};
use crate::relay::{Conversation, Relay};
use crate::zone::{dataset_flow, today, FlowEnds};
use crate::AppState;

/// A side claimed by an agent that has not answered within this long is handed out again
/// (its answer never left the vault, so running it again releases nothing twice).
const RECLAIM_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SideState {
    Pending,
    Claimed,
    Answered,
}

/// One dataset's side of a query, as the server keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SideRecord {
    table: String,
    dataset: String,
    site: String,
    holder: String,
    contract: String,
    state: SideState,
    #[serde(default)]
    claimed_by: Option<String>,
    #[serde(default)]
    claimed_ms: Option<i64>,
    #[serde(default)]
    answer: Option<SideAnswer>,
    /// What the side costs the consumer, in the offer's currency.
    price: Money,
}

/// A query's stored body: the view the consumer sees, and what only the server keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QueryRecord {
    view: QueryView,
    shape: Shape,
    sides: Vec<SideRecord>,
    epsilon: f64,
    delta: f64,
    #[serde(default)]
    mechanism: baygrid_api::Mechanism,
    /// The hold on the consumer's wallet, in CNY (0: nothing held).
    held_cny: i64,
}

impl QueryRecord {
    fn from_row(row: &QueryRow) -> ApiResult<QueryRecord> {
        serde_json::from_value(row.body.clone())
            .map_err(|e| ApiError::Unavailable(format!("query `{}`: {e}", row.id)))
    }

    fn body(&self) -> ApiResult<serde_json::Value> {
        serde_json::to_value(self).map_err(|e| ApiError::Unavailable(e.to_string()))
    }
}

fn refused(r: Refusal) -> ApiError {
    ApiError::Unprocessable {
        code: "query_refused",
        field: Some("sql".into()),
        message: r.to_string(),
    }
}

fn sees(who: &Principal, row: &QueryRow) -> bool {
    match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant => who.subject.as_deref() == Some(row.tenant.as_str()),
        _ => false,
    }
}

/// The `query_result` flow of an answer from `dataset` to the consumer (`recipient`) at
/// its contract's site, as the rules see it; and the dataset's holder, who exports it.
fn result_flow<'c>(
    catalog: &'c CatalogSnapshot,
    dataset: &DatasetSpec,
    contract: &baygrid_api::ContractView,
    recipient: &'c baygrid_core::Party,
    purpose: &str,
    today: chrono::NaiveDate,
) -> ApiResult<(baygrid_rules::FlowRequest, &'c baygrid_core::Party)> {
    let holder = catalog.holder(dataset)?;
    let site = catalog
        .sites
        .get(&contract.request.site)
        .ok_or_else(|| ApiError::Conflict(format!("site `{}` is gone", contract.request.site)))?;
    let request = dataset_flow(
        catalog,
        dataset,
        FlowEnds {
            holder,
            recipient,
            site,
        },
        baygrid_rules::Mode::QueryResult,
        purpose,
        today,
    );
    Ok((request, holder))
}

/// A side's dataset and contract as the catalog has them now.
fn side_parts<'c>(
    catalog: &'c CatalogSnapshot,
    side: &SideRecord,
) -> ApiResult<(&'c DatasetSpec, &'c baygrid_api::ContractView)> {
    let dataset = catalog
        .datasets
        .get(&side.dataset)
        .ok_or_else(|| ApiError::Conflict(format!("dataset `{}` is gone", side.dataset)))?;
    let contract = catalog
        .contracts
        .get(&side.contract)
        .ok_or_else(|| ApiError::Conflict(format!("contract `{}` is gone", side.contract)))?;
    Ok((dataset, contract))
}

/// A dataset of the query, with its contract, its offer and the table it is read as.
struct Read<'a> {
    dataset: &'a DatasetSpec,
    contract: baygrid_api::ContractView,
    offer: &'a DataOfferSpec,
    table: Table,
}

fn period_start(now: i64, period_ms: i64) -> i64 {
    now - now.rem_euclid(period_ms.max(1))
}

fn units(epsilon: f64, delta: f64) -> (i64, i64) {
    (
        (epsilon * EPSILON_UNIT).round() as i64,
        (delta * DELTA_UNIT).round() as i64,
    )
}

fn price_of(read: &Read<'_>, catalog: &CatalogSnapshot) -> ApiResult<Money> {
    if let Some(per_use) = read.offer.price.per_use {
        return Ok(per_use);
    }
    let per_gb = read.offer.price.per_gb.ok_or_else(|| {
        ApiError::Unavailable(format!("offer `{}` has no price", read.offer.name))
    })?;
    let bytes: u64 = catalog
        .versions
        .get(&read.dataset.name)
        .and_then(|v| v.last())
        .map(|v| v.bytes)
        .unwrap_or(0);
    per_gb
        .mul_ratio(bytes as i128, 1_000_000_000)
        .map_err(|e| ApiError::Unavailable(format!("price of `{}`: {e}", read.dataset.name)))
}

async fn budget_view(
    state: &AppState,
    read: &Read<'_>,
    tenant: &str,
    now: i64,
) -> ApiResult<BudgetView> {
    let start = period_start(now, read.table.terms.period_ms());
    let spent = state
        .store
        .privacy_spent(&read.dataset.name, tenant, start)
        .await?;
    Ok(budget_left(
        &read.dataset.name,
        &read.table.terms,
        start,
        spent,
    ))
}

/// What is left of a dataset's budgets under `terms` in the period starting at `start`,
/// `spent` spent.
fn budget_left(dataset: &str, terms: &QueryTerms, start: i64, spent: Spent) -> BudgetView {
    let (shared_epsilon, shared_delta) = terms.shared();
    let left = |limit: f64, used: i64, unit: f64| (limit - used as f64 / unit).max(0.0);
    BudgetView {
        dataset: dataset.to_string(),
        epsilon: terms.epsilon,
        epsilon_left: left(terms.epsilon, spent.consumer.0, EPSILON_UNIT),
        delta: terms.delta,
        delta_left: left(terms.delta, spent.consumer.1, DELTA_UNIT),
        shared_epsilon,
        shared_epsilon_left: left(shared_epsilon, spent.shared.0, EPSILON_UNIT),
        shared_delta,
        shared_delta_left: left(shared_delta, spent.shared.1, DELTA_UNIT),
        resets_at: millis_to_rfc3339(start + terms.period_ms()),
    }
}

/// Asks a question of one dataset, or of two joined on their subjects. A dry run answers
/// with the cost and the budgets left; otherwise the budgets are spent and the vaults'
/// agents answer, and the request waits for the result up to `wait_ms`.
#[utoipa::path(post, path = "/api/v1/queries", params(TenantQuery), request_body = QueryRequest, responses((status = 201, body = QueryView), (status = 200, description = "a dry run", body = QueryDryRun), (status = 202, description = "still running", body = QueryView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 409, description = "a budget would be exceeded", body = baygrid_api::ErrorBody), (status = 422, description = "refused, with the reason", body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(params): QueryParams<TenantQuery>,
    JsonBody(ask): JsonBody<QueryRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let tenant = acting_tenant(&who, params.tenant.as_deref())?;
    let catalog = state.catalog();
    if !catalog.datasets.contains_key(&ask.dataset) {
        return Err(ApiError::bad(
            "dataset",
            format!("unknown dataset `{}`", ask.dataset),
        ));
    }
    let named = baygrid_query::tables_named(&ask.sql).map_err(refused)?;
    if !named.contains(&sql_name(&ask.dataset)) {
        return Err(ApiError::bad(
            "dataset",
            format!(
                "the SQL does not read `{}` (in SQL it is the table `{}`)",
                ask.dataset,
                sql_name(&ask.dataset)
            ),
        ));
    }
    let epsilon = ask.epsilon.unwrap_or(1.0);
    if !(epsilon.is_finite() && epsilon > 0.0 && epsilon <= 100.0) {
        return Err(ApiError::bad("epsilon", "must be above 0 and at most 100"));
    }
    let today = today(&state)?;
    let active = |dataset: &str, purpose: Option<&str>| {
        catalog
            .contracts
            .values()
            .filter(|c| {
                c.tenant == tenant
                    && c.dataset == dataset
                    && c.state == ContractState::Active
                    && c.request.mode == OfferMode::Query
                    && c.expires > today
                    && purpose.is_none_or(|p| c.request.purpose == p)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let purpose = match &ask.purpose {
        Some(p) => p.clone(),
        None => {
            let mut purposes: Vec<String> = active(&ask.dataset, None)
                .into_iter()
                .map(|c| c.request.purpose)
                .collect();
            purposes.sort();
            purposes.dedup();
            match purposes.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(ApiError::Forbidden(format!(
                        "tenant `{tenant}` has no active query contract on `{}`",
                        ask.dataset
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
    let mut reads = Vec::new();
    for table in &named {
        let dataset = catalog
            .datasets
            .values()
            .find(|d| sql_name(&d.name) == *table)
            .ok_or_else(|| {
                refused(Refusal {
                    reason: "no dataset is named so".into(),
                    expression: Some(table.clone()),
                })
            })?;
        let contract = active(&dataset.name, Some(&purpose))
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::Forbidden(format!(
                    "tenant `{tenant}` has no active query contract on `{}` for {purpose}",
                    dataset.name
                ))
            })?;
        let offer = catalog
            .data_offers
            .get(&contract.request.offer)
            .ok_or_else(|| {
                ApiError::Conflict(format!("offer `{}` is withdrawn", contract.request.offer))
            })?;
        let terms = offer.query.clone().ok_or_else(|| {
            ApiError::Conflict(format!("offer `{}` has no query terms", offer.name))
        })?;
        let table = Table::new(dataset, terms).map_err(refused)?;
        if catalog
            .versions
            .get(&dataset.name)
            .is_none_or(|v| v.is_empty())
        {
            return Err(ApiError::Conflict(format!(
                "`{}` has no uploaded version yet",
                dataset.name
            )));
        }
        reads.push(Read {
            dataset,
            contract,
            offer,
            table,
        });
    }
    let tables: Vec<Table> = reads.iter().map(|r| r.table.clone()).collect();
    let shape = baygrid_query::plan(&ask.sql, &tables)
        .await
        .map_err(refused)?;
    let delta = match ask.delta {
        Some(d) if !(d.is_finite() && d > 0.0 && d < 1.0) => {
            return Err(ApiError::bad("delta", "must be above 0 and below 1"))
        }
        Some(d) => d,
        None => reads
            .iter()
            .map(|r| r.table.terms.delta / 100.0)
            .fold(f64::INFINITY, f64::min),
    };
    if shape.grouped() && delta <= 0.0 {
        return Err(refused(Refusal::new(
            "grouping needs a δ above 0 (the chance a group of one individual shows); the offer gives none",
        )));
    }
    if ask.mechanism == baygrid_api::Mechanism::Gaussian && delta <= 0.0 {
        return Err(ApiError::bad(
            "delta",
            "the Gaussian mechanism needs a δ above 0; the offer gives none",
        ));
    }
    let costs = baygrid_query::cost(&shape, epsilon, delta, ask.mechanism);
    // the rules decide the result's flow before anything is spent; the release decides
    // again, on record, once the answer exists
    let recipient = catalog
        .tenant_party(&tenant)
        .ok_or_else(|| ApiError::bad("tenant", format!("unknown tenant `{tenant}`")))?;
    for read in &reads {
        let (request, _) = result_flow(
            &catalog,
            read.dataset,
            &read.contract,
            recipient,
            &purpose,
            today,
        )?;
        let decision = state
            .rules
            .decide(&request)
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if !decision.allowed {
            return Err(ApiError::Forbidden(format!(
                "the rules would not let a result of `{}` reach {}: {}",
                read.dataset.name,
                read.contract.request.site,
                decision.why_denied()
            )));
        }
    }
    let now = state.now();
    let mut cost_views = Vec::new();
    let mut fits = true;
    let mut prices = Vec::new();
    for (read, cost) in reads.iter().zip(&costs) {
        let budget = budget_view(&state, read, &tenant, now).await?;
        fits &= budget.epsilon_left >= cost.epsilon - 1e-9
            && budget.shared_epsilon_left >= cost.epsilon - 1e-9
            && budget.delta_left >= cost.delta
            && budget.shared_delta_left >= cost.delta;
        prices.push(price_of(read, &catalog)?);
        cost_views.push(QueryCostView {
            dataset: read.dataset.name.clone(),
            site: read.dataset.vault.clone(),
            contract: read.contract.id.clone(),
            epsilon: cost.epsilon,
            delta: cost.delta,
            shares: cost.shares,
            epsilon_each: cost.epsilon / cost.shares as f64,
            budget,
        });
    }
    let columns: Vec<String> = shape.outputs.iter().map(|o| o.name.clone()).collect();
    if ask.dry_run {
        let dry = QueryDryRun {
            columns,
            cost: cost_views,
            fits,
            price: prices,
        };
        return Ok((StatusCode::OK, Json(json(&dry)?)));
    }
    let id = baygrid_core::new_id("q").replace('_', "-");
    let mut held_cny = 0i64;
    for price in &prices {
        held_cny += catalog
            .rates
            .to_cny(*price)
            .map_err(|e| ApiError::Conflict(format!("cannot price the query: {e}")))?
            .minor;
    }
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
        reference: format!("query:{id}"),
    });
    let sides = reads
        .iter()
        .zip(&prices)
        .map(|(read, price)| SideRecord {
            table: read.table.name.clone(),
            dataset: read.dataset.name.clone(),
            site: read.dataset.vault.clone(),
            holder: read.dataset.holder.clone(),
            contract: read.contract.id.clone(),
            state: SideState::Pending,
            claimed_by: None,
            claimed_ms: None,
            answer: None,
            price: *price,
        })
        .collect();
    let spends = reads
        .iter()
        .zip(&costs)
        .map(|(read, cost)| {
            let terms = &read.table.terms;
            let (shared_epsilon, shared_delta) = terms.shared();
            Spend {
                dataset: read.dataset.name.clone(),
                tenant: tenant.clone(),
                period_start: period_start(now, terms.period_ms()),
                amount: units(cost.epsilon, cost.delta),
                consumer_limit: units(terms.epsilon, terms.delta),
                shared_limit: units(shared_epsilon, shared_delta),
            }
        })
        .collect();
    let view = QueryView {
        id: id.clone(),
        tenant: tenant.clone(),
        sql: ask.sql.clone(),
        purpose: purpose.clone(),
        state: QueryState::Running,
        cost: cost_views,
        result: None,
        result_sha256: None,
        rules: vec![],
        charged: vec![],
        error: None,
        created_at: millis_to_rfc3339(now),
        finished_at: None,
    };
    let record = QueryRecord {
        view,
        shape,
        sides,
        epsilon,
        delta,
        mechanism: ask.mechanism,
        held_cny,
    };
    let payload = serde_json::json!({
        "query": id,
        "tenant": tenant,
        "purpose": purpose,
        "sql_sha256": sha256(ask.sql.as_bytes()),
        "datasets": record.sides.iter().map(|s| &s.dataset).collect::<Vec<_>>(),
        "contracts": record.sides.iter().map(|s| &s.contract).collect::<Vec<_>>(),
        "epsilon": epsilon,
        "delta": costs.first().map(|c| c.delta).unwrap_or(0.0),
        "mechanism": ask.mechanism.as_str(),
    });
    // The record shows each budget as it stands once this query's spend is in.
    let budgets: Vec<(String, QueryTerms, i64)> = reads
        .iter()
        .map(|read| {
            let terms = read.table.terms.clone();
            let start = period_start(now, terms.period_ms());
            (read.dataset.name.clone(), terms, start)
        })
        .collect();
    let body = move |after: &[Spent]| {
        let mut record = record;
        for (cost, ((dataset, terms, start), spent)) in
            record.view.cost.iter_mut().zip(budgets.iter().zip(after))
        {
            cost.budget = budget_left(dataset, terms, *start, *spent);
        }
        serde_json::to_value(&record)
    };
    state
        .store
        .accept_query(
            QueryRow {
                id: id.clone(),
                tenant: tenant.clone(),
                state: QueryState::Running.as_str().into(),
                created_ms: now,
                finished_ms: None,
                body: serde_json::Value::Null,
            },
            spends,
            hold,
            crate::auth::actor(&who),
            payload,
            body,
        )
        .await?;
    state.queries.work.notify_waiters();
    let wait = Duration::from_millis(ask.wait_ms.unwrap_or(30_000).min(120_000));
    let view = wait_for(&state, &id, wait).await?;
    let status = if view.state == QueryState::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json(&view)?)))
}

/// The datasets a stored query read, for its invoice line.
pub(crate) fn datasets_of(row: &QueryRow) -> ApiResult<Vec<String>> {
    Ok(QueryRecord::from_row(row)?
        .sides
        .into_iter()
        .map(|s| s.dataset)
        .collect())
}

pub(crate) fn json<T: Serialize>(value: &T) -> ApiResult<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| ApiError::Unavailable(e.to_string()))
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A long poll: `check` answers (what to return, whether it is final); it runs again each
/// time `signal` fires, until it is final, `wait` has passed or the server is stopping, and
/// its last answer is returned. A signal between a check and the wait is not missed.
pub(crate) async fn long_poll<T, F, C>(
    state: &AppState,
    signal: &tokio::sync::Notify,
    wait: Duration,
    mut check: C,
) -> ApiResult<T>
where
    C: FnMut() -> F,
    F: std::future::Future<Output = ApiResult<(T, bool)>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let woken = signal.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (answer, done) = check().await?;
        if done || tokio::time::Instant::now() >= deadline || state.queries.closing() {
            return Ok(answer);
        }
        let _ = tokio::time::timeout_at(deadline, woken).await;
    }
}

async fn wait_for(state: &AppState, id: &str, wait: Duration) -> ApiResult<QueryView> {
    long_poll(state, &state.queries.done, wait, || async move {
        let row = state
            .store
            .query_row(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no query `{id}`")))?;
        let view = QueryRecord::from_row(&row)?.view;
        let done = view.state != QueryState::Running;
        Ok((view, done))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// Wait up to this many milliseconds for a running query to end.
    pub wait_ms: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/queries/{id}", params(("id" = String, Path), GetParams), responses((status = 200, body = QueryView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<GetParams>,
) -> ApiResult<Json<QueryView>> {
    let row = state
        .store
        .query_row(&id)
        .await?
        .filter(|r| sees(&who, r))
        .ok_or_else(|| ApiError::NotFound(format!("no query `{id}`")))?;
    let wait = Duration::from_millis(params.wait_ms.unwrap_or(0).min(120_000));
    if wait.is_zero() {
        return Ok(Json(QueryRecord::from_row(&row)?.view));
    }
    Ok(Json(wait_for(&state, &id, wait).await?))
}

/// The caller's queries, newest first (operators and regulators: everyone's).
#[utoipa::path(get, path = "/api/v1/queries", params(ListParams), responses((status = 200, body = [QueryView]), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(params): QueryParams<ListParams>,
) -> ApiResult<Json<Vec<QueryView>>> {
    let states = [
        QueryState::Running,
        QueryState::Released,
        QueryState::Withheld,
        QueryState::Failed,
    ]
    .map(QueryState::as_str);
    let wanted = params.state_in(&states)?;
    let limit = params.limit()?;
    let tenant = match who.role {
        Role::Operator | Role::Regulator => params.tenant.clone(),
        Role::Tenant => who.subject.clone(),
        _ => return Ok(Json(vec![])),
    };
    if who.role == Role::Tenant && tenant.is_none() {
        return Ok(Json(vec![]));
    }
    let before = match &params.before {
        Some(id) => {
            let row = state.store.query_row(id).await?;
            Some(paging::below_record("query", id, row, |r| sees(&who, r))?)
        }
        None => None,
    };
    let rows = state
        .store
        .query_rows(&RecordFilter {
            tenant: tenant.as_deref(),
            state: wanted,
            before: before.as_ref(),
            limit,
        })
        .await?;
    rows.iter()
        .map(|r| QueryRecord::from_row(r).map(|q| q.view))
        .collect::<ApiResult<Vec<_>>>()
        .map(Json)
}

#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    /// How long to wait for work before answering with none (milliseconds, at most 30,000).
    #[serde(default)]
    pub wait_ms: u64,
}

/// Hands the agent the query sides at its site's vault: pending ones, and ones another claim
/// left unanswered too long. Waits up to `wait_ms` for one.
#[utoipa::path(post, path = "/api/v1/agent/queries/claim", request_body = ClaimBody, responses((status = 200, body = [QueryTask]), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn claim(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody<ClaimBody>,
) -> ApiResult<Json<Vec<QueryTask>>> {
    claim_work(&state, &who, &body, &state.queries.work, claim_now).await
}

/// An agent's long poll for work at its site: `claim_now` hands out what is there for the
/// agent's cluster, again each time `signal` fires, until there is some or `wait_ms` passed.
async fn claim_work<'s, T, F, Fut>(
    state: &'s AppState,
    who: &Principal,
    body: &ClaimBody,
    signal: &tokio::sync::Notify,
    claim_now: F,
) -> ApiResult<Json<Vec<T>>>
where
    F: Fn(&'s AppState, String) -> Fut,
    Fut: std::future::Future<Output = ApiResult<Vec<T>>>,
{
    let cluster = agent_cluster(who)?;
    let wait = Duration::from_millis(body.wait_ms.min(30_000));
    let work = long_poll(state, signal, wait, || {
        let claimed = claim_now(state, cluster.clone());
        async move {
            let work = claimed.await?;
            let any = !work.is_empty();
            Ok((work, any))
        }
    })
    .await?;
    Ok(Json(work))
}

async fn claim_now(state: &AppState, cluster: String) -> ApiResult<Vec<QueryTask>> {
    let catalog = state.catalog();
    let Some(site) = catalog.clusters.get(&cluster).map(|c| c.site.clone()) else {
        return Ok(vec![]);
    };
    let _serial = state.queries.writes.lock().await;
    let now = state.now();
    let running = state
        .store
        .every_query_row(QueryState::Running.as_str())
        .await?;
    let mut tasks = Vec::new();
    for row in running {
        let mut record = QueryRecord::from_row(&row)?;
        let mut changed = false;
        for i in 0..record.sides.len() {
            let side = &record.sides[i];
            let ready = side.site == site
                && (side.state == SideState::Pending
                    || side.state == SideState::Claimed
                        && side.claimed_ms.is_some_and(|t| now - t > RECLAIM_MS));
            if !ready {
                continue;
            }
            let task = task_for(state, &catalog, &record, i)?;
            let side = &mut record.sides[i];
            side.state = SideState::Claimed;
            side.claimed_by = Some(cluster.to_string());
            side.claimed_ms = Some(now);
            changed = true;
            tasks.push(task);
        }
        if changed {
            state
                .store
                .update_query(row.id.clone(), record.body()?)
                .await?;
        }
    }
    Ok(tasks)
}

fn task_for(
    state: &AppState,
    catalog: &CatalogSnapshot,
    record: &QueryRecord,
    index: usize,
) -> ApiResult<QueryTask> {
    let mut tables = Vec::new();
    for side in &record.sides {
        let (dataset, contract) = side_parts(catalog, side)?;
        let terms = catalog
            .data_offers
            .get(&contract.request.offer)
            .and_then(|o| o.query.clone())
            .ok_or_else(|| {
                ApiError::Conflict(format!("offer `{}` is withdrawn", contract.request.offer))
            })?;
        let version = catalog
            .versions
            .get(&side.dataset)
            .and_then(|v| v.last())
            .ok_or_else(|| ApiError::Conflict(format!("`{}` has no version", side.dataset)))?;
        tables.push(QueryTable {
            dataset: dataset.clone(),
            terms,
            upload: version.upload.clone(),
            files: version.files.clone(),
            vault_url: state.config.vault_url(&dataset.vault),
        });
    }
    let psi_role = (record.sides.len() == 2).then(|| {
        if index == 0 {
            "guest".to_string()
        } else {
            "host".to_string()
        }
    });
    Ok(QueryTask {
        query: record.view.id.clone(),
        dataset: record.sides[index].dataset.clone(),
        sql: record.view.sql.clone(),
        tables,
        epsilon: record.epsilon,
        delta: record.delta,
        mechanism: record.mechanism,
        psi_role,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SideParams {
    /// The dataset the agent answers for.
    pub dataset: String,
}

fn claimed_side<'a>(
    record: &'a mut QueryRecord,
    dataset: &str,
    cluster: &str,
) -> ApiResult<&'a mut SideRecord> {
    let id = record.view.id.clone();
    record
        .sides
        .iter_mut()
        .find(|s| s.dataset == dataset)
        .filter(|s| s.state == SideState::Claimed && s.claimed_by.as_deref() == Some(cluster))
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "query `{id}`'s side on `{dataset}` is not claimed by `{cluster}`"
            ))
        })
}

/// The agent's answer for its side: noisy, thresholded groups, or why it could not answer.
/// When every side has answered, the result is put together and released (or withheld).
#[utoipa::path(post, path = "/api/v1/agent/queries/{id}/answer", params(("id" = String, Path), SideParams), request_body = QueryAnswerBody, responses((status = 200, body = QueryView), (status = 403, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn answer(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<SideParams>,
    JsonBody(body): JsonBody<QueryAnswerBody>,
) -> ApiResult<Json<QueryView>> {
    let cluster = agent_cluster(&who)?;
    let _serial = state.queries.writes.lock().await;
    let row = state
        .store
        .query_row(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no query `{id}`")))?;
    let mut record = QueryRecord::from_row(&row)?;
    if record.view.state != QueryState::Running {
        return Err(ApiError::Conflict(format!("query `{id}` is over")));
    }
    let side = claimed_side(&mut record, &params.dataset, &cluster)?;
    let actor = crate::auth::actor(&who);
    let now = state.now();
    let view = match (body.answer, body.error) {
        (Some(answer), None) => {
            if answer.table != side.table {
                return Err(ApiError::bad(
                    "answer.table",
                    format!("this side answers for `{}`", side.table),
                ));
            }
            side.state = SideState::Answered;
            side.answer = Some(answer);
            if record.sides.iter().all(|s| s.state == SideState::Answered) {
                release(&state, record, actor, now).await?
            } else {
                state.store.update_query(id.clone(), record.body()?).await?;
                record.view
            }
        }
        (None, Some(error)) => {
            let error = format!("{}: {error}", side.dataset);
            fail(&state, record, error, actor, now).await?
        }
        _ => {
            return Err(ApiError::bad(
                "answer",
                "give exactly one of `answer` and `error`",
            ))
        }
    };
    state.queries.done.notify_waiters();
    Ok(Json(view))
}

fn void_hold(record: &QueryRecord) -> Vec<Transfer> {
    crate::ledger::void_hold(
        &record.view.id,
        &record.view.tenant,
        record.held_cny,
        format!("query:{}", record.view.id),
    )
}

/// Ends a running query without a result (failed, or withheld by the rules): the hold on
/// the consumer's wallet is voided, nothing is charged, and the audit entry says why.
async fn end_unreleased(
    state: &AppState,
    mut record: QueryRecord,
    outcome: QueryState,
    error: String,
    audit: serde_json::Value,
    actor: String,
    now: i64,
) -> ApiResult<QueryView> {
    record.view.state = outcome;
    record.view.error = Some(error);
    record.view.finished_at = Some(millis_to_rfc3339(now));
    let transfers = void_hold(&record);
    let kind = match outcome {
        QueryState::Withheld => "query.withheld",
        _ => "query.failed",
    };
    let mut payload = serde_json::json!({ "query": record.view.id, "tenant": record.view.tenant });
    if let (Some(all), Some(more)) = (payload.as_object_mut(), audit.as_object()) {
        all.extend(more.clone());
    }
    state
        .store
        .finish_query(
            record.view.id.clone(),
            Ending {
                state: outcome.as_str().into(),
                body: record.body()?,
                transfers,
                actor,
                now,
                kind,
                payload,
            },
        )
        .await?;
    state
        .queries
        .relay
        .ended(Conversation::Query(&record.view.id));
    Ok(record.view)
}

async fn fail(
    state: &AppState,
    record: QueryRecord,
    error: String,
    actor: String,
    now: i64,
) -> ApiResult<QueryView> {
    let audit = serde_json::json!({ "error": error });
    end_unreleased(state, record, QueryState::Failed, error, audit, actor, now).await
}

/// Fails the running queries older than `vault_answer_timeout`, naming the vaults that
/// did not answer; their holds are voided (the budget stays spent).
pub(crate) async fn expire(state: &AppState) -> ApiResult<()> {
    let limit = state.config.vault_answer_timeout;
    let now = state.now();
    let running = state
        .store
        .every_query_row(QueryState::Running.as_str())
        .await?;
    for row in running {
        if now - row.created_ms <= limit.as_millis() as i64 {
            continue;
        }
        let _serial = state.queries.writes.lock().await;
        // an answer may have ended it meanwhile
        let Some(row) = state.store.query_row(&row.id).await? else {
            continue;
        };
        if row.state != QueryState::Running.as_str() {
            continue;
        }
        let record = QueryRecord::from_row(&row)?;
        let waiting: Vec<String> = record
            .sides
            .iter()
            .filter(|s| s.answer.is_none())
            .map(|s| format!("`{}` at {}", s.dataset, s.site))
            .collect();
        let error = format!(
            "no answer from {} within {}",
            waiting.join(" and "),
            humantime::format_duration(limit)
        );
        fail(state, record, error, "server".into(), now).await?;
        state.queries.done.notify_waiters();
    }
    Ok(())
}

/// Puts the sides' answers together, has the rules decide each dataset's `query_result`
/// flow on record, and releases the result with its hash and the charge in one
/// transaction, or withholds it (nothing charged) when a decision denies it.
async fn release(
    state: &AppState,
    mut record: QueryRecord,
    actor: String,
    now: i64,
) -> ApiResult<QueryView> {
    let answers: Vec<SideAnswer> = record
        .sides
        .iter()
        .filter_map(|s| s.answer.clone())
        .collect();
    let result: QueryResult = match baygrid_query::assemble(&record.shape, &answers) {
        Ok(r) => r,
        Err(e) => return fail(state, record, e.to_string(), actor, now).await,
    };
    let digest = result.digest();
    let catalog = state.catalog();
    let today = today(state)?;
    let recipient = catalog
        .tenant_party(&record.view.tenant)
        .ok_or_else(|| ApiError::Conflict(format!("tenant `{}` is gone", record.view.tenant)))?
        .clone();
    let mut rules = Vec::new();
    let mut denied = Vec::new();
    for side in &record.sides {
        let (dataset, contract) = side_parts(&catalog, side)?;
        let (request, holder) = result_flow(
            &catalog,
            dataset,
            contract,
            &recipient,
            &record.view.purpose,
            today,
        )?;
        let answer = crate::zone::decide_recorded(
            state,
            request,
            holder.name.clone(),
            serde_json::json!({ "query": record.view.id, "contract": side.contract, "result_sha256": digest }),
            actor.clone(),
        )
        .await?;
        let decision: baygrid_rules::Decision = serde_json::from_value(answer["decision"].clone())
            .map_err(|e| ApiError::Unavailable(format!("decision record: {e}")))?;
        rules.extend(decision.rules.iter().map(|r| r.to_string()));
        if !decision.allowed {
            denied.push(format!("{}: {}", side.dataset, decision.why_denied()));
        }
    }
    rules.sort();
    rules.dedup();
    record.view.rules = rules;
    record.view.finished_at = Some(millis_to_rfc3339(now));
    if !denied.is_empty() {
        let audit = serde_json::json!({ "result_sha256": digest, "reasons": denied });
        let error = denied.join(" | ");
        return end_unreleased(
            state,
            record,
            QueryState::Withheld,
            error,
            audit,
            actor,
            now,
        )
        .await;
    }
    let mut transfers = Vec::new();
    if record.held_cny > 0 {
        let id = record.view.id.clone();
        let reference = format!("query:{id}");
        transfers.push(Transfer {
            id: format!("post:{id}"),
            debit_account: names::wallet(&record.view.tenant).id,
            credit_account: names::clearing(Currency::CNY).id,
            amount: record.held_cny,
            currency: Currency::CNY,
            kind: TransferKind::Post {
                pending_id: names::hold(&id),
            },
            linked: true,
            reference: reference.clone(),
        });
        let mut accounts = Vec::new();
        for side in &record.sides {
            let cny = catalog
                .rates
                .to_cny(side.price)
                .map_err(|e| ApiError::Conflict(format!("cannot price the query: {e}")))?
                .minor;
            let payee = names::holder(&side.holder, side.price.currency);
            if state.store.ledger_account(&payee.id).is_none() {
                accounts.push(payee.clone());
            }
            crate::ledger::pay_out(
                state,
                &mut transfers,
                &format!("{id}:{}", side.dataset),
                cny,
                &payee,
                &reference,
            )?;
        }
        transfers.last_mut().expect("a post at least").linked = false;
        if !accounts.is_empty() {
            state.store.open_accounts(accounts, now).await?;
        }
        record.view.charged = record.sides.iter().map(|s| s.price).collect();
    }
    record.view.state = QueryState::Released;
    record.view.result_sha256 = Some(digest.clone());
    record.view.result = Some(result);
    state
        .store
        .finish_query(
            record.view.id.clone(),
            Ending {
                state: QueryState::Released.as_str().into(),
                body: record.body()?,
                transfers,
                actor,
                now,
                kind: "query.released",
                payload: serde_json::json!({
                "query": record.view.id,
                "tenant": record.view.tenant,
                "datasets": record.sides.iter().map(|s| &s.dataset).collect::<Vec<_>>(),
                "contracts": record.sides.iter().map(|s| &s.contract).collect::<Vec<_>>(),
                "result_sha256": digest,
                "rules": record.view.rules,
                "charged": record.view.charged,
                }),
            },
        )
        .await?;
    state
        .queries
        .relay
        .ended(Conversation::Query(&record.view.id));
    Ok(record.view)
}

/// What the server holds in memory for work at the vaults (queries and fusion runs): the
/// signals that wake waiting agents and consumers (the relay's mailboxes are in the store).
#[derive(Default)]
pub struct Queries {
    pub(crate) work: tokio::sync::Notify,
    pub(crate) done: tokio::sync::Notify,
    pub(crate) writes: tokio::sync::Mutex<()>,
    /// Between a query's two sides (mailboxes by the dataset addressed) and between a
    /// fusion run's workers (by the worker addressed; each message starts with its
    /// sender's number).
    pub(crate) relay: Relay,
    /// Fusion runs' records' writes, in turn.
    pub(crate) fusion_writes: tokio::sync::Mutex<()>,
    /// Set when the server stops: long polls answer at once, so shutdown does not wait.
    closing: std::sync::atomic::AtomicBool,
}

impl Queries {
    /// Ends every long poll now and from now on.
    pub(crate) fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.work.notify_waiters();
        self.done.notify_waiters();
        self.relay.signal.notify_waiters();
    }

    fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RelayParams {
    /// The dataset whose side sends (on post) or receives (on get).
    pub dataset: String,
    /// On post: the sender's number for the message, counting its messages to the other
    /// side from 0 (a message resent after a lost answer keeps its number, and is not
    /// delivered twice).
    pub n: Option<u64>,
    /// On get: the first message wanted (messages are numbered from 0).
    #[serde(default)]
    pub from: usize,
    /// On get: how long to wait for a message (milliseconds, at most 30,000).
    #[serde(default)]
    pub wait_ms: u64,
}

/// The side of a running two-vault query, claimed by this agent, and its peer's dataset.
async fn relay_ends(state: &AppState, id: &str, dataset: &str, cluster: &str) -> ApiResult<String> {
    let row = state
        .store
        .query_row(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no query `{id}`")))?;
    let mut record = QueryRecord::from_row(&row)?;
    if record.view.state != QueryState::Running || record.sides.len() != 2 {
        return Err(ApiError::Conflict(format!(
            "query `{id}` is not a running query across two vaults"
        )));
    }
    claimed_side(&mut record, dataset, cluster)?;
    Ok(record
        .sides
        .iter()
        .find(|s| s.dataset != dataset)
        .map(|s| s.dataset.clone())
        .expect("two sides"))
}

/// A message from one side's agent to the other's (the PSI's blinded points). The server
/// keeps it in its store until it is acknowledged or the query ends; it cannot read the ids behind the points.
#[utoipa::path(post, path = "/api/v1/agent/queries/{id}/relay", params(("id" = String, Path), RelayParams), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 204), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn relay_send(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<RelayParams>,
    RawBody(bytes): RawBody,
) -> ApiResult<StatusCode> {
    let cluster = agent_cluster(&who)?;
    let peer = relay_ends(&state, &id, &params.dataset, &cluster).await?;
    state
        .queries
        .relay
        .post(
            &state,
            Conversation::Query(&id),
            &peer,
            &params.dataset,
            params.n,
            bytes.to_vec(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The messages addressed to a side from `from` on (those before are acknowledged and
/// dropped), waiting up to `wait_ms` for one; the body is the messages concatenated, each
/// as a 4-byte little-endian length and its bytes.
#[utoipa::path(get, path = "/api/v1/agent/queries/{id}/relay", params(("id" = String, Path), RelayParams), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn relay_receive(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<RelayParams>,
) -> ApiResult<Vec<u8>> {
    let cluster = agent_cluster(&who)?;
    relay_ends(&state, &id, &params.dataset, &cluster).await?;
    let wait = Duration::from_millis(params.wait_ms.min(30_000));
    state
        .queries
        .relay
        .receive(
            &state,
            Conversation::Query(&id),
            &params.dataset,
            params.from,
            wait,
        )
        .await
}
