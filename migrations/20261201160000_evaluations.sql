-- Evaluations: a model (base, or base + a fine-tuned adapter) run on a benchmark under an
-- explicit protocol (lathe_core::EvaluationSpec), with the score and every item's prediction.
--
-- Dispatch is the jobs' scheme, smaller: a claim is one UPDATE … WHERE status = 'queued' that
-- increments `attempt` (the fencing token) and sets the lease; the worker renews it with its
-- heartbeat, and every later write is applied only WHERE attempt = <token> AND lease_owner =
-- <worker> AND status = 'running'. The reconciler puts expired leases back in the queue and
-- fails an evaluation that keeps losing its worker. An evaluation has no checkpoints: a
-- retry starts over, and item rows from the lost attempt are replaced.

CREATE TABLE evaluations (
    id                text PRIMARY KEY CHECK (id ~ '^eval-[A-Za-z0-9]{24}$'),
    project_id        text NOT NULL REFERENCES projects (id),
    -- What was evaluated: a base model name or an ft:… name of this project.
    model             text NOT NULL,
    -- The job whose fine-tuned model this is, when the job asked for the evaluation (or the
    -- model is its fine-tuned model); NULL for a base model.
    job_id            text REFERENCES jobs (id),
    benchmark         text NOT NULL,
    file_id           text REFERENCES files (id),
    spec              jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Progress, from the heartbeats of the running attempt.
    items_done        integer NOT NULL DEFAULT 0,
    items_total       integer,
    -- The score: accuracy, ci95, correct, items, unparsable, rule, items_per_second, … .
    result            jsonb,
    error             jsonb,                     -- {"code", "message", "param"} when failed
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    lease_owner       text REFERENCES workers (id),
    lease_expires_at  timestamptz,
    retries           integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    CONSTRAINT running_evaluations_hold_a_lease
        CHECK (status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT finished_evaluations_have_finished_at
        CHECK (status NOT IN ('succeeded', 'failed', 'cancelled') OR finished_at IS NOT NULL),
    CONSTRAINT succeeded_evaluations_have_a_result CHECK (status <> 'succeeded' OR result IS NOT NULL)
);

CREATE INDEX evaluations_queue ON evaluations (created_at, id) WHERE status = 'queued';
CREATE INDEX evaluations_leases ON evaluations (lease_expires_at) WHERE status = 'running';
CREATE INDEX evaluations_by_project ON evaluations (project_id, created_at DESC, id DESC);
CREATE INDEX evaluations_by_model ON evaluations (project_id, model);
CREATE INDEX evaluations_by_job ON evaluations (job_id) WHERE job_id IS NOT NULL;

-- One row per evaluated item: what the model said and how it was scored.
CREATE TABLE evaluation_items (
    evaluation_id  text NOT NULL REFERENCES evaluations (id) ON DELETE CASCADE,
    -- 0-based row of the benchmark file (or example of the own file).
    item_index     integer NOT NULL CHECK (item_index >= 0),
    expected       text NOT NULL,
    extracted      text,                          -- NULL: unparsable
    correct        boolean NOT NULL,
    output         text NOT NULL,                 -- the raw generated text
    PRIMARY KEY (evaluation_id, item_index)
);
