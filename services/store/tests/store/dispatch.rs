use std::time::Duration;

use lathe_core::JobStatus;
use lathe_store::dispatch::{
    append_events, claim_job, commit_checkpoint, finish_attempt, queued_job_ids, record_metrics, record_progress, release_preempted,
    renew_lease, requeue_expired_leases, AttemptOutcome, ClaimRequest, EventLevel, MetricPoint, NewEvent, RetryPolicy, POISON_ERROR_CODE,
};
use lathe_store::jobs::{create_job, get_job, pause_job};
use lathe_store::progress::{kept_checkpoint, list_checkpoints, list_events, list_metrics};
use lathe_store::time::OffsetDateTime;
use lathe_store::{PgPool, StoreError};
use serde_json::json;

use crate::support::{as_job_id, project, queued_job, spec, training_file, worker, worker_with, TestDb};

const LEASE: Duration = Duration::from_secs(60);

/// No backoff, so that a requeued job can be claimed again at once.
const NO_BACKOFF: RetryPolicy = RetryPolicy { max_retries: 2, base_backoff: Duration::ZERO, max_backoff: Duration::ZERO };

fn point(step: i64, train_loss: f32) -> MetricPoint {
    MetricPoint { step, total_steps: Some(100), train_loss: Some(train_loss), ..MetricPoint::default() }
}

async fn claim(pool: &PgPool, worker_id: &str, job_id: &str, lease: Duration) -> Option<lathe_store::dispatch::Claim> {
    claim_job(pool, ClaimRequest { worker_id, job_id: Some(job_id), lease, half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE })
        .await
        .unwrap()
}

/// Claims with a lease that is over by the time this returns.
async fn claim_and_let_lease_expire(pool: &PgPool, worker_id: &str, job_id: &str) -> i32 {
    let claim = claim(pool, worker_id, job_id, Duration::from_millis(1)).await.expect("claimed");
    tokio::time::sleep(Duration::from_millis(20)).await;
    claim.attempt
}

#[tokio::test]
async fn a_claim_increments_the_attempt_and_a_write_with_the_old_attempt_is_refused() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_a = worker(&db.pool, "a").await;
    let worker_b = worker(&db.pool, "b").await;

    let first = claim(&db.pool, &worker_a, &job_id, LEASE).await.expect("claimed");
    assert_eq!(first.attempt, 1);
    assert_eq!(first.resume_from, None);
    assert_eq!(first.project_id, project_id);
    let running = get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!((running.status, running.attempt), (JobStatus::Running, 1));

    release_preempted(&db.pool, &job_id, 1).await.unwrap();
    let second = claim(&db.pool, &worker_b, &job_id, LEASE).await.expect("claimed again");
    assert_eq!(second.attempt, 2);

    let stale = record_metrics(&db.pool, &job_id, 1, &[point(1, 2.0)]).await;
    assert!(matches!(stale, Err(StoreError::StaleAttempt { ref job, attempt: 1, current: 2 }) if *job == job_id), "{stale:?}");
    let stale_checkpoint = commit_checkpoint(&db.pool, &job_id, 1, 10, "ckpt/10", &json!({})).await;
    assert!(matches!(stale_checkpoint, Err(StoreError::StaleAttempt { .. })));
    let stale_finish = finish_attempt(
        &db.pool,
        &job_id,
        1,
        AttemptOutcome::Succeeded { fine_tuned_model: "ft:x".into(), result_files: vec![], trained_tokens: None },
        &RetryPolicy::default(),
    )
    .await;
    assert!(matches!(stale_finish, Err(StoreError::StaleAttempt { .. })));
    let stale_renewal = renew_lease(&db.pool, &job_id, 1, &worker_a, LEASE).await;
    assert!(matches!(stale_renewal, Err(StoreError::StaleAttempt { attempt: 1, current: 2, .. })));

    assert_eq!(record_metrics(&db.pool, &job_id, 2, &[point(1, 2.0)]).await.unwrap(), 1);
    assert!(list_metrics(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().iter().all(|p| p.step == 1));
    assert_eq!(get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().status, JobStatus::Running);
}

