//! Jobs at the API: submit, quote, list, get, logs, cancel.

use axum::extract::{Path, State};

use crate::body::{QueryParams, RawBody};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use baygrid_api::{CancelView, JobEventView, JobView, LogLineView, LogsView, QuoteBody, QuoteView};
use baygrid_core::{millis_to_rfc3339, Currency, JobSpec, JobState, Money, Principal, Role};
use baygrid_sched::Quote;
use baygrid_store::{JobFilter, JobRecord, NewJob};
use serde::Deserialize;

use crate::auth::{actor, require};
use crate::error::{ApiError, ApiResult};
use crate::paging::{self, ListParams};
use crate::AppState;

/// Which tenant a request acts for: a tenant's own, or the one an operator names.
pub(crate) fn acting_tenant(who: &Principal, named: Option<&str>) -> ApiResult<String> {
    match who.role {
        Role::Tenant => {
            let own = who.subject.clone().unwrap_or_default();
            match named {
                Some(other) if other != own => Err(ApiError::Forbidden(format!(
                    "tenant `{own}` may not act for `{other}`"
                ))),
                _ => Ok(own),
            }
        }
        Role::Operator => named.map(str::to_string).ok_or_else(|| {
            ApiError::bad("tenant", "an operator must name the tenant: ?tenant=NAME")
        }),
        _ => Err(ApiError::Forbidden(format!(
            "role {} may not submit jobs",
            who.role
        ))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// For operators: the tenant to act for.
    pub tenant: Option<String>,
}

/// The priority of a class named in the server's config.
pub(crate) fn priority_of(state: &AppState, class: &str) -> ApiResult<i32> {
    let classes = &state.config.priority_classes;
    classes.get(class).copied().ok_or_else(|| {
        ApiError::bad(
            "priority_class",
            format!(
                "unknown class `{class}`; this exchange has {}",
                classes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// The spec in a request body, its priority class (from the server's config) resolved.
fn parse_spec(state: &AppState, bytes: &[u8]) -> ApiResult<JobSpec> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest {
            field: None,
            message: "body is empty: send a job spec as JSON".into(),
        });
    }
    let mut spec = JobSpec::from_json(bytes)?;
    if spec.fusion.is_some() {
        return Err(ApiError::bad(
            "fusion",
            "is set by the exchange on fusion runs' workers: start a run with POST /api/v1/fusion",
        ));
    }
    if let Some(class) = &spec.priority_class {
        if spec.priority != 0 {
            return Err(ApiError::bad(
                "priority_class",
                "give a priority class or a priority number, not both",
            ));
        }
        spec.priority = priority_of(state, class)?;
    }
    Ok(spec)
}

/// The spec field responsible when every cluster rejects a job: the one field every
/// cluster names, or else the one named by the clusters that do offer an accepted model.
fn infeasible(quote: &Quote) -> ApiError {
    let distinct = |only_accepting_model: bool| {
        let mut fields: Vec<&str> = quote
            .candidates
            .iter()
            .filter(|c| {
                !only_accepting_model
                    || c.accelerator.is_some()
                    || c.field.as_deref() != Some("resources.accelerators")
            })
            .filter_map(|c| c.field.as_deref())
            .collect();
        fields.sort_unstable();
        fields.dedup();
        fields
    };
    let field = match (distinct(false).as_slice(), distinct(true).as_slice()) {
        ([one], _) | (_, [one]) => one.to_string(),
        _ => "resources".to_string(),
    };
    ApiError::Unprocessable {
        code: "infeasible",
        field: Some(field),
        message: quote.rejection_summary(),
    }
}

/// The refusal of a job whose hold the tenant's wallet cannot cover, with the amounts.
fn insufficient(spec: &JobSpec, tenant: &str, needed: i128, available: i128) -> ApiError {
    let cny = |v: i128| {
        Money::new(
            v.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            Currency::CNY,
        )
    };
    ApiError::Unprocessable {
        code: "insufficient_funds",
        // what the tenant can lower: the ceiling when it set one, else the estimate
        field: Some(
            if spec.max_price_per_hour.is_some() {
                "max_price_per_hour"
            } else {
                "estimated_duration"
            }
            .into(),
        ),
        message: format!(
            "tenant `{tenant}` has {} available in wallet:{tenant}; the job's hold is {} \
             (price ceiling × accelerators × estimated duration × margin): deposit funds, or \
             lower max_price_per_hour or estimated_duration",
            cny(available),
            cny(needed)
        ),
    }
}

/// A job's admission, before it is queued: refused (with the field at fault) when no
/// cluster could ever hold it, its rules on inputs and its tenant's quota included; else the
/// hold that pays for it, if it costs anything.
pub(crate) async fn admission(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    tenant: &str,
    spec: &JobSpec,
    job_id: &str,
    now: i64,
) -> ApiResult<Option<baygrid_ledger::Transfer>> {
    let mut requester = catalog.requester(tenant, spec).ok_or_else(|| {
        ApiError::bad(
            "tenant",
            format!("unknown tenant `{tenant}` (or its party)"),
        )
    })?;
    requester.inputs_denied = crate::zone::inputs_denied(state, catalog, tenant, spec).await?;
    // a job larger than its tenant's quota (or, borrowing, its cohort's) fails fast
    requester.over_quota =
        state
            .config
            .quotas()
            .blocks(&baygrid_sched::fairshare::Usage::default(), tenant, spec);
    let quote = state.placer.quote(spec, &requester, &catalog.empty, now);
    if !quote.ever_feasible() {
        return Err(infeasible(&quote));
    }
    crate::ledger::hold_for(state, spec, &quote, tenant, job_id, now)
}

/// Submits a job. It is rejected at once when no cluster could ever hold it, and when
/// the tenant's wallet cannot cover its hold.
#[utoipa::path(post, path = "/api/v1/jobs", params(TenantQuery, ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key returns the first job")),
    request_body = JobSpec,
    responses((status = 201, body = JobView), (status = 200, description = "idempotent retry", body = JobView), (status = 400, body = baygrid_api::ErrorBody), (status = 422, body = baygrid_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<TenantQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let tenant = acting_tenant(&who, query.tenant.as_deref())?;
    let key = match headers.get("idempotency-key") {
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key", "must be visible ASCII"))?;
            if key.is_empty() || key.len() > 200 {
                return Err(ApiError::bad(
                    "Idempotency-Key",
                    "must be 1 to 200 characters",
                ));
            }
            Some(key.to_string())
        }
        None => None,
    };
    let spec = parse_spec(&state, &body)?;
    let now = state.now();
    if let Some(deadline) = spec.deadline {
        if deadline.timestamp_millis() <= now {
            return Err(ApiError::bad("deadline", "is in the past"));
        }
    }
    let job_id = baygrid_core::new_id("job");
    let hold = admission(&state, &state.catalog(), &tenant, &spec, &job_id, now).await?;
    if let Some(hold) = &hold {
        let available = state
            .store
            .ledger_available(&hold.debit_account)
            .unwrap_or(0);
        if (hold.amount as i128) > available {
            return Err(insufficient(&spec, &tenant, hold.amount as i128, available));
        }
    }
    let spec_for_errors = spec.clone();
    let (record, created) = state
        .store
        .submit(NewJob {
            id: job_id,
            tenant: tenant.clone(),
            idempotency_key: key,
            spec,
            actor: actor(&who),
            now,
            hold,
        })
        .await
        .map_err(|e| match e {
            baygrid_store::StoreError::Ledger {
                error:
                    baygrid_ledger::TransferError::ExceedsCredits {
                        needed, available, ..
                    },
                ..
            } => insufficient(&spec_for_errors, &tenant, needed, available),
            other => other.into(),
        })?;
    state.metrics.jobs_submitted.inc();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, record, Vec::new()))))
}

