//! DPO: direct preference optimisation on preference pairs (docs/dpo.md).
//!
//! Rows come in pairs, the preferred answer's conversation then the other's, each trained only
//! on its answer. An epoch shuffles pairs, not rows; a micro-batch holds its pairs' preferred
//! rows then their other rows, as TRL concatenates them. The reference model's log-probability
//! of every row is computed once, before the first step: for LoRA with the adapter switched
//! off (the base model, no second copy of the weights), for full training with the weights as
//! they are at step 0. Checkpoints keep them, so a resumed full run compares against the same
//! reference, not against the weights it has since trained.

use tch::{Device, Kind, Tensor};

use super::batches::{epoch_order, make_micro_batch, rank_rows, row_trained_tokens};
use super::step::{dpo_forward_backward, sequence_logps, DropoutSeed};
use super::{Gang, Inputs, Model, Plan, PreferenceMetrics, StepSums, TrainConfig, PAD_ID};
use crate::data::packing::Sequence;
use crate::models::decoder::Decoder;
use crate::{checkpoint, Result, TrainerError};

/// In each checkpoint of a DPO run: tensors `train` and, with a validation file, `valid`.
pub const REFERENCE_FILE: &str = "reference_logps.safetensors";

/// Sums over a step's pairs: chosen rewards, rejected rewards, chosen log-probabilities,
/// rejected log-probabilities.
pub const PAIR_SUMS: usize = 4;

/// The reference model's log-probability of each row (fp64, on the CPU).
pub struct Reference {
    train: Tensor,
    valid: Option<Tensor>,
}

impl Reference {
    /// For a DPO run: read from the checkpoint being resumed, or computed (by every rank, each
    /// a share of the rows). None for a supervised run.
    pub fn prepare(config: &TrainConfig, inputs: &Inputs, model: &Model, gang: &Gang) -> Result<Option<Reference>> {
        if config.dpo_beta().is_none() {
            return Ok(None);
        }
        if let Some(resume) = &inputs.resume {
            let path = resume.dir.join(REFERENCE_FILE);
            if path.is_file() {
                let mut tensors = checkpoint::read_tensors(&path)?;
                let train = tensors.remove("train").ok_or_else(|| TrainerError::file(&path, "lacks the tensor `train`"))?;
                if train.size() != [inputs.train.rows.len() as i64] {
                    return Err(TrainerError::file(&path, "holds log-probabilities of other rows than the training file's"));
                }
                return Ok(Some(Reference {
                    train: train.to_kind(Kind::Double),
                    valid: tensors.remove("valid").map(|v| v.to_kind(Kind::Double)),
                }));
            }
            if !config.trains_lora() {
                return Err(TrainerError::file(
                    &resume.dir,
                    "a full-parameter DPO checkpoint needs its reference log-probabilities (reference_logps.safetensors)",
                ));
            }
        }
        let compute = |rows: &[Sequence]| -> Result<Tensor> {
            let logps = if config.trains_lora() {
                crate::lora::without_adapters(|| row_logps(&model.decoder, rows, config.train.batch_size, inputs.device, gang))?
            } else {
                row_logps(&model.decoder, rows, config.train.batch_size, inputs.device, gang)?
            };
            Ok(Tensor::from_slice(&logps))
        };
        let train = compute(&inputs.train.rows)?;
        let valid = inputs.valid.as_ref().map(|v| compute(&v.rows)).transpose()?;
        Ok(Some(Reference { train, valid }))
    }

    pub fn write(&self, dir: &std::path::Path) -> Result<()> {
        let mut tensors = vec![("train".to_string(), self.train.shallow_clone())];
        if let Some(valid) = &self.valid {
            tensors.push(("valid".to_string(), valid.shallow_clone()));
        }
        checkpoint::write_tensors(&dir.join(REFERENCE_FILE), &tensors)
    }
}

/// Each row's summed log-probability of its trained tokens, without gradients; rank r computes
/// every `world`-th batch and the sum over ranks fills in the rest.
fn row_logps(decoder: &Decoder, rows: &[Sequence], batch_size: usize, device: Device, gang: &Gang) -> Result<Vec<f64>> {
    let mut logps = vec![0.0; rows.len()];
    let indices: Vec<usize> = (0..rows.len()).collect();
    for (b, chunk) in indices.chunks(2 * batch_size).enumerate() {
        if b % gang.world() != gang.rank() {
            continue;
        }
        let seqs: Vec<&Sequence> = chunk.iter().map(|&i| &rows[i]).collect();
        let batch = make_micro_batch(&seqs, false, PAD_ID, device);
        let values = tch::no_grad(|| {
            let hidden = decoder.hidden_states(&batch.input_ids, Some(&batch.position_ids), None, false);
            sequence_logps(decoder, &hidden, &batch.targets)
        });
        let values = Vec::<f64>::try_from(values.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a 1-D tensor");
        for (&i, v) in chunk.iter().zip(values) {
            logps[i] = v;
        }
    }
    gang.sum(&mut logps)?;
    Ok(logps)
}

/// Rows of `pairs` as one micro-batch: the preferred rows, then the others; with the
/// reference's log-probabilities of the same rows in the same order.
fn pair_batch<'a>(rows: &'a [Sequence], reference: &Tensor, pairs: &[usize], device: Device) -> (Vec<&'a Sequence>, Tensor) {
    let order: Vec<usize> = pairs.iter().map(|&p| 2 * p).chain(pairs.iter().map(|&p| 2 * p + 1)).collect();
    let seqs = order.iter().map(|&i| &rows[i]).collect();
    let index = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>());
    (seqs, reference.index_select(0, &index).to_kind(Kind::Float).to_device(device))
}

