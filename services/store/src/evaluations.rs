//! Evaluations: a model run on a benchmark under an explicit protocol, with its score and every
//! item's prediction (docs/architecture.md §1).
//!
//! The API creates, lists, reads and cancels them; workers claim them through the controller
//! and report back with the same fencing as jobs (see [`crate::dispatch`]): the claim is a
//! compare-and-set that increments `attempt`, and every later write — progress with the lease
//! renewal, the items and the score, a failure — is applied only while that attempt still holds
//! the row. A retry after a lost lease starts over; `finish_evaluation` replaces whatever items
//! an earlier attempt wrote, in the same transaction that sets the score, so a result and its
//! items never disagree.

use std::time::Duration;

use lathe_core::{EvaluationId, EvaluationSpec};
use serde::Serialize;
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::dispatch::lease::{self, Work};
use crate::dispatch::RetryPolicy;
use crate::error::corrupt;
use crate::jobs::JobError;
use crate::{random, Page, StoreError};

/// `error.code` of an evaluation failed because its attempts kept losing their worker.
pub const EVALUATION_POISON_CODE: &str = "evaluation_crashed_repeatedly";

pub use lathe_core::evaluation::EvaluationStatus;

/// A stored status string, or the row is corrupt.
fn parse_status(text: &str) -> Result<EvaluationStatus, StoreError> {
    EvaluationStatus::parse(text).ok_or_else(|| corrupt(format!("evaluation status {text:?}")))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub id: EvaluationId,
    pub project_id: String,
    pub model: String,
    pub job_id: Option<String>,
    pub spec: EvaluationSpec,
    pub status: EvaluationStatus,
    pub items_done: i32,
    pub items_total: Option<i32>,
    /// The score as the worker computed it: accuracy, ci95, correct, items, unparsable, … .
    pub result: Option<serde_json::Value>,
    pub error: Option<JobError>,
    pub attempt: i32,
    pub retries: i32,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
}

