//! An evaluation as validated at create time (docs/architecture.md §1): [`EvaluationSpec`] is the whole
//! protocol — benchmark, subset, k-shot, prompt, decoding, extraction rule, how unparsable
//! answers count — built from the body of `POST /v1/evaluations` (or one entry of a job's
//! `evaluations` extension) by [`EvaluationSpec::resolve`], stored with the evaluation, handed
//! to the worker that runs it, and shown with its result. Two results are comparable exactly
//! when their specs are.
//!
//! Defaults, resolved here once: all items, 0 shots, seed 0, no system prompt, greedy
//! generation, the benchmark's answer budget and extraction rule ([`Benchmark::rule`],
//! [`Benchmark::default_max_new_tokens`]); unparsable answers count as wrong.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::benchmark::{Benchmark, Rule};
use crate::ids::FileId;
use crate::spec::request::{failing_path, without_position};
use crate::spec::SpecError;

pub const MAX_NEW_TOKENS_LIMIT: u32 = 4096;
pub const MAX_SHOTS: u32 = 32;

/// The body as it arrives; every field optional so a wrong one is reported with its `param`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationRequest {
    /// A base model under the models root or a fine-tuned `ft:…` model. Absent in a job's
    /// `evaluations` (the job's own fine-tuned model is evaluated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<String>,
    /// For `benchmark: "file"`: an uploaded JSONL file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shots: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// "generate" or "likelihood" (CTI-MCQ only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extraction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unparsable_counts_as_wrong: Option<bool>,
    /// The worker pool that runs it (default `default`; a job's evaluations: the job's pool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl EvaluationRequest {
    pub fn from_json(body: &[u8]) -> Result<Self, SpecError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| SpecError::new("", format!("the request body is not valid JSON: {}", without_position(&e))))?;
        Self::from_value(value, "")
    }

    /// `prefix` names where the object sits (`evaluations[1].`) in error params.
    pub fn from_value(value: Value, prefix: &str) -> Result<Self, SpecError> {
        if !value.is_object() {
            return Err(SpecError::new(prefix.trim_end_matches('.'), "an evaluation must be a JSON object"));
        }
        serde_json::from_value::<Self>(value.clone()).map_err(|error| {
            let param = format!("{prefix}{}", failing_path::<Self>(&value));
            SpecError::from_serde(param.trim_end_matches('.'), without_position(&error))
        })
    }
}

/// Where an evaluation is in its life (beside [`crate::JobStatus`] for jobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvaluationStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl EvaluationStatus {
    pub const ALL: [EvaluationStatus; 5] = [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            EvaluationStatus::Queued => "queued",
            EvaluationStatus::Running => "running",
            EvaluationStatus::Succeeded => "succeeded",
            EvaluationStatus::Failed => "failed",
            EvaluationStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvaluationMode {
    /// Greedy generation, then the extraction rule.
    Generate,
    /// CTI-MCQ: the option letter with the highest next-token probability, nothing generated.
    Likelihood,
}

/// The protocol of one evaluation, every default resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluationSpec {
    pub benchmark: Benchmark,
    /// The own validation set, for `benchmark: "file"`.
    pub file: Option<FileId>,
    /// Evaluate this many items, stratified by answer and chosen with `seed`; None = all.
    pub limit: Option<u32>,
    /// k-shot: solved items from outside the evaluated ones, chosen with `seed`.
    pub shots: u32,
    pub seed: u64,
    pub system_prompt: Option<String>,
    pub mode: EvaluationMode,
    pub max_new_tokens: u32,
    pub extraction: Rule,
    pub unparsable_counts_as_wrong: bool,
    /// Only workers of this pool take it (evaluations stored before pools existed: `default`).
    #[serde(default = "default_pool")]
    pub pool: String,
}

fn default_pool() -> String {
    crate::spec::DEFAULT_POOL.to_string()
}

