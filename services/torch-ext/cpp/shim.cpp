// What tch does not expose, from libtorch's own C++ API. Every entry point is `extern "C"`,
// catches C++ exceptions, and reports failure through its return value; `src/ffi.rs` declares
// the same signatures. Only c10 headers are used, so no CUDA toolkit is needed to build it.

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DeviceType.h>
#include <torch/version.h>

#include <cstdint>

#ifdef LATHE_GPU_BACKEND
// Defined in libtorch_cuda.so (and, hipified under the same name, in libtorch_hip.so). Declared
// here rather than included: its header pulls in the CUDA runtime headers.
namespace at::cuda {
int warp_size();
}
#endif

extern "C" {

struct LatheDeviceMemory {
  uint64_t allocated;
  uint64_t peak_allocated;
  uint64_t reserved;
  uint64_t peak_reserved;
};

const char* lathe_libtorch_version() { return TORCH_VERSION; }

// The address of a function in the GPU backend library, or null when the linked libtorch has
// none. Referencing it is what keeps the library in the binary's dependencies (see build.rs).
const void* lathe_gpu_backend_anchor() {
#ifdef LATHE_GPU_BACKEND
  return reinterpret_cast<const void*>(&at::cuda::warp_size);
#else
  return nullptr;
#endif
}

// The CUDA (or HIP) caching allocator's statistics for one device: what torch.cuda's
// memory_allocated / max_memory_allocated / memory_reserved report. 0 on success.
int lathe_cuda_memory(int device, LatheDeviceMemory* out) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out->allocated = static_cast<uint64_t>(stats.allocated_bytes[all].current);
    out->peak_allocated = static_cast<uint64_t>(stats.allocated_bytes[all].peak);
    out->reserved = static_cast<uint64_t>(stats.reserved_bytes[all].current);
    out->peak_reserved = static_cast<uint64_t>(stats.reserved_bytes[all].peak);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts a new peak: each training attempt reports its own, not the process's. 0 on success.
int lathe_cuda_reset_peak_memory(int device) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)
        ->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
