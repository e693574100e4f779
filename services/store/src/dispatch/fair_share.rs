//! What a claim needs to apply fair share ([`lathe_core::fair_share`]): the queued jobs a
//! worker could take, and the share and load of their projects, read in the claim's
//! transaction. The rule itself is in lathe-core; this module only loads its inputs.

use std::collections::HashMap;
use std::time::Duration;

use lathe_core::fair_share::{Candidate, ProjectLoad, ProjectState, Projects, Share};
use sqlx::types::time::OffsetDateTime;
use sqlx::{PgPool, Postgres, Transaction};

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

/// The fold's half-life and cut, with one (pool, project)'s folded use decayed to now.
type FoldedRow = (f64, OffsetDateTime, Option<String>, Option<String>, Option<f64>);

/// Running GPUs and recent GPUs (decayed GPU-seconds over the half-life, as
/// [`lathe_core::fair_share::recent_gpus`] computes them) per (pool, project). With a fold
/// ([`fold_usage`]) for this half-life: the folded sum decayed to now, plus the attempts live or
/// ended since the fold — a few hundred rows however long the history. Without one: every
/// attempt live or ended within [`HALF_LIVES_KEPT`] half-lives.
async fn loads(
    tx: &mut Transaction<'_, Postgres>,
    pools: &[String],
    projects: &[String],
    half_life: Duration,
) -> Result<HashMap<(String, String), ProjectLoad>, StoreError> {
    let h = half_life.as_secs_f64();
    // The fold and its sums in one statement (one snapshot): a fold committing meanwhile cannot
    // pair a new cut with old sums.
    let folded: Vec<FoldedRow> = sqlx::query_as(
        "SELECT f.half_life_seconds, f.as_of, u.pool, u.project_id,
                u.decayed * power(2::float8, -least(extract(epoch FROM now() - f.as_of)::float8 / f.half_life_seconds, 1000)) / ln(2)
         FROM usage_fold f LEFT JOIN project_usage u ON u.pool = ANY($1) AND u.project_id = ANY($2)",
    )
    .bind(pools)
    .bind(projects)
    .fetch_all(&mut **tx)
    .await?;
    let folded: Vec<_> = folded.into_iter().filter(|(folded_h, ..)| (folded_h - h).abs() < 1e-9).collect();
    let fold_as_of = folded.first().map(|(_, as_of, ..)| *as_of);
    // The attempts to sum one by one: live ones, and those ended after the fold (or within the
    // kept half-lives when there is none). Two index scans, not one over an OR.
    let since = match fold_as_of {
        Some(as_of) => as_of,
        None => OffsetDateTime::now_utc() - Duration::from_secs_f64(h * HALF_LIVES_KEPT),
    };
    let rows: Vec<(String, String, i64, f64)> = sqlx::query_as(&format!(
        "SELECT j.pool, j.project_id,
                coalesce(sum(j.gpus) FILTER (WHERE a.ended_at IS NULL), 0)::bigint,
                coalesce(sum(j.gpus * ({contribution})), 0)::float8 / ln(2)
         FROM (SELECT job_id, started_at, ended_at FROM attempts WHERE ended_at IS NULL
               UNION ALL
               SELECT job_id, started_at, ended_at FROM attempts WHERE ended_at > $3) a
         JOIN jobs j ON j.id = a.job_id
         WHERE j.pool = ANY($1) AND j.project_id = ANY($2)
         GROUP BY j.pool, j.project_id",
        contribution = decayed_contribution("now()", "$4")
    ))
    .bind(pools)
    .bind(projects)
    .bind(since)
    .bind(h)
    .fetch_all(&mut **tx)
    .await?;
    let mut loads: HashMap<(String, String), ProjectLoad> = rows
        .into_iter()
        .map(|(pool, project, running, recent)| {
            ((pool, project), ProjectLoad { running_gpus: u32::try_from(running).unwrap_or(u32::MAX), recent_gpus: recent.max(0.0) })
        })
        .collect();
    for (_, _, pool, project, recent) in folded {
        if let (Some(pool), Some(project), Some(recent)) = (pool, project, recent) {
            loads.entry((pool, project)).or_default().recent_gpus += recent.max(0.0);
        }
    }
    Ok(loads)
}

