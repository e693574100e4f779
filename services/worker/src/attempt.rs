//! One attempt: verify the inputs, run the trainer on a blocking thread, and keep the
//! attempt's stream to the controller — metric batches every second, log events, checkpoint
//! commits, and the final Finish / Fail / Stopped — until the controller acks the end.
//!
//! Every message gets a sequence number and stays in the outbox until acked; after a broken
//! stream the worker reconnects with the same Hello and resends the unacked tail (the
//! controller's writes are idempotent). `LeaseLost` ends everything at once: the trainer is
//! told to stop and nothing more is sent.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lathe_core::JobSpec;
use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::{
    CheckpointCommit, ClaimJobResponse, ControllerMessage, Fail, FailureClass, Finish, Hello, LogEvent, LogLevel, MetricPoint,
    MetricsBatch, ResultFile, StopReason, Stopped, WorkerMessage,
};
use lathe_trainer::train::{Event, Gang, Hooks, Outcome};
use lathe_trainer::TrainerError;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tonic::Streaming;

use crate::client::Client;
use crate::redact::Redactor;
use crate::spec::{train_config, Paths, Settings, Unrunnable};
use crate::telemetry::WorkerMetrics;
use crate::WorkerConfig;

/// Why the running trainer was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    Cancelled,
    Paused,
    /// SIGTERM: checkpoint, give the job back, exit.
    Preempted,
    /// The controller needs this worker for a higher-priority job: checkpoint, give the job
    /// back, claim again.
    Yielded,
    /// The controller says this attempt no longer holds the job.
    LeaseLost,
}

/// Shared between the async side (stream, heartbeat, signals) and the trainer's thread.
pub struct Signals {
    stop: AtomicBool,
    cause: Mutex<Option<StopCause>>,
    /// Past this instant the lease may have expired on the controller: stop as if it was lost
    /// (a worker cut off from the controller must not train on while another attempt starts).
    lease_deadline: Mutex<Instant>,
}

impl Signals {
    pub fn new(lease_deadline: Instant) -> Signals {
        Signals { stop: AtomicBool::new(false), cause: Mutex::new(None), lease_deadline: Mutex::new(lease_deadline) }
    }

    pub fn stop(&self, cause: StopCause) {
        let mut current = self.cause.lock().expect("signals lock");
        // A lost lease overrides anything: nothing may be sent after it.
        if current.is_none() || cause == StopCause::LeaseLost {
            *current = Some(cause);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Checkpoint, then stop (pause, preemption).
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst) && matches!(self.cause(), Some(StopCause::Paused | StopCause::Preempted | StopCause::Yielded))
    }

    /// Stop at once and write nothing (cancel, lost lease).
    pub fn should_abandon(&self) -> bool {
        self.stop.load(Ordering::SeqCst) && matches!(self.cause(), Some(StopCause::Cancelled | StopCause::LeaseLost))
    }

    pub fn cause(&self) -> Option<StopCause> {
        *self.cause.lock().expect("signals lock")
    }

    /// The heartbeat renewed the lease until `deadline` (already less a safety margin).
    pub fn renewed(&self, deadline: Instant) {
        let mut current = self.lease_deadline.lock().expect("signals lock");
        *current = (*current).max(deadline);
    }

    fn lease_overdue(&self) -> bool {
        Instant::now() > *self.lease_deadline.lock().expect("signals lock")
    }
}

/// How the attempt ended, for logs and the worker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    Failed,
    Crashed,
    Preempted,
    Cancelled,
    Paused,
    LeaseLost,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Succeeded => "succeeded",
            Ended::Failed => "failed",
            Ended::Crashed => "crashed",
            Ended::Preempted => "preempted",
            Ended::Cancelled => "cancelled",
            Ended::Paused => "paused",
            Ended::LeaseLost => "lease_lost",
        }
    }
}

const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The attempt's end waits for its acks as long as the lease is trusted (heartbeats renew it,
/// or report that the controller's database is down: an outage of any length ends in the ack);
/// this only bounds a controller that answers but never acks.
const FINAL_ACK_TIMEOUT: Duration = Duration::from_secs(3600);
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

