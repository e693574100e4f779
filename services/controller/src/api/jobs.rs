//! `/v1/fine_tuning/jobs`: create (validated against the models root and the stored files,
//! idempotent on `Idempotency-Key`), list, retrieve, cancel, pause, resume.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use lathe_core::{validate_training_file, CreateJobRequest, FileSummary, JobSpec};
use lathe_store::dispatch::EventLevel;
use lathe_store::files::{self, StoredFile, PURPOSE_FINE_TUNE};
use lathe_store::jobs;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::files::page_limit;
use super::views;
use crate::{base_models, AppState};

const IDEMPOTENCY_KEY_MAX: usize = 255;

pub async fn create(State(state): State<AppState>, project: Project, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_MAX => Some(key.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    Some("Idempotency-Key"),
                    "invalid_value",
                    format!("Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
                ))
            }
        },
    };
    // A retry of an accepted create returns its job, even if its file was deleted since.
    if let Some(key) = &idempotency_key {
        if let Some(job) = jobs::find_by_idempotency_key(&state.pool, &project.id, key).await? {
            return Ok(Json(views::job(&job)));
        }
    }
    let spec = JobSpec::try_from(CreateJobRequest::from_json(&body)?)?;
    if base_models::resolve(&state.config.models_root, &spec.model).is_none() {
        return Err(ApiError::invalid(
            Some("model"),
            "model_not_found",
            format!("model: {:?} is not a base model of this server (GET /v1/models lists them)", spec.model),
        ));
    }
    let training = checked_file(&state, &project, &spec.training_file, "training_file", true).await?;
    let validation = match &spec.validation_file {
        Some(id) => Some(checked_file(&state, &project, id, "validation_file", false).await?),
        None => None,
    };
    spec.check_files(&training, validation.as_ref())?;
    // The evaluations run when the job succeeds, maybe hours from now: their data must load today.
    for (i, evaluation) in spec.evaluations.iter().enumerate() {
        super::evaluations::check_data(&state, &project, evaluation, &format!("evaluations[{i}].")).await?;
    }

    let (job, created) = jobs::create_job(&state.pool, &project.id, &spec, idempotency_key.as_deref()).await.map_err(|e| match e {
        // The files were there a moment ago: deleted in between.
        lathe_store::StoreError::NotFound => {
            ApiError::invalid(Some("training_file"), "file_not_found", "training_file: the file was deleted")
        }
        other => other.into(),
    })?;
    if created {
        tracing::info!(job_id = %job.id, project = %project.id, model = %spec.model, "job created");
        state.note_event(job.id.as_str(), EventLevel::Info, &format!("Created fine-tuning job: {}", job.id), None).await;
        state.publish_job(&job).await;
    }
    Ok(Json(views::job(&job)))
}

/// Looks up a file of the caller's project for a job and validates its bytes again (they are
/// read back from storage, so a file damaged on disk is caught here, not on a GPU).
async fn checked_file(state: &AppState, project: &Project, id: &lathe_core::FileId, param: &str, training: bool) -> ApiResult<FileSummary> {
    let not_found = || ApiError::invalid(Some(param), "file_not_found", format!("{param}: no such file: {id}"));
    let file: StoredFile = match files::get_file(&state.pool, &project.id, id).await {
        Ok(file) => file,
        Err(lathe_store::StoreError::NotFound) => return Err(not_found()),
        Err(other) => return Err(other.into()),
    };
    if file.purpose != PURPOSE_FINE_TUNE {
        return Err(ApiError::invalid(
            Some(param),
            "invalid_value",
            format!("{param}: {id} has purpose {:?}, not 'fine-tune'", file.purpose),
        ));
    }
    let path = state.storage.file_path(file.id.as_str());
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let summary = if training { validate_training_file(&bytes) } else { lathe_core::training_file::validate_jsonl(&bytes) };
    summary.map_err(|e| ApiError::bad_file(param, &e))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
}

pub async fn list(State(state): State<AppState>, project: Project, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit)?;
    let after = super::cursor(q.after.as_deref(), lathe_core::JobId::parse)?;
    let page = jobs::list_jobs(&state.pool, &project.id, after.as_deref(), limit).await?;
    Ok(Json(views::list(page, |j| j.id.as_str().to_string(), views::job)))
}

pub async fn retrieve(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let job = jobs::get_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    Ok(Json(views::job(&job)))
}

pub async fn cancel(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let job = jobs::cancel_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let _ = state.queue.remove(&job.spec.resources.pool, &job.id).await;
    state.telemetry.forget_job(job.id.as_str());
    state.note_event(job.id.as_str(), EventLevel::Info, "Job cancelled by the user", None).await;
    tracing::info!(job_id = %job.id, "job cancelled");
    Ok(Json(views::job(&job)))
}

pub async fn pause(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let job = jobs::pause_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let _ = state.queue.remove(&job.spec.resources.pool, &job.id).await;
    let message = if job.pause_requested { "Pause requested; the worker checkpoints and stops" } else { "Job paused" };
    state.note_event(job.id.as_str(), EventLevel::Info, message, None).await;
    Ok(Json(views::job(&job)))
}

pub async fn resume(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let job = jobs::resume_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    state.note_event(job.id.as_str(), EventLevel::Info, "Job resumed", Some(&json!({"status": job.status.as_str()}))).await;
    if job.status == lathe_core::JobStatus::Queued {
        state.publish_job(&job).await;
    }
    Ok(Json(views::job(&job)))
}
