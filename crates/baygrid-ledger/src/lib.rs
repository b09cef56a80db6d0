//! A double-entry ledger in the manner of TigerBeetle's invariants:
//! - money moves only as transfers of one debit and one credit, in one currency, for a
//!   positive amount; there are no updates and no deletes, and corrections are new transfers;
//! - transfer ids are chosen by the client: a retry with the same body returns the original,
//!   and the same id with another body is an error;
//! - a pending transfer (a hold) reserves funds, and is later posted (in full or in part) or
//!   voided, at most once, or it expires;
//! - a chain of linked transfers succeeds or fails as a whole;
//! - an account flagged `debits_must_not_exceed_credits` (a tenant wallet) never goes below
//!   zero, pending holds included;
//! - a currency conversion is a linked pair through an FX account at a recorded exact rate.
//!
//! Pure: no I/O and no clock; "now" is passed in. The store persists what [`Ledger::apply`]
//! accepts.

use std::collections::HashMap;

use baygrid_core::{Currency, Millis, Rate};
use serde::{Deserialize, Serialize};

/// What an account is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    TenantWallet,
    ProviderRevenue,
    DataHolderRevenue,
    PlatformFees,
    Fx,
    ExternalFunding,
    /// Where a job's hold goes when posted, before it is split between provider and fee.
    Clearing,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::TenantWallet => "tenant_wallet",
            AccountKind::ProviderRevenue => "provider_revenue",
            AccountKind::DataHolderRevenue => "data_holder_revenue",
            AccountKind::PlatformFees => "platform_fees",
            AccountKind::Fx => "fx",
            AccountKind::ExternalFunding => "external_funding",
            AccountKind::Clearing => "clearing",
        }
    }
}

impl std::str::FromStr for AccountKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            AccountKind::TenantWallet,
            AccountKind::ProviderRevenue,
            AccountKind::DataHolderRevenue,
            AccountKind::PlatformFees,
            AccountKind::Fx,
            AccountKind::ExternalFunding,
            AccountKind::Clearing,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("unknown account kind `{s}`"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub owner: String,
    pub currency: Currency,
    pub kind: AccountKind,
    /// Balance limit: debits (posted and pending) may never exceed credits posted.
    pub debits_must_not_exceed_credits: bool,
}

/// Posted and pending totals, in minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub debits_posted: i128,
    pub credits_posted: i128,
    pub debits_pending: i128,
    pub credits_pending: i128,
}

impl Balance {
    /// Credits minus debits, posted only.
    pub fn net(&self) -> i128 {
        self.credits_posted - self.debits_posted
    }

    /// What can still be spent: posted credits less posted and pending debits.
    pub fn available(&self) -> i128 {
        self.credits_posted - self.debits_posted - self.debits_pending
    }
}

/// What a transfer does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum TransferKind {
    /// Moves the amount at once.
    Single,
    /// Reserves the amount until posted, voided, or `expires_at`.
    Pending { expires_at: Millis },
    /// Posts a pending transfer: `amount` (≤ the pending amount) moves; the rest is released.
    Post { pending_id: String },
    /// Releases a pending transfer.
    Void { pending_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub id: String,
    pub debit_account: String,
    pub credit_account: String,
    pub amount: i64,
    pub currency: Currency,
    pub kind: TransferKind,
    /// Linked to the next transfer in the batch: the chain succeeds or fails as a whole.
    #[serde(default)]
    pub linked: bool,
    /// What the transfer is for (a job id, a contract id).
    #[serde(default)]
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum TransferError {
    /// The transfer's id (already used): whoever reports the error names the transfer.
    #[error("exists with a different body")]
    ExistsWithDifferentBody(String),
    #[error("amount must be positive")]
    AmountNotPositive,
    #[error("debit and credit account are the same")]
    SameAccount,
    #[error("account {0} does not exist")]
    NoSuchAccount(String),
    #[error("account {account} holds {account_currency}, the transfer is in {transfer_currency}")]
    CurrencyMismatch {
        account: String,
        account_currency: Currency,
        transfer_currency: Currency,
    },
    #[error(
        "account {account} would exceed its credits: needs {needed}, has {available} available"
    )]
    ExceedsCredits {
        account: String,
        needed: i128,
        available: i128,
    },
    #[error("pending transfer {0} does not exist")]
    NoSuchPending(String),
    #[error("pending transfer {0} was already resolved")]
    AlreadyResolved(String),
    #[error("pending transfer {0} has expired")]
    PendingExpired(String),
    #[error("post of {amount} exceeds the pending {pending}")]
    ExceedsPending { amount: i64, pending: i64 },
    #[error("post or void must name the pending transfer's accounts and currency")]
    PendingMismatch,
    #[error("a linked transfer in the chain failed")]
    LinkedEventFailed,
    #[error("the batch ends inside a linked chain")]
    LinkedChainOpen,
}

