//! Claim and lease renewal: the compare-and-set that starts an attempt.

use std::time::Duration;

use lathe_core::{JobId, JobSpec};
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use super::fair_share;
use super::lease::{self, Work};
use super::report::{latest_checkpoint_in, Checkpoint};
use crate::error::corrupt;
use crate::StoreError;

#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub worker_id: &'a str,
    /// Exactly this job (tests, tools); `None` takes the job fair share ranks first among
    /// those the worker fits (its pools, GPUs and memory): see [`lathe_core::fair_share`].
    pub job_id: Option<&'a str>,
    pub lease: Duration,
    /// The half-life of a project's recent use in fair share.
    pub half_life: Duration,
}

/// The default half-life of recent use in fair share: an hour, so a project's burst weighs on
/// its next claims for the rest of the working day, not the rest of the week.
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(3600);

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
    let claimed = match request.job_id {
        Some(id) => claim_one(&mut tx, &request, id).await?,
        None => claim_fair(&mut tx, &request).await?,
    };
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

const RETURNING: &str = "t.id, t.project_id, t.attempt, t.spec, t.lease_expires_at";

async fn claim_one(tx: &mut Transaction<'_, Postgres>, request: &ClaimRequest<'_>, id: &str) -> Result<Option<ClaimedRow>, StoreError> {
    lease::claim(tx, Work::Job, request.worker_id, Some(id), request.lease, RETURNING).await
}

/// The candidates in fair-share order, each tried with the claim's compare-and-set until one
/// is won (another worker may take or lock the first ones meanwhile). A project with a quota is
/// serialised by an advisory lock held to commit, and its running GPUs are counted again
/// under it, so two claims racing at the edge of a quota cannot both pass it.
async fn claim_fair(tx: &mut Transaction<'_, Postgres>, request: &ClaimRequest<'_>) -> Result<Option<ClaimedRow>, StoreError> {
    let candidates = fair_share::candidates(tx, request.worker_id).await?;
    let states = fair_share::project_states(tx, &candidates, request.half_life).await?;
    for candidate in lathe_core::fair_share::rank(&candidates, &states) {
        let quota = states.get(&(candidate.pool.clone(), candidate.project.clone())).and_then(|s| s.share.max_gpus);
        if let Some(max_gpus) = quota {
            if !fair_share::lock_quota(tx, candidate, max_gpus).await? {
                continue;
            }
        }
        if let Some(row) = claim_one(tx, request, &candidate.id).await? {
            return Ok(Some(row));
        }
    }
    Ok(None)
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
