//! The reconciler: every few seconds it
//! 1. requeues running jobs whose lease expired (their worker died or froze) — counted as a
//!    crash, with backoff, poison after the retry limit; the next claim resumes from the last
//!    committed checkpoint;
//! 2. re-publishes every queued job to Redis (`ZADD NX`: a no-op for ids already there;
//!    pipelined, a thousand to a round trip), which heals a Redis restart or FLUSHALL and any wake-up lost between a pop and a claim;
//! 3. requeues running evaluations whose lease expired (a crash each; failed past the limit);
//! 4. refreshes the gauges that mirror Postgres (jobs and evaluations by status, workers,
//!    demand per pool, queue depth);
//! 5. priority preemption (docs/scheduling.md): takes back jobs whose worker did not hand them
//!    back within the grace (before step 1, which then requeues them), and asks the workers of
//!    lower-priority running jobs to make room for queued jobs no idle worker can take
//!    (`lathe_core::preemption::choose`; the request is kept on the job row, which the attempt
//!    stream watches);
//! 6. gives queued jobs that no live worker can take a `pending_reason` and one `warn` event
//!    (`lathe_store::dispatch::pending`);
//! 7. forgets workers gone for longer than `--worker-retention-hours` that no attempt names
//!    (`lathe_store::workers::prune_workers`); those that ran attempts stay, archived;
//! 8. folds attempts that ended into each project's decayed use (fair share's recent GPUs,
//!    `lathe_store::dispatch::fair_share::fold_usage`), so a claim sums only live and recent
//!    attempts.
//!
//! Every pass is timed (`lathe_reconciler_pass_seconds`, by role), and each step of the
//! leader's (`lathe_reconciler_step_seconds{step}`).
//!
//! Steps 1 to 3 and 5 to 8 run on one replica at a time, the one holding the reconciler lock
//! (`lathe_store::leadership`); step 4 runs on every replica, since each serves its own
//! `/metrics`. The steps would also be safe on several replicas at once (row locks with SKIP
//! LOCKED, idempotent publishes): the lock saves the repeated work, not correctness. A failed
//! pass is just logged: the next one retries.
//!
//! A lease counts as expired only two heartbeat intervals after its expiry, and not at all in
//! the first two intervals after the controller starts. And the leader notes every pass in
//! Postgres: a pass that finds the previous one long ago (Postgres was unreachable, or no
//! controller ran) first extends every running lease by a whole lease
//! (`lathe_store::dispatch::keep_leases_across_gap`). Meanwhile the workers kept training —
//! their heartbeats were answered "database unavailable", not refused — so after an outage of
//! any length they renew first, instead of every running job being requeued (and charged a
//! retry) at once.

use std::collections::BTreeSet;

use lathe_store::dispatch::{keep_leases_across_gap, queued_job_ids, requeue_expired_leases, EventLevel, QueuedJob};
use lathe_store::leadership::Leadership;
use lathe_store::time::OffsetDateTime;
use tokio::sync::watch;

use crate::telemetry::Telemetry;
use crate::AppState;

pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let started = std::time::Instant::now();
    let grace = state.config.heartbeat_interval * 2;
    let mut tick = tokio::time::interval(state.config.reconcile_interval);
    let mut leadership = Leadership::default();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let leases = if started.elapsed() >= grace { Leases::Enforce } else { Leases::SpareAfterStart };
        let was_leader = leadership.is_leader();
        let leader = match leadership.lead(&state.pool).await {
            Ok(leader) => leader,
            Err(error) => {
                tracing::warn!(%error, "cannot reach Postgres for the reconciler lock");
                false
            }
        };
        if leader != was_leader {
            tracing::info!(leader, "reconciler leadership changed");
        }
        let pass_started = std::time::Instant::now();
        let result = if leader { pass_with(&state, leases).await } else { follower_pass(&state).await };
        let role = if leader { "leader" } else { "follower" };
        state
            .telemetry
            .reconciler_pass
            .get_or_create(&vec![("role".to_string(), role.to_string())])
            .observe(pass_started.elapsed().as_secs_f64());
        if let Err(error) = result {
            tracing::warn!(%error, "reconciler pass failed; retrying next tick");
        }
    }
}

/// What a replica that does not lead still does: its own gauges.
async fn follower_pass(state: &AppState) -> Result<(), lathe_store::StoreError> {
    let queued = queued_job_ids(&state.pool).await?;
    refresh_gauges(state, &queued, true).await
}

/// Whether a pass requeues jobs and evaluations whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leases {
    Enforce,
    /// The first heartbeat intervals after the controller starts: the workers still training
    /// renew first (see the module comment).
    SpareAfterStart,
}

