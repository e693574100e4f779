//! One leader among controller replicas, for the work that should run once (the reconciler's
//! requeues and republishes): a Postgres session-level advisory lock, held on a connection of
//! its own for as long as the leader lives. When the leader dies (even by `kill -9`), Postgres
//! sees its connection close and the lock is free for the next replica's attempt.
//!
//! The work is also safe without a leader (row locks with SKIP LOCKED, idempotent publishes);
//! the lock keeps N replicas from doing it N times.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use crate::StoreError;

/// The advisory lock key: "lathe-reconciler" folded into an i64 (any constant works; this one
/// is unlikely to collide with another application's on a shared database).
const RECONCILER_LOCK: i64 = 0x6c61_7468_6572_6563;

/// This replica's side of the lock.
#[derive(Default)]
pub struct Leadership {
    held: Option<PgConnection>,
}

impl Leadership {
    /// True when this replica leads: it already held the lock and its session is alive, or it
    /// has just taken it. A dead session gives the lock up (Postgres released it already).
    pub async fn lead(&mut self, pool: &PgPool) -> Result<bool, StoreError> {
        if let Some(conn) = &mut self.held {
            if conn.ping().await.is_ok() {
                return Ok(true);
            }
            self.held = None;
        }
        // Detached only once it holds the lock: a follower's try goes back to the pool (a
        // detached connection dropped without `close` could linger on the server, one per pass).
        let mut conn = pool.acquire().await?;
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RECONCILER_LOCK).fetch_one(&mut *conn).await?;
        if acquired {
            self.held = Some(conn.detach());
        }
        Ok(acquired)
    }

    pub fn is_leader(&self) -> bool {
        self.held.is_some()
    }
}
