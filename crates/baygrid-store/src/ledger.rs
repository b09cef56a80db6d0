//! The settlement ledger's durable side. The pure [`Ledger`] decides; this module records
//! what it accepted, in the order it accepted it, in the same transaction as the change
//! that caused it (a job's hold is written with the job).
//!
//! The in-memory ledger is changed only by the store's single writer, so the order of
//! `ledger_transfers.seq` is the order the ledger applied them, and replaying the table
//! rebuilds it exactly. When a change that touched the ledger is rolled back (its savepoint,
//! or its group's commit), the writer rebuilds the ledger from what the database holds, so
//! memory never keeps a transfer the database does not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use baygrid_core::{Currency, Millis};
use baygrid_ledger::{Account, Balance, Ledger, Outcome, Transfer, TransferKind};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{multi_row_insert, outbox, Result, Store, StoreError};

/// The ledger as the writer keeps it.
#[derive(Debug, Default)]
pub(crate) struct LedgerCell {
    state: Mutex<LedgerState>,
    /// Set when the change now running altered the in-memory ledger.
    touched: AtomicBool,
    /// Set when any change of the group now being committed altered it.
    touched_in_group: AtomicBool,
}

#[derive(Debug, Default)]
struct LedgerState {
    ledger: Ledger,
    next_seq: i64,
}

impl LedgerCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().expect("ledger lock")
    }

    fn mark_touched(&self) {
        self.touched.store(true, Ordering::SeqCst);
        self.touched_in_group.store(true, Ordering::SeqCst);
    }

    pub(crate) fn begin_change(&self) {
        self.touched.store(false, Ordering::SeqCst);
    }

    pub(crate) fn change_touched(&self) -> bool {
        self.touched.load(Ordering::SeqCst)
    }

    pub(crate) fn begin_group(&self) {
        self.touched_in_group.store(false, Ordering::SeqCst);
    }

    pub(crate) fn group_touched(&self) -> bool {
        self.touched_in_group.load(Ordering::SeqCst)
    }

    /// Rebuilds the ledger from what `conn` sees (inside the writer's transaction, that is
    /// exactly what the group would commit).
    pub(crate) async fn reload(&self, conn: &mut AnyConnection) -> Result<()> {
        let (ledger, next_seq) = load(conn).await?;
        *self.lock() = LedgerState { ledger, next_seq };
        Ok(())
    }

    /// A read of the in-memory ledger.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        f(&self.lock().ledger)
    }
}

const KIND_EXPIRE: &str = "expire";

fn kind_name(kind: &TransferKind) -> &'static str {
    match kind {
        TransferKind::Single => "single",
        TransferKind::Pending { .. } => "pending",
        TransferKind::Post { .. } => "post",
        TransferKind::Void { .. } => "void",
    }
}

/// One row of `ledger_transfers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferRecord {
    pub seq: i64,
    pub id: String,
    /// single | pending | post | void | expire
    pub kind: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub currency: Currency,
    pub pending_id: Option<String>,
    pub expires_ms: Option<Millis>,
    pub linked: bool,
    pub reference: String,
    pub at_ms: Millis,
}

const TRANSFER_COLUMNS: &str = "seq, id, kind, debit, credit, amount, currency, pending_id, expires_ms, linked, reference, at_ms";

impl TransferRecord {
    fn from_row(row: &AnyRow) -> Result<TransferRecord> {
        let currency: String = row.try_get("currency")?;
        Ok(TransferRecord {
            seq: row.try_get("seq")?,
            id: row.try_get("id")?,
            kind: row.try_get("kind")?,
            debit: row.try_get("debit")?,
            credit: row.try_get("credit")?,
            amount: row.try_get("amount")?,
            currency: currency
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("ledger currency: {e}")))?,
            pending_id: row.try_get("pending_id")?,
            expires_ms: row.try_get("expires_ms")?,
            linked: row.try_get::<i64, _>("linked")? != 0,
            reference: row.try_get("reference")?,
            at_ms: row.try_get("at_ms")?,
        })
    }

    /// The transfer this row records; `None` for an expiry.
    fn transfer(&self) -> Result<Option<Transfer>> {
        let pending = || {
            self.pending_id
                .clone()
                .ok_or_else(|| StoreError::Corrupt(format!("transfer {} names no hold", self.id)))
        };
        let kind = match self.kind.as_str() {
            "single" => TransferKind::Single,
            "pending" => TransferKind::Pending {
                expires_at: self.expires_ms.ok_or_else(|| {
                    StoreError::Corrupt(format!("hold {} has no expiry", self.id))
                })?,
            },
            "post" => TransferKind::Post {
                pending_id: pending()?,
            },
            "void" => TransferKind::Void {
                pending_id: pending()?,
            },
            KIND_EXPIRE => return Ok(None),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "transfer {} has unknown kind `{other}`",
                    self.id
                )))
            }
        };
        Ok(Some(Transfer {
            id: self.id.clone(),
            debit_account: self.debit.clone(),
            credit_account: self.credit.clone(),
            amount: self.amount,
            currency: self.currency,
            kind,
            linked: self.linked,
            reference: self.reference.clone(),
        }))
    }
}