/// One pass; public so that tests can force one.
pub async fn pass(state: &AppState) -> Result<(), lathe_store::StoreError> {
    pass_with(state, Leases::Enforce).await
}

async fn pass_with(state: &AppState, leases: Leases) -> Result<(), lathe_store::StoreError> {
    let config = &state.config;
    let gap = (config.reconcile_interval * 3).max(config.heartbeat_interval * 2);
    if let Some(since) = keep_leases_across_gap(&state.pool, gap, config.lease).await? {
        tracing::warn!(seconds = since.as_secs_f64(), "no reconciler pass for a while (an outage): running leases extended");
    }
    if leases == Leases::Enforce {
        if let Some(preemption) = config.preemption {
            timed(state, "take_back_overdue", take_back_overdue(state, preemption.grace)).await?;
        }
        timed(state, "requeue_expired", requeue_expired(state)).await?;
        if let Some(preemption) = config.preemption {
            timed(state, "preempt", preempt(state, preemption.min_run)).await?;
        }
        timed(state, "explain_pending", explain_pending(state)).await?;
        timed(state, "fold_usage", lathe_store::dispatch::fair_share::fold_usage(&state.pool, config.fair_share_half_life)).await?;
        if let Some(retention) = config.worker_retention {
            let pruned = timed(state, "prune_workers", lathe_store::workers::prune_workers(&state.pool, retention)).await?;
            if pruned > 0 {
                tracing::info!(pruned, "forgot workers gone for longer than the retention that ran no attempt");
            }
        }
    }
    let queued = timed(state, "queued_job_ids", queued_job_ids(&state.pool)).await?;
    let redis_ok = timed(state, "republish", republish(state, &queued)).await;
    timed(state, "refresh_gauges", refresh_gauges(state, &queued, redis_ok)).await
}

/// Runs one step of the leader's pass, timing it (`lathe_reconciler_step_seconds{step}`).
async fn timed<T>(state: &AppState, step: &str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = work.await;
    state.telemetry.reconciler_step.get_or_create(&vec![("step".to_string(), step.to_string())]).observe(started.elapsed().as_secs_f64());
    out
}

/// Steps 1 and 3: jobs and evaluations whose lease expired go back to the queue (or fail).
async fn requeue_expired(state: &AppState) -> Result<(), lathe_store::StoreError> {
    let expired_before = OffsetDateTime::now_utc() - state.config.heartbeat_interval * 2;
    for job in requeue_expired_leases(&state.pool, expired_before, &state.config.retry).await? {
        state.telemetry.requeued.inc();
        state.telemetry.forget_job(job.job_id.as_str());
        let message = format!("Attempt {} lost its worker (lease expired); job is now {}", job.attempt, job.status.as_str());
        tracing::warn!(job_id = %job.job_id, attempt = job.attempt, status = job.status.as_str(), "lease expired");
        state.note_event(job.job_id.as_str(), EventLevel::Warn, &message, None).await;
    }
    let evaluations = lathe_store::evaluations::requeue_expired_evaluations(&state.pool, expired_before, &state.config.retry).await?;
    for (id, status) in evaluations {
        tracing::warn!(evaluation_id = id, status = status.as_str(), "evaluation lease expired");
    }
    Ok(())
}

/// Step 5, first half: a worker asked to hand its job back that did not within `grace` loses
/// its lease now, so step 1 takes the job back from its last checkpoint.
async fn take_back_overdue(state: &AppState, grace: std::time::Duration) -> Result<(), lathe_store::StoreError> {
    let lapsed_at = OffsetDateTime::now_utc() - state.config.heartbeat_interval * 2 - std::time::Duration::from_secs(1);
    for job_id in lathe_store::dispatch::preempt::expire_overdue_preemptions(&state.pool, grace, lapsed_at).await? {
        let message = format!(
            "The worker did not hand the job back within {} s of being preempted: taken back from the last checkpoint",
            grace.as_secs()
        );
        tracing::warn!(job_id, "preemption overdue; lease ended");
        state.note_event(&job_id, EventLevel::Warn, &message, None).await;
    }
    Ok(())
}