pub async fn run(
    client: Client,
    config: &WorkerConfig,
    claim: ClaimJobResponse,
    signals: Arc<Signals>,
    telemetry: &WorkerMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Ended {
    let hello = Hello { job_id: claim.job_id.clone(), attempt: claim.attempt };
    // How many checkpoints the job keeps (a spec that does not parse fails the attempt later).
    let keep = serde_json::from_str::<JobSpec>(&claim.spec_json).map_or(lathe_core::spec::DEFAULT_KEEP_CHECKPOINTS, |s| s.keep_checkpoints);
    let mut session = Session::new(client, hello, PathBuf::from(&claim.output_dir), keep as usize);

    let redactor = Redactor::for_claim(&claim, config);
    let prepared = prepare(config, &claim);
    let Prepared { train, resume, decontamination, ranks, nodes } = match prepared {
        Ok(ready) => ready,
        Err(unrunnable) => {
            tracing::warn!(code = unrunnable.code, message = %unrunnable.message, "job cannot run here");
            // A problem of this machine (storage not mounted, model missing) is retried
            // elsewhere; a problem of the job itself fails it at once.
            let class = if unrunnable.this_worker { FailureClass::Crash } else { FailureClass::BadInput };
            let fail = Fail { class: class as i32, code: unrunnable.code.into(), message: redactor.apply(&unrunnable.message) };
            session.connect().await;
            session.push(Up::Fail(fail));
            session.drain(&signals).await;
            return if class == FailureClass::Crash { Ended::Crashed } else { Ended::Failed };
        }
    };
    session.connect().await;
    telemetry.busy.set(1);
    if let Some((message, data)) = decontamination {
        session.push(log(LogLevel::Info, message, data.to_string()));
    }

    if ranks > 1 {
        let spread = if nodes > 1 {
            format!("over {nodes} nodes of Slurm job {}", config.placement.slurm_job_id.as_deref().unwrap_or("?"))
        } else {
            "on this worker".into()
        };
        session.push(log(LogLevel::Info, format!("Data parallel: {ranks} ranks {spread} ({})", config.device), "{}".into()));
    }
    let (mut trainer, mut events) = start_trainer(train, resume, signals.clone(), ranks, nodes);

    let mut points = Points::default();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut tokens_seen = 0u64;
    let mut preempting = false;
    let result = loop {
        tokio::select! {
            Some(event) = events.recv() => {
                on_event(&event, &mut session, &mut points, &signals, telemetry, &mut tokens_seen);
            }
            _ = flush.tick() => {
                points.flush(&mut session);
                session.reconnect_if_needed().await;
                if signals.lease_overdue() && signals.cause() != Some(StopCause::LeaseLost) {
                    tracing::warn!("no lease renewal from the controller in time: stopping, the job may be reassigned");
                    signals.stop(StopCause::LeaseLost);
                }
            }
            down = session.next() => obey(down, &signals),
            changed = shutdown.changed(), if !preempting => {
                // A closed channel means the signal source is gone: treat it as a stop too.
                if changed.is_err() || *shutdown.borrow() {
                    preempting = true;
                    tracing::info!("SIGTERM: checkpointing and giving the job back");
                    signals.stop(StopCause::Preempted);
                }
            }
            result = &mut trainer => break result,
        }
    };
    // Everything the trainer reported before it returned is in the channel.
    while let Ok(event) = events.try_recv() {
        on_event(&event, &mut session, &mut points, &signals, telemetry, &mut tokens_seen);
    }
    points.flush(&mut session);

    let ended = report_end(result, signals.cause(), &mut session, tokens_seen, &redactor);
    if ended != Ended::LeaseLost {
        session.drain(&signals).await;
    }
    telemetry.attempt_ended(ended.as_str());
    ended
}

/// Tells the controller how the attempt ended (finish, stop, fail) and says what it was.
fn report_end(
    result: Result<lathe_trainer::Result<Outcome>, tokio::task::JoinError>,
    cause: Option<StopCause>,
    session: &mut Session,
    tokens_seen: u64,
    redactor: &Redactor,
) -> Ended {
    match (result, cause) {
        (_, Some(StopCause::LeaseLost)) => Ended::LeaseLost,
        (Ok(Ok(Outcome::Finished { adapter_dir, model_dir, .. })), _) => {
            let dir = adapter_dir.or(model_dir).unwrap_or_default();
            session.push(Up::Finish(Finish {
                trained_tokens: tokens_seen,
                adapter_path: dir.display().to_string(),
                result_files: result_files(&dir),
            }));
            Ended::Succeeded
        }
        (Ok(Ok(Outcome::Stopped { .. })), cause) | (Ok(Err(TrainerError::Stopped(_))), cause) => match cause {
            Some(StopCause::Cancelled) => {
                session.push(Up::Stopped(Stopped { reason: StopReason::Cancelled as i32 }));
                Ended::Cancelled
            }
            Some(StopCause::Paused) => {
                session.push(Up::Stopped(Stopped { reason: StopReason::Paused as i32 }));
                Ended::Paused
            }
            cause => {
                let message = if cause == Some(StopCause::Yielded) {
                    "the controller preempted the job for a higher-priority one; resuming from the last checkpoint"
                } else {
                    "the worker was asked to stop (SIGTERM); resuming from the last checkpoint"
                };
                session.push(Up::Fail(Fail { class: FailureClass::Preempted as i32, code: "preempted".into(), message: message.into() }));
                Ended::Preempted
            }
        },
        (Ok(Err(error)), _) => {
            let (class, code) = classify(&error);
            tracing::warn!(%error, ?class, "training failed");
            session.push(Up::Fail(Fail { class: class as i32, code: code.into(), message: redactor.apply(&error.to_string()) }));
            if class == FailureClass::BadInput {
                Ended::Failed
            } else {
                Ended::Crashed
            }
        }
        (Err(join_error), _) => {
            let message = redactor.apply(&format!("the trainer panicked: {join_error}"));
            tracing::error!(message, "training crashed");
            session.push(Up::Fail(Fail { class: FailureClass::Crash as i32, code: "trainer_crashed".into(), message }));
            Ended::Crashed
        }
    }
}

/// Runs the trainer on a blocking thread (inside the attempt's span); its events arrive on the
/// returned channel, and it polls `signals` between steps.
fn start_trainer(
    train: lathe_trainer::train::TrainConfig,
    resume: Option<PathBuf>,
    signals: Arc<Signals>,
    ranks: usize,
    nodes: usize,
) -> (tokio::task::JoinHandle<lathe_trainer::Result<Outcome>>, mpsc::UnboundedReceiver<Event>) {
    let (events_tx, events) = mpsc::unbounded_channel::<Event>();
    // The blocking thread does not inherit the task's span; the trainer's own logs should.
    let span = tracing::Span::current();
    let trainer = tokio::task::spawn_blocking(move || {
        let _in_attempt = span.enter();
        let mut on_event = |event: &Event| {
            let _ = events_tx.send(event.clone());
        };
        let should_stop = || signals.should_stop();
        let abandon = || signals.should_abandon();
        // Ranks 1.. are child processes; dropping `children` kills whatever is left of them, so
        // a failed attempt frees every rank.
        let mut train = train;
        if ranks > 1 && train.train.threads == 0 && std::env::var_os("OMP_NUM_THREADS").is_none() {
            train.train.threads = lathe_trainer::launch::threads_per_rank(ranks);
        }
        let (gang, children) = match ranks {
            1 => (Gang::single(), None),
            n => {
                let (gang, children) = start_ranks(&train, resume.as_deref(), n, nodes)?;
                (gang, Some(children))
            }
        };
        let outcome = lathe_trainer::train::run_in(
            &train,
            resume.as_deref(),
            Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &abandon },
            &gang,
        )?;
        if let Some(children) = children {
            match (children.wait(), &outcome) {
                // Rank 0 finished every collective, so the others trained every step with it.
                (Err(error), Outcome::Finished { .. }) => tracing::warn!(%error, "a rank failed after the run finished"),
                (result, _) => result?,
            }
        }
        Ok(outcome)
    });
    (trainer, events)
}

