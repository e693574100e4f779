// What the CPU kernels (fused.cpp, rotary.cpp) share: bf16 <-> fp32 on raw bits, and the
// choice, at run time, of the widest vector ISA the CPU has.
//
// The kernels are plain loops the compiler vectorizes. Each is compiled once per ISA
// (simd::PerIsa: a function with LATHE_AVX512 / LATHE_AVX2 and one without, all inlining the
// same body) and simd::isa() picks one. Floating-point contraction is off (build.rs), so the
// variants round alike and give the same bits; tests compare them (lathe_cpu_kernel_set_isa_cap).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#define LATHE_AVX2 __attribute__((target("avx2")))
#define LATHE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace lathe {

// bf16 <-> fp32 on raw bits, with c10::BFloat16's rounding (to nearest even; NaN → 0x7FC0),
// written without branches so that loops over them vectorize.
namespace bf16 {
inline float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

inline float round(float f) { return to_float(from_float(f)); }
}  // namespace bf16

namespace simd {

// The widest ISA to use (0 baseline, 1 AVX2, 2 AVX-512); lowered by tests to compare variants.
inline std::atomic<int> isa_cap{2};

// The widest vector ISA this CPU has, within isa_cap.
inline int isa() {
#if defined(__x86_64__)
    static const int have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                    __builtin_cpu_supports("avx512vl")
                                ? 2
                                : (__builtin_cpu_supports("avx2") ? 1 : 0);
    return std::min(have, isa_cap.load());
#else
    return 0;
#endif
}

// A row kernel `Rows(args, begin, end)` compiled for each ISA, and the one this CPU runs.
// `Rows` must be always_inline, so that each variant is the body compiled for its ISA rather
// than a call into one baseline copy.
template <typename Args, void (*Rows)(const Args&, int64_t, int64_t)>
struct PerIsa {
    using Kernel = void (*)(const Args&, int64_t, int64_t);

    static void baseline(const Args& a, int64_t begin, int64_t end) { Rows(a, begin, end); }
#if defined(__x86_64__)
    LATHE_AVX2 static void avx2(const Args& a, int64_t begin, int64_t end) { Rows(a, begin, end); }
    LATHE_AVX512 static void avx512(const Args& a, int64_t begin, int64_t end) { Rows(a, begin, end); }
#endif

    static Kernel pick() {
#if defined(__x86_64__)
        switch (isa()) {
            case 2: return avx512;
            case 1: return avx2;
            default: break;
        }
#endif
        return baseline;
    }
};

}  // namespace simd
}  // namespace lathe
