// Rotary position embedding on the CPU as one autograd function: x·cos + rotate_half(x)·sin,
// one pass forward and one backward.
//
// Why: as tensor ops (as transformers writes it) it is five passes forward (two multiplies, a
// negation, a concatenation, an add) and, backward, two multiplies, zero-filled gradients for
// the two halves and three accumulations into the input's gradient. Here each output element
// is computed from the same rounded intermediates the tensor ops store (each product rounded to
// the dtype, then the sum), so results are the tensor-op version's bit for bit; the gradient of
// x needs no saved tensor but cos and sin.
//
// Shapes: x (B, H, T, D) with a contiguous last axis (any other strides: q and k arrive as a
// transposed view of the per-head norm's output), cos and sin (B, 1, T, D) or (1, 1, T, D). The
// output is laid out like x, as ATen's elementwise ops lay theirs out.

#include "error.h"
#include "simd.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <exception>
#include <vector>

namespace {

struct Bf16 {
    using T = uint16_t;
    static float load(T v) { return lathe::bf16::to_float(v); }
    static T store(float f) { return lathe::bf16::from_float(f); }
};

struct F32 {
    using T = float;
    static float load(T v) { return v; }
    static T store(float f) { return f; }
};

// Element strides of a (B, H, T, D) tensor along B, H and T.
struct Strides {
    int64_t b, h, t;

    static Strides of(const at::Tensor& x) {
        TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "expected a (B, H, T, D) tensor with a contiguous last axis");
        return {x.stride(0), x.stride(1), x.stride(2)};
    }
};

// Rows (b, h, t) in order from a starting row, one step at a time: a division per row would
// cost more than the row's arithmetic (D/2 = 32 pairs).
struct Cursor {
    int64_t heads, steps, b, h, t;

    Cursor(int64_t row, int64_t heads, int64_t steps)
        : heads(heads), steps(steps), b(row / (heads * steps)), h((row / steps) % heads), t(row % steps) {}

    inline int64_t at(const Strides& s) const { return b * s.b + h * s.h + t * s.t; }

    inline void next() {
        if (++t == steps) {
            t = 0;
            if (++h == heads) {
                h = 0;
                ++b;
            }
        }
    }
};

template <typename E>
struct Args {
    int64_t heads, steps, d;
    Strides in, out, table;  // table: cos and sin, whose head stride is 0 (broadcast)
    const typename E::T* x;  // forward: x; backward: the output gradient
    const typename E::T* cos;
    const typename E::T* sin;
    typename E::T* y;  // forward: the output; backward: x's gradient
};

// One row: y = round(round(x·cos) + round(rotate_half(x)·sin)), rotate_half(x) = [−x₂, x₁].
// (Rows are separate functions on restrict pointers: written inline in the row loop, GCC does
// not vectorize them.)
template <typename E>
__attribute__((always_inline)) inline void forward_row(const typename E::T* __restrict__ x, const typename E::T* __restrict__ c,
                                                       const typename E::T* __restrict__ s, typename E::T* __restrict__ y,
                                                       int64_t half) {
    for (int64_t j = 0; j < half; ++j) {
        const float x1 = E::load(x[j]), x2 = E::load(x[j + half]);
        const float lo = E::load(E::store(x1 * E::load(c[j]))) + E::load(E::store(-x2 * E::load(s[j])));
        const float hi = E::load(E::store(x2 * E::load(c[j + half]))) + E::load(E::store(x1 * E::load(s[j + half])));
        y[j] = E::store(lo);
        y[j + half] = E::store(hi);
    }
}

// One row of the backward pass: dx = round(round(g·cos) + rotate_half's backward of
// round(g·sin)), which sends the second half of round(g·sin) to x₁ and its negated first half
// to x₂.
template <typename E>
__attribute__((always_inline)) inline void backward_row(const typename E::T* __restrict__ g, const typename E::T* __restrict__ c,
                                                        const typename E::T* __restrict__ s, typename E::T* __restrict__ dx,
                                                        int64_t half) {
    for (int64_t j = 0; j < half; ++j) {
        const float g1 = E::load(g[j]), g2 = E::load(g[j + half]);
        const float lo = E::load(E::store(g1 * E::load(c[j]))) + E::load(E::store(g2 * E::load(s[j + half])));
        const float hi = E::load(E::store(g2 * E::load(c[j + half]))) - E::load(E::store(g1 * E::load(s[j])));
        dx[j] = E::store(lo);
        dx[j + half] = E::store(hi);
    }
}

