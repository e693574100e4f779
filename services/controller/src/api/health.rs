//! Liveness, readiness and the Prometheus scrape endpoint (no API key: scrapers and probes).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::AppState;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when Postgres and Redis both answer.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = sqlx_ping(&state).await;
    let redis = state.queue.ping().await.map_err(|e| e.to_string());
    let ok = postgres.is_ok() && redis.is_ok();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let show = |r: &Result<(), String>| r.as_ref().err().cloned().unwrap_or_else(|| "ok".into());
    (status, Json(json!({"postgres": show(&postgres), "redis": show(&redis)})))
}

async fn sqlx_ping(state: &AppState) -> Result<(), String> {
    lathe_store::ping(&state.pool).await.map_err(|e| e.to_string())
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.telemetry.render())
}
