//! `/v1/evaluations` (Lathe's native routes, docs/architecture.md §1): create an evaluation of a base
//! or fine-tuned model on a benchmark, list them (per model, per job), read one with its score,
//! page through its per-item predictions, cancel it. Workers run them (see `grpc`).
//!
//! A create is checked here as far as it can be without a model: the model exists, the
//! benchmark's data loads (the CTIBench directory is configured and present, every row is
//! well formed) or the user's file parses as scorable examples, and the subset and shots fit
//! the benchmark. What fails here never reaches a worker.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::Json;
use lathe_core::{EvaluationRequest, EvaluationSpec};
use lathe_store::evaluations::{self, EvaluationFilter, NewEvaluation};
use lathe_store::jobs::{self, Job};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::files::page_limit;
use super::views;
use crate::{base_models, AppState};

pub async fn create(State(state): State<AppState>, project: Project, body: Bytes) -> ApiResult<Json<Value>> {
    let request = EvaluationRequest::from_json(&body)?;
    let spec = EvaluationSpec::resolve(&request, "")?;
    let model = request.model.as_deref().unwrap_or_default();
    let job = resolve_model(&state, &project, model).await?;
    check_data(&state, &project, &spec, "").await?;
    let new = NewEvaluation { project_id: &project.id, model, job_id: job.as_ref().map(|j| j.id.as_str()), spec: &spec };
    let evaluation = evaluations::create_evaluation(&state.pool, new).await.map_err(|e| match e {
        lathe_store::StoreError::NotFound => ApiError::invalid(Some("file"), "file_not_found", "file: the file was deleted"),
        other => other.into(),
    })?;
    tracing::info!(evaluation_id = %evaluation.id, model, benchmark = %spec.benchmark, "evaluation created");
    Ok(Json(views::evaluation(&evaluation)))
}

/// `None` for a base model under the models root; the job that made it for an `ft:` model of
/// the caller's project (it must have produced a LoRA adapter).
async fn resolve_model(state: &AppState, project: &Project, model: &str) -> ApiResult<Option<Job>> {
    if model.is_empty() {
        return Err(ApiError::invalid(
            Some("model"),
            "invalid_value",
            "model: required; a base model (GET /v1/models) or a fine-tuned ft:… model",
        ));
    }
    lathe_core::spec::storable_text("model", model)?;
    if model.starts_with("ft:") {
        let fine_tuned = lathe_core::split_checkpoint_model_name(model).0;
        let job = jobs::find_by_fine_tuned_model(&state.pool, &project.id, fine_tuned).await?.ok_or_else(|| {
            ApiError::invalid(Some("model"), "model_not_found", format!("model: {model:?} is not a fine-tuned model of this project"))
        })?;
        if job.spec.lora.is_none() {
            return Err(ApiError::invalid(
                Some("model"),
                "invalid_value",
                format!("model: {model} is a full fine-tune; evaluations through the service take LoRA models (use `lathe eval run` on its files)"),
            ));
        }
        if crate::adapters::model_adapter(state, &project.id, &job, model).await?.is_none() {
            return Err(ApiError::invalid(
                Some("model"),
                "model_not_found",
                format!("model: the adapter files of {model} are gone (deleted, or a checkpoint the job no longer keeps)"),
            ));
        }
        return Ok(Some(job));
    }
    if base_models::resolve_str(&state.config.models_root, model).is_none() {
        return Err(ApiError::invalid(
            Some("model"),
            "model_not_found",
            format!("model: {model:?} is not a base model of this server (GET /v1/models lists them)"),
        ));
    }
    Ok(None)
}

/// Loads the evaluation's items as a worker will, so that a missing data directory, a
/// malformed row or a file with nothing to score is the caller's 400 now. `prefix` is where
/// the evaluation sits in the body (`evaluations[0].` in a job create).
pub async fn check_data(state: &AppState, project: &Project, spec: &EvaluationSpec, prefix: &str) -> ApiResult<()> {
    let param = |field: &str| format!("{prefix}{field}");
    let items = match &spec.file {
        Some(file) => {
            let stored = lathe_store::files::get_file(&state.pool, &project.id, file).await.map_err(|e| match e {
                lathe_store::StoreError::NotFound => {
                    ApiError::invalid(Some(&param("file")), "file_not_found", format!("{}: no such file: {file}", param("file")))
                }
                other => other.into(),
            })?;
            let path = state.storage.file_path(stored.id.as_str());
            tokio::task::spawn_blocking(move || lathe_eval::chat_file::load(&path)).await.map_err(ApiError::internal)?.map_err(|error| {
                ApiError::invalid(
                    Some(&param("file")),
                    "invalid_file",
                    format!("{}: {}", param("file"), strip_data_root(&error.to_string(), state)),
                )
            })?
        }
        None => load_benchmark(state, spec.benchmark, &param("benchmark")).await?,
    };
    let rule = spec.extraction;
    if rule != lathe_core::Rule::ExactMatch {
        if let Some(item) = items.iter().find(|item| lathe_eval::extract::Extract::extract(rule, &item.answer).is_none()) {
            return Err(ApiError::invalid(
                Some(&param("extraction")),
                "invalid_value",
                format!(
                    "{}: {} finds no answer in the expected answer of example {} ({:?}); every item would score wrong",
                    param("extraction"),
                    spec.extraction,
                    item.index + 1,
                    item.answer.chars().take(80).collect::<String>()
                ),
            ));
        }
    }
    let evaluated = spec.limit.map_or(items.len(), |l| (l as usize).min(items.len()));
    if spec.shots as usize > items.len() - evaluated {
        return Err(ApiError::invalid(
            Some(&param("shots")),
            "invalid_value",
            format!(
                "{}: {} shots, but only {} items are left outside the {evaluated} evaluated",
                param("shots"),
                spec.shots,
                items.len() - evaluated
            ),
        ));
    }
    Ok(())
}

