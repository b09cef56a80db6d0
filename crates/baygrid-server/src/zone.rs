//! The data zone at the API: evidence records, and cross-border flow decisions by the GBA
//! rule pack over the exchange's own state (parties, evidence, export totals).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{
    DatasetSpec, DatasetVersion, DatasetView, EvidenceRecord, FlowAsk, FlowDecisionView,
    NewVersion, VaultView,
};
use baygrid_core::{Jurisdiction, Principal, Role};
use baygrid_rules::{ExportCategory, Exporter, Flow, FlowRequest, Recipient, Region, RulePack};
use baygrid_store::{FlowRecord, ObligationFilter, Standing};
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
pub(crate) fn may_act_for(who: &Principal, party: &str) -> ApiResult<()> {
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
    crate::catalog::put_json(
        &state,
        "evidence",
        &record.id,
        Some(record.exporter.clone()),
        &record,
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

// ---- datasets: a holder registers, every role reads the metadata ----

fn dataset_view(
    catalog: &crate::catalog::CatalogSnapshot,
    spec: &DatasetSpec,
) -> ApiResult<DatasetView> {
    let site = catalog.sites.get(&spec.vault).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "dataset `{}` names vault `{}`, which is not a site",
            spec.name, spec.vault
        ))
    })?;
    Ok(DatasetView {
        spec: spec.clone(),
        jurisdiction: site.jurisdiction,
        versions: catalog
            .versions
            .get(&spec.name)
            .cloned()
            .unwrap_or_default(),
    })
}

/// Every site's vault: where holders upload and agents read. Operators, data holders and
/// agents see them; tenants and regulators work through the exchange.
#[utoipa::path(get, path = "/api/v1/vaults", responses((status = 200, body = [VaultView]), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn list_vaults(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<VaultView>>> {
    require(&who, &[Role::Operator, Role::DataHolder, Role::Agent])?;
    Ok(Json(
        state
            .catalog()
            .sites
            .values()
            .map(|site| VaultView {
                site: site.name.clone(),
                jurisdiction: site.jurisdiction,
                url: state.config.vault_url(&site.name),
            })
            .collect(),
    ))
}

/// Records an upload as the dataset's next version, once its files are in the vault (the
/// holder writes them there; the exchange never carries the bytes). Written to the audit
/// log with every file's digest.
#[utoipa::path(post, path = "/api/v1/datasets/{name}/versions", params(("name" = String, Path)), request_body = NewVersion, responses((status = 201, body = DatasetVersion), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 404, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn add_version(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    JsonBody(upload): JsonBody<NewVersion>,
) -> ApiResult<(StatusCode, Json<DatasetVersion>)> {
    let catalog = state.catalog();
    let spec = catalog
        .datasets
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset `{name}`")))?;
    may_act_for(&who, &spec.holder)?;
    upload
        .validate()
        .map_err(|e| ApiError::bad(e.field, e.message))?;
    if let Some(i) = upload.files.iter().position(|f| f.format == "file") {
        return Err(ApiError::bad(
            format!("files[{i}].format"),
            "an upload is csv or parquet, checked against the schema",
        ));
    }
    let _numbering = state.zone_writes.lock().await;
    let catalog = state.catalog();
    let existing = catalog.versions.get(&name).cloned().unwrap_or_default();
    if existing.iter().any(|v| v.upload == upload.upload) {
        return Err(ApiError::Conflict(format!(
            "upload `{}` is already a version of `{name}`",
            upload.upload
        )));
    }
    // the individuals the files hold: the rules count them where they are more than the
    // holder declared
    match (&spec.subject_column, upload.subjects) {
        (Some(column), None) => {
            return Err(ApiError::bad(
                "subjects",
                format!("count the distinct values of `{column}` in the files: `{name}`'s individuals are counted from its data"),
            ))
        }
        (None, Some(_)) => {
            return Err(ApiError::bad(
                "subjects",
                format!("`{name}` names no subject column to count individuals by"),
            ))
        }
        _ => {}
    }
    let version = put_version(
        &state,
        &name,
        &spec.holder,
        upload.upload,
        upload.files,
        upload.subjects,
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(version)))
}

