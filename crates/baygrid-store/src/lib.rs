//! Durable state behind one [`Store`]: SQLite (the embedded default, WAL, `synchronous=FULL`)
//! or PostgreSQL (`synchronous_commit=on`), chosen by URL, with the same schema and the same
//! code path through sqlx's `Any` driver.
//!
//! Every state change is one transaction and writes its outbox entry (what the audit log
//! will append) in that same transaction. Writes go through a single writer task that
//! commits them in groups: concurrent callers share one fsync, and each caller is answered
//! only after its commit. Within a group every change runs under its own savepoint, so one
//! failing change never takes the others down.

mod claim;
mod jobs;
mod ledger;
mod queries;
mod records;
mod relay;
pub mod testing;
mod zone;

use std::any::Any as StdAny;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use tokio::sync::{mpsc, oneshot};

pub use claim::ServerClaim;
pub use jobs::{
    failover_backoff, ActiveAllocation, Below, ClusterBlock, HeartbeatOutcome, JobFilter,
    LeaseReport, NewJob, Outcome, Report, FAILOVER_BACKOFF_MAX_MS, FAILOVER_BACKOFF_MS, PREEMPTING,
};
pub use ledger::{StatementLine, TransferRecord};
pub use queries::{
    Ending, FusionRow, QueryRow, RecordFilter, RecordRow, Spend, Spent, DELTA_UNIT, EPSILON_UNIT,
};
pub use records::{JobEvent, JobRecord, LogLine, TokenRecord};
pub use relay::{fusion_conversation, mailbox, query_conversation, Posted, RelayMessage};
pub use zone::{FlowRecord, ObligationFilter, ObligationRow, Standing};

