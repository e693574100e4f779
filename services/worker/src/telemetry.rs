//! The worker's Prometheus metrics, served on `--metrics-listen` when set. Every series carries
//! the worker's name (`worker`), so several workers can share one registry: `lathe up` runs its
//! workers in the controller's process and serves their metrics on the controller's /metrics.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::WorkerError;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The registry of one worker process (or of every worker of `lathe up`).
pub struct Telemetry {
    registry: Registry,
    busy: Family<Labels, Gauge>,
    train_loss: Family<Labels, FloatGauge>,
    valid_loss: Family<Labels, FloatGauge>,
    tokens_per_second: Family<Labels, FloatGauge>,
    step: Family<Labels, Gauge>,
    memory_bytes: Family<Labels, Gauge>,
    attempts: Family<Labels, Counter>,
    info: Family<Labels, Gauge>,
    rank_step_seconds: Family<Labels, FloatGauge>,
    all_reduce_seconds: Family<Labels, FloatGauge>,
    reward_margin: Family<Labels, FloatGauge>,
    reward_accuracy: Family<Labels, FloatGauge>,
    inference_batch_size: Family<Labels, Histogram>,
}

/// Batch sizes 1, 2, 4 … 256.
fn batch_size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9))
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::default();
        let t = Telemetry {
            registry: Registry::default(),
            busy: Family::default(),
            train_loss: Family::default(),
            valid_loss: Family::default(),
            tokens_per_second: Family::default(),
            step: Family::default(),
            memory_bytes: Family::default(),
            attempts: Family::default(),
            info: Family::default(),
            rank_step_seconds: Family::default(),
            all_reduce_seconds: Family::default(),
            reward_margin: Family::default(),
            reward_accuracy: Family::default(),
            inference_batch_size: Family::new_with_constructor(batch_size_histogram),
        };
        registry.register("lathe_worker_busy", "1 while an attempt runs", t.busy.clone());
        registry.register("lathe_worker_train_loss", "Training loss of the current attempt", t.train_loss.clone());
        registry.register("lathe_worker_validation_loss", "Latest validation loss of the current attempt", t.valid_loss.clone());
        registry.register("lathe_worker_tokens_per_second", "Throughput of the current attempt", t.tokens_per_second.clone());
        registry.register("lathe_worker_step", "Optimizer step of the current attempt", t.step.clone());
        registry.register("lathe_worker_memory_bytes", "Peak device (or process) memory of the current attempt", t.memory_bytes.clone());
        registry.register("lathe_worker_attempts", "Attempts ended, by outcome", t.attempts.clone());
        registry.register(
            "lathe_worker_rank_step_seconds",
            "Data parallel: each rank's forward + backward time in the latest step (a straggler is the largest)",
            t.rank_step_seconds.clone(),
        );
        registry.register(
            "lathe_worker_all_reduce_seconds",
            "Data parallel: time the latest step spent summing gradients over ranks",
            t.all_reduce_seconds.clone(),
        );
        registry.register(
            "lathe_worker_reward_margin",
            "DPO: mean reward margin (preferred minus other answer) of the current attempt's latest step",
            t.reward_margin.clone(),
        );
        registry.register(
            "lathe_worker_reward_accuracy",
            "DPO: fraction of the latest step's pairs whose preferred answer has the larger reward",
            t.reward_accuracy.clone(),
        );
        registry.register(
            "lathe_worker_inference_batch_size",
            "Inference (--serve): sequences in each generation step's batch",
            t.inference_batch_size.clone(),
        );
        registry.register(
            "lathe_worker_info",
            "1 per worker: its id, pools, device and where a scheduler placed it (Slurm job, pod)",
            t.info.clone(),
        );
        Telemetry { registry, ..t }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

/// One worker's series in a [`Telemetry`].
pub struct WorkerMetrics {
    telemetry: Arc<Telemetry>,
    worker: String,
    pub busy: Gauge,
    pub train_loss: FloatGauge,
    pub valid_loss: FloatGauge,
    pub tokens_per_second: FloatGauge,
    pub step: Gauge,
    pub memory_bytes: Gauge,
}

impl WorkerMetrics {
    pub fn new(telemetry: Arc<Telemetry>, worker: &str) -> WorkerMetrics {
        let labels = vec![("worker".to_string(), worker.to_string())];
        let t = &telemetry;
        let (busy, step, memory_bytes) =
            (t.busy.get_or_create(&labels).clone(), t.step.get_or_create(&labels).clone(), t.memory_bytes.get_or_create(&labels).clone());
        let (train_loss, valid_loss, tokens_per_second) = (
            t.train_loss.get_or_create(&labels).clone(),
            t.valid_loss.get_or_create(&labels).clone(),
            t.tokens_per_second.get_or_create(&labels).clone(),
        );
        WorkerMetrics { busy, train_loss, valid_loss, tokens_per_second, step, memory_bytes, worker: worker.to_string(), telemetry }
    }

