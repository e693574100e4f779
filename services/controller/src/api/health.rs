//! Liveness, readiness and the Prometheus scrape endpoint. Probes need no key; `/metrics`
//! needs the scrape token when the controller has one (`--metrics-token`): job ids and loss
//! curves are in it.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use crate::AppState;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when Postgres and Redis both answer; also says how many inference workers this replica
/// routes to (informational: a controller without any still serves the rest of the API).
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = sqlx_ping(&state).await;
    let redis = state.queue.ping().await.map_err(|e| e.to_string());
    let ok = postgres.is_ok() && redis.is_ok();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let show = |r: &Result<(), String>| r.as_ref().err().cloned().unwrap_or_else(|| "ok".into());
    let (servers, in_flight) = state.inference.load();
    let inference = json!({"workers": servers, "requests_in_flight": in_flight});
    (status, Json(json!({"postgres": show(&postgres), "redis": show(&redis), "inference": inference})))
}

async fn sqlx_ping(state: &AppState) -> Result<(), String> {
    lathe_store::ping(&state.pool).await.map_err(|e| e.to_string())
}

pub async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> axum::response::Response {
    if let Some(token) = &state.config.metrics_token {
        if !super::admin::bearer_is(&headers, token) {
            return ApiError::unauthorized("/metrics needs the scrape token: 'Authorization: Bearer <LATHE_METRICS_TOKEN>'.")
                .into_response();
        }
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.telemetry.render()).into_response()
}
