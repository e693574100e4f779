//! One attempt's bidirectional stream. Up: metric batches, log events, checkpoint commits and
//! the attempt's end, each written to Postgres fenced by the attempt number and acked by `seq`
//! once durable. Down: `Cancel` and `Pause` when the user asks, `Preempt` when the reconciler
//! does (seen in the job row, read for every stream of this replica at once by
//! [`super::control`], so it works whichever replica took the request), `LeaseLost` when the
//! attempt no longer holds the job.

use std::path::Path;

use lathe_core::{fine_tuned_model_name, JobStatus};
use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::{
    Ack, Cancel, ControllerMessage, FailureClass, LeaseLost, LogLevel, MetricPoint as WireMetricPoint, Pause, Preempt, StopReason,
    WorkerMessage,
};
use lathe_store::dispatch::renew_lease;
use lathe_store::dispatch::{
    append_events, commit_checkpoint, finish_attempt, record_progress, AttemptOutcome, EventLevel, MetricPoint, NewEvent,
};
use lathe_store::files::{insert_file, new_file_id, NewFile, PURPOSE_FINE_TUNE_RESULTS};
use lathe_store::jobs::{get_job_unscoped, AttemptControl, Job, JobError};
use lathe_store::progress::list_metrics;
use lathe_store::StoreError;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::control::Observed;
use super::status;
use super::wire::{self, Refused};
use crate::result_file::results_csv;
use crate::AppState;

/// Events of one worker message are keyed (attempt, seq << 10 | index): a batch of up to 1024
/// metric points becomes as many `metrics` events, and a resend maps to the same keys.
const EVENTS_PER_MESSAGE: i64 = 1 << 10;

struct Attempt {
    state: AppState,
    job: Job,
    attempt: i32,
}

/// What handling one message leads to.
enum Next {
    Continue,
    /// The attempt ended (finish, fail, stopped): ack and close.
    Close,
}

pub(super) async fn open(
    state: AppState,
    worker_id: String,
    mut inbound: Streaming<WorkerMessage>,
) -> Result<ReceiverStream<Result<ControllerMessage, Status>>, Status> {
    let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty Attempt stream"))?;
    let Some(Up::Hello(hello)) = first.body else {
        return Err(Status::invalid_argument("the first message of an Attempt stream must be Hello"));
    };
    let (tx, rx) = mpsc::channel(64);
    let attempt = hello.attempt as i32;
    // The Hello is fenced like every write: the worker must hold exactly this attempt.
    match renew_lease(&state.pool, &hello.job_id, attempt, &worker_id, state.config.lease).await {
        Ok(_) => {}
        Err(StoreError::StaleAttempt { .. }) | Err(StoreError::NotFound) => {
            let _ = tx.send(Ok(lease_lost("this worker does not hold this attempt"))).await;
            return Ok(ReceiverStream::new(rx));
        }
        Err(other) => return Err(status(other)),
    }
    let job_id = lathe_core::JobId::parse(&hello.job_id).map_err(|e| Status::invalid_argument(format!("Hello: {e}")))?;
    let job = get_job_unscoped(&state.pool, &job_id).await.map_err(status)?;
    let _ = tx.send(Ok(down(Down::Ack(Ack { seq: first.seq })))).await;
    // Every log line about this attempt carries the job, the attempt and the worker.
    let span = tracing::info_span!("attempt", job_id = %hello.job_id, attempt, worker_id = %worker_id);
    let revoked = state.revocations.watch(&worker_id);
    let control = state.attempt_controls.watch(&hello.job_id, attempt);
    let attempt = Attempt { state, job, attempt };
    tokio::spawn(attempt.serve(inbound, tx, revoked, control).instrument(span));
    Ok(ReceiverStream::new(rx))
}

fn down(body: Down) -> ControllerMessage {
    ControllerMessage { body: Some(body) }
}

