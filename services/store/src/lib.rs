//! Lathe's Postgres store: every job, attempt, event, metric point, checkpoint, file, worker and
//! API key lives here, and this crate is the only code that reads or writes them.
//!
//! Where it sits in the flow (DESIGN.md §1):
//!
//! ```text
//! REST handlers ───────┐   files, jobs (create / list / cancel / pause / resume), keys
//! gRPC worker service ─┼──▶ lathe-store ──▶ Postgres (source of truth)
//! reconciler ──────────┘   claim, lease renewal, fenced writes, requeue of expired leases
//! ```
//!
//! Workers hold no database credentials: the controller calls [`dispatch`] on their behalf,
//! and every write an attempt makes is fenced by its attempt number (see the essay in
//! [`dispatch`]). Redis only carries job ids; [`dispatch::queued_job_ids`] is what the
//! reconciler re-publishes when Redis has lost them.
//!
//! Every function is a plain `async fn` taking a `&PgPool`, so that handlers, the reconciler
//! and the tests call them the same way. Queries are checked at run time (`sqlx::query`), so
//! the crate builds without a database; the schema is embedded from `migrations/` by
//! [`MIGRATOR`]. Timestamps are `time::OffsetDateTime` (re-exported as [`time`]); the API shows
//! them as Unix seconds (`.unix_timestamp()`).

pub mod dispatch;
pub mod error;
pub mod files;
pub mod jobs;
pub mod keys;
pub mod projects;
mod random;
pub mod workers;

pub use error::StoreError;
pub use sqlx::postgres::{PgPool, PgPoolOptions};
pub use sqlx::types::time;

/// The schema, embedded from the workspace's `migrations/` at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Brings the database's schema up to date (idempotent; safe with several controllers, as sqlx
/// takes an advisory lock while migrating).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(|error| match error {
        sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
        other => StoreError::Database(sqlx::Error::Migrate(Box::new(other))),
    })
}

/// One page of a newest-first list, as OpenAI's `{"data": […], "has_more": …}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// Rows fetched with `LIMIT limit + 1`: the extra row only says that there is more.
    pub(crate) fn from_overfetch(mut items: Vec<T>, limit: i64) -> Self {
        let has_more = items.len() as i64 > limit;
        items.truncate(limit.max(0) as usize);
        Page { items, has_more }
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn an_overfetched_row_only_sets_has_more() {
        assert_eq!(Page::from_overfetch(vec![1, 2, 3], 2), Page { items: vec![1, 2], has_more: true });
        assert_eq!(Page::from_overfetch(vec![1, 2], 2), Page { items: vec![1, 2], has_more: false });
        assert_eq!(Page::from_overfetch(Vec::<i32>::new(), 0), Page { items: vec![], has_more: false });
    }
}
