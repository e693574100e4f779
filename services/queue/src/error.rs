use ::redis::{ErrorKind, RedisError, ServerErrorKind};

/// Everything that can go wrong in the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("pool name {0:?} must be 1 to 64 lowercase letters, digits, '-' or '_'")]
    InvalidPool(String),
    #[error("a worker must wait on at least one pool")]
    NoPools,
    #[error("priority {0} is outside {min}..={max}", min = crate::MIN_PRIORITY, max = crate::MAX_PRIORITY)]
    PriorityOutOfRange(i32),
    #[error("redis url is invalid")]
    InvalidUrl(#[source] RedisError),
    /// Redis cannot be reached (refused, dropped, timed out, loading, failing over). Callers
    /// carry on by polling Postgres; the reconciler re-publishes once Redis is back.
    #[error("redis is unavailable")]
    Unavailable(#[source] RedisError),
    /// Redis answered with an error that a retry will not fix (wrong type at our key, a script
    /// error): a bug or someone else's data under our prefix.
    #[error("redis refused a queue command")]
    Command(#[source] RedisError),
    /// A member of a pool's sorted set is not a job id. It has been popped and is gone.
    #[error("pool {pool} held {member:?}, which is not a job id")]
    MalformedEntry { pool: String, member: String },
}

impl QueueError {
    /// True when the caller should fall back to polling Postgres and try Redis again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

impl From<RedisError> for QueueError {
    fn from(error: RedisError) -> Self {
        if is_connection_problem(&error) {
            QueueError::Unavailable(error)
        } else {
            QueueError::Command(error)
        }
    }
}

fn is_connection_problem(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}
