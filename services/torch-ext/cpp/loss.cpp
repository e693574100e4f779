// Cross-entropy over the output head without the (tokens × vocabulary) tensors.
//
// Why: `loss(logits(h))` written as tensor ops materialises the logits in the compute dtype, an
// fp32 copy, log-softmax's output and, in the backward pass, two more (tokens × vocabulary) fp32
// tensors: for a 2,048-token step over a 152k vocabulary that is ~6 GB, more than a 4B model's
// NF4 weights. Here the rows go through in chunks. Each chunk's logits exist only while the
// chunk is processed; since the loss is the last op of the step, its gradient with respect to
// the chunk's logits (softmax − one-hot) is known then, so the gradient for the hidden states
// (and the head, when it is trained) is computed in the same pass and kept: (tokens × hidden),
// a few MB. The backward pass only scales it by the incoming gradient. Nothing is recomputed.
//
// Numerics follow transformers: logits from the head in the compute dtype, cast to fp32, the
// loss from fp32 log-sum-exp; the gradient for the logits rounded to the compute dtype before
// it meets the head. Only the order of the sum over tokens differs (per chunk, then chunks).
//
// Device-generic: ATen ops only, so the same code runs on CUDA.

#include "error.h"
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstring>
#include <exception>

namespace {

// Rows per chunk: ~4M logits (16 MB in fp32), at least 128 rows so the head's matmul stays
// efficient for very large vocabularies.
int64_t default_chunk_rows(int64_t vocab) { return std::max<int64_t>(128, (int64_t{1} << 22) / std::max<int64_t>(vocab, 1)); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (loss summed over rows whose target is not `ignore_index`, count of rows whose argmax is the
// target) for hidden (…, D), head weight (V, D) and targets (…).
struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
    static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                 int64_t ignore_index, int64_t chunk_rows, bool grad_hidden, bool grad_weight) {
        RECORD_FUNCTION("lathe::linear_cross_entropy", std::vector<c10::IValue>{});
        const int64_t d = hidden.size(-1), vocab = weight.size(0);
        TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d, "head weight ", weight.sizes(), " does not match hidden size ", d);
        TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "head weight and hidden states differ in dtype");
        auto h = hidden.reshape({-1, d});
        auto t = targets.reshape({-1}).to(at::kLong);
        const int64_t n = h.size(0);
        TORCH_CHECK(t.size(0) == n, "targets hold ", t.size(0), " positions, hidden states ", n);
        const int64_t chunk = chunk_rows > 0 ? chunk_rows : default_chunk_rows(vocab);

        auto loss = at::zeros({}, h.options().dtype(at::kFloat));
        auto correct = at::zeros({}, t.options());
        at::Tensor gh = grad_hidden ? at::empty({n, d}, h.options()) : at::Tensor();
        at::Tensor gw = grad_weight ? at::zeros({vocab, d}, weight.options().dtype(at::kFloat)) : at::Tensor();
        const auto wt = weight.t();
        for (int64_t start = 0; start < n; start += chunk) {
            const int64_t len = std::min(chunk, n - start);
            auto hc = h.narrow(0, start, len);
            auto tc = t.narrow(0, start, len);
            auto logits = at::mm(hc, wt).to(at::kFloat);
            auto valid = tc.ne(ignore_index);
            auto index = tc.masked_fill(valid.logical_not(), 0).unsqueeze(1);
            auto lse = at::logsumexp(logits, {1}, true);
            auto per_row = (lse - logits.gather(1, index)).squeeze(1);
            loss.add_(at::where(valid, per_row, at::zeros({}, per_row.options())).sum());
            correct.add_(logits.argmax(1).eq(tc).logical_and(valid).sum());
            if (!grad_hidden && !grad_weight) continue;
            // d loss / d logits = softmax − one-hot on trained rows, 0 on ignored ones.
            auto g = at::softmax(logits, 1);
            logits.reset();
            g.scatter_add_(1, index, at::full({len, 1}, -1.0, g.options()));
            if (!valid.all().item<bool>()) g.mul_(valid.unsqueeze(1));
            auto g_low = g.to(h.scalar_type());
            if (grad_hidden) {
                auto rows = gh.narrow(0, start, len);
                at::mm_out(rows, g_low, weight);
            }
            if (grad_weight) gw.add_(at::mm(g_low.t(), hc));
        }
        if (grad_weight) gw = gw.to(weight.scalar_type());
        ctx->saved_data["hidden_sizes"] = hidden.sizes().vec();
        ctx->save_for_backward({gh, gw});
        ctx->mark_non_differentiable({correct});
        return {loss, correct};
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        auto saved = ctx->get_saved_variables();
        auto gh = saved[0], gw = saved[1];
        const auto& scale = grad_outputs[0];
        at::Tensor grad_hidden, grad_weight;
        if (gh.defined()) grad_hidden = (gh * scale).view(ctx->saved_data["hidden_sizes"].toIntVector());
        if (gw.defined()) grad_weight = gw * scale;
        return {grad_hidden, grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

}  // namespace

extern "C" {

// Writes the loss sum (fp32 scalar) and the correct count (int64 scalar) to `loss_out` and
// `correct_out`; 0 on success, else -1 with `err` set. `chunk_rows` ≤ 0 picks a size from the
// vocabulary. Gradients flow to `hidden` and `weight` where they require them and grad mode is on.
int lathe_linear_cross_entropy(at::Tensor* hidden, at::Tensor* weight, at::Tensor* targets, int64_t ignore_index, int64_t chunk_rows,
                               at::Tensor** loss_out, at::Tensor** correct_out, char* err, size_t err_len) {
    try {
        const bool grad = at::GradMode::is_enabled();
        auto out = LinearCrossEntropy::apply(*hidden, *weight, *targets, ignore_index, chunk_rows, grad && hidden->requires_grad(),
                                             grad && weight->requires_grad());
        *loss_out = new at::Tensor(out[0]);
        *correct_out = new at::Tensor(out[1]);
        return 0;
    } catch (const std::exception& e) {
        lathe::write_error(err, err_len, e.what());
        return -1;
    }
}

}  // extern "C"
