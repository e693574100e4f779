//! Demand per pool: what an autoscaler scales workers on. A pool needs one worker per job or
//! evaluation that is queued or running in it; Postgres is the only place that knows (Redis
//! holds ids only until a worker pops them, and running jobs are not in it at all).
//!
//! Supply is the pool's live training workers that ask for work: a worker counts while its
//! heartbeat is recent and it claimed (or tried to) within the same window, or registered
//! within it. An identity that only registers and heartbeats — a ghost, a stuck process, a
//! flood of enrolments — stops counting after one window, so it cannot make demand look met.

use std::time::Duration;

use sqlx::PgPool;

use crate::StoreError;

#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PoolDemand {
    pub pool: String,
    pub queued_jobs: i64,
    pub running_jobs: i64,
    pub queued_evaluations: i64,
    pub running_evaluations: i64,
    /// The device memory the pool's queued and running jobs ask for (`gpu_memory_gb`), in GB.
    pub gpu_memory_gb_asked: i64,
    /// GPUs and nodes the pool's queued and running jobs ask for (evaluations count one GPU on
    /// one node each): job shapes, for scalers that size what they start.
    pub gpus_asked: i64,
    pub nodes_asked: i64,
    /// How long the pool's oldest queued job (past its backoff) has waited, in seconds; 0 when
    /// none waits.
    pub oldest_queued_seconds: i64,
    /// Live workers serving the pool (heartbeat and a claim within the liveness window, not
    /// draining).
    pub workers: i64,
    pub draining_workers: i64,
    /// The queued and running work by shape (GPUs per node, nodes), smallest first: what a
    /// scaler sizes the workers it starts on (an evaluation is one GPU on one node).
    #[sqlx(skip)]
    pub shapes: Vec<Shape>,
}

/// Work of one shape in a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Shape {
    pub gpus: i32,
    pub nodes: i32,
    pub queued: i64,
    pub running: i64,
}

impl PoolDemand {
    /// Workers the pool needs now: one per queued or running job and evaluation.
    pub fn demand(&self) -> i64 {
        self.queued_jobs + self.running_jobs + self.queued_evaluations + self.running_evaluations
    }

    pub fn empty(pool: &str) -> PoolDemand {
        PoolDemand { pool: pool.to_string(), ..Default::default() }
    }
}

/// Every pool that has work or workers, by name. A worker is live when its last heartbeat is
/// younger than `live_within`; revoked workers and those that left do not count.
pub async fn pool_demand(pool: &PgPool, live_within: Duration) -> Result<Vec<PoolDemand>, StoreError> {
    let rows = sqlx::query_as::<_, PoolDemand>(
        "WITH j AS (
             SELECT pool,
                    count(*) FILTER (WHERE status = 'queued') AS queued_jobs,
                    count(*) FILTER (WHERE status = 'running') AS running_jobs,
                    coalesce(sum(gpu_memory_gb), 0)::bigint AS gpu_memory_gb_asked,
                    coalesce(sum(gpus), 0)::bigint AS job_gpus, coalesce(sum(nodes), 0)::bigint AS job_nodes,
                    coalesce(extract(epoch FROM now() - min(created_at) FILTER (
                        WHERE status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= now()))), 0)::bigint
                        AS oldest_queued_seconds
             FROM jobs WHERE status IN ('queued', 'running') GROUP BY pool),
         e AS (
             SELECT pool,
                    count(*) FILTER (WHERE status = 'queued') AS queued_evaluations,
                    count(*) FILTER (WHERE status = 'running') AS running_evaluations
             FROM evaluations WHERE status IN ('queued', 'running') GROUP BY pool),
         w AS (
             SELECT p.pool,
                    count(*) FILTER (WHERE NOT w.draining) AS workers,
                    count(*) FILTER (WHERE w.draining) AS draining_workers
             FROM workers w CROSS JOIN LATERAL unnest(w.pools) AS p(pool)
             LEFT JOIN fleets f ON f.id = w.fleet_id
             WHERE w.revoked_at IS NULL AND f.revoked_at IS NULL AND w.left_at IS NULL AND NOT w.serving
               AND w.last_heartbeat_at > now() - make_interval(secs => $1)
               AND greatest(w.last_claim_at, w.registered_at) > now() - make_interval(secs => $1)
             GROUP BY p.pool)
         SELECT pool,
                coalesce(j.queued_jobs, 0) AS queued_jobs, coalesce(j.running_jobs, 0) AS running_jobs,
                coalesce(e.queued_evaluations, 0) AS queued_evaluations,
                coalesce(e.running_evaluations, 0) AS running_evaluations,
                coalesce(j.gpu_memory_gb_asked, 0) AS gpu_memory_gb_asked,
                coalesce(j.job_gpus, 0) + coalesce(e.queued_evaluations, 0) + coalesce(e.running_evaluations, 0) AS gpus_asked,
                coalesce(j.job_nodes, 0) + coalesce(e.queued_evaluations, 0) + coalesce(e.running_evaluations, 0) AS nodes_asked,
                coalesce(j.oldest_queued_seconds, 0) AS oldest_queued_seconds,
                coalesce(w.workers, 0) AS workers, coalesce(w.draining_workers, 0) AS draining_workers
         FROM j FULL JOIN e USING (pool) FULL JOIN w USING (pool)
         ORDER BY pool",
    )
    .bind(live_within.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let shapes: Vec<(String, i32, i32, i64, i64)> = sqlx::query_as(
        "SELECT pool, gpus, nodes, count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running')
         FROM (SELECT pool, gpus, nodes, status FROM jobs WHERE status IN ('queued', 'running')
               UNION ALL
               SELECT pool, 1, 1, status FROM evaluations WHERE status IN ('queued', 'running')) work
         GROUP BY pool, gpus, nodes ORDER BY pool, gpus, nodes",
    )
    .fetch_all(pool)
    .await?;
    let mut rows = rows;
    for (pool, gpus, nodes, queued, running) in shapes {
        if let Some(row) = rows.iter_mut().find(|r| r.pool == pool) {
            row.shapes.push(Shape { gpus, nodes, queued, running });
        }
    }
    Ok(rows)
}
