//! Jobs: submission, placement, leases with fencing epochs, reports, logs, cancellation.

use std::collections::BTreeMap;

use baygrid_core::{Allocation, JobSpec, JobState, Millis};
use serde::Serialize;
use sqlx::{AnyConnection, Row};

use baygrid_ledger::{names, Transfer};

use crate::ledger::{apply_each_in_tx, apply_in_tx, void_of_hold, LedgerCell};
use crate::records::JOB_COLUMNS;
use crate::{multi_row_insert, outbox, JobEvent, JobRecord, LogLine, Result, Store, StoreError};

/// A submission.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub tenant: String,
    pub idempotency_key: Option<String>,
    pub spec: JobSpec,
    pub actor: String,
    pub now: Millis,
    /// The hold on the tenant's wallet that pays for the job, written with it: a pending
    /// transfer with id `hold:JOB`. None for a job that costs nothing.
    pub hold: Option<Transfer>,
}

/// Which jobs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub tenant: Option<String>,
    pub states: Vec<JobState>,
    /// Only jobs listed after this one: submitted before it, or at the same millisecond
    /// with a lower id (the next page).
    pub before: Option<Below>,
    pub limit: i64,
}

/// Where a page of a newest-first list starts: below this row's time and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Below {
    pub at_ms: Millis,
    pub id: String,
}

/// What an agent says about a job it holds. Every report carries the lease's epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The engine started the job.
    Running,
    /// The job ended: succeeded, failed or cancelled, with its metered cost and the
    /// transfers that settle it (post the hold, split it), applied as one linked chain.
    Finished {
        state: JobState,
        exit_code: Option<i64>,
        reason: String,
        cost_cny_minor: i64,
        settlement: Vec<Transfer>,
    },
    /// The agent lost the job (it restarted and the job was gone); it goes back to the queue.
    Lost { reason: String },
}

/// A report with the lease it is made under.
#[derive(Debug, Clone)]
pub struct LeaseReport {
    pub job_id: String,
    pub cluster: String,
    pub epoch: i64,
    pub report: Report,
    pub now: Millis,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The job was not running anywhere and is now cancelled.
    Cancelled,
    /// The job is running; its agent will stop it and report.
    Requested,
    /// The job had already ended.
    AlreadyEnded,
}

/// What a heartbeat found for the jobs an agent holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeartbeatOutcome {
    /// Leases renewed.
    pub renewed: Vec<String>,
    /// Jobs the agent must stop at once: its lease is no longer valid.
    pub stale: Vec<String>,
    /// Jobs whose tenant asked to cancel.
    pub cancel: Vec<String>,
}

async fn record_transition(
    conn: &mut AnyConnection,
    job_id: &str,
    from: Option<JobState>,
    to: JobState,
    reason: &str,
    now: Millis,
    actor: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, at_ms, from_state, to_state, reason) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1), $2, $3, $4, $5)",
    )
    .bind(job_id)
    .bind(now)
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    let payload = serde_json::json!({
        "job": job_id,
        "from": from.map(|s| s.as_str()),
        "to": to.as_str(),
        "reason": reason,
    });
    outbox(conn, now, "job.transition", actor, &payload).await
}

async fn load_job(conn: &mut AnyConnection, id: &str) -> Result<JobRecord> {
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "job",
            id: id.to_string(),
        })?;
    JobRecord::from_row(&row)
}

/// Checks that `cluster` holds the job's current lease at `epoch`.
fn check_lease(job: &JobRecord, cluster: &str, epoch: i64) -> Result<()> {
    let live = matches!(job.state, JobState::Placed | JobState::Running)
        && job.lease_holder.as_deref() == Some(cluster)
        && job.lease_epoch == epoch;
    if live {
        Ok(())
    } else {
        Err(StoreError::StaleLease(format!(
            "job {} is {} under epoch {} held by {}; report was for epoch {epoch} from {cluster}",
            job.id,
            job.state,
            job.lease_epoch,
            job.lease_holder.as_deref().unwrap_or("nobody"),
        )))
    }
}

/// What a job's reason starts with while its agent is being asked to stop it for another.
pub const PREEMPTING: &str = "being preempted: ";

/// How long a cluster that lost a job stays blocked for it by default: one minute after the
/// first loss ([`Store::set_failover_backoff`] changes it), doubling with each attempt, at
/// most an hour.
pub const FAILOVER_BACKOFF_MS: Millis = 60_000;
pub const FAILOVER_BACKOFF_MAX_MS: Millis = 3_600_000;

