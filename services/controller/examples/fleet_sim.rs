//! The fleet simulator of the control-plane benchmark (scripts/bench_fleet_sim.sh, see
//! docs/scheduling.md "The control plane at scale"): N simulated workers in one process, each
//! speaking the real worker protocol to the controllers named by `--grpc` (spread round-robin):
//! enrol with a fleet secret, heartbeat at the interval the controller gives, wait for a wake-up
//! in Redis as `lathe worker` does, claim, open the Attempt stream, send metric batches at a
//! steady rate, then Finish. Some crash mid-job (the process is gone: no Fail, no Leave, no
//! heartbeat; a new instance enrols after `--restart-seconds`), and those asked to yield to a
//! higher-priority job commit a checkpoint and hand the job back, as the real worker does.
//!
//! Nothing here trains: a job lasts a time drawn from its id (so every attempt of a job agrees),
//! and its points are made up. What is measured is the control plane: claim and heartbeat RPC
//! latency (client side), points acked per second, and whether any job was finished twice.
//!
//! Runs until SIGTERM or SIGINT, then writes one JSON report to `--out` and exits.
//!
//!   fleet_sim --grpc http://127.0.0.1:7001,http://127.0.0.1:7002 --secret S --redis-url redis://…
//!             --redis-prefix P --workers 1000 --pools a,b --out sim.json

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use lathe_proto::v1::{
    AttemptRef, CheckpointCommit, ClaimJobRequest, ClaimJobResponse, DeviceKind, Fail, FailureClass, Finish, HeartbeatRequest, Hello,
    LeaveRequest, MetricPoint, MetricsBatch, RegisterRequest, WorkerMessage,
};
use lathe_queue::Queue;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

struct Args {
    grpc: Vec<String>,
    secret: String,
    redis_url: String,
    redis_prefix: String,
    workers: usize,
    pools: Vec<String>,
    job_seconds: (f64, f64),
    metrics_seconds: f64,
    points_per_batch: u64,
    crash_rate: f64,
    restart_seconds: f64,
    out: String,
}

const HELP: &str = "fleet_sim --grpc URL[,URL…] --secret FLEET_SECRET --redis-url URL --redis-prefix P --out FILE
  [--workers 1000] [--pools default] [--job-seconds 20:60] [--metrics-seconds 5]
  [--points-per-batch 10] [--crash-rate 0.01] [--restart-seconds 5]";

fn args() -> Args {
    let mut a = Args {
        grpc: Vec::new(),
        secret: String::new(),
        redis_url: String::new(),
        redis_prefix: String::new(),
        workers: 1000,
        pools: vec!["default".into()],
        job_seconds: (20.0, 60.0),
        metrics_seconds: 5.0,
        points_per_batch: 10,
        crash_rate: 0.01,
        restart_seconds: 5.0,
        out: String::new(),
    };
    let mut argv = std::env::args().skip(1);
    let bad = |flag: &str, value: &str| -> ! { panic!("{flag}: cannot use {value:?}\n{HELP}") };
    while let Some(flag) = argv.next() {
        if flag == "--help" || flag == "-h" {
            println!("{HELP}");
            std::process::exit(0);
        }
        let value = argv.next().unwrap_or_else(|| panic!("{flag} needs a value\n{HELP}"));
        let number = |v: &str| v.parse::<f64>().unwrap_or_else(|_| bad(&flag, v));
        match flag.as_str() {
            "--grpc" => a.grpc = value.split(',').map(str::to_string).collect(),
            "--secret" => a.secret = value,
            "--redis-url" => a.redis_url = value,
            "--redis-prefix" => a.redis_prefix = value,
            "--workers" => a.workers = value.parse().unwrap_or_else(|_| bad(&flag, &value)),
            "--pools" => a.pools = value.split(',').map(str::to_string).collect(),
            "--job-seconds" => {
                let (lo, hi) = value.split_once(':').unwrap_or_else(|| bad(&flag, &value));
                a.job_seconds = (number(lo), number(hi));
            }
            "--metrics-seconds" => a.metrics_seconds = number(&value),
            "--points-per-batch" => a.points_per_batch = value.parse().unwrap_or_else(|_| bad(&flag, &value)),
            "--crash-rate" => a.crash_rate = number(&value),
            "--restart-seconds" => a.restart_seconds = number(&value),
            "--out" => a.out = value,
            other => panic!("unknown argument {other}\n{HELP}"),
        }
    }
    if a.grpc.is_empty() || a.secret.is_empty() || a.redis_url.is_empty() || a.out.is_empty() {
        panic!("--grpc, --secret, --redis-url and --out are required\n{HELP}");
    }
    a
}

