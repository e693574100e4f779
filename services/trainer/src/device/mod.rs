//! Device and dtype selection. A ROCm libtorch presents itself as CUDA, so "cuda" covers both.
//!
//! `auto` never trains on the CPU of a machine whose OS shows GPUs: either libtorch can use
//! them, or the run stops and says why ([`os_gpus`] is what the OS shows, [`report`] is the
//! whole picture that `lathe doctor` prints).

pub mod os_gpus;
pub mod report;

use tch::{Device, Kind};

use crate::{Result, TrainerError};

/// Resolves "cpu" | "cuda" | "cuda:N" | "auto" (CUDA when libtorch can use a GPU; the CPU when
/// the machine has none; an error when it has GPUs that libtorch cannot use).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => auto_device(),
        "cuda" | "gpu" => require_cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => require_cuda(index),
            None => Err(TrainerError::invalid("device", format!("expected cpu, cuda, cuda:N or auto, got {other:?}"))),
        },
    }
}

/// How many GPUs libtorch can use. Always ask through here: the call into the shim is what
/// keeps libtorch's GPU backend linked into every binary that trains (lathe-torch-ext's build
/// script explains why that needs a call).
pub fn libtorch_gpu_count() -> usize {
    if !lathe_torch_ext::backend::gpu_backend_linked() {
        return 0;
    }
    tch::Cuda::device_count().max(0) as usize
}

fn auto_device() -> Result<Device> {
    if libtorch_gpu_count() > 0 {
        return Ok(Device::Cuda(0));
    }
    let shown = os_gpus::shown_by_os();
    if shown.is_empty() || os_gpus::hidden_on_purpose().is_some() {
        return Ok(Device::Cpu);
    }
    Err(TrainerError::invalid("device", format!("auto: {}", report::unusable_gpus_message(&shown))))
}

fn require_cuda(index: usize) -> Result<Device> {
    let count = libtorch_gpu_count();
    if count == 0 {
        let shown = os_gpus::shown_by_os();
        let why = if shown.is_empty() {
            "the OS shows no GPU on this machine (no /dev/nvidia* or /dev/kfd)".to_string()
        } else {
            report::unusable_gpus_message(&shown)
        };
        return Err(TrainerError::invalid("device", format!("CUDA/ROCm was requested but libtorch sees no GPU: {why}")));
    }
    if index >= count {
        return Err(TrainerError::invalid("device", format!("cuda:{index} does not exist (libtorch sees {count} GPU(s))")));
    }
    Ok(Device::Cuda(index))
}

/// Resolves "fp32" | "bf16" | "fp16" | "auto" for `device`. Auto picks bf16 on GPUs and on CPUs
/// with native bf16 matmul (AVX-512 BF16 or AMX), where it is several times faster than fp32;
/// on other CPUs bf16 is emulated and slower, so auto keeps fp32 there.
pub fn resolve_dtype(name: &str, device: Device) -> Result<Kind> {
    if name == "auto" {
        let native_bf16 = device.is_cuda() || cpu_has_native_bf16();
        return Ok(if native_bf16 { Kind::BFloat16 } else { Kind::Float });
    }
    parse_dtype(name)
}

pub fn cpu_has_native_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| info.lines().filter(|l| l.starts_with("flags")).take(1).any(|l| l.contains("avx512_bf16") || l.contains("amx_bf16")))
        .unwrap_or(false)
}

/// Parses "fp32" | "bf16" | "fp16" | "auto" (auto is resolved per device by [`resolve_dtype`]).
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name {
        "fp32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" | "auto" => Ok(Kind::BFloat16),
        "fp16" | "float16" => Ok(Kind::Half),
        other => Err(TrainerError::invalid("dtype", format!("expected fp32, bf16, fp16 or auto, got {other:?}"))),
    }
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "other",
    }
}

/// Peak memory of the training device in bytes: on a GPU the CUDA caching allocator's peak of
/// allocated bytes since [`reset_peak_memory`] (what `torch.cuda.max_memory_allocated` says),
/// on the CPU the process's peak resident set.
pub fn peak_memory_bytes(device: Device) -> u64 {
    match device {
        Device::Cuda(index) => lathe_torch_ext::memory::cuda_memory(index).map(|m| m.peak_allocated).unwrap_or(0),
        _ => peak_host_memory_bytes(),
    }
}

/// Memory the device holds now: the caching allocator's reserved bytes on a GPU, the peak
/// resident set on the CPU (Linux keeps no cheaper "current" figure worth reporting).
pub fn memory_in_use_bytes(device: Device) -> u64 {
    match device {
        Device::Cuda(index) => lathe_torch_ext::memory::cuda_memory(index).map(|m| m.reserved).unwrap_or(0),
        _ => peak_host_memory_bytes(),
    }
}

/// Starts a new device-memory peak, so that each run reports its own. (The CPU's peak RSS
/// cannot be reset; a process trains one job at a time.)
pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(index) = device {
        lathe_torch_ext::memory::reset_cuda_peak(index);
    }
}

/// The process's peak resident set (VmHWM) in bytes.
pub fn peak_host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:").and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_malformed_names_resolve_without_asking_for_a_gpu() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{err}");
    }

    #[test]
    fn the_cpu_peak_is_the_resident_set() {
        // A test process holds libtorch: tens of MB at least.
        assert!(peak_memory_bytes(Device::Cpu) > 16 << 20);
    }
}
