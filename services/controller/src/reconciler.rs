//! The reconciler: every few seconds it
//! 1. requeues running jobs whose lease expired (their worker died or froze) — counted as a
//!    crash, with backoff, poison after the retry limit; the next claim resumes from the last
//!    committed checkpoint;
//! 2. re-publishes every queued job to Redis (`ZADD NX`: a no-op for ids already there), which
//!    heals a Redis restart or FLUSHALL and any wake-up lost between a pop and a claim;
//! 3. requeues running evaluations whose lease expired (a crash each; failed past the limit);
//! 4. refreshes the gauges that mirror Postgres (jobs and evaluations by status, workers,
//!    demand per pool, queue depth).
//!
//! Steps 1 to 3 run on one replica at a time, the one holding the reconciler lock
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
        let result = if leader { pass_with(&state, leases).await } else { follower_pass(&state).await };
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
        requeue_expired(state).await?;
    }
    let queued = queued_job_ids(&state.pool).await?;
    let redis_ok = republish(state, &queued).await;
    refresh_gauges(state, &queued, redis_ok).await
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

/// Step 2: every queued job to Redis. False when Redis is unreachable.
async fn republish(state: &AppState, queued: &[QueuedJob]) -> bool {
    for job in queued {
        match state.queue.publish(&job.pool, &job.job_id, job.priority as i32).await {
            Ok(true) => {
                state.telemetry.republished.inc();
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot publish queued jobs to Redis; workers poll Postgres meanwhile");
                return false;
            }
        }
    }
    true
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

    let workers = lathe_store::workers::list_workers(&state.pool).await?;
    let stale_before = OffsetDateTime::now_utc() - state.config.lease;
    let mut counts = [("live", 0i64), ("stale", 0), ("draining", 0)];
    let mut pools: BTreeSet<String> = queued.iter().map(|j| j.pool.clone()).collect();
    for worker in workers.iter().filter(|w| w.left_at.is_none() && w.revoked_at.is_none()) {
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
