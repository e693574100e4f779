//! What the API reads of a job's progress: the loss curve, the events (pages, and the live tail
//! an SSE stream follows) and the committed checkpoints. Every read is scoped to the caller's
//! project; another project's job is `NotFound`. The writes are `dispatch` (fenced by attempt).

use lathe_core::{EventId, JobId};
use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::dispatch::report::{CheckpointRow, EventRow, CHECKPOINT_COLUMNS, METRIC_COLUMNS};
use crate::dispatch::{Checkpoint, Event, MetricPoint};
use crate::{Page, StoreError};

/// The whole loss curve of a project's job, by step.
pub async fn list_metrics(pool: &PgPool, project_id: &str, job_id: &JobId) -> Result<Vec<MetricPoint>, StoreError> {
    let job_id = job_id.as_str();
    ensure_job_in_project(pool, project_id, job_id).await?;
    let points = sqlx::query_as::<_, MetricPoint>(&format!("SELECT {METRIC_COLUMNS} FROM metrics WHERE job_id = $1 ORDER BY step"))
        .bind(job_id)
        .fetch_all(pool)
        .await?;
    Ok(points)
}

/// A page of the loss curve: the points after step `after_step`, oldest first, at most `limit`
/// (all of them without one).
pub async fn list_metrics_page(
    pool: &PgPool,
    project_id: &str,
    job_id: &JobId,
    after_step: Option<i64>,
    limit: Option<i64>,
) -> Result<Page<MetricPoint>, StoreError> {
    let job_id = job_id.as_str();
    ensure_job_in_project(pool, project_id, job_id).await?;
    let points = sqlx::query_as::<_, MetricPoint>(&format!(
        "SELECT {METRIC_COLUMNS} FROM metrics WHERE job_id = $1 AND step > $2 ORDER BY step LIMIT $3"
    ))
    .bind(job_id)
    .bind(after_step.unwrap_or(-1))
    .bind(limit.map(|l| l + 1))
    .fetch_all(pool)
    .await?;
    Ok(match limit {
        Some(limit) => Page::from_overfetch(points, limit),
        None => Page { items: points, has_more: false },
    })
}

/// Newest first, as OpenAI lists job events; `after` is the last event of the previous page.
pub async fn list_events(
    pool: &PgPool,
    project_id: &str,
    job_id: &JobId,
    after: Option<&EventId>,
    limit: i64,
) -> Result<Page<Event>, StoreError> {
    let job_id = job_id.as_str();
    ensure_job_in_project(pool, project_id, job_id).await?;
    let before_sequence = after.map(|id| id.sequence_in(job_id).unwrap_or(0));
    let rows = sqlx::query_as::<_, EventRow>(
        "SELECT job_seq, job_id, level, type, message, data, created_at FROM events
         WHERE job_id = $1 AND ($2::bigint IS NULL OR job_seq < $2)
         ORDER BY job_seq DESC LIMIT $3",
    )
    .bind(job_id)
    .bind(before_sequence)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let events = rows.into_iter().map(Event::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_overfetch(events, limit))
}

/// A project's job's checkpoints, newest (highest step) first; `after` is a checkpoint id.
/// The job's checkpoints, newest first, of the newest `keep` (those a worker keeps on disk).
pub async fn list_checkpoints(
    pool: &PgPool,
    project_id: &str,
    job_id: &JobId,
    keep: i64,
    after: Option<&str>,
    limit: i64,
) -> Result<Page<Checkpoint>, StoreError> {
    let job_id = job_id.as_str();
    ensure_job_in_project(pool, project_id, job_id).await?;
    let rows = sqlx::query_as::<_, CheckpointRow>(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints
         WHERE job_id = $1 AND ($2::text IS NULL OR step < (SELECT step FROM checkpoints WHERE id = $2 AND job_id = $1))
           AND step >= {}
         ORDER BY step DESC LIMIT $3",
        oldest_kept("$1", "$4")
    ))
    .bind(job_id)
    .bind(after)
    .bind(limit + 1)
    .bind(keep)
    .fetch_all(pool)
    .await?;
    let checkpoints = rows.into_iter().map(Checkpoint::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_overfetch(checkpoints, limit))
}

/// How fast a running job's current attempt goes: its first and last reported step and when
/// each arrived, with the job's total steps. `None` before two steps have been reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub first_step: i64,
    pub first_at: OffsetDateTime,
    pub last_step: i64,
    pub last_at: OffsetDateTime,
    pub total_steps: i64,
}

impl Pace {
    /// When the job will finish at this pace (Unix seconds).
    pub fn estimated_finish(&self) -> Option<i64> {
        let steps = self.last_step - self.first_step;
        if steps <= 0 || self.total_steps <= self.last_step {
            return None;
        }
        let per_step = (self.last_at - self.first_at).as_seconds_f64() / steps as f64;
        Some(self.last_at.unix_timestamp() + (per_step * (self.total_steps - self.last_step) as f64).ceil() as i64)
    }
}

type PaceRow = (Option<i64>, Option<OffsetDateTime>, Option<i64>, Option<OffsetDateTime>, Option<i64>);

pub async fn attempt_pace(pool: &PgPool, job_id: &str) -> Result<Option<Pace>, StoreError> {
    let row: Option<PaceRow> = sqlx::query_as(
        "SELECT min(m.step), min(m.created_at), max(m.step), max(m.created_at), max(m.total_steps)
         FROM metrics m JOIN jobs j ON j.id = m.job_id AND m.attempt = j.attempt WHERE m.job_id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((Some(first_step), Some(first_at), Some(last_step), Some(last_at), Some(total_steps))) => {
            Some(Pace { first_step, first_at, last_step, last_at, total_steps })
        }
        _ => None,
    })
}

/// SQL for the step of the oldest of a job's newest `keep` checkpoints (the parameters that
/// hold the job id and `keep`).
fn oldest_kept(job: &str, keep: &str) -> String {
    format!("COALESCE((SELECT step FROM checkpoints WHERE job_id = {job} ORDER BY step DESC OFFSET GREATEST({keep}::bigint - 1, 0) LIMIT 1), 0)")
}

/// The job's checkpoint at `step`, if it is among the newest `keep`.
pub async fn kept_checkpoint(pool: &PgPool, job_id: &str, step: i64, keep: i64) -> Result<Option<Checkpoint>, StoreError> {
    sqlx::query_as::<_, CheckpointRow>(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 AND step = $2 AND step >= {}",
        oldest_kept("$1", "$3")
    ))
    .bind(job_id)
    .bind(step)
    .bind(keep)
    .fetch_optional(pool)
    .await?
    .map(Checkpoint::try_from)
    .transpose()
}

async fn ensure_job_in_project(pool: &PgPool, project_id: &str, job_id: &str) -> Result<(), StoreError> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE id = $1 AND project_id = $2")
        .bind(job_id)
        .bind(project_id)
        .fetch_optional(pool)
        .await?;
    found.map(|_| ()).ok_or(StoreError::NotFound)
}

/// Events with a sequence above `after_sequence`, oldest first: what a live stream (SSE) has
/// not sent yet.
pub async fn events_after(
    pool: &PgPool,
    project_id: &str,
    job_id: &JobId,
    after_sequence: i64,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let job_id = job_id.as_str();
    ensure_job_in_project(pool, project_id, job_id).await?;
    let rows = sqlx::query_as::<_, EventRow>(
        "SELECT job_seq, job_id, level, type, message, data, created_at FROM events
         WHERE job_id = $1 AND job_seq > $2 ORDER BY job_seq LIMIT $3",
    )
    .bind(job_id)
    .bind(after_sequence)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Event::try_from).collect()
}
