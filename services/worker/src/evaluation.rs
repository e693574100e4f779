//! One evaluation attempt: load the items (CTIBench from `--eval-data-dir`, or the user's file
//! from shared storage), the base model and, for a fine-tuned model, its adapter; run
//! `lathe_trainer::evaluate` on a blocking thread; report every item and the score in one
//! fenced `FinishEvaluation`, or why it failed.
//!
//! Progress and the lease ride on the daemon's heartbeat ([`EvalSignals`]); a lost lease or a
//! cancel stops the run between batches, SIGTERM gives the evaluation back to the queue.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lathe_core::evaluation::EvaluationMode;
use lathe_core::EvaluationSpec;
use lathe_eval::Item;
use lathe_proto::v1::{ClaimEvaluationResponse, EvaluationItem, FailEvaluationRequest, FailureClass, FinishEvaluationRequest, ResultFile};
use lathe_trainer::evaluate::{EvalRequest, EvalResult, Mode, Protocol};
use lathe_trainer::TrainerError;
use serde_json::json;
use tokio::sync::watch;
use tonic::Code;

use crate::attempt::verify_file;
use crate::client::Client;
use crate::spec::{model_dir, Unrunnable};
use crate::WorkerConfig;

/// Items per forward pass.
const BATCH_SIZE: usize = 8;
/// How long a final report is retried while the controller is unreachable.
const REPORT_PATIENCE: Duration = Duration::from_secs(120);

/// Shared between the heartbeat (progress out, stop in) and the evaluating thread.
#[derive(Default)]
pub struct EvalSignals {
    stop: AtomicBool,
    done: AtomicU32,
    total: AtomicU32,
}

impl EvalSignals {
    /// Cancelled or lease lost: stop and report nothing.
    pub fn abandon(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn progress(&self) -> (u32, u32) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}

/// Runs the claimed evaluation to its end; returns how it ended, for the log.
pub async fn run(
    mut client: Client,
    config: &WorkerConfig,
    claim: ClaimEvaluationResponse,
    signals: Arc<EvalSignals>,
    mut shutdown: watch::Receiver<bool>,
) -> &'static str {
    let prepared = match prepare(config, &claim) {
        Ok(prepared) => prepared,
        Err(unrunnable) => {
            tracing::warn!(code = unrunnable.code, message = %unrunnable.message, "evaluation cannot run here");
            let class = if unrunnable.this_worker { FailureClass::Crash } else { FailureClass::BadInput };
            report_failure(&mut client, &claim, class, unrunnable.code, unrunnable.message).await;
            return "failed";
        }
    };

    let (threads, device) = (config.threads, config.device.clone());
    let thread_signals = signals.clone();
    let span = tracing::Span::current();
    let mut evaluating = tokio::task::spawn_blocking(move || span.in_scope(|| evaluate(prepared, threads, &device, &thread_signals)));
    let result = loop {
        tokio::select! {
            result = &mut evaluating => break result,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!("SIGTERM: giving the evaluation back");
                    signals.abandon();
                    // Wait for the thread to see it (between two batches).
                    let _ = (&mut evaluating).await;
                    report_failure(&mut client, &claim, FailureClass::Preempted, "preempted", "the worker was asked to stop (SIGTERM)".into()).await;
                    return "preempted";
                }
            }
        }
    };
    match result {
        Ok(Ok(result)) => {
            let request = finish_request(&claim, &result);
            let accuracy = result.result.accuracy;
            match with_patience(|| {
                let mut client = client.clone();
                let request = request.clone();
                async move { client.finish_evaluation(request).await.map(|_| ()) }
            })
            .await
            {
                Ok(()) => {
                    tracing::info!(accuracy, items = result.result.predictions.len(), "evaluation finished");
                    "succeeded"
                }
                Err(status) if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) => {
                    tracing::warn!(%status, "the controller refused the result (cancelled or reassigned)");
                    "abandoned"
                }
                Err(status) => {
                    // Refused for another reason (too large, unreadable): say why instead of
                    // letting the lease expire and the evaluation be retried for nothing.
                    tracing::warn!(%status, "the controller could not store the result");
                    let class = if matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument) {
                        FailureClass::BadInput
                    } else {
                        FailureClass::Crash
                    };
                    report_failure(
                        &mut client,
                        &claim,
                        class,
                        "result_not_stored",
                        format!("the result could not be stored: {}", status.message()),
                    )
                    .await;
                    "failed"
                }
            }
        }
        Ok(Err(TrainerError::Stopped(_))) => {
            tracing::info!("evaluation stopped (cancelled or lease lost)");
            "abandoned"
        }
        Ok(Err(error)) => {
            let class = match &error {
                TrainerError::Io { .. } | TrainerError::Torch(_) => FailureClass::Crash,
                _ => FailureClass::BadInput,
            };
            tracing::warn!(%error, "evaluation failed");
            report_failure(&mut client, &claim, class, "evaluation_error", error.to_string()).await;
            "failed"
        }
        Err(join_error) => {
            report_failure(&mut client, &claim, FailureClass::Crash, "evaluator_crashed", format!("the evaluator panicked: {join_error}"))
                .await;
            "crashed"
        }
    }
}

