//! The one error type of the trainer crate. Every variant names what the user must fix: the
//! file, the field or the line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A file is missing, unreadable or not in the expected format.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    /// A configuration file has a field with a missing, unsupported or impossible value.
    #[error("{path}: field `{field}`: {message}")]
    ConfigField { path: PathBuf, field: String, message: String },

    /// A training or validation data line is not valid (line numbers start at 1).
    #[error("{path}:{line}: {message}")]
    DataLine { path: PathBuf, line: usize, message: String },

    /// A training setting (from a config file, flag or job spec) has an impossible value.
    #[error("invalid `{field}`: {message}")]
    InvalidSetting { field: String, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// Writing to storage failed (the disk is full, read-only, failing): nothing about the run
    /// is wrong, and it can go on once the storage is fixed.
    #[error("{path}: cannot write: {message}")]
    Storage { path: PathBuf, message: String },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A collective of a data-parallel run failed: another rank died, or timed out.
    #[error("data parallel: {0}")]
    Distributed(#[from] lathe_torch_ext::dist::DistError),

    /// The caller asked the run to stop (cancel or preemption); a checkpoint may have been written.
    #[error("training stopped: {0}")]
    Stopped(String),
}

impl TrainerError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File { path: path.into(), message: message.into() }
    }

    pub fn config_field(path: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigField { path: path.into(), field: field.into(), message: message.into() }
    }

    pub fn data_line(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        Self::DataLine { path: path.into(), line, message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidSetting { field: field.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub fn storage(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Storage { path: path.into(), message: message.to_string() }
    }

    /// When writing to storage failed under the run (full, over quota, read-only), the fault's
    /// code: `storage_full` or `storage_error`. Such a failure is the infrastructure's, not the
    /// run's: it can go on from its last checkpoint once the storage is fixed.
    pub fn storage_fault(&self) -> Option<&'static str> {
        use std::io::ErrorKind;
        match self {
            Self::Io { source, .. } => match source.kind() {
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Some("storage_full"),
                ErrorKind::ReadOnlyFilesystem => Some("storage_error"),
                _ => None,
            },
            // strerror(ENOSPC) and strerror(EDQUOT), whichever layer wrote the message.
            Self::Storage { message, .. } if message.contains("No space left on device") || message.contains("quota exceeded") => {
                Some("storage_full")
            }
            Self::Storage { .. } => Some("storage_error"),
            _ => None,
        }
    }
}

impl From<lathe_encode::EncodeError> for TrainerError {
    fn from(error: lathe_encode::EncodeError) -> Self {
        use lathe_encode::EncodeError as E;
        match error {
            E::File { path, message } => TrainerError::File { path, message },
            E::Io { path, source } => TrainerError::Io { path, source },
            E::InvalidSetting { field, message } => TrainerError::InvalidSetting { field, message },
            E::ChatTemplate(message) => TrainerError::ChatTemplate(message),
            E::Tokenizer(message) => TrainerError::Tokenizer(message),
            // Callers that know the file map lines themselves (see `train::data`).
            E::Line { line, message } => TrainerError::InvalidSetting { field: format!("line {line}"), message },
        }
    }
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
