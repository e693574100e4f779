//! The reconciler's side of dispatch: expired leases back to the queue (or to `failed` as
//! poison), and the list of queued jobs to re-publish to Redis.

use std::time::Duration;

use lathe_core::JobId;
use sqlx::types::time::OffsetDateTime;
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::corrupt;
use crate::jobs::{end_live_attempt, parse_status};
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
/// as a crash. Rows locked by another reconciler are skipped, so replicas can run this at once.
pub async fn requeue_expired_leases(pool: &PgPool, now: OffsetDateTime, policy: &RetryPolicy) -> Result<Vec<RequeuedJob>, StoreError> {
    let mut tx = pool.begin().await?;
    let expired: Vec<(String, i32)> = sqlx::query_as(
        "SELECT id, attempt FROM jobs WHERE status = 'running' AND lease_expires_at < $1
         ORDER BY lease_expires_at LIMIT 500 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut requeued = Vec::with_capacity(expired.len());
    for (job_id, attempt) in expired {
        let reason = format!("lease of attempt {attempt} expired");
        end_live_attempt(&mut tx, &job_id, "lease_lost", &reason).await?;
        let status = requeue_after_crash(&mut tx, &job_id, &reason, now, policy).await?;
        requeued.push(RequeuedJob { job_id: JobId::parse(&job_id).map_err(corrupt)?, attempt, status });
    }
    tx.commit().await?;
    Ok(requeued)
}

/// Spends one retry: back to the queue after a backoff (paused if a pause was pending), or
/// failed as poison once the budget is spent. The caller holds the row lock and has ended the
/// attempt.
pub(crate) async fn requeue_after_crash(
    tx: &mut Transaction<'_, Postgres>,
    job_id: &str,
    reason: &str,
    now: OffsetDateTime,
    policy: &RetryPolicy,
) -> Result<JobStatus, StoreError> {
    let status: String = sqlx::query_scalar(
        "UPDATE jobs SET
             retries = retries + 1,
             status = CASE WHEN retries + 1 > $2 THEN 'failed'
                           WHEN pause_requested THEN 'paused' ELSE 'queued' END,
             error = CASE WHEN retries + 1 > $2 THEN jsonb_build_object(
                         'code', $3::text,
                         'message', format('the job crashed or lost its worker %s times; last: %s', retries + 1, $4::text),
                         'param', NULL)
                     ELSE error END,
             finished_at = CASE WHEN retries + 1 > $2 THEN $5 ELSE NULL END,
             next_attempt_at = CASE WHEN retries + 1 > $2 OR pause_requested THEN NULL
                                    ELSE $5 + make_interval(secs => least($7, $6 * power(2, retries))) END,
             pause_requested = false, lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1
         RETURNING status",
    )
    .bind(job_id)
    .bind(policy.max_retries)
    .bind(POISON_ERROR_CODE)
    .bind(reason)
    .bind(now)
    .bind(policy.base_backoff.as_secs_f64())
    .bind(policy.max_backoff.as_secs_f64())
    .fetch_one(&mut **tx)
    .await?;
    parse_status(&status)
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
