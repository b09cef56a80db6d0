-- Preemption: a job's spec may allow the scheduler to stop it for another (kept as a
-- column, so the scheduling cycle reads it without parsing specs); the scheduler asks a
-- running preemptible job's agent to stop it, and when the agent reports it stopped, the
-- job is queued again instead of ending.
ALTER TABLE jobs ADD COLUMN preemptible BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN preempt_requested BIGINT NOT NULL DEFAULT 0;
