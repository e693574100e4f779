//! `POST /v1/chat/completions` and `POST /v1/completions`: read the request
//! ([`inference::request`]), resolve the model in the caller's project (a base model, or one
//! of its own `ft:` models: another project's is a 404 like an unknown one), hand it to an
//! inference worker ([`inference::Router`]), and answer as one object or as server-sent
//! events. A client that goes away cancels its request on the worker.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lathe_proto::v1::ResultFile;
use lathe_store::jobs;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Project;
use super::error::{ApiError, ApiResult};
use crate::inference::request::{self, Kind};
use crate::inference::response::{refusal, Answer, Gathered, Usage};
use crate::inference::{Placed, Unplaced};
use crate::{adapters, base_models, AppState};

/// Sent on a whole answer: the largest batch (sequences) its tokens were generated in.
pub const BATCH_SIZE_HEADER: &str = "x-lathe-batch-size";

pub async fn chat(State(state): State<AppState>, project: Project, body: Bytes) -> Response {
    with_retry_after(complete(state, project, Kind::Chat, body).await)
}

pub async fn text(State(state): State<AppState>, project: Project, body: Bytes) -> Response {
    with_retry_after(complete(state, project, Kind::Text, body).await)
}

async fn complete(state: AppState, project: Project, kind: Kind, body: Bytes) -> ApiResult<Response> {
    let parsed = request::parse(kind, &body)?;
    let mut completion = parsed.request;
    let (base_model, adapter_files) = resolve(&state, &project, &completion.model).await?;
    completion.base_model = base_model;
    completion.adapter_files = adapter_files;
    let prefix = if kind == Kind::Chat { "chatcmpl-" } else { "cmpl-" };
    completion.request_id = format!("{prefix}{}", Alphanumeric.sample_string(&mut rand::rng(), 24));
    let answer = Answer {
        kind,
        id: completion.request_id.clone(),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
        model: completion.model.clone(),
        include_usage: parsed.include_usage,
    };
    let (choices, logprobs) = (completion.n.max(1), completion.logprobs);
    let slot = if parsed.stream { Some(state.streams.open(&project.key_digest, state.config.max_streams_per_key)?) } else { None };
    let placed = state.inference.place(completion).map_err(unplaced)?;
    tracing::info!(request_id = answer.id, model = answer.model, worker_id = placed.worker_id, stream = parsed.stream, "completion placed");
    // A completion that outlives this is given up: dropping `placed` cancels it on its worker.
    let deadline = tokio::time::Instant::now() + state.config.completion_timeout;
    if parsed.stream {
        Ok(stream(answer, placed, choices, state.config.completion_timeout, slot).into_response())
    } else {
        match tokio::time::timeout_at(deadline, gather(answer, placed, choices, logprobs)).await {
            Ok(answered) => answered,
            Err(_) => Err(timed_out(state.config.completion_timeout)),
        }
    }
}

fn timed_out(limit: std::time::Duration) -> ApiError {
    tracing::warn!(seconds = limit.as_secs_f64(), "completion timed out");
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        kind: "server_error",
        message: format!("The completion did not finish within {} s; it was cancelled. Ask for fewer tokens or retry.", limit.as_secs()),
        param: None,
        code: Some("timeout".into()),
    }
}

/// The model's base and, for an `ft:` model of the caller's project, its adapter files.
async fn resolve(state: &AppState, project: &Project, model: &str) -> ApiResult<(String, Vec<ResultFile>)> {
    let not_found = || ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!("The model `{model}` does not exist or you do not have access to it."),
        param: Some("model".into()),
        code: Some("model_not_found".into()),
    };
    if model.starts_with("ft:") {
        let fine_tuned = lathe_core::split_checkpoint_model_name(model).0;
        let job = jobs::find_by_fine_tuned_model(&state.pool, &project.id, fine_tuned).await?.ok_or_else(not_found)?;
        if job.spec.lora.is_none() {
            return Err(ApiError::invalid(
                Some("model"),
                "unsupported_value",
                format!("model: {model} is a full fine-tune; download its files and serve them as a base model (put them under the models root)"),
            ));
        }
        let files = adapters::model_adapter(state, &project.id, &job, model).await?.ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "The adapter files of `{model}` were deleted (a job keeps its newest {} checkpoints: GET /v1/fine_tuning/jobs/{}/checkpoints).",
                job.spec.keep_checkpoints, job.id
            ),
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        })?;
        return Ok((job.spec.model.to_string(), files));
    }
    if base_models::resolve_str(&state.config.models_root, model).is_none() {
        return Err(not_found());
    }
    Ok((model.to_string(), Vec::new()))
}