/// The back-off after a job's `attempts`-th loss (1 for the first), from a first back-off.
pub fn failover_backoff(first_ms: Millis, attempts: i64) -> Millis {
    let doublings = (attempts - 1).clamp(0, 16) as u32;
    (first_ms << doublings).min(FAILOVER_BACKOFF_MAX_MS.max(first_ms))
}

/// A placed or running job's allocation (with its estimated duration on the cluster), whose
/// it is, and when it started.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveAllocation {
    pub job_id: String,
    pub priority: i64,
    pub preemptible: bool,
    /// Already asked to stop for another job.
    pub preempt_requested: bool,
    pub tenant: String,
    pub allocation: Allocation,
    /// `None` while placed and not yet started.
    pub started_ms: Option<Millis>,
}

/// A cluster a job may not be placed on until a time, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterBlock {
    pub job_id: String,
    pub cluster: String,
    pub until_ms: Millis,
    pub reason: String,
}

/// Puts a placed or running job back in the queue, dropping its allocation and lease, and
/// blocks the cluster that lost it for the job for the back-off period.
async fn requeue(
    conn: &mut AnyConnection,
    job: &JobRecord,
    reason: &str,
    now: Millis,
    actor: &str,
    backoff_ms: Millis,
) -> Result<()> {
    if let Some(cluster) = job.allocation.as_ref().map(|a| &a.cluster) {
        let until = now + failover_backoff(backoff_ms, job.attempts + 1);
        sqlx::query(
            "INSERT INTO job_blocks (job_id, cluster, until_ms, reason) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job_id, cluster) DO UPDATE SET until_ms = excluded.until_ms, reason = excluded.reason",
        )
        .bind(&job.id)
        .bind(cluster)
        .bind(until)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        let payload = serde_json::json!({"job": job.id, "cluster": cluster, "until_ms": until, "reason": reason});
        outbox(conn, now, "job.cluster_blocked", actor, &payload).await?;
    }
    sqlx::query(
        "UPDATE jobs SET state = 'queued', reason = $1, updated_ms = $2, cluster = NULL, allocation = NULL, \
         lease_holder = NULL, lease_expires_ms = NULL, started_ms = NULL, attempts = attempts + 1, \
         preempt_requested = 0 WHERE id = $3",
    )
    .bind(reason)
    .bind(now)
    .bind(&job.id)
    .execute(&mut *conn)
    .await?;
    record_transition(
        conn,
        &job.id,
        Some(job.state),
        JobState::Queued,
        reason,
        now,
        actor,
    )
    .await
}

/// Releases a job's open hold, if it has one: the job ended without using it.
async fn void_hold(
    conn: &mut AnyConnection,
    ledger: &LedgerCell,
    job_id: &str,
    actor: &str,
    now: Millis,
) -> Result<()> {
    if let Some(void) = void_of_hold(ledger, &names::hold(job_id), names::void(job_id)) {
        apply_in_tx(conn, ledger, &[void], actor, now).await?;
    }
    Ok(())
}

/// Fails a job if it is still queued. False when it was not.
pub(crate) async fn fail_if_queued(
    conn: &mut AnyConnection,
    job_id: &str,
    reason: &str,
    now: Millis,
    actor: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'failed', reason = $1, updated_ms = $2, finished_ms = $2 WHERE id = $3 AND state = 'queued'",
    )
    .bind(reason)
    .bind(now)
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    record_transition(
        conn,
        job_id,
        Some(JobState::Queued),
        JobState::Failed,
        reason,
        now,
        actor,
    )
    .await?;
    Ok(true)
}

/// The record of a job just submitted, as the insert below stores it.
fn queued_record(job: &NewJob) -> JobRecord {
    JobRecord {
        id: job.id.clone(),
        tenant: job.tenant.clone(),
        name: job.spec.name.clone(),
        spec: job.spec.clone(),
        state: JobState::Queued,
        reason: "submitted".into(),
        priority: job.spec.priority as i64,
        submitted_ms: job.now,
        updated_ms: job.now,
        allocation: None,
        lease_epoch: 0,
        lease_holder: None,
        lease_expires_ms: None,
        cancel_requested: false,
        preempt_requested: false,
        attempts: 0,
        started_ms: None,
        finished_ms: None,
        exit_code: None,
        cost_cny_minor: None,
        logs_purged_ms: None,
    }
}

