//! The training recipe: setup → loop → save, in the order nanoGPT and torchtune read.
//!
//! One optimizer step: for each micro-batch, forward and backward with the loss summed over
//! trained tokens and divided by the trained-token count of the whole step (so accumulation
//! weighs every token equally, whatever the padding); then clip, set the learning rate,
//! AdamW step, zero grads; then log, evaluate and checkpoint as configured.
//!
//! Data parallel ([`gang`]): each rank runs this same loop on its share of every step's rows;
//! the trained-token count and the gradients are summed over ranks before the update, and rank
//! 0 alone writes events, checkpoints and outputs.

pub mod batches;
mod data;
pub mod events;
pub mod gang;
mod preference;
mod step;
pub mod train_config;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lathe_torch_ext::profile::OpProfile;
use tch::Device;

use crate::checkpoint::{self, CheckpointState};
use crate::data::encode::{EncodeOptions, Encoder};
use crate::model_dir::ModelDir;
use crate::models::decoder::{Decoder, Trainable};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use crate::{device, export, models, peft, Result, TrainerError};
use batches::{epoch_order, make_micro_batch, rank_rows, row_trained_tokens, steps_per_epoch};
pub use events::{Event, PreferenceMetrics, StepMetrics};
pub use gang::Gang;
use preference::{Reference, PAIR_SUMS};
use step::{evaluate_batch, forward_backward, DropoutSeed};
pub use train_config::{DpoSettings, Method, TrainConfig};

/// How the caller watches and steers a run.
pub struct Hooks<'a> {
    pub on_event: &'a mut dyn FnMut(&Event),
    /// Polled between steps; when true the run writes a checkpoint and returns `Stopped`.
    pub should_stop: &'a dyn Fn() -> bool,
    /// Polled between steps; when true the run returns `TrainerError::Stopped` at once and
    /// writes nothing more (a cancelled job, or a worker that lost its lease: another attempt
    /// may own the output directory now).
    pub abandon: &'a dyn Fn() -> bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished { step: u64, adapter_dir: Option<PathBuf>, model_dir: Option<PathBuf>, results_csv: PathBuf, final_loss: f64 },
    Stopped { step: u64, checkpoint: Option<PathBuf> },
}

const PAD_ID: i64 = 0;

/// Runs a whole training job described by `config`, resuming from `resume_from` when given.
pub fn run(config: &TrainConfig, resume_from: Option<&Path>, hooks: Hooks) -> Result<Outcome> {
    run_in(config, resume_from, hooks, &Gang::single())
}

