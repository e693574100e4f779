-- Fine-tuning jobs and their attempts. The controller is the only writer.
--
-- Lease and fencing: a claim is one UPDATE … WHERE status = 'queued' that sets
-- status = 'running', attempt = attempt + 1, lease_owner and lease_expires_at, and inserts the
-- attempts row. The new `attempt` is the fencing token: every later write from the worker
-- (heartbeat, metrics, checkpoint, finish, fail) carries it and is applied only
-- WHERE jobs.attempt = <token>, so a worker that lost its lease cannot touch the job again.

CREATE TABLE jobs (
    id                text PRIMARY KEY CHECK (id ~ '^ftjob-[A-Za-z0-9]{24}$'),
    project_id        text NOT NULL REFERENCES projects (id),
    status            text NOT NULL CHECK (status IN
                          ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled', 'paused')),
    -- lathe_core::JobSpec, resolved (no "auto" left): the whole recipe.
    spec              jsonb NOT NULL,
    -- Copied out of the spec for listing, dispatch and joins.
    model             text NOT NULL,
    training_file     text NOT NULL REFERENCES files (id),
    validation_file   text REFERENCES files (id),
    suffix            text,
    priority          smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    pool              text NOT NULL DEFAULT 'default',
    gpu_memory_gb     integer CHECK (gpu_memory_gb > 0),
    -- Results.
    fine_tuned_model  text UNIQUE,               -- ft:<base>:<suffix>:<job id>, set on success
    result_files      text[] NOT NULL DEFAULT '{}',
    trained_tokens    bigint,
    error             jsonb,                     -- {"code", "message", "param"} when failed
    -- Dispatch.
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),  -- fencing token, see above
    lease_owner       text REFERENCES workers (id),
    lease_expires_at  timestamptz,
    retries           integer NOT NULL DEFAULT 0 CHECK (retries >= 0),  -- crashes spent; preemption is free
    next_attempt_at   timestamptz,               -- retry backoff: not dispatched before this
    pause_requested   boolean NOT NULL DEFAULT false,
    cancel_requested  boolean NOT NULL DEFAULT false,
    idempotency_key   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,               -- first claim
    finished_at       timestamptz,
    UNIQUE (project_id, idempotency_key),        -- NULL keys never collide
    CONSTRAINT running_jobs_hold_a_lease CHECK (status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT finished_jobs_have_finished_at
        CHECK (status NOT IN ('succeeded', 'failed', 'cancelled') OR finished_at IS NOT NULL)
);

-- Claim: the best queued job of the worker's pools, by priority then age.
--   WHERE status = 'queued' AND pool = ANY($pools) AND (next_attempt_at IS NULL OR next_attempt_at <= now())
--   ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
CREATE INDEX jobs_queue ON jobs (pool, priority DESC, created_at, id) WHERE status = 'queued';
-- Reconciler: running jobs whose lease expired.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
-- GET /v1/fine_tuning/jobs: newest first, cursor `after` = (created_at, id) of that job.
CREATE INDEX jobs_by_project ON jobs (project_id, created_at DESC, id DESC);

-- One row per claim. Outcome 'preempted' does not spend the retry budget; 'crashed' does.
CREATE TABLE attempts (
    job_id             text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number             integer NOT NULL CHECK (number >= 1),   -- = jobs.attempt at claim time
    worker_id          text NOT NULL REFERENCES workers (id),
    resumed_from_step  bigint,                    -- the checkpoint this attempt started from
    started_at         timestamptz NOT NULL DEFAULT now(),
    ended_at           timestamptz,
    outcome            text CHECK (outcome IN
                           ('succeeded', 'failed', 'crashed', 'preempted', 'lease_lost', 'cancelled', 'paused')),
    reason             text,
    PRIMARY KEY (job_id, number),
    CONSTRAINT ended_attempts_have_an_outcome CHECK ((ended_at IS NULL) = (outcome IS NULL))
);

-- At most one live attempt per job, enforced by Postgres itself: a claim cannot start attempt
-- n+1 until attempt n has been ended (finished, failed, or expired by the reconciler).
CREATE UNIQUE INDEX attempts_one_live_per_job ON attempts (job_id) WHERE ended_at IS NULL;
CREATE INDEX attempts_by_worker ON attempts (worker_id) WHERE ended_at IS NULL;
