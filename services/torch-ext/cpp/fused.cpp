// The elementwise work around the matmuls of a decoder layer, as libtorch autograd functions:
// RMSNorm (a one-pass CPU kernel) and SwiGLU (ATen's vectorized ops, any device).
//
// Why: written as tensor ops (as transformers does), RMSNorm is ~10 passes over the activations
// forward and backward (dtype casts, pow, mean, rsqrt, two multiplies, and their backward) and
// keeps an fp32 copy of its input for the backward pass; here it is one pass each way, saving
// only the input and one fp32 scale per row. Statistics are in fp32 and the normalized value is
// rounded to the activations' dtype before the weight multiplies it, as in transformers, so bf16
// results match the tensor-op version up to fp32 summation order, and fp32 results to ~1e-7.
// Only CPU tensors come to RMSNorm; other devices keep the tensor-op version (the Rust side
// chooses).
//
// The bf16 RMSNorm loops are written on raw bits, branch-free, so the compiler vectorizes them,
// and compiled once per ISA (simd.h). The lanes of the sums are fixed at 8, so every variant
// gives the same bits.
//
// SwiGLU is not a hand-written loop: scalar bf16 conversions in a loop cost more than ATen's
// vectorized kernels save in passes (docs/architecture.md §6), so it reuses those kernels and
// only changes what is kept and allocated.

#include "error.h"
#include "simd.h"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/InferSize.h>
#include <ATen/TensorUtils.h>
#include <ATen/record_function.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

namespace {

// `v` rounded to scalar_t and back: where the tensor-op version stores an intermediate.
template <typename scalar_t>
inline float round_to(float v) {
    return static_cast<float>(static_cast<scalar_t>(v));
}

// Rows of the last axis: `x` viewed as (outer, inner, d) with unit stride along d, so q/k heads
// that are views into a fused q/k/v output need no copy. Row r starts at
// (r / inner) * stride0 + (r % inner) * stride1 (RowCursor walks them).
struct Rows {
    int64_t count, inner, d, stride0, stride1;

    static Rows of(const at::Tensor& x) {
        TORCH_CHECK(x.dim() >= 2, "expected at least 2 dimensions, got ", x.dim());
        auto v = x.dim() == 2 ? x.view({x.size(0), 1, x.size(1)}) : x.view({-1, x.size(-2), x.size(-1)});
        TORCH_CHECK(v.stride(2) == 1, "the last axis must be contiguous");
        return {v.size(0) * v.size(1), v.size(1), v.size(2), v.stride(0), v.stride(1)};
    }
};

// Rows from a starting row, one step at a time, without a division per row (which costs as
// much as a short row's arithmetic: q/k heads are 64-128 wide).
struct RowCursor {
    const Rows& rows;
    int64_t outer, in;

    RowCursor(const Rows& rows, int64_t row) : rows(rows), outer(row / rows.inner), in(row % rows.inner) {}

    inline int64_t offset() const { return outer * rows.stride0 + in * rows.stride1; }

    inline void next() {
        if (++in == rows.inner) {
            in = 0;
            ++outer;
        }
    }
};

// Whether `x` can be addressed as Rows (a view, not a copy).
bool rows_addressable(const at::Tensor& x) {
    if (x.dim() < 2 || x.stride(-1) != 1) return false;
    std::vector<int64_t> target = {-1, x.size(-2), x.size(-1)};
    if (x.dim() == 2) target = {x.size(0), 1, x.size(1)};
    return at::detail::computeStride(x.sizes(), x.strides(), at::infer_size_dv(target, x.numel())).has_value();
}

at::Tensor addressable(const at::Tensor& x) { return rows_addressable(x) ? x : x.contiguous(); }

// One call's worth of bf16 RMSNorm rows (see Rows for the addressing of x).
struct Bf16NormArgs {
    Rows rows;
    const uint16_t* x;
    const uint16_t* w;
    const uint16_t* g;  // backward only: the output gradient, contiguous
    uint16_t* out;      // y (forward) or dx (backward), contiguous
    float* rstd;        // written by forward, read by backward
    float eps;
};

constexpr int kLanes = 8;

// Σ over 8 lanes in a fixed order (the scalar kernels' order too).
inline float lane_sum(const float* acc) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

__attribute__((always_inline)) inline void bf16_norm_forward_rows(const Bf16NormArgs& a, int64_t begin, int64_t end) {
    const int64_t d = a.rows.d;
    for (RowCursor cursor(a.rows, begin); begin < end; ++begin, cursor.next()) {
        const int64_t r = begin;
        const uint16_t* xr = a.x + cursor.offset();
        uint16_t* yr = a.out + r * d;
        float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + kLanes <= d; j += kLanes)
            for (int k = 0; k < kLanes; ++k) {
                const float v = lathe::bf16::to_float(xr[j + k]);
                acc[k] += v * v;
            }
        float ss = lane_sum(acc);
        for (; j < d; ++j) ss += lathe::bf16::to_float(xr[j]) * lathe::bf16::to_float(xr[j]);
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + a.eps);
        a.rstd[r] = inv;
        for (j = 0; j < d; ++j)
            yr[j] = lathe::bf16::from_float(lathe::bf16::to_float(a.w[j]) * lathe::bf16::round(lathe::bf16::to_float(xr[j]) * inv));
    }
}

