//! What a claim needs to apply fair share ([`lathe_core::fair_share`]): the queued jobs a
//! worker could take, and the share and load of their projects, read in the claim's
//! transaction. The rule itself is in lathe-core; this module only loads its inputs.

use std::collections::HashMap;
use std::time::Duration;

use lathe_core::fair_share::{Candidate, ProjectLoad, ProjectState, Projects, Share};
use sqlx::types::time::OffsetDateTime;
use sqlx::{Postgres, Transaction};

use super::lease::Work;
use crate::StoreError;

/// The pool name whose row applies to every pool without a row of its own.
pub const ALL_POOLS: &str = "*";

/// Ancient use weighs less than 2^-10 of fresh use: attempts that ended longer ago than this
/// many half-lives are not summed.
const HALF_LIVES_KEPT: f64 = 10.0;

#[derive(sqlx::FromRow)]
struct CandidateRow {
    id: String,
    project_id: String,
    pool: String,
    priority: i16,
    gpus: i32,
    created_at: OffsetDateTime,
}

/// The head of each (pool, project, priority) queue that `worker_id` may take now: FIFO within
/// a project means only heads compete, so a claim reads a handful of rows whatever the queue's
/// length. Each head is the first row of its queue that no concurrent claim holds, and it is
/// locked (`FOR UPDATE SKIP LOCKED`) until this claim commits: claims racing on one project
/// take its next jobs instead of all trying, and missing, the same head. Empty when the worker
/// may not claim (draining, revoked, serving only). Notes that the worker asked for work
/// (`last_claim_at`), which is what makes it count as supply in demand.
pub(crate) async fn candidates(tx: &mut Transaction<'_, Postgres>, worker_id: &str) -> Result<Vec<Candidate>, StoreError> {
    let sql = format!(
        "WITH w AS (
             UPDATE workers SET last_claim_at = now()
             WHERE id = $1 AND NOT draining AND NOT serving AND revoked_at IS NULL AND 'training' = ANY(grant_roles)
             RETURNING pools, gpu_memory_bytes, gpus, nodes
         ), queues AS (
             SELECT DISTINCT t.pool, t.project_id, t.priority
             FROM jobs t, w
             WHERE t.status = 'queued' AND t.pool = ANY(w.pools)
               AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= now())
               {fits}
         )
         SELECT head.* FROM queues q CROSS JOIN LATERAL (
             SELECT t.id, t.project_id, t.pool, t.priority, t.gpus, t.created_at
             FROM jobs t, w
             WHERE t.status = 'queued' AND t.pool = q.pool AND t.project_id = q.project_id AND t.priority = q.priority
               AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= now())
               {fits}
             ORDER BY t.created_at, t.id
             LIMIT 1
             FOR UPDATE OF t SKIP LOCKED
         ) head",
        fits = Work::Job.fits(),
    );
    let rows: Vec<CandidateRow> = sqlx::query_as(&sql).bind(worker_id).fetch_all(&mut **tx).await?;
    Ok(rows
        .into_iter()
        .map(|r| Candidate {
            id: r.id,
            project: r.project_id,
            pool: r.pool,
            priority: r.priority,
            gpus: u32::try_from(r.gpus).unwrap_or(1),
            queued_at: r.created_at.unix_timestamp_nanos(),
        })
        .collect())
}

/// Share and load of every (pool, project) among `candidates`.
pub(crate) async fn project_states(
    tx: &mut Transaction<'_, Postgres>,
    candidates: &[Candidate],
    half_life: Duration,
) -> Result<Projects, StoreError> {
    let mut pools: Vec<String> = candidates.iter().map(|c| c.pool.clone()).collect();
    let mut projects: Vec<String> = candidates.iter().map(|c| c.project.clone()).collect();
    pools.sort();
    pools.dedup();
    projects.sort();
    projects.dedup();
    let mut states: Projects = HashMap::new();
    if candidates.is_empty() {
        return Ok(states);
    }

    let shares: Vec<(String, String, Option<f64>, Option<i32>)> =
        sqlx::query_as("SELECT project_id, pool, weight, max_gpus FROM project_shares WHERE project_id = ANY($1)")
            .bind(&projects)
            .fetch_all(&mut **tx)
            .await?;
    let loads = loads(tx, &pools, &projects, half_life).await?;

    for pool in &pools {
        for project in &projects {
            let row = |p: &str| shares.iter().find(|(proj, pl, _, _)| proj == project && pl == p);
            let (exact, all) = (row(pool), row(ALL_POOLS));
            let weight = exact.and_then(|r| r.2).or(all.and_then(|r| r.2)).unwrap_or(1.0);
            let max_gpus = exact.and_then(|r| r.3).or(all.and_then(|r| r.3)).map(|n| u32::try_from(n).unwrap_or(0));
            let load = loads.get(&(pool.clone(), project.clone())).copied().unwrap_or_default();
            states.insert((pool.clone(), project.clone()), ProjectState { share: Share { weight, max_gpus }, load });
        }
    }
    Ok(states)
}

