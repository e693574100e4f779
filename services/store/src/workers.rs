//! GPU worker daemons: registered with their capabilities, authenticated by their own bearer
//! token (stored hashed, like API keys), kept alive by heartbeats. A claim reads the worker's
//! pools and GPU memory from here, not from the request, so a worker cannot take a job its
//! registration says it cannot fit.
//!
//! A worker gets its token one of two ways: an operator mints one for a named worker
//! ([`register_worker`], `lathe admin create-worker`), or an instance enrols with a fleet's
//! shared secret ([`enroll_worker`]) and is given a token of its own.

use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::{random, StoreError};

pub const WORKER_TOKEN_PREFIX: &str = "lathe-wk-";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Worker {
    pub id: String,
    pub name: String,
    /// `cuda`, `rocm` or `cpu`.
    pub device_kind: String,
    pub gpu_name: Option<String>,
    pub gpu_memory_bytes: Option<i64>,
    /// Devices it runs one job on, per node (a job's `gpus` must fit).
    pub gpus: i32,
    /// Nodes it can spread a job over (a multi-node Slurm allocation).
    pub nodes: i32,
    pub pools: Vec<String>,
    pub version: String,
    pub registered_at: OffsetDateTime,
    pub last_heartbeat_at: OffsetDateTime,
    /// Finishes its attempt and claims no more.
    pub draining: bool,
    pub revoked_at: Option<OffsetDateTime>,
    /// The fleet it enrolled with, if it did.
    pub fleet_id: Option<String>,
    /// Where a scheduler placed it: the Slurm job (`SLURM_JOB_ID`) or Kubernetes pod.
    pub slurm_job_id: Option<String>,
    pub pod_name: Option<String>,
    /// When it said it was exiting ([`leave`]); cleared by its next registration.
    pub left_at: Option<OffsetDateTime>,
    /// An inference server (`lathe worker --serve`): it takes completions, not jobs.
    pub serving: bool,
}

const WORKER_COLUMNS: &str =
    "id, name, device_kind, gpu_name, gpu_memory_bytes, gpus, nodes, pools, version, registered_at, last_heartbeat_at, \
                              draining, revoked_at, fleet_id, slurm_job_id, pod_name, left_at, serving";

#[derive(Debug, Clone)]
pub struct NewWorker<'a> {
    pub name: &'a str,
    pub device_kind: &'a str,
    pub gpu_name: Option<&'a str>,
    pub gpu_memory_bytes: Option<i64>,
    pub gpus: i32,
    pub nodes: i32,
    pub pools: &'a [String],
    pub version: &'a str,
    pub slurm_job_id: Option<&'a str>,
    pub pod_name: Option<&'a str>,
    pub serving: bool,
}

/// A registered worker and its plaintext token, returned once.
#[derive(Debug, Clone)]
pub struct RegisteredWorker {
    pub worker: Worker,
    pub token: String,
}

pub async fn register_worker(pool: &PgPool, worker: NewWorker<'_>) -> Result<RegisteredWorker, StoreError> {
    insert_worker(pool, None, worker).await?.ok_or(StoreError::NotFound)
}

/// Enrols a new instance with a fleet's secret: a worker row of its own and a token for it.
/// `None` when the secret is unknown or its fleet revoked.
pub async fn enroll_worker(pool: &PgPool, fleet_secret: &str, worker: NewWorker<'_>) -> Result<Option<RegisteredWorker>, StoreError> {
    insert_worker(pool, Some(fleet_secret), worker).await
}

/// One statement either way. With a fleet secret the row is inserted only if a live fleet has
/// that secret, and the fleet row is share-locked until the insert commits, so a revocation
/// (which updates it) waits for the enrolment and then revokes the new instance too.
async fn insert_worker(pool: &PgPool, fleet_secret: Option<&str>, worker: NewWorker<'_>) -> Result<Option<RegisteredWorker>, StoreError> {
    let token = random::token(WORKER_TOKEN_PREFIX);
    let source = match fleet_secret {
        Some(_) => {
            "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13, f.id, $14 FROM fleets f
                    WHERE f.token_hash = $11 AND f.revoked_at IS NULL FOR SHARE"
        }
        None => "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13, NULL::text, $14 WHERE $11::bytea IS NULL",
    };
    let row = sqlx::query_as::<_, Worker>(&format!(
        "INSERT INTO workers (id, name, device_kind, gpu_name, gpu_memory_bytes, pools, token_hash, version, slurm_job_id,
                              pod_name, gpus, nodes, fleet_id, serving)
         {source}
         RETURNING {WORKER_COLUMNS}"
    ))
    .bind(random::alphanumeric("wrk_", 16))
    .bind(worker.name)
    .bind(worker.device_kind)
    .bind(worker.gpu_name)
    .bind(worker.gpu_memory_bytes)
    .bind(worker.pools)
    .bind(random::sha256(&token))
    .bind(worker.version)
    .bind(worker.slurm_job_id)
    .bind(worker.pod_name)
    .bind(fleet_secret.map(random::sha256))
    .bind(worker.gpus.max(1))
    .bind(worker.nodes.max(1))
    .bind(worker.serving)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|worker| RegisteredWorker { worker, token }))
}

