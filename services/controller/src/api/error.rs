//! The OpenAI error envelope, `{"error": {"message", "type", "param", "code"}}`, and the one
//! place where store, spec and file errors become HTTP statuses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lathe_core::{ErrorCode, FileError, SpecError};
use lathe_store::StoreError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(param: Option<&str>, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.filter(|p| !p.is_empty()).map(str::to_string),
            code: Some(code.to_string()),
        }
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("No such {what}: {id}"),
            param: Some("id".into()),
            code: Some("not_found".into()),
        }
    }

    pub fn unauthorized(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!("The request body is larger than the limit of {limit} bytes."),
            param: None,
            code: Some("request_too_large".into()),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %message, "request failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: "The server had an error processing the request.".into(),
            param: None,
            code: None,
        }
    }

    /// Writing to the data directory failed: 507 with `storage_full` when it is full (the
    /// client may retry once an operator frees space), else an opaque 500. The path stays in
    /// the log.
    pub fn storage(error: &std::io::Error, context: impl std::fmt::Display) -> ApiError {
        let full = error.kind() == std::io::ErrorKind::StorageFull || error.kind() == std::io::ErrorKind::QuotaExceeded;
        if !full {
            return ApiError::internal(format!("{context}: {error}"));
        }
        tracing::error!(%error, %context, "the data directory is full");
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            kind: "server_error",
            message: "The server's storage is full; the upload was not kept. Retry later.".into(),
            param: None,
            code: Some("storage_full".into()),
        }
    }

    /// A store error about `what` with id `id`.
    pub fn from_store(error: StoreError, what: &str, id: &str) -> ApiError {
        match error {
            StoreError::NotFound => ApiError::not_found(what, id),
            StoreError::IllegalTransition(t) => ApiError::invalid(
                None,
                "invalid_job_state",
                format!("The {what} {id} is {}; it cannot become {}.", t.from.as_str(), t.to.as_str()),
            ),
            other => other.into(),
        }
    }
}

/// The status comes from the error's [`ErrorCode`], the one map shared with the gRPC service
/// (`crate::grpc::status`); only the message is chosen here.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        let code = error.code();
        let status = http_status(code);
        match error {
            StoreError::Unavailable(inner) => {
                tracing::warn!(error = %inner, "database unavailable");
                ApiError {
                    status,
                    kind: "server_error",
                    message: "The database is unavailable; retry shortly.".into(),
                    param: None,
                    code: Some(code.as_str().into()),
                }
            }
            StoreError::NotFound => ApiError::not_found("object", "requested"),
            StoreError::Conflict(what) => ApiError {
                status,
                kind: "invalid_request_error",
                message: format!("Conflict: {what}; retry the request."),
                param: None,
                code: Some(code.as_str().into()),
            },
            StoreError::IllegalTransition(t) => {
                ApiError { status, kind: "invalid_request_error", message: t.to_string(), param: None, code: Some(code.as_str().into()) }
            }
            StoreError::InvalidState(message) => {
                ApiError { status, kind: "invalid_request_error", message, param: None, code: Some(code.as_str().into()) }
            }
            StoreError::StaleAttempt { .. } => ApiError {
                status,
                kind: "invalid_request_error",
                message: error.to_string(),
                param: None,
                code: Some(code.as_str().into()),
            },
            other @ (StoreError::Database(_) | StoreError::Misconfigured(_)) => ApiError::internal(other),
        }
    }
}

/// The HTTP status of an [`ErrorCode`].
pub fn http_status(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).expect("error codes map to valid HTTP statuses")
}

impl From<SpecError> for ApiError {
    fn from(error: SpecError) -> ApiError {
        ApiError::invalid(Some(&error.param), error.code.as_str(), error.message)
    }
}

impl ApiError {
    pub fn bad_file(param: &str, error: &FileError) -> ApiError {
        ApiError::invalid(Some(param), "invalid_training_file", format!("Invalid training file: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
            "request_id": super::request_id::current(),
        }});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
