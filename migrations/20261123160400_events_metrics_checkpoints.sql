-- What a running job reports: events (OpenAI's job events), the loss curve, and committed
-- checkpoints. Rows are written only by the controller, from the stream of the attempt that
-- currently holds the job (see the fencing rule in the jobs migration).

-- Public id: 'ftevt-' + base-62 of id (lathe_core::EventId::from_sequence), so a
-- GET …/events cursor is a plain id comparison.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer,                          -- NULL for controller events (created, queued, …)
    seq         bigint,                           -- the worker message's seq, NULL for controller events
    level       text NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    type        text NOT NULL DEFAULT 'message' CHECK (type IN ('message', 'metrics')),
    message     text NOT NULL,
    data        jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- A reconnecting worker resends the messages not yet acked: ON CONFLICT DO NOTHING.
    UNIQUE (job_id, attempt, seq)
);

CREATE INDEX events_by_job ON events (job_id, id);

-- One point per optimizer step. A reconnecting worker may resend points, and an attempt that
-- resumes from a checkpoint replays the steps after it: both land on the same (job_id, step).
-- Ingest with INSERT … ON CONFLICT (job_id, step) DO UPDATE … WHERE excluded.attempt > metrics.attempt,
-- so a resend by the same attempt changes nothing and the newest attempt's curve is the one kept.
CREATE TABLE metrics (
    job_id                     text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step                       bigint NOT NULL CHECK (step >= 0),
    attempt                    integer NOT NULL,
    total_steps                bigint,
    train_loss                 real,
    valid_loss                 real,
    train_mean_token_accuracy  real,
    valid_mean_token_accuracy  real,
    learning_rate              double precision,
    grad_norm                  real,
    tokens_per_second          real,
    tokens_seen                bigint,
    memory_bytes               bigint,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);

-- A checkpoint is committed after the worker has written, fsynced and renamed it; the newest
-- one (highest step) is where the next attempt resumes.
CREATE TABLE checkpoints (
    id          text PRIMARY KEY CHECK (id ~ '^ftckpt_[A-Za-z0-9]{24}$'),
    job_id      text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    step        bigint NOT NULL CHECK (step >= 0),
    path        text NOT NULL,                    -- under the artifacts root, chosen by the controller's layout
    metrics     jsonb NOT NULL DEFAULT '{}',      -- {step, train_loss, valid_loss, …} at that step
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, step)                         -- also serves "latest checkpoint of a job"
);
