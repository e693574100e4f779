//! `Authorization: Bearer <key>` → the caller's project. Every handler that touches user data
//! takes a [`Project`], and every store query it makes is scoped by `project.id`.
//!
//! Before the database: a client address whose keys keep failing gets 429 without a lookup
//! ([`KeyGate`]), and a key that authenticated is remembered for [`KEY_MEMORY`], so a busy
//! client costs one lookup per that period. Revoking a key therefore takes effect within
//! [`KEY_MEMORY`] on every replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::http_server::ClientAddr;
use crate::rate_limit::RateLimiter;
use crate::AppState;

/// How long an API key that authenticated is trusted without a lookup.
pub const KEY_MEMORY: Duration = Duration::from_secs(5);

/// Keys remembered at most (the oldest half is forgotten beyond).
const MAX_REMEMBERED: usize = 50_000;

/// The authenticated caller's project.
pub struct Project {
    pub id: String,
    /// The SHA-256 of the key it presented: per-key limits count by it.
    pub key_digest: [u8; 32],
}

pub struct KeyGate {
    failures: Option<RateLimiter>,
    remembered: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl KeyGate {
    pub fn new(failures_per_minute: u32) -> KeyGate {
        KeyGate {
            failures: RateLimiter::with_burst(failures_per_minute, f64::from(failures_per_minute) / 2.0),
            remembered: Mutex::new(HashMap::new()),
        }
    }

    fn recall(&self, digest: &[u8; 32], now: Instant) -> Option<String> {
        let remembered = self.remembered.lock().expect("key memory lock");
        remembered.get(digest).filter(|(_, at)| now.duration_since(*at) < KEY_MEMORY).map(|(project, _)| project.clone())
    }

    fn remember(&self, digest: [u8; 32], project: &str, now: Instant) {
        let mut remembered = self.remembered.lock().expect("key memory lock");
        if remembered.len() >= MAX_REMEMBERED {
            remembered.retain(|_, (_, at)| now.duration_since(*at) < KEY_MEMORY);
        }
        remembered.insert(digest, (project.to_string(), now));
    }
}

impl FromRequestParts<AppState> for Project {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let token = header.strip_prefix("Bearer ").map(str::trim).unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'; create one with 'lathe admin create-key'.",
            ));
        }
        let gate = &state.api_gate;
        let key_digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(id) = gate.recall(&key_digest, now) {
            return Ok(Project { id, key_digest });
        }
        let address = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip().to_string());
        if let (Some(failures), Some(address)) = (&gate.failures, &address) {
            if let Err(wait) = failures.check(address, now) {
                return Err(too_many_failures(wait));
            }
        }
        match lathe_store::keys::authenticate_api_key(&state.pool, token).await? {
            Some(id) => {
                gate.remember(key_digest, &id, now);
                Ok(Project { id, key_digest })
            }
            None => {
                if let (Some(failures), Some(address)) = (&gate.failures, &address) {
                    let _ = failures.take(address, now);
                }
                Err(ApiError::unauthorized("Incorrect or revoked API key provided."))
            }
        }
    }
}

fn too_many_failures(wait: u64) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        kind: "requests",
        message: format!("Too many requests with unknown API keys from this address. Retry after {wait} s."),
        param: None,
        code: Some("rate_limit_exceeded".into()),
    }
}