/// [`run`] as one rank of a data-parallel gang. Every rank is called with the same config and
/// checkpoint; ranks other than 0 write nothing and return an `Outcome` without outputs.
pub fn run_in(config: &TrainConfig, resume_from: Option<&Path>, hooks: Hooks, gang: &Gang) -> Result<Outcome> {
    let inputs = Inputs::prepare(config, resume_from, gang.is_leader())?;
    if let Some(r) = inputs.resume.as_ref().filter(|r| r.state.ranks != gang.world()) {
        return Err(TrainerError::file(
            &r.dir,
            format!(
                "trained by {} data-parallel rank(s); resume it with as many (--nproc {}), since a step's rows depend on the count",
                r.state.ranks, r.state.ranks
            ),
        ));
    }
    let plan = Plan::of(config, inputs.train.units(), gang.world());
    let mut model = Model::load(config, &inputs, gang)?;

    // ---- outputs ----
    let out = &config.output_dir;
    if gang.is_leader() {
        std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    }
    let mut log = RunLog::open(out, hooks.on_event, model.start_step, gang.is_leader())?;
    if config.debug.dump_batches && model.start_step == 0 && gang.is_leader() {
        if let Some(l) = &model.lora {
            peft::write_adapter(&out.join("debug/initial_adapter"), &model.decoder, l, &config.model.display().to_string())?;
        }
    }
    let trainable_parameters: i64 = model.optimizer.params.iter().map(|p| p.param.numel() as i64).sum();
    log.emit(&Event::Started {
        total_steps: plan.total_steps,
        start_step: model.start_step,
        epochs: config.train.epochs,
        train_examples: inputs.train.examples,
        train_rows: inputs.train.rows.len(),
        validation_examples: inputs.valid.as_ref().map_or(0, |v| v.examples),
        truncated_examples: inputs.train.truncated,
        dropped_examples: inputs.train.dropped,
        trainable_parameters,
        total_parameters: inputs.model_dir.config.num_parameters(),
        device: format!("{:?}", inputs.device).to_lowercase(),
        dtype: device::dtype_name(inputs.kind).into(),
        ranks: gang.world(),
        dist_backend: gang.backend_name().into(),
    })?;

    // ---- loop ----
    let t = &config.train;
    let started = Instant::now();
    let mut batch_dump = Vec::new();
    let mut last_loss = f64::NAN;
    for step in model.start_step + 1..=plan.total_steps {
        // One rank stopping alone would leave the others waiting in a collective.
        let [abandon, stop] = gang.any([(hooks.abandon)(), (hooks.should_stop)()])?;
        if abandon {
            return Err(TrainerError::Stopped(format!("abandoned before step {step}")));
        }
        if stop {
            let checkpoint = model.save_checkpoint(config, &mut log, step - 1, plan.total_steps, &inputs.fingerprint, gang)?;
            // The others exit once the checkpoint is on disk, so a launcher that sees every
            // rank gone can resume from it.
            gang.barrier()?;
            return Ok(Outcome::Stopped { step: step - 1, checkpoint });
        }
        let profile = if config.debug.profile_step == step && gang.is_leader() { Some(start_profile(out, step)?) } else { None };
        let metrics = model.train_step(config, &inputs, &plan, step, started, &mut batch_dump, gang)?;
        if let Some(profile) = profile {
            let path = profile.finish()?;
            tracing::info!(step, path = %path.display(), "wrote op profile");
        }
        last_loss = metrics.loss;
        log.step(&metrics)?;

        // Validation and checkpoints on rank 0; the others wait for it at the next collective.
        let epoch_end = step % plan.per_epoch == 0;
        let eval_now = step == plan.total_steps || (t.eval_every > 0 && step % t.eval_every == 0) || (t.eval_each_epoch && epoch_end);
        if let Some(v) = inputs.valid.as_ref().filter(|_| eval_now && gang.is_leader()) {
            let (valid_loss, valid_acc, valid_tokens) = match (&model.reference, config.dpo_beta()) {
                (Some(reference), Some(beta)) => preference::evaluate(&model.decoder, v, reference, beta, t.batch_size, inputs.device),
                _ => evaluate(&model.decoder, &v.rows, t.batch_size, config.data.packing, inputs.device),
            };
            log.eval(step, valid_loss, valid_acc, valid_tokens)?;
        }
        let checkpoint_now = (t.checkpoint_every > 0 && step % t.checkpoint_every == 0) || (t.checkpoint_each_epoch && epoch_end);
        if checkpoint_now && step < plan.total_steps {
            model.save_checkpoint(config, &mut log, step, plan.total_steps, &inputs.fingerprint, gang)?;
        }
    }
    if !gang.is_leader() {
        return Ok(Outcome::Finished {
            step: plan.total_steps,
            adapter_dir: None,
            model_dir: None,
            results_csv: log.results_path(),
            final_loss: last_loss,
        });
    }

    // ---- save ----
    if config.debug.dump_batches && !batch_dump.is_empty() {
        let debug_dir = out.join("debug");
        std::fs::create_dir_all(&debug_dir).map_err(|e| TrainerError::io(&debug_dir, e))?;
        checkpoint::write_tensors(&out.join("debug/batches.safetensors"), &batch_dump)?;
    }
    let (adapter_dir, model_out) = model.export(config, &inputs.model_dir)?;
    let results_csv = log.write_results()?;
    log.emit(&Event::Finished {
        step: plan.total_steps,
        adapter_dir: adapter_dir.as_ref().map(|p| p.display().to_string()),
        model_dir: model_out.as_ref().map(|p| p.display().to_string()),
        results_csv: results_csv.display().to_string(),
    })?;
    Ok(Outcome::Finished { step: plan.total_steps, adapter_dir, model_dir: model_out, results_csv, final_loss: last_loss })
}

