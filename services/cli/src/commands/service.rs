//! `lathe controller`, `lathe worker` and `lathe up` (both in one process): the service.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lathe_controller::{BoundController, ControllerConfig};
use lathe_trainer::device::report::DeviceReport;
use lathe_worker::WorkerConfig;
use tokio::sync::watch;

/// Where Postgres is: the controller and admin commands (workers never see it).
#[derive(Args, Clone)]
pub struct Database {
    /// Postgres URL; the database is created if missing and migrated on start.
    #[arg(long, env = "LATHE_DATABASE_URL", default_value = lathe_controller::config::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Where Redis is: the controller publishes job ids there, workers wait on them.
#[derive(Args, Clone)]
pub struct Redis {
    /// Redis URL (job wake-ups only; Postgres is the record).
    #[arg(long, env = "LATHE_REDIS_URL", default_value = lathe_controller::config::DEFAULT_REDIS_URL)]
    pub redis_url: String,
    /// Prefix of Lathe's Redis keys.
    #[arg(long, env = "LATHE_REDIS_PREFIX", default_value = "lathe:")]
    pub redis_prefix: String,
}

#[derive(Args, Clone)]
pub struct ControllerArgs {
    #[command(flatten)]
    database: Database,
    #[command(flatten)]
    redis: Redis,
    /// REST API, /metrics, /healthz, /readyz.
    #[arg(long, env = "LATHE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// gRPC for workers.
    #[arg(long, env = "LATHE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: String,
    /// Uploaded files and job outputs; must be shared with the workers.
    #[arg(long, env = "LATHE_DATA_DIR", default_value = "lathe-data")]
    data_dir: PathBuf,
    /// Base models, one Hugging Face directory per name [default: DATA_DIR/models].
    #[arg(long, env = "LATHE_MODELS_ROOT")]
    models_root: Option<PathBuf>,
    /// Largest accepted upload, in bytes (larger requests get 413).
    #[arg(long, env = "LATHE_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    max_upload_bytes: usize,
    /// Open REST connections at most; at the cap a new one closes the oldest idle one.
    #[arg(long, env = "LATHE_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// A client must send its request head within this many seconds of connecting (or of its
    /// previous response on a kept-alive connection), else the connection is closed.
    #[arg(long, env = "LATHE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10.0)]
    header_read_timeout_seconds: f64,
    /// A request must be answered within this many seconds (uploads and streams excepted),
    /// else 503 with Retry-After.
    #[arg(long, env = "LATHE_REQUEST_TIMEOUT_SECONDS", default_value_t = 120.0)]
    request_timeout_seconds: f64,
    /// Requests per minute per API key, in bursts of ten seconds' worth (429 with Retry-After
    /// beyond); 0 = unlimited. Counted per controller replica.
    #[arg(long, env = "LATHE_RATE_LIMIT_PER_MINUTE", default_value_t = 1200)]
    rate_limit_per_minute: u32,
    /// Require 'Authorization: Bearer <token>' on /metrics (job ids and loss curves are in it);
    /// unset, /metrics is open to anyone who reaches the port.
    #[arg(long, env = "LATHE_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// A worker that sends no heartbeat for this long loses its job (requeued).
    #[arg(long, default_value_t = 60.0)]
    lease_seconds: f64,
    /// How often workers send heartbeats.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_seconds: f64,
    /// How often the reconciler requeues expired leases and re-publishes queued jobs.
    #[arg(long, default_value_t = 5.0)]
    reconcile_seconds: f64,
    /// Crashes a job may have before it fails as poison.
    #[arg(long, default_value_t = 3)]
    max_retries: i32,
    /// Backoff after a crash, doubled for each further crash.
    #[arg(long, default_value_t = 10.0)]
    retry_backoff_seconds: f64,
    /// The CTIBench data directory (not shipped: CC BY-NC-SA 4.0), as the workers see it:
    /// evaluations on cti-* benchmarks are checked against it at create [default: none; only
    /// evaluations on the user's own files are accepted].
    #[arg(long, env = "LATHE_EVAL_DATA_DIR")]
    eval_data_dir: Option<PathBuf>,
}

impl ControllerArgs {
    fn config(&self) -> anyhow::Result<ControllerConfig> {
        let seconds = |name: &str, s: f64| {
            anyhow::ensure!(s > 0.0 && s.is_finite(), "--{name} must be a positive number of seconds, got {s}");
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
        anyhow::ensure!(self.max_connections > 0, "--max-connections must be at least 1");
        config.max_connections = self.max_connections;
        config.header_read_timeout = seconds("header-read-timeout-seconds", self.header_read_timeout_seconds)?;
        config.request_timeout = seconds("request-timeout-seconds", self.request_timeout_seconds)?;
        config.rate_limit_per_minute = self.rate_limit_per_minute;
        config.metrics_token = self.metrics_token.clone().filter(|t| !t.is_empty());
        config.lease = seconds("lease-seconds", self.lease_seconds)?;
        config.heartbeat_interval = seconds("heartbeat-seconds", self.heartbeat_seconds)?;
        config.reconcile_interval = seconds("reconcile-seconds", self.reconcile_seconds)?;
        config.retry.max_retries = self.max_retries;
        config.retry.base_backoff = seconds("retry-backoff-seconds", self.retry_backoff_seconds)?;
        anyhow::ensure!(config.heartbeat_interval < config.lease, "--heartbeat-seconds must be shorter than --lease-seconds");
        Ok(config)
    }
}

/// Training settings of a worker, shared by `lathe worker` and `lathe up`.
#[derive(Args, Clone)]
pub struct TrainingArgs {
    /// cpu, cuda, cuda:N or auto (CUDA when libtorch can use a GPU; refuses to start on a
    /// machine whose GPUs libtorch cannot use, see `lathe doctor`).
    #[arg(long, env = "LATHE_DEVICE", default_value = "auto")]
    device: String,
    /// Steps between checkpoints (and validation passes).
    #[arg(long, env = "LATHE_CHECKPOINT_EVERY", default_value_t = 50)]
    checkpoint_every: u64,
    /// libtorch CPU threads (0: libtorch's default).
    #[arg(long, env = "LATHE_THREADS", default_value_t = 0)]
    threads: usize,
    /// Pools this worker serves, most preferred first.
    #[arg(long, env = "LATHE_POOLS", value_delimiter = ',', default_value = "default")]
    pools: Vec<String>,
    /// Device memory offered to jobs, in GB; jobs asking for more are not claimed [default: the
    /// GPU's memory on CUDA; 0 on the CPU, which takes only jobs that ask for none].
    #[arg(long, env = "LATHE_GPU_MEMORY_GB")]
    gpu_memory_gb: Option<u64>,
}

#[derive(Args, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    redis: Redis,
    #[command(flatten)]
    training: TrainingArgs,
    /// The controller's gRPC address.
    #[arg(long, env = "LATHE_CONTROLLER", default_value = "http://127.0.0.1:50051")]
    controller: String,
    /// This worker's token, from `lathe admin create-worker`.
    #[arg(long, env = "LATHE_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// Name shown to operators [default: the host name].
    #[arg(long, env = "LATHE_WORKER_NAME")]
    name: Option<String>,
    /// Base models on this machine (same names as on the controller).
    #[arg(long, env = "LATHE_MODELS_ROOT", default_value = "lathe-data/models")]
    models_root: PathBuf,
    /// Serve Prometheus metrics here, e.g. 0.0.0.0:9091.
    #[arg(long, env = "LATHE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// The CTIBench data directory on this machine, for evaluations and for jobs that ask for
    /// decontamination (not shipped: CC BY-NC-SA 4.0).
    #[arg(long, env = "LATHE_EVAL_DATA_DIR")]
    eval_data_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(flatten)]
    training: TrainingArgs,
    /// Workers to run in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// A channel that turns true on SIGINT or SIGTERM.
fn stop_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stop requested");
        let _ = tx.send(true);
        // Keep the sender: receivers that wait for a change would otherwise wake at once, forever.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "worker".into())
}

