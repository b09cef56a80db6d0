//! Aggregate queries run at the data: their records, and the privacy budget they spend.
//! A query's spend, its record, the hold on the consumer's wallet and its audit entry are
//! written in one transaction, after the budgets are summed inside it, so concurrent queries
//! can never spend past a budget.

use baygrid_core::Millis;
use baygrid_ledger::Transfer;
use sqlx::{AnyConnection, Row};

use crate::ledger::apply_in_tx;
use crate::{outbox, Below, NewJob, Result, Store, StoreError};

/// ε is kept in millionths and δ in 10⁻¹⁵, so that budget sums are exact.
pub const EPSILON_UNIT: f64 = 1e6;
pub const DELTA_UNIT: f64 = 1e15;

/// A record kept as its JSON body with its state: a query, or a fusion run.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordRow {
    pub id: String,
    pub tenant: String,
    /// `running` until it ends (a query: released | withheld | failed; a fusion run:
    /// succeeded | failed | cancelled)
    pub state: String,
    pub created_ms: Millis,
    pub finished_ms: Option<Millis>,
    pub body: serde_json::Value,
}

pub type QueryRow = RecordRow;
pub type FusionRow = RecordRow;

/// Which queries or fusion runs to list, newest first.
#[derive(Debug, Clone, Copy)]
pub struct RecordFilter<'a> {
    pub tenant: Option<&'a str>,
    pub state: Option<&'a str>,
    /// Only rows listed after this one (the next page).
    pub before: Option<&'a Below>,
    pub limit: i64,
}

/// The tables of records kept as a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Records {
    Queries,
    Fusion,
}

impl Records {
    fn table(self) -> &'static str {
        match self {
            Records::Queries => "queries",
            Records::Fusion => "fusion_runs",
        }
    }

    /// The conversation its relay messages belong to.
    fn conversation(self, id: &str) -> String {
        match self {
            Records::Queries => crate::relay::query_conversation(id),
            Records::Fusion => crate::relay::fusion_conversation(id),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Records::Queries => "query",
            Records::Fusion => "fusion run",
        }
    }
}

/// What one query spends from one dataset's budgets, and the budgets' limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Spend {
    pub dataset: String,
    pub tenant: String,
    pub period_start: Millis,
    /// (ε millionths, δ 10⁻¹⁵)
    pub amount: (i64, i64),
    /// The consumer's own budget on the dataset, and the one every consumer shares.
    pub consumer_limit: (i64, i64),
    pub shared_limit: (i64, i64),
}

/// What has been spent of a dataset's budgets this period: (ε, δ) in stored units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spent {
    pub consumer: (i64, i64),
    pub shared: (i64, i64),
}

async fn spent(
    conn: &mut AnyConnection,
    dataset: &str,
    tenant: &str,
    period_start: Millis,
) -> Result<Spent> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(epsilon_micros), 0) AS BIGINT) AS e, \
                CAST(COALESCE(SUM(delta_femtos), 0) AS BIGINT) AS d, \
                CAST(COALESCE(SUM(CASE WHEN tenant = $3 THEN epsilon_micros ELSE 0 END), 0) AS BIGINT) AS mine_e, \
                CAST(COALESCE(SUM(CASE WHEN tenant = $3 THEN delta_femtos ELSE 0 END), 0) AS BIGINT) AS mine_d \
         FROM privacy_spends WHERE dataset = $1 AND period_start_ms = $2",
    )
    .bind(dataset)
    .bind(period_start)
    .bind(tenant)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Spent {
        consumer: (row.try_get("mine_e")?, row.try_get("mine_d")?),
        shared: (row.try_get("e")?, row.try_get("d")?),
    })
}

