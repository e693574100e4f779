//! The worker protocol against a real controller (in this process, on real sockets) with real
//! Postgres and Redis: fencing by attempt number, seen from the wire.

use std::time::Duration;

use lathe_controller::{BoundController, ControllerConfig};
use lathe_core::{CreateJobRequest, JobSpec};
use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use lathe_proto::v1::{
    AttemptRef, ClaimJobRequest, ControllerMessage, HeartbeatRequest, Hello, MetricPoint, MetricsBatch, RegisterRequest, WorkerMessage,
};
use lathe_store::files::{insert_file, new_file_id, NewFile, PURPOSE_FINE_TUNE};
use lathe_store::workers::{register_worker, NewWorker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

struct Harness {
    state: lathe_controller::AppState,
    grpc: String,
    db_name: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Harness {
        let unique =
            format!("{}_{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        let db_name = format!("lathe_test_grpc_{unique}");
        let data = std::env::temp_dir().join(format!("lathe-grpc-{unique}"));
        std::fs::create_dir_all(data.join("models/tiny")).unwrap();
        std::fs::write(data.join("models/tiny/config.json"), "{}").unwrap();
        let mut config = ControllerConfig::local(data);
        config.database_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
        config.redis_prefix = format!("lathe-test-{unique}:");
        config.http_listen = "127.0.0.1:0".into();
        config.grpc_listen = "127.0.0.1:0".into();
        config.lease = Duration::from_millis(1500);
        config.heartbeat_interval = Duration::from_millis(500);
        config.reconcile_interval = Duration::from_secs(3600); // passes are run by the test
        config.retry.base_backoff = Duration::from_millis(1);
        let bound = BoundController::bind(config).await.expect("controller starts (Postgres and Redis on localhost)");
        let (state, grpc) = (bound.state.clone(), format!("http://{}", bound.grpc_addr));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Harness { state, grpc, db_name, _stop: stop }
    }

    async fn worker(
        &self,
        name: &str,
    ) -> WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>> {
        let pools = vec!["default".to_string()];
        let registered = register_worker(
            &self.state.pool,
            NewWorker {
                name,
                device_kind: "cpu",
                gpu_name: None,
                gpu_memory_bytes: None,
                pools: &pools,
                gpus: 1,
                nodes: 1,
                version: "test",
                slurm_job_id: None,
                pod_name: None,
                serving: false,
            },
        )
        .await
        .unwrap();
        client(&self.grpc, &registered.token).await
    }

    /// A queued job on the fake base model, with a stored training file.
    async fn job(&self) -> String {
        let project = lathe_store::projects::ensure_project(&self.state.pool, "acme").await.unwrap();
        let file_id = new_file_id();
        let bytes = b"{\"text\": \"x\"}\n".repeat(10);
        let sha256 = self.state.storage.write_file(file_id.as_str(), &bytes).unwrap();
        insert_file(
            &self.state.pool,
            NewFile {
                id: file_id.clone(),
                project_id: &project.id,
                purpose: PURPOSE_FINE_TUNE,
                filename: "t.jsonl",
                sha256,
                bytes: bytes.len() as i64,
                summary: None,
            },
        )
        .await
        .unwrap();
        let request = CreateJobRequest::from_value(serde_json::json!({"model": "tiny", "training_file": file_id.as_str()})).unwrap();
        let spec = JobSpec::try_from(request).unwrap();
        let (job, _) = lathe_store::jobs::create_job(&self.state.pool, &project.id, &spec, None).await.unwrap();
        job.id.as_str().to_string()
    }

    async fn drop_database(self) {
        self.state.pool.close().await;
        let admin = lathe_store::PgPoolOptions::new().max_connections(1).connect(ADMIN_URL).await.unwrap();
        let _ = sqlx_drop(&admin, &self.db_name).await;
    }
}

async fn sqlx_drop(admin: &lathe_store::PgPool, name: &str) -> Result<(), lathe_store::StoreError> {
    lathe_store::execute(admin, &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
}

async fn client(
    url: &str,
    token: &str,
) -> WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>> {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    WorkerServiceClient::with_interceptor(channel, move |mut request: Request<()>| {
        request.metadata_mut().insert("authorization", header.clone());
        Ok(request)
    })
}

fn metrics(seq: u64, step: u64) -> WorkerMessage {
    let point = MetricPoint { step, total_steps: 10, train_loss: Some(3.0 - step as f64 * 0.1), ..Default::default() };
    WorkerMessage { seq, body: Some(Up::Metrics(MetricsBatch { points: vec![point] })) }
}

/// Opens an Attempt stream with its Hello; returns the sender and the controller's messages.
async fn open(
    worker: &mut WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>>,
    job_id: &str,
    attempt: u32,
) -> (mpsc::UnboundedSender<WorkerMessage>, Streaming<ControllerMessage>) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WorkerMessage { seq: 0, body: Some(Up::Hello(Hello { job_id: job_id.into(), attempt })) }).unwrap();
    let inbound = worker.attempt(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, inbound)
}

async fn next(inbound: &mut Streaming<ControllerMessage>) -> Down {
    tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("controller answers").unwrap().unwrap().body.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_stale_attempt_is_refused_and_the_worker_told_to_stop() {
    let harness = Harness::start().await;
    let job_id = harness.job().await;
    let mut a = harness.worker("a").await;
    let mut b = harness.worker("b").await;

    let register = RegisterRequest { name: "a".into(), device_kind: 3, pools: vec!["default".into()], ..Default::default() };
    a.register(register).await.unwrap();
    let first = a.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(first.attempt, 1);
    let (a_tx, mut a_in) = open(&mut a, &job_id, 1).await;
    assert!(matches!(next(&mut a_in).await, Down::Ack(ack) if ack.seq == 0), "Hello acked");
    a_tx.send(metrics(1, 1)).unwrap();
    assert!(matches!(next(&mut a_in).await, Down::Ack(ack) if ack.seq == 1), "step 1 acked");

    // Worker a goes silent past its lease (and the reconciler's grace of two heartbeats); the
    // reconciler requeues, worker b claims attempt 2.
    tokio::time::sleep(Duration::from_millis(1500 + 2 * 500 + 300)).await;
    lathe_controller::reconciler::pass(&harness.state).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = b.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(second.attempt, 2);

    // a's late write on its open stream: refused, and a is told it lost the lease.
    a_tx.send(metrics(2, 2)).unwrap();
    assert!(matches!(next(&mut a_in).await, Down::LeaseLost(_)), "stale write must answer LeaseLost");
    // Reconnecting with the old attempt number gets nowhere either.
    let (_tx, mut again) = open(&mut a, &job_id, 1).await;
    assert!(matches!(next(&mut again).await, Down::LeaseLost(_)));
    // Its heartbeat lists the attempt as lost.
    let beat = a
        .heartbeat(HeartbeatRequest { running: vec![AttemptRef { job_id: job_id.clone(), attempt: 1 }], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.lost.len(), 1);
    assert!(beat.renewed.is_empty());

    // b holds the job: its write of step 2 is stored, and the curve has a's step 1 and b's step 2 only.
    let (b_tx, mut b_in) = open(&mut b, &job_id, 2).await;
    assert!(matches!(next(&mut b_in).await, Down::Ack(_)));
    b_tx.send(metrics(1, 2)).unwrap();
    assert!(matches!(next(&mut b_in).await, Down::Ack(ack) if ack.seq == 1));
    let project = lathe_store::projects::get_project_by_name(&harness.state.pool, "acme").await.unwrap();
    let curve =
        lathe_store::progress::list_metrics(&harness.state.pool, &project.id, &lathe_core::JobId::parse(&job_id).unwrap()).await.unwrap();
    assert_eq!(curve.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(curve[1].train_loss, Some(2.8));
    drop((a_tx, b_tx));
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_worker_token_is_unauthenticated() {
    let harness = Harness::start().await;
    let mut stranger = client(&harness.grpc, "lathe-wk-not-a-real-token").await;
    let refused = stranger.claim_job(ClaimJobRequest { job_id: String::new() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = stranger.register(RegisterRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    harness.drop_database().await;
}
