//! What a running attempt reports — metric points, events, checkpoint commits — each write
//! fenced by the attempt number. What the API reads back from them is `crate::progress`.

use std::collections::BTreeMap;

use lathe_core::{CheckpointId, EventId};
use serde::{Deserialize, Serialize};
use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use super::lock_attempt;
use crate::error::corrupt;
use crate::{random, StoreError};

/// One optimizer step of the loss curve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct MetricPoint {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub train_loss: Option<f32>,
    pub valid_loss: Option<f32>,
    pub train_mean_token_accuracy: Option<f32>,
    pub valid_mean_token_accuracy: Option<f32>,
    pub learning_rate: Option<f64>,
    pub grad_norm: Option<f32>,
    pub tokens_per_second: Option<f32>,
    pub tokens_seen: Option<i64>,
    pub memory_bytes: Option<i64>,
    /// DPO steps: mean rewards of the preferred and the other answers, the fraction of pairs
    /// ranked right, and the mean margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards_chosen: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards_rejected: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards_accuracy: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards_margin: Option<f32>,
}

pub(crate) const METRIC_COLUMNS: &str = "step, total_steps, train_loss, valid_loss, train_mean_token_accuracy, \
    valid_mean_token_accuracy, learning_rate, grad_norm, tokens_per_second, tokens_seen, memory_bytes, \
    rewards_chosen, rewards_rejected, rewards_accuracy, rewards_margin";

/// Stores a batch of points in one statement. Idempotent on (job, step): a point resent by the
/// same attempt changes nothing, unless it now carries more (the validation loss of an eval
/// that ran after the step's point was sent); a step replayed by a later attempt (after a resume) replaces
/// the older one. Returns how many rows were written.
pub async fn record_metrics(pool: &PgPool, job_id: &str, attempt: i32, points: &[MetricPoint]) -> Result<u64, StoreError> {
    record_progress(pool, job_id, attempt, points, &[]).await
}

/// A batch of points and the events that announce them, in one transaction under one fence
/// check: what the controller does with each `MetricsBatch` (half the round trips of
/// [`record_metrics`] then [`append_events`]). Returns the metric rows written.
pub async fn record_progress(
    pool: &PgPool,
    job_id: &str,
    attempt: i32,
    points: &[MetricPoint],
    events: &[NewEvent],
) -> Result<u64, StoreError> {
    // One row per step: ON CONFLICT cannot touch a row twice in one statement.
    let by_step: BTreeMap<i64, &MetricPoint> = points.iter().map(|p| (p.step, p)).collect();
    let points: Vec<&MetricPoint> = by_step.into_values().collect();
    let mut tx = pool.begin().await?;
    lock_attempt(&mut tx, job_id, attempt, false).await?;
    let written = insert_metrics(&mut tx, job_id, attempt, &points).await?;
    if !events.is_empty() {
        insert_events(&mut tx, job_id, attempt, events).await?;
    }
    tx.commit().await?;
    Ok(written)
}

