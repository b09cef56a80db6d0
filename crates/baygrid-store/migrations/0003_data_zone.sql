-- Individuals each exporter has sent out of mainland China per calendar year, by category
-- (personal | sensitive): the running totals the cross-border rules band by.
CREATE TABLE export_counters (
    exporter TEXT NOT NULL,
    year BIGINT NOT NULL,
    category TEXT NOT NULL,
    subjects BIGINT NOT NULL,
    PRIMARY KEY (exporter, year, category)
);
