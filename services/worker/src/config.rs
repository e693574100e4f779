//! What a worker is told at start (flags and `LATHE_*` variables, parsed by the CLI).

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The controller's gRPC address, e.g. `http://127.0.0.1:50051`.
    pub controller_url: String,
    /// This worker's bearer token (`lathe admin create-worker`).
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
    /// Where base models live on this machine (same names as the controller's root).
    pub models_root: PathBuf,
    /// Steps between checkpoints (and validation passes).
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