/// A project's load in a pool as a claim sees it now: for operators and tests.
pub async fn project_load(pool: &PgPool, in_pool: &str, project_id: &str, half_life: Duration) -> Result<ProjectLoad, StoreError> {
    let mut tx = pool.begin().await?;
    let loads = loads(&mut tx, &[in_pool.to_string()], &[project_id.to_string()], half_life).await?;
    tx.commit().await?;
    Ok(loads.get(&(in_pool.to_string(), project_id.to_string())).copied().unwrap_or_default())
}

/// SQL for one attempt's decayed GPU-seconds per GPU at time `at` (not yet over ln 2): the
/// integral of `2^(-age / h)` over its run, `a.started_at` to `a.ended_at` (or `at` while live).
fn decayed_contribution(at: &str, h: &str) -> String {
    format!(
        "power(2::float8, -least(extract(epoch FROM {at} - coalesce(a.ended_at, {at}))::float8 / {h}, 1000))
       - power(2::float8, -least(extract(epoch FROM {at} - a.started_at)::float8 / {h}, 1000))"
    )
}

/// Attempts ending this recently are not folded yet: the transaction that ended one may still
/// be committing when the fold reads.
const FOLD_MARGIN: Duration = Duration::from_secs(30);

/// Folds the attempts that ended since the last fold (and at least [`FOLD_MARGIN`] ago) into
/// each (pool, project)'s decayed use, so that claims sum only what is live or recent. Run by
/// the reconciler's leader every pass; a half-life other than the folded one starts over from
/// the attempts of the kept half-lives. Exact: decaying the folded sum from the fold to now is
/// decaying each of its attempts. Returns how many (pool, project) sums took new attempts in.
pub async fn fold_usage(pool: &PgPool, half_life: Duration) -> Result<u64, StoreError> {
    let h = half_life.as_secs_f64();
    let mut tx = pool.begin().await?;
    let fold: Option<(f64, OffsetDateTime)> =
        sqlx::query_as("SELECT half_life_seconds, as_of FROM usage_fold FOR UPDATE").fetch_optional(&mut *tx).await?;
    let cut = OffsetDateTime::now_utc() - FOLD_MARGIN;
    let (from, keep) = match fold {
        Some((folded_h, as_of)) if (folded_h - h).abs() < 1e-9 => {
            if cut <= as_of {
                return Ok(0);
            }
            // Everything folded so far, decayed to the new cut.
            sqlx::query("UPDATE project_usage SET decayed = decayed * power(2::float8, -least($1, 1000))")
                .bind((cut - as_of).as_seconds_f64() / h)
                .execute(&mut *tx)
                .await?;
            (as_of, true)
        }
        _ => (cut - Duration::from_secs_f64(h * HALF_LIVES_KEPT), false),
    };
    if !keep {
        sqlx::query("DELETE FROM project_usage").execute(&mut *tx).await?;
    }
    let folded = sqlx::query(&format!(
        "INSERT INTO project_usage (pool, project_id, decayed)
         SELECT j.pool, j.project_id, sum(j.gpus * ({contribution}))
         FROM attempts a JOIN jobs j ON j.id = a.job_id
         WHERE a.ended_at > $1 AND a.ended_at <= $2
         GROUP BY j.pool, j.project_id
         ON CONFLICT (pool, project_id) DO UPDATE SET decayed = project_usage.decayed + excluded.decayed",
        contribution = decayed_contribution("$2::timestamptz", "$3")
    ))
    .bind(from)
    .bind(cut)
    .bind(h)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO usage_fold (id, half_life_seconds, as_of) VALUES (true, $1, $2)
         ON CONFLICT (id) DO UPDATE SET half_life_seconds = $1, as_of = $2",
    )
    .bind(h)
    .bind(cut)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(folded.rows_affected())
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
