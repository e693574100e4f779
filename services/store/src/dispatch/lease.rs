//! The fenced lease, written once for every kind of work a worker claims ([`Work`]): the claim
//! (a compare-and-set that increments the attempt number), renewal, the fence on every later
//! write, the requeue of a crashed or expired attempt (with backoff, poison past the limit),
//! the free release of a preempted one, and the leases kept across an outage.
//!
//! A kind differs only in its table, what a claim must fit, its order, and what a requeue
//! resets; those are the few `match`es on [`Work`] below. Jobs add their `attempts` rows and
//! checkpoints (`claim.rs`, `finish.rs`); evaluations add their items (`crate::evaluations`).

use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::types::time::OffsetDateTime;
use sqlx::{PgPool, Postgres, Transaction};

use super::reconcile::RetryPolicy;
use crate::StoreError;

/// A kind of fenced work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// A fine-tuning job (`jobs`): attempts rows, checkpoints, pause.
    Job,
    /// An evaluation (`evaluations`): progress and items; a retry starts over.
    Evaluation,
}

impl Work {
    pub const ALL: [Work; 2] = [Work::Job, Work::Evaluation];

    pub(crate) fn table(self) -> &'static str {
        match self {
            Work::Job => "jobs",
            Work::Evaluation => "evaluations",
        }
    }

    /// For messages: "job", "evaluation".
    pub fn noun(self) -> &'static str {
        match self {
            Work::Job => "job",
            Work::Evaluation => "evaluation",
        }
    }

    /// `error.code` once its attempts kept crashing or losing their worker.
    pub fn poison_code(self) -> &'static str {
        match self {
            Work::Job => super::POISON_ERROR_CODE,
            Work::Evaluation => crate::evaluations::EVALUATION_POISON_CODE,
        }
    }

    /// What the worker (`w`) must offer for a row (`t`) of this kind, beyond its pools.
    pub(crate) fn fits(self) -> &'static str {
        match self {
            Work::Job => {
                "AND t.nodes <= w.nodes AND t.gpus <= w.gpus * t.nodes
                 AND (t.gpu_memory_gb IS NULL OR t.gpu_memory_gb::bigint * 1073741824 <= coalesce(w.gpu_memory_bytes, 0))"
            }
            Work::Evaluation => "",
        }
    }

    /// Which queued row goes first.
    fn order(self) -> &'static str {
        match self {
            Work::Job => "t.priority DESC, t.created_at, t.id",
            Work::Evaluation => "t.created_at, t.id",
        }
    }

    /// A requeued row waits as `paused` instead of `queued` when this holds (a pending pause).
    fn parks_when(self) -> &'static str {
        match self {
            Work::Job => "pause_requested",
            Work::Evaluation => "false",
        }
    }

    /// What a requeue (and a claim) resets besides the lease.
    fn resets(self) -> &'static str {
        match self {
            Work::Job => "pause_requested = false, preempt_requested_at = NULL, preempted_for = NULL, pending_reason = NULL",
            Work::Evaluation => "items_done = 0",
        }
    }

    /// Jobs keep one `attempts` row per attempt; it is ended with the attempt.
    async fn end_attempt(self, tx: &mut Transaction<'_, Postgres>, id: &str, outcome: &str, reason: &str) -> Result<(), StoreError> {
        match self {
            Work::Job => crate::jobs::end_live_attempt(tx, id, outcome, reason).await,
            Work::Evaluation => Ok(()),
        }
    }
}

/// A claim's compare-and-set: the best queued row of `work` that `worker_id` may take (or
/// `id`), moved to `running` under a new attempt number and a lease, in one statement.
/// Returns the columns `returning` names (prefixed `t.`), or `None` when there is nothing to
/// take or the worker may not take work (draining, revoked, not a training identity).
///
/// The same statement notes that the worker asked for work (`last_claim_at`): demand counts
/// only workers that do as supply.
pub(crate) async fn claim<T>(
    tx: &mut Transaction<'_, Postgres>,
    work: Work,
    worker_id: &str,
    id: Option<&str>,
    lease: Duration,
    returning: &str,
) -> Result<Option<T>, StoreError>
where
    T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let table = work.table();
    let sql = format!(
        "WITH w AS (
             UPDATE workers SET last_claim_at = now()
             WHERE id = $1 AND NOT draining AND NOT serving AND revoked_at IS NULL AND 'training' = ANY(grant_roles)
             RETURNING id, pools, gpu_memory_bytes, gpus, nodes
         ), candidate AS (
             SELECT t.id FROM {table} t, w
             WHERE t.status = 'queued'
               AND ($2::text IS NULL OR t.id = $2)
               AND t.pool = ANY(w.pools)
               AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= now())
               {fits}
             ORDER BY {order}
             LIMIT 1
             FOR UPDATE OF t SKIP LOCKED
         )
         UPDATE {table} t SET status = 'running', attempt = t.attempt + 1, lease_owner = $1,
                lease_expires_at = now() + make_interval(secs => $3),
                started_at = coalesce(t.started_at, now()), next_attempt_at = NULL, {resets}
         FROM candidate
         WHERE t.id = candidate.id AND t.status = 'queued'
         RETURNING {returning}",
        fits = work.fits(),
        order = work.order(),
        resets = work.resets(),
    );
    Ok(sqlx::query_as::<_, T>(&sql).bind(worker_id).bind(id).bind(lease.as_secs_f64()).fetch_optional(&mut **tx).await?)
}