/// Records files already in a dataset's vault as its next version (callers that number
/// concurrently hold `zone_writes`).
pub(crate) async fn put_version(
    state: &AppState,
    dataset: &str,
    holder: &str,
    upload: String,
    files: Vec<baygrid_api::VersionFile>,
    subjects: Option<u64>,
    who: &Principal,
) -> ApiResult<DatasetVersion> {
    let last = state
        .catalog()
        .versions
        .get(dataset)
        .and_then(|v| v.last().map(|v| v.version));
    let version = DatasetVersion {
        dataset: dataset.to_string(),
        version: last.map(|v| v + 1).unwrap_or(1),
        upload,
        rows: files.iter().map(|f| f.rows).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        subjects,
        created_at: baygrid_core::millis_to_rfc3339(state.now()),
    };
    crate::catalog::put_json(
        state,
        "dataset_version",
        &format!("{dataset}@{:06}", version.version),
        Some(holder.to_string()),
        &version,
        who,
    )
    .await?;
    Ok(version)
}

/// The catalog of datasets: metadata, for every role.
#[utoipa::path(get, path = "/api/v1/datasets", responses((status = 200, body = [DatasetView])), security(("bearer" = [])))]
pub async fn list_datasets(
    State(state): State<AppState>,
    _who: Principal,
) -> ApiResult<Json<Vec<DatasetView>>> {
    let catalog = state.catalog();
    let views = catalog
        .datasets
        .values()
        .map(|spec| dataset_view(&catalog, spec))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(views))
}

/// One dataset's metadata.
#[utoipa::path(get, path = "/api/v1/datasets/{name}", params(("name" = String, Path)), responses((status = 200, body = DatasetView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get_dataset(
    State(state): State<AppState>,
    _who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<DatasetView>> {
    let catalog = state.catalog();
    let spec = catalog
        .datasets
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset `{name}`")))?;
    Ok(Json(dataset_view(&catalog, spec)?))
}