/// The worker's device, resolved once at start (`auto` refuses a GPU host whose GPUs libtorch
/// cannot use), with the device report logged for operators.
struct ResolvedDevice {
    name: String,
    gpu_name: String,
    gpu_memory_bytes: u64,
}

fn resolve_device(training: &TrainingArgs) -> anyhow::Result<ResolvedDevice> {
    let report = DeviceReport::gather();
    let gpu_names: Vec<String> = report.driver.as_ref().map(|d| d.devices.iter().map(|g| g.name.clone()).collect()).unwrap_or_default();
    tracing::info!(
        libtorch = report.libtorch_version,
        gpu_backend = report.gpu_backend_loaded_from.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        libtorch_gpus = report.libtorch_gpus,
        driver = report.driver.as_ref().map(|d| d.version.clone()).unwrap_or_else(|e| e.clone()),
        gpus = ?gpu_names,
        nccl = report.nccl_version.as_deref().unwrap_or("-"),
        os_gpu_nodes = report.os_gpus.len(),
        "device report (lathe doctor prints it in full)"
    );
    let device = lathe_trainer::device::parse_device(&training.device).context("--device")?;
    let (name, gpu) = match device {
        tch::Device::Cuda(i) => (format!("cuda:{i}"), report.driver.as_ref().ok().and_then(|d| d.devices.get(i).cloned())),
        _ => ("cpu".to_string(), None),
    };
    // Offer the GPU's memory unless told otherwise.
    let gpu_memory_bytes = match (training.gpu_memory_gb, &gpu) {
        (Some(gb), _) => gb * (1 << 30),
        (None, Some(gpu)) => gpu.memory_bytes,
        (None, None) => 0,
    };
    Ok(ResolvedDevice { name, gpu_name: gpu.map(|g| g.name).unwrap_or_default(), gpu_memory_bytes })
}

