//! Operators' endpoints under `/v1/admin/`: what autoscalers scale on (demand per pool: the
//! Slurm autoscaler, a KEDA `metrics-api` trigger) and the worker list. They take the admin
//! token (`--admin-token`), never a project's API key: they show every project's load.

use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use lathe_store::demand::{pool_demand, PoolDemand};
use lathe_store::workers::Worker;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ApiResult};
use crate::AppState;

/// A request that carried the admin token.
pub struct Admin;

/// Whether the request's bearer token is `expected` (compared as SHA-256 digests, so the time
/// taken says nothing about how much of it matched).
pub fn bearer_is(parts_headers: &axum::http::HeaderMap, expected: &str) -> bool {
    let presented = parts_headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| Sha256::digest(p.trim().as_bytes()) == Sha256::digest(expected.as_bytes()))
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(token) = &state.config.admin_token else {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                kind: "invalid_request_error",
                message: "The admin API is off; start the controller with --admin-token (LATHE_ADMIN_TOKEN).".into(),
                param: None,
                code: Some("admin_api_disabled".into()),
            });
        };
        if bearer_is(&parts.headers, token) {
            Ok(Admin)
        } else {
            Err(ApiError::unauthorized("/v1/admin/ needs the admin token: 'Authorization: Bearer <LATHE_ADMIN_TOKEN>'."))
        }
    }
}

#[derive(Deserialize)]
pub struct DemandQuery {
    pool: Option<String>,
}

/// `GET /v1/admin/demand[?pool=NAME]`: per pool, the jobs and evaluations queued and running
/// (`demand`: workers the pool needs) and the live workers serving it. With `pool`, exactly
/// that pool, zeros included: a scaler's query always finds its number.
pub async fn demand(_: Admin, State(state): State<AppState>, Query(query): Query<DemandQuery>) -> ApiResult<Json<Value>> {
    let mut pools = pool_demand(&state.pool, state.config.lease).await?;
    if let Some(name) = query.pool {
        lathe_queue::Pool::parse(&name).map_err(|e| ApiError::invalid(Some("pool"), "invalid_value", e.to_string()))?;
        let one = pools.iter().find(|d| d.pool == name).cloned().unwrap_or_else(|| PoolDemand::empty(&name));
        pools = vec![one];
    }
    Ok(Json(json!({"object": "list", "data": pools.iter().map(demand_view).collect::<Vec<_>>()})))
}

fn demand_view(d: &PoolDemand) -> Value {
    json!({
        "object": "pool_demand",
        "pool": d.pool,
        "demand": d.demand(),
        "queued_jobs": d.queued_jobs,
        "running_jobs": d.running_jobs,
        "queued_evaluations": d.queued_evaluations,
        "running_evaluations": d.running_evaluations,
        "gpu_memory_gb_asked": d.gpu_memory_gb_asked,
        "gpus_asked": d.gpus_asked,
        "nodes_asked": d.nodes_asked,
        "oldest_queued_seconds": d.oldest_queued_seconds,
        "workers": d.workers,
        "draining_workers": d.draining_workers,
    })
}

/// `GET /v1/admin/workers`: every worker with its state and where a scheduler placed it.
pub async fn workers(_: Admin, State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let stale_before = lathe_store::time::OffsetDateTime::now_utc() - state.config.lease;
    let workers = lathe_store::workers::list_workers(&state.pool).await?;
    let data: Vec<Value> = workers.iter().map(|w| worker_view(w, stale_before)).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `revoked`, `left` (exited on its own), `stale` (no heartbeat within a lease), `draining` or
/// `live`.
pub fn worker_state(worker: &Worker, stale_before: lathe_store::time::OffsetDateTime) -> &'static str {
    if worker.revoked_at.is_some() {
        "revoked"
    } else if worker.left_at.is_some() {
        "left"
    } else if worker.last_heartbeat_at < stale_before {
        "stale"
    } else if worker.draining {
        "draining"
    } else {
        "live"
    }
}

fn worker_view(w: &Worker, stale_before: lathe_store::time::OffsetDateTime) -> Value {
    json!({
        "object": "worker",
        "id": w.id,
        "name": w.name,
        "state": worker_state(w, stale_before),
        "pools": w.pools,
        "device_kind": w.device_kind,
        "gpu_name": w.gpu_name,
        "gpu_memory_bytes": w.gpu_memory_bytes,
        "gpus": w.gpus,
        "nodes": w.nodes,
        // An inference worker (`lathe worker --serve`): completions, not jobs.
        "serving": w.serving,
        "version": w.version,
        "fleet_id": w.fleet_id,
        "slurm_job_id": w.slurm_job_id,
        "pod_name": w.pod_name,
        "registered_at": w.registered_at.unix_timestamp(),
        "last_heartbeat_at": w.last_heartbeat_at.unix_timestamp(),
    })
}
