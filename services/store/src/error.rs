//! The one error type of the store. Each error has one [`ErrorCode`] ([`StoreError::code`]),
//! which the REST API and the gRPC service translate to their statuses (lathe_core::error_code).

use lathe_core::{ErrorCode, IllegalTransition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such row in the caller's project; another project's id is reported the same way.
    #[error("not found")]
    NotFound,
    /// A uniqueness rule refused the write; names what collided.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A worker wrote with an attempt number that no longer holds the job (the job was
    /// reclaimed, finished or cancelled); `current` is the job's attempt now.
    #[error("attempt {attempt} of job {job} is stale (current attempt {current})")]
    StaleAttempt { job: String, attempt: i32, current: i32 },
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// The object's state forbids the operation (cancelling a finished evaluation).
    #[error("{0}")]
    InvalidState(String),
    /// Postgres cannot be reached (down, restarting, pool exhausted): retry later, 503.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// The store cannot work with what it was given at start (a database URL it cannot use).
    #[error("misconfigured: {0}")]
    Misconfigured(String),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound => ErrorCode::NotFound,
            StoreError::Conflict(_) => ErrorCode::Conflict,
            StoreError::StaleAttempt { .. } => ErrorCode::StaleAttempt,
            StoreError::IllegalTransition(_) | StoreError::InvalidState(_) => ErrorCode::InvalidState,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Database(_) | StoreError::Misconfigured(_) => ErrorCode::Internal,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                StoreError::Unavailable(error)
            }
            sqlx::Error::Database(ref db) if is_unavailable_code(db.code().as_deref()) => StoreError::Unavailable(error),
            other => StoreError::Database(other),
        }
    }
}

/// SQLSTATE classes 08 (connection exception) and 57P (operator intervention: shutdown,
/// crash recovery, cannot connect now).
fn is_unavailable_code(code: Option<&str>) -> bool {
    code.is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
}

/// Decoding a stored value (a status string, a spec) failed: the database holds something this
/// version does not understand.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(what.to_string().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_and_other_errors_are_not() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(StoreError::from(sqlx::Error::Io(refused)), StoreError::Unavailable(_)));
        assert!(matches!(StoreError::from(sqlx::Error::PoolTimedOut), StoreError::Unavailable(_)));
        assert!(matches!(StoreError::from(sqlx::Error::RowNotFound), StoreError::NotFound));
        assert!(matches!(StoreError::from(sqlx::Error::ColumnNotFound("x".into())), StoreError::Database(_)));
        assert!(is_unavailable_code(Some("57P01")) && is_unavailable_code(Some("08006")));
        assert!(!is_unavailable_code(Some("23505")) && !is_unavailable_code(None));
    }

    #[test]
    fn stale_attempt_names_the_job_and_both_attempts() {
        let error = StoreError::StaleAttempt { job: "ftjob-x".into(), attempt: 1, current: 2 };
        assert_eq!(error.to_string(), "attempt 1 of job ftjob-x is stale (current attempt 2)");
    }
}
