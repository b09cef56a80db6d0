//! The data zone at the API: evidence records, and cross-border flow decisions by the GBA
//! rule pack over the exchange's own state (parties, evidence, export totals).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{EvidenceRecord, FlowAsk, FlowDecisionView};
use baygrid_core::{Jurisdiction, Principal, Role};
use baygrid_rules::{ExportCategory, Exporter, Flow, FlowRequest, Recipient, Region, RulePack};
use baygrid_store::FlowRecord;
use chrono::Datelike;

use crate::auth::{actor, require};
use crate::body::JsonBody;
use crate::catalog::check_name;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

fn region(j: Jurisdiction) -> Region {
    match j {
        Jurisdiction::CN => Region::CN,
        Jurisdiction::HK => Region::HK,
        Jurisdiction::MO => Region::MO,
        Jurisdiction::INTL => Region::INTL,
    }
}

/// Operators act for anyone; a data holder only for its own party.
fn may_act_for(who: &Principal, party: &str) -> ApiResult<()> {
    match who.role {
        Role::Operator => Ok(()),
        Role::DataHolder if who.subject.as_deref() == Some(party) => Ok(()),
        Role::DataHolder => Err(ApiError::Forbidden(format!(
            "data holder `{}` may not act for `{party}`",
            who.subject.as_deref().unwrap_or_default()
        ))),
        _ => Err(ApiError::Forbidden(format!(
            "role {} may not do this (allowed: operator, data_holder)",
            who.role
        ))),
    }
}

/// The evidence on record (operators and regulators see all; a data holder its own).
#[utoipa::path(get, path = "/api/v1/evidence", responses((status = 200, body = [EvidenceRecord])), security(("bearer" = [])))]
pub async fn list_evidence(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<EvidenceRecord>>> {
    require(&who, &[Role::Operator, Role::Regulator, Role::DataHolder])?;
    let visible = |record: &&EvidenceRecord| {
        who.role != Role::DataHolder
            || who.subject.as_deref() == Some(record.exporter.as_str())
            || who.subject.as_deref() == Some(record.recipient.as_str())
    };
    Ok(Json(
        state
            .catalog()
            .evidence
            .values()
            .filter(visible)
            .cloned()
            .collect(),
    ))
}

/// Records evidence of a legal basis; written to the audit log as an evidence change.
#[utoipa::path(post, path = "/api/v1/evidence", request_body = EvidenceRecord, responses((status = 201, body = EvidenceRecord), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_evidence(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(mut record): JsonBody<EvidenceRecord>,
) -> ApiResult<(StatusCode, Json<EvidenceRecord>)> {
    may_act_for(&who, &record.exporter)?;
    let catalog = state.catalog();
    for (field, party) in [
        ("exporter", &record.exporter),
        ("recipient", &record.recipient),
    ] {
        if !catalog.parties.contains_key(party) {
            return Err(ApiError::bad(field, format!("unknown party `{party}`")));
        }
    }
    if record.id.is_empty() {
        record.id = baygrid_core::new_id("ev").replace('_', "-");
    }
    check_name("id", &record.id)?;
    if let Some(filed) = record.filed.as_deref().filter(|f| !f.is_empty()) {
        let date = chrono::NaiveDate::parse_from_str(filed, "%Y-%m-%d")
            .map_err(|_| ApiError::bad("filed", format!("`{filed}` is not a date (YYYY-MM-DD)")))?;
        if !matches!(
            record.kind,
            baygrid_rules::EvidenceKind::StandardContract
                | baygrid_rules::EvidenceKind::GbaContractHk
                | baygrid_rules::EvidenceKind::GbaContractMo
        ) {
            return Err(ApiError::bad("filed", "only contracts are filed"));
        }
        if date < record.effective {
            return Err(ApiError::bad(
                "filed",
                "is before the contract takes effect",
            ));
        }
    }
    if record.kind == baygrid_rules::EvidenceKind::SecurityAssessment && record.dataset.is_none() {
        return Err(ApiError::bad(
            "dataset",
            "a security assessment must name the data set it covers",
        ));
    }
    let body = serde_json::to_value(&record).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    crate::catalog::put(
        &state,
        "evidence",
        &record.id,
        Some(record.exporter.clone()),
        body,
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

/// Decides a flow by the GBA rule pack, on today's date, the exporter's totals for the year
/// and the evidence on record; the decision goes to the audit log, and a flow that counts
/// adds to the totals, in one transaction.
#[utoipa::path(post, path = "/api/v1/flows/decide", request_body = FlowAsk, responses((status = 200, body = FlowDecisionView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn decide(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(ask): JsonBody<FlowAsk>,
) -> ApiResult<Json<FlowDecisionView>> {
    may_act_for(&who, &ask.exporter)?;
    let catalog = state.catalog();
    let party = |field: &str, name: &str| {
        catalog
            .parties
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::bad(field, format!("unknown party `{name}`")))
    };
    let exporter = party("exporter", &ask.exporter)?;
    let recipient = party("recipient", &ask.recipient)?;
    let now = state.now();
    let today = chrono::DateTime::from_timestamp_millis(now)
        .ok_or_else(|| ApiError::Unavailable("the clock is out of range".into()))?
        .date_naive();
    let evidence = catalog
        .evidence
        .values()
        .filter(|r| r.exporter == exporter.name && r.recipient == recipient.name)
        .map(EvidenceRecord::evidence)
        .collect();
    let request = FlowRequest {
        today,
        exporter: Exporter {
            name: exporter.name.clone(),
            jurisdiction: region(exporter.jurisdiction),
            city: exporter.city.clone(),
            ciio: exporter.ciio,
        },
        recipient: Recipient {
            name: recipient.name.clone(),
            jurisdiction: region(recipient.jurisdiction),
            city: recipient.city.clone(),
        },
        data: ask.data,
        flow: Flow {
            mode: ask.flow.mode,
            purpose: ask.flow.purpose,
            destination: ask.flow.destination,
            destination_city: ask.flow.destination_city,
            exported_personal: 0,
            exported_sensitive: 0,
        },
        evidence,
    };
    // a bad request is refused before anything is written
    state.rules.validate(&request).map_err(rule_error)?;
    let pack = state.rules.clone();
    let who_acts = actor(&who);
    let payload = state
        .store
        .decide_flow(
            exporter.name.clone(),
            today.year() as i64,
            who_acts,
            now,
            move |personal, sensitive| decide_with_totals(&pack, request, personal, sensitive),
        )
        .await?;
    let view: FlowDecisionView = serde_json::from_value(payload)
        .map_err(|e| ApiError::Unavailable(format!("decision record: {e}")))?;
    Ok(Json(view))
}

