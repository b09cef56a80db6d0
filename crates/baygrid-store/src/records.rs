//! Rows as the rest of the system sees them.

use baygrid_core::{Allocation, JobSpec, JobState, Millis, Role};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Result, StoreError};

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub reason: String,
    pub priority: i64,
    pub submitted_ms: Millis,
    pub updated_ms: Millis,
    pub allocation: Option<Allocation>,
    pub lease_epoch: i64,
    pub lease_holder: Option<String>,
    pub lease_expires_ms: Option<Millis>,
    pub cancel_requested: bool,
    /// The scheduler asked for it to be stopped and queued again.
    pub preempt_requested: bool,
    pub attempts: i64,
    pub started_ms: Option<Millis>,
    pub finished_ms: Option<Millis>,
    pub exit_code: Option<i64>,
    pub cost_cny_minor: Option<i64>,
    /// When its output was deleted under the server's log retention.
    pub logs_purged_ms: Option<Millis>,
}

pub(crate) const JOB_COLUMNS: &str =
    "id, tenant, name, spec, state, reason, priority, submitted_ms, updated_ms, \
     allocation, lease_epoch, lease_holder, lease_expires_ms, cancel_requested, preempt_requested, attempts, \
     started_ms, finished_ms, exit_code, cost_cny_minor, logs_purged_ms";

impl JobRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<JobRecord> {
        let spec: String = row.try_get("spec")?;
        let spec: JobSpec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
        let state: String = row.try_get("state")?;
        let state: JobState = state.parse().map_err(StoreError::Corrupt)?;
        let allocation: Option<String> = row.try_get("allocation")?;
        let allocation = allocation
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job allocation: {e}")))?;
        Ok(JobRecord {
            id: row.try_get("id")?,
            tenant: row.try_get("tenant")?,
            name: row.try_get("name")?,
            spec,
            state,
            reason: row.try_get("reason")?,
            priority: row.try_get("priority")?,
            submitted_ms: row.try_get("submitted_ms")?,
            updated_ms: row.try_get("updated_ms")?,
            allocation,
            lease_epoch: row.try_get("lease_epoch")?,
            lease_holder: row.try_get("lease_holder")?,
            lease_expires_ms: row.try_get("lease_expires_ms")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            preempt_requested: row.try_get::<i64, _>("preempt_requested")? != 0,
            attempts: row.try_get("attempts")?,
            started_ms: row.try_get("started_ms")?,
            finished_ms: row.try_get("finished_ms")?,
            exit_code: row.try_get("exit_code")?,
            cost_cny_minor: row.try_get("cost_cny_minor")?,
            logs_purged_ms: row.try_get("logs_purged_ms")?,
        })
    }
}

/// One transition in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobEvent {
    pub seq: i64,
    pub at_ms: Millis,
    pub from_state: Option<JobState>,
    pub to_state: JobState,
    pub reason: String,
}

impl JobEvent {
    pub(crate) fn from_row(row: &AnyRow) -> Result<JobEvent> {
        let from: Option<String> = row.try_get("from_state")?;
        let to: String = row.try_get("to_state")?;
        Ok(JobEvent {
            seq: row.try_get("seq")?,
            at_ms: row.try_get("at_ms")?,
            from_state: from
                .map(|s| s.parse())
                .transpose()
                .map_err(StoreError::Corrupt)?,
            to_state: to.parse().map_err(StoreError::Corrupt)?,
            reason: row.try_get("reason")?,
        })
    }
}

/// One line of a job's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub epoch: i64,
    pub seq: i64,
    pub stream: String,
    pub line: String,
}

/// A bearer token as stored: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub id: String,
    #[serde(skip)]
    pub hash: String,
    pub role: Role,
    pub subject: Option<String>,
    pub label: String,
    pub created_ms: Millis,
    pub revoked_ms: Option<Millis>,
    /// After this the token is refused; none: it does not expire.
    pub expires_ms: Option<Millis>,
}

impl TokenRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<TokenRecord> {
        let role: String = row.try_get("role")?;
        Ok(TokenRecord {
            id: row.try_get("id")?,
            hash: row.try_get("hash")?,
            role: role.parse().map_err(StoreError::Corrupt)?,
            subject: row.try_get("subject")?,
            label: row.try_get("label")?,
            created_ms: row.try_get("created_ms")?,
            revoked_ms: row.try_get("revoked_ms")?,
            expires_ms: row.try_get("expires_ms")?,
        })
    }
}
