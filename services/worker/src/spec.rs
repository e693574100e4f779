//! A claimed job's spec (as the API validated and stored it) mapped onto the trainer's
//! configuration: the one place where API names meet trainer names.

use std::path::{Path, PathBuf};

use lathe_core::spec::Quantization;
use lathe_core::JobSpec;
use lathe_core::ModelName;
use lathe_trainer::train::train_config::{
    DataSettings, DebugSettings, LoopSettings, LoraSettings, OptimSettings, OutputSettings, QuantizationSetting, TargetModulesSetting,
};
use lathe_trainer::train::{DpoSettings, Method, TrainConfig};

/// Why a claimed job cannot run here, with the `error.code` it is reported under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrunnable {
    pub code: &'static str,
    pub message: String,
    /// The fault is this worker's (a model or mount missing here): retried on another worker,
    /// not failed as the user's bad input.
    pub this_worker: bool,
}

impl Unrunnable {
    pub fn job(code: &'static str, message: impl Into<String>) -> Self {
        Unrunnable { code, message: message.into(), this_worker: false }
    }

    pub fn here(code: &'static str, message: impl Into<String>) -> Self {
        Unrunnable { code, message: message.into(), this_worker: true }
    }
}

/// Where the claim says the data and outputs are.
pub struct Paths<'a> {
    pub training_file: &'a Path,
    pub validation_file: Option<&'a Path>,
    pub output_dir: &'a Path,
}

pub struct Settings<'a> {
    pub models_root: &'a Path,
    pub device: &'a str,
    pub checkpoint_every: u64,
    pub threads: usize,
    /// fp32, bf16 or auto (bf16 where the device multiplies it natively).
    pub dtype: &'a str,
}

pub fn train_config(spec: &JobSpec, paths: Paths<'_>, settings: Settings<'_>) -> Result<TrainConfig, Unrunnable> {
    let model = model_dir(settings.models_root, &spec.model)?;
    let lora = spec.lora.as_ref();
    Ok(TrainConfig {
        model,
        train_file: paths.training_file.to_path_buf(),
        validation_file: paths.validation_file.map(Path::to_path_buf),
        output_dir: paths.output_dir.to_path_buf(),
        method: if lora.is_some() { Method::Lora } else { Method::Full },
        quantization: spec.quantization.map(|q| match q {
            Quantization::Nf4 => QuantizationSetting::Nf4,
        }),
        // QLoRA as its paper and bitsandbytes' recipe run it.
        double_quantization: true,
        seed: spec.seed,
        data: DataSettings { max_seq_length: spec.max_seq_length as usize, packing: spec.packing, train_on_inputs: spec.train_on_inputs },
        lora: match lora {
            Some(l) => LoraSettings {
                rank: l.rank as i64,
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: TargetModulesSetting::List(l.target_modules.clone()),
                use_rslora: l.use_rslora,
            },
            None => LoraSettings::default(),
        },
        optim: OptimSettings {
            learning_rate: spec.learning_rate,
            lr_scheduler: spec.lr_scheduler,
            warmup_ratio: spec.warmup_ratio,
            ..OptimSettings::default()
        },
        train: LoopSettings {
            epochs: spec.hyperparameters.n_epochs as u64,
            // The job's batch is global; each data-parallel rank trains its share of it.
            batch_size: (spec.hyperparameters.batch_size / spec.resources.gpus.max(1)) as usize,
            device: settings.device.to_string(),
            // OpenAI's cadence: a checkpoint and a validation pass at each epoch's end; more
            // checkpoints when the job asks, or at the operator's cadence (`--checkpoint-every`)
            // so a long epoch is never lost to a preemption.
            checkpoint_each_epoch: true,
            checkpoint_every: spec.checkpoint_every.map_or(settings.checkpoint_every, u64::from),
            eval_each_epoch: spec.eval_every.is_none(),
            eval_every: spec.eval_every.map_or(0, u64::from),
            // The trainer keeps every checkpoint; the worker prunes all but the job's newest
            // `keep_checkpoints` once the controller has acked a newer one (`prune_checkpoints`).
            keep_checkpoints: 0,
            gradient_checkpointing: spec.gradient_checkpointing,
            threads: settings.threads,
            dtype: settings.dtype.to_string(),
            ..LoopSettings::default()
        },
        debug: DebugSettings::default(),
        output: OutputSettings::default(),
        dpo: spec.hyperparameters.beta.filter(|_| spec.method == lathe_core::spec::Method::Dpo).map(|beta| DpoSettings { beta }),
    })
}

