-- Pruning workers that left long ago asks, per worker, whether any attempt names it
-- (workers::prune_workers); the partial attempts_by_worker index only covers live attempts.
CREATE INDEX attempts_worker_id ON attempts (worker_id);

-- Fair share's recent use, folded (dispatch/fair_share.rs, `fold_usage`): each (pool, project)'s
-- decayed GPU-seconds of the attempts that ended by `usage_fold.as_of`, decayed to that time
-- with `usage_fold.half_life_seconds`. A claim decays the folded sum to now and adds only the
-- attempts that are live or ended since, instead of summing every attempt of the last hours.
CREATE TABLE usage_fold (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    half_life_seconds  double precision NOT NULL CHECK (half_life_seconds > 0),
    as_of              timestamptz NOT NULL
);
CREATE TABLE project_usage (
    pool        text NOT NULL,
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    decayed     double precision NOT NULL,
    PRIMARY KEY (pool, project_id)
);