fn rule_error(e: baygrid_rules::RuleError) -> ApiError {
    match e {
        baygrid_rules::RuleError::Invalid { field, message } => ApiError::bad(field, message),
        other => ApiError::Unavailable(other.to_string()),
    }
}

/// The decision on the totals as they stand in the writer's transaction, and its record.
fn decide_with_totals(
    pack: &RulePack,
    mut request: FlowRequest,
    personal: i64,
    sensitive: i64,
) -> Result<FlowRecord, String> {
    request.flow.exported_personal = personal.max(0) as u64;
    request.flow.exported_sensitive = sensitive.max(0) as u64;
    let decision = pack.decide(&request).map_err(|e| e.to_string())?;
    let counts = decision.counts.map(|(category, subjects)| {
        let category = match category {
            ExportCategory::Personal => "personal",
            ExportCategory::Sensitive => "sensitive",
        };
        (category.to_string(), subjects as i64)
    });
    let view = FlowDecisionView {
        today: request.today.to_string(),
        exported_personal: personal,
        exported_sensitive: sensitive,
        decision,
    };
    // the audit entry: parties, data set, the decision and its reasons; no personal data
    let payload = serde_json::json!({
        "exporter": request.exporter.name,
        "recipient": request.recipient.name,
        "dataset": request.data.name,
        "mode": request.flow.mode,
        "destination": request.flow.destination,
        "allowed": view.decision.allowed,
        "rules": view.decision.rules,
        "denied_by": view.decision.denied_by,
        "obligations": view.decision.obligations,
        "counted": counts,
    });
    let answer = serde_json::to_value(&view).map_err(|e| e.to_string())?;
    Ok(FlowRecord {
        payload,
        counts,
        answer,
    })
}