impl EvaluationSpec {
    /// Validates `request` (its `model` is the caller's business); errors name
    /// `{prefix}{field}`.
    pub fn resolve(request: &EvaluationRequest, prefix: &str) -> Result<EvaluationSpec, SpecError> {
        let param = |field: &str| format!("{prefix}{field}");
        let benchmark = match request.benchmark.as_deref() {
            None => {
                return Err(SpecError::new(
                    param("benchmark"),
                    format!("{}: required; one of {}", param("benchmark"), Benchmark::names(&Benchmark::ALL)),
                ))
            }
            Some(name) => name.parse::<Benchmark>().map_err(|e| SpecError::invalid(&param("benchmark"), e.to_string()))?,
        };
        let file = match (&request.file, benchmark) {
            (Some(id), Benchmark::File) => Some(FileId::parse(id).map_err(|e| SpecError::invalid(&param("file"), e))?),
            (None, Benchmark::File) => {
                return Err(SpecError::invalid(
                    &param("file"),
                    "required with benchmark \"file\": the id of an uploaded JSONL validation set",
                ))
            }
            (Some(_), _) => {
                return Err(SpecError::invalid(
                    &param("file"),
                    format!("only the \"file\" benchmark reads a file; {benchmark} reads the CTIBench data directory"),
                ))
            }
            (None, _) => None,
        };
        let limit = match request.limit {
            None => None,
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => Some(n as u32),
            Some(n) => return Err(SpecError::invalid(&param("limit"), format!("must be at least 1, got {n}"))),
        };
        let shots = match request.shots {
            None => 0,
            Some(n) if (0..=i64::from(MAX_SHOTS)).contains(&n) => n as u32,
            Some(n) => return Err(SpecError::invalid(&param("shots"), format!("must be between 0 and {MAX_SHOTS}, got {n}"))),
        };
        let seed = match request.seed {
            None => 0,
            Some(s) if (0..=i64::from(i32::MAX)).contains(&s) => s as u64,
            Some(s) => return Err(SpecError::invalid(&param("seed"), format!("must be between 0 and {}, got {s}", i32::MAX))),
        };
        let mode = match request.mode.as_deref() {
            None | Some("generate") => EvaluationMode::Generate,
            Some("likelihood") if benchmark.is_mcq() => EvaluationMode::Likelihood,
            Some("likelihood") => {
                return Err(SpecError::invalid(
                    &param("mode"),
                    format!("likelihood scoring compares the options of cti-mcq; {benchmark} needs \"generate\""),
                ))
            }
            Some(other) => return Err(SpecError::invalid(&param("mode"), format!("{other:?} is neither \"generate\" nor \"likelihood\""))),
        };
        let max_new_tokens = match request.max_new_tokens {
            None => benchmark.default_max_new_tokens(),
            Some(n) if (1..=i64::from(MAX_NEW_TOKENS_LIMIT)).contains(&n) => n as u32,
            Some(n) => {
                return Err(SpecError::invalid(&param("max_new_tokens"), format!("must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {n}")))
            }
        };
        let extraction = match request.extraction.as_deref() {
            None => benchmark.rule(),
            // CTIBench answers have one form; only the user's own file may choose its rule.
            Some(rule) if benchmark != Benchmark::File && rule != benchmark.rule().name() => {
                return Err(SpecError::invalid(
                    &param("extraction"),
                    format!("{benchmark} is scored by {}; other rules apply to the \"file\" benchmark", benchmark.rule()),
                ))
            }
            Some(rule) => Rule::parse(rule)
                .ok_or_else(|| SpecError::invalid(&param("extraction"), format!("unknown rule {rule:?}; known: {}", Rule::names())))?,
        };
        if let Some(system) = &request.system_prompt {
            crate::spec::storable_text(&param("system_prompt"), system)?;
            if system.len() > 16_384 {
                return Err(SpecError::invalid(&param("system_prompt"), format!("at most 16384 bytes, got {}", system.len())));
            }
        }
        Ok(EvaluationSpec {
            benchmark,
            file,
            limit,
            shots,
            seed,
            system_prompt: request.system_prompt.clone().filter(|s| !s.is_empty()),
            mode,
            max_new_tokens,
            extraction,
            unparsable_counts_as_wrong: request.unparsable_counts_as_wrong.unwrap_or(true),
            pool: crate::spec::resolve_pool(&param("pool"), request.pool.clone())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolve(body: Value) -> Result<EvaluationSpec, SpecError> {
        EvaluationSpec::resolve(&EvaluationRequest::from_value(body, "")?, "")
    }

    #[test]
    fn defaults_follow_the_benchmark() {
        let mcq = resolve(json!({"benchmark": "cti-mcq"})).unwrap();
        assert_eq!((mcq.max_new_tokens, mcq.extraction.name(), mcq.mode), (32, "mcq-last-line-letter", EvaluationMode::Generate));
        assert!(mcq.unparsable_counts_as_wrong && mcq.shots == 0 && mcq.limit.is_none());
        let rcm = resolve(json!({"benchmark": "cti-rcm-2021", "limit": 50, "shots": 3, "seed": 7})).unwrap();
        assert_eq!((rcm.max_new_tokens, rcm.extraction.name(), rcm.limit, rcm.shots), (384, "rcm-last-cwe", Some(50), 3));
        let own = resolve(json!({"benchmark": "file", "file": "file-abcdefghijklmnopqrstuvwx"})).unwrap();
        assert_eq!(own.extraction.name(), "exact-match");
    }

    #[test]
    fn each_bad_field_is_named() {
        let param = |body: Value| resolve(body).unwrap_err().param;
        assert_eq!(param(json!({})), "benchmark");
        assert_eq!(param(json!({"benchmark": "mmlu"})), "benchmark");
        assert_eq!(param(json!({"benchmark": "file"})), "file");
        assert_eq!(param(json!({"benchmark": "cti-rcm", "file": "file-abcdefghijklmnopqrstuvwx"})), "file");
        assert_eq!(param(json!({"benchmark": "cti-rcm", "mode": "likelihood"})), "mode");
        assert_eq!(param(json!({"benchmark": "cti-rcm", "limit": 0})), "limit");
        assert_eq!(param(json!({"benchmark": "cti-rcm", "limit": "ten"})), "limit");
        assert_eq!(param(json!({"benchmark": "cti-rcm", "extraction": "regex"})), "extraction");
        assert_eq!(param(json!({"benchmark": "cti-mcq", "extraction": "rcm-last-cwe"})), "extraction");
        let own = resolve(json!({"benchmark": "file", "file": "file-abcdefghijklmnopqrstuvwx", "extraction": "rcm-last-cwe"})).unwrap();
        assert_eq!(own.extraction.name(), "rcm-last-cwe");
        let nested = EvaluationRequest::from_value(json!({"shots": -1, "benchmark": "cti-mcq"}), "evaluations[2].").unwrap();
        assert_eq!(EvaluationSpec::resolve(&nested, "evaluations[2].").unwrap_err().param, "evaluations[2].shots");
        let message = resolve(json!({"benchmark": "mmlu"})).unwrap_err().message;
        assert!(message.contains("cti-mcq, cti-rcm, cti-rcm-2021, file"), "{message}");
    }

    #[test]
    fn a_nul_character_in_the_system_prompt_is_refused_naming_the_field() {
        let error = resolve(json!({"benchmark": "cti-mcq", "system_prompt": "be brief\u{0}"})).unwrap_err();
        assert_eq!(error.param, "system_prompt");
        let nested = EvaluationRequest::from_value(json!({"benchmark": "cti-mcq", "system_prompt": "\u{0}"}), "evaluations[1].").unwrap();
        assert_eq!(EvaluationSpec::resolve(&nested, "evaluations[1].").unwrap_err().param, "evaluations[1].system_prompt");
    }
}
