//! Errors that stop the controller from starting or serving. Errors of single requests are
//! `api::ApiError` (HTTP) and `tonic::Status` (gRPC).

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot reach Postgres: {0}")]
    Store(#[from] lathe_store::StoreError),
    #[error("cannot reach Redis: {0}")]
    Queue(#[from] lathe_queue::QueueError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    /// A flag or variable with an impossible value.
    #[error("{0}")]
    Config(String),
}