/// The base model's directory. A [`ModelName`] stays under the root by construction (it was
/// checked when the spec was decoded); what can still be wrong is this machine's models root.
pub(crate) fn model_dir(models_root: &Path, name: &ModelName) -> Result<PathBuf, Unrunnable> {
    let dir = name.dir_under(models_root);
    if !dir.join("config.json").is_file() {
        return Err(Unrunnable::here(
            "model_not_found",
            format!("model \"{name}\" is not under this worker's models root {}", models_root.display()),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_core::CreateJobRequest;

    fn spec(body: serde_json::Value) -> JobSpec {
        JobSpec::try_from(CreateJobRequest::from_value(body).unwrap()).unwrap()
    }

    #[test]
    fn a_lora_spec_becomes_the_trainer_settings_the_user_asked_for() {
        let root = std::env::temp_dir().join(format!("lathe-worker-spec-{}", std::process::id()));
        std::fs::create_dir_all(root.join("tiny")).unwrap();
        std::fs::write(root.join("tiny/config.json"), "{}").unwrap();
        let spec = spec(serde_json::json!({
            "model": "tiny", "training_file": "file-abcdefghijklmnopqrstuvwx",
            "hyperparameters": {"n_epochs": 2, "batch_size": 8},
            "learning_rate": 0.005, "max_seq_length": 256, "packing": true,
            "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, "seed": 7,
        }));
        let paths = Paths { training_file: Path::new("/d/files/a"), validation_file: None, output_dir: Path::new("/d/jobs/j") };
        let settings = Settings { models_root: &root, device: "cpu", checkpoint_every: 5, threads: 1, dtype: "auto" };
        let config = train_config(&spec, paths, settings).unwrap();
        assert_eq!(config.method, Method::Lora);
        assert_eq!((config.train.epochs, config.train.batch_size, config.seed), (2, 8, 7));
        assert_eq!((config.optim.learning_rate, config.data.max_seq_length, config.data.packing), (0.005, 256, true));
        assert_eq!((config.lora.rank, config.lora.alpha), (8, 16.0));
        assert!(matches!(&config.lora.target_modules, TargetModulesSetting::List(m) if m == &["q_proj", "v_proj"]));
        assert_eq!((config.train.checkpoint_every, config.train.device.as_str()), (5, "cpu"));
        assert!(config.train.checkpoint_each_epoch && config.train.eval_each_epoch && config.train.eval_every == 0);
        config.validate().unwrap();

        // The job's own cadences win over the worker's.
        let mut asked = spec.clone();
        (asked.checkpoint_every, asked.eval_every) = (Some(40), Some(10));
        let paths = Paths { training_file: Path::new("/d/files/a"), validation_file: None, output_dir: Path::new("/d/jobs/j") };
        let settings = Settings { models_root: &root, device: "cpu", checkpoint_every: 5, threads: 1, dtype: "auto" };
        let config = train_config(&asked, paths, settings).unwrap();
        assert_eq!((config.train.checkpoint_every, config.train.eval_every, config.train.eval_each_epoch), (40, 10, false));

        let missing = spec_with_model("absent");
        let paths = Paths { training_file: Path::new("/x"), validation_file: None, output_dir: Path::new("/y") };
        let settings = Settings { models_root: &root, device: "cpu", checkpoint_every: 5, threads: 1, dtype: "auto" };
        let refused = train_config(&missing, paths, settings).unwrap_err();
        assert_eq!(refused.code, "model_not_found");
        assert!(refused.message.starts_with("model \"absent\" is not under"), "in user words: {}", refused.message);
        std::fs::remove_dir_all(root).unwrap();
    }

    fn spec_with_model(model: &str) -> JobSpec {
        spec(serde_json::json!({"model": model, "training_file": "file-abcdefghijklmnopqrstuvwx"}))
    }
}