/// Starts recording libtorch ops for `debug.profile_step`.
fn start_profile(out: &Path, step: u64) -> Result<OpProfile> {
    let debug_dir = out.join("debug");
    std::fs::create_dir_all(&debug_dir).map_err(|e| TrainerError::io(&debug_dir, e))?;
    Ok(OpProfile::start(&debug_dir.join(format!("profile-step{step}.json")))?)
}

/// Setup: everything that can fail on bad input, checked before anything is written.
struct Inputs {
    device: Device,
    kind: tch::Kind,
    model_dir: ModelDir,
    train: data::PreparedData,
    valid: Option<data::PreparedData>,
    /// Of the training rows: a checkpoint only resumes the data it was trained on.
    fingerprint: String,
    resume: Option<checkpoint::LoadedCheckpoint>,
}

impl Inputs {
    fn prepare(config: &TrainConfig, resume_from: Option<&Path>, leader: bool) -> Result<Inputs> {
        config.validate()?;
        if config.train.threads > 0 {
            tch::set_num_threads(config.train.threads as i32);
        }
        let device = device::parse_device(&config.train.device)?;
        let kind = device::resolve_dtype(&config.train.dtype, device)?;
        device::reset_peak_memory(device);
        let model_dir = ModelDir::open(&config.model)?;
        let encoder = Encoder::from_model_dir(
            &config.model,
            EncodeOptions { max_seq_length: config.data.max_seq_length, train_on_inputs: config.data.train_on_inputs },
        )?;
        let pairs = config.dpo_beta().is_some();
        let train = data::prepare(&config.train_file, &encoder, config.data.packing, config.data.max_seq_length, pairs)?;
        let valid = match &config.validation_file {
            Some(path) => Some(data::prepare(path, &encoder, config.data.packing, config.data.max_seq_length, pairs)?),
            None => None,
        };
        let fingerprint = data::fingerprint(&train.rows);
        let resume = match resume_from {
            Some(dir) => Some(checkpoint::load_checkpoint(dir)?),
            None => None,
        };
        if let Some(r) = &resume {
            if r.state.data_fingerprint != fingerprint {
                return Err(TrainerError::file(&r.dir, "checkpoint was trained on different data (fingerprint differs)"));
            }
        } else if leader && config.output_dir.join("events.jsonl").exists() {
            return Err(TrainerError::file(
                &config.output_dir,
                "already holds a run (events.jsonl); resume it with --resume-from or choose another output_dir",
            ));
        }
        Ok(Inputs { device, kind, model_dir, train, valid, fingerprint, resume })
    }
}

/// How many steps, and the learning rate of each.
struct Plan {
    per_epoch: u64,
    total_steps: u64,
    schedule: Schedule,
}

impl Plan {
    fn of(config: &TrainConfig, rows: usize, world: usize) -> Plan {
        let t = &config.train;
        let per_epoch = steps_per_epoch(rows, t.batch_size * t.gradient_accumulation_steps * world);
        let total_steps = t.max_steps.map_or(per_epoch * t.epochs, |m| m.min(per_epoch * t.epochs));
        let warmup_steps = config.optim.warmup_steps.unwrap_or((config.optim.warmup_ratio * total_steps as f64).ceil() as u64);
        let schedule = Schedule { peak_lr: config.optim.learning_rate, warmup_steps, total_steps, decay: config.optim.lr_scheduler };
        Plan { per_epoch, total_steps, schedule }
    }
}

/// The model being trained, its optimizer, and how far it got.
struct Model {
    lora: Option<crate::lora::LoraConfig>,
    decoder: Decoder,
    optimizer: AdamW,
    start_step: u64,
    tokens_seen: u64,
    /// DPO: the reference model's log-probabilities of every row.
    reference: Option<Reference>,
}

