//! Settlement: what a job holds at submission, what it is charged at the end, and the
//! ledger at the API (balances, deposits, statements, invoices).
//!
//! Money flows:
//! - a tenant is opened with its budget as an opening deposit, `funding:CNY → wallet:T`;
//! - a submission holds `wallet:T → clearing:CNY` (pending) for the price ceiling ×
//!   accelerators × estimated duration × the margin;
//! - the end of the job posts the metered cost against the hold (the rest is released),
//!   then splits it, as one linked chain: the fee to `fees:CNY`, the remainder to the
//!   provider in its offer's currency, through `fx:CNY` and `fx:CCY` at the recorded rate;
//! - a job that ends without running (cancelled, refused), or whose attempt was lost on
//!   the provider's side and never finished, is not charged: its hold is voided.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{
    AccountView, DataUseLine, DepositRequest, InvoiceLine, InvoiceView, StatementLineView,
    StatementView, TransferView,
};
use baygrid_core::{millis_to_rfc3339, Currency, JobSpec, Money, Principal, Role};
use baygrid_ledger::{names, Account, Transfer, TransferKind};
use baygrid_sched::{Quote, Verdict};
use baygrid_store::{JobRecord, TransferRecord};
use serde::Deserialize;

use crate::auth::{actor, require};
use crate::body::{JsonBody, QueryParams};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Opens the platform's accounts; a no-op when they exist.
pub async fn open_platform(state: &AppState) -> Result<(), baygrid_store::StoreError> {
    state
        .store
        .open_accounts(names::platform(), state.now())
        .await
}

/// Opens a new tenant's wallet and makes its opening deposit.
pub async fn open_tenant(
    state: &AppState,
    tenant: &str,
    budget: Money,
    who: &Principal,
) -> ApiResult<()> {
    let now = state.now();
    let wallet = names::wallet(tenant);
    state.store.open_accounts(vec![wallet.clone()], now).await?;
    if budget.minor > 0 {
        let deposit = Transfer {
            id: format!("opening:{tenant}"),
            debit_account: names::funding(Currency::CNY).id,
            credit_account: wallet.id,
            amount: budget.minor,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: false,
            reference: format!("tenant:{tenant}"),
        };
        state.store.transfer(vec![deposit], actor(who), now).await?;
    }
    Ok(())
}

/// The hold a submission places: the price ceiling (or, without one, the dearest cluster
/// that could take the job) × accelerators × estimated duration, plus the dearest staging of
/// its inputs, × the margin, in CNY. None when the job would cost nothing.
pub fn hold_for(
    state: &AppState,
    spec: &JobSpec,
    quote: &Quote,
    tenant: &str,
    job_id: &str,
    now: i64,
) -> ApiResult<Option<Transfer>> {
    let catalog = state.catalog();
    let feasible = quote
        .candidates
        .iter()
        .filter(|c| c.verdict != Verdict::Rejected);
    let staging = |c: &baygrid_sched::Candidate| c.transfer_cost_cny.map_or(0, |m| m.minor);
    let estimate = match spec.max_price_per_hour {
        Some(cap) => {
            let cap = catalog
                .rates
                .to_cny(cap)
                .map_err(|e| ApiError::bad("max_price_per_hour", e.to_string()))?;
            let accelerators = feasible.clone().map(|c| c.accelerators).max().unwrap_or(0);
            let seconds = spec.estimated_duration.0.as_secs().max(1);
            baygrid_sched::cost::compute(cap, u64::from(accelerators), seconds * 1000)
                .map_err(|e| ApiError::bad("max_price_per_hour", e.to_string()))?
                .minor
                + feasible.map(staging).max().unwrap_or(0)
        }
        None => feasible
            .filter_map(|c| c.estimated_cost_cny.map(|m| m.minor + staging(c)))
            .max()
            .unwrap_or(0),
    };
    let amount = Money::new(estimate, Currency::CNY)
        .mul_ratio(state.config.hold_margin_pct as i128, 100)
        .map_err(|e| ApiError::bad("estimated_duration", e.to_string()))?
        .minor;
    if amount <= 0 {
        return Ok(None);
    }
    Ok(Some(Transfer {
        id: names::hold(job_id),
        debit_account: names::wallet(tenant).id,
        credit_account: names::clearing(Currency::CNY).id,
        amount,
        currency: Currency::CNY,
        kind: TransferKind::Pending {
            expires_at: now + state.config.hold_timeout.as_millis() as i64,
        },
        linked: false,
        reference: names::job_reference(job_id),
    }))
}

