//! `lathe controller`, `lathe worker` and `lathe up` (both in one process): the service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lathe_controller::cli::{stop_on_signals, stopped};
pub use lathe_controller::cli::{ControllerArgs, Database, Redis};
use lathe_controller::BoundController;
use lathe_trainer::device::report::DeviceReport;
use lathe_worker::WorkerConfig;
use tokio::sync::watch;

/// Training settings of a worker, shared by `lathe worker` and `lathe up`.
#[derive(Args, Clone)]
pub struct TrainingArgs {
    /// cpu, cuda, cuda:N or auto (CUDA when libtorch can use a GPU; refuses to start on a
    /// machine whose GPUs libtorch cannot use, see `lathe doctor`).
    #[arg(long, env = "LATHE_DEVICE", default_value = "auto")]
    device: String,
    /// Steps between checkpoints of a job that sets no `checkpoint_every` of its own (jobs are
    /// also checkpointed at each epoch's end), so a preemption loses at most this many steps.
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
    /// Devices a job may use as data-parallel ranks: a job asking for `gpus` ≤ N runs as that
    /// many ranks on this worker (cuda:0..N-1 with CUDA; with --device cpu, CPU ranks sharing the
    /// cores) [default: every visible GPU on CUDA, 1 on the CPU].
    #[arg(long, env = "LATHE_GPUS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    gpus: Option<u16>,
    /// Inside a multi-node Slurm allocation (`sbatch --nodes=K`): spread a job asking for
    /// `nodes` ≤ K over them, this worker running rank 0 and srun the other ranks (--gpus per
    /// node). See deploy/slurm/lathe-gang-worker.sbatch.
    #[arg(long, env = "LATHE_NODES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Training dtype: auto (bf16 on GPUs and on CPUs that multiply bf16 natively, else fp32),
    /// fp32 (bit-reproducible runs) or bf16.
    #[arg(long, env = "LATHE_DTYPE", default_value = "auto", value_parser = ["auto", "fp32", "bf16"])]
    dtype: String,
}

/// How an inference server batches and queues (`lathe worker --serve`, `lathe up`).
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Sequences generated together in one batch (requests join a running batch between steps).
    #[arg(long, env = "LATHE_SERVE_MAX_BATCH", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    serve_max_batch: u32,
    /// Requests one server holds at once, generating or waiting; beyond that (on every server)
    /// the API answers 503 with Retry-After.
    #[arg(long, env = "LATHE_SERVE_CAPACITY", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    serve_capacity: u32,
    /// Models (a base, or a base with a fine-tuned adapter) kept loaded; the least recently used
    /// idle one is unloaded. Adapters on one base share its weights.
    #[arg(long, env = "LATHE_SERVE_MAX_MODELS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    serve_max_models: u32,
    /// Make special tokens (`<|im_start|>`, …) inside request messages plain text, so a client
    /// cannot forge a system or assistant turn. Off: they are parsed as the tokenizer does.
    #[arg(long, env = "LATHE_ESCAPE_SPECIAL_TOKENS")]
    escape_special_tokens: bool,
}

impl ServeArgs {
    fn config(&self) -> lathe_worker::ServeConfig {
        lathe_worker::ServeConfig {
            max_batch: self.serve_max_batch as usize,
            capacity: self.serve_capacity.max(self.serve_max_batch) as usize,
            max_models: self.serve_max_models as usize,
            escape_special_tokens: self.escape_special_tokens,
        }
    }
}