/// Where a worker finds things and whom it talks to.
struct WorkerPlace {
    controller: String,
    token: String,
    name: String,
    models_root: PathBuf,
    metrics_listen: Option<String>,
    eval_data_dir: Option<PathBuf>,
}

fn worker_config(training: &TrainingArgs, device: &ResolvedDevice, redis: &Redis, place: WorkerPlace) -> WorkerConfig {
    let WorkerPlace { controller, token, name, models_root, metrics_listen, eval_data_dir } = place;
    WorkerConfig {
        controller_url: controller,
        token,
        name,
        pools: training.pools.clone(),
        device: device.name.clone(),
        gpu_name: device.gpu_name.clone(),
        gpu_memory_bytes: device.gpu_memory_bytes,
        models_root,
        checkpoint_every: training.checkpoint_every.max(1),
        threads: training.threads,
        redis_url: redis.redis_url.clone(),
        redis_prefix: redis.redis_prefix.clone(),
        metrics_listen,
        eval_data_dir,
    }
}

pub fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        let bound = BoundController::bind(config).await?;
        eprintln!("lathe controller: REST http://{}/v1, gRPC {}", bound.http_addr, bound.grpc_addr);
        bound.serve(stopped(stop)).await?;
        Ok(())
    })
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_else(host_name);
    let place = WorkerPlace {
        controller: args.controller.clone(),
        token: args.token.clone(),
        name,
        models_root: args.models_root.clone(),
        metrics_listen: args.metrics_listen.clone(),
        eval_data_dir: args.eval_data_dir.clone(),
    };
    let device = resolve_device(&args.training)?;
    let config = worker_config(&args.training, &device, &args.redis, place);
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        lathe_worker::run(config, stop).await?;
        Ok(())
    })
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let config = args.controller.config()?;
    anyhow::ensure!(args.workers <= 64, "--workers: at most 64 in one process");
    let device = resolve_device(&args.training)?;
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        let bound = BoundController::bind(config).await?;
        let grpc = format!("http://{}", bound.grpc_addr);
        let models_root = bound.state.config.models_root.clone();
        std::fs::create_dir_all(&models_root).with_context(|| format!("creating {}", models_root.display()))?;
        let (controller_stop, controller_stopped) = watch::channel(false);

        let mut workers = Vec::new();
        for i in 0..args.workers {
            let name = format!("{}-up-{i}", host_name());
            let registered = lathe_store::workers::register_worker(
                &bound.state.pool,
                lathe_store::workers::NewWorker {
                    name: &name,
                    device_kind: "cpu",
                    gpu_name: None,
                    gpu_memory_bytes: None,
                    pools: &args.training.pools,
                    version: env!("CARGO_PKG_VERSION"),
                },
            )
            .await?;
            let place = WorkerPlace {
                controller: grpc.clone(),
                token: registered.token,
                name,
                models_root: models_root.clone(),
                metrics_listen: None,
                eval_data_dir: args.controller.eval_data_dir.clone(),
            };
            let config = worker_config(&args.training, &device, &args.controller.redis, place);
            workers.push(tokio::spawn(lathe_worker::run(config, stop.clone())));
        }
        eprintln!(
            "lathe up: REST http://{}/v1 · gRPC {} · {} worker(s) · models in {} · Ctrl-C stops (running jobs checkpoint and requeue)",
            bound.http_addr,
            bound.grpc_addr,
            args.workers,
            models_root.display()
        );
        let serving = tokio::spawn(bound.serve(stopped(controller_stopped)));
        // Workers stop first (they checkpoint and hand their jobs back through the controller),
        // then the controller.
        for worker in workers {
            match worker.await {
                Ok(Err(error)) => eprintln!("worker: {error}"),
                Err(error) => eprintln!("worker task: {error}"),
                Ok(Ok(())) => {}
            }
        }
        let _ = controller_stop.send(true);
        serving.await.context("controller task")??;
        Ok(())
    })
}
