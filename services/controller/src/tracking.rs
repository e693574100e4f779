//! Runs in MLflow: the controller (never the worker, so training never waits for a tracker)
//! logs each job that asked for it (`integrations: [{"type": "mlflow", …}]`) to the tracking
//! server the operator configured (`--mlflow-tracking-uri`): one run per job with its
//! hyperparameters as params, every metric point with its step, the result files as artifacts
//! and the end status. Progress is kept in Postgres (`lathe_store::tracking`), so while MLflow
//! is down the exporter backs off and retries, and once it is back it logs every step it missed.
//! Several replicas share the work through leases on those rows.

use std::time::Duration;

use lathe_core::JobStatus;
use lathe_store::dispatch::MetricPoint;
use lathe_store::jobs::Job;
use lathe_store::time::OffsetDateTime;
use lathe_store::tracking::{claim_exports, save_export, Export};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::AppState;

/// How often the exporter looks for work.
const PASS_EVERY: Duration = Duration::from_secs(2);
/// A claimed export is left alone by other replicas this long.
const LEASE: Duration = Duration::from_secs(120);
/// Points logged per request (MLflow takes at most 1,000 metrics in one `log-batch`).
const POINTS_PER_BATCH: i64 = 80;
/// The longest wait between tries while MLflow fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("MLflow at {0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("MLflow answered {0} to {1}: {2}")]
    Refused(u16, String, String),
    #[error("{0}")]
    Store(#[from] lathe_store::StoreError),
    #[error("reading a result file: {0}")]
    Io(#[from] std::io::Error),
}

/// Exports until `stop`; does nothing when no tracking server is configured.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let Some(uri) = state.config.mlflow_tracking_uri.clone() else { return };
    let mlflow = Mlflow::new(&uri);
    match lathe_store::tracking::add_missing_exports(&state.pool).await {
        Ok(0) => {}
        Ok(added) => tracing::info!(added, "MLflow exports recovered for jobs created without one"),
        Err(error) => tracing::warn!(%error, "could not look for MLflow exports to recover"),
    }
    let mut tick = tokio::time::interval(PASS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let exports = match claim_exports(&state.pool, 8, LEASE).await {
            Ok(exports) => exports,
            Err(error) => {
                tracing::warn!(%error, "cannot claim MLflow exports");
                continue;
            }
        };
        for mut export in exports {
            let outcome = export_job(&state, &mlflow, &mut export).await;
            let retry = match &outcome {
                Ok(()) => {
                    export.failures = 0;
                    None
                }
                Err(error) => {
                    export.failures += 1;
                    let wait = Duration::from_secs(1 << export.failures.clamp(1, 6)).min(MAX_BACKOFF);
                    tracing::warn!(job_id = export.job_id, %error, retry_in_seconds = wait.as_secs(), "MLflow export failed; will retry");
                    Some((OffsetDateTime::now_utc() + wait, error.to_string()))
                }
            };
            if let Err(error) = save_export(&state.pool, &export, retry.as_ref().map(|(at, e)| (*at, e.as_str()))).await {
                tracing::warn!(job_id = export.job_id, %error, "cannot save MLflow export progress");
            }
        }
    }
}