#[derive(Args, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    redis: Redis,
    #[command(flatten)]
    training: TrainingArgs,
    /// Serve chat and text completions (/v1/chat/completions, /v1/completions) instead of
    /// training: an inference worker of its own, which claims no jobs or evaluations.
    #[arg(long, env = "LATHE_SERVE")]
    serve: bool,
    #[command(flatten)]
    serving: ServeArgs,
    /// The controller's gRPC address.
    #[arg(long, env = "LATHE_CONTROLLER", default_value = "http://127.0.0.1:50051")]
    controller: String,
    /// A fleet secret (the controller's --fleet-secret, or `lathe admin create-fleet`): this
    /// instance enrols and gets an identity of its own; or one worker's token from
    /// `lathe admin create-worker`.
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
    /// With an https:// --controller: the CA (PEM) that signed the controller's certificate
    /// [default: the system's roots].
    #[arg(long, env = "LATHE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This worker's certificate (PEM), when the controller requires client certificates.
    #[arg(long, env = "LATHE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, env = "LATHE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Exit (status 0) after this many seconds with nothing to run: a pilot job under Slurm,
    /// or a scaled-out replica, gives its GPU back [default: never].
    #[arg(long, env = "LATHE_EXIT_WHEN_IDLE", value_name = "SECONDS")]
    exit_when_idle: Option<f64>,
    /// Exit (status 0) after running this many jobs [default: no limit].
    #[arg(long, env = "LATHE_MAX_JOBS", value_name = "N")]
    max_jobs: Option<u32>,
    /// The Kubernetes pod this worker runs in, shown to operators (set it from the downward
    /// API: fieldRef metadata.name). Under Slurm, $SLURM_JOB_ID is reported by itself.
    #[arg(long, env = "LATHE_POD_NAME")]
    pod_name: Option<String>,
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
    /// Inference workers to run in this process (chat and text completions on base and
    /// fine-tuned models); they share the device with the training workers.
    #[arg(long, default_value_t = 1)]
    serve_workers: usize,
    #[command(flatten)]
    serving: ServeArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
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
    tls: lathe_worker::ClientTls,
    lifecycle: lathe_worker::Lifecycle,
    placement: lathe_worker::Placement,
    shared_telemetry: Option<std::sync::Arc<lathe_worker::telemetry::Telemetry>>,
    serve: Option<lathe_worker::ServeConfig>,
}

fn worker_config(training: &TrainingArgs, device: &ResolvedDevice, redis: &Redis, place: WorkerPlace) -> WorkerConfig {
    let WorkerPlace {
        controller,
        token,
        name,
        models_root,
        metrics_listen,
        eval_data_dir,
        tls,
        lifecycle,
        placement,
        shared_telemetry,
        serve,
    } = place;
    WorkerConfig {
        controller_url: controller,
        token,
        name,
        pools: training.pools.clone(),
        device: device.name.clone(),
        gpu_name: device.gpu_name.clone(),
        gpu_memory_bytes: device.gpu_memory_bytes,
        gpus: match training.gpus {
            Some(n) => n as usize,
            // From the worker's GPU (cuda:N) to the last one it sees.
            None if device.name.starts_with("cuda") => {
                let first = device.name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
                (tch::Cuda::device_count() as usize).saturating_sub(first).max(1)
            }
            None => 1,
        },
        models_root,
        checkpoint_every: training.checkpoint_every.max(1),
        threads: training.threads,
        dtype: training.dtype.clone(),
        nodes: training.nodes as usize,
        redis_url: redis.redis_url.clone(),
        redis_prefix: redis.redis_prefix.clone(),
        metrics_listen,
        eval_data_dir,
        tls,
        lifecycle,
        placement,
        shared_telemetry,
        serve,
    }
}

pub fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    Ok(lathe_controller::cli::run(&args)?)
}

