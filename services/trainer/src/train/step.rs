//! Forward and backward of one micro-batch, with optional gradient checkpointing.
//!
//! Gradient checkpointing without autograd hooks: the forward pass runs under `no_grad`
//! keeping only each layer's input; the backward pass then walks the layers in reverse,
//! recomputing one layer with grad enabled and back-propagating the incoming gradient `g`
//! through it via the surrogate `sum(y · g)`, whose gradient with respect to `y` is exactly `g`.
//! Peak activation memory drops from all layers to one layer plus the layer inputs.
//!
//! Dropout masks are hashes of a key made from (run seed, step, micro-batch, layer) and the
//! element index (`lora::hashed_dropout`), so the recomputation sees the same masks, a resumed
//! run the same masks as an uninterrupted one, and no global generator is involved.

use tch::{Kind, Tensor};

use super::batches::{MicroBatch, IGNORE_INDEX};
use crate::models::decoder::{Decoder, LayerContext};

pub struct MicroResult {
    pub loss_sum: f64,
    pub correct: i64,
}

/// Where dropout randomness comes from; None when the run has no dropout.
#[derive(Clone, Copy)]
pub struct DropoutSeed {
    pub seed: u64,
    pub step: u64,
    pub micro: u64,
}

impl DropoutSeed {
    fn apply(self, layer: usize) {
        let mixed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ self.micro.wrapping_mul(0x94D0_49BB_1331_11EB)
            ^ (layer as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        crate::lora::set_dropout_key(Some((mixed >> 33) as i64));
    }
}

/// Runs forward and backward for one micro-batch; gradients accumulate into the parameters
/// scaled by `1 / normalizer` (the step's trained-token count).
pub fn forward_backward(
    decoder: &Decoder,
    batch: &MicroBatch,
    normalizer: f64,
    checkpointing: bool,
    dropout: Option<DropoutSeed>,
) -> MicroResult {
    let mut result = MicroResult { loss_sum: 0.0, correct: 0 };
    backward_through(decoder, batch, checkpointing, dropout, &mut |hidden| {
        let (loss_sum, correct) = decoder.loss_sum_and_correct(hidden, &batch.targets, IGNORE_INDEX);
        result = MicroResult { loss_sum: loss_sum.double_value(&[]), correct: correct.int64_value(&[]) };
        loss_sum / normalizer
    });
    result
}

/// What a micro-batch of preference pairs gave: per pair, the policy's log-probabilities of
/// the preferred and the other answer, and DPO's loss.
pub struct PairResult {
    pub losses: Vec<f64>,
    pub chosen_logps: Vec<f64>,
    pub rejected_logps: Vec<f64>,
}

/// DPO's forward and backward for `n` pairs: `batch` holds the n preferred answers' rows, then
/// the n others', and `reference` (2n) the reference model's log-probabilities of the same rows.
/// The loss of each pair is −log σ(β·((π⁺ − ref⁺) − (π⁻ − ref⁻))); gradients accumulate scaled
/// by `1 / pairs_in_step`, so a step's loss is the mean over its pairs (TRL's sigmoid loss).
pub fn dpo_forward_backward(
    decoder: &Decoder,
    batch: &MicroBatch,
    reference: &Tensor,
    beta: f64,
    pairs_in_step: f64,
    checkpointing: bool,
    dropout: Option<DropoutSeed>,
) -> PairResult {
    let mut result = PairResult { losses: Vec::new(), chosen_logps: Vec::new(), rejected_logps: Vec::new() };
    backward_through(decoder, batch, checkpointing, dropout, &mut |hidden| {
        let logps = sequence_logps(decoder, hidden, &batch.targets);
        let n = logps.size()[0] / 2;
        let (chosen, rejected) = (logps.narrow(0, 0, n), logps.narrow(0, n, n));
        let (ref_chosen, ref_rejected) = (reference.narrow(0, 0, n), reference.narrow(0, n, n));
        let margin = (&chosen - &rejected) - (ref_chosen - ref_rejected);
        let losses = -(margin * beta).log_sigmoid();
        let values = |t: &Tensor| Vec::<f64>::try_from(t.detach().to_kind(Kind::Double)).expect("a 1-D tensor");
        result = PairResult { losses: values(&losses), chosen_logps: values(&chosen), rejected_logps: values(&rejected) };
        losses.sum(Kind::Float) / pairs_in_step
    });
    result
}

/// Per row of `hidden` (N, T, D): the log-probability of its target tokens (those not
/// [`IGNORE_INDEX`]), summed — the answer's log-likelihood. Row by row through the chunked
/// cross-entropy, so the (T, vocabulary) logits of a whole batch never exist at once.
pub fn sequence_logps(decoder: &Decoder, hidden: &Tensor, targets: &Tensor) -> Tensor {
    let rows: Vec<Tensor> =
        (0..hidden.size()[0]).map(|i| -decoder.loss_sum_and_correct(&hidden.get(i), &targets.get(i), IGNORE_INDEX).0).collect();
    Tensor::stack(&rows, 0)
}

/// Forward through every layer, `head` from the last hidden state to the scalar to
/// back-propagate, then backward: plainly, or layer by layer with recomputation.
fn backward_through(
    decoder: &Decoder,
    batch: &MicroBatch,
    checkpointing: bool,
    dropout: Option<DropoutSeed>,
    head: &mut dyn FnMut(&Tensor) -> Tensor,
) {
    let ctx = decoder.context(&batch.input_ids, Some(&batch.position_ids), batch.segments.as_ref(), true);
    if checkpointing {
        return backward_checkpointed(decoder, batch, &ctx, dropout, head);
    }
    let mut hidden = decoder.embed(&batch.input_ids);
    for (i, layer) in decoder.layers.iter().enumerate() {
        if let Some(d) = dropout {
            d.apply(i);
        }
        hidden = layer.forward(&hidden, &ctx);
    }
    head(&hidden).backward();
}

fn backward_checkpointed(
    decoder: &Decoder,
    batch: &MicroBatch,
    ctx: &LayerContext,
    dropout: Option<DropoutSeed>,
    head: &mut dyn FnMut(&Tensor) -> Tensor,
) {
    // Forward without a graph, keeping each layer's input.
    let mut inputs = Vec::with_capacity(decoder.layers.len());
    let last = tch::no_grad(|| {
        let mut hidden = decoder.embed(&batch.input_ids);
        for (i, layer) in decoder.layers.iter().enumerate() {
            if let Some(d) = dropout {
                d.apply(i);
            }
            inputs.push(hidden.shallow_clone());
            hidden = layer.forward(&hidden, ctx);
        }
        hidden
    });

    // Head and loss with a graph, giving the gradient at the last hidden state.
    let last = last.detach().set_requires_grad(true);
    head(&last).backward();
    let mut grad = last.grad();

    // Layers in reverse: recompute one, push the gradient through it.
    for (i, layer) in decoder.layers.iter().enumerate().rev() {
        if let Some(d) = dropout {
            d.apply(i);
        }
        let input = inputs[i].detach().set_requires_grad(true);
        let output = layer.forward(&input, ctx);
        (output * &grad).sum(Kind::Float).backward();
        grad = input.grad();
    }
    if decoder.embed_tokens.requires_grad() {
        (decoder.embed(&batch.input_ids) * &grad).sum(Kind::Float).backward();
    }
}

/// Loss and accuracy of rows without gradients (validation).
pub fn evaluate_batch(decoder: &Decoder, batch: &MicroBatch) -> MicroResult {
    tch::no_grad(|| {
        let hidden = decoder.hidden_states(&batch.input_ids, Some(&batch.position_ids), batch.segments.as_ref(), false);
        let (loss_sum, correct) = decoder.loss_sum_and_correct(&hidden, &batch.targets, IGNORE_INDEX);
        MicroResult { loss_sum: loss_sum.double_value(&[]), correct: correct.int64_value(&[]) }
    })
}
