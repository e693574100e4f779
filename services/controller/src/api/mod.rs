//! The REST API: OpenAI's fine-tuning routes plus Lathe's native ones. Handlers are thin —
//! parse, call `lathe-store` / `lathe-core`, render with [`views`]; errors become the OpenAI
//! envelope in [`error`].

pub mod admin;
pub mod auth;
pub mod completions;
pub mod error;
pub mod evaluations;
pub mod files;
pub mod health;
pub mod jobs;
pub mod limits;
pub mod models;
pub mod openapi;
pub mod progress;
pub mod request_id;
pub mod views;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use crate::AppState;

/// A job id from a path: a malformed one cannot name a job (and never reaches SQL).
pub fn job_id(id: &str) -> error::ApiResult<lathe_core::JobId> {
    lathe_core::JobId::parse(id).map_err(|_| error::ApiError::not_found("job", id))
}

/// A file id from a path; see [`job_id`].
pub fn file_id(id: &str) -> error::ApiResult<lathe_core::FileId> {
    lathe_core::FileId::parse(id).map_err(|_| error::ApiError::not_found("file", id))
}

/// An evaluation id from a path; see [`job_id`].
pub fn evaluation_id(id: &str) -> error::ApiResult<lathe_core::EvaluationId> {
    lathe_core::EvaluationId::parse(id).map_err(|_| error::ApiError::not_found("evaluation", id))
}

/// A pagination cursor that must be an id of the listed kind.
pub fn cursor<T>(after: Option<&str>, parse: impl Fn(&str) -> Result<T, lathe_core::IdError>) -> error::ApiResult<Option<String>> {
    match after {
        None => Ok(None),
        Some(text) => parse(text)
            .map(|_| Some(text.to_string()))
            .map_err(|_| error::ApiError::invalid(Some("after"), "invalid_value", format!("after: {text:?} is not an id of this list"))),
    }
}

/// JSON bodies (job create) are small; only uploads get the large limit.
const JSON_BODY_LIMIT: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    let upload_limit = state.config.max_upload_bytes;
    let v1 = Router::new()
        .route("/files", get(files::list).post(files::upload).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/fine_tuning/jobs", get(jobs::list).post(jobs::create))
        .route("/fine_tuning/jobs/{id}", get(jobs::retrieve))
        .route("/fine_tuning/jobs/{id}/cancel", post(jobs::cancel))
        .route("/fine_tuning/jobs/{id}/pause", post(jobs::pause))
        .route("/fine_tuning/jobs/{id}/resume", post(jobs::resume))
        .route("/fine_tuning/jobs/{id}/events", get(progress::events))
        .route("/fine_tuning/jobs/{id}/events/stream", get(progress::stream))
        .route("/fine_tuning/jobs/{id}/checkpoints", get(progress::checkpoints))
        .route("/fine_tuning/jobs/{id}/metrics", get(progress::metrics))
        .route("/fine_tuning/jobs/{id}/evaluations", get(evaluations::list_for_job))
        .route("/evaluations", get(evaluations::list).post(evaluations::create))
        .route("/evaluations/{id}", get(evaluations::retrieve))
        .route("/evaluations/{id}/items", get(evaluations::items))
        .route("/evaluations/{id}/cancel", post(evaluations::cancel))
        .route("/chat/completions", post(completions::chat))
        .route("/completions", post(completions::text))
        .route("/models", get(models::list))
        .route("/models/{*id}", get(models::retrieve).delete(models::delete))
        .route("/admin/demand", get(admin::demand))
        .route("/admin/workers", get(admin::workers))
        .route("/admin/projects/{project}/shares", get(admin::project_shares).post(admin::set_project_share))
        .route("/openapi.json", get(|| async { axum::Json(openapi::document()) }))
        .fallback(not_found);
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), limits::timeout))
        .layer(middleware::from_fn_with_state(state.clone(), limits::rate_limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found() -> Response {
    error::ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "Unknown endpoint.".into(),
        param: None,
        code: Some("unknown_url".into()),
    }
    .into_response()
}

/// A span per request (with its [`request_id`], echoed in the `x-request-id` header); latency
/// by route template (never the raw path: ids would explode the label set), and one structured
/// log line per request; a 413 from the body limit gets the OpenAI envelope.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let id = request_id::from_headers(request.headers());
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let span = tracing::info_span!("request", request_id = %id, %method, route);
    let mut response = request_id::CURRENT.scope(id.clone(), observed(state, route, request, next).instrument(span)).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

async fn observed(state: AppState, route: String, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // A declared length over the limit is refused before a byte of the body is read (and
    // before hyper answers `Expect: 100-continue`), so a huge upload costs nothing.
    let limit = if route == "/v1/files" { state.config.max_upload_bytes } else { JSON_BODY_LIMIT };
    let declared =
        request.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let response = if declared.is_some_and(|n| n > limit) {
        error::ApiError::too_large(limit).into_response()
    } else if let Some(refused) = unsupported_media_type(&request) {
        refused.into_response()
    } else {
        next.run(request).await
    };
    let response = in_envelope(response, limit).await;
    let elapsed = started.elapsed();
    state.telemetry.observe_http(method.as_str(), &route, response.status().as_u16(), elapsed);
    tracing::debug!(status = response.status().as_u16(), ms = elapsed.as_secs_f64() * 1e3, "request");
    response
}

/// A JSON route's body must say it is JSON: a form or a text body sent by mistake is refused
/// by name rather than parsed as if it were JSON. Uploads are multipart; bodiless POSTs
/// (cancel, pause) may send no Content-Type.
fn unsupported_media_type(request: &Request) -> Option<error::ApiError> {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
    let headers = request.headers();
    let has_body = headers.contains_key(TRANSFER_ENCODING)
        || headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0");
    if request.method() != axum::http::Method::POST || !has_body || request.uri().path() == "/v1/files" {
        return None;
    }
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    (essence != "application/json").then(|| error::ApiError {
        status: axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        kind: "invalid_request_error",
        message: format!("Content-Type: this route takes a JSON body (application/json), got {content_type:?}"),
        param: None,
        code: Some("unsupported_media_type".into()),
    })
}

/// Every error leaves in the OpenAI envelope, including the ones axum writes itself (a query
/// string that does not parse, a 405 with an empty body, a body over the limit): those
/// arrive here as plain text or empty, and their text becomes the message.
async fn in_envelope(response: Response, limit: usize) -> Response {
    use axum::http::StatusCode;
    let status = response.status();
    let is_json = response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json || status == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return error::ApiError::too_large(limit).into_response();
    }
    let allow = response.headers().get(axum::http::header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, fallback) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "This route does not take that method."),
        StatusCode::NOT_FOUND => ("unknown_url", "Unknown endpoint."),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "Unsupported Content-Type."),
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => ("invalid_request", "The request could not be read."),
        _ if status.is_server_error() => ("server_error", "The server had an error processing the request."),
        _ => ("invalid_request", "The request was refused."),
    };
    let mut out = error::ApiError {
        // axum answers a body it cannot deserialize with 422; OpenAI's clients expect 400.
        status: if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status },
        kind: if status.is_server_error() { "server_error" } else { "invalid_request_error" },
        message: if text.is_empty() || status.is_server_error() { fallback.to_string() } else { text },
        param: None,
        code: Some(code.into()),
    }
    .into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(axum::http::header::ALLOW, allow);
    }
    out
}
