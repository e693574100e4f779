//! The daemon's loop: register, keep a heartbeat, wait for work, claim, run one attempt at a
//! time. SIGTERM (the `shutdown` signal) preempts the running attempt — checkpoint, give the
//! job back — and ends the loop. SIGUSR1 drains: the running attempt finishes, nothing more is
//! claimed, and the worker exits (`scancel --signal=USR1 --batch` on a pilot, a node going into
//! maintenance).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lathe_proto::v1::{
    AttemptRef, ClaimEvaluationRequest, ClaimJobRequest, DeviceKind, EvaluationProgress, HeartbeatRequest, LeaveRequest, RegisterRequest,
};
use lathe_queue::Queue;
use tokio::sync::watch;
use tonic::Code;
use tracing::Instrument;

use crate::attempt::{self, Signals, StopCause};
use crate::client::{self, Client};
use crate::evaluation::{self, EvalSignals};
use crate::telemetry::{self, Telemetry, WorkerMetrics};
use crate::{WorkerConfig, WorkerError};

/// How long one wait in Redis lasts before the worker asks the controller directly (the path
/// that finds jobs whose wake-up was lost, or all jobs while Redis is down).
const WAIT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(2);

/// The attempt running now, for the heartbeat.
#[derive(Default)]
struct Current {
    attempt: Option<(AttemptRef, Arc<Signals>)>,
    /// The evaluation running now: (id, attempt, signals).
    evaluation: Option<(String, u32, Arc<EvalSignals>)>,
    draining: bool,
    /// SIGUSR1: leave once the running work is done.
    leave_when_idle: bool,
}

