//! Cross-entropy over the output head, a chunk of rows at a time (`cpp/loss.cpp`): the loss and
//! its gradient without ever holding (tokens × vocabulary) logits, their fp32 copy, softmax or
//! gradient. Differentiable in the hidden states and, when it requires grad, the head.

use tch::Tensor;

use crate::ffi;

/// For `hidden` (…, D), the head `weight` (V, D) in the same dtype and `targets` (…): the
/// cross-entropy of `hidden · weightᵀ` (cast to fp32) summed over positions whose target is not
/// `ignore_index` (an fp32 scalar), and how many of those positions the argmax predicts (an
/// int64 scalar). `chunk_rows` None picks the chunk from the vocabulary size.
/// Panics, as tch's ops do, if libtorch refuses the tensors.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: Option<i64>,
) -> (Tensor, Tensor) {
    let mut loss = std::ptr::null_mut();
    let mut correct = std::ptr::null_mut();
    let done = ffi::status(|err, len| unsafe {
        ffi::lathe_linear_cross_entropy(
            hidden.as_ptr() as *mut _,
            weight.as_ptr() as *mut _,
            targets.as_ptr() as *mut _,
            ignore_index,
            chunk_rows.unwrap_or(0),
            &mut loss,
            &mut correct,
            err,
            len,
        )
    });
    if let Err(message) = done {
        panic!("linear_cross_entropy: {message}");
    }
    unsafe { (Tensor::from_ptr(loss), Tensor::from_ptr(correct)) }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Reduction};

    use super::*;

    /// What the trainer computed before: full logits, cast to fp32, cross-entropy, argmax.
    fn reference(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> (Tensor, Tensor) {
        let logits = hidden.linear::<Tensor>(weight, None).to_kind(Kind::Float);
        let flat = logits.view([-1, weight.size()[0]]);
        let t = targets.view([-1]);
        let loss = flat.cross_entropy_loss::<Tensor>(&t, None, Reduction::Sum, -100, 0.0);
        let correct = flat.argmax(-1, false).eq_tensor(&t).logical_and(&t.ne(-100)).sum(Kind::Int64);
        (loss, correct)
    }

    /// Loss, correct count, and gradients for hidden and weight after `backward(loss / 7)`.
    fn run(f: impl Fn(&Tensor, &Tensor) -> (Tensor, Tensor), hidden: &Tensor, weight: &Tensor) -> (f64, i64, Tensor, Tensor) {
        let h = hidden.detach().set_requires_grad(true);
        let w = weight.detach().set_requires_grad(true);
        let (loss, correct) = f(&h, &w);
        (&loss / 7.0).backward();
        (loss.double_value(&[]), correct.int64_value(&[]), h.grad(), w.grad())
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    }

    #[test]
    fn chunked_loss_and_gradients_match_full_logits_in_fp32_and_bf16() {
        tch::manual_seed(0);
        let (b, t, d, v) = (2, 9, 32, 50);
        let targets = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        // Ignored positions (prompt tokens, padding) add nothing and get no gradient.
        let _ = targets.narrow(1, 0, 3).fill_(-100);
        for (kind, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 2e-2)] {
            let hidden = Tensor::randn([b, t, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            let weight = Tensor::randn([v, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            let theirs = run(|h, w| reference(h, w, &targets), &hidden, &weight);
            // 4 rows a chunk: chunks that split the batch rows, and a short last one.
            for chunk in [Some(4), None] {
                let ours = run(|h, w| linear_cross_entropy(h, w, &targets, -100, chunk), &hidden, &weight);
                assert!((ours.0 - theirs.0).abs() / theirs.0 < tol, "{kind:?} loss {} vs {}", ours.0, theirs.0);
                assert_eq!(ours.1, theirs.1, "{kind:?} correct count");
                assert!(rel(&ours.2, &theirs.2) < tol, "{kind:?} grad hidden: {}", rel(&ours.2, &theirs.2));
                assert!(rel(&ours.3, &theirs.3) < tol, "{kind:?} grad weight: {}", rel(&ours.3, &theirs.3));
                let ignored = ours.2.narrow(1, 0, 3).abs().max().double_value(&[]);
                assert_eq!(ignored, 0.0, "ignored positions get no gradient");
            }
        }
    }

    #[test]
    fn without_grad_mode_only_the_loss_is_computed() {
        let hidden = Tensor::randn([5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let weight = Tensor::randn([11, 8], (Kind::Float, Device::Cpu));
        let targets = Tensor::from_slice(&[1i64, 2, 3, -100, 4]);
        let (loss, correct) = tch::no_grad(|| linear_cross_entropy(&hidden, &weight, &targets, -100, Some(2)));
        let (want, want_correct) = reference(&hidden.detach(), &weight, &targets);
        assert!(!loss.requires_grad());
        assert!((loss.double_value(&[]) - want.double_value(&[])).abs() < 1e-5);
        assert_eq!(correct.int64_value(&[]), want_correct.int64_value(&[]));
    }
}
