-- Idempotency-Key reuse with a different body is a conflict, not a silent replay: the create
-- body's hash is stored beside the key and compared on every retry (NULL on older rows).
ALTER TABLE jobs ADD COLUMN request_sha256 TEXT;

-- What the job-create check found in the training data (examples, truncated, dropped), shown
-- on the job so a dropped example is never silent.
ALTER TABLE jobs ADD COLUMN training_data JSONB;

-- A worker token can be revoked (a node retired or compromised): authentication refuses it from
-- then on, and the worker's live attempt, if any, loses its lease and is requeued.
ALTER TABLE workers ADD COLUMN revoked_at timestamptz;

-- Event ids were one global sequence: they showed every project's activity, and a reader paging
-- by id could skip an event that committed after a later-numbered one (two controllers, or a
-- worker's report beside the controller's own event). Events are now numbered per job by a
-- counter row whose lock is held until the inserting transaction commits, so within a job
-- numbers commit in order and `job_seq > cursor` never skips (docs/architecture.md §3).
CREATE TABLE event_counters (
    job_id  text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    last    bigint NOT NULL
);
ALTER TABLE events ADD COLUMN job_seq bigint;
UPDATE events e SET job_seq = n.rn
FROM (SELECT id, row_number() OVER (PARTITION BY job_id ORDER BY id) AS rn FROM events) n
WHERE e.id = n.id;
ALTER TABLE events ALTER COLUMN job_seq SET NOT NULL;
CREATE UNIQUE INDEX events_by_job_seq ON events (job_id, job_seq);
DROP INDEX events_by_job;
INSERT INTO event_counters (job_id, last) SELECT job_id, max(job_seq) FROM events GROUP BY job_id;
