// The NCCL backend of the data-parallel process group (see dist.cpp), compiled only when the
// linked libtorch has CUDA and the NCCL and CUDA headers of its pip packages (nvidia-nccl-*,
// nvidia-cuda-runtime-*) are found: build.rs then defines LATHE_NCCL for both files. The
// symbols live in libtorch_cuda.so, which build.rs already links.

#define USE_C10D_NCCL 1

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

// Builds a ProcessGroupNCCL on `store` for the GPU `device` (this rank's cuda:N, made current
// first: NCCL binds a communicator to the device that is current when it is created).
c10::intrusive_ptr<c10d::Backend> lathe_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                  std::chrono::milliseconds timeout, int device) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
}
