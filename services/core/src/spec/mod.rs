//! A fine-tuning job as validated at create time: [`JobSpec`], built from the request body by
//! `JobSpec::try_from(CreateJobRequest)`, stored as `jobs.spec` (jsonb), and handed to the
//! worker on claim, which maps it onto the trainer's config.
//!
//! Every "auto" and every absent field is resolved here, once, so the stored spec is the whole
//! recipe and a job can be reproduced from it:
//! - `n_epochs` "auto" → 3 and `batch_size` "auto" → 4. OpenAI's "auto" picks these from the
//!   size of the data; Lathe uses fixed documented values so the spec does not depend on the
//!   file (and the job object shows numbers from the start).
//! - Learning rate: an absolute `learning_rate` wins; otherwise `learning_rate_multiplier`
//!   (default 1) × the base rate, 1e-4 for LoRA and 1e-5 for full-parameter training. The
//!   multiplier shown in the job object is always `learning_rate / base`.
//! - LoRA: rank 16, alpha 32, dropout 0, every linear layer, no rsLoRA (the trainer's
//!   defaults). Supervised jobs always train an adapter; `full` never does;
//!   `continued_pretraining` trains every weight unless a `lora` object is given.
//! - Seed 0, cosine schedule, warmup 3 %, 2048 tokens, no packing, loss on assistant tokens
//!   only, pool "default", priority 0.
//!
//! Fields added to `JobSpec` later must carry `#[serde(default)]`: specs stored by older
//! controllers are read back by newer workers.

pub mod integrations;
pub(crate) mod request;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::benchmark::Benchmark;
use crate::ids::FileId;
use crate::model_name::ModelName;
use crate::training_file::{DataFormat, FileSummary};

pub use integrations::{Integration, MlflowRun};
pub use request::{
    AutoOr, CreateJobRequest, DecontaminateRequest, HyperparametersRequest, LoraRequest, MethodRequest, MethodSettingsRequest,
    TargetModulesRequest,
};

pub const DEFAULT_N_EPOCHS: u32 = 3;
pub const DEFAULT_BATCH_SIZE: u32 = 4;
pub const LORA_BASE_LEARNING_RATE: f64 = 1e-4;
pub const FULL_BASE_LEARNING_RATE: f64 = 1e-5;
pub const DEFAULT_SEED: u64 = 0;
pub const DEFAULT_WARMUP_RATIO: f64 = 0.03;
/// The smallest learning rate a job may ask for: below it nothing trains, and far below it
/// (subnormal floats) the arithmetic on it stops being exact.
pub const MIN_LEARNING_RATE: f64 = 1e-10;
pub const DEFAULT_MAX_SEQ_LENGTH: u32 = 2048;
pub const MAX_SEQ_LENGTH_LIMIT: u32 = 131_072;
pub const DEFAULT_POOL: &str = "default";
pub const DEFAULT_LORA_RANK: u32 = 16;
pub const DEFAULT_LORA_ALPHA: f64 = 32.0;
/// The linear layers of every supported decoder, as named in the checkpoint (and by PEFT).
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A field the API refuses. `param` is the field's dotted path as OpenAI's error envelope
/// names it (`hyperparameters.n_epochs`, `lora.rank`), empty when the whole body is at fault;
/// `message` is a full sentence that names the field too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub param: String,
    pub message: String,
    pub code: SpecCode,
}

/// Why a request was refused, as the OpenAI envelope's `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecCode {
    /// A known field with a wrong value (or a missing required one).
    InvalidValue,
    /// A field no version of the API defines: most often a typo (`learnig_rate`).
    UnknownParameter,
    /// A field OpenAI defines that Lathe does not implement (`integrations`, `method.dpo`).
    UnsupportedParameter,
}

impl SpecCode {
    pub fn as_str(self) -> &'static str {
        match self {
            SpecCode::InvalidValue => "invalid_value",
            SpecCode::UnknownParameter => "unknown_parameter",
            SpecCode::UnsupportedParameter => "unsupported_parameter",
        }
    }
}