/// Brings one job's run up to date: creates it, logs the params, the new metric points, and
/// once the job has ended its artifacts and status. Progress is saved as it goes.
async fn export_job(state: &AppState, mlflow: &Mlflow, export: &mut Export) -> Result<(), TrackingError> {
    let job_id = lathe_core::JobId::parse(&export.job_id).map_err(|e| TrackingError::Refused(0, "job id".into(), e.to_string()))?;
    let job = lathe_store::jobs::get_job_unscoped(&state.pool, &job_id).await?;
    if export.run_id.is_none() {
        let experiment_id = mlflow.experiment_id(&export.experiment).await?;
        let (run_id, artifact_uri) = mlflow.create_run(&experiment_id, export, &job).await?;
        (export.experiment_id, export.run_id, export.artifact_uri) = (Some(experiment_id), Some(run_id), Some(artifact_uri));
        save_export(&state.pool, export, None).await?;
    }
    let run_id = export.run_id.clone().unwrap_or_default();
    if !export.params_logged {
        mlflow.log_batch(&run_id, Vec::new(), params(&job)).await?;
        export.params_logged = true;
    }
    let ended = matches!(job.status, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled);
    loop {
        let page = lathe_store::progress::list_metrics_page(
            &state.pool,
            &job.project_id,
            &job_id,
            Some(export.logged_step),
            Some(POINTS_PER_BATCH),
        )
        .await?;
        // While the job runs, its newest points may still gain a validation loss: wait for them.
        let points: Vec<&MetricPoint> = page.items.iter().filter(|p| ended || p.step + 2 <= newest_step(&page.items)).collect();
        let Some(last) = points.last().map(|p| p.step) else { break };
        mlflow.log_batch(&run_id, points.iter().flat_map(|p| metrics(p)).collect(), Vec::new()).await?;
        export.logged_step = last;
        save_export(&state.pool, export, None).await?;
        if !page.has_more {
            break;
        }
    }
    if ended {
        if job.status == JobStatus::Succeeded {
            for file_id in &job.result_files {
                let Ok(id) = lathe_core::FileId::parse(file_id) else { continue };
                let Ok(file) = lathe_store::files::get_file(&state.pool, &job.project_id, &id).await else { continue };
                let bytes = tokio::fs::read(state.storage.file_path(file_id)).await?;
                mlflow.upload_artifact(export.artifact_uri.as_deref().unwrap_or_default(), &file.filename, bytes).await?;
            }
        }
        let status = match job.status {
            JobStatus::Succeeded => "FINISHED",
            JobStatus::Failed => "FAILED",
            _ => "KILLED",
        };
        let end = job.finished_at.unwrap_or_else(OffsetDateTime::now_utc);
        mlflow.finish_run(&run_id, status, millis(end)).await?;
        export.finished = true;
        tracing::info!(job_id = export.job_id, run_id, status, "MLflow run complete");
    }
    Ok(())
}

