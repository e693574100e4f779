//! Everything a person debugging a GPU node needs in one place: which libtorch runs and from
//! where, whether its GPU backend is built in and loaded, what the driver and libtorch each
//! see, and what `--device auto` would do. `lathe doctor` prints it; `lathe worker` logs it at
//! start and registers with the devices it found.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use lathe_torch_ext::{backend, driver};

use super::os_gpus;

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub libtorch_version: String,
    /// The directory `libtorch_cpu.so` was loaded from.
    pub libtorch_dir: Option<PathBuf>,
    /// `libtorch_cuda.so` / `libtorch_hip.so` when the linked libtorch has a GPU backend.
    pub gpu_backend: Option<String>,
    /// Where the backend was loaded from in this process (`None`: not loaded).
    pub gpu_backend_loaded_from: Option<PathBuf>,
    /// ROCm build (HIP presents as CUDA).
    pub rocm: bool,
    /// The CUDA runtime and cuDNN versions libtorch was built with (e.g. 13000, 91300).
    pub cuda_runtime_version: Option<i64>,
    pub cudnn_version: Option<i64>,
    /// GPUs libtorch can use.
    pub libtorch_gpus: usize,
    /// The driver's view (`Err`: why it could not answer).
    pub driver: std::result::Result<DriverView, String>,
    /// NCCL (multi-GPU collectives), when loaded.
    pub nccl_version: Option<String>,
    /// GPU device nodes the OS shows.
    pub os_gpus: Vec<PathBuf>,
    /// `CUDA_VISIBLE_DEVICES=…` (or the HIP/ROCR variable) when it hides every GPU.
    pub gpus_hidden_by: Option<String>,
    pub cpu_threads: i32,
    pub cpu_native_bf16: bool,
    /// The vector instructions Lathe's own CPU kernels (bf16 RMSNorm) run with: avx512, avx2, baseline.
    pub cpu_vector_isa: &'static str,
    /// What `--device auto` resolves to, or why it refuses.
    pub auto_device: std::result::Result<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriverView {
    pub version: String,
    pub devices: Vec<GpuView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuView {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: String,
    pub bf16: bool,
}

impl DeviceReport {
    pub fn gather() -> DeviceReport {
        let libtorch_gpus = super::libtorch_gpu_count();
        let backend_loaded = backend::gpu_backend_loaded_from();
        // libtorch throws (and tch panics) when asked for CUDA versions without its backend.
        let cuda_built = backend_loaded.is_some() && tch::utils::has_cudart();
        let driver = driver::cuda_driver().map(|d| DriverView {
            version: format!("{}.{}", d.version.0, d.version.1),
            devices: d
                .devices
                .iter()
                .map(|g| GpuView {
                    index: g.index,
                    name: g.name.clone(),
                    memory_bytes: g.total_memory_bytes,
                    compute_capability: format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                    bf16: g.bf16(),
                })
                .collect(),
        });
        DeviceReport {
            libtorch_version: backend::libtorch_version().to_string(),
            libtorch_dir: backend::libtorch_loaded_from().and_then(|p| p.parent().map(PathBuf::from)),
            gpu_backend: backend::GPU_BACKEND_LIBRARY.map(String::from),
            gpu_backend_loaded_from: backend_loaded,
            rocm: tch::utils::has_hip(),
            cuda_runtime_version: cuda_built.then(tch::utils::version_cudart),
            cudnn_version: (cuda_built && tch::Cuda::cudnn_is_available()).then(tch::utils::version_cudnn),
            libtorch_gpus,
            driver,
            nccl_version: driver::nccl_version().map(|(a, b, c)| format!("{a}.{b}.{c}")),
            os_gpus: os_gpus::shown_by_os(),
            gpus_hidden_by: os_gpus::hidden_on_purpose(),
            cpu_threads: tch::get_num_threads(),
            cpu_native_bf16: super::cpu_has_native_bf16(),
            cpu_vector_isa: lathe_torch_ext::fused::cpu_kernel_isa(),
            auto_device: super::parse_device("auto").map(device_name).map_err(|e| e.to_string()),
        }
    }

    /// What is wrong, if anything: the OS shows GPUs that libtorch cannot use (and they are
    /// not hidden on purpose), or the backend is built in but not loaded.
    pub fn problem(&self) -> Option<String> {
        if let (Some(name), None) = (&self.gpu_backend, &self.gpu_backend_loaded_from) {
            return Some(format!(
                "this libtorch ships {name} but the process did not load it, so no GPU can be used; the binary was linked without it (rebuild with scripts/setup.sh)"
            ));
        }
        if self.libtorch_gpus == 0 && !self.os_gpus.is_empty() && self.gpus_hidden_by.is_none() {
            return Some(unusable_gpus_message(&self.os_gpus));
        }
        None
    }
}

fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// Why GPUs that the OS shows cannot be used, with what to check next.
pub fn unusable_gpus_message(shown: &[PathBuf]) -> String {
    let nodes: Vec<String> = shown.iter().map(|p| p.display().to_string()).collect();
    let reason = match backend::GPU_BACKEND_LIBRARY {
        None => format!(
            "this lathe is built on a CPU-only libtorch ({}); point LIBTORCH at a CUDA or ROCm libtorch and rebuild",
            backend::libtorch_loaded_from().map(|p| p.display().to_string()).unwrap_or_else(|| "unknown location".into())
        ),
        Some(name) if backend::gpu_backend_loaded_from().is_none() => {
            format!("libtorch's GPU backend {name} is not loaded in this process (the binary was linked without it; rebuild with scripts/setup.sh)")
        }
        Some(_) => match driver::cuda_driver() {
            Err(why) => format!("the CUDA driver cannot be used: {why}"),
            Ok(d) if d.devices.is_empty() => "the CUDA driver reports no device (CUDA_VISIBLE_DEVICES? a container without --gpus?)".into(),
            Ok(d) => format!(
                "the driver (API {}.{}) reports {} GPU(s) but libtorch sees none: the driver may be older than libtorch's CUDA runtime ({})",
                d.version.0,
                d.version.1,
                d.devices.len(),
                tch::utils::version_cudart()
            ),
        },
    };
    format!(
        "the OS shows GPUs ({}) but libtorch cannot use them: {reason}. Run `lathe doctor` for details, or pass --device cpu to train on the CPU on purpose",
        nodes.join(", ")
    )
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
        writeln!(f, "libtorch         {} from {}", self.libtorch_version, or_none(&self.libtorch_dir))?;
        let backend = match (&self.gpu_backend, &self.gpu_backend_loaded_from) {
            (None, _) => "none (CPU-only libtorch)".to_string(),
            (Some(name), Some(path)) => format!("{name} compiled in, loaded from {}", path.display()),
            (Some(name), None) => format!("{name} compiled in, NOT LOADED"),
        };
        writeln!(f, "GPU backend      {backend}{}", if self.rocm { " (ROCm/HIP)" } else { "" })?;
        let version = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        writeln!(f, "CUDA runtime     {}   cuDNN {}", version(self.cuda_runtime_version), version(self.cudnn_version))?;
        writeln!(f, "NCCL             {}", self.nccl_version.as_deref().unwrap_or("-"))?;
        match &self.driver {
            Ok(d) => writeln!(f, "CUDA driver      API {}, {} device(s)", d.version, d.devices.len())?,
            Err(why) => writeln!(f, "CUDA driver      - ({why})")?,
        }
        if let Ok(d) = &self.driver {
            for g in &d.devices {
                writeln!(
                    f,
                    "  cuda:{}          {}, {:.1} GiB, compute {}, bf16 {}",
                    g.index,
                    g.name,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.compute_capability,
                    if g.bf16 { "native" } else { "no" }
                )?;
            }
        }
        writeln!(f, "libtorch GPUs    {}", self.libtorch_gpus)?;
        let nodes: Vec<String> = self.os_gpus.iter().map(|p| p.display().to_string()).collect();
        writeln!(f, "OS GPU devices   {}", if nodes.is_empty() { "none".into() } else { nodes.join(", ") })?;
        if let Some(hidden) = &self.gpus_hidden_by {
            writeln!(f, "hidden by        {hidden}")?;
        }
        writeln!(
            f,
            "CPU              {} threads, bf16 {}, Lathe kernels {}",
            self.cpu_threads,
            if self.cpu_native_bf16 { "native" } else { "emulated" },
            self.cpu_vector_isa
        )?;
        match &self.auto_device {
            Ok(device) => writeln!(f, "--device auto    {device}")?,
            Err(why) => writeln!(f, "--device auto    refuses: {why}")?,
        }
        match self.problem() {
            Some(problem) => write!(f, "PROBLEM          {problem}"),
            None => write!(f, "status           ok"),
        }
    }
}
