//! API keys: bearer tokens that belong to a project. Only the SHA-256 of a token is stored;
//! the plaintext is returned once, at creation. Keys are revoked, never deleted.

use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::{random, StoreError};

/// Prefix of every API key token, so that a leaked one is recognisable by secret scanners.
pub const API_KEY_PREFIX: &str = "lathe-sk-";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ApiKey {
    /// `key_…`: the public handle used to list and revoke; not a secret.
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// A key and its plaintext token, which is not stored and cannot be shown again.
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub key: ApiKey,
    pub token: String,
}

pub async fn create_api_key(pool: &PgPool, project_id: &str, name: &str) -> Result<CreatedApiKey, StoreError> {
    let token = random::token(API_KEY_PREFIX);
    let key = sqlx::query_as::<_, ApiKey>(
        "INSERT INTO api_keys (id, project_id, name, key_hash)
         SELECT $1, id, $3, $4 FROM projects WHERE id = $2
         RETURNING id, project_id, name, created_at, revoked_at",
    )
    .bind(random::alphanumeric("key_", 16))
    .bind(project_id)
    .bind(name)
    .bind(random::sha256(&token))
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)?;
    Ok(CreatedApiKey { key, token })
}

/// The project a bearer token belongs to, or `None` for an unknown or revoked token (401).
pub async fn authenticate_api_key(pool: &PgPool, token: &str) -> Result<Option<String>, StoreError> {
    let project_id = sqlx::query_scalar::<_, String>("SELECT project_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
        .bind(random::sha256(token))
        .fetch_optional(pool)
        .await?;
    Ok(project_id)
}

/// Revokes one of the project's keys; revoking twice is harmless, a foreign key is NotFound.
pub async fn revoke_api_key(pool: &PgPool, project_id: &str, key_id: &str) -> Result<ApiKey, StoreError> {
    sqlx::query_as::<_, ApiKey>(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND project_id = $2
         RETURNING id, project_id, name, created_at, revoked_at",
    )
    .bind(key_id)
    .bind(project_id)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)
}

pub async fn list_api_keys(pool: &PgPool, project_id: &str) -> Result<Vec<ApiKey>, StoreError> {
    let keys = sqlx::query_as::<_, ApiKey>(
        "SELECT id, project_id, name, created_at, revoked_at FROM api_keys
         WHERE project_id = $1 ORDER BY created_at, id",
    )
    .bind(project_id)
    .fetch_all(pool)
    .await?;
    Ok(keys)
}