/// Ranks 1..n of a data-parallel attempt, as `lathe train` processes reading the same config
/// (written next to the outputs): children of this worker, or on `nodes` nodes of its Slurm
/// allocation through srun; joined into one gang with this thread as rank 0.
fn start_ranks(
    train: &lathe_trainer::train::TrainConfig,
    resume: Option<&Path>,
    ranks: usize,
    nodes: usize,
) -> lathe_trainer::Result<(Gang, lathe_trainer::launch::LocalRanks)> {
    let dir = &train.output_dir;
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    // The same device as rank 0 (cuda:i): each child takes the GPU its LOCAL_RANK further on
    // (launch::rank_device).
    let path = dir.join("rank-config.toml");
    train.write_toml_file(&path)?;
    let mut args = vec!["train".to_string(), path.display().to_string()];
    if let Some(checkpoint) = resume {
        args.extend(["--resume-from".to_string(), checkpoint.display().to_string()]);
    }
    // The very binary running this worker, even if an upgrade replaced the file since.
    let exe = PathBuf::from("/proc/self/exe");
    let mut children = match nodes {
        1 => lathe_trainer::launch::LocalRanks::spawn(&exe, &args, ranks)?,
        n => {
            // Another node runs it, so the path itself (/proc/self/exe would be slurmstepd there).
            let exe = std::env::current_exe().map_err(|e| TrainerError::io("/proc/self/exe", e))?;
            lathe_trainer::launch::LocalRanks::spawn_srun(&exe, &args, ranks / n, n, &dir.join("rank-hosts"))?
        }
    };
    let backend = lathe_trainer::launch::backend_for(&train.train.device, std::env::var("LATHE_DIST_BACKEND").ok().as_deref())?;
    let group = children.join(lathe_trainer::launch::Timeouts::default(), backend)?;
    Ok((Gang::of(group, backend), children))
}