/// A submission repeated under its idempotency key must repeat the spec too: a key used
/// for another spec is a mistake the client should hear of, not an old job's answer.
fn same_spec(key: &str, existing_id: &str, existing: &JobSpec, new: &JobSpec) -> Result<()> {
    // as stored, too: the stored spec has been through JSON and back
    let stored_alike = matches!(
        (serde_json::to_value(existing), serde_json::to_value(new)),
        (Ok(a), Ok(b)) if a == b
    );
    if existing == new || stored_alike {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "Idempotency-Key `{key}` was used for another spec (job {existing_id}); a new submission needs a new key"
        )))
    }
}

async fn existing_for_key(
    conn: &mut AnyConnection,
    tenant: &str,
    key: &str,
) -> Result<Option<JobRecord>> {
    let row = sqlx::query("SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2")
        .bind(tenant)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => {
            let id: String = row.try_get("id")?;
            Ok(Some(load_job(conn, &id).await?))
        }
        None => Ok(None),
    }
}

/// One submission on its own: the fallback when a group's batch fails.
pub(crate) async fn submit_one(
    conn: &mut AnyConnection,
    ledger: &LedgerCell,
    job: NewJob,
) -> Result<(JobRecord, bool)> {
    if let Some(key) = &job.idempotency_key {
        if let Some(existing) = existing_for_key(conn, &job.tenant, key).await? {
            same_spec(key, &existing.id, &existing.spec, &job.spec)?;
            return Ok((existing, false));
        }
    }
    if let Some(hold) = &job.hold {
        apply_in_tx(
            conn,
            ledger,
            std::slice::from_ref(hold),
            &job.actor,
            job.now,
        )
        .await?;
    }
    let spec = serde_json::to_string(&job.spec)
        .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
    sqlx::query(
        "INSERT INTO jobs (id, tenant, idempotency_key, name, spec, state, reason, priority, submitted_ms, updated_ms, preemptible) \
         VALUES ($1, $2, $3, $4, $5, 'queued', 'submitted', $6, $7, $7, $8)",
    )
    .bind(&job.id)
    .bind(&job.tenant)
    .bind(job.idempotency_key.as_deref())
    .bind(&job.spec.name)
    .bind(spec)
    .bind(job.spec.priority as i64)
    .bind(job.now)
    .bind(i64::from(job.spec.preemptible))
    .execute(&mut *conn)
    .await?;
    record_transition(
        conn,
        &job.id,
        None,
        JobState::Queued,
        "submitted",
        job.now,
        &job.actor,
    )
    .await?;
    Ok((queued_record(&job), true))
}

/// Rows per multi-row statement (well under both databases' bind limits).
const BATCH_ROWS: usize = 100;