/// How many seconds of the job's accelerators its open hold pays for at the placed price,
/// after staging its inputs.
pub fn held_seconds(state: &AppState, job: &JobRecord) -> Option<u64> {
    let allocation = job.allocation.as_ref()?;
    let hold = state.store.ledger_open_hold(&names::hold(&job.id))?;
    let price = state
        .catalog()
        .rates
        .to_cny(allocation.price_per_accelerator_hour)
        .ok()?;
    let per_hour = price.minor as i128 * allocation.total_accelerators() as i128;
    if per_hour <= 0 {
        return None;
    }
    let staging = allocation.staging_cny.map_or(0, |m| m.minor.max(0));
    let for_compute = (hold.amount - staging).max(0) as i128;
    Some((for_compute * 3600 / per_hour) as u64)
}

/// The metered cost of a job that ended (CNY minor units: the accelerators for the time
/// they ran, plus staging its inputs as quoted when placed) and the linked chain that
/// settles it, capped at its hold: compute goes to the cluster's provider (less the
/// platform's fee), staging to the platform, which runs the links between sites. An empty
/// chain means nothing is owed: the hold is voided.
pub fn settlement(state: &AppState, job: &JobRecord, now: i64) -> ApiResult<(i64, Vec<Transfer>)> {
    let Some(allocation) = &job.allocation else {
        return Ok((0, Vec::new()));
    };
    let catalog = state.catalog();
    let started = job.started_ms.unwrap_or(now);
    let elapsed_ms = (now - started).max(0) as u64;
    let accelerators = u64::from(allocation.total_accelerators());
    let price = allocation.price_per_accelerator_hour;
    // the placer's cost model, on the time the job ran
    let compute_cny = catalog
        .rates
        .to_cny(price)
        .and_then(|p| baygrid_sched::cost::compute(p, accelerators, elapsed_ms))
        .map_err(|e| ApiError::Conflict(format!("cannot price job {}: {e}", job.id)))?
        .minor;
    let staging_cny = allocation.staging_cny.map_or(0, |m| m.minor.max(0));
    let cost_cny = compute_cny + staging_cny;
    let Some(hold) = state.store.ledger_open_hold(&names::hold(&job.id)) else {
        return Ok((cost_cny, Vec::new()));
    };
    let charged = cost_cny.min(hold.amount);
    // within the hold, compute first; staging takes what is left of it
    let compute_charged = compute_cny.min(charged);
    let staging_charged = charged - compute_charged;
    if charged <= 0 {
        return Ok((cost_cny, Vec::new()));
    }
    let reference = names::job_reference(&job.id);
    let mut chain = vec![Transfer {
        id: format!("post:{}", job.id),
        debit_account: hold.debit_account.clone(),
        credit_account: hold.credit_account.clone(),
        amount: charged,
        currency: Currency::CNY,
        kind: TransferKind::Post {
            pending_id: hold.id.clone(),
        },
        linked: true,
        reference: reference.clone(),
    }];
    let provider = catalog
        .clusters
        .get(&allocation.cluster)
        .map(|c| c.provider.clone())
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "job {} ran on cluster {}, which is no longer published",
                job.id, allocation.cluster
            ))
        })?;
    pay_out(
        state,
        &mut chain,
        &job.id,
        compute_charged,
        &names::provider(&provider, price.currency),
        &reference,
    )?;
    if staging_charged > 0 {
        chain.push(Transfer {
            id: format!("staging:{}", job.id),
            debit_account: names::clearing(Currency::CNY).id,
            credit_account: names::fees(Currency::CNY).id,
            amount: staging_charged,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: true,
            reference: reference.clone(),
        });
    }
    chain.last_mut().expect("a post at least").linked = false;
    Ok((cost_cny, chain))
}

/// Voids the hold placed for `id` (a query or a fusion run): nothing is charged.
pub fn void_hold(id: &str, tenant: &str, held_cny: i64, reference: String) -> Vec<Transfer> {
    if held_cny <= 0 {
        return vec![];
    }
    vec![Transfer {
        id: format!("void:{id}"),
        debit_account: names::wallet(tenant).id,
        credit_account: names::clearing(Currency::CNY).id,
        amount: held_cny,
        currency: Currency::CNY,
        kind: TransferKind::Void {
            pending_id: names::hold(id),
        },
        linked: false,
        reference,
    }]
}

