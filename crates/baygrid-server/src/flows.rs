//! Copies of datasets between vaults, under a contract: the rules decide and the totals
//! count at request, in one transaction with the record; the source site's agent moves the
//! bytes (the server never does); a finished copy is the recipient's dataset in the
//! destination vault, and a failed one is taken back out of the totals.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{
    ContractState, DatasetSpec, DatasetVersion, FlowReport, FlowRequestBody, FlowState, FlowTask,
    FlowView, OfferMode,
};
use baygrid_core::{millis_to_rfc3339, Principal, Role};
use chrono::Datelike;

use crate::body::{JsonBody, QueryParams};
use crate::error::{ApiError, ApiResult};
use crate::jobs::{acting_tenant, TenantQuery};
use crate::zone::{dataset_flow, today, FlowEnds};
use crate::AppState;

/// A copy claimed by an agent that has not reported within this long is handed out again
/// (copies write the same keys, so running one twice is harmless).
const RECLAIM_MS: i64 = 5 * 60 * 1000;

fn sees(who: &Principal, flow: &FlowView) -> bool {
    match who.role {
        Role::Operator | Role::Regulator => true,
        Role::Tenant => who.subject.as_deref() == Some(flow.tenant.as_str()),
        Role::DataHolder => {
            who.subject.as_deref() == Some(flow.holder.as_str())
                || who.subject.as_deref() == Some(flow.recipient.as_str())
        }
        _ => false,
    }
}

async fn save(state: &AppState, flow: &FlowView, actor: &Principal) -> ApiResult<()> {
    let body = serde_json::to_value(flow).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    crate::catalog::put(
        state,
        "flow",
        &flow.id,
        Some(flow.holder.clone()),
        body,
        actor,
    )
    .await
}

