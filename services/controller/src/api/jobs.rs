//! `/v1/fine_tuning/jobs`: create (validated against the models root, every example of the
//! stored files encoded for the model, idempotent on `Idempotency-Key` with the body's hash
//! stored beside it), list, retrieve, cancel, pause, resume.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use lathe_core::{CreateJobRequest, JobSpec};
use lathe_encode::{EncodeOptions, Tally};
use lathe_store::dispatch::EventLevel;
use lathe_store::files::{self, StoredFile, PURPOSE_FINE_TUNE};
use lathe_store::jobs::{self, Job};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::files::page_limit;
use super::views;
use crate::data_check::{self, CheckedFile, DataCheckError};
use crate::{base_models, AppState};

const IDEMPOTENCY_KEY_MAX: usize = 255;

pub async fn create(State(state): State<AppState>, project: Project, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    let idempotency_key = idempotency_key(&headers)?;
    let request_sha256 = request_sha256(&body);
    // A retry of an accepted create returns its job, even if its file was deleted since.
    if let Some(key) = &idempotency_key {
        if let Some(job) = jobs::find_by_idempotency_key(&state.pool, &project.id, key).await? {
            return replay(job, key, &request_sha256);
        }
    }
    let mut spec = JobSpec::try_from(CreateJobRequest::from_json(&body)?)?;
    let Some(model_dir) = base_models::resolve(&state.config.models_root, &spec.model) else {
        return Err(ApiError::invalid(
            Some("model"),
            "model_not_found",
            format!("model: \"{}\" is not a base model of this server (GET /v1/models lists them)", spec.model),
        ));
    };
    let training = checked_file(&state, &project, &spec, &model_dir, &spec.training_file, "training_file").await?;
    let validation = match &spec.validation_file {
        Some(id) => Some(checked_file(&state, &project, &spec, &model_dir, id, "validation_file").await?),
        None => None,
    };
    spec.check_files(&training.summary, validation.as_ref().map(|v| &v.summary))?;
    // The evaluations run when the job succeeds, maybe hours from now: their data must load today.
    for (i, evaluation) in spec.evaluations.iter().enumerate() {
        super::evaluations::check_data(&state, &project, evaluation, &format!("evaluations[{i}].")).await?;
    }
    // The worker filters the training data against these benchmarks before it trains.
    for benchmark in spec.decontaminate.iter().flat_map(|d| &d.benchmarks) {
        super::evaluations::load_benchmark(&state, *benchmark, "decontaminate.benchmarks").await?;
    }

    if let (Some(_), None) = (spec.integrations.first(), &state.config.mlflow_tracking_uri) {
        return Err(ApiError::invalid(
            Some("integrations"),
            "unsupported_value",
            "integrations[0]: this server has no MLflow tracking server configured (the operator sets lathe-controller --mlflow-tracking-uri)",
        ));
    }
    let tally = training.tally;
    spec.size_from_data(tally.kept());
    let training_data = json!({
        "examples": tally.examples, "truncated": tally.truncated, "dropped": tally.dropped, "max_seq_length": spec.max_seq_length,
    });
    let admission = jobs::Admission {
        idempotency_key: idempotency_key.as_deref(),
        request_sha256: Some(&request_sha256),
        training_data: Some(&training_data),
    };
    let (job, created) = jobs::admit_job(&state.pool, &project.id, &spec, &admission).await.map_err(|e| match e {
        // The files were there a moment ago: deleted in between.
        lathe_store::StoreError::NotFound => {
            ApiError::invalid(Some("training_file"), "file_not_found", "training_file: the file was deleted")
        }
        other => other.into(),
    })?;
    if !created {
        // Another request with the same key won the race.
        return replay(job, idempotency_key.as_deref().unwrap_or_default(), &request_sha256);
    }
    tracing::info!(job_id = %job.id, project = %project.id, model = %spec.model, "job created");
    if let Some(integration) = spec.integrations.first() {
        let run = &integration.mlflow;
        // The exporter also recovers a job whose row this missed (a crash right here).
        if let Err(error) =
            lathe_store::tracking::add_export(&state.pool, job.id.as_str(), &run.experiment, run.run_name.as_deref(), &run.tags).await
        {
            tracing::warn!(job_id = %job.id, %error, "could not note the MLflow export; the exporter will recover it");
        }
    }
    state.note_event(job.id.as_str(), EventLevel::Info, &format!("Created fine-tuning job: {}", job.id), None).await;
    let (level, message) = training_data_message(&tally, spec.max_seq_length);
    state.note_event(job.id.as_str(), level, &message, Some(&training_data)).await;
    warn_over_quota(&state, &project.id, &job.id, &spec).await;
    state.publish_job(&job).await;
    Ok(Json(views::job(&job)))
}

/// A job larger than its project's quota in its pool cannot start until an admin raises the
/// quota: it is accepted (quotas change) but says so at once, instead of waiting in silence.
async fn warn_over_quota(state: &AppState, project_id: &str, job_id: &lathe_core::JobId, spec: &lathe_core::JobSpec) {
    let share = match lathe_store::dispatch::fair_share::effective_share(&state.pool, project_id, &spec.resources.pool).await {
        Ok(share) => share,
        Err(error) => {
            tracing::warn!(%error, %job_id, "could not read the project's quota");
            return;
        }
    };
    if let Some(max_gpus) = share.max_gpus.filter(|max| *max < spec.resources.gpus) {
        let message = format!(
            "This job needs {} GPUs but the project may hold at most {max_gpus} in pool {:?}: it stays queued until an admin raises the quota (lathe admin set-project --max-gpus)",
            spec.resources.gpus, spec.resources.pool
        );
        let data = json!({"gpus": spec.resources.gpus, "pool": spec.resources.pool, "max_gpus": max_gpus});
        state.note_event(job_id.as_str(), EventLevel::Warn, &message, Some(&data)).await;
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_MAX => Ok(Some(key.to_string())),
            _ => Err(ApiError::invalid(
                Some("Idempotency-Key"),
                "invalid_value",
                format!("Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
            )),
        },
    }
}