/// What the blocking thread needs.
struct Prepared {
    model_dir: PathBuf,
    adapter: Option<AdapterDir>,
    items: Vec<Item>,
    protocol: Protocol,
}

/// The adapter's files linked under their PEFT names in a private directory, removed on drop.
pub(crate) struct AdapterDir(pub PathBuf);

impl Drop for AdapterDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Links a fine-tuned model's adapter files (on shared storage) into `dir` under the names
/// PEFT expects, for loading.
pub(crate) fn link_adapter(dir: PathBuf, files: &[ResultFile]) -> Result<AdapterDir, Unrunnable> {
    let link = || -> std::io::Result<AdapterDir> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let adapter = AdapterDir(dir.clone());
        for file in files {
            let name = Path::new(&file.filename).file_name().unwrap_or_default();
            std::os::unix::fs::symlink(&file.path, dir.join(name))?;
        }
        Ok(adapter)
    };
    link().map_err(|e| Unrunnable::here("storage_error", format!("{}: {e}", dir.display())))
}

fn prepare(config: &WorkerConfig, claim: &ClaimEvaluationResponse) -> Result<Prepared, Unrunnable> {
    let spec: EvaluationSpec = serde_json::from_str(&claim.spec_json)
        .map_err(|e| Unrunnable::job("invalid_spec", format!("the evaluation spec is not readable by this worker: {e}")))?;
    let (benchmark, rule) = (spec.benchmark, spec.extraction);
    let items = match &claim.file {
        Some(file) => {
            verify_file("file", &file.path, &file.sha256)?;
            lathe_eval::chat_file::load(Path::new(&file.path)).map_err(|e| {
                Unrunnable::job("invalid_file", format!("file {}: {}", file.file_id, without_dir(&e.to_string(), &file.path)))
            })?
        }
        None => {
            let dir = config.eval_data_dir.as_ref().ok_or_else(|| {
                Unrunnable::here("evaluation_data_unavailable", "this worker has no --eval-data-dir (the CTIBench data directory)")
            })?;
            lathe_eval::ctibench::load(benchmark, dir).map_err(|e| match e {
                lathe_eval::EvalError::Row { .. } | lathe_eval::EvalError::File { .. } if dir.is_dir() => {
                    Unrunnable::job("invalid_benchmark_data", e.to_string())
                }
                other => Unrunnable::here("evaluation_data_unavailable", other.to_string()),
            })?
        }
    };
    let base_model = lathe_core::ModelName::parse(&claim.base_model).map_err(|e| Unrunnable::job("invalid_spec", e))?;
    let model_dir = model_dir(&config.models_root, &base_model)?;
    let adapter = if claim.adapter_files.is_empty() {
        None
    } else {
        let dir = std::env::temp_dir().join(format!("lathe-{}-{}", claim.evaluation_id, claim.attempt));
        Some(link_adapter(dir, &claim.adapter_files)?)
    };
    let mode = match spec.mode {
        EvaluationMode::Generate => Mode::Generate,
        EvaluationMode::Likelihood => Mode::Likelihood,
    };
    let protocol = Protocol {
        benchmark,
        mode,
        system_prompt: spec.system_prompt.clone(),
        shots: spec.shots as usize,
        seed: spec.seed,
        limit: spec.limit.map(|l| l as usize),
        max_new_tokens: spec.max_new_tokens as usize,
        decoding: if mode == Mode::Generate { "greedy" } else { "likelihood" },
        rule,
        unparsable_counts_as_wrong: spec.unparsable_counts_as_wrong,
    };
    Ok(Prepared { model_dir, adapter, items, protocol })
}