/// Pays `charged` CNY out of clearing, as linked transfers appended to `chain`: the
/// platform's fee, then the rest to `payee` in its currency (through the FX accounts when
/// that is not CNY). Transfer ids end in `id`.
pub fn pay_out(
    state: &AppState,
    chain: &mut Vec<Transfer>,
    id: &str,
    charged: i64,
    payee: &Account,
    reference: &str,
) -> ApiResult<()> {
    let clearing = names::clearing(Currency::CNY).id;
    let fee = Money::new(charged, Currency::CNY)
        .mul_ratio(state.config.fee_bps as i128, 10_000)
        .map_err(|e| ApiError::Conflict(format!("fee of {id}: {e}")))?
        .minor;
    if fee > 0 {
        chain.push(Transfer {
            id: format!("fee:{id}"),
            debit_account: clearing.clone(),
            credit_account: names::fees(Currency::CNY).id,
            amount: fee,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: true,
            reference: reference.to_string(),
        });
    }
    let share = charged - fee;
    if share <= 0 {
        return Ok(());
    }
    if payee.currency == Currency::CNY {
        chain.push(Transfer {
            id: format!("revenue:{id}"),
            debit_account: clearing,
            credit_account: payee.id.clone(),
            amount: share,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: true,
            reference: reference.to_string(),
        });
        return Ok(());
    }
    let catalog = state.catalog();
    let to_rate = catalog
        .rates
        .rate(payee.currency)
        .map_err(|e| ApiError::Conflict(format!("cannot pay {id}: {e}")))?;
    let (pair, _) = baygrid_ledger::fx_pair(
        &format!("revenue:{id}"),
        (&clearing, Currency::CNY),
        &names::fx(Currency::CNY).id,
        &names::fx(payee.currency).id,
        (&payee.id, payee.currency),
        share,
        catalog.rates.rate(Currency::CNY).expect("CNY has a rate"),
        to_rate,
        reference,
    );
    chain.extend(pair.into_iter().map(|mut t| {
        t.linked = true;
        t
    }));
    Ok(())
}

/// The provider accounts a settlement pays into, opened before it is applied.
pub fn accounts_for(chain: &[Transfer], state: &AppState) -> Vec<Account> {
    let catalog = state.catalog();
    chain
        .iter()
        .filter_map(|t| t.credit_account.strip_prefix("provider:"))
        .filter_map(|rest| rest.rsplit_once(':'))
        .filter(|(provider, _)| catalog.providers.contains_key(*provider))
        .filter_map(|(provider, currency)| {
            currency.parse().ok().map(|c| names::provider(provider, c))
        })
        .filter(|a| state.store.ledger_account(&a.id).is_none())
        .collect()
}

fn money(minor: i128, currency: Currency) -> Money {
    Money::new(
        minor.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        currency,
    )
}

fn transfer_view(r: &TransferRecord) -> TransferView {
    TransferView {
        seq: r.seq,
        id: r.id.clone(),
        kind: r.kind.clone(),
        debit: r.debit.clone(),
        credit: r.credit.clone(),
        amount: Money::new(r.amount, r.currency),
        pending_id: r.pending_id.clone(),
        reference: r.reference.clone(),
        at: millis_to_rfc3339(r.at_ms),
    }
}

/// Who may read an account: operators and regulators any; a tenant its wallet; a
/// provider its revenue.
fn may_read(who: &Principal, account: &Account) -> bool {
    match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant | Role::Provider | Role::DataHolder => {
            who.subject.as_deref() == Some(account.owner.as_str())
                && matches!(
                    (who.role, account.kind),
                    (Role::Tenant, baygrid_ledger::AccountKind::TenantWallet)
                        | (Role::Provider, baygrid_ledger::AccountKind::ProviderRevenue)
                        | (
                            Role::DataHolder,
                            baygrid_ledger::AccountKind::DataHolderRevenue
                        )
                )
        }
        Role::Agent => false,
    }
}

fn readable_account(state: &AppState, who: &Principal, id: &str) -> ApiResult<Account> {
    match state.store.ledger_account(id) {
        Some(account) if may_read(who, &account) => Ok(account),
        // another party's account looks the same as none at all
        _ => Err(ApiError::NotFound(format!("no account `{id}`"))),
    }
}

async fn account_view(state: &AppState, account: Account) -> ApiResult<AccountView> {
    let balance = state.store.ledger_balance(&account.id).await?;
    let c = account.currency;
    Ok(AccountView {
        debits_posted: money(balance.debits_posted, c),
        credits_posted: money(balance.credits_posted, c),
        debits_pending: money(balance.debits_pending, c),
        credits_pending: money(balance.credits_pending, c),
        balance: money(balance.net(), c),
        available: money(balance.available(), c),
        id: account.id,
        owner: account.owner,
        kind: account.kind.as_str().into(),
        limited: account.debits_must_not_exceed_credits,
    })
}

