-- Listing newest first, a page at a time: every list of jobs, queries and fusion runs is
-- ordered by (submission or creation time, id) descending, and the next page starts below
-- the last row of the previous one.
CREATE INDEX jobs_by_submitted ON jobs (submitted_ms, id);
CREATE INDEX queries_by_created ON queries (created_ms, id);
CREATE INDEX fusion_runs_by_created ON fusion_runs (created_ms, id);
