//! The data zone's state: the export counters the cross-border rules need, and flow
//! decisions written with their audit entry in one transaction.

use baygrid_core::Millis;
use sqlx::{AnyConnection, Row};

use crate::{outbox, Result, Store, StoreError};

/// What a flow decision records: its audit payload and, when the flow counts, the
/// category and number of individuals it adds to the exporter's total for the year.
pub struct FlowRecord {
    pub payload: serde_json::Value,
    pub counts: Option<(String, i64)>,
    /// What the caller gets back once the record is durable.
    pub answer: serde_json::Value,
    /// What the flow obliges, when allowed: (obligation, rule, due date or "").
    pub obligations: Vec<(String, String, String)>,
    /// The parties and data set, for the obligations' rows.
    pub exporter: String,
    pub recipient: String,
    pub dataset: String,
}

/// Where an obligation stands on a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Dated, on or after the day.
    Due,
    /// Dated, before the day.
    Overdue,
    /// Without a date.
    Standing,
}

impl Standing {
    pub const ALL: [Standing; 3] = [Standing::Due, Standing::Overdue, Standing::Standing];

    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Due => "due",
            Standing::Overdue => "overdue",
            Standing::Standing => "standing",
        }
    }

    /// Where an obligation due on `due` (YYYY-MM-DD, or "" when it has no date) stands on
    /// `today` (YYYY-MM-DD).
    pub fn of(due: &str, today: &str) -> Standing {
        if due.is_empty() {
            Standing::Standing
        } else if due < today {
            Standing::Overdue
        } else {
            Standing::Due
        }
    }
}

/// Which obligations to list, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct ObligationFilter<'a> {
    /// Only those of this party, as exporter or recipient.
    pub party: Option<&'a str>,
    /// Only those standing so on the day (YYYY-MM-DD).
    pub standing: Option<(Standing, &'a str)>,
    /// Only those numbered above this one (the next page).
    pub after: Option<i64>,
    pub limit: i64,
}

/// One obligation an allowed flow brought.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObligationRow {
    pub id: i64,
    pub decided_ms: Millis,
    pub exporter: String,
    pub recipient: String,
    pub dataset: String,
    pub obligation: String,
    pub rule: String,
    /// YYYY-MM-DD, or "" when it has no date.
    pub due: String,
}

async fn totals(conn: &mut AnyConnection, exporter: &str, year: i64) -> Result<(i64, i64)> {
    let rows = sqlx::query(
        "SELECT category, subjects FROM export_counters WHERE exporter = $1 AND year = $2",
    )
    .bind(exporter)
    .bind(year)
    .fetch_all(&mut *conn)
    .await?;
    let mut personal = 0;
    let mut sensitive = 0;
    for row in &rows {
        let category: String = row.try_get("category")?;
        let subjects: i64 = row.try_get("subjects")?;
        match category.as_str() {
            "personal" => personal = subjects,
            "sensitive" => sensitive = subjects,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "export counter category `{other}`"
                )))
            }
        }
    }
    Ok((personal, sensitive))
}

impl Store {
    /// An exporter's totals for a year: (non-sensitive, sensitive) individuals.
    pub async fn export_totals(&self, exporter: &str, year: i64) -> Result<(i64, i64)> {
        let mut conn = self.pool().acquire().await?;
        totals(&mut conn, exporter, year).await
    }

    /// Decides a flow inside the writer's transaction: `decide` gets the exporter's totals
    /// for the year as they stand, so two flows decided together cannot both slip under a
    /// threshold. Its record is written to the audit log and, when the flow counts, added to
    /// the totals, in the same transaction. Returns the record's answer.
    pub async fn decide_flow<F>(
        &self,
        exporter: String,
        year: i64,
        actor: String,
        now: Millis,
        decide: F,
    ) -> Result<serde_json::Value>
    where
        F: FnOnce(i64, i64) -> std::result::Result<FlowRecord, String> + Send + 'static,
    {
        self.write(move |conn| {
            Box::pin(async move {
                let (personal, sensitive) = totals(conn, &exporter, year).await?;
                let record = decide(personal, sensitive).map_err(StoreError::Conflict)?;
                outbox(conn, now, "flow.decision", &actor, &record.payload).await?;
                for (obligation, rule, due) in &record.obligations {
                    sqlx::query(
                        "INSERT INTO obligations (id, decided_ms, exporter, recipient, dataset, obligation, rule, due) \
                         VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM obligations), $1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(now)
                    .bind(&record.exporter)
                    .bind(&record.recipient)
                    .bind(&record.dataset)
                    .bind(obligation)
                    .bind(rule)
                    .bind(due)
                    .execute(&mut *conn)
                    .await?;
                }
                if let Some((category, subjects)) = &record.counts {
                    sqlx::query(
                        "INSERT INTO export_counters (exporter, year, category, subjects) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (exporter, year, category) DO UPDATE SET subjects = export_counters.subjects + $4",
                    )
                    .bind(&exporter)
                    .bind(year)
                    .bind(category)
                    .bind(*subjects)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(record.answer)
            })
        })
        .await
    }

    /// Takes a flow that was counted but never happened (its copy failed) back out of the
    /// exporter's totals, with its record in the audit log, in one transaction.
    pub async fn compensate_flow(
        &self,
        exporter: String,
        year: i64,
        counted: Option<(String, i64)>,
        actor: String,
        now: Millis,
        payload: serde_json::Value,
    ) -> Result<()> {
        self.write(move |conn| {
            Box::pin(async move {
                if let Some((category, subjects)) = &counted {
                    sqlx::query(
                        "UPDATE export_counters SET subjects = subjects - $1 \
                         WHERE exporter = $2 AND year = $3 AND category = $4",
                    )
                    .bind(*subjects)
                    .bind(&exporter)
                    .bind(year)
                    .bind(category)
                    .execute(&mut *conn)
                    .await?;
                }
                outbox(conn, now, "flow.compensated", &actor, &payload).await
            })
        })
        .await
    }

    /// Obligations, oldest first, a page at a time: only those of the filter's party (as
    /// exporter or recipient) and in its standing when given, after the obligation numbered
    /// `after` when given.
    pub async fn obligations(&self, filter: &ObligationFilter<'_>) -> Result<Vec<ObligationRow>> {
        let (standing, today) = match filter.standing {
            Some((standing, today)) => (standing.as_str(), today),
            None => ("", ""),
        };
        let rows = sqlx::query(
            "SELECT id, decided_ms, exporter, recipient, dataset, obligation, rule, due FROM obligations \
             WHERE ($1 = '' OR exporter = $1 OR recipient = $1) AND id > $2 \
             AND ($3 = '' OR ($3 = 'standing' AND due = '') \
                  OR ($3 = 'overdue' AND due <> '' AND due < $4) \
                  OR ($3 = 'due' AND due <> '' AND due >= $4)) \
             ORDER BY id LIMIT $5",
        )
        .bind(filter.party.unwrap_or(""))
        .bind(filter.after.unwrap_or(0))
        .bind(standing)
        .bind(today)
        .bind(filter.limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ObligationRow {
                    id: row.try_get("id")?,
                    decided_ms: row.try_get("decided_ms")?,
                    exporter: row.try_get("exporter")?,
                    recipient: row.try_get("recipient")?,
                    dataset: row.try_get("dataset")?,
                    obligation: row.try_get("obligation")?,
                    rule: row.try_get("rule")?,
                    due: row.try_get("due")?,
                })
            })
            .collect()
    }
}