async fn insert_metrics(
    tx: &mut Transaction<'_, Postgres>,
    job_id: &str,
    attempt: i32,
    points: &[&MetricPoint],
) -> Result<u64, StoreError> {
    fn column<T>(points: &[&MetricPoint], field: impl Fn(&MetricPoint) -> T) -> Vec<T> {
        points.iter().map(|p| field(p)).collect()
    }
    let written = sqlx::query(&format!(
        "INSERT INTO metrics (job_id, attempt, {METRIC_COLUMNS})
         SELECT $1, $2, p.* FROM UNNEST($3::bigint[], $4::bigint[], $5::real[], $6::real[], $7::real[],
                                        $8::real[], $9::float8[], $10::real[], $11::real[], $12::bigint[],
                                        $13::bigint[], $14::real[], $15::real[], $16::real[], $17::real[]) AS p
         ON CONFLICT (job_id, step) DO UPDATE SET
             attempt = excluded.attempt, total_steps = excluded.total_steps,
             train_loss = excluded.train_loss, valid_loss = excluded.valid_loss,
             train_mean_token_accuracy = excluded.train_mean_token_accuracy,
             valid_mean_token_accuracy = excluded.valid_mean_token_accuracy,
             learning_rate = excluded.learning_rate, grad_norm = excluded.grad_norm,
             tokens_per_second = excluded.tokens_per_second, tokens_seen = excluded.tokens_seen,
             memory_bytes = excluded.memory_bytes, rewards_chosen = excluded.rewards_chosen,
             rewards_rejected = excluded.rewards_rejected, rewards_accuracy = excluded.rewards_accuracy,
             rewards_margin = excluded.rewards_margin, created_at = now()
         WHERE excluded.attempt > metrics.attempt
            OR (excluded.attempt = metrics.attempt
                AND (excluded.train_loss, excluded.valid_loss, excluded.valid_mean_token_accuracy)
                    IS DISTINCT FROM (metrics.train_loss, metrics.valid_loss, metrics.valid_mean_token_accuracy))"
    ))
    .bind(job_id)
    .bind(attempt)
    .bind(column(points, |p| p.step))
    .bind(column(points, |p| p.total_steps))
    .bind(column(points, |p| p.train_loss))
    .bind(column(points, |p| p.valid_loss))
    .bind(column(points, |p| p.train_mean_token_accuracy))
    .bind(column(points, |p| p.valid_mean_token_accuracy))
    .bind(column(points, |p| p.learning_rate))
    .bind(column(points, |p| p.grad_norm))
    .bind(column(points, |p| p.tokens_per_second))
    .bind(column(points, |p| p.tokens_seen))
    .bind(column(points, |p| p.memory_bytes))
    .bind(column(points, |p| p.rewards_chosen))
    .bind(column(points, |p| p.rewards_rejected))
    .bind(column(points, |p| p.rewards_accuracy))
    .bind(column(points, |p| p.rewards_margin))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(written)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

impl EventLevel {
    fn as_str(self) -> &'static str {
        match self {
            EventLevel::Info => "info",
            EventLevel::Warn => "warn",
            EventLevel::Error => "error",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "info" => Ok(EventLevel::Info),
            "warn" => Ok(EventLevel::Warn),
            "error" => Ok(EventLevel::Error),
            other => Err(corrupt(format!("unknown event level {other:?}"))),
        }
    }
}

/// An event as a worker sends it; `seq` numbers the worker's messages within its attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub seq: i64,
    pub level: EventLevel,
    /// OpenAI's event `type`: `message` or `metrics`.
    pub kind: String,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

/// A stored event, as OpenAI's job event object shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: EventId,
    pub job_id: String,
    pub level: EventLevel,
    pub kind: String,
    pub message: String,
    pub data: Option<serde_json::Value>,
    pub created_at: OffsetDateTime,
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    job_seq: i64,
    job_id: String,
    level: String,
    #[sqlx(rename = "type")]
    kind: String,
    message: String,
    data: Option<Json<serde_json::Value>>,
    created_at: OffsetDateTime,
}

impl TryFrom<EventRow> for Event {
    type Error = StoreError;
    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        Ok(Event {
            id: EventId::of_job(&row.job_id, row.job_seq),
            job_id: row.job_id,
            level: EventLevel::parse(&row.level)?,
            kind: row.kind,
            message: row.message,
            data: row.data.map(|d| d.0),
            created_at: row.created_at,
        })
    }
}

/// Appends a worker's events in one statement; a resent `seq` is ignored. Returns how many
/// were new.
pub async fn append_events(pool: &PgPool, job_id: &str, attempt: i32, events: &[NewEvent]) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    lock_attempt(&mut tx, job_id, attempt, false).await?;
    let inserted = insert_events(&mut tx, job_id, attempt, events).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// Takes `n` numbers from the job's event counter (see the hardening migration): the row lock
/// it takes is held until the caller's transaction commits, so a job's events commit in number
/// order. Resent events that turn out to be duplicates leave gaps, which readers do not mind.
const NUMBER_EVENTS: &str = "INSERT INTO event_counters (job_id, last) VALUES ($1, $2)
     ON CONFLICT (job_id) DO UPDATE SET last = event_counters.last + $2 RETURNING last";