fn unplaced(why: Unplaced) -> ApiError {
    let message = match why {
        Unplaced::NoServer => "No inference worker is connected to this server; start one with `lathe worker --serve`. Retry later.",
        Unplaced::Busy => "Every inference worker is at capacity. Retry after a few seconds.",
    };
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: message.into(),
        param: None,
        code: Some(if why == Unplaced::Busy { "overloaded" } else { "no_inference_worker" }.into()),
    }
}

/// A 503 (no worker, all at capacity) says when to come back.
fn with_retry_after(result: ApiResult<Response>) -> Response {
    let mut response = result.into_response();
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(2));
    }
    response
}

fn worker_gone() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: "The inference worker serving this request went away; retry.".into(),
        param: None,
        code: Some("worker_unavailable".into()),
    }
}

async fn gather(answer: Answer, mut placed: Placed, choices: u32, logprobs: bool) -> ApiResult<Response> {
    let mut gathered = Gathered::new(choices);
    let mut finished = 0;
    while finished < choices {
        let piece = placed.pieces.recv().await.ok_or_else(worker_gone)?;
        if let Some(error) = &piece.error {
            return Err(refusal(error));
        }
        finished += u32::from(!piece.finish_reason.is_empty());
        gathered.add(piece);
    }
    tracing::info!(
        request_id = answer.id,
        batch = gathered.max_batch,
        completion_tokens = gathered.usage.completion_tokens,
        "completion answered"
    );
    let mut response = Json(gathered.body(&answer, logprobs)).into_response();
    response.headers_mut().insert(BATCH_SIZE_HEADER, HeaderValue::from(gathered.max_batch));
    Ok(response)
}

fn stream(
    answer: Answer,
    placed: Placed,
    choices: u32,
    limit: std::time::Duration,
    slot: Option<super::limits::StreamSlot>,
) -> impl IntoResponse {
    let deadline = tokio::time::Instant::now() + limit;
    let (events, body) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        // The whole of `placed`, not just its receiver (a field captured alone would leave its
        // cancel-on-drop guard behind, dropped when this function returns).
        let mut placed = placed;
        let _slot = slot;
        let mut started = vec![false; choices as usize];
        let (mut usage, mut finished) = (Usage::default(), 0);
        let data = |value: serde_json::Value| Ok(Event::default().data(value.to_string()));
        while finished < choices {
            let piece = tokio::select! {
                piece = placed.pieces.recv() => piece,
                // The client went away: dropping `placed` cancels the request on the worker.
                () = events.closed() => return,
                () = tokio::time::sleep_until(deadline) => {
                    let error = timed_out(limit);
                    let _ = events.send(data(json!({"error": {"message": error.message, "type": error.kind, "code": error.code}}))).await;
                    return;
                }
            };
            let Some(piece) = piece else {
                let error = worker_gone();
                let _ = events.send(data(json!({"error": {"message": error.message, "type": error.kind, "code": error.code}}))).await;
                return;
            };
            if let Some(error) = &piece.error {
                let error = refusal(error);
                let body = json!({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}});
                let _ = events.send(data(body)).await;
                return;
            }
            let seen = std::mem::replace(started.get_mut(piece.index as usize).unwrap_or(&mut true), true);
            usage.add(&piece);
            finished += u32::from(!piece.finish_reason.is_empty());
            for chunk in answer.chunks(&piece, !seen) {
                if events.send(data(chunk)).await.is_err() {
                    return;
                }
            }
        }
        if answer.include_usage {
            let _ = events.send(data(answer.usage_chunk(&usage))).await;
        }
        tracing::info!(request_id = answer.id, completion_tokens = usage.completion_tokens, "completion streamed");
        let _ = events.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(body)).keep_alive(KeepAlive::default())
}