pub async fn run(mut config: WorkerConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
    // `lathe up` hands its workers one registry, which the controller's /metrics serves.
    let telemetry = config.shared_telemetry.clone().unwrap_or_else(|| Arc::new(Telemetry::new()));
    let metrics = WorkerMetrics::new(telemetry.clone(), &config.name);
    if let Some(listen) = &config.metrics_listen {
        telemetry::serve(listen, telemetry.clone()).await?;
    }
    // Before anything that waits: SIGUSR1's default action would kill the process.
    let current = Arc::new(Mutex::new(Current::default()));
    drain_on_sigusr1(current.clone())?;
    let mut client = client::connect(&config)?;
    let (timing, own_token, worker_id) = match register(&mut client, &config, &mut shutdown).await? {
        Some(registered) => registered,
        None => return Ok(()),
    };
    // Enrolled with a fleet secret: from now on this instance speaks with its own token.
    if let Some(token) = own_token {
        config.token = token;
        client = client::connect(&config)?;
    }
    let placement = &config.placement;
    metrics.identify(&worker_id, &config.pools, &config.device, placement.slurm_job_id.as_deref(), placement.pod_name.as_deref());
    // The heartbeat outlives a SIGTERM: a preempted attempt still checkpoints and hands the job
    // back under its lease. It stops when this function returns.
    let (_heartbeat_guard, heartbeat_stop) = watch::channel(false);
    // The heartbeat reports this device's memory; `config.device` is already resolved (cpu, cuda:N).
    let device = lathe_trainer::device::parse_device(&config.device).unwrap_or(tch::Device::Cpu);
    tokio::spawn(heartbeat(client.clone(), current.clone(), timing, device, heartbeat_stop));

    if let Some(serve) = config.serve {
        crate::serve::run(client.clone(), &config, serve, &metrics, shutdown.clone()).await?;
        leave(&mut client, "stopped").await;
        return Ok(());
    }

    let mut queue: Option<Queue> = None;
    let mut after_evaluation = false;
    let (mut idle_since, mut attempts_run) = (Instant::now(), 0u32);
    let mut leaving = "stopped";
    while !*shutdown.borrow() {
        if let Some(reason) = config.lifecycle.done(idle_since.elapsed(), attempts_run) {
            tracing::info!(reason, "worker leaving");
            leaving = "lifecycle";
            break;
        }
        if current.lock().expect("current lock").leave_when_idle {
            tracing::info!("drained (SIGUSR1); worker leaving");
            leaving = "drained";
            break;
        }
        if current.lock().expect("current lock").draining {
            tokio::select! { _ = tokio::time::sleep(WAIT) => {}, _ = shutdown.changed() => {} }
            continue;
        }
        // An evaluation when one is queued (they are short, and a job's own evaluations should
        // follow it), but after each evaluation the best queued job goes first, so a backlog of
        // evaluations cannot starve training.
        let job_id = if std::mem::take(&mut after_evaluation) {
            String::new()
        } else {
            match client.claim_evaluation(ClaimEvaluationRequest { evaluation_id: String::new() }).await {
                Ok(response) => {
                    let claim = response.into_inner();
                    let signals = Arc::new(EvalSignals::default());
                    current.lock().expect("current lock").evaluation = Some((claim.evaluation_id.clone(), claim.attempt, signals.clone()));
                    // Every log line of the evaluation, here and inside, carries its id and attempt.
                    let span = tracing::info_span!("evaluation", evaluation_id = %claim.evaluation_id, attempt = claim.attempt);
                    async {
                        tracing::info!(model = claim.model, "evaluation started");
                        let ended = evaluation::run(client.clone(), &config, claim, signals, shutdown.clone()).await;
                        tracing::info!(outcome = ended, "evaluation ended");
                    }
                    .instrument(span)
                    .await;
                    current.lock().expect("current lock").evaluation = None;
                    after_evaluation = true;
                    idle_since = Instant::now();
                    continue;
                }
                Err(status) if status.code() == Code::Unauthenticated => return Err(WorkerError::Unauthenticated(status.message().into())),
                // NOT_FOUND: none queued; ABORTED: it could not run and was failed; others: the
                // controller is unreachable, and the job path below waits and retries.
                Err(_) => {}
            }
            if queue.is_none() {
                queue = Queue::open(&config.redis_url, &config.redis_prefix).await.ok();
            }
            // An id from Redis, or "" (ask the controller for the best job that fits).
            match &queue {
                Some(q) => tokio::select! {
                    woken = q.wait_for_job(&config.pools, WAIT) => match woken {
                        Ok(Some(job)) => job.job_id.as_str().to_string(),
                        Ok(None) => String::new(),
                        Err(error) => {
                            tracing::warn!(%error, "Redis unavailable; polling the controller");
                            queue = None;
                            String::new()
                        }
                    },
                    _ = shutdown.changed() => break,
                },
                None => {
                    tokio::select! { _ = tokio::time::sleep(RETRY) => {}, _ = shutdown.changed() => break }
                    String::new()
                }
            }
        };
        // A drain (SIGUSR1, or the controller's flag) that arrived during the wait claims nothing.
        if current.lock().map(|c| c.leave_when_idle || c.draining).expect("current lock") {
            continue;
        }
        let claim = match client.claim_job(ClaimJobRequest { job_id }).await {
            Ok(response) => response.into_inner(),
            Err(status) if matches!(status.code(), Code::NotFound | Code::Aborted | Code::FailedPrecondition) => continue,
            Err(status) if status.code() == Code::Unauthenticated => return Err(WorkerError::Unauthenticated(status.message().into())),
            Err(status) => {
                tracing::warn!(%status, "claim failed; retrying");
                tokio::select! { _ = tokio::time::sleep(RETRY) => {}, _ = shutdown.changed() => {} }
                continue;
            }
        };
        let signals = Arc::new(Signals::new(Instant::now() + timing.trusted_lease()));
        let reference = AttemptRef { job_id: claim.job_id.clone(), attempt: claim.attempt };
        current.lock().expect("current lock").attempt = Some((reference, signals.clone()));
        // Every log line of the attempt, here, in the stream and in the trainer, carries the job id
        // and the attempt (the fencing token) through this span.
        let span = tracing::info_span!("attempt", job_id = %claim.job_id, attempt = claim.attempt);
        async {
            tracing::info!(resume = claim.resume_from.is_some(), "attempt started");
            let ended = attempt::run(client.clone(), &config, claim.clone(), signals, &metrics, shutdown.clone()).await;
            tracing::info!(outcome = ended.as_str(), "attempt ended");
        }
        .instrument(span)
        .await;
        current.lock().expect("current lock").attempt = None;
        attempts_run += 1;
        idle_since = Instant::now();
    }
    leave(&mut client, leaving).await;
    Ok(())
}

/// Tells the controller, so that autoscalers stop counting this worker now rather than when
/// its heartbeats are missed. Best effort, and brief: the process is on its way out.
async fn leave(client: &mut Client, reason: &str) {
    let mut leave = tonic::Request::new(LeaveRequest { reason: reason.into() });
    leave.set_timeout(Duration::from_secs(2));
    if let Err(status) = client.leave(leave).await {
        tracing::debug!(%status, "could not tell the controller this worker is leaving");
    }
    tracing::info!("worker stopped");
}

/// What the controller said at registration.
#[derive(Debug, Clone, Copy)]
struct Timing {
    heartbeat: Duration,
    lease: Duration,
}

impl Timing {
    /// How long after a renewal this worker trusts its lease: the lease less a margin for
    /// clock rates and the time the renewal took, so that the worker stops before the
    /// controller can hand the job to someone else.
    fn trusted_lease(&self) -> Duration {
        self.lease.saturating_sub((self.lease / 4).max(self.heartbeat))
    }
}

/// SIGUSR1 drains this worker: what runs finishes, nothing more is claimed, then it exits.
fn drain_on_sigusr1(current: Arc<Mutex<Current>>) -> Result<(), WorkerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(WorkerError::Signal)?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1: draining — finishing the current work, claiming nothing more");
            current.lock().expect("current lock").leave_when_idle = true;
        }
    });
    Ok(())
}

