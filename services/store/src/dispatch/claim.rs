//! Claim and lease renewal: the compare-and-set that starts an attempt.

use std::time::Duration;

use lathe_core::{JobId, JobSpec};
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::PgPool;

use super::report::{latest_checkpoint_in, Checkpoint};
use crate::error::corrupt;
use crate::StoreError;

#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub worker_id: &'a str,
    /// The id a worker was woken with; `None` takes the best queued job the worker fits
    /// (its pools and GPU memory, by priority then age).
    pub job_id: Option<&'a str>,
    pub lease: Duration,
}

/// What a worker needs to run an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub job_id: JobId,
    pub project_id: String,
    /// The fencing token for every later call of this attempt.
    pub attempt: i32,
    pub spec: JobSpec,
    pub lease_expires_at: OffsetDateTime,
    /// The last committed checkpoint: the attempt resumes from it.
    pub resume_from: Option<Checkpoint>,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: String,
    project_id: String,
    attempt: i32,
    spec: Json<serde_json::Value>,
    lease_expires_at: OffsetDateTime,
}

/// Starts an attempt, or `None` when there is nothing this worker may take (the job is gone,
/// already claimed, in backoff, too big, not in its pools, or the worker is draining).
pub async fn claim_job(pool: &PgPool, request: ClaimRequest<'_>) -> Result<Option<Claim>, StoreError> {
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query_as::<_, ClaimedRow>(
        "WITH worker AS (
             SELECT id, pools, gpu_memory_bytes, gpus, nodes FROM workers WHERE id = $1 AND NOT draining
         ), candidate AS (
             SELECT j.id FROM jobs j, worker w
             WHERE j.status = 'queued'
               AND ($2::text IS NULL OR j.id = $2)
               AND j.pool = ANY(w.pools)
               AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= now())
               AND j.nodes <= w.nodes
               AND j.gpus <= w.gpus * j.nodes
               AND (j.gpu_memory_gb IS NULL
                    OR j.gpu_memory_gb::bigint * 1073741824 <= coalesce(w.gpu_memory_bytes, 0))
             ORDER BY j.priority DESC, j.created_at, j.id
             LIMIT 1
             FOR UPDATE OF j SKIP LOCKED
         )
         UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1, lease_owner = $1,
                lease_expires_at = now() + make_interval(secs => $3),
                started_at = coalesce(started_at, now()), next_attempt_at = NULL
         FROM candidate
         WHERE jobs.id = candidate.id AND jobs.status = 'queued'
         RETURNING jobs.id, jobs.project_id, jobs.attempt, jobs.spec, jobs.lease_expires_at",
    )
    .bind(request.worker_id)
    .bind(request.job_id)
    .bind(request.lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = claimed else {
        return Ok(None);
    };

    let resume_from = latest_checkpoint_in(&mut tx, &row.id).await?;
    sqlx::query("INSERT INTO attempts (job_id, number, worker_id, resumed_from_step) VALUES ($1, $2, $3, $4)")
        .bind(&row.id)
        .bind(row.attempt)
        .bind(request.worker_id)
        .bind(resume_from.as_ref().map(|c| c.step))
        .execute(&mut *tx)
        .await
        .map_err(|error| match error {
            sqlx::Error::Database(ref db) if db.is_unique_violation() => {
                StoreError::Conflict(format!("job {} already has a live attempt", row.id))
            }
            other => other.into(),
        })?;
    tx.commit().await?;

    Ok(Some(Claim {
        job_id: JobId::parse(&row.id).map_err(corrupt)?,
        project_id: row.project_id,
        attempt: row.attempt,
        spec: serde_json::from_value(row.spec.0).map_err(corrupt)?,
        lease_expires_at: row.lease_expires_at,
        resume_from,
    }))
}

/// What a renewal tells the worker besides the new expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRenewal {
    pub lease_expires_at: OffsetDateTime,
    /// The user asked to pause: checkpoint, then finish the attempt as paused.
    pub pause_requested: bool,
}

/// Extends the lease of the attempt `worker_id` holds. Refused with `StaleAttempt` when the
/// attempt no longer holds the job (requeued after expiry, cancelled, finished) — the worker
/// must stop.
pub async fn renew_lease(pool: &PgPool, job_id: &str, attempt: i32, worker_id: &str, lease: Duration) -> Result<LeaseRenewal, StoreError> {
    let renewed: Option<(OffsetDateTime, bool)> = sqlx::query_as(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4)
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND lease_owner = $3
         RETURNING lease_expires_at, pause_requested",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(worker_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    if let Some((lease_expires_at, pause_requested)) = renewed {
        return Ok(LeaseRenewal { lease_expires_at, pause_requested });
    }
    let current: i32 = sqlx::query_scalar("SELECT attempt FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?;
    Err(StoreError::StaleAttempt { job: job_id.to_string(), attempt, current })
}