impl Model {
    /// Loads the base weights with the trainable part (a fresh LoRA adapter, or every weight),
    /// and restores both from the checkpoint when resuming.
    fn load(config: &TrainConfig, inputs: &Inputs, gang: &Gang) -> Result<Model> {
        let lora = if config.trains_lora() { Some(config.lora_config()?) } else { None };
        let trainable = match &lora {
            Some(l) => Trainable::Lora(l.clone()),
            None => Trainable::Everything,
        };
        let mut decoder = models::load(&inputs.model_dir, &trainable, config.quantization(), inputs.kind, inputs.device)?;
        let mut optimizer = AdamW::new(
            decoder.trainable_parameters(),
            AdamWConfig {
                beta1: config.optim.beta1,
                beta2: config.optim.beta2,
                eps: config.optim.eps,
                weight_decay: config.optim.weight_decay,
            },
        );
        let (mut start_step, mut tokens_seen) = (0, 0);
        if let Some(r) = &inputs.resume {
            restore(&mut decoder, &mut optimizer, r)?;
            start_step = r.state.step;
            tokens_seen = r.state.tokens_seen;
        }
        // Ranks start from rank 0's weights (the same by construction; now also by contract).
        let trainable: Vec<tch::Tensor> = optimizer.params.iter().map(|p| p.param.shallow_clone()).collect();
        gang.broadcast_from_leader(&trainable)?;
        let mut model = Model { lora, decoder, optimizer, start_step, tokens_seen, reference: None };
        model.reference = Reference::prepare(config, inputs, &model, gang)?;
        Ok(model)
    }