/// What every simulated worker adds to; the report is made of it.
#[derive(Default)]
struct Stats {
    claim_ms: Mutex<Vec<f64>>,
    heartbeat_ms: Mutex<Vec<f64>>,
    /// From the end of a worker's previous attempt (or its start) to its next successful claim,
    /// while jobs were queued: how long a free worker stays idle.
    refill_ms: Mutex<Vec<f64>>,
    /// Acked Finish per job: more than one is a job run to the end twice.
    finished: Mutex<HashMap<String, u32>>,
    points_acked: AtomicU64,
    claims: AtomicU64,
    claims_empty: AtomicU64,
    crashes: AtomicU64,
    preempted: AtomicU64,
    lease_lost: AtomicU64,
    enrolments: AtomicU64,
    rpc_errors: AtomicU64,
    stream_errors: AtomicU64,
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

type Client = WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

fn client(channel: &Channel, token: &str) -> Client {
    let header: MetadataValue<Ascii> = format!("Bearer {token}").parse().expect("printable token");
    WorkerServiceClient::with_interceptor(channel.clone(), Bearer(header))
}

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    let stats = Arc::new(Stats::default());
    let queue = Arc::new(Queue::open(&args.redis_url, &args.redis_prefix).await.expect("Redis reachable"));
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.workers {
        let endpoint = Endpoint::from_shared(args.grpc[i % args.grpc.len()].clone()).expect("a gRPC URL");
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        let (args, stats, queue, stop) = (args.clone(), stats.clone(), queue.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { worker(i, channel, args, stats, queue, stop).await }));
        // Enrolments arrive over a second or two, as pilots starting, not all in one instant.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let report = report(&args, &stats, started.elapsed());
    std::fs::write(&args.out, serde_json::to_string_pretty(&report).expect("JSON")).expect("write the report");
}

fn percentiles(samples: &Mutex<Vec<f64>>) -> serde_json::Value {
    let mut v = samples.lock().expect("stats").clone();
    if v.is_empty() {
        return serde_json::json!({"n": 0});
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| (v[((v.len() - 1) as f64 * q).round() as usize] * 100.0).round() / 100.0;
    serde_json::json!({"n": v.len(), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)})
}

fn report(args: &Args, stats: &Stats, elapsed: Duration) -> serde_json::Value {
    let finished = stats.finished.lock().expect("stats");
    let twice: Vec<&String> = finished.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    let points = stats.points_acked.load(Ordering::Relaxed);
    serde_json::json!({
        "workers": args.workers,
        "controllers": args.grpc.len(),
        "seconds": elapsed.as_secs_f64(),
        "claim_rpc_ms": percentiles(&stats.claim_ms),
        "heartbeat_rpc_ms": percentiles(&stats.heartbeat_ms),
        "idle_worker_refill_ms": percentiles(&stats.refill_ms),
        "claims": stats.claims.load(Ordering::Relaxed),
        "claims_found_nothing": stats.claims_empty.load(Ordering::Relaxed),
        "jobs_finished": finished.len(),
        "jobs_finished_twice": twice.len(),
        "jobs_finished_twice_ids": twice.iter().take(20).collect::<Vec<_>>(),
        "points_acked": points,
        "points_per_second": points as f64 / elapsed.as_secs_f64(),
        "crashes": stats.crashes.load(Ordering::Relaxed),
        "preempted": stats.preempted.load(Ordering::Relaxed),
        "lease_lost": stats.lease_lost.load(Ordering::Relaxed),
        "enrolments": stats.enrolments.load(Ordering::Relaxed),
        "rpc_errors": stats.rpc_errors.load(Ordering::Relaxed),
        "stream_errors": stats.stream_errors.load(Ordering::Relaxed),
    })
}

