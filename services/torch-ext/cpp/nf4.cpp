// NF4 (4-bit NormalFloat) weights for QLoRA: dequantization and a linear layer whose autograd
// keeps only the 4-bit weight. The storage format is bitsandbytes' (docs/qlora.md):
//
// - `packed` (numel/2) uint8: two 4-bit codes per byte, the even element in the high nibble;
// - `absmax` one fp32 scale per `blocksize` elements, or, with double quantization, one uint8
//   code per block into `code2` (256 fp32 values) scaled by `absmax2` (one fp32 per
//   `blocksize2` scales) plus `offset`.
//
// A value is `NF4[code] * absmax[block]`, computed in fp32 and rounded once to the output dtype,
// as bitsandbytes' CPU kernel does, so the two agree bit for bit.
//
// Why a custom autograd function: `x.linear(dequantized)` would make autograd keep every
// layer's dequantized weight until the backward pass, as many bytes as the unquantized model.
// `Nf4Matmul` saves the 4-bit tensors and dequantizes again in the backward pass.

#include "error.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <string>

namespace {

// bitsandbytes' NF4 code table (functional.get_4bit_type("nf4")), as fp32.
constexpr float kNf4[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// `scale` repeated for each of its `blocksize` elements, cut to `n`: (n) fp32.
at::Tensor per_element(const at::Tensor& scale, int64_t blocksize, int64_t n) {
    return scale.repeat_interleave(blocksize).narrow(0, 0, n);
}

// The fp32 scale of every 4-bit block.
at::Tensor block_scales(const at::Tensor& absmax, const at::Tensor& absmax2, const at::Tensor& code2, double offset,
                        int64_t blocksize2) {
    if (absmax.scalar_type() == at::kFloat) {
        return absmax;
    }
    // bitsandbytes: dequantize_blockwise (code2[q] * absmax2[i / blocksize2], fp32), then + offset.
    auto values = code2.index_select(0, absmax.to(at::kLong));
    auto scales = values * per_element(absmax2, blocksize2, values.numel());
    return scales + static_cast<float>(offset);
}

template <typename T>
void dequantize_cpu_kernel(const uint8_t* packed, const float* scales, T* out, int64_t n, int64_t blocksize) {
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const float scale = scales[b];
            const int64_t stop = std::min(n, (b + 1) * blocksize);
            for (int64_t i = b * blocksize; i < stop; ++i) {
                const uint8_t byte = packed[i >> 1];
                const uint8_t code = (i & 1) ? (byte & 0x0F) : (byte >> 4);
                out[i] = static_cast<T>(kNf4[code] * scale);
            }
        }
    });
}

// Dequantizes to `shape` in `dtype`. `scales` are the fp32 block scales.
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, at::IntArrayRef shape,
                      at::ScalarType dtype) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    TORCH_CHECK(packed.scalar_type() == at::kByte, "nf4: packed codes must be uint8");
    TORCH_CHECK(packed.numel() * 2 >= n, "nf4: ", packed.numel(), " packed bytes cannot hold ", n, " values");
    TORCH_CHECK(blocksize % 2 == 0 && scales.numel() * blocksize >= n, "nf4: block scales do not cover the tensor");
    if (packed.device().is_cpu()) {
        auto q = packed.contiguous();
        auto s = scales.to(at::kFloat).contiguous();
        auto out = at::empty(shape, q.options().dtype(dtype));
        switch (dtype) {
            case at::kFloat:
                dequantize_cpu_kernel(q.data_ptr<uint8_t>(), s.data_ptr<float>(), out.data_ptr<float>(), n, blocksize);
                return out;
            case at::kBFloat16:
                dequantize_cpu_kernel(q.data_ptr<uint8_t>(), s.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), n,
                                      blocksize);
                return out;
            case at::kHalf:
                dequantize_cpu_kernel(q.data_ptr<uint8_t>(), s.data_ptr<float>(), out.data_ptr<c10::Half>(), n,
                                      blocksize);
                return out;
            default:
                TORCH_CHECK(false, "nf4: cannot dequantize to ", dtype);
        }
    }
    // Other devices: the same arithmetic with tensor ops.
    auto flat = packed.flatten();
    auto codes = at::stack({flat.bitwise_right_shift(4), flat.bitwise_and(0x0F)}, 1).flatten().narrow(0, 0, n);
    auto table = at::tensor(at::ArrayRef<float>(kNf4, 16), at::TensorOptions().dtype(at::kFloat)).to(packed.device());
    auto values = table.index_select(0, codes.to(at::kLong)) * per_element(scales.to(at::kFloat), blocksize, n);
    return values.view(shape).to(dtype);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = x · Wᵀ for an NF4 weight W (out, in); the gradient reaches x only (W is frozen).