fn idle_limit(seconds: Option<f64>) -> anyhow::Result<Option<std::time::Duration>> {
    seconds
        .map(|s| {
            anyhow::ensure!(s >= 0.0 && s.is_finite(), "--exit-when-idle must be a number of seconds, got {s}");
            Ok(std::time::Duration::from_secs_f64(s))
        })
        .transpose()
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if args.training.nodes > 1 {
        let allocated = std::env::var("SLURM_JOB_NUM_NODES").ok().and_then(|n| n.parse::<u16>().ok()).unwrap_or(0);
        anyhow::ensure!(
            allocated >= args.training.nodes,
            "--nodes {} spreads jobs over the nodes of this Slurm allocation, which has {allocated} (SLURM_JOB_NUM_NODES); \
             run it in `sbatch --nodes={}` (deploy/slurm/lathe-gang-worker.sbatch)",
            args.training.nodes,
            args.training.nodes
        );
    }
    let name = args.name.clone().unwrap_or_else(host_name);
    let place = WorkerPlace {
        controller: args.controller.clone(),
        token: args.token.clone(),
        name,
        models_root: args.models_root.clone(),
        metrics_listen: args.metrics_listen.clone(),
        eval_data_dir: args.eval_data_dir.clone(),
        tls: lathe_worker::ClientTls { ca: args.tls_ca.clone(), cert: args.tls_cert.clone(), key: args.tls_key.clone() },
        lifecycle: lathe_worker::Lifecycle { exit_when_idle: idle_limit(args.exit_when_idle)?, max_jobs: args.max_jobs },
        placement: lathe_worker::Placement {
            slurm_job_id: std::env::var("SLURM_JOB_ID").ok().filter(|id| !id.is_empty()),
            pod_name: args.pod_name.clone().filter(|name| !name.is_empty()),
        },
        shared_telemetry: None,
        serve: args.serve.then(|| args.serving.config()),
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
    anyhow::ensure!(args.serve_workers <= 16, "--serve-workers: at most 16 in one process");
    anyhow::ensure!(config.grpc_tls.is_none(), "lathe up runs its workers in this process; --grpc-tls-* is for lathe-controller");
    let device = resolve_device(&args.training)?;
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        let bound = BoundController::bind(config).await?;
        let grpc = format!("http://{}", bound.grpc_addr);
        let models_root = bound.state.config.models_root.clone();
        std::fs::create_dir_all(&models_root).with_context(|| format!("creating {}", models_root.display()))?;
        let (controller_stop, controller_stopped) = watch::channel(false);
        // The workers' metrics (busy, loss, memory, …) on the controller's /metrics: one port
        // for Prometheus to scrape, as there is one process.
        let worker_telemetry = std::sync::Arc::new(lathe_worker::telemetry::Telemetry::new());
        let served = worker_telemetry.clone();
        bound.state.telemetry.also_serve(move || served.render());

        let mut workers = Vec::new();
        for i in 0..args.workers + args.serve_workers {
            let serving = i >= args.workers;
            let name = if serving { format!("{}-up-serve-{}", host_name(), i - args.workers) } else { format!("{}-up-{i}", host_name()) };
            let registered = lathe_store::workers::register_worker(
                &bound.state.pool,
                lathe_store::workers::NewWorker {
                    name: &name,
                    device_kind: "cpu",
                    gpu_name: None,
                    gpu_memory_bytes: None,
                    pools: &args.training.pools,
                    gpus: 1,
                    nodes: 1,
                    version: env!("CARGO_PKG_VERSION"),
                    slurm_job_id: None,
                    pod_name: None,
                    serving,
                },
                &lathe_store::workers::Grant {
                    pools: None,
                    roles: vec![if serving { lathe_store::workers::ROLE_SERVING } else { lathe_store::workers::ROLE_TRAINING }.into()],
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
                tls: lathe_worker::ClientTls::default(),
                lifecycle: lathe_worker::Lifecycle::default(),
                placement: lathe_worker::Placement::default(),
                shared_telemetry: Some(worker_telemetry.clone()),
                serve: serving.then(|| args.serving.config()),
            };
            let config = worker_config(&args.training, &device, &args.controller.redis, place);
            workers.push(tokio::spawn(lathe_worker::run(config, stop.clone())));
        }
        eprintln!(
            "lathe up: REST http://{}/v1 · gRPC {} · {} worker(s), {} inference worker(s) · models in {} · Ctrl-C stops (running jobs checkpoint and requeue)",
            bound.http_addr,
            bound.grpc_addr,
            args.workers,
            args.serve_workers,
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