/// Accounts the caller may read, with their committed balances.
#[utoipa::path(get, path = "/api/v1/ledger/accounts", responses((status = 200, body = Vec<AccountView>)), security(("bearer" = [])))]
pub async fn list_accounts(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<AccountView>>> {
    let mut views = Vec::new();
    for account in state.store.ledger_accounts() {
        if may_read(&who, &account) {
            views.push(account_view(&state, account).await?);
        }
    }
    Ok(Json(views))
}

/// One account's committed balance.
#[utoipa::path(get, path = "/api/v1/ledger/accounts/{id}", params(("id" = String, Path)), responses((status = 200, body = AccountView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get_account(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<AccountView>> {
    let account = readable_account(&state, &who, &id)?;
    Ok(Json(account_view(&state, account).await?))
}

/// Funds an account from outside the exchange (operator). Idempotent by `id`.
#[utoipa::path(post, path = "/api/v1/ledger/deposits", request_body = DepositRequest, responses((status = 201, body = AccountView), (status = 200, description = "a retry of the same deposit", body = AccountView), (status = 400, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn deposit(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(request): JsonBody<DepositRequest>,
) -> ApiResult<(StatusCode, Json<AccountView>)> {
    require(&who, &[Role::Operator])?;
    let account = state
        .store
        .ledger_account(&request.account)
        .ok_or_else(|| ApiError::bad("account", format!("no account `{}`", request.account)))?;
    if account.kind == baygrid_ledger::AccountKind::ExternalFunding {
        return Err(ApiError::bad("account", "cannot fund the funding account"));
    }
    if request.amount.currency != account.currency {
        return Err(ApiError::bad(
            "amount",
            format!(
                "account `{}` holds {}, not {}",
                account.id, account.currency, request.amount.currency
            ),
        ));
    }
    if request.amount.minor <= 0 {
        return Err(ApiError::bad("amount", "must be positive"));
    }
    if let Some(id) = &request.id {
        crate::catalog::check_name("id", id)?;
    }
    let id = match &request.id {
        Some(id) => format!("deposit:{id}"),
        None => format!("deposit:{}", baygrid_core::new_id("dep")),
    };
    let transfer = Transfer {
        id,
        debit_account: names::funding(account.currency).id,
        credit_account: account.id.clone(),
        amount: request.amount.minor,
        currency: account.currency,
        kind: TransferKind::Single,
        linked: false,
        reference: format!("deposit by {}", actor(&who)),
    };
    let outcomes = state
        .store
        .transfer(vec![transfer], actor(&who), state.now())
        .await?;
    let status = match outcomes.first() {
        Some(baygrid_ledger::Outcome::AlreadyExists) => StatusCode::OK,
        _ => StatusCode::CREATED,
    };
    Ok((status, Json(account_view(&state, account).await?)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PeriodQuery {
    /// RFC 3339 instant or YYYY-MM-DD (UTC), inclusive; default: the beginning.
    pub from: Option<String>,
    /// RFC 3339 instant or YYYY-MM-DD (UTC), exclusive; default: now.
    pub to: Option<String>,
    /// At most this many lines (default 1000, at most 100,000).
    pub limit: Option<i64>,
    /// The next page: the previous page's `next`.
    pub after: Option<String>,
}

fn parse_instant(field: &str, text: &str) -> ApiResult<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis());
    }
    Err(ApiError::bad(
        field,
        format!("`{text}` is not a date: write YYYY-MM-DD or an RFC 3339 instant"),
    ))
}