/// A group's submissions with multi-row statements: the jobs, their first events and their
/// outbox entries. Idempotency keys already used (in the store or earlier in the batch)
/// return the first job.
pub(crate) async fn submit_batch(
    conn: &mut AnyConnection,
    ledger: &LedgerCell,
    jobs: Vec<NewJob>,
) -> Result<Vec<Result<(JobRecord, bool)>>> {
    let mut results: Vec<Option<Result<(JobRecord, bool)>>> =
        (0..jobs.len()).map(|_| None).collect();
    let mut fresh: Vec<usize> = Vec::with_capacity(jobs.len());
    let mut first_with_key: std::collections::HashMap<(&str, &str), usize> =
        std::collections::HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        if let Some(key) = &job.idempotency_key {
            if let Some(&first) = first_with_key.get(&(job.tenant.as_str(), key.as_str())) {
                results[i] = Some(
                    same_spec(key, &jobs[first].id, &jobs[first].spec, &job.spec)
                        .map(|()| (queued_record(&jobs[first]), false)),
                );
                continue;
            }
            if let Some(existing) = existing_for_key(conn, &job.tenant, key).await? {
                results[i] = Some(
                    same_spec(key, &existing.id, &existing.spec, &job.spec)
                        .map(|()| (existing, false)),
                );
                continue;
            }
            first_with_key.insert((job.tenant.as_str(), key.as_str()), i);
        }
        fresh.push(i);
    }
    // the holds, each on its own: a wallet that cannot cover one refuses that job alone
    let holds: Vec<(usize, Transfer)> = fresh
        .iter()
        .filter_map(|&i| jobs[i].hold.clone().map(|h| (i, h)))
        .collect();
    let transfers: Vec<Transfer> = holds.iter().map(|(_, h)| h.clone()).collect();
    let now = jobs.first().map(|j| j.now).unwrap_or_default();
    let held = apply_each_in_tx(conn, ledger, &transfers, "tenants", now).await?;
    let mut refused = std::collections::HashSet::new();
    for ((i, hold), result) in holds.iter().zip(held) {
        if let Err(error) = result {
            refused.insert(*i);
            results[*i] = Some(Err(StoreError::Ledger {
                transfer: hold.id.clone(),
                error,
            }));
        }
    }
    let funded: Vec<usize> = fresh.into_iter().filter(|i| !refused.contains(i)).collect();
    let fresh = funded;
    for chunk in fresh.chunks(BATCH_ROWS) {
        let sql = multi_row_insert(
            "INSERT INTO jobs (id, tenant, idempotency_key, name, spec, state, reason, priority, submitted_ms, updated_ms, preemptible) VALUES ",
            "({1}, {2}, {3}, {4}, {5}, 'queued', 'submitted', {6}, {7}, {7}, {8})",
            8,
            chunk.len(),
        );
        let mut query = sqlx::query(&sql);
        for &i in chunk {
            let job = &jobs[i];
            let spec = serde_json::to_string(&job.spec)
                .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
            query = query
                .bind(job.id.clone())
                .bind(job.tenant.clone())
                .bind(job.idempotency_key.clone())
                .bind(job.spec.name.clone())
                .bind(spec)
                .bind(job.spec.priority as i64)
                .bind(job.now)
                .bind(i64::from(job.spec.preemptible));
        }
        query.execute(&mut *conn).await?;

        let sql = multi_row_insert(
            "INSERT INTO job_events (job_id, seq, at_ms, from_state, to_state, reason) VALUES ",
            "({1}, 1, {2}, NULL, 'queued', 'submitted')",
            2,
            chunk.len(),
        );
        let mut query = sqlx::query(&sql);
        for &i in chunk {
            query = query.bind(jobs[i].id.clone()).bind(jobs[i].now);
        }
        query.execute(&mut *conn).await?;

        let base: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM outbox")
            .fetch_one(&mut *conn)
            .await?
            .try_get("seq")?;
        let sql = multi_row_insert(
            "INSERT INTO outbox (seq, at_ms, kind, actor, payload) VALUES ",
            "({1}, {2}, 'job.transition', {3}, {4})",
            4,
            chunk.len(),
        );
        let mut query = sqlx::query(&sql);
        for (row, &i) in chunk.iter().enumerate() {
            let job = &jobs[i];
            let payload = serde_json::json!({"job": job.id, "from": null, "to": "queued", "reason": "submitted"});
            query = query
                .bind(base + 1 + row as i64)
                .bind(job.now)
                .bind(job.actor.clone())
                .bind(payload.to_string());
        }
        query.execute(&mut *conn).await?;
        for &i in chunk {
            results[i] = Some(Ok((queued_record(&jobs[i]), true)));
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every submission has a result"))
        .collect())
}