/// DPO over this rank's micro-batches of the step: each pair weighs one over the step's pairs.
#[allow(clippy::too_many_arguments)]
pub fn micro_batches(
    model: &Model,
    config: &TrainConfig,
    inputs: &Inputs,
    plan: &Plan,
    step: u64,
    (reference, beta): (&Reference, f64),
    batch_dump: &mut Vec<(String, Tensor)>,
    gang: &Gang,
) -> Result<StepSums> {
    let t = &config.train;
    let rows = &inputs.train.rows;
    let order = epoch_order(inputs.train.units(), config.seed, (step - 1) / plan.per_epoch, t.shuffle);
    let (rank, world) = (gang.rank(), gang.world());
    let micro_pairs = rank_rows(&order, (step - 1) % plan.per_epoch, t.batch_size, t.gradient_accumulation_steps, rank, world);
    let mine = micro_pairs.iter().flatten();
    let mut counts = [
        micro_pairs.iter().map(Vec::len).sum::<usize>() as f64,
        mine.map(|&p| row_trained_tokens(&rows[2 * p]) + row_trained_tokens(&rows[2 * p + 1])).sum::<u64>() as f64,
    ];
    gang.sum(&mut counts)?;
    let normalizer = counts[0].max(1.0);
    let dropout = model.lora.as_ref().is_some_and(|l| l.dropout > 0.0);
    let mut sums = StepSums { normalizer, trained_tokens: counts[1] as u64, empty: micro_pairs.is_empty(), ..StepSums::default() };
    for (m, pairs) in micro_pairs.iter().enumerate() {
        let (seqs, reference_rows) = pair_batch(rows, &reference.train, pairs, inputs.device);
        let batch = make_micro_batch(&seqs, false, PAD_ID, inputs.device);
        if config.debug.dump_batches {
            super::dump_batch(batch_dump, step, m, &batch);
        }
        let micro = (rank * t.gradient_accumulation_steps + m) as u64;
        let seed = dropout.then_some(DropoutSeed { seed: config.seed, step, micro });
        let r = dpo_forward_backward(&model.decoder, &batch, &reference_rows, beta, normalizer, t.gradient_checkpointing, seed);
        add_pairs(&mut sums, &r.losses, &r.chosen_logps, &r.rejected_logps, &reference_rows, beta);
        sums.real_tokens += batch.real_tokens;
    }
    Ok(sums)
}

/// Adds a micro-batch's pairs to the step's sums.
fn add_pairs(sums: &mut StepSums, losses: &[f64], chosen: &[f64], rejected: &[f64], reference_rows: &Tensor, beta: f64) {
    let reference = Vec::<f64>::try_from(reference_rows.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a 1-D tensor");
    let n = losses.len();
    for i in 0..n {
        let chosen_reward = beta * (chosen[i] - reference[i]);
        let rejected_reward = beta * (rejected[i] - reference[n + i]);
        sums.loss_sum += losses[i];
        sums.correct += (chosen_reward > rejected_reward) as u8 as f64;
        for (slot, value) in sums.pairs.iter_mut().zip([chosen_reward, rejected_reward, chosen[i], rejected[i]]) {
            *slot += value;
        }
    }
}

/// The step's DPO metrics from the pair sums over all ranks and the sum of pairs ranked right
/// (`totals`: [`PAIR_SUMS`] values) over `pairs` pairs.
pub fn metrics(totals: &[f64], correct: f64, pairs: f64) -> PreferenceMetrics {
    let mean = |i: usize| totals[i] / pairs;
    PreferenceMetrics {
        rewards_chosen: mean(0),
        rewards_rejected: mean(1),
        rewards_accuracy: correct / pairs,
        rewards_margin: mean(0) - mean(1),
        logps_chosen: mean(2),
        logps_rejected: mean(3),
    }
}

/// DPO's mean loss and the fraction of pairs ranked right on the validation pairs, and their
/// trained tokens.
pub fn evaluate(
    decoder: &Decoder,
    valid: &super::data::PreparedData,
    reference: &Reference,
    beta: f64,
    batch_size: usize,
    device: Device,
) -> (f64, f64, u64) {
    let Some(valid_reference) = &reference.valid else { return (f64::NAN, f64::NAN, 0) };
    let pairs: Vec<usize> = (0..valid.units()).collect();
    let mut sums = StepSums::default();
    let mut tokens = 0;
    for chunk in pairs.chunks(batch_size) {
        let (seqs, reference_rows) = pair_batch(&valid.rows, valid_reference, chunk, device);
        let batch = make_micro_batch(&seqs, false, PAD_ID, device);
        let logps = tch::no_grad(|| {
            let hidden = decoder.hidden_states(&batch.input_ids, Some(&batch.position_ids), None, false);
            sequence_logps(decoder, &hidden, &batch.targets)
        });
        let n = chunk.len() as i64;
        let margin = (logps.narrow(0, 0, n) - logps.narrow(0, n, n)) - (reference_rows.narrow(0, 0, n) - reference_rows.narrow(0, n, n));
        let losses = -(margin * beta).log_sigmoid();
        let values = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a 1-D tensor");
        let logps = values(&logps);
        add_pairs(&mut sums, &values(&losses), &logps[..chunk.len()], &logps[chunk.len()..], &reference_rows, beta);
        tokens += batch.trained_tokens;
    }
    let n = pairs.len().max(1) as f64;
    (sums.loss_sum / n, sums.correct / n, tokens)
}