    /// A data-parallel step's per-rank compute times and gradient all-reduce time.
    pub fn ranks(&self, rank_step_seconds: &[f64], all_reduce_seconds: f64) {
        for (rank, seconds) in rank_step_seconds.iter().enumerate() {
            let labels = vec![("worker".to_string(), self.worker.clone()), ("rank".to_string(), rank.to_string())];
            self.telemetry.rank_step_seconds.get_or_create(&labels).set(*seconds);
        }
        let labels = vec![("worker".to_string(), self.worker.clone())];
        self.telemetry.all_reduce_seconds.get_or_create(&labels).set(all_reduce_seconds);
    }

    /// A DPO step's mean reward margin and reward accuracy.
    pub fn preference(&self, margin: f64, accuracy: f64) {
        let labels = vec![("worker".to_string(), self.worker.clone())];
        self.telemetry.reward_margin.get_or_create(&labels).set(margin);
        self.telemetry.reward_accuracy.get_or_create(&labels).set(accuracy);
    }

    /// Records each inference step's batch size (callable from the inference thread).
    pub fn batch_observer(&self) -> impl Fn(usize) + Send + 'static {
        let labels = vec![("worker".to_string(), self.worker.clone())];
        let histogram = self.telemetry.inference_batch_size.get_or_create(&labels).clone();
        move |size| histogram.observe(size as f64)
    }

    /// Who this worker is, once registered: `lathe_worker_info{…} 1`.
    pub fn identify(&self, worker_id: &str, pools: &[String], device: &str, slurm_job_id: Option<&str>, pod_name: Option<&str>) {
        let labels = vec![
            ("worker".to_string(), self.worker.clone()),
            ("worker_id".to_string(), worker_id.to_string()),
            ("pools".to_string(), pools.join(",")),
            ("device".to_string(), device.to_string()),
            ("slurm_job_id".to_string(), slurm_job_id.unwrap_or_default().to_string()),
            ("pod_name".to_string(), pod_name.unwrap_or_default().to_string()),
        ];
        self.telemetry.info.get_or_create(&labels).set(1);
    }

    /// The attempt is over: its gauges go back to idle (a finished job's last loss must not
    /// look like a running one's), and the outcome is counted.
    pub fn attempt_ended(&self, outcome: &str) {
        self.busy.set(0);
        self.step.set(0);
        self.tokens_per_second.set(0.0);
        self.memory_bytes.set(0);
        self.train_loss.set(f64::NAN);
        self.valid_loss.set(f64::NAN);
        let worker = vec![("worker".to_string(), self.worker.clone())];
        for family in [&self.telemetry.reward_margin, &self.telemetry.reward_accuracy] {
            if let Some(gauge) = family.get(&worker) {
                gauge.set(f64::NAN);
            }
        }
        let labels = vec![("worker".to_string(), self.worker.clone()), ("outcome".to_string(), outcome.to_string())];
        self.telemetry.attempts.get_or_create(&labels).inc();
    }
}

/// Serves `/metrics` until the process ends.
pub async fn serve(listen: &str, telemetry: Arc<Telemetry>) -> Result<(), WorkerError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| WorkerError::MetricsListen(listen.into(), e))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move { telemetry.render() }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_workers_share_a_registry_and_an_ended_attempt_reads_idle() {
        let telemetry = Arc::new(Telemetry::new());
        let (a, b) = (WorkerMetrics::new(telemetry.clone(), "a"), WorkerMetrics::new(telemetry.clone(), "b"));
        a.busy.set(1);
        a.step.set(7);
        b.train_loss.set(2.5);
        a.identify("wrk_1", &["a100".into()], "cuda:0", Some("4242"), None);
        let text = telemetry.render();
        assert!(text.contains("lathe_worker_step{worker=\"a\"} 7"), "{text}");
        assert!(text.contains("lathe_worker_train_loss{worker=\"b\"} 2.5"), "{text}");
        assert!(text.contains("slurm_job_id=\"4242\""), "{text}");
        a.ranks(&[0.5, 0.75], 0.125);
        let text = telemetry.render();
        assert!(text.contains("lathe_worker_rank_step_seconds{worker=\"a\",rank=\"1\"} 0.75"), "{text}");
        assert!(text.contains("lathe_worker_all_reduce_seconds{worker=\"a\"} 0.125"), "{text}");
        a.attempt_ended("succeeded");
        let text = telemetry.render();
        assert!(text.contains("lathe_worker_busy{worker=\"a\"} 0") && text.contains("lathe_worker_step{worker=\"a\"} 0"), "{text}");
        assert!(text.contains("lathe_worker_attempts_total{worker=\"a\",outcome=\"succeeded\"} 1"), "{text}");
    }
}