/// One simulated worker: lives (enrol … crash) until the stop.
async fn worker(i: usize, channel: Channel, args: Arc<Args>, stats: Arc<Stats>, queue: Arc<Queue>, mut stop: watch::Receiver<bool>) {
    let pool = args.pools[i % args.pools.len()].clone();
    let mut life = 0;
    while !*stop.borrow() {
        life += 1;
        match live(i, life, &pool, &channel, &args, &stats, &queue, stop.clone()).await {
            Life::Stopped => return,
            Life::Crashed => {
                stats.crashes.fetch_add(1, Ordering::Relaxed);
                let restart = Duration::from_secs_f64(args.restart_seconds);
                tokio::select! { _ = tokio::time::sleep(restart) => {}, _ = stop.changed() => return }
            }
        }
    }
}

enum Life {
    Stopped,
    Crashed,
}

/// How an attempt ended, for the worker's loop.
enum Ended {
    Done,
    Crashed,
    Stopped,
}

#[allow(clippy::too_many_arguments)]
async fn live(
    i: usize,
    life: u32,
    pool: &str,
    channel: &Channel,
    args: &Args,
    stats: &Arc<Stats>,
    queue: &Queue,
    mut stop: watch::Receiver<bool>,
) -> Life {
    // Enrol with the fleet secret; from then on speak with the instance's own token.
    let registration = RegisterRequest {
        name: format!("sim-{i}-{life}"),
        device_kind: DeviceKind::Cpu as i32,
        pools: vec![pool.to_string()],
        version: "fleet-sim".into(),
        gpus: 1,
        nodes: 1,
        ..Default::default()
    };
    let registered = loop {
        match client(channel, &args.secret).register(registration.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(status) => {
                stats.rpc_errors.fetch_add(1, Ordering::Relaxed);
                if status.code() == Code::PermissionDenied || status.code() == Code::Unauthenticated {
                    panic!("enrolment refused: {status}");
                }
                tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => {}, _ = stop.changed() => return Life::Stopped }
            }
        }
    };
    stats.enrolments.fetch_add(1, Ordering::Relaxed);
    let mut rpc = client(channel, &registered.worker_token);
    let heartbeat_every = Duration::from_millis(registered.heartbeat_interval_ms.max(100) as u64);

    // The heartbeat lives as long as this life: a crash ends it with everything else.
    let running: Arc<Mutex<Option<AttemptRef>>> = Arc::default();
    let (lost_tx, lost_rx) = watch::channel(None::<AttemptRef>);
    let (alive_tx, alive) = watch::channel(true);
    tokio::spawn(heartbeat(rpc.clone(), heartbeat_every, running.clone(), lost_tx, stats.clone(), alive));
    let _end_heartbeat = Guard(alive_tx);

    let mut free_since = Instant::now();
    let pools = [pool];
    loop {
        if *stop.borrow() {
            let _ = rpc.leave(LeaveRequest { reason: "stopped".into() }).await;
            return Life::Stopped;
        }
        let woken = tokio::select! {
            woken = queue.wait_for_job(&pools, Duration::from_secs(5)) => woken,
            _ = stop.changed() => continue,
        };
        let job_id = match woken {
            Ok(Some(job)) => job.job_id.as_str().to_string(),
            Ok(None) => String::new(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                String::new()
            }
        };
        let sent = Instant::now();
        let claim = match rpc.claim_job(ClaimJobRequest { job_id }).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if matches!(status.code(), Code::NotFound | Code::Aborted | Code::FailedPrecondition) {
                    stats.claims_empty.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.rpc_errors.fetch_add(1, Ordering::Relaxed);
                }
                // Nothing to take: this worker is idle, not waiting on a full queue.
                free_since = Instant::now();
                continue;
            }
        };
        stats.claim_ms.lock().expect("stats").push(sent.elapsed().as_secs_f64() * 1000.0);
        stats.refill_ms.lock().expect("stats").push(free_since.elapsed().as_secs_f64() * 1000.0);
        stats.claims.fetch_add(1, Ordering::Relaxed);
        let reference = AttemptRef { job_id: claim.job_id.clone(), attempt: claim.attempt };
        *running.lock().expect("running") = Some(reference.clone());
        let crash_at = rand::rng().random_bool(args.crash_rate.clamp(0.0, 1.0)).then(|| rand::rng().random_range(0.1..0.9));
        let ended = attempt(&mut rpc, claim, args, stats, crash_at, lost_rx.clone(), stop.clone()).await;
        *running.lock().expect("running") = None;
        free_since = Instant::now();
        match ended {
            Ended::Done => {}
            Ended::Crashed => return Life::Crashed,
            Ended::Stopped => {
                let _ = rpc.leave(LeaveRequest { reason: "stopped".into() }).await;
                return Life::Stopped;
            }
        }
    }
}

