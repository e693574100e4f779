//! Fair share through the real claim: the order in which one worker takes the jobs of two
//! projects, weights, quotas and priority (the rule is lathe_core::fair_share).

use std::time::Duration;

use lathe_store::dispatch::fair_share::{set_project_share, ALL_POOLS};
use lathe_store::dispatch::{claim_job, finish_attempt, AttemptOutcome, Claim, ClaimRequest, RetryPolicy, DEFAULT_HALF_LIFE};
use lathe_store::PgPool;
use serde_json::json;

use crate::support::{project, spec, training_file, worker, TestDb};

const LEASE: Duration = Duration::from_secs(60);

async fn queue(pool: &PgPool, project_id: &str, n: usize, extra: serde_json::Value) -> Vec<String> {
    let file = training_file(pool, project_id).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let (job, _) = lathe_store::jobs::create_job(pool, project_id, &spec(&file, extra.clone()), None).await.expect("job created");
        ids.push(job.id.to_string());
    }
    ids
}

async fn claim_next(pool: &PgPool, worker_id: &str) -> Option<Claim> {
    let request = ClaimRequest { worker_id, job_id: None, lease: LEASE, half_life: DEFAULT_HALF_LIFE };
    claim_job(pool, request).await.expect("claim")
}

/// Finishes the claimed attempt as if it had run for exactly `seconds` (its start is moved
/// back from its end).
async fn run_for(pool: &PgPool, claim: &Claim, seconds: f64) {
    let done = AttemptOutcome::Succeeded { fine_tuned_model: format!("ft:{}", claim.job_id), result_files: vec![], trained_tokens: None };
    finish_attempt(pool, claim.job_id.as_str(), claim.attempt, done, &RetryPolicy::default()).await.unwrap();
    sqlx::query("UPDATE attempts SET started_at = ended_at - make_interval(secs => $3) WHERE job_id = $1 AND number = $2")
        .bind(claim.job_id.as_str())
        .bind(claim.attempt)
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
}

/// Claims and runs everything one worker can, each job for `seconds`; the projects in start
/// order, as "a" and "b".
async fn drain(pool: &PgPool, worker_id: &str, a: &str, limit: usize) -> String {
    let mut order = String::new();
    while order.len() < limit {
        let Some(claim) = claim_next(pool, worker_id).await else { break };
        order.push(if claim.project_id == a { 'a' } else { 'b' });
        run_for(pool, &claim, 10.0).await;
    }
    order
}

#[tokio::test]
async fn a_second_project_does_not_wait_behind_the_first_ones_queue() {
    let db = TestDb::new().await;
    let (a, b) = (project(&db.pool, "team-a").await, project(&db.pool, "team-b").await);
    queue(&db.pool, &a, 4, json!({})).await;
    queue(&db.pool, &b, 2, json!({})).await;
    let w = worker(&db.pool, "w1").await;
    // Equal weights: B's first job goes before A's second, then they alternate while both wait.
    assert_eq!(drain(&db.pool, &w, &a, 10).await, "ababaa");
}

#[tokio::test]
async fn weights_set_the_ratio_of_starts() {
    let db = TestDb::new().await;
    let (a, b) = (project(&db.pool, "team-a").await, project(&db.pool, "team-b").await);
    set_project_share(&db.pool, &a, ALL_POOLS, Some(3.0), None).await.unwrap();
    queue(&db.pool, &a, 20, json!({})).await;
    queue(&db.pool, &b, 20, json!({})).await;
    let w = worker(&db.pool, "w1").await;
    let order = drain(&db.pool, &w, &a, 16).await;
    let starts_a = order.chars().filter(|c| *c == 'a').count();
    assert_eq!((starts_a, 16 - starts_a), (12, 4), "{order}");
}

#[tokio::test]
async fn a_quota_caps_running_gpus_and_a_pool_row_overrides_the_default() {
    let db = TestDb::new().await;
    let (a, b) = (project(&db.pool, "team-a").await, project(&db.pool, "team-b").await);
    // A would win every claim on weight, but may hold one GPU in the default pool.
    set_project_share(&db.pool, &a, ALL_POOLS, Some(100.0), Some(Some(5))).await.unwrap();
    set_project_share(&db.pool, &a, "default", None, Some(Some(1))).await.unwrap();
    queue(&db.pool, &a, 3, json!({})).await;
    queue(&db.pool, &b, 1, json!({})).await;
    let (w1, w2, w3) = (worker(&db.pool, "w1").await, worker(&db.pool, "w2").await, worker(&db.pool, "w3").await);
    let first = claim_next(&db.pool, &w1).await.expect("a job");
    assert_eq!(first.project_id, a);
    assert_eq!(claim_next(&db.pool, &w2).await.expect("a job").project_id, b);
    assert!(claim_next(&db.pool, &w3).await.is_none(), "A is at its quota, B has nothing left");
    // When A's job ends, A may start the next one.
    run_for(&db.pool, &first, 1.0).await;
    assert_eq!(claim_next(&db.pool, &w3).await.expect("a job").project_id, a);
    // Removing the pool's quota falls back to the every-pool quota of 5.
    set_project_share(&db.pool, &a, "default", None, Some(None)).await.unwrap();
    assert_eq!(claim_next(&db.pool, &w1).await.expect("a job").project_id, a);
}

