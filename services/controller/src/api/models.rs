//! `/v1/models`: the base models under the models root and the project's fine-tuned models;
//! a fine-tuned model can be deleted, a base model cannot.

use axum::extract::{Path, State};
use axum::Json;
use lathe_store::jobs::list_fine_tuned_models;
use serde_json::{json, Value};

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use crate::{base_models, AppState};

async fn all_models(state: &AppState, project: &Project) -> ApiResult<Vec<Value>> {
    let root = state.config.models_root.clone();
    let base = tokio::task::spawn_blocking(move || base_models::list(&root)).await.map_err(ApiError::internal)?;
    let mut data: Vec<Value> =
        base.into_iter().map(|(id, created)| json!({"id": id, "object": "model", "created": created, "owned_by": "system"})).collect();
    for (name, base, finished) in list_fine_tuned_models(&state.pool, &project.id).await? {
        data.push(json!({
            "id": name, "object": "model", "created": finished.unix_timestamp(),
            "owned_by": project.id, "parent": base,
        }));
    }
    Ok(data)
}

pub async fn list(State(state): State<AppState>, project: Project) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"object": "list", "data": all_models(&state, &project).await?})))
}

pub async fn retrieve(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    all_models(&state, &project)
        .await?
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::not_found("model", &id))
}

/// `DELETE /v1/models/{model}`: a fine-tuned model of the project is deleted (no longer listed,
/// served or evaluated; its job and result files stay), as OpenAI's `models.delete`. A base
/// model is the operator's, not the project's: 403.
pub async fn delete(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if lathe_store::jobs::delete_fine_tuned_model(&state.pool, &project.id, &id).await? {
        tracing::info!(model = id, project = project.id, "fine-tuned model deleted");
        return Ok(Json(json!({"id": id, "object": "model", "deleted": true})));
    }
    let root = state.config.models_root.clone();
    let name = id.clone();
    let is_base = tokio::task::spawn_blocking(move || base_models::list(&root).into_iter().any(|(base, _)| base == name))
        .await
        .map_err(ApiError::internal)?;
    if is_base {
        return Err(ApiError {
            status: axum::http::StatusCode::FORBIDDEN,
            kind: "invalid_request_error",
            message: format!("model: {id:?} is a base model of this server; only fine-tuned models can be deleted"),
            param: Some("model".into()),
            code: Some("model_not_deletable".into()),
        });
    }
    Err(ApiError::not_found("model", &id))
}