use baygrid_core::Millis;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{kind} `{id}` not found")]
    NotFound { kind: &'static str, id: String },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("stale lease: {0}")]
    StaleLease(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("unsupported store url `{0}`: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("the store is taken: {0}")]
    Claimed(String),
    #[error("ledger refused transfer {transfer}: {error}")]
    Ledger {
        transfer: String,
        error: baygrid_ledger::TransferError,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The setting that makes an acknowledged commit durable.
    pub fn durability(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite journal_mode=WAL synchronous=FULL",
            Backend::Postgres => "postgresql synchronous_commit=on",
        }
    }
}

type Work = Box<
    dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<Box<dyn StdAny + Send>>>
        + Send,
>;

enum WriteRequest {
    /// Any change, run under its own savepoint.
    Work {
        work: Work,
        reply: oneshot::Sender<Result<Box<dyn StdAny + Send>>>,
    },
    /// A job submission: the group's submissions are written together with multi-row
    /// statements, and one at a time only if that fails.
    Submit {
        job: Box<NewJob>,
        reply: oneshot::Sender<Result<(JobRecord, bool)>>,
    },
}

/// Most changes committed together in one transaction.
pub const MAX_GROUP: usize = 512;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    writer: mpsc::Sender<WriteRequest>,
    backend: Backend,
    /// The SQLite database's file (none on PostgreSQL or in memory), for [`Store::claim`].
    sqlite_file: Option<std::path::PathBuf>,
    ledger: std::sync::Arc<ledger::LedgerCell>,
    /// The first failover back-off, in ms (see [`failover_backoff`]).
    failover_backoff_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Store {
    /// Sets the first failover back-off (ms); later losses double it, up to an hour.
    pub fn set_failover_backoff(&self, ms: i64) {
        self.failover_backoff_ms
            .store(ms.max(0), std::sync::atomic::Ordering::Relaxed);
    }

    fn failover_base_ms(&self) -> i64 {
        self.failover_backoff_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens (creating when needed) and migrates the store at `url`:
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        use sqlx::ConnectOptions;
        // big multi-row batches are slow by design: note them at debug level, not as warnings
        let options: AnyConnectOptions = url
            .parse::<AnyConnectOptions>()?
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 8,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    let settings: &[&str] = match backend {
                        Backend::Sqlite => &[
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA synchronous=FULL",
                            "PRAGMA busy_timeout=10000",
                            // 64 MiB of page cache: index pages stay hot between commits
                            "PRAGMA cache_size=-65536",
                        ],
                        Backend::Postgres => &["SET synchronous_commit = on"],
                    };
                    for statement in settings {
                        conn.execute(*statement).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        let ledger = {
            let mut conn = pool.acquire().await?;
            std::sync::Arc::new(ledger::load_cell(&mut conn).await?)
        };
        let (writer, inbox) = mpsc::channel(8 * MAX_GROUP);
        tokio::spawn(write_loop(pool.clone(), inbox, ledger.clone()));
        Ok(Store {
            pool,
            writer,
            backend,
            sqlite_file: claim::sqlite_file(&url),
            ledger,
            failover_backoff_ms: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(
                jobs::FAILOVER_BACKOFF_MS,
            )),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Stores a new queued job. With an idempotency key already used by this tenant,
    /// returns the first job instead, and `false`. Concurrent submissions are written
    /// together in the writer's next group.
    pub async fn submit(&self, job: NewJob) -> Result<(JobRecord, bool)> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Submit {
                job: Box::new(job),
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Runs `work` as one change inside a group-committed transaction, and returns its
    /// result once the transaction is durable. An error from `work` rolls back that change
    /// alone.
    pub async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let fut = work(conn);
            Box::pin(async move { fut.await.map(|v| Box::new(v) as Box<dyn StdAny + Send>) })
        });
        self.writer
            .send(WriteRequest::Work { work, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        let value = answer.await.map_err(|_| StoreError::WriterGone)??;
        value
            .downcast::<T>()
            .map(|v| *v)
            .map_err(|_| StoreError::Corrupt("writer returned another type".into()))
    }

    /// Number of rows in a table, for tests and figures.
    pub async fn count(&self, table: &str) -> Result<i64> {
        let allowed = [
            "jobs",
            "job_events",
            "job_logs",
            "outbox",
            "tokens",
            "catalog",
            "ledger_accounts",
            "ledger_transfers",
            "export_counters",
            "queries",
            "privacy_spends",
            "relay_messages",
        ];
        if !allowed.contains(&table) {
            return Err(StoreError::Conflict(format!("no table `{table}`")));
        }
        let row = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }
}

async fn write_loop(
    pool: AnyPool,
    mut inbox: mpsc::Receiver<WriteRequest>,
    ledger: std::sync::Arc<ledger::LedgerCell>,
) {
    while let Some(first) = inbox.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match inbox.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        commit_group(&pool, group, &ledger).await;
    }
}

async fn commit_group(
    pool: &AnyPool,
    group: Vec<WriteRequest>,
    ledger: &std::sync::Arc<ledger::LedgerCell>,
) {
    ledger.begin_group();
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return fail_all(group, &e),
    };
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_all(group, &e),
    };
    let mut works = Vec::new();
    let mut submits = Vec::new();
    for request in group {
        match request {
            WriteRequest::Work { work, reply } => works.push((work, reply)),
            WriteRequest::Submit { job, reply } => submits.push((*job, reply)),
        }
    }
    let mut answers = Vec::with_capacity(works.len());
    let mut any_ok = false;
    for (work, reply) in works {
        let result = in_savepoint(&mut tx, ledger, |conn| work(conn)).await;
        any_ok |= result.is_ok();
        answers.push((reply, result));
    }
    let jobs: Vec<NewJob> = submits.iter().map(|(job, _)| job.clone()).collect();
    let submitted = match in_savepoint(&mut tx, ledger, |conn| {
        let cell = ledger.clone();
        Box::pin(async move { jobs::submit_batch(conn, &cell, jobs).await })
    })
    .await
    {
        Ok(records) => records,
        Err(_) => {
            // find the offending submissions: each on its own
            let mut one_by_one = Vec::with_capacity(submits.len());
            for (job, _) in &submits {
                let job = job.clone();
                one_by_one.push(
                    in_savepoint(&mut tx, ledger, |conn| {
                        let cell = ledger.clone();
                        Box::pin(async move { jobs::submit_one(conn, &cell, job).await })
                    })
                    .await,
                );
            }
            one_by_one
        }
    };
    any_ok |= submitted
        .iter()
        .any(|r: &Result<(JobRecord, bool)>| r.is_ok());
    let committed = if any_ok {
        tx.commit().await
    } else {
        tx.rollback().await
    };
    let commit_error = committed.err().map(|e| {
        tracing::error!(error = %e, "group commit failed");
        e.to_string()
    });
    if (commit_error.is_some() || !any_ok) && ledger.group_touched() {
        // memory holds transfers the database does not: rebuild it from what was committed
        let reloaded = match pool.acquire().await {
            Ok(mut conn) => ledger.reload(&mut conn).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = reloaded {
            tracing::error!(error = %e, "cannot rebuild the ledger; stopping the writer");
            std::process::abort();
        }
    }
    for (reply, result) in answers {
        let _ = reply.send(settle(&commit_error, result));
    }
    for ((_, reply), result) in submits.into_iter().zip(submitted) {
        let _ = reply.send(settle(&commit_error, result));
    }
}

/// A change's answer once its group's commit is known: a failed commit fails it.
fn settle<T>(commit_error: &Option<String>, result: Result<T>) -> Result<T> {
    match (commit_error, result) {
        (Some(e), Ok(_)) => Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "commit failed: {e}"
        )))),
        (_, result) => result,
    }
}

