//! Load generator for the service benchmark (scripts/bench_service.sh): many simulated workers
//! stream metric points to a running controller at once, over the real gRPC protocol, and the
//! rate at which the controller makes them durable in Postgres (acked) is measured.
//!
//! It sets up its own project, file, jobs (in pool `bench`, which no real worker serves) and
//! worker tokens directly in the controller's database, claims one job per simulated worker,
//! then each worker sends `--batches` MetricsBatch messages of `--points` points, keeping up to
//! `--window` unacked. Prints one JSON object.
//!
//! `--direct` is the reference: the same points written by the same number of concurrent
//! tasks straight into Postgres with the same store call the controller makes per batch
//! (`record_progress`: metric rows plus one `metrics` event per point, one transaction), no
//! gRPC and no controller in between.

use std::time::{Duration, Instant};

use lathe_core::{CreateJobRequest, JobSpec};
use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use lathe_proto::v1::{ClaimJobRequest, Hello, MetricPoint, MetricsBatch, RegisterRequest, WorkerMessage};
use lathe_store::files::{insert_file, new_file_id, NewFile, PURPOSE_FINE_TUNE};
use lathe_store::workers::{register_worker, NewWorker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

struct Args {
    grpc: String,
    database_url: String,
    workers: usize,
    batches: u64,
    points: u64,
    window: u64,
    direct: bool,
}

fn args() -> Args {
    let mut a = Args { grpc: String::new(), database_url: String::new(), workers: 16, batches: 40, points: 250, window: 4, direct: false };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--direct" {
            a.direct = true;
            continue;
        }
        let value = argv.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--grpc" => a.grpc = value,
            "--database-url" => a.database_url = value,
            "--workers" => a.workers = value.parse().expect("--workers N"),
            "--batches" => a.batches = value.parse().expect("--batches N"),
            "--points" => a.points = value.parse().expect("--points N"),
            "--window" => a.window = value.parse().expect("--window N"),
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    assert!(
        !a.database_url.is_empty() && (a.direct || !a.grpc.is_empty()),
        "--grpc URL (unless --direct) and --database-url URL are required"
    );
    a
}

#[tokio::main]
async fn main() {
    let args = args();
    let pool = lathe_store::connect(&args.database_url, 4, "lathe-ingest-load").await.expect("database");
    let project = lathe_store::projects::ensure_project(&pool, "bench").await.unwrap();
    let file_id = new_file_id();
    insert_file(
        &pool,
        NewFile {
            id: file_id.clone(),
            project_id: &project.id,
            purpose: PURPOSE_FINE_TUNE,
            filename: "bench.jsonl",
            sha256: [0; 32],
            bytes: 0,
            summary: None,
        },
    )
    .await
    .unwrap();
    let request =
        CreateJobRequest::from_value(serde_json::json!({"model": "bench", "training_file": file_id.as_str(), "pool": "bench"})).unwrap();
    let spec = JobSpec::try_from(request).unwrap();
    let pools = vec!["bench".to_string()];
    let mut tokens = Vec::new();
    for i in 0..args.workers {
        lathe_store::jobs::create_job(&pool, &project.id, &spec, None).await.unwrap();
        let name = format!("bench-{i}");
        let worker = register_worker(
            &pool,
            NewWorker {
                name: &name,
                device_kind: "cpu",
                gpu_name: None,
                gpu_memory_bytes: None,
                pools: &pools,
                gpus: 1,
                nodes: 1,
                version: "bench",
                slurm_job_id: None,
                pod_name: None,
                serving: false,
            },
            &lathe_store::workers::Grant::default(),
        )
        .await
        .unwrap();
        tokens.push(worker.token);
    }

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(args.workers + 1));
    let mut tasks = Vec::new();
    let direct_pool = lathe_store::connect(&args.database_url, args.workers as u32 + 2, "lathe-ingest-load").await.unwrap();
    for token in tokens {
        let (grpc, barrier) = (args.grpc.clone(), barrier.clone());
        let (batches, points, window) = (args.batches, args.points, args.window);
        if args.direct {
            let pool = direct_pool.clone();
            tasks.push(tokio::spawn(async move { write_directly(pool, token, barrier, batches, points).await }));
        } else {
            tasks.push(tokio::spawn(async move { simulate(grpc, token, barrier, batches, points, window).await }));
        }
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut acked = 0u64;
    for task in tasks {
        acked += task.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "mode": if args.direct { "direct" } else { "grpc" },
            "workers": args.workers, "points_per_batch": args.points, "batches_per_worker": args.batches,
            "points": acked, "seconds": seconds, "points_per_second": acked as f64 / seconds,
        })
    );
}

