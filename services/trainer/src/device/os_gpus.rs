//! The GPUs the operating system shows, whatever libtorch thinks: NVIDIA's driver creates
//! `/dev/nvidia0`, `/dev/nvidia1`, …; AMD's creates `/dev/kfd` (ROCm). When these exist and
//! libtorch sees no GPU, something is broken (a CPU-only libtorch, a missing driver library in
//! a container, a driver older than the CUDA runtime), and training on the CPU would hide it.
//!
//! `LATHE_DEV_DIR` replaces `/dev` for this check (tests, and containers that mount device
//! nodes elsewhere).

use std::path::PathBuf;

/// Device nodes of GPUs in the device directory, sorted.
pub fn shown_by_os() -> Vec<PathBuf> {
    let dir = std::env::var_os("LATHE_DEV_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev"));
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut found: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).filter(|e| e.file_name().to_str().is_some_and(is_gpu_node)).map(|e| e.path()).collect();
    found.sort();
    found
}

/// `nvidia0`, `nvidia1`, … (not `nvidiactl`, `nvidia-uvm`, which exist without a GPU too) and `kfd`.
fn is_gpu_node(name: &str) -> bool {
    name == "kfd" || name.strip_prefix("nvidia").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The variable (`NAME=value`) that hides every GPU from CUDA or ROCm on purpose, e.g.
/// `CUDA_VISIBLE_DEVICES=` or `=-1`: then the CPU is what the person asked for.
pub fn hidden_on_purpose() -> Option<String> {
    ["CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"].into_iter().find_map(|name| {
        let value = std::env::var(name).ok()?;
        matches!(value.trim(), "" | "-1" | "none" | "NoDevFiles").then(|| format!("{name}={value}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_nodes_are_numbered_nvidia_devices_and_kfd() {
        for name in ["nvidia0", "nvidia7", "nvidia12", "kfd"] {
            assert!(is_gpu_node(name), "{name}");
        }
        for name in ["nvidiactl", "nvidia-uvm", "nvidia-modeset", "nvidia", "dri", "kfd0"] {
            assert!(!is_gpu_node(name), "{name}");
        }
    }
}