impl Store {
    pub async fn get_job(&self, id: &str) -> Result<JobRecord> {
        let mut conn = self.pool().acquire().await?;
        load_job(&mut conn, id).await
    }

    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        if let Some(tenant) = &filter.tenant {
            binds.push(tenant.clone());
            sql.push_str(&format!(" AND tenant = ${}", binds.len()));
        }
        if !filter.states.is_empty() {
            let states: Vec<String> = filter
                .states
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            sql.push_str(&format!(" AND state IN ({})", states.join(", ")));
        }
        if let Some(below) = &filter.before {
            binds.push(below.id.clone());
            sql.push_str(&format!(
                " AND (submitted_ms < {at} OR (submitted_ms = {at} AND id < ${}))",
                binds.len(),
                at = below.at_ms
            ));
        }
        sql.push_str(&format!(
            " ORDER BY submitted_ms DESC, id DESC LIMIT {}",
            filter.limit.clamp(1, 100_000)
        ));
        let mut query = sqlx::query(&sql);
        for value in &binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter().map(JobRecord::from_row).collect()
    }

    /// Queued jobs in scheduling order: priority, then age.
    pub async fn queued_jobs(&self, limit: i64) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY priority DESC, submitted_ms, id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(JobRecord::from_row).collect()
    }

    /// Clusters blocked for queued jobs at `now`, by job.
    pub async fn cluster_blocks(&self, now: Millis) -> Result<BTreeMap<String, Vec<ClusterBlock>>> {
        let rows = sqlx::query(
            "SELECT b.job_id, b.cluster, b.until_ms, b.reason FROM job_blocks b JOIN jobs j ON j.id = b.job_id \
             WHERE b.until_ms > $1 AND j.state = 'queued' ORDER BY b.job_id, b.cluster",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        let mut blocks: BTreeMap<String, Vec<ClusterBlock>> = BTreeMap::new();
        for row in rows {
            let block = ClusterBlock {
                job_id: row.try_get("job_id")?,
                cluster: row.try_get("cluster")?,
                until_ms: row.try_get("until_ms")?,
                reason: row.try_get("reason")?,
            };
            blocks.entry(block.job_id.clone()).or_default().push(block);
        }
        Ok(blocks)
    }

    /// Every placed or running job's allocation, whose it is and when it started.
    pub async fn active_allocations(&self) -> Result<Vec<ActiveAllocation>> {
        let rows = sqlx::query(
            "SELECT id, priority, preemptible, preempt_requested, tenant, allocation, started_ms FROM jobs \
             WHERE state IN ('placed', 'running') AND allocation IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let text: String = row.try_get("allocation")?;
                Ok(ActiveAllocation {
                    job_id: row.try_get("id")?,
                    priority: row.try_get("priority")?,
                    preemptible: row.try_get::<i64, _>("preemptible")? != 0,
                    preempt_requested: row.try_get::<i64, _>("preempt_requested")? != 0,
                    tenant: row.try_get("tenant")?,
                    allocation: serde_json::from_str(&text)
                        .map_err(|e| StoreError::Corrupt(format!("allocation: {e}")))?,
                    started_ms: row.try_get("started_ms")?,
                })
            })
            .collect()
    }

    pub async fn job_events(&self, id: &str) -> Result<Vec<JobEvent>> {
        let rows = sqlx::query("SELECT seq, at_ms, from_state, to_state, reason FROM job_events WHERE job_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(JobEvent::from_row).collect()
    }

    /// Places a queued job. The agent must take the lease before `grant_by`, or the job goes
    /// back to the queue. Returns false when the job was no longer queued.
    pub async fn place(
        &self,
        job_id: String,
        allocation: Allocation,
        reason: String,
        grant_by: Millis,
        now: Millis,
    ) -> Result<bool> {
        self.write(move |conn| {
            Box::pin(async move {
                let text = serde_json::to_string(&allocation).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let done = sqlx::query(
                    "UPDATE jobs SET state = 'placed', reason = $1, updated_ms = $2, cluster = $3, allocation = $4, \
                     lease_holder = NULL, lease_expires_ms = $5 WHERE id = $6 AND state = 'queued'",
                )
                .bind(&reason)
                .bind(now)
                .bind(&allocation.cluster)
                .bind(&text)
                .bind(grant_by)
                .bind(&job_id)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                record_transition(conn, &job_id, Some(JobState::Queued), JobState::Placed, &reason, now, "scheduler").await?;
                let payload = serde_json::json!({"job": job_id, "allocation": allocation, "reason": reason});
                outbox(conn, now, "job.placement", "scheduler", &payload).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Ends a queued job as failed (for example: no cluster can ever hold it).
    pub async fn fail_queued(&self, job_id: String, reason: String, now: Millis) -> Result<bool> {
        let ledger = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move {
                if !fail_if_queued(conn, &job_id, &reason, now, "scheduler").await? {
                    return Ok(false);
                }
                void_hold(conn, &ledger, &job_id, "scheduler", now).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Asks the agent holding a running job to stop it so that it can be queued again (the
    /// agent is told with its next heartbeat, as for a cancel). False when the job is not
    /// running, or is already being stopped.
    pub async fn request_preemption(
        &self,
        job_id: String,
        reason: String,
        now: Millis,
    ) -> Result<bool> {
        self.write(move |conn| {
            Box::pin(async move {
                let job = load_job(conn, &job_id).await?;
                if job.state != JobState::Running || job.cancel_requested || job.preempt_requested {
                    return Ok(false);
                }
                sqlx::query("UPDATE jobs SET preempt_requested = 1, reason = $1, updated_ms = $2 WHERE id = $3")
                    .bind(format!("{PREEMPTING}{reason}"))
                    .bind(now)
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                let payload = serde_json::json!({"job": job_id, "reason": reason});
                outbox(conn, now, "job.preempt_requested", "scheduler", &payload).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Cancels a job: at once when no agent holds it, otherwise by asking its agent.
    pub async fn cancel(
        &self,
        job_id: String,
        actor: String,
        now: Millis,
    ) -> Result<(Outcome, JobRecord)> {
        let ledger = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move { cancel_in(conn, &ledger, &job_id, &actor, now).await })
        })
        .await
    }

    /// Grants leases on up to `max` placed jobs of `cluster` that no agent holds yet. Each
    /// grant raises the job's epoch, fencing off any earlier holder.
    pub async fn grant_leases(
        &self,
        cluster: String,
        max: i64,
        ttl_ms: Millis,
        now: Millis,
    ) -> Result<Vec<JobRecord>> {
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT id FROM jobs WHERE cluster = $1 AND state = 'placed' AND lease_holder IS NULL \
                     AND cancel_requested = 0 ORDER BY priority DESC, submitted_ms LIMIT $2",
                )
                .bind(&cluster)
                .bind(max)
                .fetch_all(&mut *conn)
                .await?;
                let mut granted = Vec::with_capacity(rows.len());
                for row in rows {
                    let id: String = row.try_get("id")?;
                    sqlx::query(
                        "UPDATE jobs SET lease_holder = $1, lease_epoch = lease_epoch + 1, lease_expires_ms = $2, updated_ms = $3 \
                         WHERE id = $4 AND state = 'placed' AND lease_holder IS NULL",
                    )
                    .bind(&cluster)
                    .bind(now + ttl_ms)
                    .bind(now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                    let job = load_job(conn, &id).await?;
                    let payload = serde_json::json!({"job": id, "cluster": cluster, "epoch": job.lease_epoch});
                    outbox(conn, now, "lease.grant", &format!("agent:{cluster}"), &payload).await?;
                    granted.push(job);
                }
                Ok(granted)
            })
        })
        .await
    }

    /// Records an agent's heartbeat: its capacity, and the leases it holds, renewing the
    /// valid ones and naming the stale ones.
    pub async fn heartbeat(
        &self,
        cluster: String,
        capacity: serde_json::Value,
        held: Vec<(String, i64)>,
        ttl_ms: Millis,
        now: Millis,
    ) -> Result<HeartbeatOutcome> {
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO cluster_status (cluster, agent_seen_ms, capacity) VALUES ($1, $2, $3) \
                     ON CONFLICT (cluster) DO UPDATE SET agent_seen_ms = $2, capacity = $3",
                )
                .bind(&cluster)
                .bind(now)
                .bind(capacity.to_string())
                .execute(&mut *conn)
                .await?;
                let mut outcome = HeartbeatOutcome::default();
                for (job_id, epoch) in held {
                    let job = match load_job(conn, &job_id).await {
                        Ok(job) => job,
                        Err(StoreError::NotFound { .. }) => {
                            outcome.stale.push(job_id);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if check_lease(&job, &cluster, epoch).is_err() {
                        outcome.stale.push(job_id);
                        continue;
                    }
                    sqlx::query("UPDATE jobs SET lease_expires_ms = $1 WHERE id = $2")
                        .bind(now + ttl_ms)
                        .bind(&job_id)
                        .execute(&mut *conn)
                        .await?;
                    if job.cancel_requested || job.preempt_requested {
                        outcome.cancel.push(job_id.clone());
                    }
                    outcome.renewed.push(job_id);
                }
                Ok(outcome)
            })
        })
        .await
    }

    /// Applies an agent's report under its lease; a stale epoch is refused.
    pub async fn report(&self, report: LeaseReport) -> Result<JobRecord> {
        let ledger = self.ledger.clone();
        let backoff_ms = self.failover_base_ms();
        self.write(move |conn| {
            Box::pin(async move {
                let job = load_job(conn, &report.job_id).await?;
                check_lease(&job, &report.cluster, report.epoch)?;
                let actor = format!("agent:{}", report.cluster);
                let now = report.now;
                match &report.report {
                    Report::Running => {
                        if job.state == JobState::Placed {
                            sqlx::query("UPDATE jobs SET state = 'running', reason = 'started', started_ms = $1, updated_ms = $1 WHERE id = $2")
                                .bind(now)
                                .bind(&job.id)
                                .execute(&mut *conn)
                                .await?;
                            record_transition(conn, &job.id, Some(job.state), JobState::Running, "started", now, &actor).await?;
                        }
                    }
                    Report::Finished { state, exit_code, reason, cost_cny_minor, settlement } => {
                        if !state.is_terminal() || !job.state.can_become(*state) {
                            return Err(StoreError::Conflict(format!("job {} cannot go from {} to {state}", job.id, job.state)));
                        }
                        sqlx::query(
                            "UPDATE jobs SET state = $1, reason = $2, updated_ms = $3, finished_ms = $3, \
                             started_ms = COALESCE(started_ms, $3), exit_code = $4, cost_cny_minor = $5, \
                             lease_expires_ms = NULL WHERE id = $6",
                        )
                        .bind(state.as_str())
                        .bind(reason)
                        .bind(now)
                        .bind(*exit_code)
                        .bind(*cost_cny_minor)
                        .bind(&job.id)
                        .execute(&mut *conn)
                        .await?;
                        record_transition(conn, &job.id, Some(job.state), *state, reason, now, &actor).await?;
                        let payload = serde_json::json!({"job": job.id, "cost_cny_minor": cost_cny_minor, "exit_code": exit_code});
                        outbox(conn, now, "job.metered", &actor, &payload).await?;
                        if settlement.is_empty() {
                            void_hold(conn, &ledger, &job.id, &actor, now).await?;
                        } else if let Err(e) = apply_in_tx(conn, &ledger, settlement, &actor, now).await {
                            // the job ended all the same: record that it could not be settled
                            let StoreError::Ledger { transfer, error } = e else { return Err(e) };
                            tracing::warn!(job = %job.id, %transfer, %error, "job ended unsettled");
                            let payload = serde_json::json!({"job": job.id, "transfer": transfer, "error": error.to_string()});
                            outbox(conn, now, "ledger.unsettled", &actor, &payload).await?;
                        }
                    }
                    Report::Lost { reason } => {
                        requeue(conn, &job, reason, now, &actor, backoff_ms).await?;
                    }
                }
                load_job(conn, &report.job_id).await
            })
        })
        .await
    }

    /// Requeues every placed or running job whose lease ran out. Returns their ids.
    pub async fn expire_leases(&self, now: Millis) -> Result<Vec<String>> {
        let ledger = self.ledger.clone();
        let backoff_ms = self.failover_base_ms();
        // the scheduler asks every cycle; a read answers the usual "none" without a commit
        let due = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE state IN ('placed', 'running') AND lease_expires_ms < $1")
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        if due.try_get::<i64, _>("n")? == 0 {
            return Ok(Vec::new());
        }
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('placed', 'running') AND lease_expires_ms < $1"
                ))
                .bind(now)
                .fetch_all(&mut *conn)
                .await?;
                let jobs: Vec<JobRecord> = rows.iter().map(JobRecord::from_row).collect::<Result<_>>()?;
                let mut requeued = Vec::new();
                for job in jobs {
                    let reason = match &job.lease_holder {
                        Some(holder) => format!("lease expired: agent at {holder} stopped heartbeating"),
                        None => "lease never taken: no agent picked the job up in time".to_string(),
                    };
                    if job.cancel_requested {
                        let why = "cancelled: its agent was lost before it could stop the job";
                        sqlx::query("UPDATE jobs SET state = 'cancelled', reason = $1, updated_ms = $2, finished_ms = $2, lease_expires_ms = NULL WHERE id = $3")
                            .bind(why)
                            .bind(now)
                            .bind(&job.id)
                            .execute(&mut *conn)
                            .await?;
                        record_transition(conn, &job.id, Some(job.state), JobState::Cancelled, why, now, "scheduler").await?;
                        void_hold(conn, &ledger, &job.id, "scheduler", now).await?;
                    } else {
                        requeue(conn, &job, &reason, now, "scheduler", backoff_ms).await?;
                    }
                    requeued.push(job.id);
                }
                Ok(requeued)
            })
        })
        .await
    }

    /// After a restart, gives every live lease at least `grace_ms` so agents can reconnect
    /// before anything is requeued.
    pub async fn extend_leases(&self, until: Millis) -> Result<u64> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE jobs SET lease_expires_ms = $1 WHERE state IN ('placed', 'running') AND lease_expires_ms < $1",
                )
                .bind(until)
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    /// Deletes the output of up to `max` jobs that ended before `ended_before` (oldest
    /// first), marking each purged at `now`, with one `job.logs_purged` audit entry naming
    /// them. Returns how many jobs and lines.
    pub async fn purge_logs(
        &self,
        ended_before: Millis,
        max: i64,
        now: Millis,
    ) -> Result<(u64, u64)> {
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT id FROM jobs WHERE logs_purged_ms IS NULL AND finished_ms IS NOT NULL \
                     AND finished_ms < $1 ORDER BY finished_ms, id LIMIT $2",
                )
                .bind(ended_before)
                .bind(max)
                .fetch_all(&mut *conn)
                .await?;
                let mut jobs = Vec::with_capacity(rows.len());
                let mut lines = 0;
                for row in rows {
                    let id: String = row.try_get("id")?;
                    lines += sqlx::query("DELETE FROM job_logs WHERE job_id = $1")
                        .bind(&id)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    sqlx::query("UPDATE jobs SET logs_purged_ms = $1 WHERE id = $2")
                        .bind(now)
                        .bind(&id)
                        .execute(&mut *conn)
                        .await?;
                    jobs.push(id);
                }
                if !jobs.is_empty() {
                    let payload = serde_json::json!({"jobs": jobs, "lines": lines, "ended_before": ended_before});
                    outbox(conn, now, "job.logs_purged", "server", &payload).await?;
                }
                Ok((jobs.len() as u64, lines))
            })
        })
        .await
    }

    /// Appends output lines under the job's lease. Lines already stored are skipped, so
    /// an agent may resend after a lost reply.
    pub async fn append_logs(
        &self,
        job_id: String,
        cluster: String,
        epoch: i64,
        lines: Vec<LogLine>,
    ) -> Result<()> {
        self.write(move |conn| {
            Box::pin(async move {
                let job = load_job(conn, &job_id).await?;
                check_lease(&job, &cluster, epoch)?;
                for line in lines {
                    sqlx::query(
                        "INSERT INTO job_logs (job_id, epoch, seq, stream, line) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (job_id, epoch, seq) DO NOTHING",
                    )
                    .bind(&job_id)
                    .bind(epoch)
                    .bind(line.seq)
                    .bind(storable(line.stream))
                    .bind(storable(line.line))
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// Output lines after `(epoch, seq)`, oldest first.
    pub async fn read_logs(
        &self,
        job_id: &str,
        after: (i64, i64),
        limit: i64,
    ) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT epoch, seq, stream, line FROM job_logs WHERE job_id = $1 AND (epoch > $2 OR (epoch = $2 AND seq > $3)) \
             ORDER BY epoch, seq LIMIT $4",
        )
        .bind(job_id)
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LogLine {
                    epoch: row.try_get("epoch")?,
                    seq: row.try_get("seq")?,
                    stream: row.try_get("stream")?,
                    line: row.try_get("line")?,
                })
            })
            .collect()
    }

    /// When each cluster's agent was last heard from, and what it reported.
    pub async fn cluster_status(&self) -> Result<Vec<(String, Millis, serde_json::Value)>> {
        let rows = sqlx::query(
            "SELECT cluster, agent_seen_ms, capacity FROM cluster_status ORDER BY cluster",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let capacity: String = row.try_get("capacity")?;
                Ok((
                    row.try_get("cluster")?,
                    row.try_get("agent_seen_ms")?,
                    serde_json::from_str(&capacity).unwrap_or(serde_json::Value::Null),
                ))
            })
            .collect()
    }

    /// A tenant's jobs that ended in `[from, to)`, by end time.
    pub async fn jobs_finished_between(
        &self,
        tenant: &str,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND finished_ms >= $2 AND finished_ms < $3 ORDER BY finished_ms, id"
        ))
        .bind(tenant)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(JobRecord::from_row).collect()
    }

    /// How many jobs are in each state.
    pub async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok((
                    state.parse().map_err(StoreError::Corrupt)?,
                    row.try_get("n")?,
                ))
            })
            .collect()
    }
}

