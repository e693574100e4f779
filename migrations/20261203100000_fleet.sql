-- Fleet enrolment (docs/architecture.md §3, "Fleet"). A fleet is one shared secret that any
-- number of worker instances enrol with — the Slurm pilots of a partition, the pods of a
-- Kubernetes ScaledJob — each getting a worker row and an instance token of its own, so two
-- replicas never overwrite each other's registration. Revoking a fleet revokes every instance
-- enrolled with it; revoking one instance leaves the others running.
CREATE TABLE fleets (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

ALTER TABLE workers ADD COLUMN fleet_id text REFERENCES fleets (id);
-- Where the scheduler placed this instance, for operators and for the Slurm autoscaler (a
-- pilot counted in squeue is not counted again as a live worker).
ALTER TABLE workers ADD COLUMN slurm_job_id text;
ALTER TABLE workers ADD COLUMN pod_name text;
-- A worker that exits on its own (idle, --max-jobs, drained, SIGTERM) says so: it stops counting
-- as supply at once, not a lease later (an autoscaler would otherwise wait for it).
ALTER TABLE workers ADD COLUMN left_at timestamptz;

-- Demand per pool is counted on every reconciler pass: by status and pool.
CREATE INDEX jobs_active_by_pool ON jobs (pool) WHERE status IN ('queued', 'running');
