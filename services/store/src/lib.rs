//! Lathe's Postgres store: every job, attempt, event, metric point, checkpoint, file, worker and
//! API key lives here, and this crate is the only code that reads or writes them.
//!
//! Where it sits in the flow (docs/architecture.md §1):
//!
//! ```text
//! REST handlers ───────┐   files, jobs (create / list / cancel / pause / resume), evaluations, keys
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

pub mod demand;
pub mod dispatch;
pub mod error;
pub mod evaluations;
pub mod files;
pub mod fleets;
pub mod jobs;
pub mod keys;
pub mod leadership;
pub mod progress;
pub mod projects;
mod random;
pub mod tracking;
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

/// How long a pooled connection may sit unused before it is closed.
const IDLE_CONNECTION_SECONDS: u64 = 60;

/// Connects to `database_url`, creating the database when it does not exist yet (a fresh
/// install needs no manual `createdb`), and brings its schema up to date. `application` names
/// the connections in `pg_stat_activity` (unless the URL sets `application_name` itself), so an
/// operator can see who holds the server's connections.
pub async fn connect(database_url: &str, max_connections: u32, application: &str) -> Result<PgPool, StoreError> {
    use sqlx::postgres::PgConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;

    let mut options = PgConnectOptions::from_str(database_url).map_err(StoreError::Database)?;
    if !database_url.contains("application_name=") {
        options = options.application_name(application);
    }
    // A session the network cut off (the controller's side is gone, the server's lingers) must
    // not hold its locks until the kernel notices: the server drops it within about a minute and
    // aborts its open transaction, and a statement never waits on a lock for more than 30 s, so
    // after a partition heals every controller makes progress again.
    options = options.options([
        ("idle_in_transaction_session_timeout", "60s"),
        ("lock_timeout", "30s"),
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
    ]);
    // One connection first, outside any pool: a pool retries a refusal it deems transient
    // ("too many clients already", "starting up") until its timeout and then reports only the
    // timeout; this way the server's own words reach the operator.
    let first = match options.connect().await {
        Ok(connection) => connection,
        // 3D000 invalid_catalog_name: the server is up, the database is not there yet.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("3D000") => {
            create_database(&options).await?;
            options.connect().await?
        }
        Err(other) => return Err(other.into()),
    };
    first.close().await?;
    // Idle connections go back to the server after a minute: a burst (a reconcile pass, a page
    // of uploads) must not hold a replica's whole pool against max_connections for the pool's
    // lifetime.
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .idle_timeout(std::time::Duration::from_secs(IDLE_CONNECTION_SECONDS))
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options)
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// `CREATE DATABASE` for the database `options` names, from the server's `postgres` database;
/// another process creating it first is fine.
async fn create_database(options: &sqlx::postgres::PgConnectOptions) -> Result<(), StoreError> {
    use sqlx::{ConnectOptions, Connection};

    let name = options.get_database().unwrap_or("lathe").to_string();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Misconfigured(format!("database {name:?} does not exist; create it first")));
    }
    let mut admin = options.clone().database("postgres").connect().await?;
    let created = sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await;
    admin.close().await?;
    match created {
        Ok(_) => Ok(()),
        // Another process created it first (42P04 duplicate_database, or 23505 on the catalog).
        Err(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("42P04") | Some("23505")) => Ok(()),
        Err(other) => Err(other.into()),
    }
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

/// One round trip, for readiness probes.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Runs one statement that returns nothing (administrative SQL in tests and tools).
pub async fn execute(pool: &PgPool, sql: &str) -> Result<(), StoreError> {
    sqlx::query(sql).execute(pool).await?;
    Ok(())
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
