//! Public identifiers, in OpenAI's shapes: `file-…`, `ftjob-…`, `ftckpt_…`, `ftevt-…`, each a
//! prefix and 24 alphanumeric characters.
//!
//! Core draws no random numbers: the caller passes 18 random bytes (144 bits) and gets 24 base-62
//! digits (143 bits) back. Event ids are different: events are numbered by a Postgres
//! `bigserial`, and the event id is that number in base 62, zero-padded, so that
//! `GET …/events?after=ftevt-…` is a plain `id > n` scan and sorts as the events do.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Characters after the prefix.
pub const ID_BODY_LEN: usize = 24;

/// Base-62 digits in ascending value, so that zero-padded numbers sort as strings.
const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("expected an id starting with `{expected}`, got {found:?}")]
    WrongPrefix { expected: &'static str, found: String },
    #[error("{found:?} has {len} characters after `{prefix}`; expected {ID_BODY_LEN}")]
    WrongLength { prefix: &'static str, found: String, len: usize },
    #[error("{found:?} may only contain letters and digits after `{prefix}`")]
    BadCharacter { prefix: &'static str, found: String },
}

/// 24 base-62 digits of a 144-bit big-endian number (the top bit is reduced away: value mod 62^24).
fn base62_from_random(bytes: [u8; 18]) -> String {
    let mut number = bytes;
    let mut digits = [0u8; ID_BODY_LEN];
    // Long division by 62, one digit per pass, least significant first.
    for slot in digits.iter_mut().rev() {
        let mut remainder: u32 = 0;
        for byte in number.iter_mut() {
            let accumulator = (remainder << 8) | u32::from(*byte);
            *byte = (accumulator / 62) as u8;
            remainder = accumulator % 62;
        }
        *slot = DIGITS[remainder as usize];
    }
    String::from_utf8(digits.to_vec()).expect("base-62 digits are ASCII")
}

fn validate(prefix: &'static str, text: &str) -> Result<(), IdError> {
    let Some(body) = text.strip_prefix(prefix) else {
        return Err(IdError::WrongPrefix { expected: prefix, found: text.to_string() });
    };
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(IdError::BadCharacter { prefix, found: text.to_string() });
    }
    if body.len() != ID_BODY_LEN {
        return Err(IdError::WrongLength { prefix, found: text.to_string(), len: body.chars().count() });
    }
    Ok(())
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id from 18 random bytes supplied by the caller.
            pub fn from_random(bytes: [u8; 18]) -> Self {
                $name(format!("{}{}", Self::PREFIX, base62_from_random(bytes)))
            }

            /// Checks the prefix, the length and the character set.
            pub fn parse(text: &str) -> Result<Self, IdError> {
                validate(Self::PREFIX, text)?;
                Ok($name(text.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    /// An uploaded file, `file-…`.
    FileId,
    "file-"
);
define_id!(
    /// A fine-tuning job, `ftjob-…`.
    JobId,
    "ftjob-"
);
define_id!(
    /// An evaluation run of a model on a benchmark, `eval-…`.
    EvaluationId,
    "eval-"
);

define_id!(
    /// A committed checkpoint, `ftckpt_…` (OpenAI's underscore, not a dash).
    CheckpointId,
    "ftckpt_"
);
define_id!(
    /// A job event, `ftevt-…`: its job and its number in the job, see [`EventId::of_job`].
    EventId,
    "ftevt-"
);

/// Characters of an event id that name its job; the rest number the event within the job.
const EVENT_JOB_PART: usize = 12;

impl EventId {
    /// The id of event number `sequence` of job `job_id`: twelve characters of the job id, then
    /// the number in base 62. Numbered per job, an id says nothing about other jobs (a global
    /// counter showed every project's activity), and within a job ids sort in commit order.
    pub fn of_job(job_id: &str, sequence: i64) -> Self {
        let job_body = job_id.strip_prefix(JobId::PREFIX).unwrap_or(job_id).as_bytes();
        let mut digits = [DIGITS[0]; ID_BODY_LEN];
        for (slot, byte) in digits[..EVENT_JOB_PART].iter_mut().zip(job_body) {
            *slot = *byte;
        }
        let mut value = sequence.max(0) as u64;
        for slot in digits[EVENT_JOB_PART..].iter_mut().rev() {
            *slot = DIGITS[(value % 62) as usize];
            value /= 62;
        }
        EventId(format!("{}{}", Self::PREFIX, std::str::from_utf8(&digits).expect("ASCII")))
    }

    /// The event's number within job `job_id`, or `None` for an id that is not one of that
    /// job's events.
    pub fn sequence_in(&self, job_id: &str) -> Option<i64> {
        if EventId::of_job(job_id, 0).0[..Self::PREFIX.len() + EVENT_JOB_PART] != self.0[..Self::PREFIX.len() + EVENT_JOB_PART] {
            return None;
        }
        let mut value: u64 = 0;
        for byte in self.0[Self::PREFIX.len() + EVENT_JOB_PART..].bytes() {
            let digit = DIGITS.iter().position(|d| *d == byte)? as u64;
            value = value.checked_mul(62)?.checked_add(digit)?;
        }
        i64::try_from(value).ok()
    }
}

/// The name a finished job's model is listed and addressed by: `ft:<base>:<suffix>:<job id>`,
/// as OpenAI names them (an absent suffix leaves its slot empty: `ft:base::ftjob-…`).
///
/// `base` is the model name as requested; only its last path component is used
/// (`Qwen/Qwen3-0.6B` → `Qwen3-0.6B`), so the name never contains a path separator.
pub fn fine_tuned_model_name(base: &str, suffix: Option<&str>, job_id: &JobId) -> String {
    let base = base.trim_end_matches(['/', '\\']);
    let base = base.rsplit(['/', '\\']).next().unwrap_or(base);
    format!("ft:{base}:{}:{job_id}", suffix.unwrap_or(""))
}

/// The parts of a name made by [`fine_tuned_model_name`]: base, suffix (if any) and job id.
pub fn parse_fine_tuned_model_name(name: &str) -> Option<(&str, Option<&str>, JobId)> {
    let rest = name.strip_prefix("ft:")?;
    let mut parts = rest.rsplitn(3, ':');
    let job_id = JobId::parse(parts.next()?).ok()?;
    let suffix = parts.next()?;
    let base = parts.next().filter(|b| !b.is_empty())?;
    Some((base, Some(suffix).filter(|s| !s.is_empty()), job_id))
}

/// A checkpoint's model name, as OpenAI names them: `<fine-tuned model>:ckpt-step-<step>`.
pub fn checkpoint_model_name(fine_tuned_model: &str, step: i64) -> String {
    format!("{fine_tuned_model}:ckpt-step-{step}")
}

/// `ft:…:ckpt-step-N` → (`ft:…`, Some(N)); any other name → (name, None).
pub fn split_checkpoint_model_name(name: &str) -> (&str, Option<i64>) {
    match name.rsplit_once(":ckpt-step-") {
        Some((model, step)) if model.starts_with("ft:") && !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()) => {
            match step.parse::<i64>() {
                Ok(step) => (model, Some(step)),
                Err(_) => (name, None),
            }
        }
        _ => (name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_model_name_splits_into_its_model_and_step() {
        let model = "ft:tiny-qwen3:cve:ftjob-abc";
        let name = checkpoint_model_name(model, 40);
        assert_eq!(name, "ft:tiny-qwen3:cve:ftjob-abc:ckpt-step-40");
        assert_eq!(split_checkpoint_model_name(&name), (model, Some(40)));
        assert_eq!(split_checkpoint_model_name(model), (model, None));
        assert_eq!(split_checkpoint_model_name("tiny:ckpt-step-4"), ("tiny:ckpt-step-4", None), "only fine-tuned models have checkpoints");
        assert_eq!(split_checkpoint_model_name("ft:a::ftjob-x:ckpt-step-"), ("ft:a::ftjob-x:ckpt-step-", None));
        assert_eq!(split_checkpoint_model_name("ft:a::ftjob-x:ckpt-step-+4"), ("ft:a::ftjob-x:ckpt-step-+4", None));
    }

    #[test]
    fn a_generated_job_id_is_the_prefix_and_24_alphanumerics() {
        let id = JobId::from_random([0xAB; 18]);
        assert!(id.as_str().starts_with("ftjob-"));
        assert_eq!(id.as_str().len(), "ftjob-".len() + 24);
        assert_eq!(JobId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn different_random_bytes_give_different_ids_and_zero_bytes_give_all_zero_digits() {
        let mut other = [0xAB; 18];
        other[17] = 0xAC;
        assert_ne!(FileId::from_random([0xAB; 18]), FileId::from_random(other));
        assert_eq!(FileId::from_random([0; 18]).as_str(), "file-000000000000000000000000");
        // 1 in the lowest byte is the lowest digit.
        let mut one = [0; 18];
        one[17] = 1;
        assert_eq!(FileId::from_random(one).as_str(), "file-000000000000000000000001");
    }

    #[test]
    fn checkpoint_ids_use_an_underscore_like_openai() {
        let id = CheckpointId::from_random([7; 18]);
        assert!(id.as_str().starts_with("ftckpt_"));
        assert!(CheckpointId::parse(&id.as_str().replace('_', "-")).is_err());
    }

    #[test]
    fn ids_with_the_wrong_prefix_length_or_characters_are_refused() {
        let good = JobId::from_random([1; 18]).to_string();
        assert!(matches!(FileId::parse(&good), Err(IdError::WrongPrefix { .. })));
        assert!(matches!(JobId::parse(&good[..good.len() - 1]), Err(IdError::WrongLength { len: 23, .. })));
        assert!(matches!(JobId::parse(&format!("{good}x")), Err(IdError::WrongLength { len: 25, .. })));
        let with_dot = format!("ftjob-../{}", &good[9..]);
        assert!(matches!(JobId::parse(&with_dot), Err(IdError::BadCharacter { .. })));
        assert!(JobId::parse("").is_err());
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let id = JobId::from_random([9; 18]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<JobId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<JobId>("\"ftjob-nope\"").is_err());
    }

    #[test]
    fn event_ids_round_trip_their_number_in_their_job_and_sort_like_it() {
        let job = JobId::from_random([7; 18]);
        let other = JobId::from_random([8; 18]);
        for n in [0, 1, 61, 62, 1_000_000, i64::MAX] {
            let id = EventId::of_job(job.as_str(), n);
            assert_eq!(EventId::parse(id.as_str()).unwrap().sequence_in(job.as_str()), Some(n), "{id}");
            assert_eq!(id.sequence_in(other.as_str()), None, "{id} is not an event of another job");
        }
        assert!(EventId::of_job(job.as_str(), 99) < EventId::of_job(job.as_str(), 100));
        assert!(EventId::of_job(job.as_str(), 61) < EventId::of_job(job.as_str(), 62));
        assert_ne!(EventId::of_job(job.as_str(), 1), EventId::of_job(other.as_str(), 1));
        // A valid-looking id beyond i64 is no event of ours.
        let body = &job.as_str()[JobId::PREFIX.len()..][..12];
        assert_eq!(EventId::parse(&format!("ftevt-{body}zzzzzzzzzzzz")).unwrap().sequence_in(job.as_str()), None);
    }

    #[test]
    fn a_fine_tuned_model_name_has_base_suffix_and_job_id() {
        let job = JobId::from_random([3; 18]);
        let name = fine_tuned_model_name("Qwen/Qwen3-0.6B", Some("cve-cwe"), &job);
        assert_eq!(name, format!("ft:Qwen3-0.6B:cve-cwe:{job}"));
        assert_eq!(parse_fine_tuned_model_name(&name), Some(("Qwen3-0.6B", Some("cve-cwe"), job.clone())));

        let unnamed = fine_tuned_model_name("tiny-qwen3", None, &job);
        assert_eq!(unnamed, format!("ft:tiny-qwen3::{job}"));
        assert_eq!(parse_fine_tuned_model_name(&unnamed), Some(("tiny-qwen3", None, job)));
        assert_eq!(parse_fine_tuned_model_name("tiny-qwen3"), None);
    }
}
