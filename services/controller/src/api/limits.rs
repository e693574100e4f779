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
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::AppState;

/// Token buckets, one per key.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<[u8; 16], Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_minute` = 0 turns limiting off.
    pub fn new(per_minute: u32) -> Option<RateLimiter> {
        (per_minute > 0).then(|| RateLimiter {
            per_second: f64::from(per_minute) / 60.0,
            burst: (f64::from(per_minute) / 6.0).max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token for `key`; Err(seconds to wait) when there is none.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        let digest = Sha256::digest(key.as_bytes());
        let id: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let bucket = buckets.entry(id).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.per_second).ceil().max(1.0) as u64)
        }
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
                    limiter.per_second * 60.0
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
    use std::time::Duration;

    #[test]
    fn a_burst_is_allowed_then_requests_wait_for_the_refill() {
        let limiter = RateLimiter::new(60).unwrap(); // 1 per second, bursts of 10
        let start = Instant::now();
        for _ in 0..10 {
            limiter.take("key-a", start).unwrap();
        }
        assert_eq!(limiter.take("key-a", start), Err(1));
        assert!(limiter.take("key-b", start).is_ok(), "another key has its own bucket");
        assert!(limiter.take("key-a", start + Duration::from_millis(1000)).is_ok(), "a second refills one token");
        assert_eq!(limiter.take("key-a", start + Duration::from_millis(1000)), Err(1));
        assert!(RateLimiter::new(0).is_none(), "0 turns limiting off");
    }
}
