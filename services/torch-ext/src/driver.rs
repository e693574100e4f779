//! The NVIDIA driver's own account of the GPUs, through its C API (`libcuda.so.1`, opened at
//! run time: a machine without the driver still runs every other command). libtorch only says
//! how many devices it sees; the driver says which they are, how much memory they have, and
//! which driver version is installed, and it answers even when libtorch cannot use them.
//! NCCL's version is read the same way from the library libtorch's backend loaded.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

/// What the driver reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Driver {
    /// e.g. (13, 0) for driver API 13.0.
    pub version: (i32, i32),
    pub devices: Vec<DriverDevice>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DriverDevice {
    pub index: usize,
    pub name: String,
    pub total_memory_bytes: u64,
    /// Compute capability; 8.0 (Ampere) and newer multiply bf16 natively.
    pub compute_capability: (i32, i32),
}

impl DriverDevice {
    pub fn bf16(&self) -> bool {
        self.compute_capability.0 >= 8
    }
}

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuIntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuGetErrorString = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

/// Asks the CUDA driver. `Err` says why it could not answer (no driver library, or its error
/// for `cuInit`, e.g. "no CUDA-capable device is detected").
pub fn cuda_driver() -> Result<Driver, String> {
    let lib = Library::open("libcuda.so.1")
        .ok_or("the NVIDIA driver library libcuda.so.1 is not installed (or not visible in this container)")?;
    // SAFETY: each symbol is cast to the signature the CUDA driver API documents for it.
    unsafe {
        let init: CuInit = lib.symbol("cuInit")?;
        let driver_version: CuIntOut = lib.symbol("cuDriverGetVersion")?;
        let device_count: CuIntOut = lib.symbol("cuDeviceGetCount")?;
        let device_get: CuDeviceGet = lib.symbol("cuDeviceGet")?;
        let device_name: CuDeviceGetName = lib.symbol("cuDeviceGetName")?;
        let total_mem: CuDeviceTotalMem = lib.symbol("cuDeviceTotalMem_v2")?;
        let attribute: CuDeviceGetAttribute = lib.symbol("cuDeviceGetAttribute")?;
        let error_string: Option<CuGetErrorString> = lib.symbol("cuGetErrorString").ok();
        let check = |what: &str, code: c_int| -> Result<(), String> {
            if code == 0 {
                return Ok(());
            }
            let mut text: *const c_char = std::ptr::null();
            let message = match error_string {
                Some(f) if f(code, &mut text) == 0 && !text.is_null() => CStr::from_ptr(text).to_string_lossy().into_owned(),
                _ => "unknown error".into(),
            };
            Err(format!("{what} failed: {message} (CUDA error {code})"))
        };

        let mut version = 0;
        check("cuDriverGetVersion", driver_version(&mut version))?;
        let version = (version / 1000, (version % 1000) / 10);
        check("cuInit", init(0))?;
        let mut count = 0;
        check("cuDeviceGetCount", device_count(&mut count))?;
        let mut devices = Vec::new();
        for index in 0..count {
            let mut device = 0;
            check("cuDeviceGet", device_get(&mut device, index))?;
            let mut name = [0 as c_char; 256];
            check("cuDeviceGetName", device_name(name.as_mut_ptr(), name.len() as c_int, device))?;
            let mut bytes = 0usize;
            check("cuDeviceTotalMem", total_mem(&mut bytes, device))?;
            let (mut major, mut minor) = (0, 0);
            check("cuDeviceGetAttribute", attribute(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))?;
            check("cuDeviceGetAttribute", attribute(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))?;
            devices.push(DriverDevice {
                index: index as usize,
                name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                total_memory_bytes: bytes as u64,
                compute_capability: (major, minor),
            });
        }
        Ok(Driver { version, devices })
    }
}

/// NCCL's version (e.g. (2, 27, 3)) if a NCCL library is loaded in this process; libtorch's
/// CUDA backend loads it, so `None` on a CUDA build means no multi-GPU collectives.
pub fn nccl_version() -> Option<(i32, i32, i32)> {
    // SAFETY: RTLD_DEFAULT searches the libraries already loaded; the signature is NCCL's.
    unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"ncclGetVersion".as_ptr());
        if symbol.is_null() {
            return None;
        }
        let get_version: CuIntOut = std::mem::transmute::<*mut c_void, CuIntOut>(symbol);
        let mut code = 0;
        if get_version(&mut code) != 0 {
            return None;
        }
        // Since NCCL 2.9: major * 10000 + minor * 100 + patch.
        Some((code / 10000, (code % 10000) / 100, code % 100))
    }
}

/// A library opened with dlopen, closed on drop.
struct Library(*mut c_void);

impl Library {
    fn open(name: &str) -> Option<Library> {
        let name = CString::new(name).ok()?;
        // SAFETY: a valid C string; the handle is closed in Drop.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        (!handle.is_null()).then(|| Library(handle))
    }

    /// # Safety
    /// `T` must be the function pointer type of the symbol's real signature.
    unsafe fn symbol<T: Copy>(&self, name: &str) -> Result<T, String> {
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let symbol = libc::dlsym(self.0, c_name.as_ptr());
        if symbol.is_null() {
            return Err(format!("the driver library has no {name} (driver too old?)"));
        }
        Ok(std::mem::transmute_copy::<*mut c_void, T>(&symbol))
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and no symbol outlives `self`'s users.
        unsafe { libc::dlclose(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_the_answer_says_what_is_missing() {
        match cuda_driver() {
            // A GPU machine: every device has a name and memory.
            Ok(driver) => assert!(driver.devices.iter().all(|d| !d.name.is_empty() && d.total_memory_bytes > 0)),
            Err(reason) => assert!(reason.contains("libcuda.so.1") || reason.contains("cuInit"), "{reason}"),
        }
    }

    #[test]
    fn compute_capability_eight_and_newer_multiplies_bf16() {
        let device = |major| DriverDevice { index: 0, name: "x".into(), total_memory_bytes: 1, compute_capability: (major, 0) };
        assert!(device(8).bf16() && device(9).bf16());
        assert!(!device(7).bf16());
    }
}
