//! Redis dispatch: wakes an idle worker the moment a job is queued.
//!
//! Where it sits: the controller writes a job to Postgres (the source of truth) and then calls
//! [`Queue::publish`] with the job's id; a worker daemon blocks in [`Queue::wait_for_job`] on
//! the pools it serves, gets an id, and claims that job from the controller over gRPC (a
//! compare-and-set in Postgres). The reconciler calls `publish` again for every queued job, so
//! losing Redis delays a job but never loses one. How the queue works, and why it may be
//! wrong without harm, is told at the top of [`redis`](crate::redis).
//!
//! - [`Queue`]: publish, wait, remove, depth, contains, ping.
//! - [`Pool`]: a validated pool name (`[a-z0-9_-]{1,64}`).
//! - [`QueueError`]: one error; [`QueueError::is_unavailable`] tells a caller to poll Postgres.

mod error;
mod pool;
pub mod redis;

pub use crate::redis::{Queue, QueuedJob, DEFAULT_KEY_PREFIX};
pub use error::QueueError;
pub use lathe_core::JobId;
pub use pool::{Pool, MAX_PRIORITY, MIN_PRIORITY};

/// Makes rustls's ring provider the process default, once. The Redis client's TLS builds its
/// rustls config from the process default; Postgres (sqlx) and gRPC (tonic) name ring
/// themselves. Called before any TLS connection; later calls do nothing.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already the default: keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
