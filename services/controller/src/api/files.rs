//! `/v1/files`: upload (multipart, streamed to disk and validated line by line before anything
//! is recorded), list, retrieve, content, delete.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use lathe_core::FileSummary;
use lathe_store::files::{self, NewFile, PURPOSE_FINE_TUNE};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::views;
use crate::upload::{Framing, FramingError, Sink, SinkError};
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub purpose: Option<String>,
    pub after: Option<String>,
    pub limit: Option<i64>,
    /// `desc` (newest first, the default) or `asc`, as OpenAI's files list.
    pub order: Option<String>,
}

/// Most files one page of `GET /v1/files` holds, as OpenAI's.
const MAX_FILES_PAGE: i64 = 10_000;

pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    limit_within(limit, 20, 100)
}

/// A list's `limit`: `default` when absent, else 1 to `max` or a 400 naming it.
pub fn limit_within(limit: Option<i64>, default: i64, max: i64) -> ApiResult<i64> {
    match limit.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(ApiError::invalid(Some("limit"), "invalid_value", format!("limit: must be between 1 and {max}, got {n}"))),
    }
}

/// As on common filesystems (ext4, NTFS, APFS).
pub const MAX_FILENAME_BYTES: usize = 255;
/// `purpose` is one short word.
const MAX_PURPOSE_BYTES: usize = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `POST /v1/files`: the form is read as a stream ([`crate::upload`]): the file part goes to a
/// temporary file while it is hashed and validated line by line, and becomes a file (renamed
/// into place, then recorded) only when every line passed.
pub async fn upload(State(state): State<AppState>, project: Project, headers: HeaderMap, body: Body) -> ApiResult<Json<Value>> {
    let limit = state.config.max_upload_bytes;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid(
            None,
            "invalid_multipart",
            format!("Content-Type: an upload is multipart/form-data with a boundary, got {content_type:?}"),
        )
    })?;
    let mut framing = Framing::new(&boundary, limit);
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| Box::new(e) as BoxError)?;
        framing.inspect(&chunk).map_err(|e| Box::new(e) as BoxError)?;
        Ok::<Bytes, BoxError>(chunk)
    });
    let mut form = multer::Multipart::new(stream, boundary);

    let id = files::new_file_id();
    let (mut file, mut purpose) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(|e| multipart_error(e, limit))? {
        match field.name() {
            Some("file") if file.is_some() => {
                return Err(ApiError::invalid(Some("file"), "invalid_value", "file: the form has more than one 'file' part"))
            }
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                check_filename(&filename)?;
                let written = write_part(&state, &id, &mut field, limit).await?;
                file = Some((filename, written));
            }
            Some("purpose") => purpose = Some(small_text(&mut field, "purpose", limit).await?),
            // Other parts are read past, never kept.
            _ => while field.chunk().await.map_err(|e| multipart_error(e, limit))?.is_some() {},
        }
    }
    let (filename, (tmp, sha256, summary)) =
        file.ok_or_else(|| ApiError::invalid(Some("file"), "missing_field", "file: a 'file' part is required"))?;
    let purpose = purpose.ok_or_else(|| ApiError::invalid(Some("purpose"), "missing_field", "purpose: required, use 'fine-tune'"))?;
    if purpose != PURPOSE_FINE_TUNE {
        let _ = std::fs::remove_file(&tmp);
        return Err(ApiError::invalid(
            Some("purpose"),
            "invalid_value",
            format!("purpose: only 'fine-tune' files can be uploaded, got {purpose:?}"),
        ));
    }
    let summary = match lathe_core::training_file::enough_to_train(summary) {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::bad_file("file", &error));
        }
    };
    state.storage.commit_upload(&tmp, id.as_str()).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ApiError::storage(&e, "committing an upload")
    })?;
    let stored = files::insert_file(
        &state.pool,
        NewFile {
            id: id.clone(),
            project_id: &project.id,
            purpose: PURPOSE_FINE_TUNE,
            filename: &filename,
            sha256,
            bytes: summary.bytes as i64,
            summary: Some(summary),
        },
    )
    .await;
    match stored {
        Ok(file) => {
            tracing::info!(file_id = %file.id, project = %project.id, examples = summary.examples, bytes = summary.bytes, "file uploaded");
            Ok(Json(views::file(&file)))
        }
        Err(error) => {
            // Nothing half-stored: no row means the bytes go too.
            state.storage.remove_file(id.as_str());
            Err(error.into())
        }
    }
}