struct Nf4Matmul : public torch::autograd::Function<Nf4Matmul> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& absmax2, const at::Tensor& code2, double offset, int64_t blocksize,
                              int64_t blocksize2, int64_t out_features, int64_t in_features) {
        auto scales = block_scales(absmax, absmax2, code2, offset, blocksize2);
        auto weight = dequantize(packed, scales, blocksize, {out_features, in_features}, x.scalar_type());
        ctx->save_for_backward({packed, absmax, absmax2, code2});
        ctx->saved_data["offset"] = offset;
        ctx->saved_data["blocksize"] = blocksize;
        ctx->saved_data["blocksize2"] = blocksize2;
        ctx->saved_data["out"] = out_features;
        ctx->saved_data["in"] = in_features;
        return at::linear(x, weight);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        auto saved = ctx->get_saved_variables();
        auto grad = grad_outputs[0];
        auto scales = block_scales(saved[1], saved[2], saved[3], ctx->saved_data["offset"].toDouble(),
                                   ctx->saved_data["blocksize2"].toInt());
        auto weight = dequantize(saved[0], scales, ctx->saved_data["blocksize"].toInt(),
                                 {ctx->saved_data["out"].toInt(), ctx->saved_data["in"].toInt()}, grad.scalar_type());
        auto grad_x = at::matmul(grad, weight);
        return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

// Absent double-quantization tensors become empty ones: autograd functions reject undefined inputs.
at::Tensor optional_tensor(at::Tensor* t, const at::Tensor& like) {
    return t == nullptr ? at::empty({0}, like.options().dtype(at::kFloat)) : *t;
}

}  // namespace

// One NF4 weight as the Rust side passes it (`lathe_torch_ext::nf4`); `absmax2` and `code2` are
// null without double quantization.
struct LatheNf4 {
    at::Tensor* packed;
    at::Tensor* absmax;
    at::Tensor* absmax2;
    at::Tensor* code2;
    double offset;
    int64_t blocksize;
    int64_t blocksize2;
    int64_t out_features;
    int64_t in_features;
};

extern "C" {

// The dequantized weight (`out` x `in`) in `dtype` (a c10::ScalarType), or null with `err` set.
at::Tensor* lathe_nf4_dequantize(const LatheNf4* w, int dtype, char* err, size_t err_len) {
    try {
        auto scales = block_scales(*w->absmax, optional_tensor(w->absmax2, *w->packed),
                                   optional_tensor(w->code2, *w->packed), w->offset, w->blocksize2);
        return new at::Tensor(dequantize(*w->packed, scales, w->blocksize, {w->out_features, w->in_features},
                                         static_cast<at::ScalarType>(dtype)));
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return nullptr;
    }
}

// x · Wᵀ for the NF4 weight W, differentiable in x; null with `err` set on failure.
at::Tensor* lathe_nf4_matmul(at::Tensor* x, const LatheNf4* w, char* err, size_t err_len) {
    try {
        return new at::Tensor(Nf4Matmul::apply(*x, *w->packed, *w->absmax, optional_tensor(w->absmax2, *w->packed),
                                               optional_tensor(w->code2, *w->packed), w->offset, w->blocksize,
                                               w->blocksize2, w->out_features, w->in_features));
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
