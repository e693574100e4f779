//! What a worker sends, checked before it is stored. A worker is trusted with its own attempt,
//! not with the database: a value Postgres would refuse (NUL in text, a number past `bigint`)
//! is refused here, naming the field, and nothing a worker made up reaches a tenant unmarked.
//!
//! - Unary calls answer INVALID_ARGUMENT naming the field.
//! - A stream message that cannot be stored is acked and dropped (resending it would block
//!   every report behind it); the tenant sees an event in the controller's own words naming
//!   the field, and the operator the details in the log.
//! - Errors a worker reports for its attempt reach the tenant marked as the worker's, with a
//!   code of the documented shape and the text cleaned and bounded.

use lathe_proto::v1::{EvaluationItem as WireItem, MetricPoint as WirePoint, RegisterRequest};
use lathe_store::dispatch::MetricPoint;
use lathe_store::evaluations::EvaluationItem;
use lathe_store::jobs::JobError;
use serde_json::Value;
use tonic::Status;

/// A stream message refused: which field, and why (both in the controller's words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub field: String,
    pub why: &'static str,
}

impl Refused {
    fn new(field: impl Into<String>, why: &'static str) -> Refused {
        Refused { field: field.into(), why }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

fn invalid(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// A text field of a registration: at most `max` bytes, no NUL or other control characters.
fn plain_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(field, &format!("at most {max} bytes, got {}", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character (NUL, newline, …)"));
    }
    Ok(())
}

/// Longest worker name; the database holds names to it too.
pub const MAX_NAME: usize = 128;
/// Pools one worker may offer.
pub const MAX_POOLS: usize = 32;

/// A Register request whose every field can be stored and shown.
pub fn registration(r: RegisterRequest) -> Result<RegisterRequest, Status> {
    if r.name.trim().is_empty() {
        return Err(invalid("name", "required (a host or task name, for operators)"));
    }
    plain_text("name", &r.name, MAX_NAME)?;
    plain_text("gpu_name", &r.gpu_name, 256)?;
    plain_text("version", &r.version, 64)?;
    plain_text("slurm_job_id", &r.slurm_job_id, 64)?;
    plain_text("pod_name", &r.pod_name, 253)?;
    if r.pools.len() > MAX_POOLS {
        return Err(invalid("pools", &format!("at most {MAX_POOLS}, got {}", r.pools.len())));
    }
    for pool in &r.pools {
        lathe_queue::Pool::parse(pool).map_err(|e| invalid("pools", &e.to_string()))?;
    }
    Ok(r)
}

/// A `bigint` column from an unsigned wire value.
fn bigint(field: impl FnOnce() -> String, value: u64) -> Result<i64, Refused> {
    i64::try_from(value).map_err(|_| Refused::new(field(), "out of range"))
}

/// A batch of metric points as the store keeps them.
pub fn metric_points(points: &[WirePoint]) -> Result<Vec<MetricPoint>, Refused> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = |name: &str| format!("metrics.points[{i}].{name}");
            Ok(MetricPoint {
                step: bigint(|| field("step"), p.step)?,
                total_steps: Some(bigint(|| field("total_steps"), p.total_steps)?),
                train_loss: p.train_loss.map(|v| v as f32),
                valid_loss: p.valid_loss.map(|v| v as f32),
                train_mean_token_accuracy: p.train_mean_token_accuracy.map(|v| v as f32),
                valid_mean_token_accuracy: p.valid_mean_token_accuracy.map(|v| v as f32),
                learning_rate: Some(p.learning_rate),
                grad_norm: p.grad_norm.map(|v| v as f32),
                tokens_per_second: p.tokens_per_second.map(|v| v as f32),
                tokens_seen: Some(bigint(|| field("tokens_seen"), p.tokens_seen)?),
                memory_bytes: p.memory_bytes.map(|v| bigint(|| field("memory_bytes"), v)).transpose()?,
                rewards_chosen: p.rewards_chosen.map(|v| v as f32),
                rewards_rejected: p.rewards_rejected.map(|v| v as f32),
                rewards_accuracy: p.rewards_accuracy.map(|v| v as f32),
                rewards_margin: p.rewards_margin.map(|v| v as f32),
            })
        })
        .collect()
}

/// A step number from a checkpoint commit.
pub fn step(field: &str, value: u64) -> Result<i64, Refused> {
    bigint(|| field.to_string(), value)
}