/// The worker a token belongs to, or `None` for an unknown or revoked token (the gRPC service
/// answers UNAUTHENTICATED).
pub async fn authenticate_worker(pool: &PgPool, token: &str) -> Result<Option<String>, StoreError> {
    let id = sqlx::query_scalar::<_, String>(
        "SELECT w.id FROM workers w LEFT JOIN fleets f ON f.id = w.fleet_id
         WHERE w.token_hash = $1 AND w.revoked_at IS NULL AND f.revoked_at IS NULL",
    )
    .bind(random::sha256(token))
    .fetch_optional(pool)
    .await?;
    Ok(id)
}

/// Revokes a worker's token, by worker id or name (every worker of that name). Returns the ids
/// revoked; none is `NotFound`. Revoking twice is harmless.
pub async fn revoke_worker(pool: &PgPool, id_or_name: &str) -> Result<Vec<String>, StoreError> {
    mark_workers(pool, id_or_name, "revoked_at = coalesce(revoked_at, now()), draining = true").await
}

/// Drains workers by id or name: each finishes what it runs and claims nothing more (with
/// `--exit-when-idle` it then exits). Returns the ids; none is `NotFound`.
pub async fn drain_workers(pool: &PgPool, id_or_name: &str) -> Result<Vec<String>, StoreError> {
    mark_workers(pool, id_or_name, "draining = true").await
}

async fn mark_workers(pool: &PgPool, id_or_name: &str, set: &'static str) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(&format!("UPDATE workers SET {set} WHERE id = $1 OR name = $1 RETURNING id"))
        .bind(id_or_name)
        .fetch_all(pool)
        .await?;
    if ids.is_empty() {
        return Err(StoreError::NotFound);
    }
    Ok(ids)
}

pub async fn heartbeat(pool: &PgPool, worker_id: &str) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET last_heartbeat_at = now() WHERE id = $1").bind(worker_id).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn set_draining(pool: &PgPool, worker_id: &str, draining: bool) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET draining = $2 WHERE id = $1").bind(worker_id).bind(draining).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn list_workers(pool: &PgPool) -> Result<Vec<Worker>, StoreError> {
    let workers =
        sqlx::query_as::<_, Worker>(&format!("SELECT {WORKER_COLUMNS} FROM workers ORDER BY registered_at, id")).fetch_all(pool).await?;
    Ok(workers)
}

/// A worker's capabilities as it reports them when it (re)starts; the token stays the same.
pub async fn update_registration(pool: &PgPool, worker_id: &str, worker: NewWorker<'_>) -> Result<Worker, StoreError> {
    sqlx::query_as::<_, Worker>(&format!(
        "UPDATE workers SET name = $2, device_kind = $3, gpu_name = $4, gpu_memory_bytes = $5, pools = $6,
                version = $7, slurm_job_id = $8, pod_name = $9, gpus = $10, nodes = $11, serving = $12,
                last_heartbeat_at = now(), left_at = NULL
         WHERE id = $1
         RETURNING {WORKER_COLUMNS}"
    ))
    .bind(worker_id)
    .bind(worker.name)
    .bind(worker.device_kind)
    .bind(worker.gpu_name)
    .bind(worker.gpu_memory_bytes)
    .bind(worker.pools)
    .bind(worker.version)
    .bind(worker.slurm_job_id)
    .bind(worker.pod_name)
    .bind(worker.gpus.max(1))
    .bind(worker.nodes.max(1))
    .bind(worker.serving)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)
}

/// The worker is exiting: no longer live (demand's worker counts, the admin list).
pub async fn leave(pool: &PgPool, worker_id: &str) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET left_at = now() WHERE id = $1").bind(worker_id).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Whether the worker has been told to drain.
pub async fn is_draining(pool: &PgPool, worker_id: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT draining FROM workers WHERE id = $1").bind(worker_id).fetch_optional(pool).await?.ok_or(StoreError::NotFound)
}
