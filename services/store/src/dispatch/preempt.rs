//! Priority preemption's side of dispatch: the inputs of [`lathe_core::preemption::choose`],
//! the request kept on the victim's row (compare-and-set on its attempt), and the grace after
//! which a worker that did not hand its job back is treated as having lost its lease.

use std::time::Duration;

use lathe_core::preemption::{Offer, Preemption, Queued, Running, Shape};
use sqlx::PgPool;

use crate::StoreError;

/// Queued jobs looked at per pass: the highest-priority ones, enough for any realistic burst.
const QUEUED_LOOKED_AT: i64 = 200;

#[derive(sqlx::FromRow)]
struct QueuedRow {
    id: String,
    priority: i16,
    pool: String,
    gpus: i32,
    nodes: i32,
    gpu_memory_gb: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct RunningRow {
    id: String,
    attempt: i32,
    priority: i16,
    pool: String,
    running_for: f64,
    worker_id: String,
    pools: Vec<String>,
    gpus: i32,
    nodes: i32,
    gpu_memory_bytes: Option<i64>,
    preempted_for: Option<String>,
}

#[derive(sqlx::FromRow)]
struct IdleRow {
    pools: Vec<String>,
    gpus: i32,
    nodes: i32,
    gpu_memory_bytes: Option<i64>,
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn offer(pools: Vec<String>, gpus: i32, nodes: i32, gpu_memory_bytes: Option<i64>) -> Offer {
    Offer { pools, gpus: count(gpus), nodes: count(nodes), gpu_memory_bytes: gpu_memory_bytes.and_then(|b| u64::try_from(b).ok()) }
}

/// Everything [`lathe_core::preemption::choose`] needs: queued jobs that outrank a running job
/// of their pool (past their backoff), running jobs with their workers, and live idle workers
/// (heartbeat within `live_within`, asked for work within it, holding nothing).
pub async fn preemption_inputs(pool: &PgPool, live_within: Duration) -> Result<(Vec<Queued>, Vec<Running>, Vec<Offer>), StoreError> {
    let queued: Vec<QueuedRow> = sqlx::query_as(
        "WITH lowest AS (SELECT pool, min(priority) AS priority FROM jobs WHERE status = 'running' GROUP BY pool)
         SELECT q.id, q.priority, q.pool, q.gpus, q.nodes, q.gpu_memory_gb FROM jobs q JOIN lowest l ON l.pool = q.pool
         WHERE q.status = 'queued' AND q.priority > l.priority AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= now())
         ORDER BY q.priority DESC, q.created_at, q.id
         LIMIT $1",
    )
    .bind(QUEUED_LOOKED_AT)
    .fetch_all(pool)
    .await?;
    if queued.is_empty() {
        return Ok((vec![], vec![], vec![]));
    }
    let running: Vec<RunningRow> = sqlx::query_as(
        "SELECT j.id, j.attempt, j.priority, j.pool,
                extract(epoch FROM now() - a.started_at)::float8 AS running_for,
                w.id AS worker_id, w.pools, w.gpus, w.nodes, w.gpu_memory_bytes, j.preempted_for
         FROM jobs j
         JOIN attempts a ON a.job_id = j.id AND a.number = j.attempt AND a.ended_at IS NULL
         JOIN workers w ON w.id = a.worker_id
         WHERE j.status = 'running'",
    )
    .fetch_all(pool)
    .await?;
    let idle: Vec<IdleRow> = sqlx::query_as(
        "SELECT w.pools, w.gpus, w.nodes, w.gpu_memory_bytes FROM workers w
         LEFT JOIN fleets f ON f.id = w.fleet_id
         WHERE w.revoked_at IS NULL AND f.revoked_at IS NULL AND w.left_at IS NULL AND NOT w.serving AND NOT w.draining
           AND 'training' = ANY(w.grant_roles)
           AND w.last_heartbeat_at > now() - make_interval(secs => $1)
           AND greatest(w.last_claim_at, w.registered_at) > now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = w.id AND a.ended_at IS NULL)
           AND NOT EXISTS (SELECT 1 FROM evaluations e WHERE e.lease_owner = w.id AND e.status = 'running')",
    )
    .bind(live_within.as_secs_f64())
    .fetch_all(pool)
    .await?;

    let queued = queued
        .into_iter()
        .map(|q| Queued {
            id: q.id,
            priority: q.priority,
            shape: Shape { pool: q.pool, gpus: count(q.gpus), nodes: count(q.nodes), gpu_memory_gb: q.gpu_memory_gb.map(count) },
        })
        .collect();
    let running = running
        .into_iter()
        .map(|r| Running {
            id: r.id,
            attempt: r.attempt,
            priority: r.priority,
            pool: r.pool,
            running_for: r.running_for,
            worker_id: r.worker_id,
            worker: offer(r.pools, r.gpus, r.nodes, r.gpu_memory_bytes),
            preempting_for: r.preempted_for,
        })
        .collect();
    let idle = idle.into_iter().map(|w| offer(w.pools, w.gpus, w.nodes, w.gpu_memory_bytes)).collect();
    Ok((queued, running, idle))
}

/// Keeps the request on the victim's row, if it still runs the same attempt and is not already
/// being preempted. `false`: it ended or moved on meanwhile; nothing to do.
pub async fn request_preemption(pool: &PgPool, preemption: &Preemption) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE jobs SET preempt_requested_at = now(), preempted_for = $3
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND preempt_requested_at IS NULL",
    )
    .bind(&preemption.victim)
    .bind(preemption.victim_attempt)
    .bind(&preemption.for_job)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Attempts asked to hand their job back longer than `grace` ago: their lease is set to have
/// ended at `lapsed_at`, so the reconciler's requeue takes the job back from its last checkpoint
/// as from a lost worker (never a second live attempt: the fence refuses the old one). Returns
/// the job ids.
pub async fn expire_overdue_preemptions(
    pool: &PgPool,
    grace: Duration,
    lapsed_at: sqlx::types::time::OffsetDateTime,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = $2
         WHERE status = 'running' AND preempt_requested_at < now() - make_interval(secs => $1) AND lease_expires_at > $2
         RETURNING id",
    )
    .bind(grace.as_secs_f64())
    .bind(lapsed_at)
    .fetch_all(pool)
    .await?)
}