    /// One optimizer step: forward and backward over this rank's micro-batches, gradients
    /// summed over ranks, clip, AdamW.
    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &mut self,
        config: &TrainConfig,
        inputs: &Inputs,
        plan: &Plan,
        step: u64,
        started: Instant,
        batch_dump: &mut Vec<(String, tch::Tensor)>,
        gang: &Gang,
    ) -> Result<StepMetrics> {
        let step_started = Instant::now();
        let sums = match (&self.reference, config.dpo_beta()) {
            (Some(reference), Some(beta)) => {
                preference::micro_batches(self, config, inputs, plan, step, (reference, beta), batch_dump, gang)?
            }
            _ => self.supervised_micro_batches(config, inputs, plan, step, batch_dump, gang)?,
        };
        let trainable: Vec<tch::Tensor> = self.optimizer.params.iter().map(|p| p.param.shallow_clone()).collect();
        let (rank, world) = (gang.rank(), gang.world());
        if sums.empty && world > 1 {
            gang::zero_backward(&trainable);
        }
        let compute_seconds = step_started.elapsed().as_secs_f64();
        let all_reduce = gang.all_reduce_grads(&trainable)?;
        // loss, correct, real tokens, the pair sums, then each rank's compute time in its own slot.
        let mut totals = vec![0.0; 3 + PAIR_SUMS + world];
        totals[..3].copy_from_slice(&[sums.loss_sum, sums.correct, sums.real_tokens as f64]);
        totals[3..3 + PAIR_SUMS].copy_from_slice(&sums.pairs);
        totals[3 + PAIR_SUMS + rank] = compute_seconds;
        gang.sum(&mut totals)?;
        let (loss_sum, correct, real_tokens) = (totals[0], totals[1], totals[2] as u64);
        let rank_step_seconds = if world > 1 { totals[3 + PAIR_SUMS..].to_vec() } else { Vec::new() };
        let grad_norm = self.optimizer.clip_grad_norm(config.optim.max_grad_norm);
        let lr = plan.schedule.lr_at(step);
        self.optimizer.step(lr);
        self.optimizer.zero_grad();

        self.tokens_seen += real_tokens;
        let normalizer = sums.normalizer;
        let loss = loss_sum / normalizer;
        if !loss.is_finite() {
            return Err(TrainerError::invalid(
                "optim.learning_rate",
                format!("loss became {loss} at step {step}; lower the learning rate"),
            ));
        }
        let preference = self.reference.as_ref().map(|_| preference::metrics(&totals[3..3 + PAIR_SUMS], correct, normalizer));
        Ok(StepMetrics {
            step,
            total_steps: plan.total_steps,
            epoch: (step - 1) / plan.per_epoch,
            loss,
            lr,
            grad_norm,
            train_mean_token_accuracy: correct / normalizer,
            trained_tokens: sums.trained_tokens,
            tokens_seen: self.tokens_seen,
            tokens_per_second: real_tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            peak_memory_bytes: device::peak_memory_bytes(inputs.device),
            elapsed_seconds: started.elapsed().as_secs_f64(),
            rank_step_seconds,
            all_reduce_seconds: all_reduce.as_secs_f64(),
            preference,
        })
    }

    /// Supervised cross-entropy over this rank's micro-batches of the step, gradients
    /// accumulated, each token weighed by one over the whole step's trained tokens.
    fn supervised_micro_batches(
        &mut self,
        config: &TrainConfig,
        inputs: &Inputs,
        plan: &Plan,
        step: u64,
        batch_dump: &mut Vec<(String, tch::Tensor)>,
        gang: &Gang,
    ) -> Result<StepSums> {
        let t = &config.train;
        let rows = &inputs.train.rows;
        let epoch = (step - 1) / plan.per_epoch;
        let order = epoch_order(rows.len(), config.seed, epoch, t.shuffle);
        let (rank, world) = (gang.rank(), gang.world());
        let micro_rows = rank_rows(&order, (step - 1) % plan.per_epoch, t.batch_size, t.gradient_accumulation_steps, rank, world);
        let mut step_tokens = [micro_rows.iter().flatten().map(|&r| row_trained_tokens(&rows[r])).sum::<u64>() as f64];
        gang.sum(&mut step_tokens)?;
        let step_tokens = step_tokens[0] as u64;
        let normalizer = step_tokens.max(1) as f64;
        let dropout = self.lora.as_ref().is_some_and(|l| l.dropout > 0.0);
        let mut sums = StepSums { normalizer, trained_tokens: step_tokens, empty: micro_rows.is_empty(), ..StepSums::default() };
        for (m, micro) in micro_rows.iter().enumerate() {
            let seqs: Vec<_> = micro.iter().map(|&r| &rows[r]).collect();
            let batch = make_micro_batch(&seqs, config.data.packing, PAD_ID, inputs.device);
            if config.debug.dump_batches {
                dump_batch(batch_dump, step, m, &batch);
            }
            // Numbered across ranks, so a rank's masks are those one process would use for the
            // same micro-batch with accumulation (masks follow the micro-batch split, so with
            // dropout 2 ranks × batch 4 equal 1 × batch 4 × accumulation 2, not 1 × batch 8).
            let micro = (rank * t.gradient_accumulation_steps + m) as u64;
            let seed = dropout.then_some(DropoutSeed { seed: config.seed, step, micro });
            let r = forward_backward(&self.decoder, &batch, normalizer, t.gradient_checkpointing, seed);
            sums.loss_sum += r.loss_sum;
            sums.correct += r.correct as f64;
            sums.real_tokens += batch.real_tokens;
        }
        Ok(sums)
    }

    fn save_checkpoint(
        &self,
        config: &TrainConfig,
        log: &mut RunLog,
        step: u64,
        total_steps: u64,
        fingerprint: &str,
        gang: &Gang,
    ) -> Result<Option<PathBuf>> {
        if !gang.is_leader() {
            return Ok(None);
        }
        let progress = Progress { step, total_steps, tokens_seen: self.tokens_seen, ranks: gang.world() };
        save_checkpoint(config, self, log, progress, fingerprint)
    }

    /// The PEFT adapter (LoRA) and the full model (full fine-tuning, or LoRA with `merge`).
    fn export(&self, config: &TrainConfig, model_dir: &ModelDir) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
        let out = &config.output_dir;
        let adapter_dir = match &self.lora {
            Some(l) => {
                let dir = out.join("adapter");
                peft::write_adapter(&dir, &self.decoder, l, &config.model.display().to_string())?;
                Some(dir)
            }
            None => None,
        };
        let model_out = if self.lora.is_none() || config.output.merge {
            let dir = out.join(if self.lora.is_none() { "model" } else { "merged" });
            export::write_merged_model(&dir, &config.model, &self.decoder, models::stored_kind(model_dir))?;
            Some(dir)
        } else {
            None
        };
        Ok((adapter_dir, model_out))
    }
}

