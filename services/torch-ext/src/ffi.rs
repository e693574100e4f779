//! The shim's entry points (`cpp/*.cpp`), with the same signatures, and how their failures are
//! read: a call that can fail takes `err`/`err_len`, a buffer the C++ side copies the
//! exception's message into (`cpp/error.h`), and returns null or nonzero.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

/// The buffer a failing call writes its message into.
pub struct ErrorBuffer(Vec<c_char>);

impl Default for ErrorBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl ErrorBuffer {
    /// Room for c10d's messages, which carry a backtrace after the first line.
    pub const LEN: usize = 2048;

    pub fn new() -> Self {
        ErrorBuffer(vec![0; Self::LEN])
    }

    pub fn as_mut_ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }

    /// What the call wrote, trimmed (the buffer is always NUL-terminated).
    pub fn message(&self) -> String {
        unsafe { CStr::from_ptr(self.0.as_ptr()) }.to_string_lossy().trim().to_string()
    }
}

/// A call that returns a new tensor, or null with its message in the buffer.
pub fn new_tensor(f: impl FnOnce(*mut c_char, usize) -> *mut torch_sys::C_tensor) -> Result<Tensor, String> {
    let mut err = ErrorBuffer::new();
    let ptr = f(err.as_mut_ptr(), ErrorBuffer::LEN);
    if ptr.is_null() {
        return Err(err.message());
    }
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// A call that returns 0, or nonzero with its message in the buffer.
pub fn status(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = ErrorBuffer::new();
    match f(err.as_mut_ptr(), ErrorBuffer::LEN) {
        0 => Ok(()),
        _ => Err(err.message()),
    }
}

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

// cpp/dist.cpp: the c10d process group. `tensor` is tch's `C_tensor`, an `at::Tensor*`.
extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub fn lathe_pg_new(
        host: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        is_server: c_int,
        prefix: *const c_char,
        join_timeout_ms: i64,
        op_timeout_ms: i64,
        iface: *const c_char,
        cuda_device: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    pub fn lathe_pg_free(group: *mut c_void);
    pub fn lathe_pg_all_reduce(group: *mut c_void, tensor: *mut torch_sys::C_tensor, op: c_int, err: *mut c_char, err_len: usize) -> c_int;
    pub fn lathe_pg_broadcast(group: *mut c_void, tensor: *mut torch_sys::C_tensor, root: c_int, err: *mut c_char, err_len: usize)
        -> c_int;
    pub fn lathe_pg_barrier(group: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

// cpp/nf4.cpp: NF4 weights. A null result means `err` holds the message.
/// One NF4 weight (`struct LatheNf4`); `absmax2` and `code2` are null without double quantization.
#[repr(C)]
pub struct LatheNf4 {
    pub packed: *mut torch_sys::C_tensor,
    pub absmax: *mut torch_sys::C_tensor,
    pub absmax2: *mut torch_sys::C_tensor,
    pub code2: *mut torch_sys::C_tensor,
    pub offset: f64,
    pub blocksize: i64,
    pub blocksize2: i64,
    pub out_features: i64,
    pub in_features: i64,
}

extern "C" {
    pub fn lathe_nf4_dequantize(w: *const LatheNf4, dtype: c_int, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
    pub fn lathe_nf4_matmul(x: *mut torch_sys::C_tensor, w: *const LatheNf4, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
}

// cpp/profile.cpp: libtorch's op profiler. 0 on success, else -1 with `err` set.
extern "C" {
    pub fn lathe_profiler_start(err: *mut c_char, err_len: usize) -> c_int;
    pub fn lathe_profiler_stop(path: *const c_char, err: *mut c_char, err_len: usize) -> c_int;
}

// cpp/fused.cpp: one-pass RMSNorm and SwiGLU (CPU), and the vector ISA of the CPU kernels. A null
// result means `err` holds the message.
extern "C" {
    pub fn lathe_rms_norm(
        x: *mut torch_sys::C_tensor,
        weight: *mut torch_sys::C_tensor,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
    pub fn lathe_swiglu(z: *mut torch_sys::C_tensor, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
    /// Tests compare the kernels' ISA variants with it.
    #[cfg(test)]
    pub fn lathe_cpu_kernel_set_isa_cap(cap: c_int) -> c_int;
    pub fn lathe_cpu_kernel_isa() -> c_int;
}

// cpp/rotary.cpp: rotary position embedding (CPU). A null result means `err` holds the message.
extern "C" {
    pub fn lathe_rotary(
        x: *mut torch_sys::C_tensor,
        cos: *mut torch_sys::C_tensor,
        sin: *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
}

// cpp/loss.cpp: cross-entropy over the output head in chunks. 0 on success, else -1 with `err` set.
extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub fn lathe_linear_cross_entropy(
        hidden: *mut torch_sys::C_tensor,
        weight: *mut torch_sys::C_tensor,
        targets: *mut torch_sys::C_tensor,
        ignore_index: i64,
        chunk_rows: i64,
        loss_out: *mut *mut torch_sys::C_tensor,
        correct_out: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}