/// Registers, retrying while the controller is unreachable; `None` if shut down meanwhile.
/// Also returns the instance's own token when the worker enrolled with a fleet secret.
async fn register(
    client: &mut Client,
    config: &WorkerConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<(Timing, Option<String>, String)>, WorkerError> {
    let device_kind = match (config.device.starts_with("cuda"), tch::utils::has_hip()) {
        (true, true) => DeviceKind::Rocm,
        (true, false) => DeviceKind::Cuda,
        (false, _) => DeviceKind::Cpu,
    };
    let request = RegisterRequest {
        name: config.name.clone(),
        device_kind: device_kind as i32,
        gpu_name: config.gpu_name.clone(),
        gpu_memory_bytes: config.gpu_memory_bytes,
        pools: config.pools.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        slurm_job_id: config.placement.slurm_job_id.clone().unwrap_or_default(),
        pod_name: config.placement.pod_name.clone().unwrap_or_default(),
        gpus: config.gpus as u32,
        nodes: config.nodes as u32,
        serving: config.serve.is_some(),
    };
    loop {
        match client.register(request.clone()).await {
            Ok(response) => {
                let r = response.into_inner();
                let enrolled = !r.worker_token.is_empty();
                tracing::info!(worker_id = r.worker_id, name = config.name, pools = ?config.pools, enrolled, "registered with the controller");
                let timing = Timing {
                    heartbeat: Duration::from_millis(r.heartbeat_interval_ms.max(100) as u64),
                    lease: Duration::from_millis(r.lease_duration_ms.max(1000) as u64),
                };
                return Ok(Some((timing, Some(r.worker_token).filter(|t| !t.is_empty()), r.worker_id)));
            }
            Err(status) if status.code() == Code::Unauthenticated => return Err(WorkerError::Unauthenticated(status.message().into())),
            // What this identity may do does not cover what it asks for, or a field is malformed:
            // retrying cannot help.
            Err(status) if matches!(status.code(), Code::PermissionDenied | Code::InvalidArgument) => {
                return Err(WorkerError::Refused(status.message().into()))
            }
            Err(status) => {
                tracing::warn!(%status, controller = config.controller_url, "controller unreachable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.changed() => if *shutdown.borrow() { return Ok(None) },
                }
            }
        }
    }
}

async fn heartbeat(mut client: Client, current: Arc<Mutex<Current>>, timing: Timing, device: tch::Device, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(timing.heartbeat);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Err: the daemon returned and dropped the sender.
            _ = stop.changed() => return,
        }
        let sent_at = Instant::now();
        let (running, evaluations) = {
            let current = current.lock().expect("current lock");
            let running: Vec<AttemptRef> = current.attempt.iter().map(|(r, _)| r.clone()).collect();
            let evaluations: Vec<EvaluationProgress> = current
                .evaluation
                .iter()
                .map(|(id, attempt, signals)| {
                    let (items_done, items_total) = signals.progress();
                    EvaluationProgress { evaluation_id: id.clone(), attempt: *attempt, items_done, items_total }
                })
                .collect();
            (running, evaluations)
        };
        let memory = lathe_trainer::device::memory_in_use_bytes(device);
        match client.heartbeat(HeartbeatRequest { running, gpu_memory_used_bytes: memory, evaluations }).await {
            Ok(response) => {
                let r = response.into_inner();
                let mut current = current.lock().expect("current lock");
                current.draining = r.draining;
                if let Some((id, attempt, signals)) = &current.evaluation {
                    if r.evaluations_lost.iter().any(|l| &l.evaluation_id == id && l.attempt == *attempt) {
                        tracing::warn!(evaluation_id = id, "heartbeat: evaluation cancelled or reassigned; stopping it");
                        signals.abandon();
                    }
                }
                if let Some((reference, signals)) = &current.attempt {
                    let mine = |job_id: &str, attempt: u32| job_id == reference.job_id && attempt == reference.attempt;
                    if r.database_unavailable {
                        // The controller answers but cannot reach Postgres: nobody can hand the job
                        // on meanwhile, and the controller extends the leases once it is back.
                        // From now, not from the send: the controller may have waited on Postgres
                        // before it answered, and nothing can be requeued until Postgres is back
                        // (the reconciler then extends every lease first).
                        tracing::warn!("heartbeat: the controller cannot reach its database; training on, reports buffered");
                        signals.renewed(Instant::now() + timing.trusted_lease());
                    } else if r.lost.iter().any(|l| mine(&l.job_id, l.attempt)) {
                        tracing::warn!(job_id = reference.job_id, attempt = reference.attempt, "heartbeat: lease lost");
                        signals.stop(StopCause::LeaseLost);
                    } else if r.renewed.iter().any(|l| mine(&l.job_id, l.attempt)) {
                        signals.renewed(sent_at + timing.trusted_lease());
                    }
                }
            }
            Err(status) => tracing::warn!(%status, "heartbeat failed"),
        }
    }
}