/// Runs one change under a savepoint, rolling back to it when the change fails. A failed
/// change that altered the in-memory ledger has it rebuilt from the transaction's view.
async fn in_savepoint<'t, T, F>(
    conn: &'t mut AnyConnection,
    ledger: &ledger::LedgerCell,
    work: F,
) -> Result<T>
where
    F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T>>,
{
    conn.execute("SAVEPOINT change").await?;
    ledger.begin_change();
    let result = work(&mut *conn).await;
    let end = if result.is_ok() {
        "RELEASE SAVEPOINT change"
    } else {
        "ROLLBACK TO SAVEPOINT change"
    };
    conn.execute(end).await?;
    if result.is_err() {
        conn.execute("RELEASE SAVEPOINT change").await?;
        if ledger.change_touched() {
            ledger.reload(conn).await?;
        }
    }
    result
}

fn fail_all(group: Vec<WriteRequest>, error: &sqlx::Error) {
    tracing::error!(error = %error, "store unavailable");
    let failure =
        || StoreError::Database(sqlx::Error::Protocol(format!("store unavailable: {error}")));
    for request in group {
        match request {
            WriteRequest::Work { reply, .. } => {
                let _ = reply.send(Err(failure()));
            }
            WriteRequest::Submit { reply, .. } => {
                let _ = reply.send(Err(failure()));
            }
        }
    }
}

/// `head` followed by `rows` copies of `template`, where `{k}` stands for the row's k-th
/// bind (1-based) and becomes `$n` numbered across the whole statement.
pub fn multi_row_insert(head: &str, template: &str, binds_per_row: usize, rows: usize) -> String {
    use std::fmt::Write;
    // split the template once into literal text and bind numbers
    let mut parts: Vec<Result<&str, usize>> = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = open
            + rest[open..]
                .find('}')
                .expect("a `{k}` placeholder is closed");
        parts.push(Ok(&rest[..open]));
        let k: usize = rest[open + 1..close]
            .parse()
            .expect("a placeholder is a bind number");
        assert!(
            (1..=binds_per_row).contains(&k),
            "placeholder {k} out of range"
        );
        parts.push(Err(k));
        rest = &rest[close + 1..];
    }
    parts.push(Ok(rest));
    let mut sql = String::with_capacity(head.len() + rows * (template.len() + 4 * binds_per_row));
    sql.push_str(head);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        for part in &parts {
            match part {
                Ok(text) => sql.push_str(text),
                Err(k) => {
                    let _ = write!(sql, "${}", row * binds_per_row + k);
                }
            }
        }
    }
    sql
}

/// Appends an outbox entry for the audit log, in the caller's transaction.
pub async fn outbox(
    conn: &mut AnyConnection,
    at: Millis,
    kind: &str,
    actor: &str,
    payload: &serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (seq, at_ms, kind, actor, payload) \
         VALUES ((SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox), $1, $2, $3, $4)",
    )
    .bind(at)
    .bind(kind)
    .bind(actor)
    .bind(payload.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// The catalog: published objects kept as JSON bodies keyed by kind and name.
impl Store {
    /// Creates or replaces a catalog object, with its outbox entry.
    pub async fn put_catalog(
        &self,
        kind: &'static str,
        name: String,
        owner: Option<String>,
        body: serde_json::Value,
        actor: String,
        now: Millis,
    ) -> Result<()> {
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO catalog (kind, name, owner, body, updated_ms, removed_ms) \
                     VALUES ($1, $2, $3, $4, $5, NULL) \
                     ON CONFLICT (kind, name) DO UPDATE SET owner = $3, body = $4, updated_ms = $5, removed_ms = NULL",
                )
                .bind(kind)
                .bind(&name)
                .bind(owner.as_deref())
                .bind(body.to_string())
                .bind(now)
                .execute(&mut *conn)
                .await?;
                let payload = serde_json::json!({"kind": kind, "name": name, "body": body});
                outbox(conn, now, "catalog.put", &actor, &payload).await
            })
        })
        .await
    }

    /// Marks a catalog object removed. Returns false when there was none.
    pub async fn remove_catalog(
        &self,
        kind: &'static str,
        name: String,
        actor: String,
        now: Millis,
    ) -> Result<bool> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE catalog SET removed_ms = $1 WHERE kind = $2 AND name = $3 AND removed_ms IS NULL",
                )
                .bind(now)
                .bind(kind)
                .bind(&name)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                let payload = serde_json::json!({"kind": kind, "name": name});
                outbox(conn, now, "catalog.remove", &actor, &payload).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Live objects of one kind as `(name, owner, body)`, by name.
    pub async fn list_catalog(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, Option<String>, serde_json::Value)>> {
        let rows = sqlx::query(
            "SELECT name, owner, body FROM catalog WHERE kind = $1 AND removed_ms IS NULL ORDER BY name",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let body: String = row.try_get("body")?;
                let body = serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("catalog body: {e}")))?;
                Ok((row.try_get("name")?, row.try_get("owner")?, body))
            })
            .collect()
    }
}

