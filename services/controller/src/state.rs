//! What every handler, the gRPC service and the reconciler share: the pool, the queue, the
//! configuration and the metrics. Cheap to clone.

use std::sync::Arc;

use lathe_queue::Queue;
use lathe_store::PgPool;

use crate::rate_limit::RateLimiter;
use crate::storage::Storage;
use crate::telemetry::Telemetry;
use crate::{ControllerConfig, ControllerError};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub queue: Queue,
    pub config: Arc<ControllerConfig>,
    pub storage: Storage,
    pub telemetry: Arc<Telemetry>,
    /// Per-key request limits; None when `rate_limit_per_minute` is 0.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// The inference workers connected to this replica, and the completions they are serving.
    pub inference: Arc<crate::inference::Router>,
    /// The workers whose streams this replica holds, to close them when they are revoked.
    pub revocations: Arc<crate::grpc::revocation::Revocations>,
    /// The attempts whose streams this replica holds, to tell them of a cancel, pause or preemption.
    pub attempt_controls: Arc<crate::grpc::control::AttemptControls>,
    /// Rate limits and the outage memory of the worker port.
    pub worker_gate: Arc<crate::grpc::caller::Gate>,
    /// Failed authentications per client address, and a short memory of API keys.
    pub api_gate: Arc<crate::api::auth::KeyGate>,
    /// Open event streams per API key.
    pub streams: Arc<crate::api::limits::StreamCounts>,
    /// Job-create data checks: remembered, bounded, abandoned with their request.
    pub data_checks: Arc<crate::data_check::DataChecks>,
}

impl AppState {
    pub async fn connect(config: ControllerConfig) -> Result<AppState, ControllerError> {
        let pool = lathe_store::connect(&config.database_url, config.max_db_connections, "lathe-controller").await?;
        let queue = Queue::open(&config.redis_url, &config.redis_prefix).await?;
        let storage = Storage::open(&config.data_dir)?;
        let rate_limiter = RateLimiter::new(config.rate_limit_per_minute).map(Arc::new);
        Ok(AppState {
            pool,
            queue,
            storage,
            worker_gate: Arc::new(crate::grpc::caller::Gate::new(&config)),
            api_gate: Arc::new(crate::api::auth::KeyGate::new(config.auth_failures_per_minute)),
            streams: Arc::default(),
            data_checks: Arc::default(),
            config: Arc::new(config),
            telemetry: Arc::new(Telemetry::new()),
            rate_limiter,
            inference: Arc::default(),
            revocations: Arc::default(),
            attempt_controls: Arc::default(),
        })
    }
}

impl AppState {
    /// Adds one of the controller's own events to a job's history. Called after the change it
    /// describes is committed, so a failure here must not undo or fail that change: it is
    /// logged and the event is lost, nothing else.
    pub async fn note_event(
        &self,
        job_id: &str,
        level: lathe_store::dispatch::EventLevel,
        message: &str,
        data: Option<&serde_json::Value>,
    ) {
        if let Err(error) = lathe_store::dispatch::add_job_event(&self.pool, job_id, level, message, data).await {
            tracing::warn!(job_id, %error, message, "could not record a job event");
        }
    }

    /// Wakes a worker for a queued job. Redis being down is not an error for the user: the job
    /// is committed and the reconciler publishes it when Redis is back.
    pub async fn publish_job(&self, job: &lathe_store::jobs::Job) {
        let resources = &job.spec.resources;
        if let Err(error) = self.queue.publish(&resources.pool, &job.id, resources.priority).await {
            tracing::warn!(job_id = %job.id, %error, "could not publish to Redis; the reconciler will");
        }
    }
}