/// The job a reused `Idempotency-Key` created, if this request is the same one; a different
/// body under the same key is a client bug that must not look like success.
fn replay(job: Job, key: &str, request_sha256: &str) -> ApiResult<Json<Value>> {
    match &job.request_sha256 {
        Some(stored) if stored != request_sha256 => Err(ApiError {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            message: format!(
                "Idempotency-Key {key:?} was already used for a different request (job {}); send the same body to retry it, or use a new key",
                job.id
            ),
            param: Some("Idempotency-Key".into()),
            code: Some("idempotency_key_conflict".into()),
        }),
        _ => Ok(Json(views::job(&job))),
    }
}

/// SHA-256 of the body as canonical JSON (keys sorted, no whitespace), so a retry that orders
/// its keys differently is still the same request; a body that is not JSON is hashed as bytes.
fn request_sha256(body: &[u8]) -> String {
    fn canonical(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    let bytes = match serde_json::from_slice::<Value>(body) {
        Ok(value) => canonical(&value).to_string().into_bytes(),
        Err(_) => body.to_vec(),
    };
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The job event that says what truncation will cost, so a dropped example is never silent.
fn training_data_message(tally: &Tally, max_seq_length: u32) -> (EventLevel, String) {
    if tally.truncated == 0 {
        return (EventLevel::Info, format!("Training data: {} examples, none longer than max_seq_length {max_seq_length}", tally.examples));
    }
    let message = format!(
        "Training data: {} examples; {} longer than max_seq_length {max_seq_length} are truncated, {} of them to nothing and will not be trained on",
        tally.examples, tally.truncated, tally.dropped
    );
    (EventLevel::Warn, message)
}

/// Looks up a file of the caller's project for a job, then validates and encodes its stored
/// bytes for the job's model ([`data_check`]): template refusals and truncation are found here,
/// not on a GPU.
async fn checked_file(
    state: &AppState,
    project: &Project,
    spec: &JobSpec,
    model_dir: &std::path::Path,
    id: &lathe_core::FileId,
    param: &str,
) -> ApiResult<CheckedFile> {
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
    let options = EncodeOptions { max_seq_length: spec.max_seq_length as usize, train_on_inputs: spec.train_on_inputs };
    let training = param == "training_file";
    let key = data_check::CheckKey::new(file.id.as_str(), spec.model.as_str(), model_dir, options, training);
    let checked = state.data_checks.check(key, model_dir.to_path_buf(), path, options).await;
    checked.map_err(|e| match e {
        DataCheckError::File(error) => ApiError::bad_file(param, &error),
        DataCheckError::Line { line, message } => ApiError::invalid(
            Some(param),
            "invalid_training_file",
            format!("Invalid training file: line {line}: {message} (checked against the chat template and tokenizer of {})", spec.model),
        ),
        nothing @ DataCheckError::NothingToTrain { .. } => {
            ApiError::invalid(Some(param), "invalid_training_file", format!("Invalid training file: {nothing}"))
        }
        DataCheckError::Server(message) => ApiError::internal(message),
        DataCheckError::Abandoned => ApiError::internal("a data check was abandoned"),
    })
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
}

/// `GET /v1/fine_tuning/jobs[?after=&limit=&metadata[KEY]=VALUE…]`: the project's jobs, newest
/// first; `metadata[…]` pairs (as the `openai` SDK sends `jobs.list(metadata={…})`) keep only
/// the jobs whose metadata has every one of them.
pub async fn list(
    State(state): State<AppState>,
    project: Project,
    Query(q): Query<ListQuery>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit)?;
    let after = super::cursor(q.after.as_deref(), lathe_core::JobId::parse)?;
    let mut metadata = std::collections::BTreeMap::new();
    for (name, value) in pairs {
        let Some(key) = name.strip_prefix("metadata[").and_then(|k| k.strip_suffix(']')) else { continue };
        if key.is_empty() || key.chars().count() > 64 || value.chars().count() > 512 {
            return Err(ApiError::invalid(
                Some("metadata"),
                "invalid_value",
                format!("metadata: keys are 1 to 64 characters and values at most 512, got {key:?}"),
            ));
        }
        metadata.insert(key.to_string(), value);
    }
    let page = jobs::list_jobs(&state.pool, &project.id, after.as_deref(), limit, Some(&metadata)).await?;
    let mut finishes = std::collections::HashMap::new();
    for job in page.items.iter().filter(|j| j.status == lathe_core::JobStatus::Running) {
        finishes.insert(job.id.to_string(), estimated_finish(&state, &job.id).await?);
    }
    Ok(Json(views::list(page, |j| j.id.as_str().to_string(), |j| views::job_at(j, finishes.get(j.id.as_str()).copied().flatten()))))
}

pub async fn retrieve(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let job = jobs::get_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let finish = if job.status == lathe_core::JobStatus::Running { estimated_finish(&state, &job.id).await? } else { None };
    Ok(Json(views::job_at(&job, finish)))
}

/// A running job's `estimated_finish`: its current attempt's pace so far, over its remaining steps.
async fn estimated_finish(state: &AppState, job_id: &lathe_core::JobId) -> ApiResult<Option<i64>> {
    let pace = lathe_store::progress::attempt_pace(&state.pool, job_id.as_str()).await?;
    Ok(pace.and_then(|p| p.estimated_finish()))
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
