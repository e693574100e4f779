//! The worker's Prometheus metrics, served on `--metrics-listen` when set.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::WorkerError;

pub struct Telemetry {
    registry: Registry,
    pub busy: Gauge,
    pub train_loss: Gauge<f64, AtomicU64>,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    pub step: Gauge,
    pub memory_bytes: Gauge,
    pub attempts: Family<Vec<(String, String)>, Counter>,
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::default();
        let t = Telemetry {
            registry: Registry::default(),
            busy: Gauge::default(),
            train_loss: Gauge::default(),
            tokens_per_second: Gauge::default(),
            step: Gauge::default(),
            memory_bytes: Gauge::default(),
            attempts: Family::default(),
        };
        registry.register("lathe_worker_busy", "1 while an attempt runs", t.busy.clone());
        registry.register("lathe_worker_train_loss", "Training loss of the current attempt", t.train_loss.clone());
        registry.register("lathe_worker_tokens_per_second", "Throughput of the current attempt", t.tokens_per_second.clone());
        registry.register("lathe_worker_step", "Optimizer step of the current attempt", t.step.clone());
        registry.register("lathe_worker_memory_bytes", "Peak device (or process) memory of the current attempt", t.memory_bytes.clone());
        registry.register("lathe_worker_attempts", "Attempts ended, by outcome", t.attempts.clone());
        Telemetry { registry, ..t }
    }

    pub fn attempt_ended(&self, outcome: &str) {
        self.busy.set(0);
        self.attempts.get_or_create(&vec![("outcome".to_string(), outcome.to_string())]).inc();
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
