-- Fair share between projects in a pool (docs/scheduling.md). A project's weight orders the
-- claims of equal priority; its quota caps the GPUs its running jobs hold in a pool. A row for
-- pool '*' applies to every pool without a row of its own; a NULL column falls back to it,
-- then to the defaults (weight 1, no quota).
CREATE TABLE project_shares (
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    pool        text NOT NULL,
    weight      double precision CHECK (weight > 0 AND weight <= 1000000),
    max_gpus    integer CHECK (max_gpus >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, pool)
);

-- Recent use is summed over the attempts that are live or ended within a few half-lives.
CREATE INDEX attempts_ended_at ON attempts (ended_at);

-- Priority preemption (docs/scheduling.md): the reconciler's leader asks the worker of a
-- running job to checkpoint and hand it back for a higher-priority queued one. The request is
-- kept on the row, so a controller restart during a preemption loses nothing; a claim clears it.
ALTER TABLE jobs ADD COLUMN preempt_requested_at timestamptz;
ALTER TABLE jobs ADD COLUMN preempted_for text;

-- Why a queued job is not starting, when the reconciler can tell (its shape fits no live worker
-- of its pool); shown on the job object. A claim clears it.
ALTER TABLE jobs ADD COLUMN pending_reason text;
