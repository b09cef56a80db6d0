//! The scheduling loop: expire lost leases, then place queued jobs with the placer, against
//! what is free now. Jobs that no cluster can ever hold fail with every cluster's reason.

use std::collections::BTreeMap;
use std::time::Instant;

use baygrid_sched::fairshare::{self, Usage};
use baygrid_sched::Market;
use tokio::sync::watch;

use crate::catalog::CatalogSnapshot;
use crate::error::ApiError;
use crate::AppState;

pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(state.config.schedule_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoints = tokio::time::interval(state.config.checkpoint_interval);
    checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // output is looked for as often as it could have come due, at most every minute
    let purge_every = state
        .config
        .log_retention
        .unwrap_or(PURGE_INTERVAL)
        .clamp(std::time::Duration::from_secs(1), PURGE_INTERVAL);
    let mut purges = tokio::time::interval(purge_every);
    purges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = checkpoints.tick() => {
                if let Err(e) = crate::audit::sync(&state).await {
                    tracing::warn!(error = %e, "audit log sync failed");
                }
                if let Err(e) = crate::queries::expire(&state).await {
                    tracing::warn!(error = %e, "expiring queries failed");
                }
                if let Err(e) = crate::fusion::expire(&state).await {
                    tracing::warn!(error = %e, "expiring fusion runs failed");
                }
                continue;
            }
            _ = purges.tick(), if state.config.log_retention.is_some() => {
                if let Err(e) = purge_logs(&state).await {
                    tracing::warn!(error = %e, "deleting old job output failed");
                }
                continue;
            }
            _ = shutdown.changed() => break,
        }
        let started = Instant::now();
        match cycle(&state).await {
            Ok(placed) => {
                state
                    .metrics
                    .cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
                state.metrics.placements.inc_by(placed as u64);
            }
            Err(e) => tracing::warn!(error = %e, "scheduling cycle failed"),
        }
    }
}

/// How often ended jobs' output past the retention is deleted (more often for a retention
/// shorter than this).
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Jobs whose output one write deletes, so the store's writer is never held long.
const PURGE_BATCH: i64 = 100;

/// Deletes the output of jobs that ended more than `log_retention` ago, a batch per write
/// until none is left.
pub async fn purge_logs(state: &AppState) -> Result<(), ApiError> {
    let Some(retention) = state.config.log_retention else {
        return Ok(());
    };
    loop {
        let now = state.now();
        let (jobs, lines) = state
            .store
            .purge_logs(now - retention.as_millis() as i64, PURGE_BATCH, now)
            .await?;
        if jobs > 0 {
            tracing::info!(
                jobs,
                lines,
                "deleted ended jobs' output past the log retention"
            );
        }
        if jobs < PURGE_BATCH as u64 {
            return Ok(());
        }
    }
}

/// The market as it stands (agents' liveness and every active allocation taken off), what
/// each tenant holds now (for the fair-share order and quotas), and the jobs holding nodes
/// (for preemption).
pub async fn live_market_and_usage(
    state: &AppState,
    catalog: &CatalogSnapshot,
    now: i64,
) -> Result<(Market, Usage, Vec<baygrid_sched::preempt::Running>), ApiError> {
    let ttl = state.config.lease_ttl.as_millis() as i64;
    let seen: BTreeMap<String, i64> = state
        .store
        .cluster_status()
        .await?
        .into_iter()
        .map(|(name, at, _)| (name, at))
        .collect();
    let mut clusters: Vec<_> = catalog
        .clusters
        .values()
        .filter_map(|c| {
            let online = seen.get(&c.name).is_some_and(|at| now - at <= ttl);
            catalog.cluster_state(c, online)
        })
        .collect();
    let reference_tflops = Market::reference_tflops(catalog.accelerators.values());
    let mut capacity: BTreeMap<String, u64> = BTreeMap::new();
    for c in &clusters {
        *capacity.entry(c.cluster.accelerator.clone()).or_default() +=
            u64::from(c.cluster.nodes * c.cluster.accelerators_per_node);
    }
    let mut usage = Usage::new(capacity).with_weights(state.config.tenant_weights.clone());
    let mut running = Vec::new();
    for active in state.store.active_allocations().await? {
        let allocation = &active.allocation;
        if let Some(model) = &allocation.accelerator {
            usage.add(
                &active.tenant,
                model,
                u64::from(allocation.total_accelerators()),
            );
        }
        if let Some(cluster) = clusters
            .iter_mut()
            .find(|c| c.cluster.name == allocation.cluster)
        {
            // placed but not started: assume it starts now
            let ends_at = allocation
                .estimated_seconds
                .map(|s| active.started_ms.unwrap_or(now) + s as i64 * 1000);
            cluster.take_until(allocation, ends_at);
        }
        running.push(baygrid_sched::preempt::Running {
            job_id: active.job_id,
            tenant: active.tenant,
            priority: active.priority,
            preemptible: active.preemptible,
            stopping: active.preempt_requested,
            started_ms: active.started_ms,
            allocation: active.allocation,
        });
    }
    let market = Market {
        clusters,
        rates: catalog.rates.clone(),
        round_trips: catalog.round_trips.clone(),
        reference_tflops,
        transfer_price_per_gb: catalog.transfer_price_per_gb.clone(),
        green_weight: state.config.green_weight,
    };
    Ok((market, usage, running))
}

