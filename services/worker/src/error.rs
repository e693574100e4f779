//! Errors that stop the daemon. Errors of one attempt are reported to the controller as a
//! `Fail` (see `attempt`), not returned.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid controller address {url:?}: {message}")]
    ControllerUrl { url: String, message: String },
    #[error(
        "the controller refused this worker: {0} (check LATHE_WORKER_TOKEN: a fleet secret or a token from 'lathe admin create-worker')"
    )]
    Unauthenticated(String),
    #[error("the controller refused this worker's registration: {0}")]
    Refused(String),
    #[error("invalid setting {field}: {message}")]
    Setting { field: &'static str, message: String },
    #[error("cannot serve metrics on {0}: {1}")]
    MetricsListen(String, std::io::Error),
    #[error("cannot listen for signals: {0}")]
    Signal(std::io::Error),
}
