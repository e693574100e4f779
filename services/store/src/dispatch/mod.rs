//! Dispatch: how a queued job gets to exactly one worker at a time, and how that worker's
//! reports reach Postgres (docs/architecture.md §3).
//!
//! **Promise.** At-least-once dispatch, at most one live attempt per job, idempotent effects.
//!
//! **Claim is a compare-and-set.** [`claim_job`] takes the queued jobs the worker fits in the
//! order fair share ranks them ([`lathe_core::fair_share`], inputs loaded by [`fair_share`]) and
//! tries each with one `UPDATE … WHERE status = 'queued'` on the row picked `FOR UPDATE SKIP
//! LOCKED`: it moves the job to `running`, increments
//! `jobs.attempt`, and sets the lease (owner and expiry) in the same statement, then inserts
//! the `attempts` row. Two workers racing for one job cannot both win: the loser either skips
//! the locked row or finds it no longer queued, and gets `None`. Behind that, the unique index
//! `attempts_one_live_per_job` makes Postgres itself refuse a second live attempt.
//!
//! **The attempt number is a fencing token.** The worker carries it in every later call, and
//! every write ([`record_metrics`], [`append_events`], [`commit_checkpoint`],
//! [`finish_attempt`], [`renew_lease`]) first locks the job row and checks that the job is
//! still `running` under that same attempt; otherwise it is refused with
//! [`StoreError::StaleAttempt`]. The check and the write commit together, so a worker whose
//! lease was taken away (it froze, its network split, the user cancelled) can never write over
//! the attempt that replaced it — however late its messages arrive.
//!
//! **Leases.** A worker renews its lease every heartbeat (order of 10 s, lease 60 s). The
//! reconciler calls [`requeue_expired_leases`]: a running job whose lease expired is treated
//! as a crash of its attempt — back to `queued` with a backoff (`next_attempt_at`), one retry
//! spent; past the retry limit it is failed as poison (`error.code` [`POISON_ERROR_CODE`])
//! instead of killing workers forever. The next claim hands out the last committed checkpoint
//! ([`Claim::resume_from`]), so work since then is redone, never lost or doubled.
//!
//! **Preemption is free.** A worker that gets SIGTERM, or that the controller asks to make
//! room for a higher-priority job ([`preempt`]), checkpoints and calls [`release_preempted`]:
//! back to the queue without spending the retry budget.
//!
//! **Idempotent effects.** Metric points are keyed by (job, step) and events by (job,
//! attempt, seq): a reconnecting worker resends what was not acked and nothing is stored
//! twice; an attempt that replays steps after a resume overwrites the older attempt's points.
//!
//! **Redis is a wake-up, not a queue of record.** [`queued_job_ids`] is what the reconciler
//! re-publishes when Redis lost its list (restart, FLUSHALL): a duplicate id in Redis costs a
//! failed claim, never a second run.

mod claim;
pub mod fair_share;
mod finish;
pub mod lease;
pub mod pending;
pub mod preempt;
mod reconcile;
pub(crate) mod report;

pub use claim::{claim_job, renew_lease, Claim, ClaimRequest, DEFAULT_HALF_LIFE};
pub use finish::{finish_attempt, release_preempted, AttemptOutcome};
pub use lease::{keep_leases_across_gap, Requeued, Work};
pub use reconcile::{queued_job_ids, requeue_expired_leases, QueuedJob, RequeuedJob, RetryPolicy, POISON_ERROR_CODE};
pub use report::{
    add_job_event, append_events, commit_checkpoint, latest_checkpoint, record_metrics, record_progress, Checkpoint, Event, EventLevel,
    MetricPoint, NewEvent,
};

use sqlx::{Postgres, Transaction};

use crate::StoreError;

/// Locks a job's row and checks the fence (see [`lease::lock_fenced`]); the stream that
/// writes for an attempt proved its worker when it opened, so the attempt number is the fence.
pub(crate) async fn lock_attempt(
    tx: &mut Transaction<'_, Postgres>,
    job_id: &str,
    attempt: i32,
    exclusive: bool,
) -> Result<(), StoreError> {
    lease::lock_fenced(tx, Work::Job, job_id, attempt, None, exclusive).await
}
