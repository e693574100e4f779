//! The controller's command line, shared by the torch-free `lathe-controller` binary and by
//! `lathe controller` / `lathe up` in the full `lathe` binary: the flags, their `LATHE_*`
//! variables, and the run loop (signals, bind, serve).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use crate::{BoundController, ControllerConfig, ControllerError};

/// Where Postgres is: the controller and admin commands (workers never see it).
#[derive(Args, Clone)]
pub struct Database {
    /// Postgres URL; the database is created if missing and migrated on start.
    #[arg(long, env = "LATHE_DATABASE_URL", default_value = crate::config::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

impl Database {
    /// The small pool one `lathe admin …` command needs.
    pub async fn connect_for_admin(&self) -> Result<lathe_store::PgPool, lathe_store::StoreError> {
        lathe_store::connect(&self.database_url, 2, "lathe-admin").await
    }
}

/// Where Redis is: the controller publishes job ids there, workers wait on them.
#[derive(Args, Clone)]
pub struct Redis {
    /// Redis URL (job wake-ups only; Postgres is the record).
    #[arg(long, env = "LATHE_REDIS_URL", default_value = crate::config::DEFAULT_REDIS_URL)]
    pub redis_url: String,
    /// Prefix of Lathe's Redis keys.
    #[arg(long, env = "LATHE_REDIS_PREFIX", default_value = "lathe:")]
    pub redis_prefix: String,
}

#[derive(Args, Clone)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub database: Database,
    #[command(flatten)]
    pub redis: Redis,
    /// REST API, /metrics, /healthz, /readyz.
    #[arg(long, env = "LATHE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: String,
    /// gRPC for workers.
    #[arg(long, env = "LATHE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: String,
    /// Uploaded files and job outputs; must be shared with the workers.
    #[arg(long, env = "LATHE_DATA_DIR", default_value = "lathe-data")]
    pub data_dir: PathBuf,
    /// Base models, one Hugging Face directory per name [default: DATA_DIR/models].
    #[arg(long, env = "LATHE_MODELS_ROOT")]
    pub models_root: Option<PathBuf>,
    /// Largest accepted upload, in bytes (larger requests get 413).
    #[arg(long, env = "LATHE_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_upload_bytes: usize,
    /// Postgres connections this controller's pool opens at most (idle ones close after a
    /// minute; the leader holds one more for the reconciler lock). Keep replicas × (this + 1)
    /// below the server's max_connections.
    #[arg(long, env = "LATHE_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// Open REST connections at most; at the cap a new one closes the oldest idle one.
    #[arg(long, env = "LATHE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A client must send its request head within this many seconds of connecting (or of its
    /// previous response on a kept-alive connection), else the connection is closed.
    #[arg(long, env = "LATHE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub header_read_timeout_seconds: f64,
    /// A request must be answered within this many seconds (uploads and streams excepted),
    /// else 503 with Retry-After.
    #[arg(long, env = "LATHE_REQUEST_TIMEOUT_SECONDS", default_value_t = 120.0)]
    pub request_timeout_seconds: f64,
    /// Requests per minute per API key, in bursts of ten seconds' worth (429 with Retry-After
    /// beyond); 0 = unlimited. Counted per controller replica.
    #[arg(long, env = "LATHE_RATE_LIMIT_PER_MINUTE", default_value_t = 1200)]
    pub rate_limit_per_minute: u32,
    /// Require 'Authorization: Bearer <token>' on /metrics (job ids and loss curves are in it);
    /// unset, /metrics is open to anyone who reaches the port.
    #[arg(long, env = "LATHE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Require 'Authorization: Bearer <token>' on /v1/admin/… (demand per pool for
    /// autoscalers, the worker list); unset, those endpoints answer 403.
    #[arg(long, env = "LATHE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A shared secret any number of worker instances enrol with, each getting its own identity
    /// (give it to workers as LATHE_WORKER_TOKEN); rotating it leaves enrolled workers running.
    /// More fleets: `lathe admin create-fleet`.
    #[arg(long, env = "LATHE_FLEET_SECRET", hide_env_values = true)]
    pub fleet_secret: Option<String>,
    /// Pools that workers enrolled with --fleet-secret may serve, comma-separated [default: any].
    #[arg(long, env = "LATHE_FLEET_POOLS", value_delimiter = ',')]
    pub fleet_pools: Option<Vec<String>>,
    /// What workers enrolled with --fleet-secret may do: training (jobs and evaluations),
    /// serving (inference, `lathe worker --serve`), or both, comma-separated.
    #[arg(long, env = "LATHE_FLEET_ROLES", value_delimiter = ',', default_value = "training")]
    pub fleet_roles: Vec<String>,
    /// Live workers enrolled with --fleet-secret at most (a flood of enrolments is refused
    /// beyond it) [default: no cap].
    #[arg(long, env = "LATHE_FLEET_MAX_WORKERS")]
    pub fleet_max_workers: Option<u32>,
    /// Enrolments per minute per fleet secret, per controller replica; 0 = unlimited.
    #[arg(long, env = "LATHE_ENROLMENTS_PER_MINUTE", default_value_t = 120)]
    pub enrolments_per_minute: u32,
    /// Open gRPC (worker) connections at most; beyond it a new connection is closed at once.
    /// Kept apart from --max-connections, so nothing done to one port reaches the other.
    #[arg(long, env = "LATHE_GRPC_MAX_CONNECTIONS", default_value_t = 2048)]
    pub grpc_max_connections: usize,
    /// A new gRPC connection must start talking (HTTP/2 preface, or TLS) within this many
    /// seconds, else it is closed.
    #[arg(long, env = "LATHE_GRPC_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub grpc_handshake_timeout_seconds: f64,
    /// HTTP/2 keepalive pings on worker connections this often; a ping unanswered for as long
    /// closes the connection (a frozen worker loses its streams and its requests fail over).
    #[arg(long, env = "LATHE_GRPC_KEEPALIVE_SECONDS", default_value_t = 10.0)]
    pub grpc_keepalive_seconds: f64,
    /// gRPC calls per minute per worker token (RESOURCE_EXHAUSTED beyond); 0 = unlimited.
    #[arg(long, env = "LATHE_GRPC_RATE_LIMIT_PER_MINUTE", default_value_t = 1200)]
    pub grpc_rate_limit_per_minute: u32,
    /// A chat or text completion must finish within this many seconds, else it is cancelled
    /// on its worker and answered 504.
    #[arg(long, env = "LATHE_COMPLETION_TIMEOUT_SECONDS", default_value_t = 600.0)]
    pub completion_timeout_seconds: f64,
    /// Streams (job event SSE, streamed completions) one API key may hold open at once, per
    /// replica (429 beyond).
    #[arg(long, env = "LATHE_MAX_STREAMS_PER_KEY", default_value_t = 32)]
    pub max_streams_per_key: usize,
    /// Requests with unknown API keys a client address may make per minute before it gets 429
    /// without a database lookup; 0 = unlimited.
    #[arg(long, env = "LATHE_AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,
    /// TLS on the worker gRPC port: the controller's certificate (PEM); workers then use
    /// https://. Without it gRPC is plaintext (keep it on a private network).
    #[arg(long, env = "LATHE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// The key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "LATHE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Mutual TLS: workers must present a certificate signed by this CA (PEM).
    #[arg(long, env = "LATHE_GRPC_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_client_ca: Option<PathBuf>,
    /// A worker that sends no heartbeat for this long loses its job (requeued).
    #[arg(long, default_value_t = 60.0)]
    pub lease_seconds: f64,
    /// How often workers send heartbeats.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_seconds: f64,
    /// How often the reconciler requeues expired leases and re-publishes queued jobs.
    #[arg(long, default_value_t = 5.0)]
    pub reconcile_seconds: f64,
    /// Workers gone (left, revoked, or silent) for longer than this many hours, and named by no
    /// attempt, are forgotten; those that ran attempts stay, archived, so attempt history keeps
    /// saying where it ran. 0 keeps every worker.
    #[arg(long, env = "LATHE_WORKER_RETENTION_HOURS", default_value_t = 168.0)]
    pub worker_retention_hours: f64,
    /// MLflow tracking server (http://host:5000) that jobs with an `mlflow` integration are
    /// logged to by this controller: params, every metric step, result files, end status.
    #[arg(long, env = "LATHE_MLFLOW_TRACKING_URI")]
    pub mlflow_tracking_uri: Option<String>,
    /// Crashes a job may have before it fails as poison.
    #[arg(long, default_value_t = 3)]
    pub max_retries: i32,
    /// Backoff after a crash, doubled for each further crash.
    #[arg(long, default_value_t = 10.0)]
    pub retry_backoff_seconds: f64,
    /// Fair share between projects: how fast a project's past GPU use stops counting against
    /// it (the half-life of its recent GPU-seconds; docs/scheduling.md).
    #[arg(long, default_value_t = 3600.0)]
    pub fair_share_half_life_seconds: f64,
    /// Priority preemption: `priority` lets a queued job that no idle worker can take ask the
    /// worker of a lower-priority running job in its pool to checkpoint and hand it back (it
    /// resumes later with the same losses, no retry spent); `off` never preempts.
    #[arg(long, value_enum, default_value = "priority")]
    pub preemption: PreemptionMode,
    /// A job runs at least this long before it may be preempted (stops thrashing).
    #[arg(long, default_value_t = 60.0)]
    pub preempt_after_seconds: f64,
    /// A worker asked to hand a job back has this long to checkpoint; then the job is taken
    /// back as from a lost worker (from its last checkpoint).
    #[arg(long, default_value_t = 300.0)]
    pub preempt_grace_seconds: f64,
    /// The CTIBench data directory (not shipped: CC BY-NC-SA 4.0), as the workers see it:
    /// evaluations on cti-* benchmarks are checked against it at create [default: none; only
    /// evaluations on the user's own files are accepted].
    #[arg(long, env = "LATHE_EVAL_DATA_DIR")]
    pub eval_data_dir: Option<PathBuf>,
}