fn lease_lost(reason: &str) -> ControllerMessage {
    down(Down::LeaseLost(LeaseLost { reason: reason.to_string() }))
}

impl Attempt {
    fn job_id(&self) -> &str {
        self.job.id.as_str()
    }

    async fn serve(
        self,
        mut inbound: Streaming<WorkerMessage>,
        tx: mpsc::Sender<Result<ControllerMessage, Status>>,
        mut revoked: super::revocation::Watch,
        mut control: super::control::Watch,
    ) {
        let (mut cancel_sent, mut pause_sent, mut preempt_sent) = (false, false, false);
        loop {
            tokio::select! {
                () = revoked.revoked() => {
                    // The revocation gave the job back already; nothing more is taken from here.
                    let _ = tx.send(Ok(lease_lost("this worker was revoked"))).await;
                    break;
                }
                message = inbound.message() => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        // The worker closed the stream or the connection broke; it reconnects
                        // with a new Hello and resends what was not acked.
                        Ok(None) | Err(_) => break,
                    };
                    let seq = message.seq;
                    match self.handle(message).await {
                        Ok(next) => {
                            let _ = tx.send(Ok(down(Down::Ack(Ack { seq })))).await;
                            if matches!(next, Next::Close) {
                                break;
                            }
                        }
                        Err(ReportError::Refused(refused)) => {
                            // A report that can never be stored: resending it would block every
                            // report behind it. Acked and dropped; the tenant sees the field in
                            // the controller's words, the operator the details.
                            tracing::error!(field = refused.field, why = refused.why, "a worker report was refused");
                            let message = format!("A report from the worker was refused and dropped ({refused})");
                            self.state.note_event(self.job_id(), EventLevel::Error, &message, None).await;
                            let _ = tx.send(Ok(down(Down::Ack(Ack { seq })))).await;
                        }
                        Err(ReportError::Store(StoreError::StaleAttempt { .. })) | Err(ReportError::Store(StoreError::NotFound)) => {
                            // The user cancelled this very attempt: what it reports is moot (ack
                            // it so the worker's outbox drains) and it is told to stop as
                            // cancelled, not as a worker that lost its lease.
                            if self.cancelled().await {
                                let _ = tx.send(Ok(down(Down::Ack(Ack { seq })))).await;
                                if !cancel_sent {
                                    cancel_sent = true;
                                    let _ = tx.send(Ok(down(Down::Cancel(Cancel { reason: "cancelled by the user".into() })))).await;
                                }
                                continue;
                            }
                            let _ = tx.send(Ok(lease_lost("the attempt no longer holds the job"))).await;
                            break;
                        }
                        Err(ReportError::Store(StoreError::Unavailable(error))) => {
                            // Not acked: the worker reconnects and resends once Postgres is back.
                            tracing::warn!(%error, "attempt write failed; the worker will resend");
                            let _ = tx.send(Err(status(StoreError::Unavailable(error)))).await;
                            break;
                        }
                        Err(ReportError::Store(other)) => {
                            // Postgres refused a value the checks let through: the same as a
                            // refusal, but the cause is ours, so the tenant sees no detail.
                            tracing::error!(error = %other, "a worker report could not be stored");
                            let message = "A report from the worker could not be stored and was dropped";
                            self.state.note_event(self.job_id(), EventLevel::Error, message, None).await;
                            let _ = tx.send(Ok(down(Down::Ack(Ack { seq })))).await;
                        }
                    }
                }
                observed = control.changed() => {
                    let Observed::Control(row) = observed else { continue };
                    match row {
                        Some(AttemptControl { status: JobStatus::Running, pause, preempt_for }) => {
                            if pause && !pause_sent {
                                pause_sent = true;
                                let _ = tx.send(Ok(down(Down::Pause(Pause {})))).await;
                            }
                            if let Some(for_job_id) = preempt_for.filter(|_| !preempt_sent) {
                                preempt_sent = true;
                                let _ = tx.send(Ok(down(Down::Preempt(Preempt { for_job_id })))).await;
                            }
                        }
                        Some(AttemptControl { status: JobStatus::Cancelled, .. }) => {
                            if !cancel_sent {
                                cancel_sent = true;
                                let _ = tx.send(Ok(down(Down::Cancel(Cancel { reason: "cancelled by the user".into() })))).await;
                            }
                        }
                        _ => {
                            let _ = tx.send(Ok(lease_lost("the job moved on without this attempt"))).await;
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Whether the job was cancelled while this attempt held it.
    async fn cancelled(&self) -> bool {
        matches!(
            lathe_store::jobs::attempt_control(&self.state.pool, self.job_id(), self.attempt).await,
            Ok(Some(AttemptControl { status: JobStatus::Cancelled, .. }))
        )
    }

    /// One message from the worker, written fenced by the attempt.
    async fn handle(&self, message: WorkerMessage) -> Result<Next, ReportError> {
        let event_seq = message.seq as i64 * EVENTS_PER_MESSAGE;
        match message.body {
            None | Some(Up::Hello(_)) => Ok(Next::Continue),
            Some(Up::Metrics(batch)) => self.record_metrics(batch, event_seq).await,
            Some(Up::Log(log)) => Ok(self.record_log(log, event_seq).await?),
            Some(Up::Checkpoint(checkpoint)) => self.commit_checkpoint(checkpoint, event_seq).await,
            Some(Up::Finish(finish)) => Ok(self.on_finish(finish).await?),
            Some(Up::Fail(fail)) => Ok(self.on_fail(fail).await?),
            Some(Up::Stopped(stopped)) => Ok(self.on_stopped(stopped).await?),
        }
    }

    /// A batch of metric points: the loss curve and its `metrics` events, in one transaction.
    async fn record_metrics(&self, batch: lathe_proto::v1::MetricsBatch, event_seq: i64) -> Result<Next, ReportError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        let points: Vec<MetricPoint> = wire::metric_points(&batch.points)?;
        let events: Vec<NewEvent> = batch
            .points
            .iter()
            .take(EVENTS_PER_MESSAGE as usize)
            .enumerate()
            .map(|(i, p)| metrics_event(event_seq + i as i64, p))
            .collect();
        record_progress(pool, job_id, attempt, &points, &events).await?;
        self.state.telemetry.metric_points_ingested.inc_by(points.len() as u64);
        if let Some(last) = batch.points.iter().max_by_key(|p| p.step) {
            self.state.telemetry.observe_job_point(job_id, last.step, last.train_loss, last.tokens_per_second);
            if let Some(margin) = last.rewards_margin {
                self.state.telemetry.observe_job_reward_margin(job_id, margin);
            }
        }
        if let Some(validated) = batch.points.iter().filter(|p| p.valid_loss.is_some()).max_by_key(|p| p.step) {
            self.state.telemetry.observe_job_loss(job_id, None, validated.valid_loss);
        }
        Ok(Next::Continue)
    }

    async fn record_log(&self, log: lathe_proto::v1::LogEvent, event_seq: i64) -> Result<Next, StoreError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        let level = match LogLevel::try_from(log.level).unwrap_or(LogLevel::Info) {
            LogLevel::Warn => EventLevel::Warn,
            LogLevel::Error => EventLevel::Error,
            _ => EventLevel::Info,
        };
        // A worker's event is shown to the tenant and kept for the job's life: bounded, so a
        // worker (buggy or hostile) cannot store megabytes per message.
        let data = if log.data_json.len() <= MAX_EVENT_DATA_BYTES { serde_json::from_str(&log.data_json).ok() } else { None };
        let data = data.map(wire::storable_json);
        let event = NewEvent { seq: event_seq, level, kind: "message".into(), message: bounded_message(&log.message), data };
        append_events(pool, job_id, attempt, &[event]).await?;
        Ok(Next::Continue)
    }

    /// A checkpoint the worker wrote (inside the job's directory) becomes the resume point.
    async fn commit_checkpoint(&self, checkpoint: lathe_proto::v1::CheckpointCommit, event_seq: i64) -> Result<Next, ReportError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        let path = self
            .state
            .storage
            .lexically_inside_job_dir(job_id, &checkpoint.path)
            .map(|p| p.display().to_string())
            .ok_or(Refused { field: "checkpoint.path".into(), why: "outside the job's directory" })?;
        let step = wire::step("checkpoint.step", checkpoint.step)?;
        let metrics: serde_json::Value = serde_json::from_str(&checkpoint.metrics_json).unwrap_or_else(|_| json!({}));
        commit_checkpoint(pool, job_id, attempt, step, &path, &wire::storable_json(metrics)).await?;
        let event = NewEvent {
            seq: event_seq,
            level: EventLevel::Info,
            kind: "message".into(),
            message: format!("Checkpoint created at step {}", checkpoint.step),
            data: Some(json!({"step": checkpoint.step})),
        };
        append_events(pool, job_id, attempt, &[event]).await?;
        Ok(Next::Continue)
    }

    /// Training finished: store the outputs and succeed, or fail the job if they cannot be stored.
    async fn on_finish(&self, finish: lathe_proto::v1::Finish) -> Result<Next, StoreError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        match self.finish(finish).await {
            Ok(()) => {}
            Err(error @ (StoreError::Unavailable(_) | StoreError::StaleAttempt { .. } | StoreError::NotFound)) => return Err(error),
            Err(other) => {
                // Retrying cannot help (an output the controller cannot read): the job
                // fails with a clear code instead of crashing its workers forever.
                tracing::error!(error = %other, "the attempt's outputs could not be stored");
                let error = JobError {
                    code: "result_files_failed".into(),
                    message:
                        "Training finished but its outputs could not be stored (the worker reported files the controller cannot publish)"
                            .into(),
                    param: None,
                };
                finish_attempt(pool, job_id, attempt, AttemptOutcome::Failed(error), &self.state.config.retry).await?;
                self.state.telemetry.forget_job(job_id);
            }
        }
        Ok(Next::Close)
    }

