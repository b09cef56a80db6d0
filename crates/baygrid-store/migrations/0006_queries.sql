-- Aggregate queries run at the data, and the privacy budget each one spent.
CREATE TABLE queries (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    -- running | released | withheld | failed
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    -- the query's view as JSON: its sides, their answers, the result
    body TEXT NOT NULL
);
CREATE INDEX queries_tenant ON queries (tenant);
CREATE INDEX queries_state ON queries (state);

-- ε in millionths and δ in 10^-15, so that sums are exact.
CREATE TABLE privacy_spends (
    query TEXT NOT NULL,
    dataset TEXT NOT NULL,
    tenant TEXT NOT NULL,
    period_start_ms BIGINT NOT NULL,
    epsilon_micros BIGINT NOT NULL,
    delta_femtos BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (query, dataset)
);
CREATE INDEX privacy_spends_dataset ON privacy_spends (dataset, period_start_ms);
