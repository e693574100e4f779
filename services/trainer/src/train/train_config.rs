//! The resolved settings of one training run: read from TOML by `lathe train`, built from a
//! job spec by the worker, validated in one place, and saved into every checkpoint so a run
//! can be reproduced from its output directory alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lora::{LoraConfig, TargetModules};
use crate::nf4::Quantization;
use crate::schedule::Decay;
use crate::{Result, TrainerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on a frozen base.
    #[default]
    Lora,
    /// Every weight is trained.
    Full,
    /// DPO on preference pairs with a LoRA adapter: `method = "lora"` with a `[dpo]` table.
    Dpo,
}

/// Direct preference optimisation (the `[dpo]` table): trains on preference pairs with the
/// sigmoid loss −log σ(β·((log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)))), each
/// log-probability summed over the answer's tokens. The reference is the base model (the
/// adapter switched off) for LoRA, the weights at step 0 for full training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSettings {
    pub beta: f64,
}

impl Default for DpoSettings {
    fn default() -> Self {
        DpoSettings { beta: 0.1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizationSetting {
    /// 4-bit NormalFloat, blocks of 64, as bitsandbytes (docs/qlora.md).
    Nf4,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer files).
    pub model: PathBuf,
    /// JSONL: OpenAI chat (`messages`), `prompt`/`completion`, or `{"text": ...}` for continued pre-training.
    pub train_file: PathBuf,
    #[serde(default)]
    pub validation_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    #[serde(default)]
    pub method: Method,
    /// "nf4": QLoRA, the base's decoder projections held in 4-bit NormalFloat (LoRA only).
    #[serde(default)]
    pub quantization: Option<QuantizationSetting>,
    /// With nf4, also quantize the per-block scales (bitsandbytes' `bnb_4bit_use_double_quant`).
    #[serde(default = "default_true")]
    pub double_quantization: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub data: DataSettings,
    #[serde(default)]
    pub lora: LoraSettings,
    #[serde(default)]
    pub optim: OptimSettings,
    #[serde(default)]
    pub train: LoopSettings,
    #[serde(default)]
    pub debug: DebugSettings,
    #[serde(default)]
    pub output: OutputSettings,
    /// Present: train with DPO on a preference file instead of supervised cross-entropy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSettings {
    pub max_seq_length: usize,
    /// Several examples per row, attention kept within each example.
    pub packing: bool,
    /// Also train on system/user tokens (and prompts).
    pub train_on_inputs: bool,
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings { max_seq_length: 2048, packing: false, train_on_inputs: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModulesSetting {
    /// "all-linear"
    Keyword(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModulesSetting,
    pub use_rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModulesSetting::Keyword("all-linear".into()),
            use_rslora: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSettings {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    /// cosine | linear | constant (an unknown name fails when the TOML is read, with its line).
    pub lr_scheduler: Decay,
    /// Warmup as a number of steps; when absent, `warmup_ratio` of the total.
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: f64,
}

impl Default for OptimSettings {
    fn default() -> Self {
        OptimSettings {
            learning_rate: 1e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            lr_scheduler: Decay::Cosine,
            warmup_steps: None,
            warmup_ratio: 0.03,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSettings {
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// "fp32" | "bf16" | "fp16" | "auto"
    pub dtype: String,
    /// "cpu" | "cuda" | "cuda:N" | "auto"
    pub device: String,
    pub shuffle: bool,
    /// Evaluate on the validation file every N steps (0: only at the end).
    pub eval_every: u64,
    /// Write a resumable checkpoint every N steps (0: none before the end).
    pub checkpoint_every: u64,
    /// Also write a checkpoint at the end of every epoch but the last (OpenAI's cadence).
    pub checkpoint_each_epoch: bool,
    /// Also evaluate on the validation file at the end of every epoch.
    pub eval_each_epoch: bool,
    /// Keep only the newest N checkpoints (0: keep all).
    pub keep_checkpoints: usize,
    /// Recompute each layer's activations in the backward pass instead of storing them.
    pub gradient_checkpointing: bool,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
}

impl Default for LoopSettings {
    fn default() -> Self {
        LoopSettings {
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            dtype: "auto".into(),
            device: "auto".into(),
            shuffle: true,
            eval_every: 0,
            checkpoint_every: 0,
            checkpoint_each_epoch: false,
            eval_each_epoch: false,
            keep_checkpoints: 0,
            gradient_checkpointing: false,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DebugSettings {
    /// Write the initial adapter and every batch to `output_dir/debug/` (for parity tests).
    pub dump_batches: bool,
    /// Record every libtorch op of this optimizer step (1-based) to
    /// `output_dir/debug/profile-step{N}.json`, a Chrome trace as torch.profiler writes it
    /// (`bench/profile_ops.py` tabulates it). 0: off.
    pub profile_step: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSettings {
    /// Also write the base model with the adapter merged in (`output_dir/merged/`).
    pub merge: bool,
}

impl TrainConfig {
    /// Reads a TOML file; relative paths inside it are taken from the file's directory.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        let mut config: TrainConfig = toml::from_str(&text)
            .map_err(|e| TrainerError::file(path, format!("invalid config: {}", e.message().trim())).with_toml_span(&text, e.span()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.model, &mut config.train_file, &mut config.output_dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(v) = config.validation_file.as_mut().filter(|v| v.is_relative()) {
            *v = base.join(&*v);
        }
        Ok(config)
    }

    /// Writes the config as TOML that [`TrainConfig::from_toml_file`] reads back unchanged: how
    /// a worker hands a job's settings to the other ranks of a data-parallel attempt.
    pub fn write_toml_file(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).map_err(|e| TrainerError::file(path, format!("cannot write the config as TOML: {e}")))?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).map_err(|e| TrainerError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| TrainerError::io(path, e))
    }

    /// DPO's β when the run trains on preference pairs (`method = "dpo"` or a `[dpo]` table).
    pub fn dpo_beta(&self) -> Option<f64> {
        match (&self.dpo, self.method) {
            (Some(d), _) => Some(d.beta),
            (None, Method::Dpo) => Some(DpoSettings::default().beta),
            (None, _) => None,
        }
    }

    /// Whether the run trains a LoRA adapter (everything but `method = "full"`).
    pub fn trains_lora(&self) -> bool {
        self.method != Method::Full
    }

    /// How the frozen base weights are held.
    pub fn quantization(&self) -> Quantization {
        match self.quantization {
            None => Quantization::None,
            Some(QuantizationSetting::Nf4) => Quantization::Nf4 { double_quant: self.double_quantization },
        }
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        let target_modules = match &self.lora.target_modules {
            TargetModulesSetting::Keyword(k) if k == "all-linear" || k == "all" => TargetModules::AllLinear,
            TargetModulesSetting::Keyword(k) => TargetModules::Named(vec![k.clone()]),
            TargetModulesSetting::List(list) => TargetModules::Named(list.clone()),
        };
        let config = LoraConfig {
            rank: self.lora.rank,
            alpha: self.lora.alpha,
            dropout: self.lora.dropout,
            target_modules,
            use_rslora: self.lora.use_rslora,
            init_seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting that does not need the model or data; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let o = &self.optim;
        let t = &self.train;
        if !(o.learning_rate > 0.0 && o.learning_rate.is_finite()) {
            return Err(TrainerError::invalid("optim.learning_rate", format!("must be > 0, got {}", o.learning_rate)));
        }
        if o.weight_decay < 0.0 {
            return Err(TrainerError::invalid("optim.weight_decay", "must be >= 0"));
        }
        for (name, beta) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(TrainerError::invalid(name, format!("must be in [0, 1), got {beta}")));
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return Err(TrainerError::invalid("optim.eps", "must be > 0"));
        }
        if o.max_grad_norm < 0.0 {
            return Err(TrainerError::invalid("optim.max_grad_norm", "must be >= 0 (0 disables clipping)"));
        }
        if !(0.0..=1.0).contains(&o.warmup_ratio) {
            return Err(TrainerError::invalid("optim.warmup_ratio", "must be in [0, 1]"));
        }
        if self.data.max_seq_length < 2 {
            return Err(TrainerError::invalid("data.max_seq_length", format!("must be at least 2, got {}", self.data.max_seq_length)));
        }
        if t.epochs == 0 {
            return Err(TrainerError::invalid("train.epochs", "must be at least 1"));
        }
        if t.max_steps == Some(0) {
            return Err(TrainerError::invalid("train.max_steps", "must be at least 1 when set"));
        }
        if t.batch_size == 0 {
            return Err(TrainerError::invalid("train.batch_size", "must be at least 1"));
        }
        if t.gradient_accumulation_steps == 0 {
            return Err(TrainerError::invalid("train.gradient_accumulation_steps", "must be at least 1"));
        }
        crate::device::parse_dtype(&t.dtype).map_err(|e| TrainerError::invalid("train.dtype", e.to_string()))?;
        if self.trains_lora() {
            self.lora_config()?;
        }
        if let Some(beta) = self.dpo_beta() {
            if !(beta > 0.0 && beta.is_finite()) {
                return Err(TrainerError::invalid("dpo.beta", format!("must be > 0, got {beta}")));
            }
            for (field, set) in [("data.packing", self.data.packing), ("data.train_on_inputs", self.data.train_on_inputs)] {
                if set {
                    return Err(TrainerError::invalid(field, "DPO compares the answers of each pair on their own; set it to false"));
                }
            }
        }
        if self.method == Method::Full && self.quantization.is_some() {
            return Err(TrainerError::invalid(
                "quantization",
                "nf4 (QLoRA) freezes a 4-bit base under a LoRA adapter; method = \"full\" trains every weight",
            ));
        }
        Ok(())
    }
}

trait WithTomlSpan {
    fn with_toml_span(self, text: &str, span: Option<std::ops::Range<usize>>) -> Self;
}

impl WithTomlSpan for TrainerError {
    /// Adds "line N" to a TOML parse error so the user can find it.
    fn with_toml_span(self, text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        match (self, span) {
            (TrainerError::File { path, message }, Some(span)) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                TrainerError::DataLine { path, line, message }
            }
            (other, _) => other,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_config_written_as_toml_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut config: TrainConfig =
            toml::from_str("model = \"/m\"\ntrain_file = \"/t.jsonl\"\noutput_dir = \"/o\"\n[lora]\ntarget_modules = [\"q_proj\"]\n")
                .unwrap();
        config.validation_file = Some("/v.jsonl".into());
        config.train.batch_size = 3;
        let path = dir.path().join("rank.toml");
        config.write_toml_file(&path).unwrap();
        let back = TrainConfig::from_toml_file(&path).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&config).unwrap());
    }

    use super::*;

    fn parse(extra: &str) -> TrainConfig {
        toml::from_str(&format!("model = \"m\"\ntrain_file = \"t.jsonl\"\noutput_dir = \"out\"\n{extra}")).unwrap()
    }

    #[test]
    fn defaults_are_a_sensible_lora_run() {
        let c = parse("");
        assert_eq!(c.method, Method::Lora);
        assert_eq!((c.lora.rank, c.lora.alpha), (16, 32.0));
        assert!(c.validate().is_ok());
        assert_eq!(c.lora_config().unwrap().target_module_names().len(), 7);
    }

    #[test]
    fn impossible_values_are_rejected_naming_the_field() {
        for (toml, field) in [
            ("[lora]\nrank = 0", "lora.rank"),
            ("[optim]\nlearning_rate = 0.0", "optim.learning_rate"),
            ("[optim]\nlearning_rate = -1e-4", "optim.learning_rate"),
            ("[data]\nmax_seq_length = 0", "data.max_seq_length"),
            ("[train]\nbatch_size = 0", "train.batch_size"),
            ("[train]\ndtype = \"int8\"", "train.dtype"),
            ("method = \"full\"\nquantization = \"nf4\"", "quantization"),
            ("[dpo]\nbeta = 0.0", "dpo.beta"),
            ("method = \"dpo\"\n[data]\npacking = true", "data.packing"),
        ] {
            let err = parse(toml).validate().unwrap_err().to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }

    #[test]
    fn dpo_is_method_dpo_or_a_dpo_table_over_lora_or_full() {
        assert_eq!(parse("").dpo_beta(), None);
        let lora = parse("method = \"dpo\"");
        assert_eq!((lora.dpo_beta(), lora.trains_lora()), (Some(0.1), true));
        let full = parse("method = \"full\"\n[dpo]\nbeta = 0.5");
        assert_eq!((full.dpo_beta(), full.trains_lora()), (Some(0.5), false));
        assert!(full.validate().is_ok());
    }

    #[test]
    fn nf4_reads_as_qlora_with_double_quantization_unless_turned_off() {
        assert_eq!(parse("").quantization(), Quantization::None);
        assert_eq!(parse("quantization = \"nf4\"").quantization(), Quantization::Nf4 { double_quant: true });
        let single = parse("quantization = \"nf4\"\ndouble_quantization = false");
        assert_eq!(single.quantization(), Quantization::Nf4 { double_quant: false });
        assert!(toml::from_str::<TrainConfig>("model = \"m\"\ntrain_file = \"t\"\noutput_dir = \"o\"\nquantization = \"int4\"").is_err());
    }

    #[test]
    fn an_unknown_scheduler_is_reported_with_its_line_and_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "model = \"m\"\ntrain_file = \"t\"\noutput_dir = \"o\"\n[optim]\nlr_scheduler = \"step\"\n").unwrap();
        let err = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains(":5:") && err.contains("step") && err.contains("cosine"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "model = \"m\"\ntrain_file = \"t\"\noutput_dir = \"o\"\n[lora]\nrnak = 4\n").unwrap();
        let err = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains(":5:") && err.contains("rnak"), "{err}");
    }
}
