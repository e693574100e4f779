//! Fine-tuning jobs as the API sees them: create (idempotent on a key), get, list, and the
//! user's moves — cancel, pause, resume — applied as compare-and-sets under a row lock, with
//! `lathe_core::transition` deciding which moves exist. Worker-side moves (claim, finish,
//! requeue) live in [`crate::dispatch`].

use std::str::FromStr;

use lathe_core::{transition, FileId, IllegalTransition, JobId, JobSpec, JobStatus};
use serde::{Deserialize, Serialize};
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::corrupt;
use crate::{random, Page, StoreError};

/// The job object's `error`: OpenAI's `{code, message, param}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub project_id: String,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub fine_tuned_model: Option<String>,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<i64>,
    pub error: Option<JobError>,
    /// The fencing token of the current (or last) attempt; 0 before the first claim.
    pub attempt: i32,
    /// Crashes spent from the retry budget (preemption is free).
    pub retries: i32,
    /// Not dispatched before this (retry backoff).
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The user asked a running job to pause: its worker checkpoints, then finishes the
    /// attempt as paused.
    pub pause_requested: bool,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the create request (canonical JSON), compared when the key is reused.
    pub request_sha256: Option<String>,
    /// The job-create check's counts: examples, truncated, dropped.
    pub training_data: Option<serde_json::Value>,
    /// Why a queued job is not starting, when the reconciler can tell (no live worker offers
    /// its shape); cleared when that changes and by its claim.
    pub pending_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: String,
    project_id: String,
    status: String,
    spec: Json<serde_json::Value>,
    fine_tuned_model: Option<String>,
    result_files: Vec<String>,
    trained_tokens: Option<i64>,
    error: Option<Json<JobError>>,
    attempt: i32,
    retries: i32,
    next_attempt_at: Option<OffsetDateTime>,
    pause_requested: bool,
    idempotency_key: Option<String>,
    request_sha256: Option<String>,
    training_data: Option<Json<serde_json::Value>>,
    pending_reason: Option<String>,
    created_at: OffsetDateTime,
    started_at: Option<OffsetDateTime>,
    finished_at: Option<OffsetDateTime>,
}

pub(crate) const JOB_COLUMNS: &str = "id, project_id, status, spec, fine_tuned_model, result_files, \
    trained_tokens, error, attempt, retries, next_attempt_at, pause_requested, idempotency_key, \
    request_sha256, training_data, pending_reason, created_at, started_at, finished_at";

impl TryFrom<JobRow> for Job {
    type Error = StoreError;
    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(Job {
            id: JobId::parse(&row.id).map_err(corrupt)?,
            project_id: row.project_id,
            status: parse_status(&row.status)?,
            spec: serde_json::from_value(row.spec.0).map_err(corrupt)?,
            fine_tuned_model: row.fine_tuned_model,
            result_files: row.result_files,
            trained_tokens: row.trained_tokens,
            error: row.error.map(|e| e.0),
            attempt: row.attempt,
            retries: row.retries,
            next_attempt_at: row.next_attempt_at,
            pause_requested: row.pause_requested,
            idempotency_key: row.idempotency_key,
            request_sha256: row.request_sha256,
            training_data: row.training_data.map(|d| d.0),
            pending_reason: row.pending_reason,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        })
    }
}

pub(crate) fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    JobStatus::from_str(text).map_err(corrupt)
}

/// Creates a queued job, or returns the project's existing job for the same idempotency key.
/// The `bool` is true when this call created it (201 vs 200 is the caller's choice).
///
/// The training and validation files must be live files of the project, else `NotFound` (a
/// repeat of an accepted key returns its job even if the file was deleted since).
/// Concurrent creates with one key race on the unique (project, key) index: `ON CONFLICT DO
/// NOTHING` lets exactly one insert win and every other call reads the winner's row.
pub async fn create_job(pool: &PgPool, project_id: &str, spec: &JobSpec, idempotency_key: Option<&str>) -> Result<(Job, bool), StoreError> {
    admit_job(pool, project_id, spec, &Admission { idempotency_key, ..Admission::default() }).await
}

/// What the API learned while checking a create request, stored with the job.
#[derive(Debug, Default)]
pub struct Admission<'a> {
    pub idempotency_key: Option<&'a str>,
    /// See [`Job::request_sha256`].
    pub request_sha256: Option<&'a str>,
    /// See [`Job::training_data`].
    pub training_data: Option<&'a serde_json::Value>,
}