#[tokio::test]
async fn two_workers_claiming_the_same_job_at_once_give_exactly_one_winner() {
    let db = TestDb::new().await;
    for round in 0..10 {
        let (_, job_id) = queued_job(&db.pool, &format!("p{round}")).await;
        let workers = [worker(&db.pool, "a").await, worker(&db.pool, "b").await];
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|worker_id| {
                let (pool, job_id) = (db.pool.clone(), job_id.clone());
                tokio::spawn(async move { claim(&pool, &worker_id, &job_id, LEASE).await.map(|c| c.attempt) })
            })
            .collect();
        let mut wins = Vec::new();
        for task in tasks {
            wins.extend(task.await.unwrap());
        }
        assert_eq!(wins, vec![1], "round {round}");
        let attempts: i64 =
            sqlx::query_scalar("SELECT count(*) FROM attempts WHERE job_id = $1").bind(&job_id).fetch_one(&db.pool).await.unwrap();
        assert_eq!(attempts, 1);
    }
}

#[tokio::test]
async fn an_expired_lease_is_requeued_and_the_next_claim_resumes_from_the_last_checkpoint() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_a = worker(&db.pool, "a").await;
    let worker_b = worker(&db.pool, "b").await;

    let first = claim(&db.pool, &worker_a, &job_id, Duration::from_millis(200)).await.unwrap();
    commit_checkpoint(&db.pool, &job_id, first.attempt, 10, "jobs/x/ckpt-10", &json!({"train_loss": 2.5})).await.unwrap();
    let newest = commit_checkpoint(&db.pool, &job_id, first.attempt, 20, "jobs/x/ckpt-20", &json!({"train_loss": 1.9})).await.unwrap();
    assert!(newest.id.as_str().starts_with("ftckpt_"));

    // Nothing expired yet: the reconciler leaves the job alone.
    assert!(requeue_expired_leases(&db.pool, OffsetDateTime::now_utc(), &NO_BACKOFF).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let requeued = requeue_expired_leases(&db.pool, OffsetDateTime::now_utc(), &NO_BACKOFF).await.unwrap();
    assert_eq!(requeued.len(), 1);
    assert_eq!((requeued[0].job_id.as_str(), requeued[0].attempt, requeued[0].status), (job_id.as_str(), 1, JobStatus::Queued));
    let job = get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!((job.status, job.retries), (JobStatus::Queued, 1));
    assert_eq!(queued_job_ids(&db.pool).await.unwrap().iter().map(|q| q.job_id.to_string()).collect::<Vec<_>>(), [job_id.as_str()]);

    let second = claim(&db.pool, &worker_b, &job_id, LEASE).await.expect("claimed after requeue");
    assert_eq!(second.attempt, 2);
    let resume = second.resume_from.expect("resumes from a checkpoint");
    assert_eq!((resume.step, resume.path.as_str(), resume.id), (20, "jobs/x/ckpt-20", newest.id));
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM attempts WHERE job_id = $1 AND number = 1")
        .bind(&job_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "lease_lost");
    let resumed_from: Option<i64> = sqlx::query_scalar("SELECT resumed_from_step FROM attempts WHERE job_id = $1 AND number = 2")
        .bind(&job_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(resumed_from, Some(20));
}

#[tokio::test]
async fn a_job_failing_past_the_retry_limit_is_failed_as_poison() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;

    // max_retries 2: crashes 1 and 2 are retried, crash 3 is poison.
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    let crashed = AttemptOutcome::Crashed { reason: "worker process panicked".into() };
    let job = finish_attempt(&db.pool, &job_id, attempt, crashed, &NO_BACKOFF).await.unwrap();
    assert_eq!((job.status, job.retries), (JobStatus::Queued, 1));

    claim_and_let_lease_expire(&db.pool, &worker_id, &job_id).await;
    let requeued = requeue_expired_leases(&db.pool, OffsetDateTime::now_utc(), &NO_BACKOFF).await.unwrap();
    assert_eq!(requeued[0].status, JobStatus::Queued);

    claim_and_let_lease_expire(&db.pool, &worker_id, &job_id).await;
    let requeued = requeue_expired_leases(&db.pool, OffsetDateTime::now_utc(), &NO_BACKOFF).await.unwrap();
    assert_eq!((requeued[0].attempt, requeued[0].status), (3, JobStatus::Failed));

    let job = get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!((job.status, job.retries), (JobStatus::Failed, 3));
    let error = job.error.expect("a poison job says why");
    assert_eq!(error.code, POISON_ERROR_CODE);
    assert!(error.message.contains("3 times"), "{}", error.message);
    assert!(job.finished_at.is_some());
    assert!(claim(&db.pool, &worker_id, &job_id, LEASE).await.is_none());
    assert!(queued_job_ids(&db.pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_is_retried_only_after_its_backoff() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let policy = RetryPolicy { max_retries: 3, base_backoff: Duration::from_secs(30), max_backoff: Duration::from_secs(60) };

    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    let before = OffsetDateTime::now_utc();
    finish_attempt(&db.pool, &job_id, attempt, AttemptOutcome::Crashed { reason: "oom".into() }, &policy).await.unwrap();

    let job = get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    let wait = job.next_attempt_at.expect("backoff set") - before;
    assert!(wait.whole_seconds() >= 29 && wait.whole_seconds() <= 31, "{wait}");
    assert!(claim(&db.pool, &worker_id, &job_id, LEASE).await.is_none(), "claimed during backoff");
    assert!(queued_job_ids(&db.pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_preempted_attempt_is_requeued_without_spending_a_retry() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;

    for expected_attempt in 1..=5 {
        let claimed = claim(&db.pool, &worker_id, &job_id, LEASE).await.expect("claimable at once");
        assert_eq!(claimed.attempt, expected_attempt);
        let job = release_preempted(&db.pool, &job_id, claimed.attempt).await.unwrap();
        assert_eq!((job.status, job.retries, job.next_attempt_at), (JobStatus::Queued, 0, None));
    }
    assert_eq!(get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().attempt, 5);
}

#[tokio::test]
async fn metric_points_resent_after_a_reconnect_are_stored_once() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;

    let batch: Vec<MetricPoint> = (1..=50).map(|step| point(step, 3.0 - step as f32 * 0.01)).collect();
    assert_eq!(record_metrics(&db.pool, &job_id, attempt, &batch).await.unwrap(), 50);
    // The worker reconnects and resends the unacknowledged tail, one point twice in a batch.
    let mut resent = batch[40..].to_vec();
    resent.push(batch[49].clone());
    resent.push(point(51, 2.0));
    assert_eq!(record_metrics(&db.pool, &job_id, attempt, &resent).await.unwrap(), 1);

    let curve = list_metrics(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!(curve.len(), 51);
    assert_eq!(curve.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=51).collect::<Vec<_>>());
    assert_eq!(curve[9].train_loss, Some(2.9));
    assert_eq!(curve[0].total_steps, Some(100));
}

#[tokio::test]
async fn steps_replayed_by_a_resumed_attempt_replace_the_older_attempts_points() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let first = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    record_metrics(&db.pool, &job_id, first, &[point(1, 3.0), point(2, 2.9), point(3, 2.8)]).await.unwrap();
    release_preempted(&db.pool, &job_id, first).await.unwrap();

    let second = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    record_metrics(&db.pool, &job_id, second, &[point(2, 2.7), point(3, 2.6)]).await.unwrap();

    let losses: Vec<Option<f32>> =
        list_metrics(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().iter().map(|p| p.train_loss).collect();
    assert_eq!(losses, [Some(3.0), Some(2.7), Some(2.6)]);
}

#[tokio::test]
async fn events_resent_with_the_same_seq_are_stored_once_and_listed_newest_first() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    let event = |seq: i64, message: &str| NewEvent {
        seq,
        level: EventLevel::Info,
        kind: "message".into(),
        message: message.into(),
        data: Some(json!({ "seq": seq })),
    };

    assert_eq!(append_events(&db.pool, &job_id, attempt, &[event(1, "loading model"), event(2, "step 1")]).await.unwrap(), 2);
    assert_eq!(append_events(&db.pool, &job_id, attempt, &[event(2, "step 1"), event(3, "step 2")]).await.unwrap(), 1);

    let page = list_events(&db.pool, &project_id, &as_job_id(&job_id), None, 2).await.unwrap();
    assert!(page.has_more);
    assert_eq!(page.items.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["step 2", "step 1"]);
    assert_eq!(page.items[0].data, Some(json!({ "seq": 3 })));
    let rest = list_events(&db.pool, &project_id, &as_job_id(&job_id), Some(&page.items[1].id), 10).await.unwrap();
    assert_eq!(rest.items.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["loading model"]);
    assert!(!rest.has_more);

    let other_project = project(&db.pool, "other").await;
    assert!(matches!(list_events(&db.pool, &other_project, &as_job_id(&job_id), None, 10).await, Err(StoreError::NotFound)));
    assert!(matches!(list_metrics(&db.pool, &other_project, &as_job_id(&job_id)).await, Err(StoreError::NotFound)));
    assert!(matches!(list_checkpoints(&db.pool, &other_project, &as_job_id(&job_id), 3, None, 10).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn a_succeeded_attempt_finishes_the_job_with_its_model_and_result_files() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    renew_lease(&db.pool, &job_id, attempt, &worker_id, LEASE).await.unwrap();
    let other_worker = worker(&db.pool, "b").await;
    assert!(matches!(renew_lease(&db.pool, &job_id, attempt, &other_worker, LEASE).await, Err(StoreError::StaleAttempt { .. })));

    let outcome = AttemptOutcome::Succeeded {
        fine_tuned_model: format!("ft:tiny-qwen3::{job_id}"),
        result_files: vec!["file-AAAAAAAAAAAAAAAAAAAAAAAA".into()],
        trained_tokens: Some(12345),
    };
    let job = finish_attempt(&db.pool, &job_id, attempt, outcome, &RetryPolicy::default()).await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.fine_tuned_model.as_deref(), Some(format!("ft:tiny-qwen3::{job_id}").as_str()));
    assert_eq!(job.trained_tokens, Some(12345));
    assert!(job.finished_at.is_some());
    assert!(matches!(record_metrics(&db.pool, &job_id, attempt, &[point(1, 1.0)]).await, Err(StoreError::StaleAttempt { .. })));
    assert_eq!(get_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap(), job);
}

#[tokio::test]
async fn a_pause_of_a_running_job_reaches_the_worker_and_ends_the_attempt_as_paused() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;

    let requested = pause_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!((requested.status, requested.pause_requested), (JobStatus::Running, true));
    renew_lease(&db.pool, &job_id, attempt, &worker_id, LEASE).await.unwrap();

    commit_checkpoint(&db.pool, &job_id, attempt, 7, "ckpt-7", &json!({})).await.unwrap();
    let paused = finish_attempt(&db.pool, &job_id, attempt, AttemptOutcome::Paused, &RetryPolicy::default()).await.unwrap();
    assert_eq!((paused.status, paused.pause_requested), (JobStatus::Paused, false));
    let page = list_checkpoints(&db.pool, &project_id, &as_job_id(&job_id), 3, None, 10).await.unwrap();
    assert_eq!(page.items.iter().map(|c| c.step).collect::<Vec<_>>(), [7]);
}

#[tokio::test]
async fn only_the_newest_kept_checkpoints_are_listed_and_found() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    for step in [10, 20, 30, 40, 50] {
        commit_checkpoint(&db.pool, &job_id, attempt, step, &format!("ckpt-{step}"), &json!({})).await.unwrap();
    }
    let steps = |keep: i64| {
        let (pool, project_id, job_id) = (db.pool.clone(), project_id.clone(), as_job_id(&job_id));
        async move {
            list_checkpoints(&pool, &project_id, &job_id, keep, None, 10).await.unwrap().items.iter().map(|c| c.step).collect::<Vec<_>>()
        }
    };
    assert_eq!(steps(3).await, [50, 40, 30]);
    assert_eq!(steps(1).await, [50]);
    assert_eq!(steps(10).await, [50, 40, 30, 20, 10]);
    assert_eq!(kept_checkpoint(&db.pool, &job_id, 30, 3).await.unwrap().map(|c| c.path), Some("ckpt-30".to_string()));
    assert!(kept_checkpoint(&db.pool, &job_id, 20, 3).await.unwrap().is_none(), "pruned by the worker: not a model any more");
    assert!(kept_checkpoint(&db.pool, &job_id, 35, 3).await.unwrap().is_none());
}

#[tokio::test]
async fn a_worker_takes_only_jobs_of_its_pools_that_fit_its_memory_best_priority_first() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let create = |extra: serde_json::Value| {
        let (pool, project_id, spec) = (db.pool.clone(), project_id.clone(), spec(&file, extra));
        async move { create_job(&pool, &project_id, &spec, None).await.unwrap().0.id.to_string() }
    };
    let big = create(json!({ "pool": "gpu", "gpu_memory_gb": 80 })).await;
    let low = create(json!({ "pool": "gpu", "gpu_memory_gb": 16, "priority": -5 })).await;
    let high = create(json!({ "pool": "gpu", "priority": 10 })).await;
    let elsewhere = create(json!({ "pool": "cpu" })).await;

    let gpu_24gb = worker_with(&db.pool, "gpu", &["gpu".to_string()], Some(24 << 30)).await;
    let next = |worker_id: String| {
        let pool = db.pool.clone();
        async move {
            claim_job(
                &pool,
                ClaimRequest { worker_id: &worker_id, job_id: None, lease: LEASE, half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE },
            )
            .await
            .unwrap()
            .map(|c| c.job_id.to_string())
        }
    };
    assert_eq!(next(gpu_24gb.clone()).await, Some(high));
    assert_eq!(next(gpu_24gb.clone()).await, Some(low));
    assert_eq!(next(gpu_24gb.clone()).await, None, "80 GB job on a 24 GB worker, or another pool's job");
    assert!(claim(&db.pool, &gpu_24gb, &big, LEASE).await.is_none());
    assert!(claim(&db.pool, &gpu_24gb, &elsewhere, LEASE).await.is_none());
    let mut queued: Vec<String> = queued_job_ids(&db.pool).await.unwrap().into_iter().map(|q| q.job_id.to_string()).collect();
    queued.sort();
    let mut expected = vec![big, elsewhere];
    expected.sort();
    assert_eq!(queued, expected);
}