// One row of the backward pass; `gn` is scratch of d floats. (A function of its own on restrict
// pointers: inline in the row loop, GCC does not vectorize the last loop.)
__attribute__((always_inline)) inline void bf16_norm_backward_row(const uint16_t* __restrict__ xr, const uint16_t* __restrict__ gr,
                                                                  const uint16_t* __restrict__ w, float inv, int64_t d,
                                                                  float* __restrict__ gn, uint16_t* __restrict__ orow) {
    float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            gn[j + k] = lathe::bf16::round(lathe::bf16::to_float(gr[j + k]) * lathe::bf16::to_float(w[j + k]));
            acc[k] += gn[j + k] * lathe::bf16::to_float(xr[j + k]);
        }
    float dot = lane_sum(acc);
    for (; j < d; ++j) {
        gn[j] = lathe::bf16::round(lathe::bf16::to_float(gr[j]) * lathe::bf16::to_float(w[j]));
        dot += gn[j] * lathe::bf16::to_float(xr[j]);
    }
    const float c = -dot * inv * inv * inv / static_cast<float>(d);
    for (j = 0; j < d; ++j) orow[j] = lathe::bf16::from_float(gn[j] * inv + lathe::bf16::to_float(xr[j]) * c);
}

__attribute__((always_inline)) inline void bf16_norm_backward_rows(const Bf16NormArgs& a, int64_t begin, int64_t end) {
    const int64_t d = a.rows.d;
    std::vector<float> gn(d);
    for (RowCursor cursor(a.rows, begin); begin < end; ++begin, cursor.next()) {
        bf16_norm_backward_row(a.x + cursor.offset(), a.g + begin * d, a.w, a.rstd[begin], d, gn.data(), a.out + begin * d);
    }
}

using Bf16NormForward = lathe::simd::PerIsa<Bf16NormArgs, bf16_norm_forward_rows>;
using Bf16NormBackward = lathe::simd::PerIsa<Bf16NormArgs, bf16_norm_backward_rows>;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = w · round(x / rms(x)), rms over the last axis in fp32.
struct RmsNorm : public torch::autograd::Function<RmsNorm> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
        RECORD_FUNCTION("lathe::rms_norm", std::vector<c10::IValue>{});
        auto x = addressable(x_in);
        auto weight = weight_in.to(x.scalar_type()).contiguous();
        Rows rows = Rows::of(x);
        TORCH_CHECK(weight.numel() == rows.d, "weight has ", weight.numel(), " elements for a last axis of ", rows.d);
        auto y = at::empty(x.sizes(), x.options());
        auto rstd = at::empty({rows.count}, x.options().dtype(at::kFloat));
        if (x.scalar_type() == at::kBFloat16) {
            const Bf16NormArgs args{rows, reinterpret_cast<const uint16_t*>(x.const_data_ptr()),
                                    reinterpret_cast<const uint16_t*>(weight.const_data_ptr()), nullptr,
                                    reinterpret_cast<uint16_t*>(y.data_ptr()), rstd.data_ptr<float>(), static_cast<float>(eps)};
            const auto kernel = Bf16NormForward::pick();
            at::parallel_for(0, rows.count, 16, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
            ctx->save_for_backward({x, weight, rstd});
            return y;
        }
        AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, x.scalar_type(), "lathe_rms_norm", [&] {
            const scalar_t* xp = x.const_data_ptr<scalar_t>();
            const scalar_t* wp = weight.const_data_ptr<scalar_t>();
            scalar_t* yp = y.data_ptr<scalar_t>();
            float* rp = rstd.data_ptr<float>();
            const int64_t d = rows.d;
            at::parallel_for(0, rows.count, 16, [&](int64_t begin, int64_t end) {
                RowCursor cursor(rows, begin);
                for (int64_t r = begin; r < end; ++r, cursor.next()) {
                    const scalar_t* xr = xp + cursor.offset();
                    scalar_t* yr = yp + r * d;
                    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                    int64_t j = 0;
                    for (; j + 8 <= d; j += 8)
                        for (int k = 0; k < 8; ++k) {
                            float v = static_cast<float>(xr[j + k]);
                            acc[k] += v * v;
                        }
                    float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                    for (; j < d; ++j) ss += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
                    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
                    rp[r] = inv;
                    for (j = 0; j < d; ++j) {
                        float normed = round_to<scalar_t>(static_cast<float>(xr[j]) * inv);
                        yr[j] = static_cast<scalar_t>(static_cast<float>(wp[j]) * normed);
                    }
                }
            });
        });
        ctx->save_for_backward({x, weight, rstd});
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        auto saved = ctx->get_saved_variables();
        auto x = saved[0], weight = saved[1], rstd = saved[2];
        auto g = grad_outputs[0].to(x.scalar_type()).contiguous();
        Rows rows = Rows::of(x);
        auto gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
        if (x.scalar_type() == at::kBFloat16) {
            const Bf16NormArgs args{rows, reinterpret_cast<const uint16_t*>(x.const_data_ptr()),
                                    reinterpret_cast<const uint16_t*>(weight.const_data_ptr()),
                                    reinterpret_cast<const uint16_t*>(g.const_data_ptr()),
                                    reinterpret_cast<uint16_t*>(gx.data_ptr()), rstd.data_ptr<float>(), 0.0f};
            const auto kernel = Bf16NormBackward::pick();
            at::parallel_for(0, rows.count, 16, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
        } else {
            AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, x.scalar_type(), "lathe_rms_norm_backward", [&] {
                const scalar_t* xp = x.const_data_ptr<scalar_t>();
                const scalar_t* wp = weight.const_data_ptr<scalar_t>();
                const scalar_t* gp = g.const_data_ptr<scalar_t>();
                const float* rp = rstd.const_data_ptr<float>();
                scalar_t* op = gx.data_ptr<scalar_t>();
                const int64_t d = rows.d;
                at::parallel_for(0, rows.count, 16, [&](int64_t begin, int64_t end) {
                    std::vector<float> gn(d);
                    RowCursor cursor(rows, begin);
                    for (int64_t r = begin; r < end; ++r, cursor.next()) {
                        const scalar_t* xr = xp + cursor.offset();
                        const scalar_t* gr = gp + r * d;
                        float dot = 0;
                        for (int64_t j = 0; j < d; ++j) {
                            gn[j] = round_to<scalar_t>(static_cast<float>(gr[j]) * static_cast<float>(wp[j]));
                            dot += gn[j] * static_cast<float>(xr[j]);
                        }
                        const float inv = rp[r];
                        const float c = -dot * inv * inv * inv / static_cast<float>(d);
                        scalar_t* orow = op + r * d;
                        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<scalar_t>(gn[j] * inv + static_cast<float>(xr[j]) * c);
                    }
                });
            });
        }
        at::Tensor gw;
        if (ctx->needs_input_grad(1)) {
            auto x3 = x.reshape({-1, rows.d}).to(at::kFloat);
            auto normed = (x3 * rstd.unsqueeze(1)).to(x.scalar_type()).to(at::kFloat);
            gw = (g.reshape({-1, rows.d}).to(at::kFloat) * normed).sum(0).to(x.scalar_type());
        }
        return {gx, gw, at::Tensor()};
    }
};

