-- Uploaded training/validation files and the result files of finished jobs.
-- The content lives on disk at <data dir>/files/<id>: the storage path is derived from the id,
-- never from the user's filename, so no column holds a path.

CREATE TABLE files (
    id             text PRIMARY KEY CHECK (id ~ '^file-[A-Za-z0-9]{24}$'),
    project_id     text NOT NULL REFERENCES projects (id),
    purpose        text NOT NULL CHECK (purpose IN ('fine-tune', 'fine-tune-results')),
    filename       text NOT NULL,                 -- as uploaded; shown back, never used as a path
    bytes          bigint NOT NULL CHECK (bytes >= 0),
    sha256         bytea NOT NULL CHECK (octet_length(sha256) = 32),
    -- Filled for purpose 'fine-tune' by lathe_core::training_file::validate_jsonl at upload.
    format         text CHECK (format IN ('chat', 'prompt_completion', 'text')),
    line_count     integer CHECK (line_count >= 0),
    example_count  integer CHECK (example_count >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz                    -- soft delete: jobs keep referring to the row
);

-- GET /v1/files: newest first, cursor on (created_at, id), live files of one project.
CREATE INDEX files_by_project ON files (project_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
