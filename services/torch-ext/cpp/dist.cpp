// The data-parallel process group: libtorch's own c10d (TCPStore for the rendezvous,
// ProcessGroupGloo for the collectives), driven from Rust through `src/dist.rs`. Nothing here
// implements a collective; it only builds the objects torch.distributed would build and calls
// them. Every entry point is `extern "C"`, catches C++ exceptions and copies their message
// into the caller's buffer.

#define USE_C10D_GLOO 1

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef LATHE_NCCL
c10::intrusive_ptr<c10d::Backend> lathe_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                  std::chrono::milliseconds timeout, int device);
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

void report(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  const size_t n = std::min(std::strlen(what), err_len - 1);
  std::memcpy(err, what, n);
  err[n] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    report(e.what(), err, err_len);
  } catch (...) {
    report("unknown C++ exception", err, err_len);
  }
  return -1;
}

}  // namespace

extern "C" {

// Joins (or, with is_server, hosts) the TCPStore at host:port, then builds a group of `world`
// ranks on it: NCCL on the GPU `cuda_device` when it is >= 0, else Gloo. join_timeout_ms bounds
// reaching the store, op_timeout_ms every collective. `prefix` namespaces the keys (torchrun's agent store is shared with the
// agent); `iface`, when not null, is the network interface Gloo binds (GLOO_SOCKET_IFNAME).
// Returns null on failure, with the reason in err.
void* lathe_pg_new(const char* host, uint16_t port, int rank, int world, int is_server, const char* prefix,
                   int64_t join_timeout_ms, int64_t op_timeout_ms, const char* iface, int cuda_device, char* err,
                   size_t err_len) {
  Group* group = nullptr;
  guarded(err, err_len, [&] {
    const auto timeout = std::chrono::milliseconds(join_timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = std::nullopt;  // the agent (torchrun) or rank 0 may host it
    options.waitWorkers = false;
    options.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);

    if (cuda_device >= 0) {
#ifdef LATHE_NCCL
      group = new Group{store, lathe_make_nccl(store, rank, world, std::chrono::milliseconds(op_timeout_ms), cuda_device)};
      return;
#else
      throw std::runtime_error(
          "this lathe was built without NCCL (a CPU libtorch, or the NCCL/CUDA headers of the torch wheel's nvidia "
          "packages were not found); use the gloo backend");
#endif
    }
    // Gloo's own waits, connecting the mesh included, use the collective timeout: a rank may
    // spend minutes writing a checkpoint while the others wait for it.
    auto gloo = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(op_timeout_ms));
    gloo->devices.push_back(iface != nullptr ? c10d::ProcessGroupGloo::createDeviceForInterface(iface)
                                             : c10d::ProcessGroupGloo::createDefaultDevice());
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gloo);
    group = new Group{store, backend};
  });
  return group;
}

void lathe_pg_free(void* group) { delete static_cast<Group*>(group); }

// In place, on every rank: op 0 = sum, 1 = max.
int lathe_pg_all_reduce(void* group, at::Tensor* tensor, int op, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    static_cast<Group*>(group)->backend->allreduce(tensors, options)->wait();
  });
}

// In place: every rank ends with root's values.
int lathe_pg_broadcast(void* group, at::Tensor* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    static_cast<Group*>(group)->backend->broadcast(tensors, options)->wait();
  });
}

int lathe_pg_barrier(void* group, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Group*>(group)->backend->barrier(c10d::BarrierOptions())->wait(); });
}

}  // extern "C"
