// libtorch's own op profiler (Kineto, CPU activity), for `[debug] profile_step`: the trainer wraps one
// optimizer step in start/stop and the trace lands where torch.profiler's `export_chrome_trace`
// would write it, so bench/profile_ops.py reads Lathe's and transformers' traces alike.

#include "error.h"
#include <cstring>
#include <string>

#include <torch/csrc/autograd/profiler_kineto.h>

extern "C" {

// Starts recording every ATen op on this thread (and the autograd engine's); 0, or -1 with `err`.
int lathe_profiler_start(char* err, size_t err_len) {
    try {
        using namespace torch::profiler::impl;
        ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
        std::set<ActivityType> activities{ActivityType::CPU};
        torch::autograd::profiler::prepareProfiler(config, activities);
        torch::autograd::profiler::enableProfiler(config, activities);
        return 0;
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return -1;
    }
}

// Stops recording and writes the Chrome trace to `path`; 0, or -1 with `err`.
int lathe_profiler_stop(const char* path, char* err, size_t err_len) {
    try {
        auto result = torch::autograd::profiler::disableProfiler();
        result->save(std::string(path));
        return 0;
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return -1;
    }
}

}  // extern "C"