/// `--preemption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreemptionMode {
    /// Never preempt.
    Off,
    /// A strictly higher priority preempts (after `--preempt-after-seconds`).
    Priority,
}

impl ControllerArgs {
    pub fn config(&self) -> Result<ControllerConfig, ControllerError> {
        let seconds = |name: &str, s: f64| {
            if !(s > 0.0 && s.is_finite()) {
                return Err(ControllerError::Config(format!("--{name} must be a positive number of seconds, got {s}")));
            }
            Ok(Duration::from_secs_f64(s))
        };
        let mut config = ControllerConfig::local(self.data_dir.clone());
        config.database_url = self.database.database_url.clone();
        config.redis_url = self.redis.redis_url.clone();
        config.redis_prefix = self.redis.redis_prefix.clone();
        config.http_listen = self.http_listen.clone();
        config.grpc_listen = self.grpc_listen.clone();
        config.models_root = self.models_root.clone().unwrap_or_else(|| self.data_dir.join("models"));
        config.max_upload_bytes = self.max_upload_bytes;
        config.eval_data_dir = self.eval_data_dir.clone();
        if self.max_connections == 0 {
            return Err(ControllerError::Config("--max-connections must be at least 1".into()));
        }
        config.max_connections = self.max_connections;
        if self.database_max_connections == 0 {
            return Err(ControllerError::Config("--database-max-connections must be at least 1".into()));
        }
        config.max_db_connections = self.database_max_connections;
        config.header_read_timeout = seconds("header-read-timeout-seconds", self.header_read_timeout_seconds)?;
        config.request_timeout = seconds("request-timeout-seconds", self.request_timeout_seconds)?;
        config.rate_limit_per_minute = self.rate_limit_per_minute;
        config.metrics_token = self.metrics_token.clone().filter(|t| !t.is_empty());
        config.admin_token = self.admin_token.clone().filter(|t| !t.is_empty());
        config.fleet_secret = self.fleet_secret.clone().filter(|t| !t.is_empty());
        if config.fleet_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ControllerError::Config("--fleet-secret must be at least 16 characters (it admits workers)".into()));
        }
        config.fleet_terms = fleet_terms(self.fleet_pools.clone(), &self.fleet_roles, self.fleet_max_workers)
            .map_err(|e| ControllerError::Config(format!("--fleet-{e}")))?;
        config.enrolments_per_minute = self.enrolments_per_minute;
        if self.grpc_max_connections == 0 {
            return Err(ControllerError::Config("--grpc-max-connections must be at least 1".into()));
        }
        config.grpc_max_connections = self.grpc_max_connections;
        config.grpc_handshake_timeout = seconds("grpc-handshake-timeout-seconds", self.grpc_handshake_timeout_seconds)?;
        config.grpc_keepalive = seconds("grpc-keepalive-seconds", self.grpc_keepalive_seconds)?;
        config.grpc_rate_limit_per_minute = self.grpc_rate_limit_per_minute;
        config.completion_timeout = seconds("completion-timeout-seconds", self.completion_timeout_seconds)?;
        if self.max_streams_per_key == 0 {
            return Err(ControllerError::Config("--max-streams-per-key must be at least 1".into()));
        }
        config.max_streams_per_key = self.max_streams_per_key;
        config.auth_failures_per_minute = self.auth_failures_per_minute;
        config.grpc_tls = match (&self.grpc_tls_cert, &self.grpc_tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::config::GrpcTls { cert: cert.clone(), key: key.clone(), client_ca: self.grpc_client_ca.clone() })
            }
            _ => None,
        };
        config.lease = seconds("lease-seconds", self.lease_seconds)?;
        config.heartbeat_interval = seconds("heartbeat-seconds", self.heartbeat_seconds)?;
        config.reconcile_interval = seconds("reconcile-seconds", self.reconcile_seconds)?;
        config.worker_retention = match self.worker_retention_hours {
            0.0 => None,
            hours => Some(seconds("worker-retention-hours", hours * 3600.0)?),
        };
        config.mlflow_tracking_uri = match &self.mlflow_tracking_uri {
            Some(uri) if !(uri.starts_with("http://") || uri.starts_with("https://")) => {
                return Err(ControllerError::Config(format!("mlflow-tracking-uri: {uri:?} is not an http(s):// URL")))
            }
            other => other.clone(),
        };
        config.retry.max_retries = self.max_retries;
        config.retry.base_backoff = seconds("retry-backoff-seconds", self.retry_backoff_seconds)?;
        config.fair_share_half_life = seconds("fair-share-half-life-seconds", self.fair_share_half_life_seconds)?;
        let preemption = crate::config::Preemption {
            min_run: seconds("preempt-after-seconds", self.preempt_after_seconds)?,
            grace: seconds("preempt-grace-seconds", self.preempt_grace_seconds)?,
        };
        config.preemption = (self.preemption == PreemptionMode::Priority).then_some(preemption);
        if config.heartbeat_interval >= config.lease {
            return Err(ControllerError::Config("--heartbeat-seconds must be shorter than --lease-seconds".into()));
        }
        Ok(config)
    }
}