struct Prepared {
    train: lathe_trainer::train::TrainConfig,
    resume: Option<PathBuf>,
    decontamination: Decontamination,
    /// Data-parallel ranks: the job's `gpus`.
    ranks: usize,
    /// Nodes they span: the job's `nodes`.
    nodes: usize,
}

/// What the decontamination step reports: an event message and its data.
type Decontamination = Option<(String, serde_json::Value)>;

/// Checks the claim's inputs and builds the trainer's configuration; also clears the output
/// directory of a fresh start (a previous attempt that died before its first checkpoint) and,
/// when the job asks, removes training examples that overlap evaluation sets.
fn prepare(config: &WorkerConfig, claim: &ClaimJobResponse) -> Result<Prepared, Unrunnable> {
    let spec: JobSpec = serde_json::from_str(&claim.spec_json)
        .map_err(|e| Unrunnable::job("invalid_spec", format!("the job spec is not readable by this worker: {e}")))?;
    let ranks = spec.resources.gpus.max(1) as usize;
    let nodes = spec.resources.nodes.max(1) as usize;
    if nodes > config.nodes || ranks > config.gpus * nodes {
        // The claim checks this; a worker restarted with fewer --gpus may still hold the lease.
        return Err(Unrunnable::here(
            "insufficient_gpus",
            format!("the job asks for {ranks} GPUs on {nodes} node(s); this worker offers {} per node on {}", config.gpus, config.nodes),
        ));
    }
    let training = claim.training_file.as_ref().ok_or_else(|| Unrunnable::job("invalid_spec", "the claim names no training file"))?;
    verify_file("training_file", &training.path, &training.sha256)?;
    if let Some(validation) = &claim.validation_file {
        verify_file("validation_file", &validation.path, &validation.sha256)?;
    }
    let output_dir = Path::new(&claim.output_dir);
    let resume = claim.resume_from.as_ref().map(|c| PathBuf::from(&c.path));
    if resume.is_none() && output_dir.exists() {
        std::fs::remove_dir_all(output_dir).map_err(|e| Unrunnable::here("storage_error", format!("{}: {e}", output_dir.display())))?;
    }
    let mut training_path = PathBuf::from(&training.path);
    let mut decontamination = None;
    if let Some(request) = &spec.decontaminate {
        let (path, event) = decontaminate(config, request, &training_path, output_dir)?;
        training_path = path;
        decontamination = Some(event);
    }
    let train = train_config(
        &spec,
        Paths { training_file: &training_path, validation_file: claim.validation_file.as_ref().map(|v| Path::new(&v.path)), output_dir },
        Settings {
            models_root: &config.models_root,
            device: &config.device,
            checkpoint_every: config.checkpoint_every,
            threads: config.threads,
            dtype: &config.dtype,
        },
    )?;
    Ok(Prepared { train, resume, decontamination, ranks, nodes })
}

