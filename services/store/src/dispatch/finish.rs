//! How an attempt ends, as its worker reports it.

use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::PgPool;

use super::lease::{self, Work};
use super::lock_attempt;
use super::reconcile::RetryPolicy;
use crate::evaluations::{insert_evaluation, NewEvaluation};
use crate::jobs::{end_live_attempt, get_job_by_id, Job, JobError};
use crate::StoreError;

#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Succeeded {
        fine_tuned_model: String,
        result_files: Vec<String>,
        trained_tokens: Option<i64>,
    },
    /// Bad input or configuration: failed at once, no retry.
    Failed(JobError),
    /// The training crashed (a panic, an OOM): retried with backoff, up to the poison limit.
    Crashed {
        reason: String,
    },
    /// SIGTERM from Slurm or Kubernetes after a checkpoint: back to the queue for free.
    Preempted {
        reason: String,
    },
    /// The infrastructure failed under it (storage full): back to the queue for free, after a
    /// backoff that doubles with each such fault of the job.
    Faulted {
        reason: String,
    },
    /// The user's pause: the worker checkpointed and stopped. The job is `paused`, or `queued`
    /// when the pause was withdrawn (resumed) meanwhile.
    Paused,
}

/// Ends the attempt and moves the job accordingly; refused with `StaleAttempt` when `attempt`
/// no longer holds the job. A pending pause turns a requeue into `paused`.
pub async fn finish_attempt(
    pool: &PgPool,
    job_id: &str,
    attempt: i32,
    outcome: AttemptOutcome,
    policy: &RetryPolicy,
) -> Result<Job, StoreError> {
    let mut tx = pool.begin().await?;
    lock_attempt(&mut tx, job_id, attempt, true).await?;
    match outcome {
        AttemptOutcome::Succeeded { fine_tuned_model, result_files, trained_tokens } => {
            sqlx::query(
                "UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_owner = NULL,
                        lease_expires_at = NULL, pause_requested = false,
                        fine_tuned_model = $2, result_files = $3, trained_tokens = $4
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(&fine_tuned_model)
            .bind(&result_files)
            .bind(trained_tokens)
            .execute(&mut *tx)
            .await?;
            end_live_attempt(&mut tx, job_id, "succeeded", "").await?;
            // The evaluations the job asked for, queued with its success: never one without the other.
            let (project_id, spec): (String, Json<lathe_core::JobSpec>) =
                sqlx::query_as("SELECT project_id, spec FROM jobs WHERE id = $1").bind(job_id).fetch_one(&mut *tx).await?;
            for evaluation in &spec.0.evaluations {
                let new = NewEvaluation { project_id: &project_id, model: &fine_tuned_model, job_id: Some(job_id), spec: evaluation };
                insert_evaluation(&mut tx, new).await?;
            }
        }
        AttemptOutcome::Failed(error) => {
            sqlx::query(
                "UPDATE jobs SET status = 'failed', finished_at = now(), lease_owner = NULL,
                        lease_expires_at = NULL, pause_requested = false, error = $2
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(Json(&error))
            .execute(&mut *tx)
            .await?;
            end_live_attempt(&mut tx, job_id, "failed", &error.message).await?;
        }
        AttemptOutcome::Crashed { reason } => {
            end_live_attempt(&mut tx, job_id, "crashed", &reason).await?;
            lease::requeue_after_crash(&mut tx, Work::Job, job_id, &reason, OffsetDateTime::now_utc(), policy).await?;
        }
        AttemptOutcome::Preempted { reason } => {
            end_live_attempt(&mut tx, job_id, "preempted", &reason).await?;
            lease::release(&mut tx, Work::Job, job_id).await?;
        }
        AttemptOutcome::Faulted { reason } => {
            end_live_attempt(&mut tx, job_id, "faulted", &reason).await?;
            let faults: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE job_id = $1 AND outcome = 'faulted'")
                .bind(job_id)
                .fetch_one(&mut *tx)
                .await?;
            let not_before = OffsetDateTime::now_utc() + policy.backoff(faults.max(1) as u32 - 1);
            lease::release_after(&mut tx, Work::Job, job_id, Some(not_before)).await?;
        }
        AttemptOutcome::Paused => {
            end_live_attempt(&mut tx, job_id, "paused", "paused by the user").await?;
            // The user may have resumed while the worker was checkpointing for the pause: then
            // the job goes back to the queue instead (and continues from that checkpoint).
            lease::release(&mut tx, Work::Job, job_id).await?;
        }
    }
    tx.commit().await?;
    get_job_by_id(pool, job_id).await
}

/// A preempted attempt gives the job back: queued (or paused, if a pause was pending) at
/// once, without spending the retry budget. The next claim resumes from the last checkpoint.
pub async fn release_preempted(pool: &PgPool, job_id: &str, attempt: i32) -> Result<Job, StoreError> {
    let outcome = AttemptOutcome::Preempted { reason: "preempted".to_string() };
    finish_attempt(pool, job_id, attempt, outcome, &RetryPolicy::default()).await
}
