//! A base model's name: its path under a models root (`tiny-qwen3`, `Qwen/Qwen3-0.6B`). Checked
//! once, where it enters (the API, a stored spec); a [`ModelName`] can then be joined to any
//! models root without leaving it, by the controller and by every worker.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    /// One or two `/`-separated segments of `[A-Za-z0-9._-]`, none empty or starting with a dot,
    /// at most 256 bytes in all.
    pub fn parse(name: &str) -> Result<ModelName, String> {
        let segments: Vec<&str> = name.split('/').collect();
        let valid = name.len() <= 256
            && segments.len() <= 2
            && segments
                .iter()
                .all(|s| !s.is_empty() && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        if valid {
            Ok(ModelName(name.to_string()))
        } else {
            Err(format!(
                "{name:?} is not a model name (one or two '/'-separated segments of letters, digits, '.', '_', '-', not starting with '.')"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The model's directory under `root` (which may or may not hold it).
    pub fn dir_under(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }
}

impl TryFrom<String> for ModelName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        ModelName::parse(&name)
    }
}

impl From<ModelName> for String {
    fn from(name: ModelName) -> String {
        name.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ModelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_stay_under_the_models_root_are_accepted_and_others_refused() {
        for good in ["tiny-qwen3", "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B", "a_b.c"] {
            assert_eq!(ModelName::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "..", "../etc", "a/../b", "/abs", "a/b/c", ".hidden", "a//b", "a b", "ft:tiny:x", &"x".repeat(257)] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_stored_bad_name_does_not_deserialize() {
        assert_eq!(serde_json::from_value::<ModelName>("tiny".into()).unwrap().as_str(), "tiny");
        assert!(serde_json::from_value::<ModelName>("../x".into()).is_err());
        assert_eq!(serde_json::to_value(ModelName::parse("Qwen/Q").unwrap()).unwrap(), "Qwen/Q");
    }
}
