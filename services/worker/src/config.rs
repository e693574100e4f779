//! What a worker is told at start (flags and `LATHE_*` variables, parsed by the CLI).

use std::path::PathBuf;

#[derive(Clone)]
pub struct WorkerConfig {
    /// The controller's gRPC address, e.g. `http://127.0.0.1:50051`.
    pub controller_url: String,
    /// This worker's bearer token (`lathe admin create-worker`), or a fleet secret it enrols
    /// with (then replaced by the instance's own token at registration).
    pub token: String,
    /// Shown to operators; defaults to the host name.
    pub name: String,
    /// Pools served, in order of preference.
    pub pools: Vec<String>,
    /// `cpu` or `cuda:N`, resolved at start (`auto` is resolved by the caller, which can refuse).
    pub device: String,
    /// The GPU's name as the driver gives it, for operators ("" on the CPU).
    pub gpu_name: String,
    /// Device memory offered to jobs (their `gpu_memory_gb` must fit); 0 = unknown.
    pub gpu_memory_bytes: u64,
    /// Devices one job may use as data-parallel ranks (GPUs cuda:0..N, or CPU ranks).
    pub gpus: usize,
    /// Nodes of its Slurm allocation it may spread one job over (rank 0 here, the rest by srun).
    pub nodes: usize,
    /// The training dtype: auto, fp32 or bf16.
    pub dtype: String,
    /// Where base models live on this machine (same names as the controller's root).
    pub models_root: PathBuf,
    /// Steps between checkpoints of jobs that set no `checkpoint_every` of their own.
    pub checkpoint_every: u64,
    /// libtorch CPU threads; 0 = libtorch's default.
    pub threads: usize,
    pub redis_url: String,
    pub redis_prefix: String,
    /// Serve Prometheus metrics here (`0.0.0.0:9091`); `None` = off.
    pub metrics_listen: Option<String>,
    /// The CTIBench data directory, for jobs that ask for decontamination.
    pub eval_data_dir: Option<PathBuf>,
    /// TLS to the controller (`https://` URLs).
    pub tls: ClientTls,
    /// When to leave: a pilot under Slurm or a scaled-out replica gives its GPU back.
    pub lifecycle: Lifecycle,
    /// Where a scheduler placed this worker, reported to operators.
    pub placement: Placement,
    /// A metrics registry shared with other workers of the process (`lathe up`); None = the
    /// worker's own, served on `metrics_listen`.
    pub shared_telemetry: Option<std::sync::Arc<crate::telemetry::Telemetry>>,
    /// Serve completions instead of training (`--serve`); None = a training worker.
    pub serve: Option<crate::serve::ServeConfig>,
}

/// The scheduler's name for this worker's slot, when one placed it.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// `$SLURM_JOB_ID` inside a Slurm job.
    pub slurm_job_id: Option<String>,
    /// The Kubernetes pod (`LATHE_POD_NAME`, from the downward API).
    pub pod_name: Option<String>,
}

/// When a worker exits on its own (both off by default: a daemon runs until stopped).
#[derive(Debug, Clone, Copy, Default)]
pub struct Lifecycle {
    /// Exit (status 0) after this long with no job or evaluation to run.
    pub exit_when_idle: Option<std::time::Duration>,
    /// Exit (status 0) after this many attempts, whatever their outcome.
    pub max_jobs: Option<u32>,
}

/// What a worker needs for TLS to the controller: the CA that signed the controller's
/// certificate (else the system's roots), and its own certificate and key when the controller
/// asks for client certificates (mutual TLS).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Lifecycle {
    /// Why the worker should leave now, if it should: idle past the limit, or its jobs done.
    pub fn done(&self, idle_for: std::time::Duration, attempts_run: u32) -> Option<String> {
        if let Some(max) = self.max_jobs.filter(|&max| attempts_run >= max) {
            return Some(format!("ran {attempts_run} of --max-jobs {max}"));
        }
        self.exit_when_idle
            .filter(|&limit| idle_for >= limit)
            .map(|limit| format!("idle for {:.0} s (--exit-when-idle {:.0})", idle_for.as_secs_f64(), limit.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_worker_leaves_when_idle_long_enough_or_when_its_jobs_are_done() {
        let forever = Lifecycle::default();
        assert_eq!(forever.done(Duration::from_secs(86_400), 1_000), None);
        let pilot = Lifecycle { exit_when_idle: Some(Duration::from_secs(60)), max_jobs: Some(2) };
        assert_eq!(pilot.done(Duration::from_secs(59), 1), None);
        assert!(pilot.done(Duration::from_secs(60), 1).unwrap().contains("idle for 60 s"));
        assert!(pilot.done(Duration::ZERO, 2).unwrap().contains("--max-jobs 2"));
    }
}
