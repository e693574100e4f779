//! One code per kind of failure, mapped once to an HTTP status (REST) and a gRPC code (the
//! worker protocol), so that the two faces of the controller never disagree about an error.
//! Each crate's error type says which code each of its errors has (`StoreError::code`); the
//! REST layer and the gRPC layer only translate the code.
//!
//! gRPC codes are the numbers of the gRPC specification (`tonic::Code` has the same values),
//! kept as numbers here so that this crate stays free of network dependencies.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is wrong and repeating it will not help (a bad field, a bad file).
    BadRequest,
    /// No such object in the caller's project (another project's id is reported the same way).
    NotFound,
    /// A concurrent write won (a uniqueness rule refused this one); retrying is safe.
    Conflict,
    /// The object's state forbids the operation (cancel a finished job, resume a running one).
    InvalidState,
    /// A worker wrote under an attempt that no longer holds the job: stop, do not retry.
    StaleAttempt,
    /// A dependency (Postgres) is down or overloaded: retry later.
    Unavailable,
    /// A bug or a broken deployment; the cause is logged, not shown.
    Internal,
}

/// gRPC status codes (grpc/doc/statuscodes.md).
pub mod grpc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::InvalidState,
        ErrorCode::StaleAttempt,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidState => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::StaleAttempt => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorCode::BadRequest => grpc::INVALID_ARGUMENT,
            ErrorCode::NotFound => grpc::NOT_FOUND,
            ErrorCode::Conflict => grpc::ABORTED,
            ErrorCode::InvalidState | ErrorCode::StaleAttempt => grpc::FAILED_PRECONDITION,
            ErrorCode::Unavailable => grpc::UNAVAILABLE,
            ErrorCode::Internal => grpc::INTERNAL,
        }
    }

    /// The OpenAI envelope's `code` for this kind of error (handlers may give a finer one).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "invalid_value",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidState => "invalid_job_state",
            ErrorCode::StaleAttempt => "stale_attempt",
            ErrorCode::Unavailable => "service_unavailable",
            ErrorCode::Internal => "internal_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_http_status_and_one_grpc_code_that_agree_on_retrying() {
        for code in ErrorCode::ALL {
            let (http, grpc) = (code.http_status(), code.grpc_code());
            // Retry-later on one face is retry-later on the other.
            assert_eq!(http == 503, grpc == grpc::UNAVAILABLE, "{code:?}");
            // Client errors are never INTERNAL, server errors never a client status.
            assert_eq!(http >= 500, matches!(grpc, grpc::INTERNAL | grpc::UNAVAILABLE), "{code:?}");
        }
    }
}