fn newest_step(points: &[MetricPoint]) -> i64 {
    points.iter().map(|p| p.step).max().unwrap_or(0)
}

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The job's settings as MLflow params (strings, as MLflow keeps them).
fn params(job: &Job) -> Vec<(String, String)> {
    let spec = &job.spec;
    let h = &spec.hyperparameters;
    let mut params = vec![
        ("job_id", job.id.to_string()),
        ("model", spec.model.to_string()),
        ("method", spec.method.as_str().to_string()),
        ("n_epochs", h.n_epochs.to_string()),
        ("batch_size", h.batch_size.to_string()),
        ("learning_rate", spec.learning_rate.to_string()),
        ("lr_scheduler", format!("{:?}", spec.lr_scheduler).to_lowercase()),
        ("warmup_ratio", spec.warmup_ratio.to_string()),
        ("max_seq_length", spec.max_seq_length.to_string()),
        ("packing", spec.packing.to_string()),
        ("seed", spec.seed.to_string()),
        ("training_file", spec.training_file.to_string()),
    ];
    if let Some(beta) = h.beta {
        params.push(("beta", beta.to_string()));
    }
    if let Some(lora) = &spec.lora {
        params.extend([
            ("lora_rank", lora.rank.to_string()),
            ("lora_alpha", lora.alpha.to_string()),
            ("lora_dropout", lora.dropout.to_string()),
        ]);
    }
    if let Some(quantization) = spec.quantization {
        params.push(("quantization", format!("{quantization:?}").to_lowercase()));
    }
    if let Some(validation) = &spec.validation_file {
        params.push(("validation_file", validation.to_string()));
    }
    params.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// One point's metrics, each at its step.
fn metrics(point: &MetricPoint) -> Vec<Value> {
    let now = millis(OffsetDateTime::now_utc());
    let values = [
        ("train_loss", point.train_loss.map(f64::from)),
        ("valid_loss", point.valid_loss.map(f64::from)),
        ("train_mean_token_accuracy", point.train_mean_token_accuracy.map(f64::from)),
        ("valid_mean_token_accuracy", point.valid_mean_token_accuracy.map(f64::from)),
        ("learning_rate", point.learning_rate),
        ("grad_norm", point.grad_norm.map(f64::from)),
        ("tokens_per_second", point.tokens_per_second.map(f64::from)),
        ("rewards_chosen", point.rewards_chosen.map(f64::from)),
        ("rewards_rejected", point.rewards_rejected.map(f64::from)),
        ("rewards_accuracy", point.rewards_accuracy.map(f64::from)),
        ("rewards_margin", point.rewards_margin.map(f64::from)),
    ];
    values
        .into_iter()
        .filter_map(|(key, value)| {
            value.filter(|v| v.is_finite()).map(|v| json!({"key": key, "value": v, "timestamp": now, "step": point.step}))
        })
        .collect()
}

/// MLflow's REST API (`/api/2.0/mlflow`), the calls the exporter makes.
struct Mlflow {
    http: reqwest::Client,
    base: String,
}

impl Mlflow {
    fn new(uri: &str) -> Mlflow {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("an HTTP client builds");
        Mlflow { http, base: uri.trim_end_matches('/').to_string() }
    }

    async fn call(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Value, TrackingError> {
        let response = request.send().await.map_err(|e| TrackingError::Unreachable(self.base.clone(), e.to_string()))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| TrackingError::Unreachable(self.base.clone(), e.to_string()))?;
        if !status.is_success() {
            return Err(TrackingError::Refused(status.as_u16(), what.to_string(), body.chars().take(500).collect()));
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow/{path}", self.base)
    }

    /// The experiment's id, creating it on first use.
    async fn experiment_id(&self, name: &str) -> Result<String, TrackingError> {
        let get = self.http.get(self.api("experiments/get-by-name")).query(&[("experiment_name", name)]);
        match self.call(get, "experiments/get-by-name").await {
            Ok(found) => return Ok(found["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string()),
            Err(TrackingError::Refused(404, ..)) => {}
            Err(other) => return Err(other),
        }
        let created = self.call(self.http.post(self.api("experiments/create")).json(&json!({"name": name})), "experiments/create").await?;
        Ok(created["experiment_id"].as_str().unwrap_or_default().to_string())
    }

    async fn create_run(&self, experiment_id: &str, export: &Export, job: &Job) -> Result<(String, String), TrackingError> {
        let run_name =
            export.run_name.clone().unwrap_or_else(|| job.spec.suffix.clone().map_or(job.id.to_string(), |s| format!("{s}-{}", job.id)));
        let mut tags = vec![json!({"key": "mlflow.runName", "value": run_name}), json!({"key": "lathe.job_id", "value": job.id.as_str()})];
        tags.extend(export.tags.0.iter().map(|(k, v)| json!({"key": k, "value": v})));
        let body = json!({"experiment_id": experiment_id, "run_name": run_name, "start_time": millis(job.created_at), "tags": tags});
        let created = self.call(self.http.post(self.api("runs/create")).json(&body), "runs/create").await?;
        let info = &created["run"]["info"];
        Ok((info["run_id"].as_str().unwrap_or_default().to_string(), info["artifact_uri"].as_str().unwrap_or_default().to_string()))
    }

    async fn log_batch(&self, run_id: &str, metrics: Vec<Value>, params: Vec<(String, String)>) -> Result<(), TrackingError> {
        let params: Vec<Value> = params.into_iter().map(|(key, value)| json!({"key": key, "value": value})).collect();
        let body = json!({"run_id": run_id, "metrics": metrics, "params": params});
        self.call(self.http.post(self.api("runs/log-batch")).json(&body), "runs/log-batch").await.map(|_| ())
    }

    async fn finish_run(&self, run_id: &str, status: &str, end_ms: i64) -> Result<(), TrackingError> {
        let body = json!({"run_id": run_id, "status": status, "end_time": end_ms});
        self.call(self.http.post(self.api("runs/update")).json(&body), "runs/update").await.map(|_| ())
    }

    /// Uploads through the tracking server's artifact proxy (`mlflow server` serves artifacts
    /// by default); runs whose artifacts live elsewhere get none from Lathe.
    async fn upload_artifact(&self, artifact_uri: &str, name: &str, bytes: Vec<u8>) -> Result<(), TrackingError> {
        let Some(path) = artifact_uri.strip_prefix("mlflow-artifacts:") else {
            tracing::warn!(
                artifact_uri,
                "MLflow stores this run's artifacts where Lathe cannot upload (start `mlflow server` with artifact serving)"
            );
            return Ok(());
        };
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{}/{name}", self.base, path.trim_start_matches('/'));
        self.call(self.http.put(url).body(bytes), "mlflow-artifacts upload").await.map(|_| ())
    }
}