/// A CTIBench benchmark's items from this server's data directory, loaded as a worker will:
/// no directory, or a malformed row, is the caller's 400 naming `param`.
pub async fn load_benchmark(state: &AppState, benchmark: lathe_core::Benchmark, param: &str) -> ApiResult<Vec<lathe_eval::Item>> {
    let dir = match &state.config.eval_data_dir {
        None => {
            return Err(ApiError::invalid(
                Some(param),
                "evaluation_data_unavailable",
                format!(
                    "{param}: {benchmark} needs the CTIBench data directory, and this server has none (start the controller with \
                     --eval-data-dir or LATHE_EVAL_DATA_DIR); the \"file\" benchmark works without it"
                ),
            ))
        }
        Some(dir) if !dir.is_dir() => {
            return Err(ApiError::invalid(
                Some(param),
                "evaluation_data_unavailable",
                format!("{param}: the evaluation data directory {} does not exist on this server", dir.display()),
            ))
        }
        Some(dir) => dir.clone(),
    };
    tokio::task::spawn_blocking(move || lathe_eval::ctibench::load(benchmark, &dir))
        .await
        .map_err(ApiError::internal)?
        .map_err(|error| ApiError::invalid(Some(param), "invalid_benchmark_data", format!("{param}: {error}")))
}

/// Error messages name the user's file by id, not by its path in the server's storage.
fn strip_data_root(message: &str, state: &AppState) -> String {
    let files = state.storage.file_path("");
    message.replace(&files.display().to_string(), "")
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
    pub model: Option<String>,
    pub fine_tuning_job: Option<String>,
}

pub async fn list(State(state): State<AppState>, project: Project, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit)?;
    let after = super::cursor(q.after.as_deref(), lathe_core::EvaluationId::parse)?;
    // Filters reach SQL as text: Postgres refuses a NUL in them.
    for (param, value) in [("model", &q.model), ("fine_tuning_job", &q.fine_tuning_job)] {
        if let Some(value) = value {
            lathe_core::spec::storable_text(param, value)?;
        }
    }
    let filter = EvaluationFilter { model: q.model.as_deref(), job_id: q.fine_tuning_job.as_deref() };
    let page = evaluations::list_evaluations(&state.pool, &project.id, filter, after.as_deref(), limit).await?;
    Ok(Json(views::list(page, |e| e.id.as_str().to_string(), views::evaluation)))
}

/// `GET /v1/fine_tuning/jobs/{id}/evaluations`: the evaluations of the job's fine-tuned model.
pub async fn list_for_job(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    jobs::get_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let limit = page_limit(q.limit)?;
    let after = super::cursor(q.after.as_deref(), lathe_core::EvaluationId::parse)?;
    let filter = EvaluationFilter { model: None, job_id: Some(&id) };
    let page = evaluations::list_evaluations(&state.pool, &project.id, filter, after.as_deref(), limit).await?;
    Ok(Json(views::list(page, |e| e.id.as_str().to_string(), views::evaluation)))
}

pub async fn retrieve(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let evaluation_id = super::evaluation_id(&id)?;
    let evaluation = evaluations::get_evaluation(&state.pool, &project.id, &evaluation_id)
        .await
        .map_err(|e| ApiError::from_store(e, "evaluation", &id))?;
    Ok(Json(views::evaluation(&evaluation)))
}

#[derive(Debug, Deserialize)]
pub struct ItemsQuery {
    /// The `index` of the last item of the previous page.
    pub after: Option<i32>,
    pub limit: Option<i64>,
}

pub async fn items(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
) -> ApiResult<Json<Value>> {
    let evaluation_id = super::evaluation_id(&id)?;
    let limit = page_limit(q.limit)?;
    let page = evaluations::list_items(&state.pool, &project.id, &evaluation_id, q.after, limit)
        .await
        .map_err(|e| ApiError::from_store(e, "evaluation", &id))?;
    Ok(Json(views::list(page, |i| i.index.to_string(), views::evaluation_item)))
}

pub async fn cancel(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let evaluation_id = super::evaluation_id(&id)?;
    let evaluation = evaluations::cancel_evaluation(&state.pool, &project.id, &evaluation_id).await.map_err(|e| match e {
        lathe_store::StoreError::InvalidState(message) => {
            ApiError::invalid(None, "invalid_evaluation_state", format!("{message}; it cannot be cancelled"))
        }
        other => ApiError::from_store(other, "evaluation", &id),
    })?;
    tracing::info!(evaluation_id = %evaluation.id, "evaluation cancelled");
    Ok(Json(views::evaluation(&evaluation)))
}