    /// The attempt failed: bad input fails the job; a crash retries (or poisons); a preemption
    /// requeues without spending a retry.
    async fn on_fail(&self, fail: lathe_proto::v1::Fail) -> Result<Next, StoreError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        let class = FailureClass::try_from(fail.class).unwrap_or(FailureClass::Crash);
        let code = if fail.code.is_empty() && class == FailureClass::BadInput { "invalid_job" } else { fail.code.as_str() };
        let reported = wire::reported_error(code, &fail.message);
        let fail = lathe_proto::v1::Fail { message: reported.message.clone(), code: reported.code.clone(), ..fail };
        let outcome = match class {
            FailureClass::BadInput => AttemptOutcome::Failed(reported),
            FailureClass::Preempted => AttemptOutcome::Preempted { reason: fail.message.clone() },
            FailureClass::Infrastructure => {
                self.state.telemetry.infrastructure_faults.get_or_create(&vec![("code".to_string(), fail.code.clone())]).inc();
                tracing::error!(code = fail.code, message = fail.message, "infrastructure fault under an attempt");
                AttemptOutcome::Faulted { reason: format!("{}: {}", fail.code, fail.message) }
            }
            _ => AttemptOutcome::Crashed { reason: fail.message.clone() },
        };
        let job = finish_attempt(pool, job_id, attempt, outcome, &self.state.config.retry).await?;
        self.state.telemetry.forget_job(job_id);
        let (level, message) = match class {
            FailureClass::BadInput => (EventLevel::Error, format!("Job failed: {}", fail.message)),
            FailureClass::Preempted => (EventLevel::Warn, "Worker preempted; the job goes back to the queue".to_string()),
            FailureClass::Infrastructure => (
                EventLevel::Warn,
                format!(
                    "Attempt {attempt} stopped on an infrastructure fault ({}); the job is queued again from its last checkpoint, no retry spent",
                    fail.code
                ),
            ),
            _ => (EventLevel::Error, format!("Attempt {attempt} crashed: {}; status now {}", fail.message, job.status.as_str())),
        };
        self.state.note_event(job_id, level, &message, None).await;
        tracing::info!(class = ?class, status = job.status.as_str(), "attempt failed");
        if job.status == JobStatus::Queued && job.next_attempt_at.is_none() {
            self.state.publish_job(&job).await;
        }
        Ok(Next::Close)
    }

    /// The worker stopped on request (pause or cancel).
    async fn on_stopped(&self, stopped: lathe_proto::v1::Stopped) -> Result<Next, StoreError> {
        let (pool, job_id, attempt) = (&self.state.pool, self.job_id(), self.attempt);
        if StopReason::try_from(stopped.reason) == Ok(StopReason::Paused) {
            let job = finish_attempt(pool, job_id, attempt, AttemptOutcome::Paused, &self.state.config.retry).await?;
            if job.status == JobStatus::Queued {
                // Resumed while the worker was checkpointing for the pause.
                self.state.publish_job(&job).await;
            } else {
                self.state.note_event(job_id, EventLevel::Info, "Job paused; resume continues from the last checkpoint", None).await;
            }
        }
        self.state.telemetry.forget_job(job_id);
        Ok(Next::Close)
    }

    /// A file the worker asks us to read, checked to lie inside this job's directory.
    fn inside_job_dir(&self, path: &str) -> Result<std::path::PathBuf, StoreError> {
        self.state
            .storage
            .inside_job_dir(self.job_id(), path)
            .ok_or_else(|| StoreError::Conflict(format!("path {path:?} is outside the job's directory")))
    }

    /// Publishes the outputs as result files, then marks the job succeeded.
    async fn finish(&self, finish: lathe_proto::v1::Finish) -> Result<(), StoreError> {
        let (pool, job_id) = (&self.state.pool, self.job_id());
        let project = self.job.project_id.as_str();
        // Fenced before any file is published: a stale or cancelled attempt publishes nothing.
        if !matches!(
            lathe_store::jobs::attempt_control(pool, job_id, self.attempt).await?,
            Some(AttemptControl { status: JobStatus::Running, .. })
        ) {
            let current = get_job_unscoped(pool, &self.job.id).await?.attempt;
            return Err(StoreError::StaleAttempt { job: job_id.to_string(), attempt: self.attempt, current });
        }
        let mut sources = Vec::new();
        for result in &finish.result_files {
            let path = self.inside_job_dir(&result.path)?;
            let name = Path::new(&result.filename).file_name().and_then(|n| n.to_str()).unwrap_or("result").to_string();
            sources.push((name, Source::Path(path)));
        }
        let points = list_metrics(pool, project, &self.job.id).await?;
        sources.insert(0, ("step_metrics.csv".into(), Source::Bytes(results_csv(&points).into_bytes())));

        let mut ids = Vec::new();
        for (filename, source) in sources {
            let id = new_file_id();
            let storage = self.state.storage.clone();
            let file_id = id.as_str().to_string();
            let written = tokio::task::spawn_blocking(move || match source {
                Source::Bytes(bytes) => storage.write_file(&file_id, &bytes).map(|sha| (sha, bytes.len() as i64)),
                Source::Path(path) => storage.copy_file(&file_id, &path),
            })
            .await
            .map_err(|e| StoreError::Conflict(e.to_string()))?
            .map_err(|e| StoreError::Conflict(format!("storing the result file {filename}: {e}")))?;
            let (sha256, size) = written;
            insert_file(
                pool,
                NewFile {
                    id: id.clone(),
                    project_id: project,
                    purpose: PURPOSE_FINE_TUNE_RESULTS,
                    filename: &filename,
                    sha256,
                    bytes: size,
                    summary: None,
                },
            )
            .await?;
            ids.push(id);
        }
        let model = fine_tuned_model_name(self.job.spec.model.as_str(), self.job.spec.suffix.as_deref(), &self.job.id);
        let outcome = AttemptOutcome::Succeeded {
            fine_tuned_model: model.clone(),
            result_files: ids.iter().map(|id| id.as_str().to_string()).collect(),
            trained_tokens: Some(finish.trained_tokens as i64),
        };
        if let Err(error) = finish_attempt(pool, job_id, self.attempt, outcome, &self.state.config.retry).await {
            // Lost a race (cancel, lease) after publishing: take the files back.
            for id in &ids {
                let _ = lathe_store::files::delete_file(pool, project, id).await;
                self.state.storage.remove_file(id.as_str());
            }
            return Err(error);
        }
        self.state.telemetry.forget_job(job_id);
        self.state.note_event(job_id, EventLevel::Info, &format!("New fine-tuned model created: {model}"), None).await;
        self.state.note_event(job_id, EventLevel::Info, "The job has successfully completed", None).await;
        tracing::info!(model, "job succeeded");
        Ok(())
    }
}

