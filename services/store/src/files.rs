//! Metadata of uploaded files. The bytes are written by the caller to `<data dir>/files/<id>`
//! (a path made from the id, never from the user's filename); this module records what the
//! API shows and what job create checks. Every query is scoped by project: another project's
//! file is `NotFound`, as is a deleted one.

use lathe_core::{DataFormat, FileId, FileSummary};
use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::error::corrupt;
use crate::{random, Page, StoreError};

pub const PURPOSE_FINE_TUNE: &str = "fine-tune";
pub const PURPOSE_FINE_TUNE_RESULTS: &str = "fine-tune-results";

#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub id: FileId,
    pub project_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub sha256: Vec<u8>,
    /// What validation found, for purpose `fine-tune`; `None` for result files.
    pub summary: Option<FileSummary>,
    pub created_at: OffsetDateTime,
}

/// A file to record; `id` is chosen first because the caller names the bytes on disk after it.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub id: FileId,
    pub project_id: &'a str,
    pub purpose: &'a str,
    pub filename: &'a str,
    pub sha256: [u8; 32],
    pub bytes: i64,
    pub summary: Option<FileSummary>,
}

/// A fresh id for a file about to be written.
pub fn new_file_id() -> FileId {
    FileId::from_random(random::id_bytes())
}

#[derive(sqlx::FromRow)]
struct FileRow {
    id: String,
    project_id: String,
    purpose: String,
    filename: String,
    bytes: i64,
    sha256: Vec<u8>,
    format: Option<String>,
    line_count: Option<i32>,
    example_count: Option<i32>,
    created_at: OffsetDateTime,
}

const FILE_COLUMNS: &str = "id, project_id, purpose, filename, bytes, sha256, format, line_count, example_count, created_at";

impl TryFrom<FileRow> for StoredFile {
    type Error = StoreError;
    fn try_from(row: FileRow) -> Result<Self, StoreError> {
        let summary = match (row.format.as_deref(), row.example_count, row.line_count) {
            (Some(format), Some(examples), Some(lines)) => Some(FileSummary {
                format: parse_format(format)?,
                examples: examples as usize,
                lines: lines as usize,
                bytes: row.bytes as usize,
            }),
            _ => None,
        };
        Ok(StoredFile {
            id: FileId::parse(&row.id).map_err(corrupt)?,
            project_id: row.project_id,
            purpose: row.purpose,
            filename: row.filename,
            bytes: row.bytes,
            sha256: row.sha256,
            summary,
            created_at: row.created_at,
        })
    }
}

fn format_str(format: DataFormat) -> &'static str {
    match format {
        DataFormat::Chat => "chat",
        DataFormat::PromptCompletion => "prompt_completion",
        DataFormat::Text => "text",
        DataFormat::Preference => "preference",
    }
}

fn parse_format(text: &str) -> Result<DataFormat, StoreError> {
    match text {
        "chat" => Ok(DataFormat::Chat),
        "prompt_completion" => Ok(DataFormat::PromptCompletion),
        "text" => Ok(DataFormat::Text),
        "preference" => Ok(DataFormat::Preference),
        other => Err(corrupt(format!("unknown file format {other:?}"))),
    }
}

pub async fn insert_file(pool: &PgPool, file: NewFile<'_>) -> Result<StoredFile, StoreError> {
    let summary = file.summary;
    let row = sqlx::query_as::<_, FileRow>(&format!(
        "INSERT INTO files (id, project_id, purpose, filename, bytes, sha256, format, line_count, example_count)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         RETURNING {FILE_COLUMNS}"
    ))
    .bind(file.id.as_str())
    .bind(file.project_id)
    .bind(file.purpose)
    .bind(file.filename)
    .bind(file.bytes)
    .bind(&file.sha256[..])
    .bind(summary.map(|s| format_str(s.format)))
    .bind(summary.map(|s| s.lines as i32))
    .bind(summary.map(|s| s.examples as i32))
    .fetch_one(pool)
    .await?;
    row.try_into()
}

/// A live file of the project.
pub async fn get_file(pool: &PgPool, project_id: &str, file_id: &FileId) -> Result<StoredFile, StoreError> {
    let file_id = file_id.as_str();
    sqlx::query_as::<_, FileRow>(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL"))
        .bind(file_id)
        .bind(project_id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?
        .try_into()
}

/// Newest first; `after` is the id of the last file of the previous page.
pub async fn list_files(
    pool: &PgPool,
    project_id: &str,
    purpose: Option<&str>,
    after: Option<&str>,
    limit: i64,
    oldest_first: bool,
) -> Result<Page<StoredFile>, StoreError> {
    let (direction, past) = if oldest_first { ("ASC", ">") } else { ("DESC", "<") };
    let rows = sqlx::query_as::<_, FileRow>(&format!(
        "SELECT {FILE_COLUMNS} FROM files
         WHERE project_id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR purpose = $2)
           AND ($3::text IS NULL OR (created_at, id) {past}
                (SELECT created_at, id FROM files WHERE id = $3 AND project_id = $1))
         ORDER BY created_at {direction}, id {direction}
         LIMIT $4"
    ))
    .bind(project_id)
    .bind(purpose)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let files = rows.into_iter().map(StoredFile::try_from).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_overfetch(files, limit))
}

/// Soft delete: jobs keep referring to the row, the API no longer shows it. The caller removes
/// the bytes afterwards.
pub async fn delete_file(pool: &PgPool, project_id: &str, file_id: &FileId) -> Result<(), StoreError> {
    let file_id = file_id.as_str();
    let deleted = sqlx::query("UPDATE files SET deleted_at = now() WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL")
        .bind(file_id)
        .bind(project_id)
        .execute(pool)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}
