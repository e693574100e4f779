//! The body of `POST /v1/fine_tuning/jobs` as it arrives: OpenAI's fields plus Lathe's
//! extensions (sent by the SDK through `extra_body`). Every field is optional here so that a
//! missing or mistyped one is reported by [`JobSpec::try_from`](super::JobSpec) or
//! [`CreateJobRequest::from_json`] with its exact `param`, never as a bare serde message.
//! A field no version of the API defines is refused (`unknown_parameter`, naming its path), so a
//! typo such as `learnig_rate` cannot silently train at the default; fields OpenAI defines that
//! Lathe does not implement are read only to be refused as `unsupported_parameter`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::SpecError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateJobRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_file: Option<String>,
    /// OpenAI's older top-level form; `method.<type>.hyperparameters` is the current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<HyperparametersRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodRequest>,
    /// OpenAI's Weights & Biases integration: only an empty list (or null) is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrations: Option<Value>,

    // Lathe extensions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraRequest>,
    /// "nf4" (QLoRA) or null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Absolute peak learning rate; wins over `learning_rate_multiplier`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_seq_length: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_on_inputs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Steps between checkpoints besides the one at each epoch's end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<i64>,
    /// How many of the newest checkpoints the job keeps (and lists, and serves as models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<i64>,
    /// Steps between validation passes (default: at each epoch's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_gb: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Data-parallel ranks (GPUs) the job trains on; `hyperparameters.batch_size` is the
    /// global batch, split evenly over them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<i64>,
    /// Nodes the `gpus` span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Check the training file against evaluation sets before training and drop overlaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decontaminate: Option<DecontaminateRequest>,
    /// Evaluations of the fine-tuned model once the job succeeds (`EvaluationRequest`s
    /// without `model`), checked one by one so errors name `evaluations[i].field`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluations: Option<Vec<Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecontaminateRequest {
    /// Benchmarks to protect: `cti-mcq`, `cti-rcm`, `cti-rcm-2021`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benchmarks: Option<Vec<String>>,
    /// Report overlapping examples but train on them anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HyperparametersRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_epochs: Option<AutoOr<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<AutoOr<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
    /// DPO only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<AutoOr<f64>>,
}

impl HyperparametersRequest {
    pub(crate) fn is_empty(&self) -> bool {
        self.n_epochs.is_none() && self.batch_size.is_none() && self.learning_rate_multiplier.is_none() && self.beta.is_none()
    }
}

/// `{"type": "supervised", "supervised": {"hyperparameters": {…}}}`; the settings object is
/// looked up under the name of the type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodRequest {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervised: Option<MethodSettingsRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continued_pretraining: Option<MethodSettingsRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full: Option<MethodSettingsRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<MethodSettingsRequest>,
    /// OpenAI's reinforcement method: refused as unsupported when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reinforcement: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodSettingsRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<HyperparametersRequest>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// "all-linear" or a list of module names (`q_proj`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModulesRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModulesRequest {
    Keyword(String),
    List(Vec<String>),
}

/// OpenAI's `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AutoOr<T> {
    Auto,
    Value(T),
}

impl<T: Serialize> Serialize for AutoOr<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoOr::Auto => serializer.serialize_str("auto"),
            AutoOr::Value(value) => value.serialize(serializer),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(deserializer)? {
            Value::String(s) if s == "auto" => Ok(AutoOr::Auto),
            Value::String(s) => Err(D::Error::custom(format!("expected \"auto\" or a number, found {s:?}"))),
            other => serde_json::from_value(other).map(AutoOr::Value).map_err(D::Error::custom),
        }
    }
}

impl CreateJobRequest {
    /// Parses a request body; a field of the wrong type is named in `param`
    /// (`{"lora": {"rank": "big"}}` → `lora.rank`).
    pub fn from_json(body: &[u8]) -> Result<Self, SpecError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| SpecError::new("", format!("the request body is not valid JSON: {}", without_position(&e))))?;
        Self::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Self, SpecError> {
        if !value.is_object() {
            return Err(SpecError::new("", "the request body must be a JSON object"));
        }
        serde_json::from_value::<Self>(value.clone())
            .map_err(|error| SpecError::from_serde(&failing_path::<Self>(&value), without_position(&error)))
    }
}

/// serde_json's messages end with "at line 1 column N", which means nothing to an API user.
pub(crate) fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    message.split(" at line ").next().unwrap_or(&message).to_string()
}

/// The dotted path of the value that makes `T` fail to deserialize: descend one key at a time,
/// trying a document that holds only that key's path. Works because every field of the
/// request types is optional, so a one-key document fails only because of that key.
pub(crate) fn failing_path<T: DeserializeOwned>(document: &Value) -> String {
    let mut path: Vec<String> = Vec::new();
    let mut node = document;
    while let Value::Object(object) = node {
        let failing = object.iter().find(|(key, child)| {
            let mut probe = (*child).clone();
            for segment in path.iter().chain(std::iter::once(*key)).rev() {
                probe = Value::Object([(segment.clone(), probe)].into_iter().collect());
            }
            serde_json::from_value::<T>(probe).is_err()
        });
        let Some((key, child)) = failing else { break };
        path.push(key.clone());
        node = child;
    }
    path.join(".")
}