#[tokio::test]
async fn priority_comes_before_fair_share() {
    let db = TestDb::new().await;
    let (a, b) = (project(&db.pool, "team-a").await, project(&db.pool, "team-b").await);
    queue(&db.pool, &a, 2, json!({})).await;
    let w = worker(&db.pool, "w1").await;
    let first = claim_next(&db.pool, &w).await.unwrap();
    run_for(&db.pool, &first, 100.0).await;
    queue(&db.pool, &b, 1, json!({})).await;
    let urgent = queue(&db.pool, &a, 1, json!({"priority": 10})).await;
    // A has used the pool and B has not, but A's urgent job outranks both.
    assert_eq!(claim_next(&db.pool, &w).await.unwrap().job_id.as_str(), urgent[0]);
}

#[tokio::test]
async fn a_claim_takes_the_next_job_when_a_concurrent_claim_holds_the_head() {
    let db = TestDb::new().await;
    let a = project(&db.pool, "team-a").await;
    let ids = queue(&db.pool, &a, 2, json!({})).await;
    let (w1, w2) = (worker(&db.pool, "w1").await, worker(&db.pool, "w2").await);
    // Another claim's transaction holds the head of A's queue.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE").bind(&ids[0]).execute(&mut *other).await.unwrap();
    let second = claim_next(&db.pool, &w2).await.expect("the job behind the held head");
    assert_eq!(second.job_id.as_str(), ids[1]);
    other.rollback().await.unwrap();
    assert_eq!(claim_next(&db.pool, &w1).await.expect("the head, once free").job_id.as_str(), ids[0]);
}

/// Moves a finished attempt `hours` into the past.
async fn shift_back(pool: &PgPool, claim: &Claim, hours: f64) {
    sqlx::query(
        "UPDATE attempts SET started_at = started_at - make_interval(secs => $3), ended_at = ended_at - make_interval(secs => $3)
         WHERE job_id = $1 AND number = $2",
    )
    .bind(claim.job_id.as_str())
    .bind(claim.attempt)
    .bind(hours * 3600.0)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn folded_recent_use_is_the_same_as_summing_every_attempt() {
    use lathe_core::fair_share::recent_gpus;
    use lathe_store::dispatch::fair_share::{fold_usage, project_load};
    let db = TestDb::new().await;
    let a = project(&db.pool, "team-fold").await;
    queue(&db.pool, &a, 3, json!({})).await;
    let w = worker(&db.pool, "fold-worker").await;
    // Ten minutes two hours ago, twenty minutes half an hour ago, one minute just now.
    let runs = [(600.0, 2.0), (1200.0, 0.5), (60.0, 0.0)];
    for (seconds, hours_ago) in runs {
        let claim = claim_next(&db.pool, &w).await.expect("a job");
        run_for(&db.pool, &claim, seconds).await;
        if hours_ago > 0.0 {
            shift_back(&db.pool, &claim, hours_ago).await;
        }
    }
    let expected = |h: f64| -> f64 { runs.iter().map(|(s, ago)| recent_gpus(1, ago * 3600.0 + s, ago * 3600.0, h)).sum() };
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-3 * want;
    let (hour, ten_minutes) = (Duration::from_secs(3600), Duration::from_secs(600));

    let summed = project_load(&db.pool, "default", &a, hour).await.unwrap();
    assert!(close(summed.recent_gpus, expected(3600.0)), "{summed:?} vs {}", expected(3600.0));
    assert_eq!(summed.running_gpus, 0);
    // The two old attempts are folded; the one that just ended is within the margin and is not.
    assert_eq!(fold_usage(&db.pool, hour).await.unwrap(), 1, "one (pool, project) sum took attempts in");
    let folded = project_load(&db.pool, "default", &a, hour).await.unwrap();
    assert!(close(folded.recent_gpus, expected(3600.0)), "after the fold: {folded:?} vs {}", expected(3600.0));
    assert!(close(folded.recent_gpus, summed.recent_gpus));
    // A running attempt counts as running, and its time so far as recent.
    queue(&db.pool, &a, 1, json!({})).await;
    let live = claim_next(&db.pool, &w).await.expect("a job");
    assert_eq!(project_load(&db.pool, "default", &a, hour).await.unwrap().running_gpus, 1);
    finish_attempt(
        &db.pool,
        live.job_id.as_str(),
        live.attempt,
        AttemptOutcome::Succeeded { fine_tuned_model: "ft:x".into(), result_files: vec![], trained_tokens: None },
        &RetryPolicy::default(),
    )
    .await
    .unwrap();
    // Another half-life: the fold starts over with it, and a claim with the old one sums again.
    fold_usage(&db.pool, ten_minutes).await.unwrap();
    let short = project_load(&db.pool, "default", &a, ten_minutes).await.unwrap();
    assert!(close(short.recent_gpus, expected(600.0)), "{short:?} vs {}", expected(600.0));
    let long = project_load(&db.pool, "default", &a, hour).await.unwrap();
    assert!(close(long.recent_gpus, expected(3600.0)), "{long:?} vs {}", expected(3600.0));
}
