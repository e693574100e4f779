//! Prometheus metrics of the controller, served at `/metrics` in the text format. Gauges that
//! mirror Postgres (jobs by status, workers, queue depth) are refreshed by the reconciler; the
//! per-job gauges follow the metric points running jobs stream in.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Telemetry {
    registry: Registry,
    pub jobs: Family<Labels, Gauge>,
    pub evaluations: Family<Labels, Gauge>,
    pub queue_depth: Family<Labels, Gauge>,
    pub workers: Family<Labels, Gauge>,
    pub pool_demand: Family<Labels, Gauge>,
    pub pool_workers: Family<Labels, Gauge>,
    pub pool_gpu_memory_asked: Family<Labels, Gauge>,
    pub pool_gpus_asked: Family<Labels, Gauge>,
    pub pool_oldest_queued: Family<Labels, Gauge>,
    /// Every pool seen since start: a pool whose work is done reads 0 rather than vanishing, so a
    /// scaler sees the fall (a missing series is "no data", not zero, to most queries).
    pools_seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub job_train_loss: Family<Labels, FloatGauge>,
    pub job_tokens_per_second: Family<Labels, FloatGauge>,
    pub job_step: Family<Labels, Gauge>,
    pub job_valid_loss: Family<Labels, FloatGauge>,
    pub job_reward_margin: Family<Labels, FloatGauge>,
    pub claim_latency: Histogram,
    pub http_duration: Family<Labels, Histogram>,
    pub metric_points_ingested: Counter,
    pub requeued: Counter,
    pub republished: Counter,
    /// How long one reconciler pass takes, by role (`leader` does the whole pass, a `follower`
    /// only its own gauges).
    pub reconciler_pass: Family<Labels, Histogram>,
    /// The leader's pass, step by step: where its time goes.
    pub reconciler_step: Family<Labels, Histogram>,
    /// Attempts stopped by a fault of the infrastructure (storage full), by code.
    pub infrastructure_faults: Family<Labels, Counter>,
    /// Running jobs asked to hand their worker to a higher-priority job, by pool.
    pub preemptions: Family<Labels, Counter>,
    /// More metrics served on the same /metrics: the workers `lathe up` runs in this process.
    others: std::sync::Mutex<Vec<Box<dyn Fn() -> String + Send + Sync>>>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::default();
        let t = Telemetry {
            jobs: Family::default(),
            evaluations: Family::default(),
            queue_depth: Family::default(),
            workers: Family::default(),
            pool_demand: Family::default(),
            pool_workers: Family::default(),
            pool_gpu_memory_asked: Family::default(),
            pool_gpus_asked: Family::default(),
            pool_oldest_queued: Family::default(),
            pools_seen: Default::default(),
            job_train_loss: Family::default(),
            job_reward_margin: Family::default(),
            job_tokens_per_second: Family::default(),
            job_step: Family::default(),
            job_valid_loss: Family::default(),
            claim_latency: latency_histogram(),
            http_duration: Family::new_with_constructor(latency_histogram),
            metric_points_ingested: Counter::default(),
            requeued: Counter::default(),
            republished: Counter::default(),
            reconciler_pass: Family::new_with_constructor(latency_histogram),
            reconciler_step: Family::new_with_constructor(latency_histogram),
            infrastructure_faults: Family::default(),
            preemptions: Family::default(),
            others: Default::default(),
            registry: Registry::default(),
        };
        registry.register("lathe_jobs", "Jobs by status", t.jobs.clone());
        registry.register("lathe_evaluations", "Evaluations by status", t.evaluations.clone());
        registry.register("lathe_queue_depth", "Job ids waiting in Redis, per pool", t.queue_depth.clone());
        registry.register("lathe_workers", "Registered workers by state (live, stale, draining)", t.workers.clone());
        registry.register(
            "lathe_pool_demand",
            "Jobs and evaluations queued or running per pool: the workers it needs (what autoscalers scale on)",
            t.pool_demand.clone(),
        );
        registry.register("lathe_pool_workers", "Live workers (not draining) serving each pool", t.pool_workers.clone());
        registry.register(
            "lathe_pool_gpu_memory_asked_gb",
            "Device memory asked by the queued and running jobs of each pool, in GB",
            t.pool_gpu_memory_asked.clone(),
        );
        registry.register(
            "lathe_pool_gpus_asked",
            "GPUs asked by the queued and running jobs (and evaluations, one each) of each pool",
            t.pool_gpus_asked.clone(),
        );
        registry.register(
            "lathe_pool_oldest_queued_seconds",
            "How long the oldest queued job of each pool has waited (0: none waits)",
            t.pool_oldest_queued.clone(),
        );
        registry.register("lathe_job_train_loss", "Latest training loss of a running job", t.job_train_loss.clone());
        registry.register("lathe_job_tokens_per_second", "Latest throughput of a running job", t.job_tokens_per_second.clone());
        registry.register(
            "lathe_job_validation_loss",
            "Latest validation loss of a running job (at its validation passes)",
            t.job_valid_loss.clone(),
        );
        registry.register("lathe_job_step", "Latest optimizer step of a running job", t.job_step.clone());
        registry.register(
            "lathe_job_reward_margin",
            "DPO: latest mean reward margin (preferred minus other answer) of a running job",
            t.job_reward_margin.clone(),
        );
        registry.register("lathe_claim_latency_seconds", "Time from job creation to its first claim", t.claim_latency.clone());
        registry.register(
            "lathe_http_request_duration_seconds",
            "REST request latency by method, route and status",
            t.http_duration.clone(),
        );
        registry.register(
            "lathe_metric_points_ingested",
            "Metric points written to Postgres from worker streams",
            t.metric_points_ingested.clone(),
        );
        registry.register("lathe_reconciler_requeued", "Jobs requeued after their lease expired", t.requeued.clone());
        registry.register("lathe_reconciler_republished", "Queued job ids re-published to Redis", t.republished.clone());
        registry.register(
            "lathe_reconciler_pass_seconds",
            "Time one reconciler pass takes, by role (leader: the whole pass; follower: its gauges)",
            t.reconciler_pass.clone(),
        );
        registry.register(
            "lathe_reconciler_step_seconds",
            "Time each step of the leader's reconciler pass takes (requeue, preempt, pending, prune, republish, gauges)",
            t.reconciler_step.clone(),
        );
        registry.register(
            "lathe_infrastructure_faults",
            "Attempts stopped by a fault of the infrastructure, by code (storage_full, storage_error); the job is queued again",
            t.infrastructure_faults.clone(),
        );
        registry.register(
            "lathe_preemptions",
            "Running jobs asked to checkpoint and hand their worker to a higher-priority job, by pool",
            t.preemptions.clone(),
        );
        Telemetry { registry, ..t }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        // One exposition ends with one `# EOF`: the other registries' families go before it.
        for other in self.others.lock().expect("others lock").iter() {
            let text = other();
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out = format!("{body}{text}");
            }
        }
        out
    }

    /// Serves another registry's text (OpenMetrics, ending in `# EOF`, with family names of its
    /// own) on this /metrics too.
    pub fn also_serve(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.others.lock().expect("others lock").push(Box::new(render));
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = vec![
            ("method".to_string(), method.to_string()),
            ("route".to_string(), route.to_string()),
            ("status".to_string(), status.to_string()),
        ];
        self.http_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn observe_job_point(&self, job_id: &str, step: u64, loss: Option<f64>, tokens_per_second: Option<f64>) {
        let labels = job_labels(job_id);
        self.job_step.get_or_create(&labels).set(step as i64);
        self.observe_job_loss(job_id, loss, None);
        if let Some(tps) = tokens_per_second {
            self.job_tokens_per_second.get_or_create(&labels).set(tps);
        }
    }

    /// The newest train loss and (at a validation pass) validation loss of a running job.
    pub fn observe_job_loss(&self, job_id: &str, loss: Option<f64>, valid_loss: Option<f64>) {
        let labels = job_labels(job_id);
        if let Some(valid) = valid_loss {
            self.job_valid_loss.get_or_create(&labels).set(valid);
        }
        if let Some(loss) = loss {
            self.job_train_loss.get_or_create(&labels).set(loss);
        }
    }

    /// A DPO job's newest mean reward margin.
    pub fn observe_job_reward_margin(&self, job_id: &str, margin: f64) {
        self.job_reward_margin.get_or_create(&job_labels(job_id)).set(margin);
    }

    /// The job no longer runs here: its series disappear.
    pub fn forget_job(&self, job_id: &str) {
        let labels = job_labels(job_id);
        self.job_step.remove(&labels);
        self.job_train_loss.remove(&labels);
        self.job_valid_loss.remove(&labels);
        self.job_reward_margin.remove(&labels);
        self.job_tokens_per_second.remove(&labels);
    }

    /// The demand gauges, one series per pool seen since start (0 once its work is done).
    pub fn set_pool_demand(&self, demand: &[lathe_store::demand::PoolDemand]) {
        let mut seen = self.pools_seen.lock().expect("pools lock");
        seen.extend(demand.iter().map(|d| d.pool.clone()));
        let value = |pool: &str, f: fn(&lathe_store::demand::PoolDemand) -> i64| demand.iter().find(|d| d.pool == pool).map_or(0, f);
        for (family, f) in [
            (&self.pool_demand, (|d| d.demand()) as fn(&lathe_store::demand::PoolDemand) -> i64),
            (&self.pool_workers, |d| d.workers),
            (&self.pool_gpu_memory_asked, |d| d.gpu_memory_gb_asked),
            (&self.pool_gpus_asked, |d| d.gpus_asked),
            (&self.pool_oldest_queued, |d| d.oldest_queued_seconds),
        ] {
            let values: Vec<(String, i64)> = seen.iter().map(|pool| (pool.clone(), value(pool, f))).collect();
            Telemetry::set_gauges(family, "pool", &values);
        }
    }

    pub fn set_gauges(family: &Family<Labels, Gauge>, label: &str, values: &[(String, i64)]) {
        family.clear();
        for (value, count) in values {
            family.get_or_create(&vec![(label.to_string(), value.clone())]).set(*count);
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

fn job_labels(job_id: &str) -> Labels {
    vec![("job_id".to_string(), job_id.to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_every_family_and_drops_finished_jobs() {
        let t = Telemetry::new();
        t.observe_job_point("ftjob-a", 3, Some(2.5), Some(100.0));
        t.observe_http("GET", "/v1/fine_tuning/jobs/{id}", 200, Duration::from_millis(3));
        t.metric_points_ingested.inc_by(7);
        let text = t.render();
        assert!(text.contains("lathe_job_train_loss{job_id=\"ftjob-a\"} 2.5"), "{text}");
        assert!(text.contains("lathe_metric_points_ingested_total 7"), "{text}");
        assert!(text.contains("lathe_http_request_duration_seconds_bucket{"), "{text}");
        t.also_serve(|| "# TYPE lathe_worker_busy gauge\nlathe_worker_busy{worker=\"w\"} 1\n# EOF\n".to_string());
        let text = t.render();
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("lathe_worker_busy{worker=\"w\"} 1\n# EOF\n"), "{text}");
        t.forget_job("ftjob-a");
        assert!(!t.render().contains("ftjob-a"));
    }
}
