//! Integration tests of lathe-store against the real Postgres on localhost: each test gets a
//! fresh database, migrated from `migrations/`, dropped when the test ends (even on failure).

#[path = "store/support.rs"]
mod support;

#[path = "store/dispatch.rs"]
mod dispatch;
#[path = "store/evaluations.rs"]
mod evaluations;
#[path = "store/fair_share.rs"]
mod fair_share;
#[path = "store/files.rs"]
mod files;
#[path = "store/jobs.rs"]
mod jobs;
#[path = "store/keys.rs"]
mod keys;
#[path = "store/workers.rs"]
mod workers;
