//! Priority preemption: which running jobs to hand back so that higher-priority queued jobs
//! can start (docs/scheduling.md). Pure: the reconciler's leader loads the inputs, asks
//! [`choose`], and persists each choice with a compare-and-set on the victim's attempt.
//!
//! The rule: a queued job preempts only when no idle worker can take it, only a running job of
//! the same pool with a strictly lower priority that has run at least the minimum time, and
//! only one whose worker could run it. Among those, the lowest priority goes first, and among
//! equals the one that started last (it has the least work since its start to redo, and the
//! oldest runs keep going). One victim per queued job; a job already being preempted is
//! neither chosen again nor counted as a free worker until it has handed its job back.

/// What a worker offers, for matching a job to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub pools: Vec<String>,
    pub gpus: u32,
    pub nodes: u32,
    pub gpu_memory_bytes: Option<u64>,
}

/// What a job asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub pool: String,
    pub gpus: u32,
    pub nodes: u32,
    pub gpu_memory_gb: Option<u32>,
}

impl Offer {
    /// The claim's own test (store `Work::Job.fits` in SQL), once more for planning.
    pub fn fits(&self, shape: &Shape) -> bool {
        self.pools.contains(&shape.pool)
            && shape.nodes <= self.nodes
            && shape.gpus <= self.gpus.saturating_mul(shape.nodes)
            && shape.gpu_memory_gb.is_none_or(|gb| u64::from(gb) * (1 << 30) <= self.gpu_memory_bytes.unwrap_or(0))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub id: String,
    pub priority: i16,
    pub shape: Shape,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub id: String,
    pub attempt: i32,
    pub priority: i16,
    pub pool: String,
    /// Seconds since the current attempt started.
    pub running_for: f64,
    pub worker_id: String,
    pub worker: Offer,
    /// The queued job it is already being preempted for, if any.
    pub preempting_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preemption {
    pub victim: String,
    pub victim_attempt: i32,
    pub victim_priority: i16,
    pub worker_id: String,
    pub pool: String,
    pub for_job: String,
    pub for_priority: i16,
}

/// The preemptions to ask for now. `queued` is taken in the order given (highest priority
/// first, as the claim ranks them); `idle` are live workers that hold no work.
pub fn choose(queued: &[Queued], running: &[Running], idle: &[Offer], min_run_seconds: f64) -> Vec<Preemption> {
    let mut free: Vec<&Offer> = idle.iter().collect();
    let mut taken: Vec<&str> = running.iter().filter(|r| r.preempting_for.is_some()).map(|r| r.id.as_str()).collect();
    let mut chosen = Vec::new();
    for job in queued {
        // Already has a worker on its way: one being preempted for it.
        if running.iter().any(|r| r.preempting_for.as_deref() == Some(job.id.as_str())) {
            continue;
        }
        if let Some(at) = free.iter().position(|w| w.fits(&job.shape)) {
            free.swap_remove(at);
            continue;
        }
        let victim = running
            .iter()
            .filter(|r| {
                r.pool == job.shape.pool
                    && r.priority < job.priority
                    && r.running_for >= min_run_seconds
                    && !taken.contains(&r.id.as_str())
                    && r.worker.fits(&job.shape)
            })
            .min_by(|a, b| a.priority.cmp(&b.priority).then(a.running_for.total_cmp(&b.running_for)).then(a.id.cmp(&b.id)));
        if let Some(victim) = victim {
            taken.push(&victim.id);
            chosen.push(Preemption {
                victim: victim.id.clone(),
                victim_attempt: victim.attempt,
                victim_priority: victim.priority,
                worker_id: victim.worker_id.clone(),
                pool: victim.pool.clone(),
                for_job: job.id.clone(),
                for_priority: job.priority,
            });
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(pools: &[&str], gpus: u32) -> Offer {
        Offer { pools: pools.iter().map(|p| p.to_string()).collect(), gpus, nodes: 1, gpu_memory_bytes: None }
    }

    fn queued(id: &str, priority: i16, gpus: u32) -> Queued {
        Queued { id: id.into(), priority, shape: Shape { pool: "default".into(), gpus, nodes: 1, gpu_memory_gb: None } }
    }

    fn running(id: &str, priority: i16, running_for: f64) -> Running {
        Running {
            id: id.into(),
            attempt: 1,
            priority,
            pool: "default".into(),
            running_for,
            worker_id: format!("w-{id}"),
            worker: offer(&["default"], 1),
            preempting_for: None,
        }
    }

    fn victims(p: Vec<Preemption>) -> Vec<(String, String)> {
        p.into_iter().map(|p| (p.victim, p.for_job)).collect()
    }

    #[test]
    fn the_lowest_priority_latest_started_job_is_preempted() {
        let run = [running("old-low", -5, 500.0), running("new-low", -5, 100.0), running("mid", 0, 90.0)];
        assert_eq!(victims(choose(&[queued("urgent", 100, 1)], &run, &[], 60.0)), [("new-low".into(), "urgent".into())]);
    }

    #[test]
    fn nothing_is_preempted_when_a_worker_is_idle_or_priority_is_not_strictly_higher() {
        let run = [running("a", 0, 500.0)];
        assert!(choose(&[queued("q", 10, 1)], &run, &[offer(&["default"], 1)], 60.0).is_empty());
        assert!(choose(&[queued("q", 0, 1)], &run, &[], 60.0).is_empty());
    }

    #[test]
    fn a_job_younger_than_the_minimum_run_time_is_left_alone() {
        let run = [running("young", 0, 59.0)];
        assert!(choose(&[queued("q", 10, 1)], &run, &[], 60.0).is_empty());
        assert_eq!(choose(&[queued("q", 10, 1)], &run, &[], 30.0).len(), 1);
    }

    #[test]
    fn an_idle_worker_that_does_not_fit_does_not_count_and_a_victim_must_fit() {
        let run = [running("small", 0, 100.0)];
        // A 2-GPU job: the idle worker is in another pool, the victim's worker has one GPU.
        let idle = [offer(&["other"], 8)];
        assert!(choose(&[queued("big", 10, 2)], &run, &idle, 60.0).is_empty());
        let mut wide = running("wide", 0, 100.0);
        wide.worker = offer(&["default"], 2);
        assert_eq!(victims(choose(&[queued("big", 10, 2)], &[run[0].clone(), wide], &idle, 60.0)), [("wide".into(), "big".into())]);
    }

    #[test]
    fn one_victim_per_queued_job_and_none_twice() {
        let run = [running("a", 0, 100.0), running("b", 0, 200.0)];
        let q = [queued("q1", 10, 1), queued("q2", 10, 1), queued("q3", 10, 1)];
        assert_eq!(victims(choose(&q, &run, &[], 60.0)), [("a".into(), "q1".into()), ("b".into(), "q2".into())],);
        // A preemption in progress is neither repeated nor doubled.
        let mut in_progress = run.clone();
        in_progress[0].preempting_for = Some("q1".into());
        assert_eq!(victims(choose(&q, &in_progress, &[], 60.0)), [("b".into(), "q2".into())]);
    }

    #[test]
    fn only_the_same_pool() {
        let mut elsewhere = running("gpu-job", 0, 100.0);
        elsewhere.pool = "a100".into();
        elsewhere.worker = offer(&["a100", "default"], 1);
        assert!(choose(&[queued("q", 10, 1)], &[elsewhere], &[], 60.0).is_empty());
    }
}
