-- Portable between SQLite and PostgreSQL: TEXT and BIGINT only, flags as 0/1,
-- instants as milliseconds since the Unix epoch (UTC).

CREATE TABLE catalog (
    kind TEXT NOT NULL,          -- accelerator | party | provider | site | cluster | offer | tenant
    name TEXT NOT NULL,
    owner TEXT,                  -- provider of a cluster/offer, party of a tenant/provider
    body TEXT NOT NULL,          -- the object as JSON
    updated_ms BIGINT NOT NULL,
    removed_ms BIGINT,
    PRIMARY KEY (kind, name)
);

CREATE TABLE cluster_status (
    cluster TEXT PRIMARY KEY,
    agent_seen_ms BIGINT NOT NULL,
    capacity TEXT NOT NULL
);

CREATE TABLE tenant_spend (
    tenant TEXT PRIMARY KEY,
    spent_minor BIGINT NOT NULL
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    subject TEXT,
    label TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    idempotency_key TEXT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    priority BIGINT NOT NULL,
    submitted_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    cluster TEXT,
    allocation TEXT,
    lease_epoch BIGINT NOT NULL DEFAULT 0,
    lease_holder TEXT,
    lease_expires_ms BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    started_ms BIGINT,
    finished_ms BIGINT,
    exit_code BIGINT,
    cost_cny_minor BIGINT,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_by_state ON jobs (state, priority, submitted_ms);
CREATE INDEX jobs_by_cluster ON jobs (cluster, state);
CREATE INDEX jobs_by_tenant ON jobs (tenant, submitted_ms);

CREATE TABLE job_events (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_logs (
    job_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch, seq)
);

-- Decisions waiting for the audit log, written in the same transaction as the change.
CREATE TABLE outbox (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    payload TEXT NOT NULL
);