/// A name is shown back in every listing and in Content-Disposition: bounded like a file name
/// on disk, storable, and a JSON Lines name.
fn check_filename(filename: &str) -> ApiResult<()> {
    if filename.len() > MAX_FILENAME_BYTES {
        let shown: String = filename.chars().take(40).collect();
        return Err(ApiError::invalid(
            Some("file"),
            "invalid_value",
            format!("file: the file name {shown:?}… is {} bytes long; at most {MAX_FILENAME_BYTES} are allowed", filename.len()),
        ));
    }
    lathe_core::spec::storable_text("file", filename)?;
    if !filename.ends_with(".jsonl") {
        return Err(ApiError::invalid(
            Some("file"),
            "invalid_file_format",
            format!("file: {filename:?} is not a .jsonl file; fine-tuning data is JSON Lines"),
        ));
    }
    Ok(())
}

/// What a chunk sent to the writing thread means.
enum Piece {
    Chunk(Bytes),
    /// The part ended cleanly: finish the file. A channel closed without it (an error, a client
    /// that went away) drops the sink, which removes the temporary file.
    End,
}

/// Streams the file part into a [`Sink`] on a blocking thread; returns the temporary path, the
/// SHA-256 and the summary of a file whose every line is valid.
async fn write_part(
    state: &AppState,
    id: &lathe_core::FileId,
    field: &mut multer::Field<'static>,
    limit: usize,
) -> ApiResult<(std::path::PathBuf, [u8; 32], FileSummary)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(4);
    let path = state.storage.upload_path(id.as_str());
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<_>, SinkError> {
        let mut sink = Sink::create(path)?;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Chunk(chunk) => sink.write(&chunk)?,
                Piece::End => return sink.finish().map(Some),
            }
        }
        Ok(None)
    });
    let mut read_error = None;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(Piece::Chunk(chunk)).await.is_err() {
                    break; // the writer stopped on an invalid line: its error is the answer
                }
            }
            Ok(None) => {
                let _ = tx.send(Piece::End).await;
                break;
            }
            Err(error) => {
                read_error = Some(multipart_error(error, limit));
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(ApiError::internal)?;
    match (written, read_error) {
        (Err(SinkError::Invalid(error)), _) => Err(ApiError::bad_file("file", &error)),
        (Err(SinkError::Io { path, source }), _) => Err(ApiError::storage(&source, path.display())),
        (Ok(_), Some(error)) => Err(error),
        (Ok(Some(written)), None) => Ok(written),
        (Ok(None), None) => Err(ApiError::internal("the upload writer ended without the end of the part")),
    }
}

/// A short text part (`purpose`), refused past `MAX_PURPOSE_BYTES` rather than buffered.
async fn small_text(field: &mut multer::Field<'static>, param: &str, limit: usize) -> ApiResult<String> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PURPOSE_BYTES {
            return Err(ApiError::invalid(Some(param), "invalid_value", format!("{param}: longer than {MAX_PURPOSE_BYTES} bytes")));
        }
    }
    String::from_utf8(bytes).map_err(|_| ApiError::invalid(Some(param), "invalid_value", format!("{param}: not UTF-8")))
}

/// A multipart error in the OpenAI envelope: the size limit is a 413, anything else a 400.
fn multipart_error(error: multer::Error, limit: usize) -> ApiError {
    if let multer::Error::StreamReadFailed(source) = &error {
        match source.downcast_ref::<FramingError>() {
            Some(FramingError::TooLarge(_)) => return ApiError::too_large(limit),
            Some(framing) => return ApiError::invalid(None, "invalid_multipart", format!("Could not read the multipart form: {framing}")),
            None => {}
        }
    }
    ApiError::invalid(None, "invalid_multipart", format!("Could not read the multipart form: {error}"))
}

pub async fn list(State(state): State<AppState>, project: Project, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = limit_within(q.limit, 100, MAX_FILES_PAGE)?;
    let oldest_first = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::invalid(Some("order"), "invalid_value", format!("order: must be 'asc' or 'desc', got {other:?}")))
        }
    };
    let after = super::cursor(q.after.as_deref(), lathe_core::FileId::parse)?;
    let purpose = q.purpose.as_deref().filter(|p| !p.contains('\0'));
    let page = files::list_files(&state.pool, &project.id, purpose, after.as_deref(), limit, oldest_first).await?;
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