/// Output as the store can keep it: PostgreSQL's text cannot hold NUL, so a NUL becomes
/// U+FFFD, as an invalid UTF-8 byte already has.
fn storable(text: String) -> String {
    match text.contains('\0') {
        true => text.replace('\0', "\u{fffd}"),
        false => text,
    }
}

/// [`Store::cancel`] inside a transaction.
pub(crate) async fn cancel_in(
    conn: &mut AnyConnection,
    ledger: &LedgerCell,
    job_id: &str,
    actor: &str,
    now: Millis,
) -> Result<(Outcome, JobRecord)> {
    let job = load_job(conn, job_id).await?;
    let outcome = match job.state {
        s if s.is_terminal() => Outcome::AlreadyEnded,
        JobState::Queued | JobState::Placed if job.lease_holder.is_none() => {
            let reason = format!("cancelled by {actor}");
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', reason = $1, updated_ms = $2, finished_ms = $2, \
                 lease_expires_ms = NULL WHERE id = $3",
            )
            .bind(&reason)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            record_transition(
                conn,
                job_id,
                Some(job.state),
                JobState::Cancelled,
                &reason,
                now,
                actor,
            )
            .await?;
            void_hold(conn, ledger, job_id, actor, now).await?;
            Outcome::Cancelled
        }
        _ => {
            sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
            outbox(
                conn,
                now,
                "job.cancel_requested",
                actor,
                &serde_json::json!({"job": job_id}),
            )
            .await?;
            Outcome::Requested
        }
    };
    Ok((outcome, load_job(conn, job_id).await?))
}