/// From when a cluster is reserved, and for which job (kept by cluster name).
struct Reservation {
    start_ms: i64,
    job: String,
}

/// What a job's inputs are judged on: the tenant, the datasets and the purpose.
type InputsKey = (String, Vec<String>, Option<String>);

/// One cycle. Returns how many jobs were placed.
pub async fn cycle(state: &AppState) -> Result<usize, ApiError> {
    let now = state.now();
    let expired = state.store.expire_leases(now).await?;
    if !expired.is_empty() {
        state.metrics.leases_expired.inc_by(expired.len() as u64);
        tracing::info!(count = expired.len(), "requeued jobs whose lease expired");
    }
    let holds = state.store.expire_holds(now).await?;
    if !holds.is_empty() {
        tracing::info!(count = holds.len(), "voided holds that timed out");
    }
    let queued = state.store.queued_jobs(state.config.schedule_batch).await?;
    if queued.is_empty() {
        return Ok(0);
    }
    let catalog = state.catalog();
    let (mut market, mut usage, running) = live_market_and_usage(state, &catalog, now).await?;
    let quotas = state.config.quotas();
    let patience = state.config.patience();
    // higher priority first; within it, the least-served tenant (dominant share), then the
    // earliest deadline, then age
    let order = fairshare::order(
        &queued
            .iter()
            .map(|j| fairshare::Queued {
                priority: j.priority,
                tenant: &j.tenant,
                submitted_ms: j.submitted_ms,
                deadline_ms: j.spec.deadline.map(|d| d.timestamp_millis()),
            })
            .collect::<Vec<_>>(),
        &usage,
    );
    let mut slots: Vec<Option<_>> = queued.into_iter().map(Some).collect();
    let queued: Vec<_> = order.into_iter().filter_map(|i| slots[i].take()).collect();
    let grant_by = now + state.config.grant_timeout.as_millis() as i64;
    let mut writes = Vec::new();
    let mut placed = 0;
    let mut blocks = state.store.cluster_blocks(now).await?;
    let mut inputs_judged: BTreeMap<InputsKey, BTreeMap<String, String>> = BTreeMap::new();
    // backfill: each cluster's reservation goes to the first job in order that fits nowhere
    // now and is expected to start there first; a later job takes a reserved cluster only if
    // it is expected to end before then, so it never delays the reservation
    let mut reservations: BTreeMap<String, Reservation> = BTreeMap::new();
    for job in queued {
        let Some(mut requester) = catalog.requester(&job.tenant, &job.spec) else {
            let reason = format!("tenant `{}` no longer exists", job.tenant);
            writes.push(futures::future::Either::Left(
                state.store.fail_queued(job.id, reason, now),
            ));
            continue;
        };
        requester.blocked = blocks
            .remove(&job.id)
            .unwrap_or_default()
            .into_iter()
            .map(|b| baygrid_sched::BlockedCluster {
                cluster: b.cluster,
                until_ms: b.until_ms,
                reason: b.reason,
            })
            .collect();
        // jobs alike in tenant, inputs and purpose share one judgement per cycle (the copy
        // is decided again, on the totals of the moment, when a job is placed)
        let key = (
            job.tenant.clone(),
            job.spec.inputs.clone(),
            job.spec.purpose.clone(),
        );
        let judged = match inputs_judged.get(&key) {
            Some(denied) => Ok(denied.clone()),
            None => crate::zone::inputs_denied(state, &catalog, &job.tenant, &job.spec).await,
        };
        match judged {
            Ok(denied) => {
                if !job.spec.inputs.is_empty() {
                    inputs_judged.insert(key, denied.clone());
                }
                requester.inputs_denied = denied;
            }
            Err(ApiError::BadRequest { field, message }) => {
                // accepted once, now unreadable (a dataset or party went away)
                let reason = match field {
                    Some(field) => format!("{field}: {message}"),
                    None => message,
                };
                writes.push(futures::future::Either::Left(
                    state.store.fail_queued(job.id, reason, now),
                ));
                continue;
            }
            Err(other) => return Err(other),
        }
        requester.over_quota = quotas.blocks(&usage, &job.tenant, &job.spec);
        let mut quote = state.placer.quote(&job.spec, &requester, &market, now);
        // each reserved cluster it fits now but would hold past the reservation's start is
        // blocked for it (its run time there is in the quote already), then quoted once more
        let before = requester.blocked.len();
        let fits = |c: &&baygrid_sched::Candidate| {
            matches!(
                c.verdict,
                baygrid_sched::Verdict::Chosen | baygrid_sched::Verdict::Fits
            )
        };
        for c in quote.candidates.iter().filter(fits) {
            let ends = c.estimated_seconds.map(|s| now + s as i64 * 1000);
            if let Some(r) = reservations
                .get(&c.cluster)
                .filter(|r| ends.is_none_or(|e| e > r.start_ms))
            {
                requester.blocked.push(baygrid_sched::BlockedCluster {
                    cluster: c.cluster.clone(),
                    until_ms: r.start_ms,
                    reason: format!(
                        "reserved from {} for job {}, which is ahead in the queue",
                        baygrid_core::millis_to_rfc3339(r.start_ms),
                        r.job
                    ),
                });
            }
        }
        if requester.blocked.len() > before {
            quote = state.placer.quote(&job.spec, &requester, &market, now);
        }
        // a latency-insensitive job may wait a little for a cheaper cluster about to free,
        // holding its nodes as the reservation meanwhile
        let cheaper = patience.wait_in(&quote, &job.spec, job.submitted_ms, |cluster| {
            reservations.contains_key(cluster)
        });
        if let Some(later) = cheaper {
            let start_ms = later
                .estimated_start_ms
                .expect("waited-for clusters have a start");
            tracing::debug!(
                job = %job.id,
                cluster = %later.cluster,
                start = %baygrid_core::millis_to_rfc3339(start_ms),
                "waiting for a cheaper cluster"
            );
            reservations.insert(
                later.cluster.clone(),
                Reservation {
                    start_ms,
                    job: job.id.to_string(),
                },
            );
            continue;
        }
        if let Some(allocation) = quote.allocation(&job.spec) {
            let chosen = quote.chosen().expect("an allocation has a chosen cluster");
            if !job.spec.inputs.is_empty() {
                let job_id = job.id.to_string();
                if let Some(why) = crate::zone::record_input_flows(
                    state,
                    &catalog,
                    &job_id,
                    &job.tenant,
                    &job.spec,
                    &chosen.site,
                )
                .await?
                {
                    tracing::info!(job = %job_id, %why, "not placed: an input's flow was denied");
                    continue;
                }
            }
            let reason = format!(
                "placed on {} at {}: {}",
                chosen.cluster, chosen.site, chosen.reason
            );
            if let Some(cluster) = market
                .clusters
                .iter_mut()
                .find(|c| c.cluster.name == allocation.cluster)
            {
                cluster.take(&allocation);
            }
            // later jobs in this cycle see it held, for the quotas
            if let Some(model) = &allocation.accelerator {
                usage.add(
                    &job.tenant,
                    model,
                    u64::from(allocation.total_accelerators()),
                );
            }
            placed += 1;
            writes.push(futures::future::Either::Right(
                state.store.place(job.id, allocation, reason, grant_by, now),
            ));
        } else if !quote.ever_feasible() {
            writes.push(futures::future::Either::Left(state.store.fail_queued(
                job.id,
                quote.rejection_summary(),
                now,
            )));
        } else {
            // the first job in order that cannot start (while nothing is reserved): stop
            // preemptible jobs for it when its priority or its tenant's fair share entitles
            // it (it starts in a later cycle, once they have stopped)
            let claimant = baygrid_sched::preempt::Claimant {
                job_id: &job.id,
                tenant: &job.tenant,
                priority: job.priority,
                spec: &job.spec,
                requester: &requester,
                quote: &quote,
            };
            let eviction = reservations
                .is_empty()
                .then(|| {
                    baygrid_sched::preempt::eviction(
                        claimant,
                        &market,
                        &running,
                        &usage,
                        &quotas,
                        now,
                        state.config.preemption_grace.as_millis() as i64,
                    )
                })
                .flatten();
            if let Some(eviction) = eviction {
                for victim in &eviction.victims {
                    if state
                        .store
                        .request_preemption(victim.clone(), eviction.reason.clone(), now)
                        .await?
                    {
                        state.metrics.jobs_preempted.inc();
                        tracing::info!(job = %victim, reason = %eviction.reason, "preempting");
                    }
                }
                reservations.insert(
                    eviction.cluster,
                    Reservation {
                        start_ms: now,
                        job: job.id.to_string(),
                    },
                );
                continue;
            }
            // it reserves the cluster, not yet reserved, where it is expected to start first
            if let Some((start_ms, c)) = quote
                .candidates
                .iter()
                .filter(|c| c.verdict == baygrid_sched::Verdict::Waits)
                .filter(|c| !reservations.contains_key(&c.cluster))
                .filter_map(|c| c.estimated_start_ms.map(|at| (at, c)))
                .min_by_key(|(at, _)| *at)
            {
                reservations.insert(
                    c.cluster.clone(),
                    Reservation {
                        start_ms,
                        job: job.id.to_string(),
                    },
                );
            }
        }
    }
    for result in futures::future::join_all(writes).await {
        result?;
    }
    Ok(placed)
}