async fn insert_events(tx: &mut Transaction<'_, Postgres>, job_id: &str, attempt: i32, events: &[NewEvent]) -> Result<u64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let last: i64 = sqlx::query_scalar(NUMBER_EVENTS).bind(job_id).bind(events.len() as i64).fetch_one(&mut **tx).await?;
    let first = last - events.len() as i64;
    let inserted = sqlx::query(
        "INSERT INTO events (job_id, attempt, seq, level, type, message, data, job_seq)
         SELECT $1, $2, e.seq, e.level, e.kind, e.message, e.data::jsonb, $8 + e.ord
         FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[]) WITH ORDINALITY
              AS e(seq, level, kind, message, data, ord)
         ON CONFLICT (job_id, attempt, seq) DO NOTHING",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.level.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.message.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.data.as_ref().map(|d| d.to_string())).collect::<Vec<_>>())
    .bind(first)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// An event of the controller's own (job created, requeued, …), not fenced by any attempt.
pub async fn add_job_event(
    pool: &PgPool,
    job_id: &str,
    level: EventLevel,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Result<EventId, StoreError> {
    let mut tx = pool.begin().await?;
    let number: i64 = sqlx::query_scalar(NUMBER_EVENTS).bind(job_id).bind(1i64).fetch_one(&mut *tx).await?;
    sqlx::query("INSERT INTO events (job_id, level, message, data, job_seq) VALUES ($1, $2, $3, $4, $5)")
        .bind(job_id)
        .bind(level.as_str())
        .bind(message)
        .bind(data.map(Json))
        .bind(number)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(EventId::of_job(job_id, number))
}

/// A committed checkpoint: written, fsynced and renamed by the worker before it is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub id: CheckpointId,
    pub job_id: String,
    pub attempt: i32,
    pub step: i64,
    /// Under the artifacts root.
    pub path: String,
    pub metrics: serde_json::Value,
    pub created_at: OffsetDateTime,
}

#[derive(sqlx::FromRow)]
pub(crate) struct CheckpointRow {
    id: String,
    job_id: String,
    attempt: i32,
    step: i64,
    path: String,
    metrics: Json<serde_json::Value>,
    created_at: OffsetDateTime,
}

pub(crate) const CHECKPOINT_COLUMNS: &str = "id, job_id, attempt, step, path, metrics, created_at";

impl TryFrom<CheckpointRow> for Checkpoint {
    type Error = StoreError;
    fn try_from(row: CheckpointRow) -> Result<Self, StoreError> {
        Ok(Checkpoint {
            id: CheckpointId::parse(&row.id).map_err(corrupt)?,
            job_id: row.job_id,
            attempt: row.attempt,
            step: row.step,
            path: row.path,
            metrics: row.metrics.0,
            created_at: row.created_at,
        })
    }
}

/// Records a checkpoint the attempt has made durable. Committing the same step again (a resend)
/// keeps its id and takes the newer path and metrics.
pub async fn commit_checkpoint(
    pool: &PgPool,
    job_id: &str,
    attempt: i32,
    step: i64,
    path: &str,
    metrics: &serde_json::Value,
) -> Result<Checkpoint, StoreError> {
    let mut tx = pool.begin().await?;
    lock_attempt(&mut tx, job_id, attempt, false).await?;
    let row = sqlx::query_as::<_, CheckpointRow>(&format!(
        "INSERT INTO checkpoints (id, job_id, attempt, step, path, metrics) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (job_id, step) DO UPDATE SET
             attempt = excluded.attempt, path = excluded.path, metrics = excluded.metrics
         RETURNING {CHECKPOINT_COLUMNS}"
    ))
    .bind(CheckpointId::from_random(random::id_bytes()).as_str())
    .bind(job_id)
    .bind(attempt)
    .bind(step)
    .bind(path)
    .bind(Json(metrics))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    row.try_into()
}

pub(crate) async fn latest_checkpoint_in(tx: &mut Transaction<'_, Postgres>, job_id: &str) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query_as::<_, CheckpointRow>(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1"
    ))
    .bind(job_id)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(Checkpoint::try_from).transpose()
}

/// The checkpoint the next attempt of a job would resume from.
pub async fn latest_checkpoint(pool: &PgPool, job_id: &str) -> Result<Option<Checkpoint>, StoreError> {
    let mut tx = pool.begin().await?;
    let checkpoint = latest_checkpoint_in(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(checkpoint)
}