#[tokio::test]
async fn a_point_resent_with_its_validation_loss_is_completed_not_ignored() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    record_metrics(&db.pool, &job_id, attempt, &[point(10, 2.5)]).await.unwrap();
    // The eval of step 10 finished after its point went out: the worker sends it again, whole.
    let completed = MetricPoint { valid_loss: Some(2.25), valid_mean_token_accuracy: Some(0.5), ..point(10, 2.5) };
    assert_eq!(record_metrics(&db.pool, &job_id, attempt, std::slice::from_ref(&completed)).await.unwrap(), 1);
    assert_eq!(record_metrics(&db.pool, &job_id, attempt, &[completed]).await.unwrap(), 0, "an identical resend writes nothing");
    let curve = list_metrics(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!((curve[0].train_loss, curve[0].valid_loss), (Some(2.5), Some(2.25)));
}

#[tokio::test]
async fn progress_is_written_whole_by_the_holder_and_not_at_all_by_a_stale_attempt() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let first = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    let event = |seq: i64, step: i64| NewEvent {
        seq,
        level: EventLevel::Info,
        kind: "metrics".into(),
        message: format!("Step {step}"),
        data: Some(json!({"step": step})),
    };
    let written = record_progress(&db.pool, &job_id, first, &[point(1, 3.0), point(2, 2.9)], &[event(1024, 1), event(1025, 2)]).await;
    assert_eq!(written.unwrap(), 2);
    release_preempted(&db.pool, &job_id, first).await.unwrap();
    let second = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;

    let stale = record_progress(&db.pool, &job_id, first, &[point(3, 2.8)], &[event(2048, 3)]).await;
    assert!(matches!(stale, Err(StoreError::StaleAttempt { attempt, current, .. }) if attempt == first && current == second));
    let curve = list_metrics(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!(curve.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2]);
    let events = list_events(&db.pool, &project_id, &as_job_id(&job_id), None, 100).await.unwrap().items;
    assert_eq!(events.iter().filter(|e| e.kind == "metrics").count(), 2, "the stale attempt's event was stored");
}

