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

// One row. Forward: y = round(round(x·cos) + round(rotate_half(x)·sin)) with rotate_half(x) =
// [−x₂, x₁]. Backward: dx = round(round(g·cos) + rotate_half's backward of round(g·sin)), which
// sends the second half of round(g·sin) to x₁ and its negated first half to x₂. Both are
//   lo = round(a₁·cos₁) − σ·round(a₂·s_lo),  hi = round(a₂·cos₂) + σ·round(a₁·s_hi)
// with σ = 1, (s_lo, s_hi) = (sin₁, sin₂) forward and σ = −1, (sin₂, sin₁) backward; rounding
// is symmetric in sign, so round(−a·s) = −round(a·s) and these are the tensor ops' bits.
// (Rows are functions of their own on restrict pointers: written inline in the row loop, GCC
// does not vectorize them.)
template <typename E, bool Backward>
__attribute__((always_inline)) inline void row(const typename E::T* __restrict__ a, const typename E::T* __restrict__ c,
                                               const typename E::T* __restrict__ s, typename E::T* __restrict__ out,
                                               int64_t half) {
    const typename E::T* s_lo = Backward ? s + half : s;
    const typename E::T* s_hi = Backward ? s : s + half;
    for (int64_t j = 0; j < half; ++j) {
        const float a1 = E::load(a[j]), a2 = E::load(a[j + half]);
        const float turn_lo = E::load(E::store(a2 * E::load(s_lo[j])));
        const float turn_hi = E::load(E::store(a1 * E::load(s_hi[j])));
        const float lo = E::load(E::store(a1 * E::load(c[j]))) + (Backward ? turn_lo : -turn_lo);
        const float hi = E::load(E::store(a2 * E::load(c[j + half]))) + (Backward ? -turn_hi : turn_hi);
        out[j] = E::store(lo);
        out[j + half] = E::store(hi);
    }
}

template <typename E, bool Backward>
__attribute__((always_inline)) inline void rows(const Args<E>& a, int64_t begin, int64_t end) {
    for (Cursor c(begin, a.heads, a.steps); begin < end; ++begin, c.next()) {
        const int64_t t = c.at(a.table);
        row<E, Backward>(a.x + c.at(a.in), a.cos + t, a.sin + t, a.y + c.at(a.out), a.d / 2);
    }
}

template <typename E, bool Backward>
using RotaryKernel = lathe::simd::PerIsa<Args<E>, rows<E, Backward>>;

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
        const auto k = backward ? RotaryKernel<E, true>::pick() : RotaryKernel<E, false>::pick();
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