/// Every cluster's verdict for a spec, against what is free now.
#[utoipa::path(post, path = "/api/v1/jobs/quote", params(TenantQuery), request_body = JobSpec,
    responses((status = 200, body = QuoteView), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn quote(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<TenantQuery>,
    RawBody(body): RawBody,
) -> ApiResult<Json<QuoteView>> {
    let tenant = acting_tenant(&who, query.tenant.as_deref())?;
    let spec = parse_spec(&state, &body)?;
    let catalog = state.catalog();
    let mut requester = catalog.requester(&tenant, &spec).ok_or_else(|| {
        ApiError::bad(
            "tenant",
            format!("unknown tenant `{tenant}` (or its party)"),
        )
    })?;
    requester.inputs_denied = crate::zone::inputs_denied(&state, &catalog, &tenant, &spec).await?;
    let (market, usage, _) =
        crate::scheduler::live_market_and_usage(&state, &catalog, state.now()).await?;
    requester.over_quota = state.config.quotas().blocks(&usage, &tenant, &spec);
    let now = state.now();
    let quote = state.placer.quote(&spec, &requester, &market, now);
    let patience = state.config.patience();
    let patient = patience.wait_in(&quote, &spec, now, |_| false);
    let summary = match (quote.chosen(), patient) {
        (Some(chosen), Some(later)) => format!(
            "would wait for {} at {}, expected to have room at {} for {} in all against {} on {} now (a batch job waits for a cheaper cluster up to {:.0}% of its run time)",
            later.cluster,
            later.site,
            later
                .estimated_start_ms
                .map(baygrid_core::millis_to_rfc3339)
                .unwrap_or_default(),
            later.total_cost_cny.map(|m| m.to_string()).unwrap_or_default(),
            chosen.total_cost_cny.map(|m| m.to_string()).unwrap_or_default(),
            chosen.cluster,
            patience.share * 100.0
        ),
        (Some(chosen), None) => format!(
            "would run on {} at {} ({})",
            chosen.cluster, chosen.site, chosen.reason
        ),
        (None, _) if quote.misses_deadline(&spec) => {
            "would wait, and every cluster that could hold it is expected to end it after its deadline".to_string()
        }
        (None, _) if quote.ever_feasible() => {
            "would wait: no cluster that can hold it has room now".to_string()
        }
        (None, _) => quote.rejection_summary(),
    };
    Ok(Json(QuoteView {
        chosen: quote.chosen().map(|c| c.cluster.clone()),
        feasible: quote.ever_feasible(),
        summary,
        quote: QuoteBody::from(&quote),
    }))
}

/// Jobs the caller may see, newest first: a tenant its own, operators and regulators all.
#[utoipa::path(get, path = "/api/v1/jobs", params(ListParams), responses((status = 200, body = [JobView]), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<ListParams>,
) -> ApiResult<Json<Vec<JobView>>> {
    let tenant = match who.role {
        Role::Tenant => Some(acting_tenant(&who, query.tenant.as_deref())?),
        Role::Operator | Role::Regulator => query.tenant.clone(),
        _ => {
            return Err(ApiError::Forbidden(format!(
                "role {} may not list jobs",
                who.role
            )))
        }
    };
    let states = match &query.state {
        Some(text) => vec![text
            .parse::<JobState>()
            .map_err(|e| ApiError::bad("state", e))?],
        None => vec![],
    };
    let limit = query.limit()?;
    let before = match &query.before {
        Some(id) => {
            let seen = match visible_job(&state, &who, id).await {
                Ok(last) => Some((last.submitted_ms, last.id)),
                Err(ApiError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            Some(paging::below("job", id, seen)?)
        }
        None => None,
    };
    let records = state
        .store
        .list_jobs(&JobFilter {
            tenant,
            states,
            before,
            limit,
        })
        .await?;
    Ok(Json(
        records
            .into_iter()
            .map(|r| view(&state, r, Vec::new()))
            .collect(),
    ))
}

/// Loads a job the caller may see; others' jobs are "not found", not "forbidden".
async fn visible_job(state: &AppState, who: &Principal, id: &str) -> ApiResult<JobRecord> {
    let not_found = || ApiError::NotFound(format!("job `{id}` not found"));
    let record = match state.store.get_job(id).await {
        Ok(record) => record,
        Err(baygrid_store::StoreError::NotFound { .. }) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let visible = match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant => who.subject.as_deref() == Some(record.tenant.as_str()),
        Role::Provider => {
            let catalog = state.catalog();
            record
                .allocation
                .as_ref()
                .and_then(|a| catalog.clusters.get(&a.cluster))
                .is_some_and(|c| who.subject.as_deref() == Some(c.provider.as_str()))
        }
        _ => false,
    };
    if visible {
        Ok(record)
    } else {
        Err(not_found())
    }
}

/// One job with its history.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let record = visible_job(&state, &who, &id).await?;
    let events = state.store.job_events(&id).await?;
    Ok(Json(view(&state, record, events)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    pub limit: Option<i64>,
}

/// A page of the job's output.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs", params(("id" = String, Path), LogsQuery), responses((status = 200, body = LogsView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<LogsQuery>,
) -> ApiResult<Json<LogsView>> {
    let record = visible_job(&state, &who, &id).await?;
    let after = match &query.after {
        None => (0, 0),
        Some(text) => {
            let parsed = text
                .split_once(':')
                .and_then(|(e, s)| Some((e.parse::<i64>().ok()?, s.parse::<i64>().ok()?)));
            parsed.ok_or_else(|| {
                ApiError::bad("after", "must be a cursor EPOCH:SEQ from a previous page")
            })?
        }
    };
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    let lines = state.store.read_logs(&id, after, limit).await?;
    let next = lines.last().map(|l| (l.epoch, l.seq)).unwrap_or(after);
    Ok(Json(LogsView {
        done: record.state.is_terminal() && (lines.len() as i64) < limit,
        state: record.state,
        purged_at: record.logs_purged_ms.map(millis_to_rfc3339),
        next: format!("{}:{}", next.0, next.1),
        lines: lines
            .into_iter()
            .map(|l| LogLineView {
                attempt: l.epoch,
                seq: l.seq,
                stream: l.stream,
                line: l.line,
            })
            .collect(),
    }))
}

/// Cancels a job: at once if no agent holds it, otherwise its agent stops it.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = CancelView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<CancelView>> {
    require(&who, &[Role::Tenant, Role::Operator])?;
    visible_job(&state, &who, &id).await?;
    let (outcome, record) = state.store.cancel(id, actor(&who), state.now()).await?;
    let outcome = serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Ok(Json(CancelView {
        outcome,
        job: view(&state, record, Vec::new()),
    }))
}

pub fn view(state: &AppState, record: JobRecord, events: Vec<baygrid_store::JobEvent>) -> JobView {
    let catalog = state.catalog();
    let cluster = record.allocation.as_ref().map(|a| a.cluster.clone());
    let (site, engine) = match cluster.as_ref().and_then(|c| catalog.clusters.get(c)) {
        Some(c) => (Some(c.site.clone()), Some(c.engine.to_string())),
        None => (None, None),
    };
    JobView {
        id: record.id,
        tenant: record.tenant,
        name: record.name,
        state: record.state,
        reason: record.reason,
        priority: record.priority,
        submitted_at: millis_to_rfc3339(record.submitted_ms),
        updated_at: millis_to_rfc3339(record.updated_ms),
        started_at: record.started_ms.map(millis_to_rfc3339),
        finished_at: record.finished_ms.map(millis_to_rfc3339),
        cluster,
        site,
        engine,
        allocation: record.allocation,
        attempts: record.attempts,
        exit_code: record.exit_code,
        cost: record.cost_cny_minor.map(|m| Money::new(m, Currency::CNY)),
        spec: record.spec,
        events: events
            .into_iter()
            .map(|e| JobEventView {
                at: millis_to_rfc3339(e.at_ms),
                from: e.from_state,
                to: e.to_state,
                reason: e.reason,
            })
            .collect(),
    }
}