/// Asks for a copy of a dataset's latest version to a site's vault, under an active copy
/// contract for that site and purpose. The rules decide on today's totals; an allowed copy
/// is counted and recorded in one transaction and waits for the source site's agent; a
/// denied one moves nothing and is recorded with its reasons.
#[utoipa::path(post, path = "/api/v1/flows", params(TenantQuery), request_body = FlowRequestBody, responses((status = 201, body = FlowView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn request(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<TenantQuery>,
    JsonBody(ask): JsonBody<FlowRequestBody>,
) -> ApiResult<(StatusCode, Json<FlowView>)> {
    let tenant = acting_tenant(&who, query.tenant.as_deref())?;
    let catalog = state.catalog();
    let dataset = catalog
        .datasets
        .get(&ask.dataset)
        .ok_or_else(|| ApiError::bad("dataset", format!("unknown dataset `{}`", ask.dataset)))?;
    let version = catalog
        .versions
        .get(&ask.dataset)
        .and_then(|v| v.last())
        .cloned()
        .ok_or_else(|| {
            ApiError::bad(
                "dataset",
                format!("`{}` has no uploaded version yet", ask.dataset),
            )
        })?;
    let site = catalog
        .sites
        .get(&ask.site)
        .ok_or_else(|| ApiError::bad("site", format!("unknown site `{}`", ask.site)))?;
    if site.name == dataset.vault {
        return Err(ApiError::bad(
            "site",
            format!(
                "`{}` is already in the vault at {}",
                dataset.name, site.name
            ),
        ));
    }
    let today = today(&state)?;
    let contract = catalog
        .contracts
        .values()
        .find(|c| {
            c.tenant == tenant
                && c.dataset == dataset.name
                && c.state == ContractState::Active
                && c.request.mode == OfferMode::Copy
                && c.request.site == site.name
                && c.request.purpose == ask.purpose
                && c.expires > today
        })
        .ok_or_else(|| {
            ApiError::Forbidden(format!(
                "tenant `{tenant}` has no active copy contract for `{}` to {} for {}",
                dataset.name, site.name, ask.purpose
            ))
        })?
        .clone();
    let copy_as = ask
        .copy_as
        .clone()
        .unwrap_or_else(|| format!("{}-{}", dataset.name, site.name));
    if !baygrid_core::ids::is_valid_name(&copy_as) {
        return Err(ApiError::bad(
            "as",
            format!(
                "`{copy_as}` is not a dataset name: use 1-63 lowercase letters, digits and `-`"
            ),
        ));
    }
    let holder = catalog.holder(dataset)?;
    let recipient = catalog
        .tenant_party(&tenant)
        .ok_or_else(|| ApiError::bad("tenant", format!("unknown tenant `{tenant}`")))?;
    if let Some(existing) = catalog.datasets.get(&copy_as) {
        if existing.holder != recipient.name || existing.vault != site.name {
            return Err(ApiError::Conflict(format!(
                "dataset `{copy_as}` exists, held by `{}` at {}: name the copy with `as`",
                existing.holder, existing.vault
            )));
        }
    }
    let request = dataset_flow(
        &catalog,
        dataset,
        FlowEnds {
            holder,
            recipient,
            site,
        },
        baygrid_rules::Mode::Copy,
        &ask.purpose,
        today,
    );
    state.rules.validate(&request).map_err(|e| match e {
        baygrid_rules::RuleError::Invalid { field, message } => ApiError::bad(field, message),
        other => ApiError::Unavailable(other.to_string()),
    })?;
    let id = baygrid_core::new_id("fl").replace('_', "-");
    let answer = crate::zone::decide_recorded(
        &state,
        request,
        holder.name.clone(),
        serde_json::json!({ "flow": id, "contract": contract.id }),
        crate::auth::actor(&who),
    )
    .await?;
    let decision: baygrid_rules::Decision = serde_json::from_value(answer["decision"].clone())
        .map_err(|e| ApiError::Unavailable(format!("decision record: {e}")))?;
    let counted = decision.counts.map(|(category, subjects)| {
        let category = match category {
            baygrid_rules::ExportCategory::Personal => "personal",
            baygrid_rules::ExportCategory::Sensitive => "sensitive",
        };
        (category.to_string(), subjects)
    });
    let flow = FlowView {
        id,
        dataset: dataset.name.clone(),
        version: version.version,
        source_site: dataset.vault.clone(),
        site: site.name.clone(),
        purpose: ask.purpose,
        contract: contract.id,
        tenant,
        holder: holder.name.clone(),
        recipient: recipient.name.clone(),
        copy_as,
        state: if decision.allowed {
            FlowState::Pending
        } else {
            FlowState::Denied
        },
        counted: if decision.allowed { counted } else { None },
        decision,
        upload: version.upload,
        files: version.files,
        requested_at: millis_to_rfc3339(state.now()),
        claimed_by: None,
        claimed_at_ms: None,
        finished_at: None,
        error: None,
    };
    save(&state, &flow, &who).await?;
    Ok((StatusCode::CREATED, Json(flow)))
}

/// The copies the caller is a party to (operators and regulators: all).
#[utoipa::path(get, path = "/api/v1/flows", responses((status = 200, body = [FlowView])), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, who: Principal) -> Json<Vec<FlowView>> {
    Json(
        state
            .catalog()
            .flows
            .values()
            .filter(|f| sees(&who, f))
            .cloned()
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/v1/flows/{id}", params(("id" = String, Path)), responses((status = 200, body = FlowView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<FlowView>> {
    state
        .catalog()
        .flows
        .get(&id)
        .filter(|f| sees(&who, f))
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no flow `{id}`")))
}

/// Whether an agent at `site` may be handed this copy now: only an allowed one not yet
/// done (pending, or claimed and unreported for too long), out of that site's vault.
/// Nothing else ever reaches an agent, so a denied flow never moves a byte.
fn claimable(flow: &FlowView, site: &str, now: i64) -> bool {
    flow.decision.allowed
        && flow.source_site == site
        && (flow.state == FlowState::Pending
            || flow.state == FlowState::Copying
                && flow.claimed_at_ms.is_some_and(|t| now - t > RECLAIM_MS))
}