/// Ends the heartbeat task when the life that spawned it ends.
struct Guard(watch::Sender<bool>);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.send(false);
    }
}

async fn heartbeat(
    mut rpc: Client,
    every: Duration,
    running: Arc<Mutex<Option<AttemptRef>>>,
    lost: watch::Sender<Option<AttemptRef>>,
    stats: Arc<Stats>,
    mut alive: watch::Receiver<bool>,
) {
    // Spread the first beat over the interval, as workers that started at different times.
    let offset = every.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::select! { _ = tokio::time::sleep(offset) => {}, _ = alive.changed() => return }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = alive.changed() => return,
        }
        let current: Vec<AttemptRef> = running.lock().expect("running").iter().cloned().collect();
        let sent = Instant::now();
        match rpc.heartbeat(HeartbeatRequest { running: current, ..Default::default() }).await {
            Ok(r) => {
                stats.heartbeat_ms.lock().expect("stats").push(sent.elapsed().as_secs_f64() * 1000.0);
                if let Some(gone) = r.into_inner().lost.into_iter().next() {
                    let _ = lost.send(Some(gone));
                }
            }
            Err(_) => {
                stats.rpc_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The steps of a job: 1 step per `points_per_batch`-th of a metrics interval, over a duration
/// drawn from the job id (the same for every attempt of the job).
fn job_steps(job_id: &str, args: &Args) -> u64 {
    let hash = job_id.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let fraction = (hash % 10_000) as f64 / 10_000.0;
    let seconds = args.job_seconds.0 + (args.job_seconds.1 - args.job_seconds.0) * fraction;
    ((seconds / args.metrics_seconds).ceil() as u64).max(1) * args.points_per_batch
}

/// One attempt, as `lathe worker` runs it: messages wait in an outbox until acked, and a stream
/// that fails (the controller restarting, or too busy to answer) is opened again with the same
/// Hello and the unacked messages sent again, until the job ends or the lease is lost.
async fn attempt(
    rpc: &mut Client,
    claim: ClaimJobResponse,
    args: &Args,
    stats: &Arc<Stats>,
    crash_at: Option<f64>,
    mut lost: watch::Receiver<Option<AttemptRef>>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let total = job_steps(&claim.job_id, args);
    let mut step = claim.resume_from.as_ref().map_or(0, |c| c.step);
    let crash_step = crash_at.map(|f| (total as f64 * f) as u64);
    let hello = WorkerMessage { seq: 0, body: Some(Up::Hello(Hello { job_id: claim.job_id.clone(), attempt: claim.attempt })) };
    // Unacked messages with the points each carries, oldest first.
    let mut outbox: std::collections::VecDeque<(WorkerMessage, u64)> = Default::default();
    let mut seq = 0u64;
    let mut finish_seq = None;
    let mut handing_back = None::<Ended>;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.metrics_seconds));
    tick.tick().await;
    'session: loop {
        // (Re)open the stream: Hello, then everything not acked yet.
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.send(hello.clone()).await;
        for (message, _) in &outbox {
            let _ = tx.send(message.clone()).await;
        }
        let mut inbound = match rpc.attempt(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'session,
                    _ = lost.changed() => {
                        if lost.borrow().as_ref().is_some_and(|l| l.job_id == claim.job_id && l.attempt == claim.attempt) {
                            stats.lease_lost.fetch_add(1, Ordering::Relaxed);
                            return Ended::Done;
                        }
                        continue 'session;
                    }
                }
            }
        };
        loop {
            tokio::select! {
                _ = tick.tick(), if finish_seq.is_none() && handing_back.is_none() => {
                    if crash_step.is_some_and(|at| step >= at) {
                        // The process is gone: nothing more is sent, the stream just drops.
                        return Ended::Crashed;
                    }
                    seq += 1;
                    if step >= total {
                        let finish = Finish { trained_tokens: total * 512, ..Default::default() };
                        finish_seq = Some(seq);
                        let message = WorkerMessage { seq, body: Some(Up::Finish(finish)) };
                        outbox.push_back((message.clone(), 0));
                        let _ = tx.send(message).await;
                        continue;
                    }
                    let points: Vec<MetricPoint> = (step + 1..=(step + args.points_per_batch).min(total))
                        .map(|s| MetricPoint {
                            step: s,
                            total_steps: total,
                            train_loss: Some(3.0 / (1.0 + s as f64 * 1e-2)),
                            learning_rate: 1e-4,
                            grad_norm: Some(1.0),
                            tokens_per_second: Some(5000.0),
                            tokens_seen: s * 512,
                            time_unix_ms: now_ms() as i64,
                            ..Default::default()
                        })
                        .collect();
                    step += points.len() as u64;
                    let count = points.len() as u64;
                    let message = WorkerMessage { seq, body: Some(Up::Metrics(MetricsBatch { points })) };
                    outbox.push_back((message.clone(), count));
                    let _ = tx.send(message).await;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => match message.body {
                        Some(Down::Ack(ack)) => {
                            while outbox.front().is_some_and(|(m, _)| m.seq <= ack.seq) {
                                let (_, points) = outbox.pop_front().expect("front");
                                stats.points_acked.fetch_add(points, Ordering::Relaxed);
                            }
                            if finish_seq.is_some_and(|f| ack.seq >= f) {
                                *stats.finished.lock().expect("stats").entry(claim.job_id.clone()).or_default() += 1;
                                return Ended::Done;
                            }
                            if let Some(ended) = handing_back.take().filter(|_| outbox.is_empty()) {
                                return ended;
                            }
                        }
                        Some(Down::Preempt(_)) if handing_back.is_none() => {
                            // Checkpoint at the current step, then hand the job back, as `lathe worker`.
                            stats.preempted.fetch_add(1, Ordering::Relaxed);
                            let path = format!("{}/checkpoints/step-{step}", claim.output_dir);
                            seq += 1;
                            let commit = WorkerMessage { seq, body: Some(Up::Checkpoint(CheckpointCommit { step, path, metrics_json: "{}".into() })) };
                            seq += 1;
                            let fail = Fail { class: FailureClass::Preempted as i32, code: "preempted".into(), message: "yielded to a higher-priority job".into() };
                            let fail = WorkerMessage { seq, body: Some(Up::Fail(fail)) };
                            for message in [commit, fail] {
                                outbox.push_back((message.clone(), 0));
                                let _ = tx.send(message).await;
                            }
                            handing_back = Some(Ended::Done);
                        }
                        Some(Down::LeaseLost(_)) | Some(Down::Cancel(_)) => {
                            stats.lease_lost.fetch_add(1, Ordering::Relaxed);
                            return Ended::Done;
                        }
                        _ => {}
                    },
                    // The controller closed the stream: after the end it acked, or to be reopened.
                    Ok(None) => {
                        if handing_back.is_some() && outbox.is_empty() {
                            return handing_back.take().expect("some");
                        }
                        continue 'session;
                    }
                    Err(_) => {
                        stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue 'session;
                    }
                },
                _ = lost.changed() => {
                    if lost.borrow().as_ref().is_some_and(|l| l.job_id == claim.job_id && l.attempt == claim.attempt) {
                        stats.lease_lost.fetch_add(1, Ordering::Relaxed);
                        return Ended::Done;
                    }
                }
                _ = stop.changed(), if handing_back.is_none() => {
                    // SIGTERM, as `lathe worker`: hand the job back from the current step.
                    seq += 1;
                    let fail = Fail { class: FailureClass::Preempted as i32, code: "preempted".into(), message: "simulator stopping".into() };
                    let _ = tx.send(WorkerMessage { seq, body: Some(Up::Fail(fail)) }).await;
                    drain(&mut inbound).await;
                    return Ended::Stopped;
                }
            }
        }
    }
}

/// Reads what the controller still sends until it closes the stream (or a short while).
async fn drain(inbound: &mut tonic::Streaming<lathe_proto::v1::ControllerMessage>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = inbound.message().await {} }).await;
}