fn account_from_row(row: &AnyRow) -> Result<Account> {
    let currency: String = row.try_get("currency")?;
    let kind: String = row.try_get("kind")?;
    Ok(Account {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        currency: currency
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("account currency: {e}")))?,
        kind: kind.parse().map_err(StoreError::Corrupt)?,
        debits_must_not_exceed_credits: row.try_get::<i64, _>("limited")? != 0,
    })
}

/// Rebuilds the ledger by replaying every recorded transfer in order.
async fn load(conn: &mut AnyConnection) -> Result<(Ledger, i64)> {
    let mut ledger = Ledger::new();
    let rows = sqlx::query("SELECT id, owner, currency, kind, limited FROM ledger_accounts")
        .fetch_all(&mut *conn)
        .await?;
    for row in &rows {
        ledger.open(account_from_row(row)?);
    }
    let rows = sqlx::query(&format!(
        "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers ORDER BY seq"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut next_seq = 1;
    for row in &rows {
        let record = TransferRecord::from_row(row)?;
        next_seq = record.seq + 1;
        match record.transfer()? {
            Some(transfer) => ledger.replay(&transfer, record.at_ms).map_err(|e| {
                StoreError::Corrupt(format!(
                    "ledger transfer {} (seq {}) does not replay: {e}",
                    record.id, record.seq
                ))
            })?,
            None => {
                let hold = record.pending_id.as_deref().unwrap_or_default();
                if !ledger.expire_hold(hold) {
                    return Err(StoreError::Corrupt(format!(
                        "expiry {} names hold {hold}, which is not open",
                        record.id
                    )));
                }
            }
        }
    }
    Ok((ledger, next_seq))
}

pub(crate) async fn load_cell(conn: &mut AnyConnection) -> Result<LedgerCell> {
    let (ledger, next_seq) = load(conn).await?;
    Ok(LedgerCell {
        state: Mutex::new(LedgerState { ledger, next_seq }),
        ..LedgerCell::default()
    })
}

/// Rows per multi-row statement: 12 binds each, under both databases' limits.
const ROWS_PER_STATEMENT: usize = 50;

async fn insert_rows(conn: &mut AnyConnection, rows: &[TransferRecord]) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = multi_row_insert(
            &format!("INSERT INTO ledger_transfers ({TRANSFER_COLUMNS}) VALUES "),
            "({1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12})",
            12,
            chunk.len(),
        );
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = query
                .bind(r.seq)
                .bind(r.id.clone())
                .bind(r.kind.clone())
                .bind(r.debit.clone())
                .bind(r.credit.clone())
                .bind(r.amount)
                .bind(r.currency.to_string())
                .bind(r.pending_id.clone())
                .bind(r.expires_ms)
                .bind(r.linked as i64)
                .bind(r.reference.clone())
                .bind(r.at_ms);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// The audit entry for a batch of transfers: ids, kinds, accounts and amounts.
fn audit_payload(rows: &[TransferRecord]) -> serde_json::Value {
    serde_json::json!({
        "transfers": rows.iter().map(|r| serde_json::json!({
            "id": r.id, "kind": r.kind, "debit": r.debit, "credit": r.credit,
            "amount": r.amount, "currency": r.currency, "pending_id": r.pending_id,
        })).collect::<Vec<_>>(),
    })
}

/// Applies transfers in the caller's transaction: the ledger decides, then what it
/// accepted is recorded with one audit entry for the batch. Every transfer must be
/// accepted (or already exist): the first refusal is the error, and the caller's change
/// must then fail (its savepoint rollback rebuilds the ledger). Returns each outcome.
pub(crate) async fn apply_in_tx(
    conn: &mut AnyConnection,
    cell: &LedgerCell,
    transfers: &[Transfer],
    actor: &str,
    now: Millis,
) -> Result<Vec<Outcome>> {
    let results = apply_each_in_tx(conn, cell, transfers, actor, now).await?;
    let mut outcomes = Vec::with_capacity(results.len());
    let mut linked_failure = None;
    for (transfer, result) in transfers.iter().zip(results) {
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(baygrid_ledger::TransferError::LinkedEventFailed) => {
                linked_failure.get_or_insert(transfer.id.clone());
            }
            Err(error) => {
                return Err(StoreError::Ledger {
                    transfer: transfer.id.clone(),
                    error,
                })
            }
        }
    }
    if let Some(transfer) = linked_failure {
        return Err(StoreError::Ledger {
            transfer,
            error: baygrid_ledger::TransferError::LinkedEventFailed,
        });
    }
    Ok(outcomes)
}

/// Applies transfers in the caller's transaction and records those the ledger accepted,
/// with one audit entry for the batch. Returns each transfer's own result: unlinked
/// transfers succeed or fail alone.
pub(crate) async fn apply_each_in_tx(
    conn: &mut AnyConnection,
    cell: &LedgerCell,
    transfers: &[Transfer],
    actor: &str,
    now: Millis,
) -> Result<Vec<std::result::Result<Outcome, baygrid_ledger::TransferError>>> {
    if transfers.is_empty() {
        return Ok(Vec::new());
    }
    let (results, rows) = {
        let mut state = cell.lock();
        let results = state.ledger.apply(transfers, now);
        let mut rows = Vec::new();
        for (transfer, result) in transfers.iter().zip(&results) {
            if result == &Ok(Outcome::Created) {
                rows.push(record_of(transfer, state.next_seq + rows.len() as i64, now));
            }
        }
        if !rows.is_empty() {
            state.next_seq += rows.len() as i64;
            cell.mark_touched();
        }
        (results, rows)
    };
    if !rows.is_empty() {
        insert_rows(conn, &rows).await?;
        outbox(conn, now, "ledger.transfers", actor, &audit_payload(&rows)).await?;
    }
    Ok(results)
}

fn record_of(transfer: &Transfer, seq: i64, now: Millis) -> TransferRecord {
    let (pending_id, expires_ms) = match &transfer.kind {
        TransferKind::Single => (None, None),
        TransferKind::Pending { expires_at } => (None, Some(*expires_at)),
        TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => {
            (Some(pending_id.clone()), None)
        }
    };
    TransferRecord {
        seq,
        id: transfer.id.clone(),
        kind: kind_name(&transfer.kind).into(),
        debit: transfer.debit_account.clone(),
        credit: transfer.credit_account.clone(),
        amount: transfer.amount,
        currency: transfer.currency,
        pending_id,
        expires_ms,
        linked: transfer.linked,
        reference: transfer.reference.clone(),
        at_ms: now,
    }
}

/// Opens accounts that do not exist yet, in the caller's transaction.
pub(crate) async fn open_in_tx(
    conn: &mut AnyConnection,
    cell: &LedgerCell,
    accounts: &[Account],
    now: Millis,
) -> Result<()> {
    let new: Vec<Account> = {
        let mut state = cell.lock();
        let new: Vec<Account> = accounts
            .iter()
            .filter(|a| state.ledger.account(&a.id).is_none())
            .cloned()
            .collect();
        for account in &new {
            state.ledger.open(account.clone());
        }
        new
    };
    if new.is_empty() {
        return Ok(());
    }
    cell.mark_touched();
    for account in &new {
        sqlx::query(
            "INSERT INTO ledger_accounts (id, owner, currency, kind, limited, created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&account.id)
        .bind(&account.owner)
        .bind(account.currency.to_string())
        .bind(account.kind.as_str())
        .bind(account.debits_must_not_exceed_credits as i64)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    let payload = serde_json::json!({"accounts": new.iter().map(|a| serde_json::json!({
        "id": a.id, "currency": a.currency, "kind": a.kind.as_str()})).collect::<Vec<_>>()});
    outbox(conn, now, "ledger.accounts", "server", &payload).await
}

/// The transfer that releases a job's open hold, if it has one.
pub(crate) fn void_of_hold(cell: &LedgerCell, hold_id: &str, void_id: String) -> Option<Transfer> {
    cell.read(|ledger| {
        ledger.open_hold(hold_id).map(|held| Transfer {
            id: void_id,
            debit_account: held.debit_account.clone(),
            credit_account: held.credit_account.clone(),
            amount: 0,
            currency: held.currency,
            kind: TransferKind::Void {
                pending_id: hold_id.to_string(),
            },
            linked: false,
            reference: held.reference.clone(),
        })
    })
}

/// Expires the holds due at `now`, recording each expiry. Returns their ids.
pub(crate) async fn expire_in_tx(
    conn: &mut AnyConnection,
    cell: &LedgerCell,
    now: Millis,
) -> Result<Vec<(String, String)>> {
    let rows = {
        let mut state = cell.lock();
        let due = state.ledger.holds_due(now);
        let mut rows = Vec::with_capacity(due.len());
        for id in due {
            let held = state
                .ledger
                .open_hold(&id)
                .cloned()
                .expect("a due hold is open");
            state.ledger.expire_hold(&id);
            let seq = state.next_seq;
            state.next_seq += 1;
            rows.push(TransferRecord {
                seq,
                id: format!("expire:{id}"),
                kind: KIND_EXPIRE.into(),
                debit: held.debit_account,
                credit: held.credit_account,
                amount: 0,
                currency: held.currency,
                pending_id: Some(id),
                expires_ms: None,
                linked: false,
                reference: held.reference,
                at_ms: now,
            });
        }
        if !rows.is_empty() {
            cell.mark_touched();
        }
        rows
    };
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    insert_rows(conn, &rows).await?;
    outbox(
        conn,
        now,
        "ledger.transfers",
        "ledger",
        &audit_payload(&rows),
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.pending_id.unwrap_or_default(), r.reference))
        .collect())
}

/// A statement line: one transfer as it touched an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementLine {
    pub transfer: TransferRecord,
    /// Positive when the account was credited, negative when debited.
    pub signed_amount: i64,
}