impl SpecError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError { param: param.into(), message: message.into(), code: SpecCode::InvalidValue }
    }

    /// `lora.rank: must be at least 1, got 0`.
    pub fn invalid(param: &str, detail: impl std::fmt::Display) -> Self {
        SpecError { param: param.to_string(), message: format!("{param}: {detail}"), code: SpecCode::InvalidValue }
    }

    /// `integrations: not supported by Lathe; …`.
    pub fn unsupported(param: &str, detail: impl std::fmt::Display) -> Self {
        SpecError { param: param.to_string(), message: format!("{param}: {detail}"), code: SpecCode::UnsupportedParameter }
    }

    /// The error for a body that does not deserialize: `param` is the failing path, and serde's
    /// "unknown field" (from `deny_unknown_fields`) becomes `unknown_parameter`.
    pub(crate) fn from_serde(param: &str, detail: String) -> Self {
        let code = if detail.starts_with("unknown field") { SpecCode::UnknownParameter } else { SpecCode::InvalidValue };
        if param.is_empty() {
            SpecError { param: String::new(), message: detail, code }
        } else {
            SpecError { param: param.to_string(), message: format!("{param}: {detail}"), code }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Chat or prompt/completion data, loss on the answers.
    Supervised,
    /// Raw `{"text": …}` documents, loss on every token.
    ContinuedPretraining,
    /// Supervised, every weight trained.
    Full,
    /// Direct preference optimisation on preference pairs, a LoRA adapter over the base (the
    /// reference model is the same base with the adapter switched off).
    Dpo,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::ContinuedPretraining => "continued_pretraining",
            Method::Full => "full",
            Method::Dpo => "dpo",
        }
    }

    /// Whether a file of this format can train with this method.
    pub fn accepts(self, format: DataFormat) -> bool {
        match self {
            Method::Supervised | Method::Full => matches!(format, DataFormat::Chat | DataFormat::PromptCompletion),
            Method::ContinuedPretraining => format == DataFormat::Text,
            Method::Dpo => format == DataFormat::Preference,
        }
    }
}

/// The `hyperparameters` of OpenAI's job object, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    /// DPO's β: how far the policy may move from the reference (DPO jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
}

/// Which hyperparameters were "auto" (or absent) in the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoHyperparameters {
    pub n_epochs: bool,
    pub batch_size: bool,
}

/// OpenAI's published rule for "auto" epochs: 3, unless that makes fewer than 100 or more than
/// 25,000 examples seen, then as many epochs (1 to 25) as bring it into that band.
pub fn auto_epochs(examples: usize) -> u32 {
    const TARGET_EPOCHS: usize = 3;
    const MIN_TARGET_EXAMPLES: usize = 100;
    const MAX_TARGET_EXAMPLES: usize = 25_000;
    let examples = examples.max(1);
    let epochs = if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES {
        (MIN_TARGET_EXAMPLES / examples).min(25)
    } else if examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES {
        (MAX_TARGET_EXAMPLES / examples).max(1)
    } else {
        TARGET_EPOCHS
    };
    epochs as u32
}

/// "auto" batch size: about 0.2 % of the examples (as OpenAI's jobs are observed to pick), a
/// power of two from 1 to 256, and a multiple of `gpus` so the global batch splits evenly.
pub fn auto_batch_size(examples: usize, gpus: u32) -> u32 {
    let share = (examples as f64 * 0.002).ceil().max(1.0) as u32;
    let batch = share.next_power_of_two().min(256);
    batch.div_ceil(gpus.max(1)) * gpus.max(1)
}

/// DPO's β when the request says "auto" or nothing (TRL's default too).
pub const DEFAULT_DPO_BETA: f64 = 0.1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// Resolved: "all-linear" is stored as the full list, in checkpoint order.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 4-bit NormalFloat frozen base (QLoRA).
    Nf4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Cosine,
    Linear,
    Constant,
}

/// What a worker needs to take the job: dispatch reads these columns, not the jsonb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub pool: String,
    /// GPU memory the job needs; a worker with less does not claim it.
    pub gpu_memory_gb: Option<u32>,
    /// -100..=100; higher is dispatched first.
    pub priority: i32,
    /// Data-parallel ranks, one per GPU (docs/architecture.md §7); 1 unless asked.
    #[serde(default = "one")]
    pub gpus: u32,
    /// Nodes those ranks span; 1 unless asked.
    #[serde(default = "one")]
    pub nodes: u32,
}

fn one() -> u32 {
    1
}

/// OpenAI keeps a job's last 3 epoch checkpoints.
pub const DEFAULT_KEEP_CHECKPOINTS: u32 = 3;

fn default_keep_checkpoints() -> u32 {
    DEFAULT_KEEP_CHECKPOINTS
}