fn restore(decoder: &mut Decoder, optimizer: &mut AdamW, r: &checkpoint::LoadedCheckpoint) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for p in &mut optimizer.params {
        let saved = r.trainable.get(&p.name).ok_or_else(|| {
            TrainerError::file(&r.dir, format!("checkpoint lacks tensor {} (different method or LoRA settings?)", p.name))
        })?;
        if saved.size() != p.param.size() {
            return Err(TrainerError::file(
                &r.dir,
                format!("tensor {} has shape {:?}, expected {:?}", p.name, saved.size(), p.param.size()),
            ));
        }
        p.param.copy_(&saved.to_kind(p.param.kind()).to_device(p.param.device()));
    }
    let missing = optimizer.load_state_tensors(&r.optimizer, r.state.step);
    if let Some(name) = missing.first() {
        return Err(TrainerError::file(&r.dir, format!("checkpoint lacks optimizer state {name}")));
    }
    let _ = decoder;
    Ok(())
}

/// Keeps a micro-batch's tensors for `debug/batches.safetensors` (`debug.dump_batches`).
fn dump_batch(batch_dump: &mut Vec<(String, tch::Tensor)>, step: u64, micro: usize, batch: &batches::MicroBatch) {
    let key = format!("step{step}.micro{micro}");
    batch_dump.push((format!("{key}.input_ids"), batch.input_ids.shallow_clone()));
    batch_dump.push((format!("{key}.targets"), batch.targets.shallow_clone()));
    batch_dump.push((format!("{key}.attention_mask"), batch.attention_mask.shallow_clone()));
}

/// What one rank's micro-batches of a step add up to, before the sum over ranks.
#[derive(Default)]
struct StepSums {
    /// What the step's loss is divided by: its trained tokens, or its pairs for DPO.
    normalizer: f64,
    loss_sum: f64,
    /// Tokens predicted right (supervised), pairs ranked right (DPO).
    correct: f64,
    real_tokens: u64,
    /// Over all ranks.
    trained_tokens: u64,
    /// DPO's sums over pairs: see [`preference::metrics`]; zeros otherwise.
    pairs: [f64; PAIR_SUMS],
    /// This rank has no row this step (the end of an epoch).
    empty: bool,
}

/// Where a run stands when it writes a checkpoint.
struct Progress {
    step: u64,
    total_steps: u64,
    tokens_seen: u64,
    ranks: usize,
}

fn save_checkpoint(
    config: &TrainConfig,
    model: &Model,
    log: &mut RunLog,
    progress: Progress,
    fingerprint: &str,
) -> Result<Option<PathBuf>> {
    let (decoder, optimizer, lora) = (&model.decoder, &model.optimizer, model.lora.as_ref());
    let Progress { step, total_steps, tokens_seen, ranks } = progress;
    if step == 0 {
        return Ok(None);
    }
    let out = &config.output_dir;
    let dir = out.join("checkpoints").join(checkpoint::checkpoint_dir_name(step));
    let trainable: Vec<_> = optimizer.params.iter().map(|p| (p.name.clone(), p.param.shallow_clone())).collect();
    let state = CheckpointState {
        step,
        total_steps,
        tokens_seen,
        data_fingerprint: fingerprint.to_string(),
        config: serde_json::to_value(config).expect("config serializes"),
        ranks,
    };
    checkpoint::write_dir_atomically(&dir, |tmp| {
        checkpoint::write_tensors(&tmp.join(checkpoint::TRAINABLE_FILE), &trainable)?;
        checkpoint::write_tensors(&tmp.join(checkpoint::OPTIMIZER_FILE), &optimizer.state_tensors())?;
        if let Some(reference) = &model.reference {
            reference.write(tmp)?;
        }
        if let Some(l) = lora {
            // A usable PEFT adapter inside each checkpoint, like a hosted checkpoint model.
            let adapter = tmp.join("adapter");
            std::fs::create_dir_all(&adapter).map_err(|e| TrainerError::io(&adapter, e))?;
            checkpoint::write_json(
                &adapter.join(peft::ADAPTER_CONFIG),
                &peft::adapter_config_json(l, &config.model.display().to_string()),
            )?;
            checkpoint::write_tensors(&adapter.join(peft::ADAPTER_WEIGHTS), &peft::adapter_tensors(decoder))?;
        }
        // Written last: its presence marks the checkpoint complete.
        checkpoint::write_json(&tmp.join(checkpoint::STATE_FILE), &state)
    })?;
    checkpoint::prune_checkpoints(out, config.train.keep_checkpoints)?;
    log.write_results()?;
    log.emit(&Event::Checkpoint { step, path: dir.display().to_string() })?;
    Ok(Some(dir))
}

