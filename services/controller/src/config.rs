//! Everything the controller is told at start (flags and `LATHE_*` variables, parsed by the CLI).

use std::path::PathBuf;
use std::time::Duration;

use lathe_store::dispatch::RetryPolicy;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub database_url: String,
    pub redis_url: String,
    /// Key prefix in Redis (`lathe:`); tests use a unique one.
    pub redis_prefix: String,
    pub http_listen: String,
    pub grpc_listen: String,
    /// Uploaded files (`files/<id>`) and job outputs (`jobs/<id>/`): storage the workers share.
    pub data_dir: PathBuf,
    /// Base models, one Hugging Face directory per name.
    pub models_root: PathBuf,
    /// The CTIBench data directory, as the workers see it too: evaluations are checked against
    /// it when they are created. None: only evaluations on the user's own files are accepted.
    pub eval_data_dir: Option<PathBuf>,
    /// Largest accepted upload; larger requests get 413.
    pub max_upload_bytes: usize,
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
    /// Gone workers no attempt names are forgotten after this; `None`: kept forever.
    pub worker_retention: Option<Duration>,
    /// The MLflow tracking server jobs with an `mlflow` integration are logged to; `None`:
    /// such jobs are refused.
    pub mlflow_tracking_uri: Option<String>,
    pub retry: RetryPolicy,
    /// The half-life of a project's recent GPU use in fair share (docs/scheduling.md).
    pub fair_share_half_life: Duration,
    /// Priority preemption (docs/scheduling.md); `None`: off.
    pub preemption: Option<Preemption>,
    pub max_db_connections: u32,
    /// Open REST connections at most; at the cap the oldest idle one is closed.
    pub max_connections: usize,
    /// A request head must arrive within this of connecting (or of the previous response).
    pub header_read_timeout: Duration,
    /// A request must produce its response head within this (uploads and streams excepted).
    pub request_timeout: Duration,
    /// Requests per minute per API key; 0 = unlimited.
    pub rate_limit_per_minute: u32,
    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    pub metrics_token: Option<String>,
    /// The bearer token of the admin endpoints (`/v1/admin/…`: demand per pool, workers);
    /// None = those endpoints are off (403).
    pub admin_token: Option<String>,
    /// A fleet secret worker instances enrol with (stored hashed, as the fleet
    /// [`FLEET_FROM_CONFIG`]); None = only fleets made with `lathe admin create-fleet`.
    pub fleet_secret: Option<String>,
    /// What instances enrolled with `fleet_secret` may do, and how many may live at once.
    pub fleet_terms: lathe_store::fleets::FleetTerms,
    /// TLS on the worker gRPC listener; None = plaintext (a private network, or a proxy).
    pub grpc_tls: Option<GrpcTls>,
    /// Open gRPC connections at most; beyond it a new one is closed at once.
    pub grpc_max_connections: usize,
    /// A new gRPC connection must start talking (the HTTP/2 preface, or TLS) within this.
    pub grpc_handshake_timeout: Duration,
    /// HTTP/2 pings on every gRPC connection this often; one unanswered for as long again
    /// closes the connection (a frozen or vanished worker loses its streams).
    pub grpc_keepalive: Duration,
    /// Calls per minute per worker token; 0 = unlimited.
    pub grpc_rate_limit_per_minute: u32,
    /// Enrolments per minute per fleet secret (per replica); 0 = unlimited.
    pub enrolments_per_minute: u32,
    /// A completion must finish within this, else it is cancelled on its worker and answered
    /// 504 (streamed: an error event).
    pub completion_timeout: Duration,
    /// Event streams (SSE) one API key may hold open at once (per replica); beyond, 429.
    pub max_streams_per_key: usize,
    /// Failed authentications per minute per client address before it gets 429 without a
    /// database lookup.
    pub auth_failures_per_minute: u32,
}

/// When a running job may be asked to make room for a higher-priority one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preemption {
    /// A job runs at least this long (in its current attempt) before it may be preempted.
    pub min_run: Duration,
    /// A worker asked to hand its job back has this long; then the job is taken back as from
    /// a lost worker.
    pub grace: Duration,
}

impl Default for Preemption {
    fn default() -> Preemption {
        Preemption { min_run: Duration::from_secs(60), grace: Duration::from_secs(300) }
    }
}

/// The gRPC listener's certificate and key (PEM), and, for mutual TLS, the CA whose
/// certificates workers must present.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ControllerConfig {
    /// Defaults for a single machine: Postgres and Redis on localhost, data in `./lathe-data`.
    pub fn local(data_dir: PathBuf) -> Self {
        ControllerConfig {
            database_url: DEFAULT_DATABASE_URL.into(),
            redis_url: DEFAULT_REDIS_URL.into(),
            redis_prefix: lathe_queue::DEFAULT_KEY_PREFIX.into(),
            http_listen: "127.0.0.1:8080".into(),
            grpc_listen: "127.0.0.1:50051".into(),
            models_root: data_dir.join("models"),
            eval_data_dir: None,
            data_dir,
            max_upload_bytes: 512 * 1024 * 1024,
            lease: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(5),
            worker_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            mlflow_tracking_uri: None,
            retry: RetryPolicy::default(),
            fair_share_half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
            preemption: Some(Preemption::default()),
            max_db_connections: 16,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            rate_limit_per_minute: 1200,
            metrics_token: None,
            admin_token: None,
            fleet_secret: None,
            fleet_terms: lathe_store::fleets::FleetTerms::default(),
            grpc_tls: None,
            grpc_max_connections: 2048,
            grpc_handshake_timeout: Duration::from_secs(10),
            grpc_keepalive: Duration::from_secs(10),
            grpc_rate_limit_per_minute: 1200,
            enrolments_per_minute: 120,
            completion_timeout: Duration::from_secs(600),
            max_streams_per_key: 32,
            auth_failures_per_minute: 60,
        }
    }
}

/// The fleet `--fleet-secret` creates (and rotates, when the secret changes).
pub const FLEET_FROM_CONFIG: &str = "controller-config";

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/lathe";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
