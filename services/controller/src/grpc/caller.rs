//! Who is calling the worker port, checked before any work is done for them:
//!
//! - Calls are rate limited per presented token (`--grpc-rate-limit-per-minute`), before the
//!   token is looked up, so a flood costs no database round trip.
//! - A peer address whose tokens keep failing is refused for a while (`RESOURCE_EXHAUSTED`)
//!   without a lookup, so guessing tokens cannot load Postgres either.
//! - The token is looked up in Postgres on every call (a revoked token is refused at once).
//!   While Postgres is unreachable, a token that authenticated within the last
//!   [`OUTAGE_TRUST`] is still recognised, so heartbeats can learn that the database is down
//!   and keep their attempts running (nobody can revoke or reassign anything meanwhile).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lathe_store::workers::{self, AuthenticatedWorker};
use lathe_store::StoreError;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::status;
use crate::rate_limit::RateLimiter;
use crate::ControllerConfig;

/// How long a token stays recognised without Postgres.
pub const OUTAGE_TRUST: Duration = Duration::from_secs(30 * 60);

/// Failed authentications a peer address may make per minute.
const FAILURES_PER_MINUTE: u32 = 30;

pub const UNKNOWN_TOKEN: &str =
    "unknown or revoked worker token (a fleet secret: --fleet-secret or 'lathe admin create-fleet'; one worker: 'lathe admin create-worker')";

pub struct Gate {
    calls: Option<RateLimiter>,
    failures: RateLimiter,
    /// Enrolments per fleet secret.
    pub enrolments: Option<RateLimiter>,
    /// Tokens that authenticated, by digest, with when: recognised during an outage.
    known: Mutex<HashMap<[u8; 32], (AuthenticatedWorker, Instant)>>,
}

impl Gate {
    pub fn new(config: &ControllerConfig) -> Gate {
        Gate {
            calls: RateLimiter::new(config.grpc_rate_limit_per_minute),
            failures: RateLimiter::with_burst(FAILURES_PER_MINUTE, f64::from(FAILURES_PER_MINUTE)).expect("non-zero"),
            enrolments: RateLimiter::with_burst(config.enrolments_per_minute, f64::from(config.enrolments_per_minute).max(1.0)),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Charges one call to `token`.
    pub fn admit(&self, token: &str) -> Result<(), Status> {
        if let Some(calls) = &self.calls {
            if let Err(wait) = calls.take(token, Instant::now()) {
                return Err(exhausted(format!("this worker made more than {:.0} calls a minute; retry in {wait} s", calls.per_minute())));
            }
        }
        Ok(())
    }

    /// Refuses a peer whose tokens keep failing, before any lookup.
    pub fn check_peer(&self, peer: Option<SocketAddr>) -> Result<(), Status> {
        match peer.map(|p| p.ip().to_string()) {
            Some(ip) if self.failures.check(&ip, Instant::now()).is_err() => {
                Err(exhausted("too many failed authentications from this address; retry in a minute".into()))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication against the peer.
    pub fn failed(&self, peer: Option<SocketAddr>) {
        if let Some(peer) = peer {
            let _ = self.failures.take(&peer.ip().to_string(), Instant::now());
        }
    }

    fn remember(&self, token: &str, worker: &AuthenticatedWorker) {
        let mut known = self.known.lock().expect("known tokens lock");
        if known.len() >= 100_000 {
            known.retain(|_, (_, at)| at.elapsed() < OUTAGE_TRUST);
        }
        known.insert(digest(token), (worker.clone(), Instant::now()));
    }

    fn recall(&self, token: &str) -> Option<AuthenticatedWorker> {
        let known = self.known.lock().expect("known tokens lock");
        known.get(&digest(token)).filter(|(_, at)| at.elapsed() < OUTAGE_TRUST).map(|(w, _)| w.clone())
    }

    fn forget(&self, token: &str) {
        self.known.lock().expect("known tokens lock").remove(&digest(token));
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn exhausted(message: String) -> Status {
    Status::resource_exhausted(message)
}

/// The `authorization: Bearer <token>` of a request.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("missing 'authorization: Bearer <worker token>'"))
}

/// How a token looked up.
pub enum Lookup {
    Worker(AuthenticatedWorker),
    /// Not a worker token (it may be a fleet secret, for Register).
    Unknown,
}

/// Looks `token` up, or recalls it while Postgres is unreachable.
pub async fn look_up(pool: &lathe_store::PgPool, gate: &Gate, token: &str) -> Result<Lookup, Status> {
    match workers::authenticate_worker(pool, token).await {
        Ok(Some(worker)) => {
            gate.remember(token, &worker);
            Ok(Lookup::Worker(worker))
        }
        Ok(None) => {
            gate.forget(token);
            Ok(Lookup::Unknown)
        }
        Err(StoreError::Unavailable(error)) => match gate.recall(token) {
            Some(worker) => Ok(Lookup::Worker(worker)),
            None => Err(status(StoreError::Unavailable(error))),
        },
        Err(other) => Err(status(other)),
    }
}
