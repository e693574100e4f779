//! The shim's entry points (`cpp/shim.cpp`), with the same signatures.

use std::ffi::{c_char, c_int, c_void};

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct LatheDeviceMemory {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

extern "C" {
    pub fn lathe_libtorch_version() -> *const c_char;
    pub fn lathe_gpu_backend_anchor() -> *const c_void;
    pub fn lathe_cuda_memory(device: c_int, out: *mut LatheDeviceMemory) -> c_int;
    pub fn lathe_cuda_reset_peak_memory(device: c_int) -> c_int;
}
