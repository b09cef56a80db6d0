//! The agent protocol: register, heartbeat (capacity and lease renewal), lease (take placed
//! jobs), report (status and output, fenced by the lease's epoch).

use axum::extract::{Path, State};
use axum::Json;
use baygrid_api::{
    AgentStatus, HeartbeatRequest, HeartbeatResponse, JobView, LeaseGrant, LeaseRequest,
    LeaseResponse, RegisterRequest, RegisterResponse, ReportRequest,
};
use baygrid_core::{JobState, Principal, Role};
use baygrid_store::{LeaseReport, LogLine, Report};

use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The cluster an agent token is bound to.
pub(crate) fn agent_cluster(who: &Principal) -> ApiResult<String> {
    match (who.role, &who.subject) {
        (Role::Agent, Some(cluster)) => Ok(cluster.clone()),
        _ => Err(ApiError::Forbidden(
            "only an agent token may use the agent protocol".into(),
        )),
    }
}

fn ttl_ms(state: &AppState) -> i64 {
    state.config.lease_ttl.as_millis() as i64
}

/// An agent announces itself and its cluster's capacity.
#[utoipa::path(post, path = "/api/v1/agent/register", request_body = RegisterRequest, responses((status = 200, body = RegisterResponse), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn register(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(request): JsonBody<RegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    let cluster_name = agent_cluster(&who)?;
    let cluster = state
        .catalog()
        .clusters
        .get(&cluster_name)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("cluster `{cluster_name}` is not published")))?;
    let capacity = serde_json::to_value(&request.capacity).unwrap_or_default();
    state
        .store
        .heartbeat(
            cluster_name,
            capacity,
            Vec::new(),
            ttl_ms(&state),
            state.now(),
        )
        .await?;
    Ok(Json(RegisterResponse {
        cluster,
        lease_ttl_ms: ttl_ms(&state),
        heartbeat_ms: state.config.heartbeat_interval.as_millis() as i64,
    }))
}

/// Renews the leases an agent holds; names the ones it must stop.
#[utoipa::path(post, path = "/api/v1/agent/heartbeat", request_body = HeartbeatRequest, responses((status = 200, body = HeartbeatResponse)), security(("bearer" = [])))]
pub async fn heartbeat(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let cluster = agent_cluster(&who)?;
    let capacity = serde_json::to_value(&request.capacity).unwrap_or_default();
    let held = request
        .held
        .into_iter()
        .map(|h| (h.job_id, h.epoch))
        .collect();
    let outcome = state
        .store
        .heartbeat(cluster.clone(), capacity, held, ttl_ms(&state), state.now())
        .await?;
    let transfers = crate::flows::claim(&state, &cluster, &who).await?;
    Ok(Json(HeartbeatResponse {
        renewed: outcome.renewed,
        stale: outcome.stale,
        cancel: outcome.cancel,
        transfers,
    }))
}

/// Grants the agent leases on jobs placed on its cluster.
#[utoipa::path(post, path = "/api/v1/agent/lease", request_body = LeaseRequest, responses((status = 200, body = LeaseResponse)), security(("bearer" = [])))]
pub async fn lease(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(request): JsonBody<LeaseRequest>,
) -> ApiResult<Json<LeaseResponse>> {
    let cluster = agent_cluster(&who)?;
    if request.max == 0 || request.max > 1000 {
        return Err(ApiError::bad("max", "must be between 1 and 1000"));
    }
    let granted = state
        .store
        .grant_leases(
            cluster.clone(),
            request.max as i64,
            ttl_ms(&state),
            state.now(),
        )
        .await?;
    let catalog = state.catalog();
    let mut leases = Vec::with_capacity(granted.len());
    for job in granted {
        let Some(allocation) = job.allocation.clone() else {
            continue;
        };
        let (inputs, no_network) = crate::zone::staged_inputs(&state, &catalog, &job.spec);
        let outputs = no_network
            .then(|| crate::zone::outputs_target(&state, &catalog, &job))
            .flatten();
        // a fusion worker's job: the worker starts with its lease (one that cannot start is
        // granted without its work, and the agent fails the job; the other grants stand)
        let fusion = match &job.spec.fusion {
            Some(part) => crate::fusion::start_worker(&state, part, &job.id, &cluster)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(job = %job.id, run = %part.run, error = %e, "fusion worker not started");
                    None
                }),
            None => None,
        };
        leases.push(LeaseGrant {
            held_seconds: crate::ledger::held_seconds(&state, &job),
            allocation,
            job_id: job.id,
            tenant: job.tenant,
            epoch: job.lease_epoch,
            ttl_ms: ttl_ms(&state),
            spec: job.spec,
            inputs,
            no_network,
            outputs,
            fusion,
        });
    }
    Ok(Json(LeaseResponse { leases }))
}

