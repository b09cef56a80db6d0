-- Log retention: an ended job's output may be deleted from the store after the server's
-- `log_retention`; the job keeps when that happened, so `job logs` can say so.
ALTER TABLE jobs ADD COLUMN logs_purged_ms BIGINT;
CREATE INDEX jobs_logs_to_purge ON jobs (finished_ms) WHERE logs_purged_ms IS NULL;
