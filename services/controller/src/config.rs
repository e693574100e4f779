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
    pub retry: RetryPolicy,
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
    /// TLS on the worker gRPC listener; None = plaintext (a private network, or a proxy).
    pub grpc_tls: Option<GrpcTls>,
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
            retry: RetryPolicy::default(),
            max_db_connections: 16,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            rate_limit_per_minute: 1200,
            metrics_token: None,
            admin_token: None,
            fleet_secret: None,
            grpc_tls: None,
        }
    }
}

/// The fleet `--fleet-secret` creates (and rotates, when the secret changes).
pub const FLEET_FROM_CONFIG: &str = "controller-config";

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/lathe";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