/// Checks the training file against the job's evaluation sets; unless the job keeps them,
/// writes it without the overlapping examples into the job's directory and returns that path.
fn decontaminate(
    config: &WorkerConfig,
    request: &lathe_core::spec::Decontaminate,
    training: &Path,
    output_dir: &Path,
) -> Result<(PathBuf, (String, serde_json::Value)), Unrunnable> {
    use lathe_eval::contamination::{check_file, write_filtered, Reason};
    let dir = config.eval_data_dir.as_ref().ok_or_else(|| {
        Unrunnable::here("eval_data_missing", "the job asks for decontamination but this worker has no --eval-data-dir (CTIBench)")
    })?;
    // Names were checked at job create; what can fail here is this worker's copy of the data.
    let items =
        lathe_eval::ctibench::load_all(&request.benchmarks, dir).map_err(|e| Unrunnable::here("eval_data_missing", e.to_string()))?;
    let report = check_file(training, &items).map_err(|e| Unrunnable::job("invalid_training_file", e.to_string()))?;
    let flagged = report.overlaps.len();
    let dropped = !request.keep && flagged > 0;
    let path = if dropped {
        std::fs::create_dir_all(output_dir).map_err(|e| Unrunnable::here("storage_error", format!("{}: {e}", output_dir.display())))?;
        let out = output_dir.join("train.decontaminated.jsonl");
        write_filtered(training, &report, &out).map_err(|e| Unrunnable::here("storage_error", e.to_string()))?;
        out
    } else {
        training.to_path_buf()
    };
    let message = format!(
        "Decontamination against {}: {flagged} of {} training examples overlap (description {}, CVE id {}, n-gram {}), covering {} of {} evaluation items; {}",
        lathe_core::Benchmark::names(&request.benchmarks),
        report.training_rows,
        report.count(Reason::Description),
        report.count(Reason::CveId),
        report.count(Reason::Ngram),
        report.items_covered,
        report.items,
        if dropped { "dropped" } else if flagged > 0 { "kept (keep: true)" } else { "nothing to drop" },
    );
    let data = serde_json::json!({
        "benchmarks": request.benchmarks, "training_examples": report.training_rows, "overlapping": flagged,
        "by_description": report.count(Reason::Description), "by_cve_id": report.count(Reason::CveId),
        "by_ngram": report.count(Reason::Ngram), "items_covered": report.items_covered, "dropped": dropped,
    });
    Ok((path, (message, data)))
}

pub(crate) fn verify_file(param: &str, path: &str, sha256: &str) -> Result<(), Unrunnable> {
    let bytes =
        std::fs::read(path).map_err(|e| Unrunnable::here("file_not_found", format!("{param}: cannot read {path} on this worker: {e}")))?;
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    if !sha256.is_empty() && digest != sha256 {
        return Err(Unrunnable::here("file_corrupted", format!("{param}: {path} does not match its SHA-256 on record")));
    }
    Ok(())
}

fn classify(error: &TrainerError) -> (FailureClass, &'static str) {
    // Not the job's fault: it goes back to the queue for free once the storage is fixed.
    if let Some(code) = error.storage_fault() {
        return (FailureClass::Infrastructure, code);
    }
    match error {
        TrainerError::DataLine { .. } => (FailureClass::BadInput, "invalid_training_file"),
        TrainerError::File { .. } | TrainerError::ConfigField { .. } => (FailureClass::BadInput, "invalid_input"),
        TrainerError::InvalidSetting { .. } => (FailureClass::BadInput, "invalid_hyperparameters"),
        TrainerError::ChatTemplate(_) | TrainerError::Tokenizer(_) => (FailureClass::BadInput, "invalid_model"),
        TrainerError::Io { .. } | TrainerError::Torch(_) | TrainerError::Stopped(_) => (FailureClass::Crash, "trainer_error"),
        TrainerError::Storage { .. } => (FailureClass::Infrastructure, "storage_error"),
        // A rank died or hung: the attempt is retried from the last checkpoint.
        TrainerError::Distributed(_) => (FailureClass::Crash, "rank_failed"),
    }
}

