//! Device memory as libtorch's CUDA caching allocator counts it (`torch.cuda.memory_allocated`,
//! `max_memory_allocated`, `memory_reserved`): the numbers that decide whether a job fits a GPU.
//! Host RSS says nothing about them.

use crate::ffi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in live tensors now, and the most since the last reset.
    pub allocated: u64,
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver (live tensors plus its cache), now and at most.
    pub reserved: u64,
    pub peak_reserved: u64,
}

/// The allocator's statistics for CUDA device `index`; `None` without a usable GPU backend.
pub fn cuda_memory(index: usize) -> Option<DeviceMemory> {
    let mut out = ffi::LatheDeviceMemory::default();
    // SAFETY: `out` is a valid, writable struct of the layout the shim writes.
    let status = unsafe { ffi::lathe_cuda_memory(index as i32, &mut out) };
    (status == 0).then_some(DeviceMemory {
        allocated: out.allocated,
        peak_allocated: out.peak_allocated,
        reserved: out.reserved,
        peak_reserved: out.peak_reserved,
    })
}

/// Starts a new peak on CUDA device `index` (each training attempt reports its own).
/// False when there is no allocator to reset.
pub fn reset_cuda_peak(index: usize) -> bool {
    // SAFETY: plain value argument; the shim catches every C++ exception.
    unsafe { ffi::lathe_cuda_reset_peak_memory(index as i32) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_for_a_device_that_does_not_exist_answers_none_instead_of_aborting() {
        // No machine here has a GPU: the allocator refuses, and the shim turns the C++
        // exception into None. On a GPU machine device 4096 does not exist either.
        assert_eq!(cuda_memory(4096), None);
        assert!(!reset_cuda_peak(4096));
    }
}