/// Output lines and a status change, under the lease's epoch. A stale epoch is refused
/// with 409, and the agent must stop that copy of the job.
#[utoipa::path(post, path = "/api/v1/agent/jobs/{id}/report", params(("id" = String, Path)), request_body = ReportRequest, responses((status = 200, body = JobView), (status = 409, description = "stale lease", body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn report(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ReportRequest>,
) -> ApiResult<Json<JobView>> {
    let cluster = agent_cluster(&who)?;
    if !request.logs.is_empty() {
        let lines = request
            .logs
            .iter()
            .map(|l| LogLine {
                epoch: request.epoch,
                seq: l.seq,
                stream: l.stream.clone(),
                line: l.line.clone(),
            })
            .collect();
        state
            .store
            .append_logs(id.clone(), cluster.clone(), request.epoch, lines)
            .await?;
    }
    let now = state.now();
    let reason = request.reason.clone();
    // the job as it stands, read once, for a final status
    let job = match request.status {
        Some(AgentStatus::Succeeded | AgentStatus::Failed | AgentStatus::Cancelled) => {
            Some(state.store.get_job(&id).await?)
        }
        _ => None,
    };
    let report = match request.status {
        None => None,
        Some(AgentStatus::Running) => Some(Report::Running),
        Some(AgentStatus::Lost) => Some(Report::Lost {
            reason: format!(
                "lost on {cluster}: {}",
                reason.unwrap_or_else(|| "the agent no longer has it".into())
            ),
        }),
        Some(AgentStatus::Failed | AgentStatus::Cancelled)
            if job.as_ref().is_some_and(|j| j.preempt_requested) =>
        {
            // stopped for another job: queued again, its stopped run not charged
            let job = job.expect("checked by the guard");
            let why = job
                .reason
                .strip_prefix(baygrid_store::PREEMPTING)
                .unwrap_or(&job.reason);
            Some(Report::Lost {
                reason: format!("preempted on {cluster}: {why}"),
            })
        }
        Some(status @ (AgentStatus::Succeeded | AgentStatus::Failed | AgentStatus::Cancelled)) => {
            let job = job.expect("loaded for every final status");
            let final_state = match status {
                AgentStatus::Succeeded => JobState::Succeeded,
                AgentStatus::Failed => JobState::Failed,
                _ => JobState::Cancelled,
            };
            let mut reason = reason.unwrap_or_else(|| match request.exit_code {
                Some(code) => format!("exit code {code}"),
                None => final_state.to_string(),
            });
            // a protected job's outputs: registered only while the report is the lease
            // holder's, before the job is finished (so a crash between the two leaves the
            // dataset, not the job's outputs unaccounted for)
            if !request.outputs.is_empty()
                && job.lease_epoch == request.epoch
                && job.allocation.as_ref().map(|a| a.cluster.as_str()) == Some(cluster.as_str())
            {
                let name =
                    crate::zone::register_outputs(&state, &job, &cluster, &request.outputs, &who)
                        .await?;
                reason.push_str(&format!(
                    "; outputs and logs kept at the site as dataset `{name}`"
                ));
            }
            let (cost_cny_minor, settlement) = crate::ledger::settlement(&state, &job, now)?;
            let accounts = crate::ledger::accounts_for(&settlement, &state);
            if !accounts.is_empty() {
                state.store.open_accounts(accounts, now).await?;
            }
            Some(Report::Finished {
                state: final_state,
                exit_code: request.exit_code,
                reason,
                cost_cny_minor,
                settlement,
            })
        }
    };
    let record = match report {
        Some(report) => {
            state
                .store
                .report(LeaseReport {
                    job_id: id.clone(),
                    cluster,
                    epoch: request.epoch,
                    report,
                    now,
                })
                .await?
        }
        None => state.store.get_job(&id).await?,
    };
    Ok(Json(crate::jobs::view(&state, record, Vec::new())))
}
