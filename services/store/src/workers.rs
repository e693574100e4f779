//! GPU worker daemons: registered with their capabilities, authenticated by their own bearer
//! token (stored hashed, like API keys), kept alive by heartbeats. A claim reads the worker's
//! pools and GPU memory from here, not from the request, so a worker cannot take a job its
//! registration says it cannot fit.

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
    pub pools: Vec<String>,
    pub version: String,
    pub registered_at: OffsetDateTime,
    pub last_heartbeat_at: OffsetDateTime,
    /// Finishes its attempt and claims no more.
    pub draining: bool,
}

const WORKER_COLUMNS: &str =
    "id, name, device_kind, gpu_name, gpu_memory_bytes, pools, version, registered_at, last_heartbeat_at, draining";

#[derive(Debug, Clone)]
pub struct NewWorker<'a> {
    pub name: &'a str,
    pub device_kind: &'a str,
    pub gpu_name: Option<&'a str>,
    pub gpu_memory_bytes: Option<i64>,
    pub pools: &'a [String],
    pub version: &'a str,
}

/// A registered worker and its plaintext token, returned once.
#[derive(Debug, Clone)]
pub struct RegisteredWorker {
    pub worker: Worker,
    pub token: String,
}

pub async fn register_worker(pool: &PgPool, worker: NewWorker<'_>) -> Result<RegisteredWorker, StoreError> {
    let token = random::token(WORKER_TOKEN_PREFIX);
    let row = sqlx::query_as::<_, Worker>(&format!(
        "INSERT INTO workers (id, name, device_kind, gpu_name, gpu_memory_bytes, pools, token_hash, version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
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
    .fetch_one(pool)
    .await?;
    Ok(RegisteredWorker { worker: row, token })
}

/// The worker a token belongs to, or `None` for an unknown or revoked token (the gRPC service
/// answers UNAUTHENTICATED).
pub async fn authenticate_worker(pool: &PgPool, token: &str) -> Result<Option<String>, StoreError> {
    let id = sqlx::query_scalar::<_, String>("SELECT id FROM workers WHERE token_hash = $1 AND revoked_at IS NULL")
        .bind(random::sha256(token))
        .fetch_optional(pool)
        .await?;
    Ok(id)
}

/// Revokes a worker's token, by worker id or name (every worker of that name). Returns the ids
/// revoked; none is `NotFound`. Revoking twice is harmless.
pub async fn revoke_worker(pool: &PgPool, id_or_name: &str) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE workers SET revoked_at = coalesce(revoked_at, now()), draining = true
         WHERE id = $1 OR name = $1 RETURNING id",
    )
    .bind(id_or_name)
    .fetch_all(pool)
    .await?;
    if ids.is_empty() {
        return Err(StoreError::NotFound);
    }
    Ok(ids)
}

/// Drains workers by id or name: each finishes what it runs and claims nothing more (with
/// `--exit-when-idle` it then exits). Returns the ids; none is `NotFound`.
pub async fn drain_workers(pool: &PgPool, id_or_name: &str) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar("UPDATE workers SET draining = true WHERE id = $1 OR name = $1 RETURNING id")
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
                version = $7, last_heartbeat_at = now()
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
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)
}

/// Whether the worker has been told to drain.
pub async fn is_draining(pool: &PgPool, worker_id: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT draining FROM workers WHERE id = $1").bind(worker_id).fetch_optional(pool).await?.ok_or(StoreError::NotFound)
}