/// The files of the adapter (or full model) directory, published as the job's result files.
fn result_files(dir: &Path) -> Vec<ResultFile> {
    let mut files: Vec<ResultFile> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            Some(ResultFile { filename: name, path: e.path().display().to_string() })
        })
        .collect();
    files.sort_by(|a, b| a.filename.cmp(&b.filename));
    files
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn on_event(
    event: &Event,
    session: &mut Session,
    points: &mut Points,
    signals: &Signals,
    telemetry: &WorkerMetrics,
    tokens_seen: &mut u64,
) {
    if signals.cause() == Some(StopCause::LeaseLost) {
        return;
    }
    match event {
        Event::Started { total_steps, start_step, train_examples, trainable_parameters, device, dtype, .. } => {
            let message = if *start_step > 0 {
                format!("Training resumed at step {start_step} of {total_steps} on {device} ({dtype})")
            } else {
                format!("Training started: {total_steps} steps, {train_examples} examples, {trainable_parameters} trainable parameters on {device} ({dtype})")
            };
            session.push(log(LogLevel::Info, message, serde_json::to_string(event).unwrap_or_default()));
        }
        Event::Step(m) => {
            *tokens_seen = m.tokens_seen;
            telemetry.step.set(m.step as i64);
            telemetry.train_loss.set(m.loss);
            telemetry.tokens_per_second.set(m.tokens_per_second);
            telemetry.memory_bytes.set(m.peak_memory_bytes as i64);
            if !m.rank_step_seconds.is_empty() {
                telemetry.ranks(&m.rank_step_seconds, m.all_reduce_seconds);
            }
            if let Some(p) = &m.preference {
                telemetry.preference(p.rewards_margin, p.rewards_accuracy);
            }
            points.pending.insert(
                m.step,
                MetricPoint {
                    step: m.step,
                    total_steps: m.total_steps,
                    train_loss: Some(m.loss),
                    valid_loss: None,
                    learning_rate: m.lr,
                    grad_norm: Some(m.grad_norm),
                    tokens_per_second: Some(m.tokens_per_second),
                    tokens_seen: m.tokens_seen,
                    train_mean_token_accuracy: Some(m.train_mean_token_accuracy),
                    valid_mean_token_accuracy: None,
                    memory_bytes: Some(m.peak_memory_bytes),
                    time_unix_ms: now_ms(),
                    rewards_chosen: m.preference.map(|p| p.rewards_chosen),
                    rewards_rejected: m.preference.map(|p| p.rewards_rejected),
                    rewards_accuracy: m.preference.map(|p| p.rewards_accuracy),
                    rewards_margin: m.preference.map(|p| p.rewards_margin),
                },
            );
        }
        Event::Eval { step, valid_loss, valid_mean_token_accuracy, .. } => {
            telemetry.valid_loss.set(*valid_loss);
            let mut point = points.take(*step);
            point.valid_loss = Some(*valid_loss);
            point.valid_mean_token_accuracy = Some(*valid_mean_token_accuracy);
            points.pending.insert(*step, point);
        }
        Event::Checkpoint { step, path } => {
            // A cancelled job keeps no checkpoint; anything else commits it (pause and
            // preemption resume from it).
            if signals.cause() == Some(StopCause::Cancelled) {
                return;
            }
            points.flush(session);
            let metrics = points.get(*step).map(|p| {
                serde_json::json!({
                    "step": p.step, "train_loss": p.train_loss, "valid_loss": p.valid_loss,
                    "train_mean_token_accuracy": p.train_mean_token_accuracy,
                    "valid_mean_token_accuracy": p.valid_mean_token_accuracy,
                })
            });
            let seq = session.push(Up::Checkpoint(CheckpointCommit {
                step: *step,
                path: path.clone(),
                metrics_json: metrics.map(|m| m.to_string()).unwrap_or_else(|| "{}".into()),
            }));
            session.commits.push((seq, *step));
        }
        Event::Log { level, message } => {
            let level = if level == "warn" { LogLevel::Warn } else { LogLevel::Info };
            session.push(log(level, message.clone(), String::new()));
        }
        Event::Finished { .. } => {}
    }
}

