//! Device and dtype selection. A ROCm libtorch presents itself as CUDA, so "cuda" covers both.

use tch::{Device, Kind};

use crate::{Result, TrainerError};

/// Resolves "cpu" | "cuda" | "cuda:N" | "auto" (CUDA when present, else CPU).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" | "gpu" => require_cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => require_cuda(index),
            None => Err(TrainerError::invalid("device", format!("expected cpu, cuda, cuda:N or auto, got {other:?}"))),
        },
    }
}

fn require_cuda(index: usize) -> Result<Device> {
    if !tch::Cuda::is_available() {
        return Err(TrainerError::invalid("device", "CUDA/ROCm was requested but libtorch sees no GPU"));
    }
    if index >= tch::Cuda::device_count() as usize {
        return Err(TrainerError::invalid("device", format!("cuda:{index} does not exist")));
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

fn cpu_has_native_bf16() -> bool {
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

/// Peak resident memory of this process in bytes (CPU), or the CUDA allocator's peak.
pub fn peak_memory_bytes(device: Device) -> u64 {
    if let Device::Cuda(_) = device {
        // tch does not expose the CUDA caching allocator statistics; report host memory.
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