/// Running GPUs and recent GPUs (decayed GPU-seconds over the half-life, as
/// [`lathe_core::fair_share::recent_gpus`] computes them) per (pool, project), from the
/// attempts that are live or ended within [`HALF_LIVES_KEPT`] half-lives.
async fn loads(
    tx: &mut Transaction<'_, Postgres>,
    pools: &[String],
    projects: &[String],
    half_life: Duration,
) -> Result<HashMap<(String, String), ProjectLoad>, StoreError> {
    let rows: Vec<(String, String, i64, f64)> = sqlx::query_as(
        "SELECT j.pool, j.project_id,
                coalesce(sum(j.gpus) FILTER (WHERE a.ended_at IS NULL), 0)::bigint,
                coalesce(sum(j.gpus * (
                    power(2::float8, -least(extract(epoch FROM now() - coalesce(a.ended_at, now()))::float8 / $3, 1000))
                  - power(2::float8, -least(extract(epoch FROM now() - a.started_at)::float8 / $3, 1000)))), 0)::float8 / ln(2)
         FROM attempts a JOIN jobs j ON j.id = a.job_id
         WHERE j.pool = ANY($1) AND j.project_id = ANY($2)
           AND (a.ended_at IS NULL OR a.ended_at > now() - make_interval(secs => $3 * $4))
         GROUP BY j.pool, j.project_id",
    )
    .bind(pools)
    .bind(projects)
    .bind(half_life.as_secs_f64())
    .bind(HALF_LIVES_KEPT)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(pool, project, running, recent)| {
            ((pool, project), ProjectLoad { running_gpus: u32::try_from(running).unwrap_or(u32::MAX), recent_gpus: recent.max(0.0) })
        })
        .collect())
}

/// Serialises claims of `candidate`'s project in its pool until the transaction ends, then
/// says whether the candidate still fits under `max_gpus` with what is running now.
pub(crate) async fn lock_quota(tx: &mut Transaction<'_, Postgres>, candidate: &Candidate, max_gpus: u32) -> Result<bool, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('lathe.quota/' || $1 || '/' || $2, 0))")
        .bind(&candidate.pool)
        .bind(&candidate.project)
        .execute(&mut **tx)
        .await?;
    let running: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(gpus), 0)::bigint FROM jobs WHERE status = 'running' AND pool = $1 AND project_id = $2")
            .bind(&candidate.pool)
            .bind(&candidate.project)
            .fetch_one(&mut **tx)
            .await?;
    Ok(running + i64::from(candidate.gpus) <= i64::from(max_gpus))
}

/// Sets a project's weight and quota in `pool` ([`ALL_POOLS`] for every pool without a row of
/// its own). `None` leaves a value as it is; `Some(None)` for the quota removes it.
pub async fn set_project_share(
    pool: &sqlx::PgPool,
    project_id: &str,
    in_pool: &str,
    weight: Option<f64>,
    max_gpus: Option<Option<u32>>,
) -> Result<(Option<f64>, Option<i32>), StoreError> {
    let max_gpus_value = max_gpus.flatten().map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let row: (Option<f64>, Option<i32>) = sqlx::query_as(
        "INSERT INTO project_shares (project_id, pool, weight, max_gpus) VALUES ($1, $2, $3, $5)
         ON CONFLICT (project_id, pool) DO UPDATE SET
             weight = coalesce($3, project_shares.weight),
             max_gpus = CASE WHEN $4 THEN $5 ELSE project_shares.max_gpus END,
             updated_at = now()
         RETURNING weight, max_gpus",
    )
    .bind(project_id)
    .bind(in_pool)
    .bind(weight)
    .bind(max_gpus.is_some())
    .bind(max_gpus_value)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// A project's share rows: `(pool, weight, max_gpus)`, `*` first.
pub async fn project_shares(pool: &sqlx::PgPool, project_id: &str) -> Result<Vec<(String, Option<f64>, Option<i32>)>, StoreError> {
    Ok(sqlx::query_as("SELECT pool, weight, max_gpus FROM project_shares WHERE project_id = $1 ORDER BY pool <> '*', pool")
        .bind(project_id)
        .fetch_all(pool)
        .await?)
}

/// A project's share in `in_pool`: its row for the pool, falling back column by column to its
/// row for every pool, then to the defaults.
pub async fn effective_share(pool: &sqlx::PgPool, project_id: &str, in_pool: &str) -> Result<Share, StoreError> {
    let rows = project_shares(pool, project_id).await?;
    let row = |p: &str| rows.iter().find(|(pl, _, _)| pl == p);
    let (exact, all) = (row(in_pool), row(ALL_POOLS));
    Ok(Share {
        weight: exact.and_then(|r| r.1).or(all.and_then(|r| r.1)).unwrap_or(1.0),
        max_gpus: exact.and_then(|r| r.2).or(all.and_then(|r| r.2)).map(|n| u32::try_from(n).unwrap_or(0)),
    })
}
