//! Every store and domain error has one code, and REST and gRPC both answer with that code's
//! status (lathe_core::error_code): the table below is the contract.

use lathe_core::error_code::grpc;
use lathe_core::{ErrorCode, IllegalTransition, JobStatus, SpecError};
use lathe_store::StoreError;

use crate::api::error::ApiError;

/// One error of each variant. The match has no wildcard: a new variant does not compile here
/// until it has a row in the table.
fn one_of_each() -> Vec<StoreError> {
    let all = vec![
        StoreError::NotFound,
        StoreError::Conflict("an idempotency key was taken".into()),
        StoreError::StaleAttempt { job: "ftjob-x".into(), attempt: 1, current: 2 },
        StoreError::IllegalTransition(IllegalTransition { from: JobStatus::Succeeded, to: JobStatus::Cancelled }),
        StoreError::InvalidState("evaluation evaluation-x already succeeded".into()),
        StoreError::Unavailable(sqlx::Error::PoolTimedOut),
        StoreError::Database(sqlx::Error::ColumnNotFound("spec".into())),
        StoreError::Misconfigured("database \"x-y\" does not exist".into()),
    ];
    for error in &all {
        match error {
            StoreError::NotFound
            | StoreError::Conflict(_)
            | StoreError::StaleAttempt { .. }
            | StoreError::IllegalTransition(_)
            | StoreError::InvalidState(_)
            | StoreError::Unavailable(_)
            | StoreError::Database(_)
            | StoreError::Misconfigured(_) => {}
        }
    }
    all
}

#[test]
fn every_store_error_maps_to_the_same_code_over_rest_and_grpc() {
    // (code, HTTP status, gRPC code), in the order of `one_of_each`.
    let table = [
        (ErrorCode::NotFound, 404, grpc::NOT_FOUND),
        (ErrorCode::Conflict, 409, grpc::ABORTED),
        (ErrorCode::StaleAttempt, 409, grpc::FAILED_PRECONDITION),
        (ErrorCode::InvalidState, 400, grpc::FAILED_PRECONDITION),
        (ErrorCode::InvalidState, 400, grpc::FAILED_PRECONDITION),
        (ErrorCode::Unavailable, 503, grpc::UNAVAILABLE),
        (ErrorCode::Internal, 500, grpc::INTERNAL),
        (ErrorCode::Internal, 500, grpc::INTERNAL),
    ];
    // Store errors are not Clone (sqlx::Error): one list for each face.
    let (errors, for_grpc) = (one_of_each(), one_of_each());
    assert_eq!(errors.len(), table.len());
    for ((error, same), (code, http, grpc_code)) in errors.into_iter().zip(for_grpc).zip(table) {
        let what = format!("{error:?}");
        assert_eq!(error.code(), code, "{what}");
        assert_eq!((code.http_status(), code.grpc_code()), (http, grpc_code), "{what}");
        assert_eq!(crate::grpc::status(same).code() as i32, grpc_code, "{what} over gRPC");
        assert_eq!(ApiError::from(error).status.as_u16(), http, "{what} over REST");
    }
}

#[test]
fn domain_errors_are_bad_requests_naming_the_field() {
    let error = ApiError::from(SpecError::invalid("learning_rate", "must be positive"));
    assert_eq!(error.status.as_u16(), ErrorCode::BadRequest.http_status());
    assert_eq!(error.param.as_deref(), Some("learning_rate"));
}