/// Text a model or a worker produced, made storable: Postgres text cannot hold NUL.
pub fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// JSON from a worker with every NUL in its strings and keys made storable (jsonb refuses
/// `\u0000`).
pub fn storable_json(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(storable(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(storable_json).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (storable(&k), storable_json(v))).collect()),
        other => other,
    }
}

/// An evaluation's items as the store keeps them.
pub fn evaluation_items(items: Vec<WireItem>) -> Result<Vec<EvaluationItem>, Status> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let index = i32::try_from(item.index).map_err(|_| invalid(&format!("items[{i}].index"), "out of range"))?;
            Ok(EvaluationItem {
                index,
                expected: storable(&item.expected),
                extracted: item.extracted.as_deref().map(storable),
                correct: item.correct,
                output: storable(&item.output),
            })
        })
        .collect()
}

/// Longest message a worker may report for its attempt, in bytes.
const MAX_REPORTED_MESSAGE: usize = 2048;

/// An error a worker reports for its attempt, as the tenant sees it: marked as the worker's,
/// its code of the documented shape (lowercase words joined by `_`; else `worker_error`), its
/// text without control characters and bounded.
pub fn reported_error(code: &str, message: &str) -> JobError {
    let code_ok = (1..=64).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let mut text: String = message.chars().map(|c| if c.is_control() && c != '\n' { ' ' } else { c }).collect();
    if text.len() > MAX_REPORTED_MESSAGE {
        let mut end = MAX_REPORTED_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    let text = text.trim();
    JobError {
        code: if code_ok { code.to_string() } else { "worker_error".to_string() },
        message: format!("Reported by the worker: {}", if text.is_empty() { "no details" } else { text }),
        param: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_fields_with_nul_or_too_long_are_refused_by_name() {
        let ok = RegisterRequest { name: "gpu-01".into(), pools: vec!["default".into()], ..Default::default() };
        assert!(registration(ok.clone()).is_ok());
        let cases = [
            (RegisterRequest { name: "a\0b".into(), ..ok.clone() }, "name"),
            (RegisterRequest { name: "x".repeat(MAX_NAME + 1), ..ok.clone() }, "name"),
            (RegisterRequest { name: " ".into(), ..ok.clone() }, "name"),
            (RegisterRequest { gpu_name: "A100\0".into(), ..ok.clone() }, "gpu_name"),
            (RegisterRequest { slurm_job_id: "1\n2".into(), ..ok.clone() }, "slurm_job_id"),
            (RegisterRequest { pools: vec!["Bad Pool".into()], ..ok.clone() }, "pools"),
            (RegisterRequest { pools: vec!["p".into(); MAX_POOLS + 1], ..ok.clone() }, "pools"),
        ];
        for (request, field) in cases {
            let refused = registration(request).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(refused.message().starts_with(&format!("{field}:")), "{}", refused.message());
        }
    }

    #[test]
    fn a_metric_step_past_bigint_is_refused_naming_the_point() {
        let good = WirePoint { step: 3, total_steps: 10, ..Default::default() };
        let bad = WirePoint { step: (1u64 << 63) + 5, ..good };
        assert_eq!(metric_points(std::slice::from_ref(&good)).unwrap()[0].step, 3);
        let refused = metric_points(&[good, bad]).unwrap_err();
        assert_eq!(refused.field, "metrics.points[1].step");
    }

    #[test]
    fn nul_in_worker_json_is_made_storable_everywhere() {
        let value = serde_json::json!({"a\u{0}": ["x\u{0}y", {"k": "\u{0}"}], "n": 1});
        let clean = storable_json(value).to_string();
        assert!(!clean.contains("\\u0000"), "{clean}");
        assert!(clean.contains("x\u{FFFD}y"));
    }

    #[test]
    fn a_reported_error_is_marked_and_its_code_and_text_are_bounded() {
        let error = reported_error("invalid_training_file", "line 3: bad\0row");
        assert_eq!(error.code, "invalid_training_file");
        assert_eq!(error.message, "Reported by the worker: line 3: bad row");
        let forged = reported_error("<script>", &"x".repeat(10_000));
        assert_eq!(forged.code, "worker_error");
        assert!(forged.message.len() < MAX_REPORTED_MESSAGE + 64);
    }
}
