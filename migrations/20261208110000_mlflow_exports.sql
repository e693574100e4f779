-- Jobs whose run is logged to MLflow, and how far the controller has got: the run it made,
-- the last step logged, whether the parameters and the end (artifacts, status) are in. The
-- controller retries with backoff while MLflow is unreachable; nothing is lost meanwhile.
CREATE TABLE mlflow_exports (
    job_id         text PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    experiment     text NOT NULL,
    run_name       text,
    tags           jsonb NOT NULL DEFAULT '{}',
    experiment_id  text,
    run_id         text,
    artifact_uri   text,
    logged_step    bigint NOT NULL DEFAULT 0,
    params_logged  boolean NOT NULL DEFAULT false,
    finished       boolean NOT NULL DEFAULT false,
    failures       integer NOT NULL DEFAULT 0,
    last_error     text,
    next_try_at    timestamptz NOT NULL DEFAULT now(),
    lease_until    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mlflow_exports_pending ON mlflow_exports (next_try_at) WHERE NOT finished;