fn row_of(row: &sqlx::any::AnyRow) -> Result<RecordRow> {
    let body: String = row.try_get("body")?;
    Ok(RecordRow {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        state: row.try_get("state")?,
        created_ms: row.try_get("created_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        body: serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("record body: {e}")))?,
    })
}

async fn insert(conn: &mut AnyConnection, records: Records, row: &RecordRow) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {} (id, tenant, state, created_ms, finished_ms, body) VALUES ($1, $2, $3, $4, $5, $6)",
        records.table()
    ))
    .bind(&row.id)
    .bind(&row.tenant)
    .bind(&row.state)
    .bind(row.created_ms)
    .bind(row.finished_ms)
    .bind(row.body.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// What has been spent of `dataset`'s budgets in the period starting at `period_start`,
    /// by `tenant` and by everyone.
    pub async fn privacy_spent(
        &self,
        dataset: &str,
        tenant: &str,
        period_start: Millis,
    ) -> Result<Spent> {
        let mut conn = self.pool().acquire().await?;
        spent(&mut conn, dataset, tenant, period_start).await
    }

    /// Accepts a query: every spend must fit both of its budgets as they stand inside this
    /// transaction, or nothing is written and the error says which budget and by how much.
    /// Then the spends, the record, the hold on the consumer's wallet and the audit entry
    /// are written together. The record's body (in place of `row`'s) is `body` called with
    /// what each dataset's budgets have spent once this query's spends are in, in the order
    /// of `spends`.
    pub async fn accept_query<B>(
        &self,
        mut row: QueryRow,
        spends: Vec<Spend>,
        hold: Option<Transfer>,
        actor: String,
        payload: serde_json::Value,
        body: B,
    ) -> Result<()>
    where
        B: FnOnce(&[Spent]) -> serde_json::Result<serde_json::Value> + Send + 'static,
    {
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let mut after = Vec::with_capacity(spends.len());
                for s in &spends {
                    let before = spent(conn, &s.dataset, &s.tenant, s.period_start).await?;
                    for (whose, used, limit) in [
                        ("the consumer's", before.consumer, s.consumer_limit),
                        ("the shared", before.shared, s.shared_limit),
                    ] {
                        for (field, symbol, used, amount, limit, unit) in [
                            ("epsilon", "ε", used.0, s.amount.0, limit.0, EPSILON_UNIT),
                            ("delta", "δ", used.1, s.amount.1, limit.1, DELTA_UNIT),
                        ] {
                            if used + amount > limit {
                                return Err(StoreError::Conflict(format!(
                                    "{field}: the query needs {symbol} {} of `{}`; {whose} budget has {} left this period",
                                    amount as f64 / unit,
                                    s.dataset,
                                    (limit - used).max(0) as f64 / unit
                                )));
                            }
                        }
                    }
                    let add = |a: (i64, i64)| (a.0 + s.amount.0, a.1 + s.amount.1);
                    after.push(Spent {
                        consumer: add(before.consumer),
                        shared: add(before.shared),
                    });
                }
                row.body = body(&after)
                    .map_err(|e| StoreError::Corrupt(format!("query record: {e}")))?;
                for s in &spends {
                    sqlx::query(
                        "INSERT INTO privacy_spends (query, dataset, tenant, period_start_ms, epsilon_micros, delta_femtos, at_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&row.id)
                    .bind(&s.dataset)
                    .bind(&s.tenant)
                    .bind(s.period_start)
                    .bind(s.amount.0)
                    .bind(s.amount.1)
                    .bind(row.created_ms)
                    .execute(&mut *conn)
                    .await?;
                }
                insert(conn, Records::Queries, &row).await?;
                if let Some(hold) = hold {
                    apply_in_tx(conn, &cell, &[hold], &actor, row.created_ms).await?;
                }
                outbox(conn, row.created_ms, "query.accepted", &actor, &payload).await
            })
        })
        .await
    }

    /// Accepts a fusion run: its record, the hold on the consumer's wallet, its workers'
    /// jobs (queued, each with its own hold) and the audit entry together.
    pub async fn accept_fusion(
        &self,
        row: FusionRow,
        hold: Option<Transfer>,
        workers: Vec<NewJob>,
        actor: String,
        payload: serde_json::Value,
    ) -> Result<()> {
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move {
                insert(conn, Records::Fusion, &row).await?;
                if let Some(hold) = hold {
                    apply_in_tx(conn, &cell, &[hold], &actor, row.created_ms).await?;
                }
                for job in workers {
                    crate::jobs::submit_one(conn, &cell, job).await?;
                }
                outbox(conn, row.created_ms, "fusion.accepted", &actor, &payload).await
            })
        })
        .await
    }

    /// Rewrites a running query's record (its sides claimed or answered).
    pub async fn update_query(&self, id: String, body: serde_json::Value) -> Result<()> {
        self.update_record(Records::Queries, id, body).await
    }

    /// Rewrites a running fusion run's record (workers claimed, rounds, models).
    pub async fn update_fusion(&self, id: String, body: serde_json::Value) -> Result<()> {
        self.update_record(Records::Fusion, id, body).await
    }

    async fn update_record(
        &self,
        records: Records,
        id: String,
        body: serde_json::Value,
    ) -> Result<()> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(&format!(
                    "UPDATE {} SET body = $1 WHERE id = $2 AND state = 'running'",
                    records.table()
                ))
                .bind(body.to_string())
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "{} `{id}` is not running",
                        records.noun()
                    )));
                }
                Ok(())
            })
        })
        .await
    }

    /// Ends a running query: its record, the ledger's transfers (the charge, or the hold
    /// voided) and its audit entry in one transaction.
    pub async fn finish_query(&self, id: String, end: Ending) -> Result<()> {
        self.finish_record(Records::Queries, id, end, vec![]).await
    }

    /// Ends a running fusion run, as [`Store::finish_query`] ends a query, and cancels
    /// the jobs of its workers that have not ended.
    pub async fn finish_fusion(&self, id: String, end: Ending, workers: Vec<String>) -> Result<()> {
        self.finish_record(Records::Fusion, id, end, workers).await
    }

    async fn finish_record(
        &self,
        records: Records,
        id: String,
        end: Ending,
        cancel: Vec<String>,
    ) -> Result<()> {
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(&format!(
                    "UPDATE {} SET state = $1, body = $2, finished_ms = $3 WHERE id = $4 AND state = 'running'",
                    records.table()
                ))
                .bind(&end.state)
                .bind(end.body.to_string())
                .bind(end.now)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "{} `{id}` is not running",
                        records.noun()
                    )));
                }
                apply_in_tx(conn, &cell, &end.transfers, &end.actor, end.now).await?;
                crate::relay::forget_in(conn, &records.conversation(&id)).await?;
                for job in &cancel {
                    crate::jobs::cancel_in(conn, &cell, job, &end.actor, end.now).await?;
                }
                outbox(conn, end.now, end.kind, &end.actor, &end.payload).await
            })
        })
        .await
    }

    pub async fn query_row(&self, id: &str) -> Result<Option<QueryRow>> {
        self.record_row(Records::Queries, id).await
    }

    pub async fn fusion_row(&self, id: &str) -> Result<Option<FusionRow>> {
        self.record_row(Records::Fusion, id).await
    }

    async fn record_row(&self, records: Records, id: &str) -> Result<Option<RecordRow>> {
        let row = sqlx::query(&format!("SELECT * FROM {} WHERE id = $1", records.table()))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(row_of).transpose()
    }

    /// Queries, newest first: one tenant's when given, in one state when given, below a
    /// row when given (the next page).
    pub async fn query_rows(&self, filter: &RecordFilter<'_>) -> Result<Vec<QueryRow>> {
        self.record_rows(Records::Queries, filter).await
    }

    /// Fusion runs, newest first: one tenant's when given, in one state when given, below
    /// a row when given (the next page).
    pub async fn fusion_rows(&self, filter: &RecordFilter<'_>) -> Result<Vec<FusionRow>> {
        self.record_rows(Records::Fusion, filter).await
    }

    /// Every query in a state, newest first.
    pub async fn every_query_row(&self, state: &str) -> Result<Vec<QueryRow>> {
        self.every_record_row(Records::Queries, state).await
    }

    /// Every fusion run in a state, newest first.
    pub async fn every_fusion_row(&self, state: &str) -> Result<Vec<FusionRow>> {
        self.every_record_row(Records::Fusion, state).await
    }

    /// Every row in a state, read a page at a time.
    async fn every_record_row(&self, records: Records, state: &str) -> Result<Vec<RecordRow>> {
        const PAGE: i64 = 1000;
        let mut all: Vec<RecordRow> = Vec::new();
        loop {
            let below = all.last().map(|r| Below {
                at_ms: r.created_ms,
                id: r.id.clone(),
            });
            let page = self
                .record_rows(
                    records,
                    &RecordFilter {
                        tenant: None,
                        state: Some(state),
                        before: below.as_ref(),
                        limit: PAGE,
                    },
                )
                .await?;
            let last = (page.len() as i64) < PAGE;
            all.extend(page);
            if last {
                return Ok(all);
            }
        }
    }

    async fn record_rows(
        &self,
        records: Records,
        filter: &RecordFilter<'_>,
    ) -> Result<Vec<RecordRow>> {
        let (below_at, below_id) = match filter.before {
            Some(below) => (below.at_ms, below.id.as_str()),
            None => (0, ""),
        };
        let rows = sqlx::query(&format!(
            "SELECT * FROM {} WHERE ($1 = '' OR tenant = $1) AND ($2 = '' OR state = $2) \
             AND ($3 = '' OR created_ms < $4 OR (created_ms = $4 AND id < $3)) \
             ORDER BY created_ms DESC, id DESC LIMIT $5",
            records.table()
        ))
        .bind(filter.tenant.unwrap_or(""))
        .bind(filter.state.unwrap_or(""))
        .bind(below_id)
        .bind(below_at)
        .bind(filter.limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(row_of).collect()
    }
}

impl Store {
    /// One tenant's queries and fusion runs that ended in `[from, to)`, oldest first, each
    /// with its kind (`query` or `fusion`).
    pub async fn data_uses_finished_between(
        &self,
        tenant: &str,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(&'static str, RecordRow)>> {
        let mut uses = Vec::new();
        for (kind, records) in [("query", Records::Queries), ("fusion", Records::Fusion)] {
            let rows = sqlx::query(&format!(
                "SELECT * FROM {} WHERE tenant = $1 AND finished_ms >= $2 AND finished_ms < $3",
                records.table()
            ))
            .bind(tenant)
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await?;
            for row in &rows {
                uses.push((kind, row_of(row)?));
            }
        }
        uses.sort_by(|a, b| (a.1.finished_ms, &a.1.id).cmp(&(b.1.finished_ms, &b.1.id)));
        Ok(uses)
    }
}

/// How a running record ends: its new state and body, the ledger's transfers (a charge,
/// or a hold voided), and the audit entry.
#[derive(Debug, Clone)]
pub struct Ending {
    pub state: String,
    pub body: serde_json::Value,
    pub transfers: Vec<Transfer>,
    pub actor: String,
    pub now: Millis,
    pub kind: &'static str,
    pub payload: serde_json::Value,
}