/// [`create_job`] with everything the API checked. An existing job for the key is returned as
/// it is: comparing its `request_sha256` is the caller's business.
pub async fn admit_job(pool: &PgPool, project_id: &str, spec: &JobSpec, admission: &Admission<'_>) -> Result<(Job, bool), StoreError> {
    let idempotency_key = admission.idempotency_key;
    if let Some(key) = idempotency_key {
        if let Some(existing) = find_by_idempotency_key(pool, project_id, key).await? {
            return Ok((existing, false));
        }
    }
    let mut files: Vec<&str> = std::iter::once(&spec.training_file).chain(spec.validation_file.as_ref()).map(FileId::as_str).collect();
    // One file may serve as both training and validation file.
    files.dedup();
    let live_files: i64 = sqlx::query_scalar("SELECT count(*) FROM files WHERE id = ANY($1) AND project_id = $2 AND deleted_at IS NULL")
        .bind(&files)
        .bind(project_id)
        .fetch_one(pool)
        .await?;
    if live_files != files.len() as i64 {
        return Err(StoreError::NotFound);
    }

    let spec_json = serde_json::to_value(spec).map_err(|e| StoreError::Database(sqlx::Error::Encode(e.into())))?;
    let id = JobId::from_random(random::id_bytes());
    let inserted = sqlx::query_as::<_, JobRow>(&format!(
        "INSERT INTO jobs (id, project_id, status, spec, model, training_file, validation_file, suffix,
                           priority, pool, gpu_memory_gb, idempotency_key, request_sha256, training_data, gpus, nodes)
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (project_id, idempotency_key) DO NOTHING
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(id.as_str())
    .bind(project_id)
    .bind(Json(&spec_json))
    .bind(spec.model.as_str())
    .bind(spec.training_file.as_str())
    .bind(spec.validation_file.as_ref().map(FileId::as_str))
    .bind(spec.suffix.as_deref())
    .bind(spec.resources.priority as i16)
    .bind(&spec.resources.pool)
    .bind(spec.resources.gpu_memory_gb.map(|gb| gb as i32))
    .bind(idempotency_key)
    .bind(admission.request_sha256)
    .bind(admission.training_data.map(Json))
    .bind(spec.resources.gpus as i32)
    .bind(spec.resources.nodes as i32)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = inserted {
        return Ok((row.try_into()?, true));
    }

    // Only a key can conflict: the winner's row is committed, since ON CONFLICT waited for it.
    let key = idempotency_key.ok_or_else(|| StoreError::Conflict(format!("job id {id}")))?;
    let existing = find_by_idempotency_key(pool, project_id, key).await?.ok_or(StoreError::NotFound)?;
    Ok((existing, false))
}

/// The project's job created with this `Idempotency-Key`, if any.
pub async fn find_by_idempotency_key(pool: &PgPool, project_id: &str, key: &str) -> Result<Option<Job>, StoreError> {
    let row = sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = $1 AND idempotency_key = $2"))
        .bind(project_id)
        .bind(key)
        .fetch_optional(pool)
        .await?;
    row.map(Job::try_from).transpose()
}

pub async fn get_job(pool: &PgPool, project_id: &str, job_id: &JobId) -> Result<Job, StoreError> {
    let job_id = job_id.as_str();
    sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND project_id = $2"))
        .bind(job_id)
        .bind(project_id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?
        .try_into()
}

/// A job by id alone, for the controller's own use (gRPC service, reconciler): never for a
/// user-facing request, which goes through [`get_job`].
pub async fn get_job_unscoped(pool: &PgPool, job_id: &JobId) -> Result<Job, StoreError> {
    get_job_by_id(pool, job_id.as_str()).await
}

/// [`get_job_unscoped`] for an id the store itself read (a fenced write's job).
pub(crate) async fn get_job_by_id(pool: &PgPool, job_id: &str) -> Result<Job, StoreError> {
    sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(job_id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?
        .try_into()
}

/// Newest first; `after` is the id of the last job of the previous page.
/// One page of the project's jobs, newest first; with `metadata`, only the jobs whose metadata
/// holds every one of its key-value pairs (OpenAI's `jobs.list(metadata=…)`).
pub async fn list_jobs(
    pool: &PgPool,
    project_id: &str,
    after: Option<&str>,
    limit: i64,
    metadata: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Page<Job>, StoreError> {
    let metadata = metadata.filter(|m| !m.is_empty()).map(|m| serde_json::json!(m));
    let rows = sqlx::query_as::<_, JobRow>(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE project_id = $1
           AND ($2::text IS NULL OR (created_at, id) <
                (SELECT created_at, id FROM jobs WHERE id = $2 AND project_id = $1))
           AND ($4::jsonb IS NULL OR spec->'metadata' @> $4)
         ORDER BY created_at DESC, id DESC
         LIMIT $3"
    ))
    .bind(project_id)
    .bind(after)
    .bind(limit + 1)
    .bind(metadata)
    .fetch_all(pool)
    .await?;
    let jobs = rows.into_iter().map(Job::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_overfetch(jobs, limit))
}

/// Locks the project's job row for a status move and returns its current status.
async fn lock_job(tx: &mut Transaction<'_, Postgres>, project_id: &str, job_id: &str) -> Result<(JobStatus, bool), StoreError> {
    let (status, pause_requested): (String, bool) =
        sqlx::query_as("SELECT status, pause_requested FROM jobs WHERE id = $1 AND project_id = $2 FOR UPDATE")
            .bind(job_id)
            .bind(project_id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound)?;
    Ok((parse_status(&status)?, pause_requested))
}

async fn fetch_locked(tx: &mut Transaction<'_, Postgres>, job_id: &str) -> Result<Job, StoreError> {
    sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?
        .try_into()
}

/// Cancels at once, whatever the job was doing. A running job's attempt is ended here, so the
/// worker's next fenced write (or lease renewal) is refused and it stops; the GPU is freed
/// within one heartbeat.
pub async fn cancel_job(pool: &PgPool, project_id: &str, job_id: &JobId) -> Result<Job, StoreError> {
    let job_id = job_id.as_str();
    let mut tx = pool.begin().await?;
    let (from, _) = lock_job(&mut tx, project_id, job_id).await?;
    transition(from, JobStatus::Cancelled)?;
    sqlx::query(
        "UPDATE jobs SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
                lease_expires_at = NULL, cancel_requested = (status = 'running'), pause_requested = false
         WHERE id = $1",
    )
    .bind(job_id)
    .execute(&mut *tx)
    .await?;
    end_live_attempt(&mut tx, job_id, "cancelled", "cancelled by the user").await?;
    let job = fetch_locked(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(job)
}

/// A queued job pauses at once. A running one is asked to: it stays `running` with
/// `pause_requested` until its worker checkpoints and finishes the attempt as paused.
pub async fn pause_job(pool: &PgPool, project_id: &str, job_id: &JobId) -> Result<Job, StoreError> {
    let job_id = job_id.as_str();
    let mut tx = pool.begin().await?;
    let (from, _) = lock_job(&mut tx, project_id, job_id).await?;
    transition(from, JobStatus::Paused)?;
    let update = if from == JobStatus::Running {
        "UPDATE jobs SET pause_requested = true WHERE id = $1"
    } else {
        "UPDATE jobs SET status = 'paused', next_attempt_at = NULL WHERE id = $1"
    };
    sqlx::query(update).bind(job_id).execute(&mut *tx).await?;
    let job = fetch_locked(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(job)
}

/// A paused job goes back to the queue (and resumes from its last checkpoint when claimed);
/// a running job with a pause pending simply keeps running.
pub async fn resume_job(pool: &PgPool, project_id: &str, job_id: &JobId) -> Result<Job, StoreError> {
    let job_id = job_id.as_str();
    let mut tx = pool.begin().await?;
    let (from, pause_requested) = lock_job(&mut tx, project_id, job_id).await?;
    let update = match from {
        JobStatus::Running if pause_requested => "UPDATE jobs SET pause_requested = false WHERE id = $1",
        JobStatus::Paused => "UPDATE jobs SET status = 'queued', pause_requested = false WHERE id = $1",
        from => return Err(IllegalTransition { from, to: JobStatus::Queued }.into()),
    };
    sqlx::query(update).bind(job_id).execute(&mut *tx).await?;
    let job = fetch_locked(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(job)
}

/// Fails a job that never reached a worker (e.g. its files failed validation).
pub async fn fail_job(pool: &PgPool, project_id: &str, job_id: &JobId, error: &JobError) -> Result<Job, StoreError> {
    let job_id = job_id.as_str();
    let mut tx = pool.begin().await?;
    let (from, _) = lock_job(&mut tx, project_id, job_id).await?;
    transition(from, JobStatus::Failed)?;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', error = $2, finished_at = now(), lease_owner = NULL,
                lease_expires_at = NULL
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(Json(error))
    .execute(&mut *tx)
    .await?;
    end_live_attempt(&mut tx, job_id, "failed", &error.message).await?;
    let job = fetch_locked(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(job)
}

/// Ends the job's live attempt, if any, with `outcome`.
pub(crate) async fn end_live_attempt(
    tx: &mut Transaction<'_, Postgres>,
    job_id: &str,
    outcome: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE attempts SET ended_at = now(), outcome = $2, reason = $3
         WHERE job_id = $1 AND ended_at IS NULL",
    )
    .bind(job_id)
    .bind(outcome)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How many jobs are in each status (the `lathe_jobs` gauge).
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(JobStatus, i64)>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status").fetch_all(pool).await?;
    rows.into_iter().map(|(status, n)| Ok((parse_status(&status)?, n))).collect()
}

/// The project's fine-tuned models: `(name, base model, finished_at)` of its succeeded jobs.
pub async fn list_fine_tuned_models(pool: &PgPool, project_id: &str) -> Result<Vec<(String, String, OffsetDateTime)>, StoreError> {
    let rows: Vec<(String, String, OffsetDateTime)> = sqlx::query_as(
        "SELECT fine_tuned_model, model, coalesce(finished_at, created_at) FROM jobs
         WHERE project_id = $1 AND status = 'succeeded' AND fine_tuned_model IS NOT NULL AND model_deleted_at IS NULL
         ORDER BY finished_at DESC, id DESC",
    )
    .bind(project_id)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// What a running attempt's stream must tell its worker, while `attempt` still holds the job's
/// row; `None` once it does not (requeued, reclaimed).
pub async fn attempt_control(pool: &PgPool, job_id: &str, attempt: i32) -> Result<Option<AttemptControl>, StoreError> {
    let row: Option<(String, bool, Option<OffsetDateTime>, Option<String>)> =
        sqlx::query_as("SELECT status, pause_requested, preempt_requested_at, preempted_for FROM jobs WHERE id = $1 AND attempt = $2")
            .bind(job_id)
            .bind(attempt)
            .fetch_optional(pool)
            .await?;
    row.map(|(status, pause, preempt_at, preempted_for)| {
        Ok(AttemptControl { status: parse_status(&status)?, pause, preempt_for: preempt_at.map(|_| preempted_for.unwrap_or_default()) })
    })
    .transpose()
}

/// (job id, attempt, status, pause requested, preemption requested at, preempted for).
type ControlRow = (String, i32, String, bool, Option<OffsetDateTime>, Option<String>);

/// [`attempt_control`] for many attempts in one query: the rows that still have the attempt
/// number asked for (a job that moved on, or is gone, is absent).
pub async fn attempt_controls(
    pool: &PgPool,
    attempts: &[(String, i32)],
) -> Result<std::collections::HashMap<(String, i32), AttemptControl>, StoreError> {
    let (ids, numbers): (Vec<String>, Vec<i32>) = attempts.iter().cloned().unzip();
    let rows: Vec<ControlRow> = sqlx::query_as(
        "SELECT j.id, j.attempt, j.status, j.pause_requested, j.preempt_requested_at, j.preempted_for
         FROM jobs j JOIN unnest($1::text[], $2::int[]) AS w(id, attempt) ON j.id = w.id AND j.attempt = w.attempt",
    )
    .bind(&ids)
    .bind(&numbers)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, attempt, status, pause, preempt_at, preempted_for)| {
            let control = AttemptControl {
                status: parse_status(&status)?,
                pause,
                preempt_for: preempt_at.map(|_| preempted_for.unwrap_or_default()),
            };
            Ok(((id, attempt), control))
        })
        .collect()
}

/// What the attempt stream tells its worker: the job's status, and whether the user asked for a
/// pause or the reconciler for a preemption (for which job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptControl {
    pub status: JobStatus,
    pub pause: bool,
    pub preempt_for: Option<String>,
}

/// Deletes the fine-tuned model `name` of `project_id` (`DELETE /v1/models/…`): it is no longer
/// listed or served; the job that made it keeps its history. False when there is no such model
/// (never made, or deleted already).
pub async fn delete_fine_tuned_model(pool: &PgPool, project_id: &str, name: &str) -> Result<bool, StoreError> {
    let deleted = sqlx::query(
        "UPDATE jobs SET model_deleted_at = now()
         WHERE project_id = $1 AND fine_tuned_model = $2 AND status = 'succeeded' AND model_deleted_at IS NULL",
    )
    .bind(project_id)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected() > 0)
}

/// The succeeded job of `project_id` that produced the fine-tuned model `name` (not deleted).
pub async fn find_by_fine_tuned_model(pool: &PgPool, project_id: &str, name: &str) -> Result<Option<Job>, StoreError> {
    sqlx::query_as::<_, JobRow>(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = $1 AND fine_tuned_model = $2 AND status = 'succeeded' AND model_deleted_at IS NULL"
    ))
    .bind(project_id)
    .bind(name)
    .fetch_optional(pool)
    .await?
    .map(Job::try_from)
    .transpose()
}
