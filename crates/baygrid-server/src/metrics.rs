//! Prometheus metrics at `/metrics`.

use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::AppState;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: IntCounter,
    pub placements: IntCounter,
    pub leases_expired: IntCounter,
    pub jobs_preempted: IntCounter,
    pub cycle_seconds: Histogram,
    http_requests: IntCounterVec,
    jobs_by_state: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let jobs_submitted =
            IntCounter::new("baygrid_jobs_submitted_total", "jobs accepted at submit")
                .expect("metric");
        let placements = IntCounter::new("baygrid_placements_total", "jobs placed on a cluster")
            .expect("metric");
        let leases_expired = IntCounter::new(
            "baygrid_leases_expired_total",
            "jobs requeued after their lease expired",
        )
        .expect("metric");
        let jobs_preempted = IntCounter::new(
            "baygrid_jobs_preempted_total",
            "running jobs asked to stop for another job",
        )
        .expect("metric");
        let cycle_seconds = Histogram::with_opts(HistogramOpts::new(
            "baygrid_schedule_cycle_seconds",
            "time of one scheduling cycle",
        ))
        .expect("metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "baygrid_http_requests_total",
                "HTTP requests by method and status",
            ),
            &["method", "status"],
        )
        .expect("metric");
        let jobs_by_state =
            IntGaugeVec::new(Opts::new("baygrid_jobs", "jobs in each state"), &["state"])
                .expect("metric");
        for collector in [
            Box::new(jobs_submitted.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(placements.clone()),
            Box::new(leases_expired.clone()),
            Box::new(jobs_preempted.clone()),
            Box::new(cycle_seconds.clone()),
            Box::new(http_requests.clone()),
            Box::new(jobs_by_state.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            jobs_submitted,
            placements,
            leases_expired,
            jobs_preempted,
            cycle_seconds,
            http_requests,
            jobs_by_state,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Counts every request by method and status.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), response.status().as_str()])
        .inc();
    response
}

pub async fn render(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.store.count_jobs_by_state().await {
        for job_state in baygrid_core::JobState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == job_state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            state
                .metrics
                .jobs_by_state
                .with_label_values(&[job_state.as_str()])
                .set(n);
        }
    }
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&state.metrics.registry.gather(), &mut buffer) {
        return crate::ApiError::Unavailable(format!("metrics: {e}")).into_response();
    }
    ([(CONTENT_TYPE, encoder.format_type().to_string())], buffer).into_response()
}