/// One outbox row: an entry waiting for (or already in) the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub at_ms: Millis,
    pub kind: String,
    pub actor: String,
    pub payload: serde_json::Value,
}

impl Store {
    /// Appends entries to the outbox as one change, with multi-row statements. Returns the
    /// seq of the first.
    pub async fn append_outbox(
        &self,
        entries: Vec<(Millis, String, String, serde_json::Value)>,
    ) -> Result<i64> {
        self.write(move |conn| {
            Box::pin(async move {
                let base: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM outbox")
                    .fetch_one(&mut *conn)
                    .await?
                    .try_get("seq")?;
                for (chunk_no, chunk) in entries.chunks(200).enumerate() {
                    let sql = multi_row_insert(
                        "INSERT INTO outbox (seq, at_ms, kind, actor, payload) VALUES ",
                        "({1}, {2}, {3}, {4}, {5})",
                        5,
                        chunk.len(),
                    );
                    let mut query = sqlx::query(&sql);
                    for (row, (at, kind, actor, payload)) in chunk.iter().enumerate() {
                        query = query
                            .bind(base + 1 + (chunk_no * 200 + row) as i64)
                            .bind(*at)
                            .bind(kind.clone())
                            .bind(actor.clone())
                            .bind(payload.to_string());
                    }
                    query.execute(&mut *conn).await?;
                }
                Ok(base + 1)
            })
        })
        .await
    }

    /// Outbox rows with `seq >= from`, in order, at most `limit`.
    pub async fn outbox_from(&self, from: i64, limit: i64) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT seq, at_ms, kind, actor, payload FROM outbox WHERE seq >= $1 ORDER BY seq LIMIT $2")
            .bind(from)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let payload: String = row.try_get("payload")?;
                Ok(OutboxRow {
                    seq: row.try_get("seq")?,
                    at_ms: row.try_get("at_ms")?,
                    kind: row.try_get("kind")?,
                    actor: row.try_get("actor")?,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Corrupt(format!("outbox payload: {e}")))?,
                })
            })
            .collect()
    }
}

/// Tokens: stored as SHA-256 hashes, never in the clear.
impl Store {
    pub async fn insert_token(&self, token: TokenRecord, actor: String, now: Millis) -> Result<()> {
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO tokens (id, hash, role, subject, label, created_ms, revoked_ms, expires_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
                )
                .bind(&token.id)
                .bind(&token.hash)
                .bind(token.role.as_str())
                .bind(token.subject.as_deref())
                .bind(&token.label)
                .bind(token.created_ms)
                .bind(token.expires_ms)
                .execute(&mut *conn)
                .await?;
                let payload = serde_json::json!({"token": token.id, "role": token.role, "subject": token.subject, "expires_ms": token.expires_ms});
                outbox(conn, now, "token.issue", &actor, &payload).await
            })
        })
        .await
    }

    /// The token with this hash that is not revoked (it may have expired: the caller says so).
    pub async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, hash, role, subject, label, created_ms, revoked_ms, expires_ms FROM tokens WHERE hash = $1 AND revoked_ms IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| TokenRecord::from_row(&r)).transpose()
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, hash, role, subject, label, created_ms, revoked_ms, expires_ms FROM tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TokenRecord::from_row).collect()
    }

    /// Revokes a token at once. False when no live token has this id.
    pub async fn revoke_token(&self, id: String, actor: String, now: Millis) -> Result<bool> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE tokens SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                outbox(
                    conn,
                    now,
                    "token.revoke",
                    &actor,
                    &serde_json::json!({"token": id}),
                )
                .await?;
                Ok(true)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests;