template <typename E>
__attribute__((always_inline)) inline void forward_rows(const Args<E>& a, int64_t begin, int64_t end) {
    for (Cursor c(begin, a.heads, a.steps); begin < end; ++begin, c.next()) {
        const int64_t t = c.at(a.table);
        forward_row<E>(a.x + c.at(a.in), a.cos + t, a.sin + t, a.y + c.at(a.out), a.d / 2);
    }
}

template <typename E>
__attribute__((always_inline)) inline void backward_rows(const Args<E>& a, int64_t begin, int64_t end) {
    for (Cursor c(begin, a.heads, a.steps); begin < end; ++begin, c.next()) {
        const int64_t t = c.at(a.table);
        backward_row<E>(a.x + c.at(a.in), a.cos + t, a.sin + t, a.y + c.at(a.out), a.d / 2);
    }
}

template <typename E>
using Kernel = void (*)(const Args<E>&, int64_t, int64_t);

template <typename E>
void forward_baseline(const Args<E>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
template <typename E>
void backward_baseline(const Args<E>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }
#if defined(__x86_64__)
template <typename E>
LATHE_AVX2 void forward_avx2(const Args<E>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
template <typename E>
LATHE_AVX2 void backward_avx2(const Args<E>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }
template <typename E>
LATHE_AVX512 void forward_avx512(const Args<E>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
template <typename E>
LATHE_AVX512 void backward_avx512(const Args<E>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }
#endif

template <typename E>
Kernel<E> kernel(bool backward) {
#if defined(__x86_64__)
    switch (lathe::simd::isa()) {
        case 2: return backward ? backward_avx512<E> : forward_avx512<E>;
        case 1: return backward ? backward_avx2<E> : forward_avx2<E>;
        default: break;
    }
#endif
    return backward ? backward_baseline<E> : forward_baseline<E>;
}

// One pass over `in` (x, or the output gradient) into a new tensor laid out like it.
at::Tensor run(const at::Tensor& in_any, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
    auto in = in_any.stride(-1) == 1 ? in_any : in_any.contiguous();
    auto out = at::empty_like(in);
    const int64_t rows = in.size(0) * in.size(1) * in.size(2);
    const Strides table = Strides::of(cos);
    auto go = [&](auto codec) {
        using E = decltype(codec);
        using T = typename E::T;
        const Args<E> args{in.size(1),
                           in.size(2),
                           in.size(3),
                           Strides::of(in),
                           Strides::of(out),
                           // A batch of one table serves every sequence.
                           {cos.size(0) == 1 ? 0 : table.b, 0, table.t},
                           reinterpret_cast<const T*>(in.const_data_ptr()),
                           reinterpret_cast<const T*>(cos.const_data_ptr()),
                           reinterpret_cast<const T*>(sin.const_data_ptr()),
                           reinterpret_cast<T*>(out.data_ptr())};
        const auto k = kernel<E>(backward);
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) { k(args, begin, end); });
    };
    if (in.scalar_type() == at::kBFloat16) {
        go(Bf16{});
    } else {
        go(F32{});
    }
    return out;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Rotary : public torch::autograd::Function<Rotary> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
        RECORD_FUNCTION("lathe::rotary", std::vector<c10::IValue>{});
        TORCH_CHECK(x.device().is_cpu(), "the rotary kernel runs on the CPU only");
        TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                    "the rotary kernel takes bf16 or fp32, got ", x.scalar_type());
        TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "expected x (B, H, T, D) with an even D, got ", x.sizes());
        auto cos = cos_in.to(x.scalar_type()).contiguous(), sin = sin_in.to(x.scalar_type()).contiguous();
        const std::vector<int64_t> table{cos.size(0) == 1 ? 1 : x.size(0), 1, x.size(2), x.size(3)};
        TORCH_CHECK(cos.sizes() == table && sin.sizes() == table, "expected cos and sin of ", at::IntArrayRef(table),
                    " (or a batch of 1), got ", cos.sizes(), " and ", sin.sizes());
        ctx->save_for_backward({cos, sin});
        return run(x, cos, sin, false);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        auto saved = ctx->get_saved_variables();
        return {run(grad_outputs[0], saved[0], saved[1], true), at::Tensor(), at::Tensor()};
    }
};

}  // namespace

extern "C" {

// x·cos + rotate_half(x)·sin (CPU, bf16 or fp32); null with `err` set on failure.
at::Tensor* lathe_rotary(at::Tensor* x, at::Tensor* cos, at::Tensor* sin, char* err, size_t err_len) {
    try {
        return new at::Tensor(Rotary::apply(*x, *cos, *sin));
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