// z (…, 2I) = [gate | up] → silu(gate) · up (…, I), saving only z. Written with ATen's
// vectorized silu, mul and silu_backward: the very ops autograd runs for `silu(gate) * up`, so
// the results are identical, but autograd keeps silu(gate) for the backward pass (as many bytes
// as the output) and allocates each gradient half on its own before concatenating them for the
// fused gate/up projection; here silu(gate) is recomputed and both halves are written into one
// tensor in place.
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z) {
        RECORD_FUNCTION("lathe::swiglu", std::vector<c10::IValue>{});
        const int64_t width = z.size(-1);
        TORCH_CHECK(width % 2 == 0, "the last axis (", width, ") must hold gate and up halves");
        const int64_t half = width / 2;
        auto y = at::silu(z.narrow(-1, 0, half));
        y.mul_(z.narrow(-1, half, half));
        ctx->save_for_backward({z});
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        auto z = ctx->get_saved_variables()[0];
        const auto& g = grad_outputs[0];
        const int64_t half = z.size(-1) / 2;
        auto gate = z.narrow(-1, 0, half), up = z.narrow(-1, half, half);
        auto gz = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
        auto g_gate = gz.narrow(-1, 0, half), g_up = gz.narrow(-1, half, half);
        at::mul_out(g_up, g, at::silu(gate));
        at::silu_backward_out(g_gate, g * up, gate);
        return {gz};
    }
};

}  // namespace

extern "C" {

// RMSNorm of `x` over its last axis with `weight`; null with `err` set on failure.
at::Tensor* lathe_rms_norm(at::Tensor* x, at::Tensor* weight, double eps, char* err, size_t err_len) {
    try {
        return new at::Tensor(RmsNorm::apply(*x, *weight, eps));
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return nullptr;
    }
}

// Caps the vector ISA of the CPU kernels (RMSNorm, rotary; 0 baseline, 1 AVX2, 2 AVX-512; the
// CPU's own limit still applies) and returns the previous cap. For tests that compare the
// variants.
int lathe_cpu_kernel_set_isa_cap(int cap) { return lathe::simd::isa_cap.exchange(cap); }

// The vector ISA the CPU kernels use now (see lathe_cpu_kernel_set_isa_cap).
int lathe_cpu_kernel_isa() { return lathe::simd::isa(); }

// silu(gate) · up for z = [gate | up] along the last axis; null with `err` set on failure.
at::Tensor* lathe_swiglu(at::Tensor* z, char* err, size_t err_len) {
    try {
        return new at::Tensor(SwiGlu::apply(*z));
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