/// A storage path in an error message, reduced to what the user knows (the file id).
fn without_dir(message: &str, path: &str) -> String {
    message.replace(&format!("{path}:"), "line ").replace(path, "the file")
}

fn evaluate(prepared: Prepared, threads: usize, device: &str, signals: &EvalSignals) -> Result<EvalResult, TrainerError> {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let device = lathe_trainer::device::parse_device(device)?;
    let kind = lathe_trainer::device::resolve_dtype("auto", device)?;
    let adapter = prepared.adapter.as_ref().map(|a| a.0.clone());
    let decoder = lathe_trainer::models::load_for_inference(&prepared.model_dir, adapter.as_deref(), kind, device)?;
    let mut progress = |done: usize, all: usize| {
        signals.done.store(done as u32, Ordering::Relaxed);
        signals.total.store(all as u32, Ordering::Relaxed);
        !signals.stop.load(Ordering::SeqCst)
    };
    lathe_trainer::evaluate::run(EvalRequest {
        decoder: &decoder,
        model_dir: &prepared.model_dir,
        adapter,
        items: &prepared.items,
        protocol: prepared.protocol,
        batch_size: BATCH_SIZE,
        progress: &mut progress,
    })
}

fn finish_request(claim: &ClaimEvaluationResponse, result: &EvalResult) -> FinishEvaluationRequest {
    let scored = &result.result;
    let summary = json!({
        "accuracy": scored.accuracy,
        "ci95": [scored.ci95.0, scored.ci95.1],
        "correct": scored.correct,
        "items": scored.items,
        "evaluated": scored.predictions.len(),
        "unparsable": scored.unparsable,
        "unparsable_counts_as_wrong": scored.unparsable_counts_as_wrong,
        "rule": scored.rule,
        "items_per_second": result.items_per_second,
        "generated_tokens": result.generated_tokens,
        // Whether a fine-tuned adapter was applied over the base model.
        "adapter": result.adapter.is_some(),
    });
    FinishEvaluationRequest {
        evaluation_id: claim.evaluation_id.clone(),
        attempt: claim.attempt,
        result_json: summary.to_string(),
        items: scored
            .predictions
            .iter()
            .map(|p| EvaluationItem {
                index: p.index as u32,
                expected: p.expected.clone(),
                extracted: p.extracted.clone(),
                correct: p.correct,
                output: p.output.clone(),
            })
            .collect(),
    }
}

async fn report_failure(client: &mut Client, claim: &ClaimEvaluationResponse, class: FailureClass, code: &str, message: String) {
    let request = FailEvaluationRequest {
        evaluation_id: claim.evaluation_id.clone(),
        attempt: claim.attempt,
        class: class as i32,
        code: code.into(),
        message,
    };
    let sent = with_patience(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.fail_evaluation(request).await.map(|_| ()) }
    })
    .await;
    if let Err(status) = sent {
        tracing::warn!(%status, "could not report the failure; the lease will expire");
    }
}

/// Retries `call` while the controller is unavailable (restarting, Postgres down), for up to
/// [`REPORT_PATIENCE`]; any other answer is final.
async fn with_patience<F, Fut>(mut call: F) -> Result<(), tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown) && started.elapsed() < REPORT_PATIENCE => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}
