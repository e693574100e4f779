//! The reconciler's side of dispatch: expired leases back to the queue (or to `failed` as
//! poison), and the list of queued jobs to re-publish to Redis.

use std::time::Duration;

use lathe_core::JobId;
use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use super::lease::{self, Work};

use crate::error::corrupt;
use crate::jobs::parse_status;
use crate::StoreError;
use lathe_core::JobStatus;

/// `error.code` of a job failed because its attempts kept crashing or losing their worker.
pub const POISON_ERROR_CODE: &str = "job_crashed_repeatedly";

/// How crashes are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Crashes a job may have and still be retried; the next one fails it as poison.
    pub max_retries: i32,
    /// Backoff after the first crash; doubled after each further one.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait before the next attempt after `n` earlier ones failed: doubling from the base,
    /// capped.
    pub fn backoff(&self, n: u32) -> Duration {
        self.base_backoff.saturating_mul(1u32 << n.min(20)).min(self.max_backoff)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_retries: 3, base_backoff: Duration::from_secs(10), max_backoff: Duration::from_secs(600) }
    }
}

/// A job the reconciler took back from a worker that stopped renewing its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequeuedJob {
    pub job_id: JobId,
    /// The attempt whose lease expired.
    pub attempt: i32,
    /// `queued` (retry after backoff), `paused` (a pause was pending) or `failed` (poison).
    pub status: JobStatus,
}

/// Ends every running attempt whose lease expired before `now` as `lease_lost` and counts it
/// as a crash (see [`lease::requeue_expired`]).
pub async fn requeue_expired_leases(pool: &PgPool, now: OffsetDateTime, policy: &RetryPolicy) -> Result<Vec<RequeuedJob>, StoreError> {
    lease::requeue_expired(pool, Work::Job, now, policy)
        .await?
        .into_iter()
        .map(|r| Ok(RequeuedJob { job_id: JobId::parse(&r.id).map_err(corrupt)?, attempt: r.attempt, status: parse_status(&r.status)? }))
        .collect()
}

/// A job a worker may claim now, as the reconciler publishes it to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub job_id: JobId,
    pub pool: String,
    pub priority: i16,
}

/// Every queued job past its backoff, in dispatch order: what Redis should hold.
pub async fn queued_job_ids(pool: &PgPool) -> Result<Vec<QueuedJob>, StoreError> {
    let rows: Vec<(String, String, i16)> = sqlx::query_as(
        "SELECT id, pool, priority FROM jobs
         WHERE status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= now())
         ORDER BY priority DESC, created_at, id",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(id, pool, priority)| Ok(QueuedJob { job_id: JobId::parse(&id).map_err(corrupt)?, pool, priority })).collect()
}
