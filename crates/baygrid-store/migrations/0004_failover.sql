-- Failover: a cluster that lost a job (lease expired, or the agent no longer had it) is
-- blocked for that job for a back-off period, so the scheduler places it elsewhere.
CREATE TABLE job_blocks (
    job_id TEXT NOT NULL,
    cluster TEXT NOT NULL,
    until_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, cluster)
);
CREATE INDEX job_blocks_by_until ON job_blocks (until_ms);
