-- GPU worker daemons. A worker registers over gRPC with its capabilities and keeps a
-- heartbeat; it authenticates with its own bearer token, stored hashed like API keys.
-- Workers are never deleted (attempts refer to them); a retired one is drained.

CREATE TABLE workers (
    id                 text PRIMARY KEY,
    name               text NOT NULL,            -- host name or Slurm/Kubernetes task name
    device_kind        text NOT NULL CHECK (device_kind IN ('cuda', 'rocm', 'cpu')),
    gpu_name           text,
    gpu_memory_bytes   bigint CHECK (gpu_memory_bytes >= 0),
    pools              text[] NOT NULL DEFAULT '{default}',
    token_hash         bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    version            text NOT NULL DEFAULT '',
    registered_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    draining           boolean NOT NULL DEFAULT false  -- finishes its attempt, claims no more
);