/// Registers a dataset (or changes its registration) in the holder's vault; written to the
/// audit log. Only the holder (or an operator) may, and a dataset never changes holder or
/// vault: moving data is a flow.
#[utoipa::path(post, path = "/api/v1/datasets", request_body = DatasetSpec, responses((status = 201, body = DatasetView), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody), (status = 409, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn register_dataset(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(spec): JsonBody<DatasetSpec>,
) -> ApiResult<(StatusCode, Json<DatasetView>)> {
    spec.validate()
        .map_err(|e| ApiError::bad(e.field, e.message))?;
    if !spec.derived_from.is_empty() {
        return Err(ApiError::bad(
            "derived_from",
            "is set by the exchange on a job's outputs",
        ));
    }
    let catalog = state.catalog();
    if !catalog.parties.contains_key(&spec.holder) {
        return Err(ApiError::bad(
            "holder",
            format!("unknown party `{}`", spec.holder),
        ));
    }
    may_act_for(&who, &spec.holder)?;
    if !catalog.sites.contains_key(&spec.vault) {
        return Err(ApiError::bad(
            "vault",
            format!("unknown site `{}`: every site has a vault", spec.vault),
        ));
    }
    if let Some(existing) = catalog.datasets.get(&spec.name) {
        if existing.holder != spec.holder || existing.vault != spec.vault {
            return Err(ApiError::Conflict(format!(
                "dataset `{}` is held by `{}` in vault `{}`; a dataset keeps its holder and vault (moving data is a flow)",
                spec.name, existing.holder, existing.vault
            )));
        }
    }
    let view = dataset_view(&catalog, &spec)?;
    crate::catalog::put_json(
        &state,
        "dataset",
        &spec.name,
        Some(spec.holder.clone()),
        &spec,
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
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
    let today = today(&state)?;
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
            move |personal, sensitive| {
                decide_with_totals(&pack, request, personal, sensitive, serde_json::Value::Null)
            },
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
    extra: serde_json::Value,
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
    let mut payload = serde_json::json!({
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
    if let (Some(payload), serde_json::Value::Object(extra)) = (payload.as_object_mut(), extra) {
        payload.extend(extra);
    }
    let answer = serde_json::to_value(&view).map_err(|e| e.to_string())?;
    let obligations = if view.decision.allowed {
        view.decision
            .obligations
            .iter()
            .map(|o| {
                (
                    o.id.clone(),
                    o.rule.clone(),
                    o.due.map(|d| d.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(FlowRecord {
        payload,
        counts,
        answer,
        obligations,
        exporter: request.exporter.name.clone(),
        recipient: request.recipient.name.clone(),
        dataset: request.data.name.clone(),
    })
}

/// Who a dataset flow is between and where it goes.
pub(crate) struct FlowEnds<'a> {
    pub holder: &'a baygrid_core::Party,
    pub recipient: &'a baygrid_core::Party,
    pub site: &'a baygrid_core::Site,
}

/// The flow of `dataset` from its holder to the recipient at the site, as the rules see
/// it, on `today`'s evidence between the two; the totals are filled in by whoever decides.
pub(crate) fn dataset_flow(
    catalog: &crate::catalog::CatalogSnapshot,
    dataset: &DatasetSpec,
    ends: FlowEnds<'_>,
    mode: baygrid_rules::Mode,
    purpose: &str,
    today: chrono::NaiveDate,
) -> FlowRequest {
    let FlowEnds {
        holder,
        recipient,
        site,
    } = ends;
    FlowRequest {
        today,
        exporter: Exporter {
            name: holder.name.clone(),
            jurisdiction: region(holder.jurisdiction),
            city: holder.city.clone(),
            ciio: holder.ciio,
        },
        recipient: Recipient {
            name: recipient.name.clone(),
            jurisdiction: region(recipient.jurisdiction),
            city: recipient.city.clone(),
        },
        data: baygrid_rules::DataFacts {
            subjects: catalog.subjects_of(dataset),
            ..dataset.facts()
        },
        flow: Flow {
            mode,
            purpose: purpose.to_string(),
            destination: region(site.jurisdiction),
            destination_city: site.city.clone(),
            exported_personal: 0,
            exported_sensitive: 0,
        },
        evidence: catalog
            .evidence
            .values()
            .filter(|r| r.exporter == holder.name && r.recipient == recipient.name)
            .map(EvidenceRecord::evidence)
            .collect(),
    }
}

/// Today, from the server's clock.
pub(crate) fn today(state: &AppState) -> ApiResult<chrono::NaiveDate> {
    Ok(chrono::DateTime::from_timestamp_millis(state.now())
        .ok_or_else(|| ApiError::Unavailable("the clock is out of range".into()))?
        .date_naive())
}

/// For a job that reads datasets: every site its inputs may not be copied to under the rule
/// pack, with why (the input, the rules that deny, and what would allow it). A site that
/// holds an input in its own vault needs no flow for it. The decisions are previews on
/// today's totals and evidence: nothing is counted or recorded.
///
/// An unknown input, or a request the rules refuse as malformed, is an error naming the
/// spec field.
pub(crate) async fn inputs_denied(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    tenant: &str,
    spec: &baygrid_core::JobSpec,
) -> ApiResult<std::collections::BTreeMap<String, String>> {
    let mut denied: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    if spec.inputs.is_empty() {
        return Ok(Default::default());
    }
    let recipient = catalog.tenant_party(tenant).ok_or_else(|| {
        ApiError::bad(
            "tenant",
            format!("unknown tenant `{tenant}` (or its party)"),
        )
    })?;
    let purpose = spec.purpose.clone().unwrap_or_default();
    let today = today(state)?;
    for (i, input) in spec.inputs.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let dataset = catalog
            .datasets
            .get(input)
            .ok_or_else(|| ApiError::bad(&field, format!("unknown dataset `{input}`")))?;
        if catalog.versions.get(input).is_none_or(|v| v.is_empty()) {
            return Err(ApiError::bad(
                &field,
                format!("dataset `{input}` has no uploaded version yet"),
            ));
        }
        let holder = catalog.holder(dataset)?;
        let (personal, sensitive) = state
            .store
            .export_totals(&holder.name, today.year() as i64)
            .await?;
        let own = holder.name == recipient.name;
        for site in catalog.sites.values() {
            // the law first, then the holder's consent: a contract for this site and purpose
            let contracted =
                own || has_contract(catalog, tenant, input, &site.name, &purpose, today);
            let no_contract = || {
                format!(
                    "input `{input}`: no active copy or remote_access contract with {} for {} at {}",
                    holder.name, purpose, site.name
                )
            };
            if site.name == dataset.vault {
                if !contracted {
                    denied
                        .entry(site.name.clone())
                        .or_default()
                        .push(no_contract());
                }
                continue;
            }
            let mut request = dataset_flow(
                catalog,
                dataset,
                FlowEnds {
                    holder,
                    recipient,
                    site,
                },
                baygrid_rules::Mode::Copy,
                &purpose,
                today,
            );
            request.flow.exported_personal = personal.max(0) as u64;
            request.flow.exported_sensitive = sensitive.max(0) as u64;
            let decision = state.rules.decide(&request).map_err(|e| match e {
                baygrid_rules::RuleError::Invalid { field: f, message } => {
                    ApiError::bad(&field, format!("`{input}`: {f}: {message}"))
                }
                other => ApiError::Unavailable(other.to_string()),
            })?;
            if !decision.allowed {
                let why = format!(
                    "input `{input}` may not be copied from {} to {} ({}): {}",
                    dataset.vault,
                    site.name,
                    site.jurisdiction,
                    decision.why_denied()
                );
                denied.entry(site.name.clone()).or_default().push(why);
            } else if !contracted {
                denied
                    .entry(site.name.clone())
                    .or_default()
                    .push(no_contract());
            }
        }
    }
    Ok(denied
        .into_iter()
        .map(|(site, reasons)| (site, reasons.join("; ")))
        .collect())
}

/// What an agent stages for a job: each input's latest version in its vault, and whether
/// the job must run with no network (it reads personal, important or core data). An input
/// that has gone from the catalog is left out; the agent then fails the job for it.
pub(crate) fn staged_inputs(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    spec: &baygrid_core::JobSpec,
) -> (Vec<baygrid_api::StagedInput>, bool) {
    let mut staged = Vec::new();
    let mut no_network = false;
    for input in &spec.inputs {
        let Some(dataset) = catalog.datasets.get(input) else {
            continue;
        };
        no_network |= dataset.personal != baygrid_rules::Personal::None
            || dataset.level != baygrid_rules::Level::General;
        if let Some(version) = catalog.versions.get(input).and_then(|v| v.last()) {
            staged.push(baygrid_api::StagedInput {
                dataset: input.clone(),
                version: version.version,
                vault_url: state.config.vault_url(&dataset.vault),
                upload: version.upload.clone(),
                files: version.files.clone(),
            });
        }
    }
    (staged, no_network)
}

/// Decides, counts and records the copy of each of a job's inputs to the site it was
/// placed at (an input already in that site's vault needs none), in the writer's
/// transaction per input, so the export totals stay exact under concurrent flows. Returns
/// why not when a flow is now denied (the totals moved since the quote); the job then
/// stays queued and the next cycle's quote rules the site out.
pub(crate) async fn record_input_flows(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    job_id: &str,
    tenant: &str,
    spec: &baygrid_core::JobSpec,
    site_name: &str,
) -> ApiResult<Option<String>> {
    let Some(recipient) = catalog.tenant_party(tenant) else {
        return Ok(Some(format!("tenant `{tenant}` has no party")));
    };
    let Some(site) = catalog.sites.get(site_name) else {
        return Ok(Some(format!("site `{site_name}` is gone")));
    };
    let today = today(state)?;
    for input in &spec.inputs {
        let Some(dataset) = catalog.datasets.get(input) else {
            return Ok(Some(format!("dataset `{input}` is gone")));
        };
        if dataset.vault == site.name {
            continue;
        }
        let Some(holder) = catalog.parties.get(&dataset.holder) else {
            return Ok(Some(format!("holder `{}` is gone", dataset.holder)));
        };
        let request = dataset_flow(
            catalog,
            dataset,
            FlowEnds {
                holder,
                recipient,
                site,
            },
            baygrid_rules::Mode::Copy,
            spec.purpose.as_deref().unwrap_or_default(),
            today,
        );
        let answer = decide_recorded(
            state,
            request,
            holder.name.clone(),
            serde_json::json!({ "job": job_id }),
            "scheduler".to_string(),
        )
        .await?;
        if answer["decision"]["allowed"] != serde_json::Value::Bool(true) {
            return Ok(Some(format!(
                "input `{input}` may no longer be copied to {}: denied by {}",
                site.name, answer["decision"]["denied_by"]
            )));
        }
    }
    Ok(None)
}

/// Decides a flow on the exporter's totals as they stand in the writer's transaction, and
/// records it (with `extra` in its audit entry) and counts it in the same transaction.
/// Returns the decision as [`FlowDecisionView`] JSON.
pub(crate) async fn decide_recorded(
    state: &AppState,
    request: FlowRequest,
    exporter: String,
    extra: serde_json::Value,
    actor: String,
) -> ApiResult<serde_json::Value> {
    let pack = state.rules.clone();
    let year = request.today.year() as i64;
    Ok(state
        .store
        .decide_flow(
            exporter,
            year,
            actor,
            state.now(),
            move |personal, sensitive| {
                decide_with_totals(&pack, request, personal, sensitive, extra)
            },
        )
        .await?)
}

/// Whether a tenant holds an active contract to use a dataset at a site for a purpose, in a
/// mode that brings the data to a job there (copy, or remote access).
fn has_contract(
    catalog: &crate::catalog::CatalogSnapshot,
    tenant: &str,
    dataset: &str,
    site: &str,
    purpose: &str,
    today: chrono::NaiveDate,
) -> bool {
    catalog.contracts.values().any(|c| {
        c.tenant == tenant
            && c.dataset == dataset
            && c.state == baygrid_api::ContractState::Active
            && matches!(
                c.request.mode,
                baygrid_api::OfferMode::Copy | baygrid_api::OfferMode::RemoteAccess
            )
            && c.request.site == site
            && c.request.purpose == purpose
            && c.expires > today
    })
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ObligationQuery {
    /// due | overdue | standing; all when absent.
    pub status: Option<String>,
    /// At most this many, oldest first (default 1000, at most 100,000).
    pub limit: Option<i64>,
    /// The next page: only those after this id (the previous page's last).
    pub after: Option<i64>,
}

/// The obligations allowed flows brought, oldest first, a page at a time, with where each
/// stands today: operators and regulators see all; a data holder or tenant those of its
/// party.
#[utoipa::path(get, path = "/api/v1/obligations", params(ObligationQuery), responses((status = 200, body = [baygrid_api::ObligationView]), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn obligations(
    State(state): State<AppState>,
    who: Principal,
    crate::body::QueryParams(query): crate::body::QueryParams<ObligationQuery>,
) -> ApiResult<Json<Vec<baygrid_api::ObligationView>>> {
    let standing = match query.status.as_deref() {
        Some(status) => Some(
            Standing::ALL
                .into_iter()
                .find(|s| s.as_str() == status)
                .ok_or_else(|| {
                    ApiError::bad(
                        "status",
                        format!("`{status}`: use due, overdue or standing"),
                    )
                })?,
        ),
        None => None,
    };
    let limit = crate::paging::limit(query.limit)?;
    let party = match who.role {
        Role::Operator | Role::Regulator => None,
        Role::DataHolder => Some(who.subject.clone().unwrap_or_default()),
        Role::Tenant => {
            let tenant = who.subject.clone().unwrap_or_default();
            Some(
                state
                    .catalog()
                    .tenant_party(&tenant)
                    .map(|p| p.name.clone())
                    .unwrap_or(tenant),
            )
        }
        _ => {
            return Err(ApiError::Forbidden(format!(
                "role {} has no obligations to read",
                who.role
            )))
        }
    };
    let today = today(&state)?.to_string();
    let rows = state
        .store
        .obligations(&ObligationFilter {
            party: party.as_deref(),
            standing: standing.map(|s| (s, today.as_str())),
            after: query.after,
            limit,
        })
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| {
                let status = Standing::of(&r.due, &today).as_str();
                baygrid_api::ObligationView {
                    id: r.id,
                    decided_at: baygrid_core::millis_to_rfc3339(r.decided_ms),
                    exporter: r.exporter,
                    recipient: r.recipient,
                    dataset: r.dataset,
                    obligation: r.obligation,
                    rule: r.rule,
                    due: (!r.due.is_empty()).then_some(r.due),
                    status: status.to_string(),
                }
            })
            .collect(),
    ))
}

/// The derived dataset a protected job's outputs become: `<job name>-<id suffix>` in the
/// vault of the site it runs at.
pub(crate) fn outputs_target(
    state: &AppState,
    catalog: &crate::catalog::CatalogSnapshot,
    job: &baygrid_store::JobRecord,
) -> Option<baygrid_api::OutputsTarget> {
    let cluster = &job.allocation.as_ref()?.cluster;
    let site = &catalog.clusters.get(cluster)?.site;
    Some(baygrid_api::OutputsTarget {
        vault_url: state.config.vault_url(site),
        dataset: derived_name(job),
    })
}

fn derived_name(job: &baygrid_store::JobRecord) -> String {
    let id = job.id.to_string();
    let suffix = &id[id.len().saturating_sub(8)..];
    let mut name = job.spec.name.clone();
    name.truncate(63 - 9);
    format!("{name}-{suffix}")
}

/// Registers a protected job's outputs (and logs) as a dataset at its site: held by the
/// tenant's party, carrying the strictest classification of its inputs, for the job's
/// purpose; its first version is the files the agent wrote to the vault.
pub(crate) async fn register_outputs(
    state: &AppState,
    job: &baygrid_store::JobRecord,
    cluster: &str,
    files: &[baygrid_api::VersionFile],
    who: &Principal,
) -> ApiResult<String> {
    let catalog = state.catalog();
    let site = catalog
        .clusters
        .get(cluster)
        .map(|c| c.site.clone())
        .ok_or_else(|| ApiError::Unavailable(format!("cluster `{cluster}` is gone")))?;
    let holder = catalog
        .tenant_party(&job.tenant)
        .map(|p| p.name.clone())
        .ok_or_else(|| ApiError::Unavailable(format!("tenant `{}` is gone", job.tenant)))?;
    let derived = Derived {
        name: derived_name(job),
        holder,
        site,
        inputs: job.spec.inputs.clone(),
        purpose: job.spec.purpose.clone().unwrap_or_default(),
        personal: None,
        upload: job.id.to_string(),
    };
    register_derived(state, derived, files, who).await
}

/// A dataset derived from others at a site: a protected job's outputs, or a party's copy
/// of a trained model.
pub(crate) struct Derived {
    pub name: String,
    pub holder: String,
    pub site: String,
    pub inputs: Vec<String>,
    pub purpose: String,
    /// The personal profile when the rules decided it (a model is not personal data);
    /// otherwise the strictest of the inputs'.
    pub personal: Option<baygrid_rules::Personal>,
    /// The upload its files were written under.
    pub upload: String,
}

/// Registers a derived dataset at its site with the strictest level of its inputs; its
/// first version is the files already written to the site's vault. Registering again
/// (a resent report) finds the version recorded and changes nothing.
pub(crate) async fn register_derived(
    state: &AppState,
    derived: Derived,
    files: &[baygrid_api::VersionFile],
    who: &Principal,
) -> ApiResult<String> {
    let catalog = state.catalog();
    let Derived {
        name,
        holder,
        site,
        inputs: input_names,
        purpose,
        personal,
        upload,
    } = derived;
    let inputs: Vec<&DatasetSpec> = input_names
        .iter()
        .filter_map(|i| catalog.datasets.get(i))
        .collect();
    let site_jurisdiction = catalog.sites.get(&site).map(|s| s.jurisdiction);
    let rank_level = |l: baygrid_rules::Level| match l {
        baygrid_rules::Level::General => 0,
        baygrid_rules::Level::Important => 1,
        baygrid_rules::Level::Core => 2,
    };
    let rank_personal = |p: baygrid_rules::Personal| match p {
        baygrid_rules::Personal::None => 0,
        baygrid_rules::Personal::Personal => 1,
        baygrid_rules::Personal::Sensitive => 2,
    };
    let for_files = NewVersion {
        upload: upload.clone(),
        files: files.to_vec(),
        subjects: None,
    };
    for_files
        .validate()
        .map_err(|e| ApiError::bad(format!("outputs: {}", e.field), e.message))?;
    let spec = DatasetSpec {
        name: name.clone(),
        holder: holder.clone(),
        vault: site.clone(),
        level: inputs
            .iter()
            .map(|d| d.level)
            .max_by_key(|l| rank_level(*l))
            .unwrap_or(baygrid_rules::Level::General),
        personal: personal.unwrap_or_else(|| {
            inputs
                .iter()
                .map(|d| d.personal)
                .max_by_key(|p| rank_personal(*p))
                .unwrap_or(baygrid_rules::Personal::None)
        }),
        // the same individuals may be in several inputs: the largest is the floor
        subjects: inputs
            .iter()
            .map(|d| catalog.subjects_of(d))
            .max()
            .unwrap_or(0),
        subject_column: None,
        purposes: vec![purpose],
        collected_abroad: inputs.iter().any(|d| {
            d.collected_abroad
                || catalog.sites.get(&d.vault).map(|s| s.jurisdiction) != site_jurisdiction
        }),
        arrived_under: None,
        schema: Vec::new(),
        derived_from: input_names.clone(),
    };
    crate::catalog::put_json(state, "dataset", &name, Some(holder.clone()), &spec, who).await?;
    let recorded = state
        .catalog()
        .versions
        .get(&name)
        .is_some_and(|v| v.iter().any(|v| v.upload == upload));
    if !recorded {
        let _numbering = state.zone_writes.lock().await;
        put_version(state, &name, &holder, upload, files.to_vec(), None, who).await?;
    }
    Ok(name)
}
