//! Projects: the unit of tenancy. Every job and file belongs to one, and its id is shown as the
//! job object's `organization_id`.

use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::{random, StoreError};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Project {
    /// `org-` and 24 alphanumerics.
    pub id: String,
    pub name: String,
    pub created_at: OffsetDateTime,
}

/// A new project; a name already taken is a `Conflict`.
pub async fn create_project(pool: &PgPool, name: &str) -> Result<Project, StoreError> {
    let id = random::alphanumeric("org-", 24);
    let inserted = sqlx::query_as::<_, Project>(
        "INSERT INTO projects (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO NOTHING
         RETURNING id, name, created_at",
    )
    .bind(&id)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    inserted.ok_or_else(|| StoreError::Conflict(format!("a project named {name:?} already exists")))
}

pub async fn get_project_by_name(pool: &PgPool, name: &str) -> Result<Project, StoreError> {
    sqlx::query_as::<_, Project>("SELECT id, name, created_at FROM projects WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)
}

/// The project named `name`, created if it does not exist yet (admin commands, `lathe up`).
pub async fn ensure_project(pool: &PgPool, name: &str) -> Result<Project, StoreError> {
    match create_project(pool, name).await {
        Ok(project) => Ok(project),
        Err(StoreError::Conflict(_)) => get_project_by_name(pool, name).await,
        Err(other) => Err(other),
    }
}
