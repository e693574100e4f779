-- Tenancy. Every row a user can see belongs to one project, and every query the API runs is
-- scoped by the caller's project: an id from another project answers 404.

CREATE TABLE projects (
    id          text PRIMARY KEY,                 -- shown as the job object's organization_id
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys are bearer tokens. Only their SHA-256 is stored; a request's token is hashed and
-- looked up by that hash. Keys are revoked, never deleted, so audit trails keep their owner.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,               -- short public handle for listing and revoking
    project_id    text NOT NULL REFERENCES projects (id),
    name          text NOT NULL DEFAULT '',
    key_hash      bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

CREATE INDEX api_keys_by_project ON api_keys (project_id);