/// Claims the copies out of `cluster`'s site for its agent: pending ones, and ones another
/// claim left unreported for too long.
pub(crate) async fn claim(
    state: &AppState,
    cluster: &str,
    who: &Principal,
) -> ApiResult<Vec<FlowTask>> {
    let catalog = state.catalog();
    let Some(site) = catalog.clusters.get(cluster).map(|c| c.site.clone()) else {
        return Ok(vec![]);
    };
    let now = state.now();
    let ready = |f: &FlowView| claimable(f, &site, now);
    if !catalog.flows.values().any(ready) {
        return Ok(vec![]);
    }
    let _serial = state.zone_writes.lock().await;
    let catalog = state.catalog();
    let mut tasks = Vec::new();
    for flow in catalog.flows.values().filter(|f| ready(f)) {
        let mut claimed = flow.clone();
        claimed.state = FlowState::Copying;
        claimed.claimed_by = Some(cluster.to_string());
        claimed.claimed_at_ms = Some(now);
        // every claim written, then the catalog reloaded once
        let body = serde_json::to_value(&claimed)
            .map_err(|e| ApiError::Unavailable(format!("flow `{}`: {e}", claimed.id)))?;
        state
            .store
            .put_catalog(
                "flow",
                claimed.id.clone(),
                Some(claimed.holder.clone()),
                body,
                crate::auth::actor(who),
                now,
            )
            .await?;
        tasks.push(FlowTask {
            id: flow.id.clone(),
            dataset: flow.dataset.clone(),
            upload: flow.upload.clone(),
            files: flow.files.clone(),
            source_url: state.config.vault_url(&flow.source_site),
            destination_url: state.config.vault_url(&flow.site),
            copy_as: flow.copy_as.clone(),
            copy_upload: flow.id.clone(),
        });
    }
    state.reload_catalog().await?;
    Ok(tasks)
}

/// The agent reports a copy: done registers it as the recipient's dataset in the
/// destination vault; failed takes the flow back out of the holder's totals.
#[utoipa::path(post, path = "/api/v1/agent/flows/{id}/report", params(("id" = String, Path)), request_body = FlowReport, responses((status = 200, body = FlowView), (status = 403, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn report(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    JsonBody(report): JsonBody<FlowReport>,
) -> ApiResult<Json<FlowView>> {
    let cluster = match (who.role, &who.subject) {
        (Role::Agent, Some(cluster)) => cluster.clone(),
        _ => {
            return Err(ApiError::Forbidden(
                "only an agent token may report a copy".into(),
            ))
        }
    };
    let _serial = state.zone_writes.lock().await;
    let catalog = state.catalog();
    let mut flow = catalog
        .flows
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no flow `{id}`")))?;
    if flow.state != FlowState::Copying || flow.claimed_by.as_deref() != Some(cluster.as_str()) {
        return Err(ApiError::Conflict(format!(
            "flow `{id}` is not being copied by `{cluster}`"
        )));
    }
    let now = state.now();
    flow.finished_at = Some(millis_to_rfc3339(now));
    if report.ok {
        let source = catalog
            .datasets
            .get(&flow.dataset)
            .ok_or_else(|| ApiError::Unavailable(format!("dataset `{}` is gone", flow.dataset)))?;
        register_copy(&state, &catalog, &flow, source, &who).await?;
        flow.state = FlowState::Done;
    } else {
        flow.state = FlowState::Failed;
        flow.error = Some(report.error.unwrap_or_else(|| "no reason given".into()));
        let year = chrono::DateTime::parse_from_rfc3339(&flow.requested_at)
            .map(|t| t.year() as i64)
            .map_err(|e| ApiError::Unavailable(format!("flow `{id}` requested_at: {e}")))?;
        state
            .store
            .compensate_flow(
                flow.holder.clone(),
                year,
                flow.counted.clone().map(|(c, n)| (c, n as i64)),
                crate::auth::actor(&who),
                now,
                serde_json::json!({
                    "flow": flow.id,
                    "exporter": flow.holder,
                    "dataset": flow.dataset,
                    "counted": flow.counted,
                    "error": flow.error,
                }),
            )
            .await?;
    }
    save(&state, &flow, &who).await?;
    Ok(Json(flow))
}

