-- What allowed flows oblige their parties to do, written with the flow's decision.
CREATE TABLE obligations (
    id BIGINT PRIMARY KEY,
    decided_ms BIGINT NOT NULL,
    exporter TEXT NOT NULL,
    recipient TEXT NOT NULL,
    dataset TEXT NOT NULL,
    obligation TEXT NOT NULL,
    rule TEXT NOT NULL,
    -- YYYY-MM-DD, or '' for a standing obligation
    due TEXT NOT NULL
);
CREATE INDEX obligations_exporter ON obligations (exporter);
CREATE INDEX obligations_recipient ON obligations (recipient);
