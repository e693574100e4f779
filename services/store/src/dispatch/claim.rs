//! Claim and lease renewal: the compare-and-set that starts an attempt.

use std::time::Duration;

use lathe_core::{JobId, JobSpec};
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::PgPool;

use super::lease::{self, Work};
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
/// already claimed, in backoff, too big, not in its pools, or the worker is draining or may
/// not train). The compare-and-set is [`lease::claim`]; the attempt's row and the checkpoint
/// to resume from are written and read in the same transaction.
pub async fn claim_job(pool: &PgPool, request: ClaimRequest<'_>) -> Result<Option<Claim>, StoreError> {
    let mut tx = pool.begin().await?;
    let returning = "t.id, t.project_id, t.attempt, t.spec, t.lease_expires_at";
    let claimed: Option<ClaimedRow> = lease::claim(&mut tx, Work::Job, request.worker_id, request.job_id, request.lease, returning).await?;
    let Some(row) = claimed else {
        tx.commit().await?;
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

/// Extends the lease of the attempt `worker_id` holds; see [`lease::renew`].
pub async fn renew_lease(
    pool: &PgPool,
    job_id: &str,
    attempt: i32,
    worker_id: &str,
    lease: Duration,
) -> Result<OffsetDateTime, StoreError> {
    lease::renew(pool, Work::Job, job_id, attempt, worker_id, lease).await
}