/// The transfers that touched an account in a period, oldest first, a page at a time; the
/// net covers the whole period on every page.
#[utoipa::path(get, path = "/api/v1/ledger/accounts/{id}/statement", params(("id" = String, Path), PeriodQuery), responses((status = 200, body = StatementView), (status = 400, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn statement(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<PeriodQuery>,
) -> ApiResult<Json<StatementView>> {
    let account = readable_account(&state, &who, &id)?;
    let from = match &query.from {
        Some(text) => parse_instant("from", text)?,
        None => 0,
    };
    let to = match &query.to {
        Some(text) => parse_instant("to", text)?,
        None => state.now() + 1,
    };
    if to <= from {
        return Err(ApiError::bad("to", "must be after `from`"));
    }
    let limit = crate::paging::limit(query.limit)?;
    let after = match &query.after {
        Some(text) => Some(
            text.parse::<i64>()
                .ok()
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| {
                    ApiError::bad(
                        "after",
                        "must be the `next` of the statement's previous page",
                    )
                })?,
        ),
        None => None,
    };
    let period = (from, to);
    let lines = state
        .store
        .ledger_statement(&account.id, period, after, limit)
        .await?;
    let net = state.store.ledger_net(&account.id, period).await?;
    let next = match lines.last() {
        Some(last) if lines.len() as i64 == limit => Some(last.transfer.seq.to_string()),
        _ => None,
    };
    Ok(Json(StatementView {
        account: account.id,
        from: millis_to_rfc3339(from),
        to: millis_to_rfc3339(to),
        net: Money::new(net, account.currency),
        next,
        lines: lines
            .iter()
            .map(|l| StatementLineView {
                transfer: transfer_view(&l.transfer),
                signed_amount: Money::new(l.signed_amount, account.currency),
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InvoiceQuery {
    /// YYYY-MM (UTC).
    pub month: String,
}

/// The first instant of `YYYY-MM` and of the month after, in UTC milliseconds.
pub fn month_bounds(month: &str) -> ApiResult<(i64, i64)> {
    let bad = || ApiError::bad("month", format!("`{month}` is not a month: write YYYY-MM"));
    let (year, mon) = month.split_once('-').ok_or_else(bad)?;
    let year: i32 = year.parse().map_err(|_| bad())?;
    let mon: u32 = mon.parse().map_err(|_| bad())?;
    let start = chrono::NaiveDate::from_ymd_opt(year, mon, 1).ok_or_else(bad)?;
    let end = if mon == 12 {
        chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        chrono::NaiveDate::from_ymd_opt(year, mon + 1, 1)
    }
    .ok_or_else(bad)?;
    let ms = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis()
    };
    Ok((ms(start), ms(end)))
}

/// A tenant's invoice: one line per job that ended in the month, with what its wallet was
/// charged for it.
#[utoipa::path(get, path = "/api/v1/ledger/invoices/{tenant}", params(("tenant" = String, Path), InvoiceQuery), responses((status = 200, body = InvoiceView), (status = 400, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn invoice(
    State(state): State<AppState>,
    who: Principal,
    Path(tenant): Path<String>,
    QueryParams(query): QueryParams<InvoiceQuery>,
) -> ApiResult<Json<InvoiceView>> {
    let wallet = names::wallet(&tenant);
    readable_account(&state, &who, &wallet.id)?;
    let (from, to) = month_bounds(&query.month)?;
    let catalog = state.catalog();
    let jobs = state.store.jobs_finished_between(&tenant, from, to).await?;
    let mut lines = Vec::with_capacity(jobs.len());
    let mut total = 0i64;
    for job in jobs {
        let charged: i64 = state
            .store
            .ledger_transfer(&format!("post:{}", job.id))
            .await?
            .filter(|t| t.debit == wallet.id)
            .map(|t| t.amount)
            .unwrap_or(0);
        total += charged;
        let allocation = job.allocation.as_ref();
        let seconds = match (job.started_ms, job.finished_ms, allocation) {
            (Some(s), Some(f), Some(_)) => (f - s).max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        lines.push(InvoiceLine {
            job: job.id.clone(),
            name: job.name.clone(),
            state: job.state,
            site: allocation
                .and_then(|a| catalog.clusters.get(&a.cluster))
                .map(|c| c.site.clone()),
            cluster: allocation.map(|a| a.cluster.clone()),
            accelerator: allocation.and_then(|a| a.accelerator.clone()),
            accelerators: allocation.map(|a| a.total_accelerators()).unwrap_or(0),
            seconds,
            price_per_accelerator_hour: allocation.map(|a| a.price_per_accelerator_hour),
            amount: Money::new(charged, Currency::CNY),
            finished_at: job.finished_ms.map(millis_to_rfc3339),
        });
    }
    let mut data_uses = Vec::new();
    for (kind, row) in state
        .store
        .data_uses_finished_between(&tenant, from, to)
        .await?
    {
        let charged: i64 = state
            .store
            .ledger_transfer(&format!("post:{}", row.id))
            .await?
            .filter(|t| t.debit == wallet.id)
            .map(|t| t.amount)
            .unwrap_or(0);
        total += charged;
        let datasets = match kind {
            "query" => crate::queries::datasets_of(&row)?,
            _ => crate::fusion::datasets_of(&row)?,
        };
        data_uses.push(DataUseLine {
            kind: kind.to_string(),
            id: row.id.clone(),
            state: row.state.clone(),
            datasets,
            amount: Money::new(charged, Currency::CNY),
            finished_at: row.finished_ms.map(millis_to_rfc3339),
        });
    }
    Ok(Json(InvoiceView {
        tenant,
        month: query.month,
        lines,
        data_uses,
        total: Money::new(total, Currency::CNY),
    }))
}