/// What a fleet's instances may do, from flags (`lathe admin create-fleet` and the
/// controller's `--fleet-*`); the error names the flag's suffix (`pools: …`, `roles: …`).
pub fn fleet_terms(
    pools: Option<Vec<String>>,
    roles: &[String],
    max_workers: Option<u32>,
) -> Result<lathe_store::fleets::FleetTerms, String> {
    use lathe_store::workers::{Grant, ROLES};
    let pools = pools.map(|pools| pools.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect::<Vec<_>>());
    for pool in pools.iter().flatten() {
        lathe_queue::Pool::parse(pool).map_err(|e| format!("pools: {e}"))?;
    }
    let mut granted: Vec<String> = Vec::new();
    for role in roles.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        if !ROLES.contains(&role) {
            return Err(format!("roles: {role:?} is not a role; use training, serving or both"));
        }
        if !granted.iter().any(|r| r == role) {
            granted.push(role.to_string());
        }
    }
    if granted.is_empty() {
        return Err("roles: name at least one of training, serving".into());
    }
    let max_workers = match max_workers {
        Some(0) => return Err("max-workers: must be at least 1".into()),
        Some(n) => Some(i32::try_from(n).map_err(|_| "max-workers: too large".to_string())?),
        None => None,
    };
    Ok(lathe_store::fleets::FleetTerms { grant: Grant { pools, roles: granted }, max_workers })
}

/// A channel that turns true on SIGINT or SIGTERM.
pub fn stop_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stop requested");
        let _ = tx.send(true);
        // Keep the sender: receivers that wait for a change would otherwise wake at once, forever.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// `lathe-controller` / `lathe controller`: serve until SIGINT or SIGTERM.
pub fn run(args: &ControllerArgs) -> Result<(), ControllerError> {
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ControllerError::Serve)?;
    runtime.block_on(async move {
        let stop = stop_on_signals().map_err(ControllerError::Serve)?;
        let bound = BoundController::bind(config).await?;
        eprintln!("lathe controller: REST http://{}/v1, gRPC {}", bound.http_addr, bound.grpc_addr);
        bound.serve(stopped(stop)).await
    })
}