/// The finished copy as the recipient's dataset at the destination: the source's facts,
/// now held by the recipient, collected abroad when it crossed a border, and arrived under
/// the contract kind the decision relied on.
async fn register_copy(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    flow: &FlowView,
    source: &DatasetSpec,
    who: &Principal,
) -> ApiResult<()> {
    let jurisdiction = |site: &str| catalog.sites.get(site).map(|s| s.jurisdiction);
    let crossed = jurisdiction(&flow.source_site) != jurisdiction(&flow.site);
    let arrived_under = flow.decision.contract_used().or(source.arrived_under);
    let copy = DatasetSpec {
        name: flow.copy_as.clone(),
        holder: flow.recipient.clone(),
        vault: flow.site.clone(),
        collected_abroad: source.collected_abroad || crossed,
        arrived_under,
        // the individuals the source is counted as holding go with the copy
        subjects: catalog.subjects_of(source),
        ..source.clone()
    };
    let body = serde_json::to_value(&copy).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    crate::catalog::put(
        state,
        "dataset",
        &copy.name,
        Some(copy.holder.clone()),
        body,
        who,
    )
    .await?;
    let versions = state
        .catalog()
        .versions
        .get(&copy.name)
        .cloned()
        .unwrap_or_default();
    let version = DatasetVersion {
        dataset: copy.name.clone(),
        version: versions.last().map(|v| v.version + 1).unwrap_or(1),
        upload: flow.id.clone(),
        rows: flow.files.iter().map(|f| f.rows).sum(),
        bytes: flow.files.iter().map(|f| f.bytes).sum(),
        files: flow.files.clone(),
        subjects: None,
        created_at: millis_to_rfc3339(state.now()),
    };
    let body = serde_json::to_value(&version).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    crate::catalog::put(
        state,
        "dataset_version",
        &format!("{}@{:06}", copy.name, version.version),
        Some(copy.holder.clone()),
        body,
        who,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(allowed: bool, state: FlowState, claimed_at_ms: Option<i64>, site: &str) -> FlowView {
        let pack = baygrid_rules::RulePack::load().unwrap();
        let mut decision = pack
            .decide(
                &toml::from_str(include_str!(
                    "../../../examples/flows/sz-clinic-to-hk-lab.toml"
                ))
                .unwrap(),
            )
            .unwrap();
        decision.allowed = allowed;
        FlowView {
            id: "fl-1".into(),
            dataset: "d".into(),
            version: 1,
            source_site: site.into(),
            site: "hk-cyberport".into(),
            purpose: "research".into(),
            contract: "ct-1".into(),
            tenant: "t".into(),
            holder: "h".into(),
            recipient: "r".into(),
            copy_as: "d-hk".into(),
            state,
            decision,
            counted: None,
            upload: "u".into(),
            files: vec![],
            requested_at: "2026-11-28T00:00:00Z".into(),
            claimed_by: None,
            claimed_at_ms,
            finished_at: None,
            error: None,
        }
    }

    fn state() -> impl Strategy<Value = FlowState> {
        prop_oneof![
            Just(FlowState::Denied),
            Just(FlowState::Pending),
            Just(FlowState::Copying),
            Just(FlowState::Done),
            Just(FlowState::Failed),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever a record says, a flow the rules denied, or one that is over, is never
        /// handed to an agent; nor is one out of another site's vault.
        #[test]
        fn a_denied_flow_never_reaches_an_agent(
            allowed in any::<bool>(),
            state in state(),
            claimed in prop::option::of(0i64..1_000_000),
            here in any::<bool>(),
            now in 0i64..2_000_000,
        ) {
            let site = if here { "shenzhen-qianhai" } else { "macao" };
            let f = flow(allowed, state, claimed, site);
            let handed = claimable(&f, "shenzhen-qianhai", now);
            if !allowed || !here || matches!(state, FlowState::Denied | FlowState::Done | FlowState::Failed) {
                prop_assert!(!handed);
            }
            if allowed && here && state == FlowState::Pending {
                prop_assert!(handed);
            }
        }
    }
}