#[tokio::test]
async fn events_are_numbered_per_job_and_a_reader_following_writers_never_skips_one() {
    use lathe_store::dispatch::add_job_event;
    use lathe_store::progress::events_after;
    let db = TestDb::new().await;
    let (project_id, job_a) = queued_job(&db.pool, "acme").await;
    let (_, job_b) = queued_job(&db.pool, "other").await;
    add_job_event(&db.pool, &job_b, EventLevel::Info, "b's first", None).await.unwrap();

    // Eight writers race on job A while a reader follows it as SSE does (`job_seq > cursor`).
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (pool, job) = (db.pool.clone(), job_a.clone());
            tokio::spawn(async move {
                for i in 0..25 {
                    add_job_event(&pool, &job, EventLevel::Info, &format!("w{w} e{i}"), None).await.unwrap();
                }
            })
        })
        .collect();
    let (mut seen, mut cursor) = (Vec::new(), 0);
    while seen.len() < 200 {
        for event in events_after(&db.pool, &project_id, &as_job_id(&job_a), cursor, 50).await.unwrap() {
            cursor = event.id.sequence_in(&job_a).expect("an event of job A");
            seen.push(cursor);
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(seen, (1..=200).collect::<Vec<i64>>(), "the reader skipped or repeated an event");
    // Job B's numbering is its own: its one event is number 1, whatever happened in job A.
    let numbers: Vec<i64> =
        sqlx::query_scalar("SELECT job_seq FROM events WHERE job_id = $1").bind(&job_b).fetch_all(&db.pool).await.unwrap();
    assert_eq!(numbers, [1]);
}

#[tokio::test]
async fn after_a_gap_in_reconciler_passes_running_leases_are_extended_before_anything_is_requeued() {
    use lathe_store::dispatch::keep_leases_across_gap;
    let db = TestDb::new().await;
    let (_, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap();
    let gap = std::time::Duration::from_secs(15);
    assert_eq!(keep_leases_across_gap(&db.pool, gap, LEASE).await.unwrap(), None, "the first pass has nothing to compare with");
    // Postgres was unreachable for five minutes: the lease ran out meanwhile, and the last pass
    // was five minutes ago.
    lathe_store::execute(&db.pool, &format!("UPDATE jobs SET lease_expires_at = now() - interval '4 minutes' WHERE id = '{job_id}'"))
        .await
        .unwrap();
    lathe_store::execute(&db.pool, "UPDATE reconciler_state SET last_pass_at = now() - interval '5 minutes'").await.unwrap();
    let since = keep_leases_across_gap(&db.pool, gap, LEASE).await.unwrap().expect("a gap was seen");
    assert!(since.as_secs() >= 299, "{since:?}");
    assert!(requeue_expired_leases(&db.pool, OffsetDateTime::now_utc(), &NO_BACKOFF).await.unwrap().is_empty(), "nothing requeued");
    // The next pass is on time: nothing more is extended.
    assert_eq!(keep_leases_across_gap(&db.pool, gap, LEASE).await.unwrap(), None);
}

#[tokio::test]
async fn revoking_a_worker_gives_its_job_back_at_once_without_spending_a_retry() {
    let db = TestDb::new().await;
    let (_, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "doomed").await;
    let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
    commit_checkpoint(&db.pool, &job_id, attempt, 4, "ckpt-4", &json!({})).await.unwrap();
    let (_, released) = lathe_store::workers::revoke_worker(&db.pool, "doomed").await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!((released[0].id.as_str(), released[0].status.as_str()), (job_id.as_str(), "queued"));
    let other = worker(&db.pool, "b").await;
    let next = claim(&db.pool, &other, &job_id, LEASE).await.unwrap();
    assert_eq!(next.resume_from.map(|c| c.step), Some(4), "the next attempt resumes from the checkpoint");
    let job = lathe_store::jobs::get_job_unscoped(&db.pool, &as_job_id(&job_id)).await.unwrap();
    assert_eq!(job.retries, 0);
}

#[tokio::test]
async fn a_storage_fault_requeues_the_job_after_a_growing_backoff_without_spending_a_retry() {
    let db = TestDb::new().await;
    let (_, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "a").await;
    let policy = RetryPolicy { max_retries: 0, ..RetryPolicy::default() };
    for n in 0..2u32 {
        let attempt = claim(&db.pool, &worker_id, &job_id, LEASE).await.unwrap().attempt;
        let outcome = AttemptOutcome::Faulted { reason: "storage_full: no space".into() };
        let job = finish_attempt(&db.pool, &job_id, attempt, outcome, &policy).await.unwrap();
        assert_eq!((job.status, job.retries), (JobStatus::Queued, 0), "a fault is not the job's: no retry spent (even with none to spend)");
        let wait = (job.next_attempt_at.expect("a backoff") - OffsetDateTime::now_utc()).as_seconds_f64();
        let expected = policy.backoff(n).as_secs_f64();
        assert!((expected - 2.0..=expected + 0.5).contains(&wait), "fault {n}: waits {wait} s, expected ~{expected}");
        lathe_store::execute(&db.pool, &format!("UPDATE jobs SET next_attempt_at = NULL WHERE id = '{job_id}'")).await.unwrap();
    }
}