fn log(level: LogLevel, message: String, data_json: String) -> Up {
    Up::Log(LogEvent { level: level as i32, message, data_json, time_unix_ms: now_ms() })
}

fn obey(down: Option<Down>, signals: &Signals) {
    match down {
        Some(Down::Cancel(_)) => signals.stop(StopCause::Cancelled),
        Some(Down::Pause(_)) => signals.stop(StopCause::Paused),
        Some(Down::Preempt(preempt)) => {
            tracing::info!(for_job_id = preempt.for_job_id, "preempted by the controller: checkpointing and giving the job back");
            signals.stop(StopCause::Yielded)
        }
        Some(Down::LeaseLost(lost)) => {
            tracing::warn!(reason = lost.reason, "lease lost: stopping at once");
            signals.stop(StopCause::LeaseLost)
        }
        Some(Down::Ack(_)) | None => {}
    }
}

/// Metric points not yet sent, and the last few sent (an eval result can arrive for a step
/// whose point already went out: the point is sent again, complete).
#[derive(Default)]
struct Points {
    pending: BTreeMap<u64, MetricPoint>,
    sent: BTreeMap<u64, MetricPoint>,
}

impl Points {
    fn take(&mut self, step: u64) -> MetricPoint {
        self.pending.remove(&step).or_else(|| self.sent.get(&step).cloned()).unwrap_or(MetricPoint {
            step,
            time_unix_ms: now_ms(),
            ..Default::default()
        })
    }

    fn get(&self, step: u64) -> Option<&MetricPoint> {
        self.pending.get(&step).or_else(|| self.sent.get(&step))
    }

    fn flush(&mut self, session: &mut Session) {
        if self.pending.is_empty() {
            return;
        }
        let batch: Vec<MetricPoint> = std::mem::take(&mut self.pending).into_values().collect();
        for p in &batch {
            self.sent.insert(p.step, *p);
        }
        while self.sent.len() > 64 {
            self.sent.pop_first();
        }
        session.push(Up::Metrics(MetricsBatch { points: batch }));
    }
}

/// Once the controller has committed the checkpoint of `step`, removes the checkpoints older
/// than it that are not among the newest `keep`: a next attempt resumes from `step` (or a
/// newer one), and the API lists and serves only the newest `keep` as models.
fn prune_checkpoints(output_dir: &Path, step: u64, keep: usize) {
    let committed = lathe_trainer::checkpoint::checkpoint_dir_name(step);
    let Ok(entries) = std::fs::read_dir(output_dir.join("checkpoints")) else { return };
    // Names are zero-padded (`step-000020`), so text order is step order.
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("step-") && name.len() == committed.len())
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    for name in names.iter().skip(keep.max(1)).filter(|name| **name < committed) {
        let path = output_dir.join("checkpoints").join(name);
        if let Err(error) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), %error, "could not prune a checkpoint");
        }
    }
}

/// The attempt's stream, its outbox of unacked messages, and reconnection.
struct Session {
    client: Client,
    hello: Hello,
    output_dir: PathBuf,
    /// The job's `keep_checkpoints`.
    keep: usize,
    /// Checkpoint commits sent and not yet acked: (seq, step).
    commits: Vec<(u64, u64)>,
    next_seq: u64,
    unacked: VecDeque<WorkerMessage>,
    acked: u64,
    link: Option<Link>,
    last_connect: Option<Instant>,
}

struct Link {
    tx: mpsc::UnboundedSender<WorkerMessage>,
    inbound: Streaming<ControllerMessage>,
}

