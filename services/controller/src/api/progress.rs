//! A job's progress as it is reported: events (paged, and live over SSE), checkpoints, and
//! the whole metric curve.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::stream::{self, Stream};
use lathe_core::EventId;
use lathe_store::jobs::get_job;
use lathe_store::progress::{events_after, list_checkpoints, list_events, list_metrics_page};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use super::files::page_limit;
use super::views;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
}

pub async fn events(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let limit = page_limit(q.limit)?;
    let after = match q.after.as_deref() {
        Some(text) => Some(
            EventId::parse(text)
                .ok()
                .filter(|e| e.sequence_in(job_id.as_str()).is_some())
                .ok_or_else(|| ApiError::invalid(Some("after"), "invalid_value", format!("after: {text:?} is not an event of {id}")))?,
        ),
        None => None,
    };
    let page =
        list_events(&state.pool, &project.id, &job_id, after.as_ref(), limit).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    Ok(Json(views::list(page, |e| e.id.as_str().to_string(), views::event)))
}

pub async fn checkpoints(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let limit = page_limit(q.limit.or(Some(10)))?;
    let after = super::cursor(q.after.as_deref(), lathe_core::CheckpointId::parse)?;
    let job = get_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let keep = i64::from(job.spec.keep_checkpoints);
    let page = list_checkpoints(&state.pool, &project.id, &job_id, keep, after.as_deref(), limit)
        .await
        .map_err(|e| ApiError::from_store(e, "job", &id))?;
    Ok(Json(views::list(page, |c| c.id.as_str().to_string(), |c| views::checkpoint(c, &job))))
}

/// Most points one page of `/metrics` holds when a `limit` is given.
const MAX_METRICS_PAGE: i64 = 100_000;

/// Native: the loss curve, across attempts (a resumed attempt's steps replace the ones it
/// replayed), oldest step first: all of it, or with `?after=STEP&limit=N` a page (`has_more`,
/// and `last_id` is the last step, to pass as the next `after`).
pub async fn metrics(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let job_id = super::job_id(&id)?;
    let after =
        match q.after.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
                ApiError::invalid(Some("after"), "invalid_value", format!("after: a step number (0 or more), got {text:?}"))
            })?),
        };
    let limit = q.limit.map(|_| super::files::limit_within(q.limit, 1, MAX_METRICS_PAGE)).transpose()?;
    let page = list_metrics_page(&state.pool, &project.id, &job_id, after, limit).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    Ok(Json(views::list(page, |p| p.step.to_string(), views::metric_point)))
}

const SSE_POLL: Duration = Duration::from_millis(500);

/// Native: the job's events as Server-Sent Events, oldest first, from the beginning (or after
/// `Last-Event-ID` semantics via `?after=`); the stream ends once the job is finished and
/// every event has been sent.
pub async fn stream(
    State(state): State<AppState>,
    project: Project,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    // Check access before the stream starts, so a foreign id is a plain 404.
    let job_id = super::job_id(&id)?;
    get_job(&state.pool, &project.id, &job_id).await.map_err(|e| ApiError::from_store(e, "job", &id))?;
    let start = q.after.as_deref().and_then(|a| EventId::parse(a).ok()).and_then(|e| e.sequence_in(job_id.as_str())).unwrap_or(0);
    let slot = state.streams.open(&project.key_digest, state.config.max_streams_per_key)?;
    struct Cursor {
        state: AppState,
        project: String,
        job: lathe_core::JobId,
        after: i64,
        done: bool,
        /// Held while the stream lives: this key's place under its stream cap.
        _slot: super::limits::StreamSlot,
    }
    let cursor = Cursor { state, project: project.id, job: job_id, after: start, done: false, _slot: slot };
    let events = stream::unfold(cursor, |mut c| async move {
        loop {
            if c.done {
                return None;
            }
            // Read the status first: an event written after a terminal status is read below.
            let terminal = match get_job(&c.state.pool, &c.project, &c.job).await {
                Ok(job) => job.status.is_terminal(),
                Err(_) => true,
            };
            match events_after(&c.state.pool, &c.project, &c.job, c.after, 200).await {
                Ok(batch) if !batch.is_empty() => {
                    c.after = batch.last().and_then(|e| e.id.sequence_in(c.job.as_str())).unwrap_or(c.after);
                    let items: Vec<Result<SseEvent, Infallible>> =
                        batch.iter().map(|e| Ok(SseEvent::default().id(e.id.as_str()).data(views::event(e).to_string()))).collect();
                    return Some((stream::iter(items), c));
                }
                Ok(_) if terminal => {
                    c.done = true;
                    let end = SseEvent::default().event("end").data("{}");
                    return Some((stream::iter(vec![Ok(end)]), c));
                }
                Ok(_) => tokio::time::sleep(SSE_POLL).await,
                Err(error) => {
                    tracing::warn!(%error, "event stream read failed; retrying");
                    tokio::time::sleep(SSE_POLL * 4).await;
                }
            }
        }
    });
    Ok(Sse::new(futures_util::StreamExt::flatten(events)).keep_alive(KeepAlive::default()))
}