/// Mean loss and token accuracy over rows, without gradients.
fn evaluate(
    decoder: &Decoder,
    rows: &[crate::data::packing::Sequence],
    batch_size: usize,
    packed: bool,
    device: Device,
) -> (f64, f64, u64) {
    let (mut loss_sum, mut correct, mut tokens) = (0.0, 0i64, 0u64);
    for chunk in rows.chunks(batch_size) {
        let seqs: Vec<_> = chunk.iter().collect();
        let batch = make_micro_batch(&seqs, packed, PAD_ID, device);
        let r = evaluate_batch(decoder, &batch);
        loss_sum += r.loss_sum;
        correct += r.correct;
        tokens += batch.trained_tokens;
    }
    let n = tokens.max(1) as f64;
    (loss_sum / n, correct as f64 / n, tokens)
}

/// events.jsonl (appended as the run goes) and results.csv (rewritten whole, atomically).
struct RunLog<'a> {
    out: PathBuf,
    /// None on ranks other than 0, which write nothing.
    events: Option<std::fs::File>,
    on_event: &'a mut dyn FnMut(&Event),
    /// step -> (train_loss, train_accuracy, valid_loss, valid_accuracy)
    rows: std::collections::BTreeMap<u64, (f64, f64, Option<f64>, Option<f64>)>,
}

impl<'a> RunLog<'a> {
    fn open(out: &Path, on_event: &'a mut dyn FnMut(&Event), resume_step: u64, writes: bool) -> Result<Self> {
        let path = out.join("events.jsonl");
        let events = match writes {
            true => Some(std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainerError::io(&path, e))?),
            false => None,
        };
        let mut rows = std::collections::BTreeMap::new();
        if resume_step > 0 && writes {
            // Keep the curve of the steps before the checkpoint.
            if let Ok(text) = std::fs::read_to_string(out.join("results.csv")) {
                for line in text.lines().skip(1) {
                    let f: Vec<&str> = line.split(',').collect();
                    let Some(step) = f.first().and_then(|s| s.parse::<u64>().ok()).filter(|&s| s <= resume_step) else { continue };
                    let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
                    rows.insert(step, (num(1).unwrap_or(f64::NAN), num(2).unwrap_or(f64::NAN), num(3), num(4)));
                }
            }
        }
        Ok(RunLog { out: out.to_path_buf(), events, on_event, rows })
    }

    fn emit(&mut self, event: &Event) -> Result<()> {
        (self.on_event)(event);
        match &mut self.events {
            Some(f) => writeln!(f, "{}", event.to_json_line()).map_err(|e| TrainerError::io(self.out.join("events.jsonl"), e)),
            None => Ok(()),
        }
    }

    fn results_path(&self) -> PathBuf {
        self.out.join("results.csv")
    }

    fn step(&mut self, m: &StepMetrics) -> Result<()> {
        self.rows.insert(m.step, (m.loss, m.train_mean_token_accuracy, None, None));
        self.emit(&Event::Step(m.clone()))
    }

    fn eval(&mut self, step: u64, loss: f64, accuracy: f64, tokens: u64) -> Result<()> {
        if let Some(row) = self.rows.get_mut(&step) {
            row.2 = Some(loss);
            row.3 = Some(accuracy);
        }
        self.emit(&Event::Eval { step, valid_loss: loss, valid_mean_token_accuracy: accuracy, valid_tokens: tokens })
    }

    fn write_results(&mut self) -> Result<PathBuf> {
        let path = self.results_path();
        if self.events.is_none() {
            return Ok(path);
        }
        let tmp = self.out.join(".results.csv.tmp");
        let mut text = String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
        let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        for (step, (loss, acc, vloss, vacc)) in &self.rows {
            text.push_str(&format!("{step},{loss},{acc},{},{}\n", opt(*vloss), opt(*vacc)));
        }
        std::fs::write(&tmp, text).map_err(|e| TrainerError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainerError::io(&path, e))?;
        Ok(path)
    }
}