/// What happened to one transfer of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Created,
    /// The same transfer was applied before; nothing changed.
    AlreadyExists,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingState {
    Open,
    Posted,
    Voided,
    Expired,
}

/// The ledger's state.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    accounts: HashMap<String, Account>,
    balances: HashMap<String, Balance>,
    transfers: HashMap<String, Transfer>,
    pending: HashMap<String, PendingState>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Opens an account; opening the same account twice is a no-op.
    pub fn open(&mut self, account: Account) {
        self.balances.entry(account.id.clone()).or_default();
        self.accounts.entry(account.id.clone()).or_insert(account);
    }

    pub fn account(&self, id: &str) -> Option<&Account> {
        self.accounts.get(id)
    }

    pub fn balance(&self, id: &str) -> Option<Balance> {
        self.balances.get(id).copied()
    }

    pub fn transfer(&self, id: &str) -> Option<&Transfer> {
        self.transfers.get(id)
    }

    /// Every account's balance.
    pub fn balances(&self) -> impl Iterator<Item = (&Account, &Balance)> {
        self.accounts.values().map(|a| (a, &self.balances[&a.id]))
    }

    /// Applies a batch in order. Linked chains succeed or fail as a whole; a failed transfer
    /// changes nothing.
    pub fn apply(
        &mut self,
        batch: &[Transfer],
        now: Millis,
    ) -> Vec<Result<Outcome, TransferError>> {
        let mut results = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            let mut end = start;
            while end < batch.len() && batch[end].linked {
                end += 1;
            }
            if end == batch.len() {
                // the last transfer is linked: the chain is never closed
                for _ in start..batch.len() {
                    results.push(Err(TransferError::LinkedChainOpen));
                }
                break;
            }
            let chain = &batch[start..=end];
            let snapshot = (chain.len() > 1).then(|| {
                (
                    self.balances.clone(),
                    self.transfers.clone(),
                    self.pending.clone(),
                )
            });
            let mut chain_results = Vec::with_capacity(chain.len());
            let mut failed = None;
            for (i, transfer) in chain.iter().enumerate() {
                match self.apply_one(transfer, now) {
                    Ok(outcome) => chain_results.push(Ok(outcome)),
                    Err(e) => {
                        failed = Some(i);
                        chain_results.push(Err(e));
                        break;
                    }
                }
            }
            if let Some(at) = failed {
                if let Some((balances, transfers, pending)) = snapshot {
                    self.balances = balances;
                    self.transfers = transfers;
                    self.pending = pending;
                }
                for (i, result) in chain_results.iter_mut().enumerate() {
                    if i != at {
                        *result = Err(TransferError::LinkedEventFailed);
                    }
                }
                while chain_results.len() < chain.len() {
                    chain_results.push(Err(TransferError::LinkedEventFailed));
                }
            }
            results.extend(chain_results);
            start = end + 1;
        }
        results
    }

    /// Expires open holds past their time; returns their ids.
    pub fn expire(&mut self, now: Millis) -> Vec<String> {
        let due = self.holds_due(now);
        for id in &due {
            self.expire_hold(id);
        }
        due
    }

    fn release(&mut self, held: &Transfer, amount: i64) {
        let debit = self
            .balances
            .get_mut(&held.debit_account)
            .expect("account of a stored transfer");
        debit.debits_pending -= amount as i128;
        let credit = self
            .balances
            .get_mut(&held.credit_account)
            .expect("account of a stored transfer");
        credit.credits_pending -= amount as i128;
    }

    /// Re-applies a transfer the store recorded as accepted, at the time it was accepted.
    /// Balance limits are not checked again: they held when it was first applied.
    pub fn replay(&mut self, transfer: &Transfer, at: Millis) -> Result<(), TransferError> {
        self.apply_checked(transfer, at, false).map(|_| ())
    }

    /// Whether a hold is open, and if so until when.
    pub fn open_hold(&self, id: &str) -> Option<&Transfer> {
        (self.pending.get(id) == Some(&PendingState::Open)).then(|| &self.transfers[id])
    }

    /// Open holds whose expiry is at or before `now`.
    pub fn holds_due(&self, now: Millis) -> Vec<String> {
        let mut due: Vec<String> = self
            .pending
            .iter()
            .filter(|(id, state)| {
                **state == PendingState::Open && matches!(self.transfers[*id].kind, TransferKind::Pending { expires_at } if expires_at <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        due.sort();
        due
    }

    /// Expires one open hold (as [`Ledger::expire`] does for every due hold): the store
    /// replays recorded expiries with it. False when the hold is not open.
    pub fn expire_hold(&mut self, id: &str) -> bool {
        if self.pending.get(id) != Some(&PendingState::Open) {
            return false;
        }
        let held = self.transfers[id].clone();
        self.release(&held, held.amount);
        self.pending.insert(id.to_string(), PendingState::Expired);
        true
    }

    fn apply_one(&mut self, transfer: &Transfer, now: Millis) -> Result<Outcome, TransferError> {
        self.apply_checked(transfer, now, true)
    }

    fn apply_checked(
        &mut self,
        transfer: &Transfer,
        now: Millis,
        check_limits: bool,
    ) -> Result<Outcome, TransferError> {
        if let Some(existing) = self.transfers.get(&transfer.id) {
            return if existing == transfer {
                Ok(Outcome::AlreadyExists)
            } else {
                Err(TransferError::ExistsWithDifferentBody(transfer.id.clone()))
            };
        }
        if transfer.amount <= 0 && !matches!(transfer.kind, TransferKind::Void { .. }) {
            return Err(TransferError::AmountNotPositive);
        }
        if transfer.debit_account == transfer.credit_account {
            return Err(TransferError::SameAccount);
        }
        for id in [&transfer.debit_account, &transfer.credit_account] {
            let account = self
                .accounts
                .get(id)
                .ok_or_else(|| TransferError::NoSuchAccount(id.clone()))?;
            if account.currency != transfer.currency {
                return Err(TransferError::CurrencyMismatch {
                    account: id.clone(),
                    account_currency: account.currency,
                    transfer_currency: transfer.currency,
                });
            }
        }
        let amount = transfer.amount as i128;
        match &transfer.kind {
            TransferKind::Single | TransferKind::Pending { .. } => {
                if check_limits {
                    self.check_limit(&transfer.debit_account, amount)?;
                }
                let pending = matches!(transfer.kind, TransferKind::Pending { .. });
                let debit = self
                    .balances
                    .get_mut(&transfer.debit_account)
                    .expect("checked");
                if pending {
                    debit.debits_pending += amount;
                } else {
                    debit.debits_posted += amount;
                }
                let credit = self
                    .balances
                    .get_mut(&transfer.credit_account)
                    .expect("checked");
                if pending {
                    credit.credits_pending += amount;
                } else {
                    credit.credits_posted += amount;
                }
                if pending {
                    self.pending.insert(transfer.id.clone(), PendingState::Open);
                }
            }
            TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => {
                let held = self
                    .transfers
                    .get(pending_id)
                    .cloned()
                    .ok_or_else(|| TransferError::NoSuchPending(pending_id.clone()))?;
                let TransferKind::Pending { expires_at } = held.kind else {
                    return Err(TransferError::NoSuchPending(pending_id.clone()));
                };
                if held.debit_account != transfer.debit_account
                    || held.credit_account != transfer.credit_account
                    || held.currency != transfer.currency
                {
                    return Err(TransferError::PendingMismatch);
                }
                match self.pending.get(pending_id) {
                    Some(PendingState::Open) if expires_at <= now => {
                        return Err(TransferError::PendingExpired(pending_id.clone()))
                    }
                    Some(PendingState::Open) => {}
                    Some(PendingState::Expired) => {
                        return Err(TransferError::PendingExpired(pending_id.clone()))
                    }
                    _ => return Err(TransferError::AlreadyResolved(pending_id.clone())),
                }
                let posting = matches!(transfer.kind, TransferKind::Post { .. });
                if posting && transfer.amount > held.amount {
                    return Err(TransferError::ExceedsPending {
                        amount: transfer.amount,
                        pending: held.amount,
                    });
                }
                self.release(&held, held.amount);
                if posting {
                    let debit = self.balances.get_mut(&held.debit_account).expect("checked");
                    debit.debits_posted += amount;
                    let credit = self
                        .balances
                        .get_mut(&held.credit_account)
                        .expect("checked");
                    credit.credits_posted += amount;
                }
                self.pending.insert(
                    pending_id.clone(),
                    if posting {
                        PendingState::Posted
                    } else {
                        PendingState::Voided
                    },
                );
            }
        }
        self.transfers.insert(transfer.id.clone(), transfer.clone());
        Ok(Outcome::Created)
    }

    fn check_limit(&self, account_id: &str, amount: i128) -> Result<(), TransferError> {
        let account = &self.accounts[account_id];
        if !account.debits_must_not_exceed_credits {
            return Ok(());
        }
        let available = self.balances[account_id].available();
        if amount > available {
            return Err(TransferError::ExceedsCredits {
                account: account_id.to_string(),
                needed: amount,
                available,
            });
        }
        Ok(())
    }
}

/// A currency conversion as a linked pair through FX accounts: `amount` leaves `from` into
/// the FX account of its currency, and the converted amount leaves the FX account of the
/// target currency into `to`. The rate converts both currencies to CNY; the result is
/// rounded half away from zero to the minor unit. Returns the pair and the converted amount.
#[allow(clippy::too_many_arguments)]
pub fn fx_pair(
    id: &str,
    from: (&str, Currency),
    fx_from: &str,
    fx_to: &str,
    to: (&str, Currency),
    amount: i64,
    from_rate: Rate,
    to_rate: Rate,
    reference: &str,
) -> (Vec<Transfer>, i64) {
    let numerator = amount as i128 * from_rate.cny_micros_per_unit as i128;
    let denominator = to_rate.cny_micros_per_unit as i128;
    let converted = ((2 * numerator + denominator) / (2 * denominator)) as i64;
    let pair = vec![
        Transfer {
            id: format!("{id}.out"),
            debit_account: from.0.into(),
            credit_account: fx_from.into(),
            amount,
            currency: from.1,
            kind: TransferKind::Single,
            linked: true,
            reference: format!("{reference} fx {from_rate}/{to_rate}"),
        },
        Transfer {
            id: format!("{id}.in"),
            debit_account: fx_to.into(),
            credit_account: to.0.into(),
            amount: converted,
            currency: to.1,
            kind: TransferKind::Single,
            linked: false,
            reference: format!("{reference} fx {from_rate}/{to_rate}"),
        },
    ];
    (pair, converted)
}

/// The exchange's accounts and transfer ids, by convention.
pub mod names {
    use super::{Account, AccountKind};
    use baygrid_core::Currency;

    fn account(id: String, owner: &str, currency: Currency, kind: AccountKind) -> Account {
        Account {
            id,
            owner: owner.to_string(),
            currency,
            debits_must_not_exceed_credits: kind == AccountKind::TenantWallet,
            kind,
        }
    }

    /// A tenant's wallet. Budgets and holds are kept in CNY.
    pub fn wallet(tenant: &str) -> Account {
        account(
            format!("wallet:{tenant}"),
            tenant,
            Currency::CNY,
            AccountKind::TenantWallet,
        )
    }

    /// A provider's revenue in the currency of its offers.
    pub fn provider(provider: &str, currency: Currency) -> Account {
        account(
            format!("provider:{provider}:{currency}"),
            provider,
            currency,
            AccountKind::ProviderRevenue,
        )
    }

    /// A data holder's revenue from uses of its data, in the currency of its offers.
    pub fn holder(party: &str, currency: Currency) -> Account {
        account(
            format!("holder:{party}:{currency}"),
            party,
            currency,
            AccountKind::DataHolderRevenue,
        )
    }

    pub fn fees(currency: Currency) -> Account {
        account(
            format!("fees:{currency}"),
            "platform",
            currency,
            AccountKind::PlatformFees,
        )
    }

    pub fn fx(currency: Currency) -> Account {
        account(
            format!("fx:{currency}"),
            "platform",
            currency,
            AccountKind::Fx,
        )
    }

    pub fn funding(currency: Currency) -> Account {
        account(
            format!("funding:{currency}"),
            "outside",
            currency,
            AccountKind::ExternalFunding,
        )
    }

    pub fn clearing(currency: Currency) -> Account {
        account(
            format!("clearing:{currency}"),
            "platform",
            currency,
            AccountKind::Clearing,
        )
    }

    /// The platform's own accounts in every currency.
    pub fn platform() -> Vec<Account> {
        [Currency::CNY, Currency::HKD, Currency::MOP]
            .into_iter()
            .flat_map(|c| [fees(c), fx(c), funding(c), clearing(c)])
            .collect()
    }

    /// The reference every transfer about a job carries.
    pub fn job_reference(job: &str) -> String {
        format!("job:{job}")
    }

    pub fn hold(job: &str) -> String {
        format!("hold:{job}")
    }

    pub fn void(job: &str) -> String {
        format!("void:{job}")
    }
}

#[cfg(test)]
mod tests;