/// Why a worker's message was not stored.
enum ReportError {
    Store(StoreError),
    /// A value no store could take (see [`wire`]).
    Refused(Refused),
}

impl From<StoreError> for ReportError {
    fn from(error: StoreError) -> Self {
        ReportError::Store(error)
    }
}

impl From<Refused> for ReportError {
    fn from(refused: Refused) -> Self {
        ReportError::Refused(refused)
    }
}

/// Where a result file's bytes come from.
enum Source {
    Bytes(Vec<u8>),
    Path(std::path::PathBuf),
}

/// Longest event message stored from a worker, in bytes; the rest is cut with a note.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4096;
/// Largest event `data` stored from a worker; larger data is dropped (the message stays).
pub const MAX_EVENT_DATA_BYTES: usize = 16 * 1024;

fn bounded_message(message: &str) -> String {
    if message.len() <= MAX_EVENT_MESSAGE_BYTES {
        return wire::storable(message);
    }
    let mut end = MAX_EVENT_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut from {} bytes)", wire::storable(&message[..end]), message.len())
}

/// OpenAI's `metrics` event for one step.
fn metrics_event(seq: i64, p: &WireMetricPoint) -> NewEvent {
    let mut message = format!("Step {}/{}", p.step, p.total_steps);
    if let Some(loss) = p.train_loss {
        message.push_str(&format!(": training loss={loss:.4}"));
    }
    if let Some(loss) = p.valid_loss {
        message.push_str(&format!(", validation loss={loss:.4}"));
    }
    let mut data = json!({
        "step": p.step,
        "total_steps": p.total_steps,
        "train_loss": p.train_loss,
        "valid_loss": p.valid_loss,
        "train_mean_token_accuracy": p.train_mean_token_accuracy,
        "valid_mean_token_accuracy": p.valid_mean_token_accuracy,
        "learning_rate": p.learning_rate,
        "tokens_per_second": p.tokens_per_second,
        "tokens_seen": p.tokens_seen,
    });
    // DPO steps: TRL's names, with `_` for `/`.
    let rewards = [
        ("rewards_chosen", p.rewards_chosen),
        ("rewards_rejected", p.rewards_rejected),
        ("rewards_accuracy", p.rewards_accuracy),
        ("rewards_margin", p.rewards_margin),
    ];
    for (name, value) in rewards {
        if let Some(value) = value {
            data[name] = json!(value);
        }
    }
    if let Some(margin) = p.rewards_margin {
        message.push_str(&format!(", reward margin={margin:.4}"));
    }
    NewEvent { seq, level: EventLevel::Info, kind: "metrics".into(), message, data: Some(data) }
}
