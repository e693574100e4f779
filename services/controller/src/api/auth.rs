//! `Authorization: Bearer <key>` → the caller's project. Every handler that touches user data
//! takes a [`Project`], and every store query it makes is scoped by `project.id`.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::AppState;

/// The authenticated caller's project.
pub struct Project {
    pub id: String,
}

impl FromRequestParts<AppState> for Project {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let token = header.strip_prefix("Bearer ").map(str::trim).unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'; create one with 'lathe admin create-key'.",
            ));
        }
        match lathe_store::keys::authenticate_api_key(&state.pool, token).await? {
            Some(id) => Ok(Project { id }),
            None => Err(ApiError::unauthorized("Incorrect or revoked API key provided.")),
        }
    }
}
