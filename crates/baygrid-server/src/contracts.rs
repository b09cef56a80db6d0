//! Data offers and contracts: a holder publishes what others may do with a dataset; a
//! consumer requests a use for a purpose at a site; the rules decide; the holder approves
//! (or the offer approves itself); either side may revoke. Every step is a catalog write,
//! so it reaches the audit log with the decision it carries.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{ContractRequest, ContractState, ContractView, DataOfferSpec, DataOfferView};
use baygrid_core::{millis_to_rfc3339, Principal, Role};
use chrono::Datelike;

use crate::body::{JsonBody, QueryParams};
use crate::catalog::CatalogSnapshot;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{acting_tenant, TenantQuery};
use crate::zone::{dataset_flow, today, FlowEnds};
use crate::AppState;

fn offer_view(catalog: &CatalogSnapshot, spec: &DataOfferSpec) -> Option<DataOfferView> {
    let dataset = catalog.datasets.get(&spec.dataset)?;
    Some(DataOfferView {
        spec: spec.clone(),
        holder: dataset.holder.clone(),
        vault: dataset.vault.clone(),
    })
}

/// Every data offer: the catalog's terms, for every role.
#[utoipa::path(get, path = "/api/v1/data-offers", responses((status = 200, body = [DataOfferView])), security(("bearer" = [])))]
pub async fn list_offers(
    State(state): State<AppState>,
    _who: Principal,
) -> Json<Vec<DataOfferView>> {
    let catalog = state.catalog();
    Json(
        catalog
            .data_offers
            .values()
            .filter_map(|o| offer_view(&catalog, o))
            .collect(),
    )
}