impl Session {
    fn new(client: Client, hello: Hello, output_dir: PathBuf, keep: usize) -> Session {
        Session {
            client,
            hello,
            output_dir,
            keep,
            commits: Vec::new(),
            next_seq: 1,
            unacked: VecDeque::new(),
            acked: 0,
            link: None,
            last_connect: None,
        }
    }

    fn push(&mut self, body: Up) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = WorkerMessage { seq, body: Some(body) };
        if let Some(link) = &self.link {
            if link.tx.send(message.clone()).is_err() {
                self.link = None;
            }
        }
        self.unacked.push_back(message);
        seq
    }

    /// Opens a stream: Hello, then every unacked message again.
    async fn connect(&mut self) {
        self.last_connect = Some(Instant::now());
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(WorkerMessage { seq: 0, body: Some(Up::Hello(self.hello.clone())) });
        match self.client.attempt(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await {
            Ok(response) => {
                for message in &self.unacked {
                    let _ = tx.send(message.clone());
                }
                self.link = Some(Link { tx, inbound: response.into_inner() });
            }
            Err(status) => {
                tracing::warn!(%status, "attempt stream unavailable; retrying");
                self.link = None;
            }
        }
    }

    async fn reconnect_if_needed(&mut self) {
        if self.link.is_none() && self.last_connect.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY) {
            self.connect().await;
        }
    }

    /// The next instruction from the controller; acks are applied here. Pending forever while
    /// disconnected (the flush tick reconnects).
    async fn next(&mut self) -> Option<Down> {
        let Some(link) = &mut self.link else {
            return std::future::pending().await;
        };
        match link.inbound.message().await {
            Ok(Some(ControllerMessage { body: Some(Down::Ack(ack)) })) => {
                self.acked = self.acked.max(ack.seq);
                while self.unacked.front().is_some_and(|m| m.seq <= ack.seq) {
                    self.unacked.pop_front();
                }
                let committed = self.commits.iter().filter(|(seq, _)| *seq <= ack.seq).map(|(_, step)| *step).max();
                self.commits.retain(|(seq, _)| *seq > ack.seq);
                if let Some(step) = committed {
                    prune_checkpoints(&self.output_dir, step, self.keep);
                }
                None
            }
            Ok(Some(message)) => message.body,
            Ok(None) | Err(_) => {
                self.link = None;
                None
            }
        }
    }

    /// Waits until every message is acked (or the lease is lost, or is no longer trusted — the
    /// controller stayed away: then the lease expires and the reconciler takes over).
    async fn drain(&mut self, signals: &Signals) {
        let deadline = Instant::now() + FINAL_ACK_TIMEOUT;
        while !self.unacked.is_empty() && Instant::now() < deadline {
            if signals.lease_overdue() {
                tracing::warn!("no lease renewal from the controller in time: giving the attempt up");
                signals.stop(StopCause::LeaseLost);
                return;
            }
            self.reconnect_if_needed().await;
            match tokio::time::timeout(RECONNECT_EVERY, self.next()).await {
                Ok(Some(Down::LeaseLost(_))) => {
                    signals.stop(StopCause::LeaseLost);
                    return;
                }
                Ok(_) => {}
                Err(_) => {}
            }
        }
        if !self.unacked.is_empty() {
            tracing::warn!(unacked = self.unacked.len(), "controller did not ack the attempt's end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_checkpoints_and_never_one_not_yet_committed() {
        let dir = tempfile::tempdir().unwrap();
        let step_dir = |step: u64| dir.path().join("checkpoints").join(lathe_trainer::checkpoint::checkpoint_dir_name(step));
        for step in [10, 20, 30, 40, 50] {
            std::fs::create_dir_all(step_dir(step)).unwrap();
        }
        // 50 is written but not acked: 30 is the committed one.
        prune_checkpoints(dir.path(), 30, 2);
        let left: Vec<bool> = [10, 20, 30, 40, 50].iter().map(|&s| step_dir(s).is_dir()).collect();
        assert_eq!(left, [false, false, true, true, true]);
        prune_checkpoints(dir.path(), 50, 2);
        let left: Vec<bool> = [30, 40, 50].iter().map(|&s| step_dir(s).is_dir()).collect();
        assert_eq!(left, [false, true, true]);
    }
}