/// One simulated worker: claim a bench job, stream its points, wait for every ack.
async fn simulate(
    grpc: String,
    token: String,
    barrier: std::sync::Arc<tokio::sync::Barrier>,
    batches: u64,
    points: u64,
    window: u64,
) -> u64 {
    let channel = Channel::from_shared(grpc).unwrap().connect().await.expect("controller reachable");
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = WorkerServiceClient::with_interceptor(channel, move |mut r: Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    });
    client
        .register(RegisterRequest { name: "bench".into(), device_kind: 3, pools: vec!["bench".into()], ..Default::default() })
        .await
        .unwrap();
    let claim = client.claim_job(ClaimJobRequest { job_id: String::new() }).await.expect("a bench job to claim").into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WorkerMessage { seq: 0, body: Some(Up::Hello(Hello { job_id: claim.job_id.clone(), attempt: claim.attempt })) }).unwrap();
    let mut inbound = client.attempt(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    barrier.wait().await;

    let (mut sent, mut acked) = (0u64, 0u64);
    let batch = |seq: u64| WorkerMessage { seq, body: Some(Up::Metrics(MetricsBatch { points: batch_points(seq, batches, points) })) };
    while acked < batches {
        while sent < batches && sent - acked < window {
            sent += 1;
            tx.send(batch(sent)).unwrap();
        }
        let message = tokio::time::timeout(Duration::from_secs(60), inbound.message()).await.expect("ack within 60 s").unwrap().unwrap();
        match message.body {
            Some(Down::Ack(ack)) => acked = acked.max(ack.seq),
            other => panic!("unexpected controller message {other:?}"),
        }
    }
    batches * points
}

/// The points of message `seq` (1-based): steps (seq-1)·points+1 ..= seq·points.
fn batch_points(seq: u64, batches: u64, points: u64) -> Vec<MetricPoint> {
    let first = (seq - 1) * points + 1;
    (first..first + points)
        .map(|step| MetricPoint {
            step,
            total_steps: batches * points,
            train_loss: Some(3.0 / (1.0 + step as f64 * 1e-3)),
            learning_rate: 1e-4,
            grad_norm: Some(1.0),
            tokens_per_second: Some(1000.0),
            tokens_seen: step * 512,
            time_unix_ms: 0,
            ..Default::default()
        })
        .collect()
}

/// The reference: claim in the store, then the controller's two writes per batch, directly.
async fn write_directly(
    pool: lathe_store::PgPool,
    token: String,
    barrier: std::sync::Arc<tokio::sync::Barrier>,
    batches: u64,
    points: u64,
) -> u64 {
    use lathe_store::dispatch::{claim_job, record_progress, ClaimRequest, EventLevel, NewEvent};
    let worker_id = lathe_store::workers::authenticate_worker(&pool, &token).await.unwrap().unwrap().id;
    let claim = claim_job(
        &pool,
        ClaimRequest {
            worker_id: &worker_id,
            job_id: None,
            lease: Duration::from_secs(600),
            half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
        },
    )
    .await
    .unwrap()
    .expect("a bench job");
    barrier.wait().await;
    for seq in 1..=batches {
        let wire = batch_points(seq, batches, points);
        let rows: Vec<lathe_store::dispatch::MetricPoint> = wire
            .iter()
            .map(|p| lathe_store::dispatch::MetricPoint {
                step: p.step as i64,
                total_steps: Some(p.total_steps as i64),
                train_loss: p.train_loss.map(|v| v as f32),
                learning_rate: Some(p.learning_rate),
                grad_norm: p.grad_norm.map(|v| v as f32),
                tokens_per_second: p.tokens_per_second.map(|v| v as f32),
                tokens_seen: Some(p.tokens_seen as i64),
                ..Default::default()
            })
            .collect();
        let events: Vec<NewEvent> = wire
            .iter()
            .enumerate()
            .map(|(i, p)| NewEvent {
                seq: (seq as i64) * 1024 + i as i64,
                level: EventLevel::Info,
                kind: "metrics".into(),
                message: format!("Step {}/{}: training loss={:.4}", p.step, p.total_steps, p.train_loss.unwrap_or(0.0)),
                data: Some(serde_json::json!({"step": p.step, "total_steps": p.total_steps, "train_loss": p.train_loss})),
            })
            .collect();
        record_progress(&pool, claim.job_id.as_str(), claim.attempt, &rows, &events).await.unwrap();
    }
    batches * points
}