/// Publishes (or replaces) a data offer on a dataset; only its holder (or an operator).
#[utoipa::path(post, path = "/api/v1/data-offers", request_body = DataOfferSpec, responses((status = 201, body = DataOfferView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn publish_offer(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(spec): JsonBody<DataOfferSpec>,
) -> ApiResult<(StatusCode, Json<DataOfferView>)> {
    let catalog = state.catalog();
    let dataset = catalog
        .datasets
        .get(&spec.dataset)
        .ok_or_else(|| ApiError::bad("dataset", format!("unknown dataset `{}`", spec.dataset)))?;
    crate::zone::may_act_for(&who, &dataset.holder)?;
    let holder = catalog.holder(dataset)?;
    spec.validate(dataset, holder.jurisdiction, today(&state)?)
        .map_err(|e| ApiError::bad(e.field, e.message))?;
    if let Some(existing) = catalog.data_offers.get(&spec.name) {
        if existing.dataset != spec.dataset {
            return Err(ApiError::Conflict(format!(
                "offer `{}` is on dataset `{}`",
                spec.name, existing.dataset
            )));
        }
    }
    let view = offer_view(&catalog, &spec).expect("the dataset was found above");
    crate::catalog::put_json(
        &state,
        "data_offer",
        &spec.name,
        Some(dataset.holder.clone()),
        &spec,
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Whether `who` is a party to a contract: its tenant, its holder, or an operator or
/// regulator (who see all).
fn sees(who: &Principal, contract: &ContractView) -> bool {
    match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant => who.subject.as_deref() == Some(contract.tenant.as_str()),
        Role::DataHolder => who.subject.as_deref() == Some(contract.holder.as_str()),
        _ => false,
    }
}

/// The contracts the caller is a party to (operators and regulators: all).
#[utoipa::path(get, path = "/api/v1/contracts", responses((status = 200, body = [ContractView])), security(("bearer" = [])))]
pub async fn list_contracts(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<ContractView>>> {
    crate::auth::require(
        &who,
        &[
            Role::Operator,
            Role::Regulator,
            Role::Tenant,
            Role::DataHolder,
        ],
    )?;
    let catalog = state.catalog();
    Ok(Json(
        catalog
            .contracts
            .values()
            .filter(|c| sees(&who, c))
            .cloned()
            .collect(),
    ))
}

/// Requests a contract on an offer for a mode, a purpose and a destination site. The rules
/// decide on today's evidence and the holder's totals; the contract is recorded with the
/// decision: denied, pending the holder's approval, or active when the offer approves
/// itself.
#[utoipa::path(post, path = "/api/v1/contracts", params(TenantQuery), request_body = ContractRequest, responses((status = 201, body = ContractView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn request_contract(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<TenantQuery>,
    JsonBody(request): JsonBody<ContractRequest>,
) -> ApiResult<(StatusCode, Json<ContractView>)> {
    let tenant = acting_tenant(&who, query.tenant.as_deref())?;
    let catalog = state.catalog();
    let offer = catalog
        .data_offers
        .get(&request.offer)
        .ok_or_else(|| ApiError::bad("offer", format!("unknown offer `{}`", request.offer)))?;
    let today = today(&state)?;
    if offer.expires <= today {
        return Err(ApiError::bad(
            "offer",
            format!("offer `{}` expired on {}", offer.name, offer.expires),
        ));
    }
    if !offer.modes.contains(&request.mode) {
        return Err(ApiError::bad(
            "mode",
            format!(
                "offer `{}` allows {}",
                offer.name,
                offer
                    .modes
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if !offer.purposes.contains(&request.purpose) {
        return Err(ApiError::bad(
            "purpose",
            format!(
                "offer `{}` allows {}",
                offer.name,
                offer.purposes.join(", ")
            ),
        ));
    }
    let site = catalog
        .sites
        .get(&request.site)
        .ok_or_else(|| ApiError::bad("site", format!("unknown site `{}`", request.site)))?;
    if !offer.destinations.contains(&site.jurisdiction) {
        return Err(ApiError::bad(
            "site",
            format!(
                "`{}` is in {}; offer `{}` goes only to {}",
                site.name,
                site.jurisdiction,
                offer.name,
                offer
                    .destinations
                    .iter()
                    .map(|j| j.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let dataset = catalog
        .datasets
        .get(&offer.dataset)
        .ok_or_else(|| ApiError::Unavailable(format!("dataset `{}` is gone", offer.dataset)))?;
    let holder = catalog.holder(dataset)?;
    let recipient = catalog
        .tenant_party(&tenant)
        .ok_or_else(|| ApiError::bad("tenant", format!("unknown tenant `{tenant}`")))?;
    let mut flow = dataset_flow(
        &catalog,
        dataset,
        FlowEnds {
            holder,
            recipient,
            site,
        },
        request.mode.flow_mode(),
        &request.purpose,
        today,
    );
    let (personal, sensitive) = state
        .store
        .export_totals(&holder.name, today.year() as i64)
        .await?;
    flow.flow.exported_personal = personal.max(0) as u64;
    flow.flow.exported_sensitive = sensitive.max(0) as u64;
    let decision = state.rules.decide(&flow).map_err(|e| match e {
        baygrid_rules::RuleError::Invalid { field, message } => ApiError::bad(field, message),
        other => ApiError::Unavailable(other.to_string()),
    })?;
    let now = state.now();
    let state_now = match (decision.allowed, offer.auto_approve) {
        (false, _) => ContractState::Denied,
        (true, false) => ContractState::Pending,
        (true, true) => ContractState::Active,
    };
    let contract = ContractView {
        id: baygrid_core::new_id("ct").replace('_', "-"),
        request,
        dataset: dataset.name.clone(),
        holder: holder.name.clone(),
        tenant,
        recipient: recipient.name.clone(),
        state: state_now,
        decision,
        requested_at: millis_to_rfc3339(now),
        approved_at: (state_now == ContractState::Active).then(|| millis_to_rfc3339(now)),
        revoked_at: None,
        expires: offer.expires,
    };
    save(&state, &contract, &who).await?;
    Ok((StatusCode::CREATED, Json(contract)))
}

async fn save(state: &AppState, contract: &ContractView, who: &Principal) -> ApiResult<()> {
    crate::catalog::put_json(
        state,
        "contract",
        &contract.id,
        Some(contract.holder.clone()),
        contract,
        who,
    )
    .await
}

fn find(state: &AppState, who: &Principal, id: &str) -> ApiResult<ContractView> {
    let catalog = state.catalog();
    catalog
        .contracts
        .get(id)
        .filter(|c| sees(who, c))
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no contract `{id}`")))
}

/// The holder approves a pending contract (one the rules allowed), before the offer expires.
#[utoipa::path(post, path = "/api/v1/contracts/{id}/approve", params(("id" = String, Path)), responses((status = 200, body = ContractView), (status = 403, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn approve(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<ContractView>> {
    let mut contract = find(&state, &who, &id)?;
    crate::zone::may_act_for(&who, &contract.holder)?;
    if contract.state != ContractState::Pending {
        return Err(ApiError::Conflict(
            format!("contract `{id}` is {:?}, not pending", contract.state).to_lowercase(),
        ));
    }
    if contract.expires <= today(&state)? {
        return Err(ApiError::Conflict(format!(
            "contract `{id}`'s offer expired on {}",
            contract.expires
        )));
    }
    contract.state = ContractState::Active;
    contract.approved_at = Some(millis_to_rfc3339(state.now()));
    save(&state, &contract, &who).await?;
    Ok(Json(contract))
}

/// Either side (or an operator) ends a pending or active contract.
#[utoipa::path(post, path = "/api/v1/contracts/{id}/revoke", params(("id" = String, Path)), responses((status = 200, body = ContractView), (status = 403, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<ContractView>> {
    let mut contract = find(&state, &who, &id)?;
    if who.role == Role::Regulator {
        return Err(ApiError::Forbidden(
            "a regulator reads contracts; the parties revoke them".into(),
        ));
    }
    if !matches!(
        contract.state,
        ContractState::Pending | ContractState::Active
    ) {
        return Err(ApiError::Conflict(
            format!(
                "contract `{id}` is {:?}: only pending or active contracts are revoked",
                contract.state
            )
            .to_lowercase(),
        ));
    }
    contract.state = ContractState::Revoked;
    contract.revoked_at = Some(millis_to_rfc3339(state.now()));
    save(&state, &contract, &who).await?;
    Ok(Json(contract))
}
