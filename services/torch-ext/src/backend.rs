//! Which libtorch this binary runs on, and whether its GPU backend is part of it.

use std::ffi::CStr;
use std::path::PathBuf;

use crate::{ffi, libraries};

/// The GPU backend library the linked libtorch ships (`libtorch_cuda.so`, `libtorch_hip.so`),
/// `None` for a CPU-only libtorch. Decided when this crate was built.
pub const GPU_BACKEND_LIBRARY: Option<&str> = option_env!("LATHE_GPU_BACKEND_LIB");

/// True when this binary references the GPU backend, so the dynamic loader loaded it at start.
///
/// Call this before the first question to libtorch about CUDA: the call is also what keeps the
/// backend among the binary's ELF dependencies (see this crate's build script).
pub fn gpu_backend_linked() -> bool {
    // SAFETY: returns a constant address (or null); no arguments, no state.
    !unsafe { ffi::lathe_gpu_backend_anchor() }.is_null()
}

/// Where the GPU backend was loaded from, if it is loaded in this process.
pub fn gpu_backend_loaded_from() -> Option<PathBuf> {
    GPU_BACKEND_LIBRARY.and_then(libraries::loaded)
}

/// libtorch's version as its headers give it, e.g. `2.13.0`.
pub fn libtorch_version() -> &'static str {
    // SAFETY: a pointer to a static NUL-terminated string literal in the shim.
    unsafe { CStr::from_ptr(ffi::lathe_libtorch_version()) }.to_str().unwrap_or("unknown")
}

/// Where `libtorch_cpu.so` was loaded from (its directory is the libtorch in use).
pub fn libtorch_loaded_from() -> Option<PathBuf> {
    libraries::loaded("libtorch_cpu.so")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_backend_is_linked_exactly_when_the_libtorch_ships_one() {
        assert_eq!(gpu_backend_linked(), GPU_BACKEND_LIBRARY.is_some());
    }

    #[test]
    fn a_linked_gpu_backend_is_loaded_in_this_very_test_process() {
        if let Some(name) = GPU_BACKEND_LIBRARY {
            assert!(gpu_backend_linked());
            let path = gpu_backend_loaded_from().unwrap_or_else(|| panic!("{name} is linked but not loaded"));
            assert!(path.exists(), "{}", path.display());
        }
    }

    #[test]
    fn libtorch_reports_a_dotted_version_and_its_place() {
        let version = libtorch_version();
        assert!(version.split('.').count() >= 2 && version.chars().next().unwrap().is_ascii_digit(), "{version}");
        // tch is linked (this crate depends on torch-sys), so libtorch_cpu is mapped.
        assert!(libtorch_loaded_from().is_some());
    }
}