/// Step 5: the preemptions to ask for now, each kept on its victim's row (a compare-and-set on
/// its attempt), with an event on both jobs.
async fn preempt(state: &AppState, min_run: std::time::Duration) -> Result<(), lathe_store::StoreError> {
    use lathe_store::dispatch::preempt::{preemption_inputs, request_preemption};
    let (queued, running, idle) = preemption_inputs(&state.pool, state.config.lease).await?;
    if queued.is_empty() {
        return Ok(());
    }
    for p in lathe_core::preemption::choose(&queued, &running, &idle, min_run.as_secs_f64()) {
        if !request_preemption(&state.pool, &p).await? {
            continue;
        }
        state.telemetry.preemptions.get_or_create(&vec![("pool".to_string(), p.pool.clone())]).inc();
        tracing::info!(victim = p.victim, for_job = p.for_job, worker_id = p.worker_id, pool = p.pool, "preempting");
        let data = serde_json::json!({"preempted": p.victim, "preempted_priority": p.victim_priority, "for": p.for_job, "for_priority": p.for_priority, "worker_id": p.worker_id, "pool": p.pool});
        let victim = format!(
            "Preempted by job {} (priority {} > {}): checkpointing and returning to the queue; it resumes from the checkpoint, no retry spent",
            p.for_job, p.for_priority, p.victim_priority
        );
        state.note_event(&p.victim, EventLevel::Warn, &victim, Some(&data)).await;
        let winner = format!("Preempting job {} (priority {}) on worker {} to run this job", p.victim, p.victim_priority, p.worker_id);
        state.note_event(&p.for_job, EventLevel::Info, &winner, Some(&data)).await;
    }
    Ok(())
}

/// Step 6: queued jobs no live worker can take get a `pending_reason` and one `warn` event.
async fn explain_pending(state: &AppState) -> Result<(), lathe_store::StoreError> {
    let settled = state.config.heartbeat_interval * 2;
    for (job_id, reason) in lathe_store::dispatch::pending::refresh_pending_reasons(&state.pool, state.config.lease, settled).await? {
        tracing::info!(job_id, reason, "queued job cannot start yet");
        let message = format!("Waiting: {reason}. The job stays queued until such a worker joins.");
        state.note_event(&job_id, EventLevel::Warn, &message, None).await;
    }
    Ok(())
}

/// Step 2: every queued job to Redis (pipelined: ten thousand queued jobs are ten round trips).
/// False when Redis is unreachable.
async fn republish(state: &AppState, queued: &[QueuedJob]) -> bool {
    let jobs: Vec<(&str, &lathe_core::JobId, i32)> = queued.iter().map(|j| (j.pool.as_str(), &j.job_id, j.priority as i32)).collect();
    match state.queue.publish_many(&jobs).await {
        Ok(added) => {
            state.telemetry.republished.inc_by(added);
            true
        }
        Err(error) => {
            tracing::warn!(%error, "cannot publish queued jobs to Redis; workers poll Postgres meanwhile");
            false
        }
    }
}

/// Step 4: the gauges that mirror Postgres (and Redis's queue depth when it answers).
async fn refresh_gauges(state: &AppState, queued: &[QueuedJob], redis_ok: bool) -> Result<(), lathe_store::StoreError> {
    let by_status = lathe_store::jobs::count_by_status(&state.pool).await?;
    let statuses: Vec<(String, i64)> = lathe_core::JobStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), by_status.iter().find(|(st, _)| st == s).map_or(0, |(_, n)| *n)))
        .collect();
    Telemetry::set_gauges(&state.telemetry.jobs, "status", &statuses);
    let by_status = lathe_store::evaluations::count_by_status(&state.pool).await?;
    let evaluations: Vec<(String, i64)> = lathe_store::evaluations::EvaluationStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), by_status.iter().find(|(st, _)| st == s).map_or(0, |(_, n)| *n)))
        .collect();
    Telemetry::set_gauges(&state.telemetry.evaluations, "status", &evaluations);

    state.telemetry.set_pool_demand(&lathe_store::demand::pool_demand(&state.pool, state.config.lease).await?);

    let workers = lathe_store::workers::current_workers(&state.pool).await?;
    let stale_before = OffsetDateTime::now_utc() - state.config.lease;
    let mut counts = [("live", 0i64), ("stale", 0), ("draining", 0)];
    let mut pools: BTreeSet<String> = queued.iter().map(|j| j.pool.clone()).collect();
    for worker in &workers {
        let slot = if worker.last_heartbeat_at < stale_before {
            1
        } else if worker.draining {
            2
        } else {
            pools.extend(worker.pools.iter().cloned());
            0
        };
        counts[slot].1 += 1;
    }
    let counts: Vec<(String, i64)> = counts.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    Telemetry::set_gauges(&state.telemetry.workers, "state", &counts);

    if redis_ok {
        let mut depths = Vec::new();
        for pool in pools {
            if let Ok(depth) = state.queue.depth(&pool).await {
                depths.push((pool, depth as i64));
            }
        }
        Telemetry::set_gauges(&state.telemetry.queue_depth, "pool", &depths);
    }
    Ok(())
}
