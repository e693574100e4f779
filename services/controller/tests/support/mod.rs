//! A real controller in this process (real sockets, Postgres and Redis on localhost, a
//! database of its own) and workers that speak the protocol by hand.

#![allow(dead_code)]

use std::time::Duration;

use lathe_controller::{BoundController, ControllerConfig};
use lathe_core::{CreateJobRequest, JobSpec};
use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use lathe_proto::v1::{ControllerMessage, Hello, MetricPoint, MetricsBatch, WorkerMessage};
use lathe_store::files::{insert_file, new_file_id, NewFile, PURPOSE_FINE_TUNE};
use lathe_store::workers::{register_worker, Grant, NewWorker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Streaming};

pub type Worker = WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct Harness {
    pub state: lathe_controller::AppState,
    pub grpc: String,
    pub http: std::net::SocketAddr,
    db_name: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    /// A controller whose configuration `tune` adjusts first.
    pub async fn start_with(tune: impl FnOnce(&mut ControllerConfig)) -> Harness {
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
        tune(&mut config);
        let bound = BoundController::bind(config).await.expect("controller starts (Postgres and Redis on localhost)");
        let (state, grpc) = (bound.state.clone(), format!("http://{}", bound.grpc_addr));
        let http = bound.http_addr;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Harness { state, grpc, http, db_name, _stop: stop }
    }

    /// A training worker with a token of its own.
    pub async fn worker(&self, name: &str) -> Worker {
        let token = self.token(name, false, &Grant::default()).await;
        client(&self.grpc, &token).await
    }

    /// A worker row with `grant`; its token.
    pub async fn token(&self, name: &str, serving: bool, grant: &Grant) -> String {
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
                serving,
            },
            grant,
        )
        .await
        .unwrap();
        registered.token
    }

    /// A queued job on the fake base model, with a stored training file.
    pub async fn job(&self) -> String {
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

    pub async fn drop_database(self) {
        self.state.pool.close().await;
        let admin = lathe_store::PgPoolOptions::new().max_connections(1).connect(ADMIN_URL).await.unwrap();
        let _ = sqlx_drop(&admin, &self.db_name).await;
    }
}

async fn sqlx_drop(admin: &lathe_store::PgPool, name: &str) -> Result<(), lathe_store::StoreError> {
    lathe_store::execute(admin, &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
}

pub async fn client(url: &str, token: &str) -> Worker {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    WorkerServiceClient::with_interceptor(channel, Auth(format!("Bearer {token}").parse().unwrap()))
}

pub fn metrics(seq: u64, step: u64) -> WorkerMessage {
    let point = MetricPoint { step, total_steps: 10, train_loss: Some(3.0 - step as f64 * 0.1), ..Default::default() };
    WorkerMessage { seq, body: Some(Up::Metrics(MetricsBatch { points: vec![point] })) }
}

/// Opens an Attempt stream with its Hello; returns the sender and the controller's messages.
pub async fn open(worker: &mut Worker, job_id: &str, attempt: u32) -> (mpsc::UnboundedSender<WorkerMessage>, Streaming<ControllerMessage>) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WorkerMessage { seq: 0, body: Some(Up::Hello(Hello { job_id: job_id.into(), attempt })) }).unwrap();
    let inbound = worker.attempt(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, inbound)
}

pub async fn next(inbound: &mut Streaming<ControllerMessage>) -> Down {
    tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("controller answers").unwrap().unwrap().body.unwrap()
}
