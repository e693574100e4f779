//! From training examples to token ids and loss masks, without libtorch.
//!
//! Sits between `lathe-core` (which parses a JSONL line into an [`Example`]) and the trainer
//! (which packs the encoded rows into batches). The controller runs the same code at job
//! create, so a conversation the model's template refuses, or an example truncated to nothing,
//! is reported then, naming its line, rather than by a worker minutes later.
//!
//! - [`chat_template`]: the model's own Jinja chat template, rendered as transformers does.
//! - [`encoder`]: one example → ids + which tokens carry loss.
//! - [`examples`]: a whole file's examples, with the counts of truncated and dropped ones.
//!
//! [`Example`]: lathe_core::training_file::Example

use std::path::PathBuf;

pub mod chat_template;
pub mod encoder;
pub mod examples;
mod jinja_compat;

pub use chat_template::{read_special_tokens, ChatTemplate, SpecialTokens};
pub use encoder::{EncodeOptions, EncodedExample, Encoder};
pub use examples::{encode_examples, encode_line, EncodedExamples, Tally};

/// The one error type of this crate. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A model file is missing, unreadable or not in the expected format.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// An encoding setting has an impossible value.
    #[error("invalid `{field}`: {message}")]
    InvalidSetting { field: String, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An example could not be encoded; `line` is its 1-based line in the file.
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

impl EncodeError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File { path: path.into(), message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidSetting { field: field.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T, E = EncodeError> = std::result::Result<T, E>;
