-- The worker trust model (docs/architecture.md §3, "Worker trust").
--
-- A grant says what an identity may do: the pools it may serve (NULL: any) and its roles
-- ('training': claim jobs and evaluations; 'serving': open a Serve stream and answer
-- completions). A fleet carries one for every instance that enrols with it, a worker token
-- minted by an operator carries its own, and an enrolled instance copies its fleet's at
-- enrolment. Register may narrow what a worker offers, never widen it.
ALTER TABLE fleets ADD COLUMN grant_pools text[];
ALTER TABLE fleets ADD COLUMN grant_roles text[] NOT NULL DEFAULT '{training}'
    CHECK (grant_roles <@ '{training,serving}' AND cardinality(grant_roles) > 0);
-- Enrolment floods: at most this many live (not revoked, not left) instances per fleet.
ALTER TABLE fleets ADD COLUMN max_workers integer CHECK (max_workers > 0);

ALTER TABLE workers ADD COLUMN grant_pools text[];
ALTER TABLE workers ADD COLUMN grant_roles text[] NOT NULL DEFAULT '{training}'
    CHECK (grant_roles <@ '{training,serving}' AND cardinality(grant_roles) > 0);
-- Identities made before grants existed keep doing what they did.
UPDATE workers SET grant_roles = '{serving}' WHERE serving;
-- Names are for operators and logs: bounded.
ALTER TABLE workers ADD CONSTRAINT workers_name_bounded CHECK (char_length(name) BETWEEN 1 AND 128);

-- A worker that asks for work (a claim of a job or an evaluation) is supply; one that only
-- registers and heartbeats (a ghost, or a stuck process) is not counted for long: demand would
-- otherwise look met and an autoscaler would freeze.
ALTER TABLE workers ADD COLUMN last_claim_at timestamptz;

-- Evaluations are dispatched like jobs: a pool (only workers of that pool take them) and a
-- retry backoff.
ALTER TABLE evaluations ADD COLUMN pool text NOT NULL DEFAULT 'default';
ALTER TABLE evaluations ADD COLUMN next_attempt_at timestamptz;
DROP INDEX evaluations_queue;
CREATE INDEX evaluations_queue ON evaluations (pool, created_at, id) WHERE status = 'queued';

-- Leases across outages: the reconciler's leader notes every pass. A pass that finds the
-- previous one long ago (Postgres or every controller was down) extends the running leases
-- before it requeues anything, since no worker could renew meanwhile.
CREATE TABLE reconciler_state (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_pass_at  timestamptz NOT NULL
);

-- Two more ways an attempt ends, neither spending the retry budget: its worker was revoked
-- (the work is given back at once), or the infrastructure failed under it (the storage was
-- full: queued again after a backoff).
ALTER TABLE attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_outcome_check CHECK (outcome IN
    ('succeeded', 'failed', 'crashed', 'preempted', 'lease_lost', 'cancelled', 'paused', 'revoked', 'faulted'));
