//! The `WorkerService` of `proto/lathe/v1/worker.proto`: register, heartbeat, claim, and the
//! per-attempt stream ([`attempt`]). Workers hold no database credentials; every change they
//! make to a job goes through here, fenced by the attempt number they were given at claim.
//!
//! Trust (docs/architecture.md §3, "Worker trust"): every call is rate limited and
//! authenticated ([`caller`]); an identity may do only what its grant allows (train in its
//! pools, or serve); what a worker sends is checked before it is stored ([`wire`]); its
//! streams close when it is revoked ([`revocation`]); the port itself is bounded ([`listener`]).

mod attempt;
pub mod caller;
pub mod control;
mod evaluation;
pub mod listener;
pub mod revocation;
mod serve;
mod wire;

use std::pin::Pin;

use lathe_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use lathe_proto::v1::{
    AttemptRef, Checkpoint, ClaimEvaluationRequest, ClaimEvaluationResponse, ClaimJobRequest, ClaimJobResponse, ControllerMessage,
    DeviceKind, FailEvaluationRequest, FailEvaluationResponse, FileRef, FinishEvaluationRequest, FinishEvaluationResponse,
    HeartbeatRequest, HeartbeatResponse, Lease, LeaveRequest, LeaveResponse, RegisterRequest, RegisterResponse, ServeCommand, ServeMessage,
    WorkerMessage,
};
use lathe_store::dispatch::{claim_job, finish_attempt, renew_lease, AttemptOutcome, ClaimRequest, EventLevel};
use lathe_store::files::get_file;
use lathe_store::jobs::get_job_unscoped;
use lathe_store::jobs::JobError;
use lathe_store::time::OffsetDateTime;
use lathe_store::workers::{self, AuthenticatedWorker, Enrolment, NewWorker, ROLE_SERVING, ROLE_TRAINING};
use lathe_store::StoreError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::AppState;

use caller::{bearer, look_up, Lookup, UNKNOWN_TOKEN};

pub fn server(state: AppState) -> WorkerServiceServer<Service> {
    // A finished evaluation reports every item's raw output in one message (a 1000-item
    // benchmark with long answers is a few MB).
    WorkerServiceServer::new(Service { state }).max_decoding_message_size(64 << 20)
}

pub struct Service {
    state: AppState,
}

/// Store errors as gRPC statuses, by the error's [`lathe_core::ErrorCode`] (the map the REST
/// API uses too): a stale attempt is FAILED_PRECONDITION (stop), Postgres being down is
/// UNAVAILABLE (retry).
pub(crate) fn status(error: StoreError) -> Status {
    let code = tonic::Code::from_i32(error.code().grpc_code());
    match error {
        StoreError::NotFound => Status::new(code, "not found"),
        StoreError::Conflict(what) => Status::new(code, what),
        other => Status::new(code, other.to_string()),
    }
}