/// What a transfer moved for `account`: its amount in when credited, out when debited, and
/// nothing for a hold, its void or its expiry.
fn signed(transfer: &TransferRecord, account: &str) -> i64 {
    let moved = match transfer.kind.as_str() {
        "single" | "post" => transfer.amount,
        _ => 0,
    };
    if transfer.credit == account {
        moved
    } else {
        -moved
    }
}

impl Store {
    /// Opens accounts (a no-op for those that exist).
    pub async fn open_accounts(&self, accounts: Vec<Account>, now: Millis) -> Result<()> {
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move { open_in_tx(conn, &cell, &accounts, now).await })
        })
        .await
    }

    /// Applies transfers as one change; see [`Ledger::apply`]. Every transfer must be
    /// accepted or already exist, or nothing is recorded.
    pub async fn transfer(
        &self,
        transfers: Vec<Transfer>,
        actor: String,
        now: Millis,
    ) -> Result<Vec<Outcome>> {
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move { apply_in_tx(conn, &cell, &transfers, &actor, now).await })
        })
        .await
    }

    /// Expires every hold past its time. Queued jobs whose hold expired fail: nothing
    /// would pay for them. Returns the expired holds' ids.
    pub async fn expire_holds(&self, now: Millis) -> Result<Vec<String>> {
        if self.ledger.read(|l| l.holds_due(now).is_empty()) {
            return Ok(Vec::new());
        }
        let cell = self.ledger.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let expired = expire_in_tx(conn, &cell, now).await?;
                for (_, reference) in &expired {
                    if let Some(job_id) = reference.strip_prefix("job:") {
                        crate::jobs::fail_if_queued(
                            conn,
                            job_id,
                            "its hold timed out before it could run: submit it again",
                            now,
                            "ledger",
                        )
                        .await?;
                    }
                }
                Ok(expired.into_iter().map(|(id, _)| id).collect())
            })
        })
        .await
    }

    /// An account, from the ledger.
    pub fn ledger_account(&self, id: &str) -> Option<Account> {
        self.ledger.read(|l| l.account(id).cloned())
    }

    /// Every account, by id.
    pub fn ledger_accounts(&self) -> Vec<Account> {
        let mut accounts = self
            .ledger
            .read(|l| l.balances().map(|(a, _)| a.clone()).collect::<Vec<_>>());
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts
    }

    /// What an account can still spend, from the writer's ledger (which may be ahead of
    /// the database by the group being committed): for a quick refusal before a submit.
    pub fn ledger_available(&self, id: &str) -> Option<i128> {
        self.ledger.read(|l| l.balance(id).map(|b| b.available()))
    }

    /// An open hold, from the writer's ledger.
    pub fn ledger_open_hold(&self, id: &str) -> Option<Transfer> {
        self.ledger.read(|l| l.open_hold(id).cloned())
    }

    /// An account's balance as committed, derived from the recorded transfers.
    pub async fn ledger_balance(&self, id: &str) -> Result<Balance> {
        let sum = |side: &str, kinds: &str| {
            format!("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS n FROM ledger_transfers WHERE {side} = $1 AND kind IN ({kinds})")
        };
        let open = |side: &str| {
            format!(
                "SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) AS n FROM ledger_transfers p WHERE p.{side} = $1 AND p.kind = 'pending' \
                 AND NOT EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = p.id)"
            )
        };
        let mut figures = [0i128; 4];
        for (slot, sql) in [
            sum("debit", "'single', 'post'"),
            sum("credit", "'single', 'post'"),
            open("debit"),
            open("credit"),
        ]
        .iter()
        .enumerate()
        {
            let row = sqlx::query(sql).bind(id).fetch_one(self.pool()).await?;
            figures[slot] = sum_value(&row)?;
        }
        Ok(Balance {
            debits_posted: figures[0],
            credits_posted: figures[1],
            debits_pending: figures[2],
            credits_pending: figures[3],
        })
    }

    /// The transfers that touched an account in `[from, to)`, oldest first: at most
    /// `limit` of them, after the transfer numbered `after_seq` when given (the next page).
    pub async fn ledger_statement(
        &self,
        account: &str,
        period: (Millis, Millis),
        after_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StatementLine>> {
        let rows = sqlx::query(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE (debit = $1 OR credit = $1) \
             AND at_ms >= $2 AND at_ms < $3 AND seq > $4 ORDER BY seq LIMIT $5"
        ))
        .bind(account)
        .bind(period.0)
        .bind(period.1)
        .bind(after_seq.unwrap_or(-1))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let transfer = TransferRecord::from_row(row)?;
                let signed_amount = signed(&transfer, account);
                Ok(StatementLine {
                    transfer,
                    signed_amount,
                })
            })
            .collect()
    }

    /// What posted transfers moved into (credits) and out of (debits) an account in
    /// `[from, to)`, summed in the database.
    pub async fn ledger_net(&self, account: &str, period: (Millis, Millis)) -> Result<i64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(CASE WHEN credit = $1 THEN amount ELSE -amount END), 0) \
             AS BIGINT) AS n FROM ledger_transfers WHERE (debit = $1 OR credit = $1) \
             AND kind IN ('single', 'post') AND at_ms >= $2 AND at_ms < $3",
        )
        .bind(account)
        .bind(period.0)
        .bind(period.1)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get("n")?)
    }

    /// One recorded transfer, by id.
    pub async fn ledger_transfer(&self, id: &str) -> Result<Option<TransferRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(TransferRecord::from_row).transpose()
    }

    /// Debits equal credits, per currency, over every posted transfer: the ledger's
    /// first invariant, checked on what the database holds.
    pub async fn ledger_totals(&self) -> Result<Vec<(Currency, i128)>> {
        let rows = sqlx::query(
            "SELECT currency, CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS n FROM ledger_transfers WHERE kind IN ('single', 'post') GROUP BY currency ORDER BY currency",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let currency: String = row.try_get("currency")?;
                Ok((
                    currency
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
                    sum_value(row)?,
                ))
            })
            .collect()
    }
}

/// A `SUM` cast to BIGINT, which both databases return as a 64-bit integer.
fn sum_value(row: &AnyRow) -> Result<i128> {
    Ok(row.try_get::<i64, _>("n")? as i128)
}