/// Locks the row and checks the fence: it is `running` under `attempt` (and leased to
/// `owner`, when given). `exclusive` takes `FOR UPDATE` (the caller changes the row), else
/// `FOR SHARE` (the caller only appends rows of the attempt; appends need not wait on each
/// other).
pub(crate) async fn lock_fenced(
    tx: &mut Transaction<'_, Postgres>,
    work: Work,
    id: &str,
    attempt: i32,
    owner: Option<&str>,
    exclusive: bool,
) -> Result<(), StoreError> {
    let lock = if exclusive { "FOR UPDATE" } else { "FOR SHARE" };
    let row: Option<(i32, String, Option<String>)> =
        sqlx::query_as(&format!("SELECT attempt, status, lease_owner FROM {} WHERE id = $1 {lock}", work.table()))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    match row {
        None => Err(StoreError::NotFound),
        Some((current, status, holder))
            if current == attempt && status == "running" && owner.is_none_or(|o| holder.as_deref() == Some(o)) =>
        {
            Ok(())
        }
        Some((current, _, _)) => Err(StoreError::StaleAttempt { job: id.to_string(), attempt, current }),
    }
}

/// Extends the lease of the attempt `worker_id` holds. `StaleAttempt` (or `NotFound`) when the
/// attempt no longer holds the row — requeued after expiry, cancelled, finished: stop.
pub async fn renew(
    pool: &PgPool,
    work: Work,
    id: &str,
    attempt: i32,
    worker_id: &str,
    lease: Duration,
) -> Result<OffsetDateTime, StoreError> {
    let table = work.table();
    let renewed: Option<OffsetDateTime> = sqlx::query_scalar(&format!(
        "UPDATE {table} SET lease_expires_at = now() + make_interval(secs => $4)
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND lease_owner = $3
         RETURNING lease_expires_at"
    ))
    .bind(id)
    .bind(attempt)
    .bind(worker_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    if let Some(expires_at) = renewed {
        return Ok(expires_at);
    }
    let current: i32 = sqlx::query_scalar(&format!("SELECT attempt FROM {table} WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?;
    Err(StoreError::StaleAttempt { job: id.to_string(), attempt, current })
}

/// Spends one retry: back to the queue after a backoff (parked as paused when a pause was
/// pending), or failed as poison once the budget is spent. The caller holds the row lock and
/// has ended the attempt. Returns the new status.
pub(crate) async fn requeue_after_crash(
    tx: &mut Transaction<'_, Postgres>,
    work: Work,
    id: &str,
    reason: &str,
    now: OffsetDateTime,
    policy: &RetryPolicy,
) -> Result<String, StoreError> {
    let sql = format!(
        "UPDATE {table} SET
             retries = retries + 1,
             status = CASE WHEN retries + 1 > $2 THEN 'failed'
                           WHEN {parks} THEN 'paused' ELSE 'queued' END,
             error = CASE WHEN retries + 1 > $2 THEN jsonb_build_object(
                         'code', $3::text,
                         'message', format('the {noun} crashed or lost its worker %s times; last: %s', retries + 1, $4::text),
                         'param', NULL)
                     ELSE error END,
             finished_at = CASE WHEN retries + 1 > $2 THEN $5 ELSE NULL END,
             next_attempt_at = CASE WHEN retries + 1 > $2 OR {parks} THEN NULL
                                    ELSE $5 + make_interval(secs => least($7, $6 * power(2, retries))) END,
             {resets}, lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1
         RETURNING status",
        table = work.table(),
        parks = work.parks_when(),
        noun = work.noun(),
        resets = work.resets(),
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(id)
        .bind(policy.max_retries)
        .bind(work.poison_code())
        .bind(reason)
        .bind(now)
        .bind(policy.base_backoff.as_secs_f64())
        .bind(policy.max_backoff.as_secs_f64())
        .fetch_one(&mut **tx)
        .await?)
}

/// Gives the row back without spending a retry (preempted, paused, its worker revoked):
/// queued at once, or parked as paused when a pause was pending. The caller holds the row
/// lock and has ended the attempt.
pub(crate) async fn release(tx: &mut Transaction<'_, Postgres>, work: Work, id: &str) -> Result<(), StoreError> {
    release_after(tx, work, id, None).await
}

/// [`release`], not dispatched again before `not_before` (an infrastructure fault's backoff).
pub(crate) async fn release_after(
    tx: &mut Transaction<'_, Postgres>,
    work: Work,
    id: &str,
    not_before: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE {table} SET status = CASE WHEN {parks} THEN 'paused' ELSE 'queued' END,
                {resets}, lease_owner = NULL, lease_expires_at = NULL,
                next_attempt_at = CASE WHEN {parks} THEN NULL ELSE $2 END
         WHERE id = $1",
        table = work.table(),
        parks = work.parks_when(),
        resets = work.resets(),
    ))
    .bind(id)
    .bind(not_before)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Work taken back from an attempt, by the reconciler or a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub work: Work,
    pub id: String,
    /// The attempt that lost it.
    pub attempt: i32,
    /// The row's new status (`queued`, `paused`, or `failed` as poison).
    pub status: String,
}

/// Ends every running attempt of `work` whose lease expired before `now` as `lease_lost`, a
/// crash each. Rows another reconciler holds are skipped, so replicas may run this at once.
pub async fn requeue_expired(pool: &PgPool, work: Work, now: OffsetDateTime, policy: &RetryPolicy) -> Result<Vec<Requeued>, StoreError> {
    let mut tx = pool.begin().await?;
    let expired: Vec<(String, i32)> = sqlx::query_as(&format!(
        "SELECT id, attempt FROM {} WHERE status = 'running' AND lease_expires_at < $1
         ORDER BY lease_expires_at LIMIT 500 FOR UPDATE SKIP LOCKED",
        work.table()
    ))
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut requeued = Vec::with_capacity(expired.len());
    for (id, attempt) in expired {
        let reason = format!("lease of attempt {attempt} expired");
        work.end_attempt(&mut tx, &id, "lease_lost", &reason).await?;
        let status = requeue_after_crash(&mut tx, work, &id, &reason, now, policy).await?;
        requeued.push(Requeued { work, id, attempt, status });
    }
    tx.commit().await?;
    Ok(requeued)
}

/// Gives back, for free, everything the `workers` hold (an operator revoked them): their
/// attempts end as `revoked`, and the work is queued again at once, to resume from its last
/// checkpoint. The caller's transaction also marks the workers revoked.
pub(crate) async fn release_held_by(
    tx: &mut Transaction<'_, Postgres>,
    workers: &[String],
    reason: &str,
) -> Result<Vec<Requeued>, StoreError> {
    let mut released = Vec::new();
    for work in Work::ALL {
        let held: Vec<(String, i32)> = sqlx::query_as(&format!(
            "SELECT id, attempt FROM {} WHERE status = 'running' AND lease_owner = ANY($1) ORDER BY id FOR UPDATE",
            work.table()
        ))
        .bind(workers)
        .fetch_all(&mut **tx)
        .await?;
        for (id, attempt) in held {
            work.end_attempt(tx, &id, "revoked", reason).await?;
            release(tx, work, &id).await?;
            let status: String =
                sqlx::query_scalar(&format!("SELECT status FROM {} WHERE id = $1", work.table())).bind(&id).fetch_one(&mut **tx).await?;
            released.push(Requeued { work, id, attempt, status });
        }
    }
    Ok(released)
}

/// Notes a reconciler pass and, when the previous one is older than `gap` (Postgres was
/// unreachable, or no controller ran), first extends every running lease of every kind to
/// at least `lease` from now: no worker could renew meanwhile, and the ones still working must
/// get to renew before anything is requeued. Returns how long the gap was when it extended.
pub async fn keep_leases_across_gap(pool: &PgPool, gap: Duration, lease: Duration) -> Result<Option<Duration>, StoreError> {
    let mut tx = pool.begin().await?;
    // The previous pass, then this one; the row lock orders concurrent passes.
    let previous: Option<OffsetDateTime> =
        sqlx::query_scalar("SELECT last_pass_at FROM reconciler_state FOR UPDATE").fetch_optional(&mut *tx).await?;
    let now: OffsetDateTime = sqlx::query_scalar(
        "INSERT INTO reconciler_state (id, last_pass_at) VALUES (true, now())
         ON CONFLICT (id) DO UPDATE SET last_pass_at = now() RETURNING last_pass_at",
    )
    .fetch_one(&mut *tx)
    .await?;
    let since = previous.map(|p| now - p).filter(|since| since.as_seconds_f64() > gap.as_secs_f64());
    if since.is_some() {
        for work in Work::ALL {
            sqlx::query(&format!(
                "UPDATE {} SET lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => $1))
                 WHERE status = 'running'",
                work.table()
            ))
            .bind(lease.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(since.map(|s| Duration::from_secs_f64(s.as_seconds_f64())))
}
