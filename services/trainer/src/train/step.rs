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

use tch::Kind;

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
    let ctx = decoder.context(&batch.input_ids, Some(&batch.position_ids), batch.segments.as_ref(), true);
    if checkpointing {
        return forward_backward_checkpointed(decoder, batch, &ctx, normalizer, dropout);
    }
    let mut hidden = decoder.embed(&batch.input_ids);
    for (i, layer) in decoder.layers.iter().enumerate() {
        if let Some(d) = dropout {
            d.apply(i);
        }
        hidden = layer.forward(&hidden, &ctx);
    }
    let (loss_sum, correct) = decoder.loss_sum_and_correct(&hidden, &batch.targets, IGNORE_INDEX);
    (&loss_sum / normalizer).backward();
    MicroResult { loss_sum: loss_sum.double_value(&[]), correct: correct.int64_value(&[]) }
}

fn forward_backward_checkpointed(
    decoder: &Decoder,
    batch: &MicroBatch,
    ctx: &LayerContext,
    normalizer: f64,
    dropout: Option<DropoutSeed>,
) -> MicroResult {
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
    let (loss_sum, correct) = decoder.loss_sum_and_correct(&last, &batch.targets, IGNORE_INDEX);
    (&loss_sum / normalizer).backward();
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
    MicroResult { loss_sum: loss_sum.double_value(&[]), correct: correct.int64_value(&[]) }
}

/// Loss and accuracy of rows without gradients (validation).
pub fn evaluate_batch(decoder: &Decoder, batch: &MicroBatch) -> MicroResult {
    tch::no_grad(|| {
        let hidden = decoder.hidden_states(&batch.input_ids, Some(&batch.position_ids), batch.segments.as_ref(), false);
        let (loss_sum, correct) = decoder.loss_sum_and_correct(&hidden, &batch.targets, IGNORE_INDEX);
        MicroResult { loss_sum: loss_sum.double_value(&[]), correct: correct.int64_value(&[]) }
    })
}
