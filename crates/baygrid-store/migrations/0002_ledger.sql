-- The settlement ledger: accounts and transfers, append-only. Balances are derived.
-- Charges used to be a running total per tenant; the ledger replaces it.
DROP TABLE tenant_spend;

CREATE TABLE ledger_accounts (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    currency TEXT NOT NULL,
    kind TEXT NOT NULL,
    limited BIGINT NOT NULL,     -- 1: debits (posted and pending) may not exceed credits
    created_ms BIGINT NOT NULL
);

-- seq is the order the ledger accepted transfers in; replaying it rebuilds the ledger.
CREATE TABLE ledger_transfers (
    seq BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,          -- single | pending | post | void | expire
    debit TEXT NOT NULL,
    credit TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    pending_id TEXT,             -- for post, void and expire: the hold they resolve
    expires_ms BIGINT,           -- for pending: when the hold times out
    linked BIGINT NOT NULL,
    reference TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX ledger_transfers_by_debit ON ledger_transfers (debit, at_ms);
CREATE INDEX ledger_transfers_by_credit ON ledger_transfers (credit, at_ms);
-- only posts, voids and expiries name a hold
CREATE INDEX ledger_transfers_by_pending ON ledger_transfers (pending_id) WHERE pending_id IS NOT NULL;