/// A step cadence (`checkpoint_every`, `eval_every`): at least 1 when given.
fn resolve_cadence(param: &str, value: Option<i64>) -> Result<Option<u32>, SpecError> {
    match value {
        None => Ok(None),
        Some(n) if (1..=1_000_000).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(SpecError::invalid(param, format!("must be a number of steps between 1 and 1000000, got {n}"))),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Base model name, resolved under the models root by the controller.
    pub model: ModelName,
    pub training_file: FileId,
    pub validation_file: Option<FileId>,
    pub method: Method,
    pub hyperparameters: Hyperparameters,
    /// The peak learning rate actually used.
    pub learning_rate: f64,
    /// The request gave `learning_rate` itself (Lathe's extension), not OpenAI's multiplier:
    /// the job then shows the rate, not a multiplier nobody asked for.
    #[serde(default)]
    pub native_learning_rate: bool,
    /// Hyperparameters the request left to "auto", sized from the training data at create
    /// ([`JobSpec::size_from_data`]).
    #[serde(default)]
    pub auto: AutoHyperparameters,
    /// `Some` when the job trains a LoRA adapter on a frozen base.
    pub lora: Option<LoraSpec>,
    pub quantization: Option<Quantization>,
    pub lr_scheduler: LrScheduler,
    pub warmup_ratio: f64,
    pub max_seq_length: u32,
    pub packing: bool,
    pub train_on_inputs: bool,
    pub gradient_checkpointing: bool,
    /// Checkpoints: at each epoch's end, and every this many steps when set.
    #[serde(default)]
    pub checkpoint_every: Option<u32>,
    /// The newest this many checkpoints are kept, listed and served (OpenAI keeps 3).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: u32,
    /// Validation passes every this many steps; at each epoch's end when unset.
    #[serde(default)]
    pub eval_every: Option<u32>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub resources: Resources,
    /// Drop (or only report) training examples that overlap these evaluation sets.
    #[serde(default)]
    pub decontaminate: Option<Decontaminate>,
    /// Evaluations of the fine-tuned model, queued when the job succeeds.
    #[serde(default)]
    pub evaluations: Vec<crate::evaluation::EvaluationSpec>,
    /// Trackers the run is also logged to (MLflow).
    #[serde(default)]
    pub integrations: Vec<Integration>,
}

/// At most this many evaluations per job.
pub const MAX_JOB_EVALUATIONS: usize = 8;

/// A job's evaluations run in the job's pool unless they name one.
fn resolve_evaluations(request: Option<Vec<Value>>, job_pool: &str) -> Result<Vec<crate::evaluation::EvaluationSpec>, SpecError> {
    use crate::evaluation::{EvaluationRequest, EvaluationSpec};
    let requests = request.unwrap_or_default();
    if requests.len() > MAX_JOB_EVALUATIONS {
        return Err(SpecError::invalid("evaluations", format!("at most {MAX_JOB_EVALUATIONS} per job, got {}", requests.len())));
    }
    requests
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let prefix = format!("evaluations[{i}].");
            let request = EvaluationRequest::from_value(value, &prefix)?;
            if request.model.is_some() {
                return Err(SpecError::invalid(
                    &format!("{prefix}model"),
                    "a job's evaluations run on the model it fine-tunes; leave model out",
                ));
            }
            let pool = request.pool.clone().unwrap_or_else(|| job_pool.to_string());
            EvaluationSpec::resolve(&EvaluationRequest { pool: Some(pool), ..request }, &prefix)
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decontaminate {
    /// CTIBench benchmarks ([`Benchmark::CTIBENCH`]) whose items the training data is checked against.
    pub benchmarks: Vec<Benchmark>,
    /// Overlaps are reported but kept.
    pub keep: bool,
}

fn resolve_decontaminate(request: Option<DecontaminateRequest>) -> Result<Option<Decontaminate>, SpecError> {
    let Some(request) = request else { return Ok(None) };
    let benchmarks = request.benchmarks.unwrap_or_else(|| vec!["cti-rcm".into()]);
    if benchmarks.is_empty() {
        return Err(SpecError::invalid("decontaminate.benchmarks", "name at least one benchmark"));
    }
    let known = Benchmark::CTIBENCH;
    let benchmarks = benchmarks
        .iter()
        .map(|name| {
            name.parse::<Benchmark>().ok().filter(|b| known.contains(b)).ok_or_else(|| {
                SpecError::invalid("decontaminate.benchmarks", format!("unknown benchmark {name:?}; known: {}", Benchmark::names(&known)))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((i, repeated)) = benchmarks.iter().enumerate().find(|(i, b)| benchmarks[..*i].contains(b)) {
        return Err(SpecError::invalid(
            "decontaminate.benchmarks",
            format!("{repeated} is named twice (at positions {} and {})", benchmarks.iter().position(|b| b == repeated).unwrap_or(0), i),
        ));
    }
    Ok(Some(Decontaminate { benchmarks, keep: request.keep.unwrap_or(false) }))
}

impl JobSpec {
    /// The job object's `hyperparameters`, resolved: `learning_rate_multiplier` when the
    /// request spoke in multipliers (or left it to "auto"), `learning_rate` when it gave one.
    pub fn hyperparameters_view(&self) -> Value {
        let mut view = serde_json::to_value(self.hyperparameters).expect("hyperparameters serialize");
        if self.native_learning_rate {
            if let Some(map) = view.as_object_mut() {
                map.remove("learning_rate_multiplier");
                map.insert("learning_rate".into(), json!(self.learning_rate));
            }
        }
        view
    }

    /// Resolves the "auto" epochs and batch size from the training file's example count (the
    /// job-create check counts them); explicit values stay.
    pub fn size_from_data(&mut self, examples: usize) {
        if self.auto.n_epochs {
            self.hyperparameters.n_epochs = auto_epochs(examples);
        }
        if self.auto.batch_size {
            self.hyperparameters.batch_size = auto_batch_size(examples, self.resources.gpus);
        }
    }

    /// The job object's `method`: `{"type": "supervised", "supervised": {"hyperparameters": …}}`.
    pub fn method_view(&self) -> Value {
        let kind = self.method.as_str();
        let mut view = serde_json::Map::new();
        view.insert("type".into(), kind.into());
        view.insert(kind.into(), json!({ "hyperparameters": self.hyperparameters_view() }));
        Value::Object(view)
    }

    /// The base rate the multiplier scales: LoRA adapters tolerate a larger one.
    pub fn base_learning_rate(&self) -> f64 {
        base_learning_rate(self.lora.is_some())
    }

    /// Job-create check against the uploaded files' summaries: the data must suit the method.
    pub fn check_files(&self, training: &FileSummary, validation: Option<&FileSummary>) -> Result<(), SpecError> {
        for (param, summary) in [("training_file", Some(training)), ("validation_file", validation)] {
            let Some(summary) = summary else { continue };
            if !self.method.accepts(summary.format) {
                let hint = match (self.method, summary.format) {
                    (Method::ContinuedPretraining, _) => "continued_pretraining reads {\"text\": …} lines",
                    (Method::Dpo, _) => "dpo reads preference pairs: {\"input\": {\"messages\": …}, \"preferred_output\": […], \"non_preferred_output\": […]}",
                    (_, DataFormat::Preference) => "preference pairs train with method.type dpo",
                    _ => "text lines have no answers to learn; use method.type continued_pretraining",
                };
                let detail = format!(
                    "the file is in {} format, which method.type {} cannot train on ({hint})",
                    summary.format.describe(),
                    self.method.as_str()
                );
                return Err(SpecError::invalid(param, detail));
            }
        }
        if let Some(validation) = validation.filter(|v| v.format != training.format) {
            let detail = format!(
                "the file is in {} format but the training file is in {} format",
                validation.format.describe(),
                training.format.describe()
            );
            return Err(SpecError::invalid("validation_file", detail));
        }
        Ok(())
    }
}

fn base_learning_rate(lora: bool) -> f64 {
    if lora {
        LORA_BASE_LEARNING_RATE
    } else {
        FULL_BASE_LEARNING_RATE
    }
}

impl TryFrom<CreateJobRequest> for JobSpec {
    type Error = SpecError;

    fn try_from(request: CreateJobRequest) -> Result<Self, SpecError> {
        let integrations = integrations::resolve_integrations(request.integrations.as_ref())?;
        let model = validate_model_name(request.model.as_deref())?;
        let (training_file, validation_file) = resolve_files(&request)?;
        let (method, hyperparameters_request, hyperparameters_param) = resolve_method(&request)?;
        let lora = resolve_method_lora(method, request.lora.as_ref())?;
        let quantization = resolve_quantization(request.quantization.as_deref(), lora.is_some())?;
        let hyperparameters_request = hyperparameters_request.unwrap_or_default();
        let is_auto = |v: &Option<AutoOr<i64>>| matches!(v, None | Some(AutoOr::Auto));
        let auto = AutoHyperparameters {
            n_epochs: is_auto(&hyperparameters_request.n_epochs),
            batch_size: is_auto(&hyperparameters_request.batch_size),
        };
        let (hyperparameters, learning_rate) =
            resolve_hyperparameters(hyperparameters_request, &hyperparameters_param, request.learning_rate, lora.is_some(), method)?;
        if method == Method::Dpo {
            // A pair's log-probabilities are those of its answer alone, each pair its own row.
            for (param, set) in [("train_on_inputs", request.train_on_inputs), ("packing", request.packing)] {
                if set == Some(true) {
                    return Err(SpecError::invalid(
                        param,
                        "method.type dpo compares the answers of each pair on their own; leave it false",
                    ));
                }
            }
        }
        let lr_scheduler = resolve_lr_scheduler(request.lr_scheduler.as_deref())?;
        let warmup_ratio = request.warmup_ratio.unwrap_or(DEFAULT_WARMUP_RATIO);
        if !(0.0..=1.0).contains(&warmup_ratio) {
            return Err(SpecError::invalid("warmup_ratio", format!("must be in [0, 1], got {warmup_ratio}")));
        }
        let max_seq_length = match request.max_seq_length {
            None => DEFAULT_MAX_SEQ_LENGTH,
            Some(n) if (2..=i64::from(MAX_SEQ_LENGTH_LIMIT)).contains(&n) => n as u32,
            Some(n) => return Err(SpecError::invalid("max_seq_length", format!("must be between 2 and {MAX_SEQ_LENGTH_LIMIT}, got {n}"))),
        };
        let seed = match request.seed {
            None => DEFAULT_SEED,
            Some(s) if (0..=i64::from(i32::MAX)).contains(&s) => s as u64,
            Some(s) => return Err(SpecError::invalid("seed", format!("must be between 0 and {}, got {s}", i32::MAX))),
        };
        // An "auto" batch is sized later as a multiple of the GPUs.
        let resources = resolve_resources(&request, if auto.batch_size { 0 } else { hyperparameters.batch_size })?;

        let evaluations = resolve_evaluations(request.evaluations, &resources.pool)?;
        if !evaluations.is_empty() && lora.is_none() {
            return Err(SpecError::invalid(
                "evaluations",
                "evaluations run on a LoRA adapter over its base model; this job trains every weight (evaluate its files with `lathe eval run`)",
            ));
        }
        Ok(JobSpec {
            model,
            training_file,
            validation_file,
            method,
            hyperparameters,
            learning_rate,
            native_learning_rate: request.learning_rate.is_some(),
            auto,
            lora,
            quantization,
            lr_scheduler,
            warmup_ratio,
            max_seq_length,
            packing: request.packing.unwrap_or(false),
            train_on_inputs: request.train_on_inputs.unwrap_or(false),
            gradient_checkpointing: request.gradient_checkpointing.unwrap_or(false),
            checkpoint_every: resolve_cadence("checkpoint_every", request.checkpoint_every)?,
            keep_checkpoints: match request.keep_checkpoints {
                None => DEFAULT_KEEP_CHECKPOINTS,
                Some(n) if (1..=100).contains(&n) => n as u32,
                Some(n) => return Err(SpecError::invalid("keep_checkpoints", format!("must be between 1 and 100, got {n}"))),
            },
            eval_every: resolve_cadence("eval_every", request.eval_every)?,
            seed,
            suffix: validate_suffix(request.suffix)?,
            metadata: validate_metadata(request.metadata)?,
            resources,
            decontaminate: resolve_decontaminate(request.decontaminate)?,
            evaluations,
            integrations,
        })
    }
}

/// `training_file` (required) and `validation_file` (optional), as file ids.
fn resolve_files(request: &CreateJobRequest) -> Result<(FileId, Option<FileId>), SpecError> {
    let training_file = match request.training_file.as_deref() {
        None | Some("") => return Err(SpecError::invalid("training_file", "missing required parameter")),
        Some(id) => parse_file_id("training_file", id)?,
    };
    let validation_file = match request.validation_file.as_deref() {
        None | Some("") => None,
        Some(id) => Some(parse_file_id("validation_file", id)?),
    };
    Ok((training_file, validation_file))
}

/// The LoRA adapter a method trains: the request's, the default for supervised jobs, none for
/// full fine-tuning (which refuses one).
fn resolve_method_lora(method: Method, lora: Option<&LoraRequest>) -> Result<Option<LoraSpec>, SpecError> {
    match (method, lora) {
        (Method::Full, Some(_)) => Err(SpecError::invalid("lora", "method.type full trains every weight; remove `lora`")),
        (Method::Full, None) | (Method::ContinuedPretraining, None) => Ok(None),
        (_, Some(lora)) => Ok(Some(resolve_lora(lora)?)),
        (Method::Supervised | Method::Dpo, None) => Ok(Some(resolve_lora(&LoraRequest::default())?)),
    }
}

fn resolve_quantization(quantization: Option<&str>, lora: bool) -> Result<Option<Quantization>, SpecError> {
    match quantization {
        None => Ok(None),
        // QLoRA: the base's projections in 4-bit NormalFloat under the LoRA adapter; every
        // worker can run it (CPU kernel, tensor ops on other devices).
        Some("nf4") if lora => Ok(Some(Quantization::Nf4)),
        Some("nf4") => Err(SpecError::invalid(
            "quantization",
            "nf4 (QLoRA) freezes a 4-bit base under a LoRA adapter; it needs LoRA, and this job trains every weight",
        )),
        Some(other) => Err(SpecError::invalid("quantization", format!("expected \"nf4\" or null, got {other:?}"))),
    }
}

/// Epochs, batch size and the learning rate: the absolute `learning_rate` extension wins over
/// OpenAI's multiplier of the method's base rate.
fn resolve_hyperparameters(
    h: HyperparametersRequest,
    param: &str,
    learning_rate: Option<f64>,
    lora: bool,
    method: Method,
) -> Result<(Hyperparameters, f64), SpecError> {
    let beta = match (method, h.beta) {
        (Method::Dpo, None | Some(AutoOr::Auto)) => Some(DEFAULT_DPO_BETA),
        (Method::Dpo, Some(AutoOr::Value(beta))) if beta > 0.0 && beta <= 2.0 => Some(beta),
        (Method::Dpo, Some(AutoOr::Value(beta))) => {
            return Err(SpecError::invalid(&format!("{param}.beta"), format!("must be \"auto\" or in (0, 2], got {beta}")))
        }
        (_, None) => None,
        (other, Some(_)) => {
            return Err(SpecError::invalid(
                &format!("{param}.beta"),
                format!("beta is a DPO hyperparameter; method.type {} has none", other.as_str()),
            ))
        }
    };
    let n_epochs = resolve_count(h.n_epochs, DEFAULT_N_EPOCHS, 1..=50, &format!("{param}.n_epochs"))?;
    let batch_size = resolve_count(h.batch_size, DEFAULT_BATCH_SIZE, 1..=256, &format!("{param}.batch_size"))?;
    let base = base_learning_rate(lora);
    let learning_rate = match (learning_rate, h.learning_rate_multiplier) {
        (Some(lr), _) => {
            if !(MIN_LEARNING_RATE..=1.0).contains(&lr) {
                return Err(SpecError::invalid("learning_rate", format!("must be in [{MIN_LEARNING_RATE:e}, 1], got {lr:e}")));
            }
            lr
        }
        (None, None | Some(AutoOr::Auto)) => base,
        (None, Some(AutoOr::Value(m))) => {
            if !(m > 0.0 && m <= 100.0) || m * base < MIN_LEARNING_RATE {
                let message = format!("must be in (0, 100] and give a learning rate of at least {MIN_LEARNING_RATE:e}, got {m:e}");
                return Err(SpecError::invalid(&format!("{param}.learning_rate_multiplier"), message));
            }
            m * base
        }
    };
    let hyperparameters =
        Hyperparameters { n_epochs, batch_size, learning_rate_multiplier: round_to_12_digits(learning_rate / base), beta };
    Ok((hyperparameters, learning_rate))
}

fn resolve_lr_scheduler(name: Option<&str>) -> Result<LrScheduler, SpecError> {
    match name {
        None | Some("cosine") => Ok(LrScheduler::Cosine),
        Some("linear") => Ok(LrScheduler::Linear),
        Some("constant") => Ok(LrScheduler::Constant),
        Some(other) => Err(SpecError::invalid("lr_scheduler", format!("expected cosine, linear or constant, got {other:?}"))),
    }
}

/// The method, its hyperparameters, and the param prefix errors about them should carry.
fn resolve_method(request: &CreateJobRequest) -> Result<(Method, Option<HyperparametersRequest>, String), SpecError> {
    let top_level = request.hyperparameters.clone().filter(|h| !h.is_empty());
    let Some(method) = &request.method else {
        return Ok((Method::Supervised, top_level, "hyperparameters".into()));
    };
    let (kind, settings) = match method.kind.as_deref() {
        Some("supervised") => (Method::Supervised, &method.supervised),
        Some("continued_pretraining") => (Method::ContinuedPretraining, &method.continued_pretraining),
        Some("full") => (Method::Full, &method.full),
        Some("dpo") => (Method::Dpo, &method.dpo),
        Some("reinforcement") => {
            return Err(SpecError::unsupported(
                "method.type",
                "reinforcement is not supported by Lathe; supported: supervised, dpo, continued_pretraining, full",
            ))
        }
        Some(other) => {
            return Err(SpecError::invalid(
                "method.type",
                format!("unknown method {other:?}; supported: supervised, dpo, continued_pretraining, full"),
            ))
        }
        None => return Err(SpecError::invalid("method.type", "missing required parameter")),
    };
    if method.reinforcement.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(SpecError::unsupported(
            "method.reinforcement",
            "reinforcement is not supported by Lathe; supported: supervised, dpo, continued_pretraining, full",
        ));
    }
    let others = [
        ("supervised", &method.supervised),
        ("dpo", &method.dpo),
        ("continued_pretraining", &method.continued_pretraining),
        ("full", &method.full),
    ];
    if let Some((name, _)) = others.iter().find(|(name, s)| *name != kind.as_str() && s.is_some()) {
        return Err(SpecError::invalid(&format!("method.{name}"), format!("settings for {name}, but method.type is {}", kind.as_str())));
    }
    let nested = settings.as_ref().and_then(|s| s.hyperparameters.clone()).filter(|h| !h.is_empty());
    match (top_level, nested) {
        (Some(_), Some(_)) => Err(SpecError::invalid(
            "hyperparameters",
            format!("give hyperparameters either here or in method.{}.hyperparameters, not both", kind.as_str()),
        )),
        (Some(top), None) => Ok((kind, Some(top), "hyperparameters".into())),
        (None, nested) => Ok((kind, nested, format!("method.{}.hyperparameters", kind.as_str()))),
    }
}

fn resolve_count(value: Option<AutoOr<i64>>, default: u32, range: std::ops::RangeInclusive<i64>, param: &str) -> Result<u32, SpecError> {
    match value {
        None | Some(AutoOr::Auto) => Ok(default),
        Some(AutoOr::Value(n)) if range.contains(&n) => Ok(n as u32),
        Some(AutoOr::Value(n)) => {
            Err(SpecError::invalid(param, format!("must be \"auto\" or between {} and {}, got {n}", range.start(), range.end())))
        }
    }
}

fn resolve_lora(lora: &LoraRequest) -> Result<LoraSpec, SpecError> {
    let rank = match lora.rank {
        None => DEFAULT_LORA_RANK,
        Some(r) if (1..=1024).contains(&r) => r as u32,
        Some(r) => return Err(SpecError::invalid("lora.rank", format!("must be between 1 and 1024, got {r}"))),
    };
    let alpha = lora.alpha.unwrap_or(DEFAULT_LORA_ALPHA);
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(SpecError::invalid("lora.alpha", format!("must be positive, got {alpha}")));
    }
    let dropout = lora.dropout.unwrap_or(0.0);
    if !(0.0..1.0).contains(&dropout) {
        return Err(SpecError::invalid("lora.dropout", format!("must be in [0, 1), got {dropout}")));
    }
    let all = || LINEAR_MODULES.iter().map(|m| m.to_string()).collect::<Vec<_>>();
    let target_modules = match &lora.target_modules {
        None => all(),
        Some(TargetModulesRequest::Keyword(k)) if k == "all-linear" || k == "all" => all(),
        Some(TargetModulesRequest::Keyword(k)) => validate_modules(std::slice::from_ref(k))?,
        Some(TargetModulesRequest::List(names)) => validate_modules(names)?,
    };
    Ok(LoraSpec { rank, alpha, dropout, target_modules, use_rslora: lora.use_rslora.unwrap_or(false) })
}

/// Known names only, in checkpoint order, each once.
fn validate_modules(names: &[String]) -> Result<Vec<String>, SpecError> {
    if names.is_empty() {
        return Err(SpecError::invalid("lora.target_modules", "empty list; omit it to adapt every linear layer"));
    }
    if let Some(unknown) = names.iter().find(|n| !LINEAR_MODULES.contains(&n.as_str())) {
        return Err(SpecError::invalid(
            "lora.target_modules",
            format!("unknown module {unknown:?} (known: all-linear, {})", LINEAR_MODULES.join(", ")),
        ));
    }
    Ok(LINEAR_MODULES.iter().filter(|m| names.iter().any(|n| n == *m)).map(|m| m.to_string()).collect())
}

/// A name under the models root: `/`-separated segments of `[A-Za-z0-9._-]`, none `.` or `..`,
/// so the controller can join it to the root without leaving it.
fn validate_model_name(model: Option<&str>) -> Result<ModelName, SpecError> {
    let model = match model {
        None | Some("") => return Err(SpecError::invalid("model", "missing required parameter")),
        Some(m) => m,
    };
    if model.starts_with("ft:") {
        return Err(SpecError::invalid("model", "fine-tuning a fine-tuned model is not supported yet; give its base model"));
    }
    ModelName::parse(model).map_err(|e| SpecError::invalid("model", e))
}

fn parse_file_id(param: &str, id: &str) -> Result<FileId, SpecError> {
    FileId::parse(id).map_err(|e| SpecError::invalid(param, e))
}

fn validate_suffix(suffix: Option<String>) -> Result<Option<String>, SpecError> {
    let Some(suffix) = suffix.filter(|s| !s.is_empty()) else { return Ok(None) };
    if suffix.chars().count() > 64 {
        return Err(SpecError::invalid("suffix", format!("must be at most 64 characters, got {}", suffix.chars().count())));
    }
    if !suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(SpecError::invalid("suffix", format!("{suffix:?} may only contain letters, digits, '-' and '_'")));
    }
    Ok(Some(suffix))
}

/// Text Postgres can store: a `text` column refuses the NUL character (the database answers
/// with an error, which would surface as a 500). Every string the API stores passes here.
pub fn storable_text(param: &str, text: &str) -> Result<(), SpecError> {
    match text.find('\0') {
        Some(at) => Err(SpecError::invalid(param, format!("contains a NUL character (\\u0000) at byte {at}, which cannot be stored"))),
        None => Ok(()),
    }
}

/// OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
fn validate_metadata(metadata: Option<BTreeMap<String, String>>) -> Result<BTreeMap<String, String>, SpecError> {
    let metadata = metadata.unwrap_or_default();
    if metadata.len() > 16 {
        return Err(SpecError::invalid("metadata", format!("at most 16 pairs, got {}", metadata.len())));
    }
    for (key, value) in &metadata {
        storable_text("metadata", key)?;
        storable_text("metadata", value)?;
        if key.is_empty() || key.chars().count() > 64 {
            return Err(SpecError::invalid("metadata", format!("key {key:?} must be 1 to 64 characters")));
        }
        if value.chars().count() > 512 {
            return Err(SpecError::invalid("metadata", format!("the value of {key:?} is longer than 512 characters")));
        }
    }
    Ok(metadata)
}

/// A pool name (default [`DEFAULT_POOL`]), by the same rule as the Redis queue's pool keys, so
/// that accepted work can always be published.
pub fn resolve_pool(param: &str, pool: Option<String>) -> Result<String, SpecError> {
    let pool = pool.unwrap_or_else(|| DEFAULT_POOL.to_string());
    let pool_ok =
        (1..=64).contains(&pool.len()) && pool.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !pool_ok {
        return Err(SpecError::invalid(param, format!("{pool:?} must be 1 to 64 lowercase letters, digits, '-' or '_'")));
    }
    Ok(pool)
}

fn resolve_resources(request: &CreateJobRequest, batch_size: u32) -> Result<Resources, SpecError> {
    let (pool, gpu_memory_gb, priority) = (request.pool.clone(), request.gpu_memory_gb, request.priority);
    let pool = resolve_pool("pool", pool)?;
    let gpu_memory_gb = match gpu_memory_gb {
        None => None,
        Some(gb) if (1..=4096).contains(&gb) => Some(gb as u32),
        Some(gb) => return Err(SpecError::invalid("gpu_memory_gb", format!("must be between 1 and 4096, got {gb}"))),
    };
    let priority = match priority {
        None => 0,
        Some(p) if (-100..=100).contains(&p) => p as i32,
        Some(p) => return Err(SpecError::invalid("priority", format!("must be between -100 and 100, got {p}"))),
    };
    let gpus = match request.gpus {
        None => 1,
        Some(g) if (1..=64).contains(&g) => g as u32,
        Some(g) => return Err(SpecError::invalid("gpus", format!("must be between 1 and 64, got {g}"))),
    };
    if !batch_size.is_multiple_of(gpus) {
        return Err(SpecError::invalid(
            "gpus",
            format!("hyperparameters.batch_size {batch_size} is the global batch and must split evenly over {gpus} GPUs"),
        ));
    }
    let nodes = match request.nodes {
        None => 1,
        Some(n) if (1..=64).contains(&n) => n as u32,
        Some(n) => return Err(SpecError::invalid("nodes", format!("must be between 1 and 64, got {n}"))),
    };
    if !gpus.is_multiple_of(nodes) {
        // Every node runs the same number of ranks (a worker spanning nodes offers --gpus per node).
        return Err(SpecError::invalid("nodes", format!("{gpus} GPUs do not split evenly over {nodes} nodes")));
    }
    Ok(Resources { pool, gpu_memory_gb, priority, gpus, nodes })
}

/// 5e-5 / 1e-4 is 0.5000000000000001 in binary; the job object shows 0.5.
fn round_to_12_digits(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(11 - x.abs().log10().floor() as i32);
    let rounded = (x * scale).round() / scale;
    // Far from 1 the scale over- or underflows: keep the value rather than store a NaN.
    if rounded.is_finite() && rounded != 0.0 {
        rounded
    } else {
        x
    }
}
