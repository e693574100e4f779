//! The one error type of the fleet crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("the controller at {url}: {message}")]
    Controller { url: String, message: String },
    #[error("`{command}` failed: {message}")]
    Slurm { command: String, message: String },
}
