-- Preemption: the scheduler asks a running preemptible job's agent to stop it; when the
-- agent reports it stopped, the job is queued again instead of ending.
ALTER TABLE jobs ADD COLUMN preempt_requested BIGINT NOT NULL DEFAULT 0;
