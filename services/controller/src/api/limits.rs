//! Per-key rate limits and request timeouts, as middleware in front of every route.
//!
//! - Rate: a token bucket per API key (by the SHA-256 of the presented bearer token, so an
//!   unknown key is throttled like a known one and no key is kept in memory). `per_minute`
//!   requests a minute on average, bursts of ten seconds' worth; over it, 429 with
//!   `Retry-After` in the OpenAI envelope (`rate_limit_exceeded`). Each controller replica
//!   counts its own requests: behind a load balancer the limit is per replica.
//! - Time: a request must produce its response head within `request_timeout`, else 503 with
//!   `Retry-After` (the work is dropped: its transaction rolls back). Uploads and streams
//!   (`/files` POST, SSE, file content) are paced by the client and completions by
//!   generation; they are not timed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::AppState;

/// Event streams open per API key (SSE of a job's events, streamed completions): a client may
/// hold at most `max_streams_per_key` at once on a replica, so one tenant cannot take every
/// connection.
#[derive(Default)]
pub struct StreamCounts {
    open: Mutex<HashMap<[u8; 32], usize>>,
}

/// One open stream; dropping it frees the place.
pub struct StreamSlot {
    counts: std::sync::Arc<StreamCounts>,
    key: [u8; 32],
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("stream counts lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl StreamCounts {
    /// A place for one more stream of `key`, or 429 at the cap.
    pub fn open(self: &std::sync::Arc<Self>, key: &[u8; 32], max: usize) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().expect("stream counts lock");
        let n = open.entry(*key).or_insert(0);
        if *n >= max {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "requests",
                message: format!("This API key has {max} streams open already; close one (or wait for one to end) and retry."),
                param: None,
                code: Some("too_many_streams".into()),
            });
        }
        *n += 1;
        Ok(StreamSlot { counts: self.clone(), key: *key })
    }
}

pub async fn rate_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(limiter) = &state.rate_limiter else { return next.run(request).await };
    let token = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else { return next.run(request).await };
    match limiter.take(token, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let error = ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "requests",
                message: format!(
                    "Rate limit reached for this API key: {:.0} requests per minute. Retry after {wait} s.",
                    limiter.per_minute()
                ),
                param: None,
                code: Some("rate_limit_exceeded".into()),
            };
            let mut response = error.into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
            response
        }
    }
}

/// Routes whose response is paced by the client (an upload's body, a stream, a download) or
/// by generation (completions: bounded by max_tokens and the worker's capacity, and cancelled
/// when the client goes away).
fn untimed(method: &Method, path: &str) -> bool {
    (method == Method::POST && matches!(path, "/v1/files" | "/v1/chat/completions" | "/v1/completions"))
        || path.ends_with("/events/stream")
        || path.ends_with("/content")
}

pub async fn timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config.request_timeout;
    if untimed(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(seconds = limit.as_secs_f64(), "request timed out");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: format!("The server did not finish the request within {} s; retry shortly.", limit.as_secs_f64()),
                param: None,
                code: Some("timeout".into()),
            }
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_key_holds_at_most_its_streams_and_a_closed_one_frees_a_place() {
        let counts = Arc::new(StreamCounts::default());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let first = counts.open(&a, 2).unwrap();
        let _second = counts.open(&a, 2).unwrap();
        let refused = counts.open(&a, 2).err().expect("a third stream of the same key is refused");
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(counts.open(&b, 2).is_ok(), "another key has its own places");
        drop(first);
        assert!(counts.open(&a, 2).is_ok());
    }
}
