//! Operators' endpoints under `/v1/admin/`: what autoscalers scale on (demand per pool: the
//! Slurm autoscaler, a KEDA `metrics-api` trigger) and the worker list. They take the admin
//! token (`--admin-token`), never a project's API key: they show every project's load.

use axum::extract::{FromRequestParts, Path, Query, State};
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
        "shapes": d.shapes.iter().map(|s| json!({"gpus": s.gpus, "nodes": s.nodes, "queued": s.queued, "running": s.running})).collect::<Vec<_>>(),
    })
}

#[derive(Deserialize)]
pub struct WorkersQuery {
    /// Comma-separated states (`live,draining`); all when absent.
    state: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

/// Most workers one page of `/v1/admin/workers` holds (default 100).
const MAX_WORKERS_PAGE: i64 = 1000;

/// `GET /v1/admin/workers[?state=live,draining][&after=ID][&limit=N]`: workers in registration
/// order with their state and where a scheduler placed it, a page at a time (`has_more`,
/// `last_id` as every list of the API).
pub async fn workers(_: Admin, State(state): State<AppState>, Query(query): Query<WorkersQuery>) -> ApiResult<Json<Value>> {
    let limit = super::files::limit_within(query.limit, 100, MAX_WORKERS_PAGE)?;
    let states: Vec<String> = query.state.as_deref().unwrap_or_default().split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    if let Some(unknown) = states.iter().find(|s| !lathe_store::workers::WORKER_STATES.contains(&s.as_str())) {
        return Err(ApiError::invalid(
            Some("state"),
            "invalid_value",
            format!("state: {unknown:?} is not one of {}", lathe_store::workers::WORKER_STATES.join(", ")),
        ));
    }
    let after = match query.after.as_deref() {
        Some(id) if !id.starts_with("wrk_") || id.len() > 64 => {
            return Err(ApiError::invalid(Some("after"), "invalid_value", format!("after: {id:?} is not a worker id")))
        }
        other => other,
    };
    let stale_before = lathe_store::time::OffsetDateTime::now_utc() - state.config.lease;
    let page = lathe_store::workers::list_workers_page(&state.pool, &states, stale_before, after, limit).await?;
    Ok(Json(super::views::list(page, |w| w.id.clone(), |w| worker_view(w, stale_before))))
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

/// `GET /v1/admin/projects/{project}/shares`: what an admin set for the project (its weight and
/// quota for every pool, `"*"`, and per pool), as `lathe admin set-project` prints it.
pub async fn project_shares(_: Admin, State(state): State<AppState>, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let found = project_named(&state, &project).await?;
    shares_view(&state, &found).await
}

/// `POST /v1/admin/projects/{project}/shares` with `{"weight"?: W, "max_gpus"?: N | null,
/// "pool"?: P}`: sets the project's fair-share weight and GPU quota, in one pool or (without
/// `pool`) every pool; `"max_gpus": null` removes the quota (docs/scheduling.md).
pub async fn set_project_share(
    _: Admin,
    State(state): State<AppState>,
    Path(project): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let invalid = |param: &str, message: String| ApiError::invalid(Some(param), "invalid_value", message);
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(None, "invalid_json", format!("the body is not JSON: {e}")))?;
    let Some(fields) = body.as_object() else {
        return Err(ApiError::invalid(None, "invalid_value", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !["weight", "max_gpus", "pool"].contains(&k.as_str())) {
        return Err(invalid(unknown, format!("{unknown}: unknown field (weight, max_gpus and pool are)")));
    }
    let weight = match fields.get("weight") {
        None => None,
        Some(w) => Some(
            w.as_f64()
                .ok_or_else(|| invalid("weight", format!("weight: must be a number, got {w}")))
                .and_then(|w| lathe_core::fair_share::Share::check_weight(w).map_err(|e| invalid("weight", format!("weight: {e}"))))?,
        ),
    };
    let max_gpus = match fields.get("max_gpus") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(n) => match n.as_u64() {
            Some(n) if n <= 1024 => Some(Some(n as u32)),
            _ => {
                return Err(invalid("max_gpus", format!("max_gpus: must be a whole number from 0 to 1024, or null for no quota, got {n}")))
            }
        },
    };
    let in_pool = match fields.get("pool") {
        None => lathe_store::dispatch::fair_share::ALL_POOLS.to_string(),
        Some(Value::String(p)) => {
            lathe_queue::Pool::parse(p).map_err(|e| invalid("pool", format!("pool: {e}")))?;
            p.clone()
        }
        Some(other) => return Err(invalid("pool", format!("pool: must be a pool name, got {other}"))),
    };
    if weight.is_none() && max_gpus.is_none() {
        return Err(ApiError::invalid(None, "invalid_value", "nothing to set: give weight, max_gpus or both"));
    }
    let found = project_named(&state, &project).await?;
    lathe_store::dispatch::fair_share::set_project_share(&state.pool, &found.id, &in_pool, weight, max_gpus).await?;
    tracing::info!(project = found.name, pool = in_pool, ?weight, ?max_gpus, "project share set");
    shares_view(&state, &found).await
}

async fn project_named(state: &AppState, name: &str) -> ApiResult<lathe_store::projects::Project> {
    match lathe_store::projects::get_project_by_name(&state.pool, name).await {
        Ok(project) => Ok(project),
        Err(lathe_store::StoreError::NotFound) => Err(ApiError::invalid(
            Some("project"),
            "project_not_found",
            format!("project: no project named {name:?} (a project is made by its first API key)"),
        )),
        Err(other) => Err(other.into()),
    }
}

async fn shares_view(state: &AppState, project: &lathe_store::projects::Project) -> ApiResult<Json<Value>> {
    let rows = lathe_store::dispatch::fair_share::project_shares(&state.pool, &project.id).await?;
    let data: Vec<Value> =
        rows.iter().map(|(pool, weight, max_gpus)| json!({"pool": pool, "weight": weight, "max_gpus": max_gpus})).collect();
    Ok(Json(json!({"object": "list", "project": project.name, "data": data})))
}