#[derive(sqlx::FromRow)]
struct EvaluationRow {
    id: String,
    project_id: String,
    model: String,
    job_id: Option<String>,
    spec: Json<serde_json::Value>,
    status: String,
    items_done: i32,
    items_total: Option<i32>,
    result: Option<Json<serde_json::Value>>,
    error: Option<Json<JobError>>,
    attempt: i32,
    retries: i32,
    created_at: OffsetDateTime,
    started_at: Option<OffsetDateTime>,
    finished_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, project_id, model, job_id, spec, status, items_done, items_total, result, error, \
    attempt, retries, created_at, started_at, finished_at";

impl TryFrom<EvaluationRow> for Evaluation {
    type Error = StoreError;
    fn try_from(row: EvaluationRow) -> Result<Self, StoreError> {
        Ok(Evaluation {
            id: EvaluationId::parse(&row.id).map_err(corrupt)?,
            project_id: row.project_id,
            model: row.model,
            job_id: row.job_id,
            spec: serde_json::from_value(row.spec.0).map_err(corrupt)?,
            status: parse_status(&row.status)?,
            items_done: row.items_done,
            items_total: row.items_total,
            result: row.result.map(|r| r.0),
            error: row.error.map(|e| e.0),
            attempt: row.attempt,
            retries: row.retries,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        })
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct NewEvaluation<'a> {
    pub project_id: &'a str,
    pub model: &'a str,
    /// The job whose fine-tuned model `model` is, if it is one.
    pub job_id: Option<&'a str>,
    pub spec: &'a EvaluationSpec,
}

/// Queues an evaluation. A `file` benchmark's file must be a live file of the project, else
/// `NotFound`.
pub async fn create_evaluation(pool: &PgPool, new: NewEvaluation<'_>) -> Result<Evaluation, StoreError> {
    let mut tx = pool.begin().await?;
    if let Some(file) = &new.spec.file {
        let live: Option<bool> = sqlx::query_scalar("SELECT true FROM files WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL")
            .bind(file.as_str())
            .bind(new.project_id)
            .fetch_optional(&mut *tx)
            .await?;
        if live.is_none() {
            return Err(StoreError::NotFound);
        }
    }
    let evaluation = insert_evaluation(&mut tx, new).await?;
    tx.commit().await?;
    Ok(evaluation)
}

/// Inserts without checking the file: a job's evaluations are queued when it succeeds, and a
/// file deleted since then fails that evaluation when it is claimed, not the job.
pub(crate) async fn insert_evaluation(tx: &mut Transaction<'_, Postgres>, new: NewEvaluation<'_>) -> Result<Evaluation, StoreError> {
    let id = EvaluationId::from_random(random::id_bytes());
    sqlx::query_as::<_, EvaluationRow>(&format!(
        "INSERT INTO evaluations (id, project_id, model, job_id, benchmark, file_id, spec, status, pool)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8)
         RETURNING {COLUMNS}"
    ))
    .bind(id.as_str())
    .bind(new.project_id)
    .bind(new.model)
    .bind(new.job_id)
    .bind(new.spec.benchmark.name())
    .bind(new.spec.file.as_ref().map(|f| f.as_str()))
    .bind(Json(new.spec))
    .bind(&new.spec.pool)
    .fetch_one(&mut **tx)
    .await?
    .try_into()
}

pub async fn get_evaluation(pool: &PgPool, project_id: &str, id: &EvaluationId) -> Result<Evaluation, StoreError> {
    let id = id.as_str();
    sqlx::query_as::<_, EvaluationRow>(&format!("SELECT {COLUMNS} FROM evaluations WHERE id = $1 AND project_id = $2"))
        .bind(id)
        .bind(project_id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?
        .try_into()
}

/// Which evaluations to list.
#[derive(Debug, Clone, Default)]
pub struct EvaluationFilter<'a> {
    pub model: Option<&'a str>,
    pub job_id: Option<&'a str>,
}

/// Newest first; `after` is the id of the last evaluation of the previous page.
pub async fn list_evaluations(
    pool: &PgPool,
    project_id: &str,
    filter: EvaluationFilter<'_>,
    after: Option<&str>,
    limit: i64,
) -> Result<Page<Evaluation>, StoreError> {
    let rows = sqlx::query_as::<_, EvaluationRow>(&format!(
        "SELECT {COLUMNS} FROM evaluations
         WHERE project_id = $1
           AND ($2::text IS NULL OR model = $2)
           AND ($3::text IS NULL OR job_id = $3)
           AND ($4::text IS NULL OR (created_at, id) <
                (SELECT created_at, id FROM evaluations WHERE id = $4 AND project_id = $1))
         ORDER BY created_at DESC, id DESC
         LIMIT $5"
    ))
    .bind(project_id)
    .bind(filter.model)
    .bind(filter.job_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let evaluations = rows.into_iter().map(Evaluation::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_overfetch(evaluations, limit))
}

/// Cancels a queued or running evaluation (a running one's worker learns it at its next
/// heartbeat and stops). Cancelling a finished one is `InvalidState`.
pub async fn cancel_evaluation(pool: &PgPool, project_id: &str, id: &EvaluationId) -> Result<Evaluation, StoreError> {
    let id = id.as_str();
    let mut tx = pool.begin().await?;
    let status: String = sqlx::query_scalar("SELECT status FROM evaluations WHERE id = $1 AND project_id = $2 FOR UPDATE")
        .bind(id)
        .bind(project_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
    let status = parse_status(&status)?;
    if status.is_finished() {
        return Err(StoreError::InvalidState(format!("evaluation {id} already {}", status.as_str())));
    }
    let evaluation = sqlx::query_as::<_, EvaluationRow>(&format!(
        "UPDATE evaluations SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?
    .try_into()?;
    tx.commit().await?;
    Ok(evaluation)
}

/// One scored item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EvaluationItem {
    pub index: i32,
    pub expected: String,
    pub extracted: Option<String>,
    pub correct: bool,
    pub output: String,
}

/// Items in benchmark order; `after` is the index of the last item of the previous page.
pub async fn list_items(
    pool: &PgPool,
    project_id: &str,
    id: &EvaluationId,
    after: Option<i32>,
    limit: i64,
) -> Result<Page<EvaluationItem>, StoreError> {
    // The evaluation first, so a foreign or unknown id is NotFound rather than an empty page.
    get_evaluation(pool, project_id, id).await?;
    let id = id.as_str();
    let rows: Vec<(i32, String, Option<String>, bool, String)> = sqlx::query_as(
        "SELECT item_index, expected, extracted, correct, output FROM evaluation_items
         WHERE evaluation_id = $1 AND ($2::int IS NULL OR item_index > $2)
         ORDER BY item_index LIMIT $3",
    )
    .bind(id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows
        .into_iter()
        .map(|(index, expected, extracted, correct, output)| EvaluationItem { index, expected, extracted, correct, output })
        .collect();
    Ok(Page::from_overfetch(items, limit))
}

// ---- The worker's side, through the controller ----

/// An evaluation a worker now holds.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationClaim {
    pub evaluation: Evaluation,
    pub lease_expires_at: OffsetDateTime,
}

/// Compare-and-set queued → running for `worker_id` (the oldest queued evaluation of its pools,
/// or `id`); see [`lease::claim`]. `None` when there is nothing to take or the worker may not.
pub async fn claim_evaluation(
    pool: &PgPool,
    worker_id: &str,
    id: Option<&str>,
    lease: Duration,
) -> Result<Option<EvaluationClaim>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Claimed {
        #[sqlx(flatten)]
        row: EvaluationRow,
        lease_expires_at: OffsetDateTime,
    }
    let returning = format!("{}, t.lease_expires_at", COLUMNS.split(", ").map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", "));
    let mut tx = pool.begin().await?;
    let claimed: Option<Claimed> = lease::claim(&mut tx, Work::Evaluation, worker_id, id, lease, &returning).await?;
    tx.commit().await?;
    let Some(Claimed { row, lease_expires_at }) = claimed else { return Ok(None) };
    Ok(Some(EvaluationClaim { evaluation: row.try_into()?, lease_expires_at }))
}

/// Renews the lease of the attempt `worker_id` holds (see [`lease::renew`]) and records its
/// progress. `StaleAttempt` when the attempt no longer holds the evaluation: the worker stops.
pub async fn renew_evaluation_lease(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    worker_id: &str,
    lease: Duration,
    progress: Option<(i32, i32)>,
) -> Result<OffsetDateTime, StoreError> {
    let expires_at = lease::renew(pool, Work::Evaluation, id, attempt, worker_id, lease).await?;
    if let Some((done, total)) = progress {
        sqlx::query("UPDATE evaluations SET items_done = $3, items_total = $4 WHERE id = $1 AND attempt = $2 AND status = 'running'")
            .bind(id)
            .bind(attempt)
            .bind(done)
            .bind(total)
            .execute(pool)
            .await?;
    }
    Ok(expires_at)
}

/// Locks the row and checks the fence for a final write: this attempt, held by this worker.
async fn lock_fenced(tx: &mut Transaction<'_, Postgres>, id: &str, attempt: i32, worker_id: &str) -> Result<(), StoreError> {
    lease::lock_fenced(tx, Work::Evaluation, id, attempt, Some(worker_id), true).await
}

/// Stores every item and the score, and marks the evaluation succeeded, in one transaction.
pub async fn finish_evaluation(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    worker_id: &str,
    result: &serde_json::Value,
    items: &[EvaluationItem],
) -> Result<Evaluation, StoreError> {
    let mut tx = pool.begin().await?;
    lock_fenced(&mut tx, id, attempt, worker_id).await?;
    sqlx::query("DELETE FROM evaluation_items WHERE evaluation_id = $1").bind(id).execute(&mut *tx).await?;
    // Postgres takes at most 65535 parameters per statement: insert in chunks, as arrays.
    for chunk in items.chunks(2000) {
        sqlx::query(
            "INSERT INTO evaluation_items (evaluation_id, item_index, expected, extracted, correct, output)
             SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::text[], $5::bool[], $6::text[])",
        )
        .bind(id)
        .bind(chunk.iter().map(|i| i.index).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| i.expected.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| i.extracted.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| i.correct).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| strip_nul(&i.output)).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let evaluation = sqlx::query_as::<_, EvaluationRow>(&format!(
        "UPDATE evaluations SET status = 'succeeded', result = $2, finished_at = now(), lease_owner = NULL,
                lease_expires_at = NULL, items_done = $3, items_total = $3
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(Json(result))
    .bind(items.len() as i32)
    .fetch_one(&mut *tx)
    .await?
    .try_into()?;
    tx.commit().await?;
    Ok(evaluation)
}

/// Postgres text cannot hold NUL; a model can still generate one.
fn strip_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// How a worker's attempt at an evaluation failed.
#[derive(Debug, Clone, PartialEq)]
pub enum EvaluationFailure {
    /// The input cannot be evaluated (benchmark file malformed, model missing): failed at once.
    BadInput(JobError),
    /// The worker crashed or lost its device: retried up to the policy's limit.
    Crashed { reason: String },
    /// The worker got SIGTERM: back to the queue without spending a retry.
    Preempted,
}

pub async fn fail_evaluation(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    worker_id: &str,
    failure: EvaluationFailure,
    policy: &RetryPolicy,
) -> Result<Evaluation, StoreError> {
    let mut tx = pool.begin().await?;
    lock_fenced(&mut tx, id, attempt, worker_id).await?;
    match failure {
        EvaluationFailure::BadInput(error) => {
            sqlx::query(
                "UPDATE evaluations SET status = 'failed', error = $2, finished_at = now(), lease_owner = NULL,
                        lease_expires_at = NULL
                 WHERE id = $1",
            )
            .bind(id)
            .bind(Json(&error))
            .execute(&mut *tx)
            .await?;
        }
        EvaluationFailure::Crashed { reason } => {
            lease::requeue_after_crash(&mut tx, Work::Evaluation, id, &reason, OffsetDateTime::now_utc(), policy).await?;
        }
        EvaluationFailure::Preempted => lease::release(&mut tx, Work::Evaluation, id).await?,
    }
    let evaluation = sqlx::query_as::<_, EvaluationRow>(&format!("SELECT {COLUMNS} FROM evaluations WHERE id = $1"))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_into()?;
    tx.commit().await?;
    Ok(evaluation)
}

/// Running evaluations whose lease expired before `now` go back to the queue (a crash each).
/// Returns their ids and new status.
pub async fn requeue_expired_evaluations(
    pool: &PgPool,
    now: OffsetDateTime,
    policy: &RetryPolicy,
) -> Result<Vec<(String, EvaluationStatus)>, StoreError> {
    lease::requeue_expired(pool, Work::Evaluation, now, policy).await?.into_iter().map(|r| Ok((r.id, parse_status(&r.status)?))).collect()
}

/// How many evaluations are in each status (a gauge).
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(EvaluationStatus, i64)>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM evaluations GROUP BY status").fetch_all(pool).await?;
    rows.into_iter().map(|(status, n)| Ok((parse_status(&status)?, n))).collect()
}
