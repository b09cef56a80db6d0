-- Fusion training runs across vaults: their workers, rounds, models and charges.
CREATE TABLE fusion_runs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    -- running | succeeded | failed | cancelled
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    -- the run's record as JSON: its workers, rounds, models and events
    body TEXT NOT NULL
);
CREATE INDEX fusion_runs_tenant ON fusion_runs (tenant);
CREATE INDEX fusion_runs_state ON fusion_runs (state);