/// A stored file as a worker reads it: its path on shared storage and the SHA-256 to check.
pub(crate) fn file_ref(state: &AppState, file: &lathe_store::files::StoredFile) -> FileRef {
    FileRef {
        file_id: file.id.as_str().to_string(),
        path: state.storage.file_path(file.id.as_str()).display().to_string(),
        sha256: file.sha256.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl Service {
    /// The worker behind a call's token, after its rate limit; see [`caller`].
    async fn caller<T>(&self, request: &Request<T>) -> Result<AuthenticatedWorker, Status> {
        let token = bearer(request.metadata())?;
        let gate = &self.state.worker_gate;
        gate.admit(token)?;
        let peer = request.remote_addr();
        gate.check_peer(peer)?;
        match look_up(&self.state.pool, gate, token).await? {
            Lookup::Worker(worker) => Ok(worker),
            Lookup::Unknown => {
                gate.failed(peer);
                Err(Status::unauthenticated(UNKNOWN_TOKEN))
            }
        }
    }

    /// A caller that may take jobs and evaluations: a training identity, not an inference server.
    async fn trainer<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let worker = self.caller(request).await?;
        if worker.serving || !worker.grant.allows(ROLE_TRAINING) {
            return Err(Status::permission_denied("this worker is not a training worker: it may not claim jobs or evaluations"));
        }
        Ok(worker.id)
    }

    /// Enrols a new instance with a fleet secret, within the fleet's rate and terms.
    async fn enrol(&self, secret: &str, registration: NewWorker<'_>) -> Result<(String, String), Status> {
        if let Some(enrolments) = &self.state.worker_gate.enrolments {
            if let Err(wait) = enrolments.take(secret, std::time::Instant::now()) {
                return Err(Status::resource_exhausted(format!(
                    "this fleet enrols at most {:.0} workers a minute; retry in {wait} s",
                    enrolments.per_minute()
                )));
            }
        }
        match workers::enroll_worker(&self.state.pool, secret, registration, self.state.config.lease).await.map_err(status)? {
            Enrolment::Enrolled(enrolled) => {
                tracing::info!(worker_id = enrolled.worker.id, fleet_id = ?enrolled.worker.fleet_id, "worker enrolled");
                Ok((enrolled.worker.id, enrolled.token))
            }
            Enrolment::UnknownSecret => Err(Status::unauthenticated(UNKNOWN_TOKEN)),
            Enrolment::Refused(field, why) => Err(Status::permission_denied(format!("{field}: {why}"))),
            Enrolment::FleetFull { fleet, max_workers } => Err(Status::resource_exhausted(format!(
                "fleet {fleet:?} has its {max_workers} live workers already (its max_workers); retry when one leaves"
            ))),
        }
    }
}

#[tonic::async_trait]
impl WorkerService for Service {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let token = bearer(request.metadata())?.to_string();
        self.state.worker_gate.admit(&token)?;
        let peer = request.remote_addr();
        self.state.worker_gate.check_peer(peer)?;
        let r = wire::registration(request.into_inner())?;
        let device_kind = match DeviceKind::try_from(r.device_kind).unwrap_or(DeviceKind::Unspecified) {
            DeviceKind::Cuda => "cuda",
            DeviceKind::Rocm => "rocm",
            DeviceKind::Cpu | DeviceKind::Unspecified => "cpu",
        };
        let pools = if r.pools.is_empty() { vec![lathe_core::spec::DEFAULT_POOL.to_string()] } else { r.pools };
        let non_empty = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
        let (gpu_name, slurm_job_id, pod_name) = (non_empty(&r.gpu_name), non_empty(&r.slurm_job_id), non_empty(&r.pod_name));
        let registration = NewWorker {
            name: &r.name,
            device_kind,
            gpu_name: gpu_name.as_deref(),
            gpu_memory_bytes: Some(r.gpu_memory_bytes.min(i64::MAX as u64) as i64).filter(|b| *b > 0),
            gpus: r.gpus.clamp(1, 1024) as i32,
            nodes: r.nodes.clamp(1, 64) as i32,
            pools: &pools,
            version: &r.version,
            slurm_job_id: slurm_job_id.as_deref(),
            pod_name: pod_name.as_deref(),
            serving: r.serving,
        };
        let pool = &self.state.pool;
        // The worker's own token, else a fleet secret: enrol a new instance and hand it its token.
        let (worker_id, worker_token) = match look_up(pool, &self.state.worker_gate, &token).await? {
            Lookup::Worker(worker) => {
                if let Some((field, why)) = worker.grant.refusal(&pools, r.serving) {
                    return Err(Status::permission_denied(format!("{field}: {why}")));
                }
                workers::update_registration(pool, &worker.id, registration).await.map_err(status)?;
                (worker.id, String::new())
            }
            Lookup::Unknown => match self.enrol(&token, registration).await {
                Err(refused) if refused.code() == tonic::Code::Unauthenticated => {
                    self.state.worker_gate.failed(peer);
                    return Err(refused);
                }
                other => other?,
            },
        };
        tracing::info!(worker_id, name = %r.name, device_kind, pools = ?pools, slurm_job_id, pod_name, serving = r.serving, "worker registered");
        Ok(Response::new(RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.state.config.heartbeat_interval.as_millis() as u32,
            lease_duration_ms: self.state.config.lease.as_millis() as u32,
            worker_token,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let worker_id = self.caller(&request).await?.id;
        match self.renew(&worker_id, request.into_inner()).await {
            Err(StoreError::Unavailable(error)) => {
                // Nothing renewed, and nothing can be taken from the worker either: it keeps
                // working, and the leases are extended for the outage when Postgres is back.
                tracing::warn!(worker_id, %error, "heartbeat while Postgres is unreachable");
                Ok(Response::new(HeartbeatResponse { database_unavailable: true, ..Default::default() }))
            }
            Err(other) => Err(status(other)),
            Ok(response) => Ok(Response::new(response)),
        }
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let worker_id = self.caller(&request).await?.id;
        workers::leave(&self.state.pool, &worker_id).await.map_err(status)?;
        tracing::info!(worker_id, reason = request.into_inner().reason, "worker left");
        Ok(Response::new(LeaveResponse {}))
    }

    async fn claim_evaluation(&self, request: Request<ClaimEvaluationRequest>) -> Result<Response<ClaimEvaluationResponse>, Status> {
        let worker_id = self.trainer(&request).await?;
        Ok(Response::new(evaluation::claim(&self.state, &worker_id, request.into_inner()).await?))
    }

    async fn finish_evaluation(&self, request: Request<FinishEvaluationRequest>) -> Result<Response<FinishEvaluationResponse>, Status> {
        let worker_id = self.trainer(&request).await?;
        evaluation::finish(&self.state, &worker_id, request.into_inner()).await?;
        Ok(Response::new(FinishEvaluationResponse {}))
    }

    async fn fail_evaluation(&self, request: Request<FailEvaluationRequest>) -> Result<Response<FailEvaluationResponse>, Status> {
        let worker_id = self.trainer(&request).await?;
        evaluation::fail(&self.state, &worker_id, request.into_inner()).await?;
        Ok(Response::new(FailEvaluationResponse {}))
    }

    async fn claim_job(&self, request: Request<ClaimJobRequest>) -> Result<Response<ClaimJobResponse>, Status> {
        let worker_id = self.trainer(&request).await?;
        let r = request.into_inner();
        let state = &self.state;
        // The id a worker was woken with only says that work is queued: which job it gets is
        // fair share's choice among all it fits (docs/scheduling.md).
        let _woken_for = r.job_id;
        let request =
            ClaimRequest { worker_id: &worker_id, job_id: None, lease: state.config.lease, half_life: state.config.fair_share_half_life };
        let claim = claim_job(&state.pool, request).await.map_err(status)?.ok_or_else(|| Status::not_found("nothing to claim"))?;

        match self.claimed(&claim, &worker_id).await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => {
                // The claim is committed but the worker will not get to run it: hand the job
                // back now (or fail it, when one of its files is gone) rather than when the
                // lease expires.
                let outcome = if error.code() == tonic::Code::NotFound {
                    AttemptOutcome::Failed(JobError {
                        code: "file_not_found".into(),
                        message: "a file of this job was deleted before the job could run".into(),
                        param: Some("training_file".into()),
                    })
                } else {
                    AttemptOutcome::Preempted { reason: format!("claim could not be completed: {}", error.message()) }
                };
                match finish_attempt(&state.pool, claim.job_id.as_str(), claim.attempt, outcome, &state.config.retry).await {
                    Ok(job) if job.status == lathe_core::JobStatus::Queued => state.publish_job(&job).await,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(job_id = %claim.job_id, error = %e, "could not release a half-done claim; the lease will expire")
                    }
                }
                Err(if error.code() == tonic::Code::NotFound { Status::aborted("the job's file is gone; job failed") } else { error })
            }
        }
    }

    type AttemptStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

    async fn attempt(&self, request: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::AttemptStream>, Status> {
        let worker_id = self.trainer(&request).await?;
        let stream = attempt::open(self.state.clone(), worker_id, request.into_inner()).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    type ServeStream = Pin<Box<dyn Stream<Item = Result<ServeCommand, Status>> + Send>>;

    async fn serve(&self, request: Request<Streaming<ServeMessage>>) -> Result<Response<Self::ServeStream>, Status> {
        let worker = self.caller(&request).await?;
        if !worker.serving || !worker.grant.allows(ROLE_SERVING) {
            return Err(Status::permission_denied(
                "only a worker registered for serving (lathe worker --serve) by an identity granted the serving role may open Serve",
            ));
        }
        let stream = serve::open(self.state.clone(), worker.id, request.into_inner()).await?;
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Service {
    /// A heartbeat's renewals; `Unavailable` when Postgres cannot be reached.
    async fn renew(&self, worker_id: &str, r: HeartbeatRequest) -> Result<HeartbeatResponse, StoreError> {
        let pool = &self.state.pool;
        workers::heartbeat(pool, worker_id).await?;
        let mut response = HeartbeatResponse { draining: workers::is_draining(pool, worker_id).await?, ..Default::default() };
        for running in r.running {
            match renew_lease(pool, &running.job_id, running.attempt as i32, worker_id, self.state.config.lease).await {
                Ok(expires_at) => response.renewed.push(Lease {
                    job_id: running.job_id,
                    attempt: running.attempt,
                    expires_at_unix_ms: millis(expires_at),
                }),
                Err(StoreError::StaleAttempt { .. }) | Err(StoreError::NotFound) => {
                    response.lost.push(AttemptRef { job_id: running.job_id, attempt: running.attempt })
                }
                Err(other) => return Err(other),
            }
        }
        response.evaluations_lost = evaluation::renew(&self.state, worker_id, r.evaluations).await?;
        Ok(response)
    }

    /// Everything a worker needs for a committed claim.
    async fn claimed(&self, claim: &lathe_store::dispatch::Claim, worker_id: &str) -> Result<ClaimJobResponse, Status> {
        let state = &self.state;
        let job = get_job_unscoped(&state.pool, &claim.job_id).await.map_err(status)?;
        if claim.attempt == 1 {
            let waited = OffsetDateTime::now_utc() - job.created_at;
            state.telemetry.claim_latency.observe(waited.as_seconds_f64().max(0.0));
        }
        let lookup = |id: &lathe_core::FileId| {
            let state = state.clone();
            let project = claim.project_id.clone();
            let id = id.clone();
            async move {
                let file = get_file(&state.pool, &project, &id).await.map_err(status)?;
                Ok::<_, Status>(file_ref(&state, &file))
            }
        };
        let training_file = Some(lookup(&claim.spec.training_file).await?);
        let validation_file = match &claim.spec.validation_file {
            Some(id) => Some(lookup(id).await?),
            None => None,
        };
        let output_dir = state.storage.job_dir(claim.job_id.as_str());
        std::fs::create_dir_all(&output_dir).map_err(|e| Status::internal(format!("{}: {e}", output_dir.display())))?;
        let resumed = claim.resume_from.as_ref().map(|c| c.step);
        let message = match resumed {
            Some(step) => format!("Attempt {} started, resuming from the checkpoint at step {step}", claim.attempt),
            None => format!("Attempt {} started", claim.attempt),
        };
        let data = serde_json::json!({"attempt": claim.attempt, "worker_id": worker_id, "resumed_from_step": resumed});
        state.note_event(claim.job_id.as_str(), EventLevel::Info, &message, Some(&data)).await;
        tracing::info!(job_id = %claim.job_id, attempt = claim.attempt, worker_id, resumed_from_step = ?resumed, "job claimed");

        Ok(ClaimJobResponse {
            job_id: claim.job_id.as_str().to_string(),
            attempt: claim.attempt as u32,
            spec_json: serde_json::to_string(&claim.spec).map_err(|e| Status::internal(e.to_string()))?,
            lease: Some(Lease {
                job_id: claim.job_id.as_str().to_string(),
                attempt: claim.attempt as u32,
                expires_at_unix_ms: millis(claim.lease_expires_at),
            }),
            resume_from: claim.resume_from.clone().map(|c| Checkpoint {
                checkpoint_id: c.id.as_str().to_string(),
                step: c.step as u64,
                path: c.path,
            }),
            training_file,
            validation_file,
            output_dir: output_dir.display().to_string(),
        })
    }
}

/// Runs `pass` every `period` until `stop` (a pass that overruns delays the next tick rather
/// than bunching them): the loop of the tasks that watch every open stream at once
/// ([`control`], [`revocation`]).
pub(crate) async fn every<F, Fut>(period: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        pass().await;
    }
}
