//! `/v1/files`: upload (multipart, validated before anything is stored), list, retrieve,
//! content, delete.

use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use lathe_core::validate_training_file;
use lathe_store::files::{self, NewFile, PURPOSE_FINE_TUNE};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::views;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub purpose: Option<String>,
    pub after: Option<String>,
    pub limit: Option<i64>,
}

pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit.unwrap_or(20) {
        n @ 1..=100 => Ok(n),
        n => Err(ApiError::invalid(Some("limit"), "invalid_value", format!("limit: must be between 1 and 100, got {n}"))),
    }
}

/// The uploaded parts we read; anything else in the form is ignored.
struct Upload {
    filename: String,
    bytes: Vec<u8>,
    purpose: String,
}

async fn read_upload(mut form: Multipart, limit: usize) -> ApiResult<Upload> {
    let too_large_or_bad = |error: axum::extract::multipart::MultipartError| {
        if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(None, "invalid_multipart", format!("Could not read the multipart form: {}", error.body_text()))
        }
    };
    let (mut file, mut purpose) = (None, None);
    while let Some(field) = form.next_field().await.map_err(too_large_or_bad)? {
        match field.name() {
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(too_large_or_bad)?;
                file = Some((filename, bytes.to_vec()));
            }
            Some("purpose") => purpose = Some(field.text().await.map_err(too_large_or_bad)?),
            _ => {}
        }
    }
    let (filename, bytes) = file.ok_or_else(|| ApiError::invalid(Some("file"), "missing_field", "file: a 'file' part is required"))?;
    let purpose = purpose.ok_or_else(|| ApiError::invalid(Some("purpose"), "missing_field", "purpose: required, use 'fine-tune'"))?;
    Ok(Upload { filename, bytes, purpose })
}

/// As on common filesystems (ext4, NTFS, APFS).
pub const MAX_FILENAME_BYTES: usize = 255;

pub async fn upload(State(state): State<AppState>, project: Project, form: Multipart) -> ApiResult<Json<Value>> {
    let upload = read_upload(form, state.config.max_upload_bytes).await?;
    if upload.purpose != PURPOSE_FINE_TUNE {
        return Err(ApiError::invalid(
            Some("purpose"),
            "invalid_value",
            format!("purpose: only 'fine-tune' files can be uploaded, got {:?}", upload.purpose),
        ));
    }
    // A name is shown back in every listing and in Content-Disposition: bounded like a file
    // name on disk, and storable.
    if upload.filename.len() > MAX_FILENAME_BYTES {
        let shown: String = upload.filename.chars().take(40).collect();
        return Err(ApiError::invalid(
            Some("file"),
            "invalid_value",
            format!("file: the file name {shown:?}… is {} bytes long; at most {MAX_FILENAME_BYTES} are allowed", upload.filename.len()),
        ));
    }
    lathe_core::spec::storable_text("file", &upload.filename)?;
    if !upload.filename.ends_with(".jsonl") {
        return Err(ApiError::invalid(
            Some("file"),
            "invalid_file_format",
            format!("file: {:?} is not a .jsonl file; fine-tuning data is JSON Lines", upload.filename),
        ));
    }
    let summary = validate_training_file(&upload.bytes).map_err(|e| ApiError::bad_file("file", &e))?;

    let id = files::new_file_id();
    let storage = state.storage.clone();
    let (bytes, file_id) = (upload.bytes, id.as_str().to_string());
    let sha256 = tokio::task::spawn_blocking(move || storage.write_file(&file_id, &bytes))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let stored = files::insert_file(
        &state.pool,
        NewFile {
            id: id.clone(),
            project_id: &project.id,
            purpose: PURPOSE_FINE_TUNE,
            filename: &upload.filename,
            sha256,
            bytes: summary.bytes as i64,
            summary: Some(summary),
        },
    )
    .await;
    match stored {
        Ok(file) => {
            tracing::info!(file_id = %file.id, project = %project.id, examples = summary.examples, "file uploaded");
            Ok(Json(views::file(&file)))
        }
        Err(error) => {
            // Nothing half-stored: no row means the bytes go too.
            state.storage.remove_file(id.as_str());
            Err(error.into())
        }
    }
}

pub async fn list(State(state): State<AppState>, project: Project, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit.or(Some(100)))?;
    let after = super::cursor(q.after.as_deref(), lathe_core::FileId::parse)?;
    let purpose = q.purpose.as_deref().filter(|p| !p.contains('\0'));
    let page = files::list_files(&state.pool, &project.id, purpose, after.as_deref(), limit).await?;
    Ok(Json(views::list(page, |f| f.id.as_str().to_string(), views::file)))
}

pub async fn retrieve(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let file_id = super::file_id(&id)?;
    let file = files::get_file(&state.pool, &project.id, &file_id).await.map_err(|e| ApiError::from_store(e, "file", &id))?;
    Ok(Json(views::file(&file)))
}

pub async fn content(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Response> {
    let file_id = super::file_id(&id)?;
    let file = files::get_file(&state.pool, &project.id, &file_id).await.map_err(|e| ApiError::from_store(e, "file", &id))?;
    let path = state.storage.file_path(file.id.as_str());
    // Streamed: result files can be whole models.
    let bytes = tokio::fs::File::open(&path).await.map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(bytes));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, file.bytes)
        .header(header::CONTENT_DISPOSITION, format!("attachment; filename=\"{}\"", header_safe(&file.filename)))
        .body(body)
        .map_err(ApiError::internal)
}

/// A filename as a quoted header parameter: printable ASCII only, no quote or backslash.
fn header_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect()
}

pub async fn delete(State(state): State<AppState>, project: Project, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    // The id names the bytes on disk: only a well-formed id of a row just deleted gets there.
    let file_id = lathe_core::FileId::parse(&id).map_err(|_| ApiError::not_found("file", &id))?;
    files::delete_file(&state.pool, &project.id, &file_id).await.map_err(|e| ApiError::from_store(e, "file", &id))?;
    state.storage.remove_file(file_id.as_str());
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
