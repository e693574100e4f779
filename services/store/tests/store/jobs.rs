use std::collections::HashMap;

use lathe_core::{IllegalTransition, JobStatus};
use lathe_store::dispatch::{claim_job, ClaimRequest};
use lathe_store::jobs::{cancel_job, create_job, fail_job, get_job, list_jobs, pause_job, resume_job, JobError};
use lathe_store::StoreError;
use serde_json::json;

use crate::support::{as_job_id, project, queued_job, spec, training_file, worker, worker_with, TestDb};

#[tokio::test]
async fn a_created_job_is_queued_with_its_spec_and_resources() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let spec = spec(&file, json!({ "suffix": "cwe", "priority": 5, "pool": "a100", "gpu_memory_gb": 40 }));

    let (job, created) = create_job(&db.pool, &project_id, &spec, None).await.unwrap();
    assert!(created);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    assert_eq!(job.spec, spec);
    let (pool, priority, memory): (String, i16, Option<i32>) =
        sqlx::query_as("SELECT pool, priority, gpu_memory_gb FROM jobs WHERE id = $1")
            .bind(job.id.as_str())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((pool.as_str(), priority, memory), ("a100", 5, Some(40)));
    assert_eq!(get_job(&db.pool, &project_id, &job.id).await.unwrap(), job);
}

#[tokio::test]
async fn an_admitted_job_keeps_its_request_hash_and_training_data_and_a_retry_sees_them() {
    use lathe_store::jobs::{admit_job, Admission};
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let spec = spec(&file, json!({}));
    let data = json!({"examples": 12, "truncated": 3, "dropped": 1, "max_seq_length": 64});
    let admission = Admission { idempotency_key: Some("k1"), request_sha256: Some("aa11"), training_data: Some(&data) };
    let (job, created) = admit_job(&db.pool, &project_id, &spec, &admission).await.unwrap();
    assert!(created);
    assert_eq!((job.request_sha256.as_deref(), job.training_data.as_ref()), (Some("aa11"), Some(&data)));
    // A retry with the key gets the first job back, hash included, for the caller to compare.
    let other = Admission { idempotency_key: Some("k1"), request_sha256: Some("bb22"), training_data: None };
    let (again, created) = admit_job(&db.pool, &project_id, &spec, &other).await.unwrap();
    assert!(!created);
    assert_eq!((again.id, again.request_sha256.as_deref()), (job.id.clone(), Some("aa11")));
    assert_eq!(get_job(&db.pool, &project_id, &job.id).await.unwrap().training_data, Some(data));
}

#[tokio::test]
async fn a_job_on_a_missing_or_foreign_file_is_refused_and_nothing_is_stored() {
    let db = TestDb::new().await;
    let project_a = project(&db.pool, "a").await;
    let project_b = project(&db.pool, "b").await;
    let file_of_a = training_file(&db.pool, &project_a).await;

    let refused = create_job(&db.pool, &project_b, &spec(&file_of_a, json!({})), None).await;
    assert!(matches!(refused, Err(StoreError::NotFound)));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn two_hundred_concurrent_creates_with_repeated_keys_make_one_job_per_key() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let spec = spec(&file, json!({}));

    let mut tasks = Vec::new();
    for i in 0..200 {
        let (pool, project_id, spec) = (db.pool.clone(), project_id.clone(), spec.clone());
        // 20 keys, each sent 10 times, interleaved.
        let key = format!("key-{}", i % 20);
        tasks.push(tokio::spawn(async move {
            let (job, created) = create_job(&pool, &project_id, &spec, Some(&key)).await.expect("no error");
            (key, job.id.to_string(), created)
        }));
    }
    let mut job_by_key: HashMap<String, String> = HashMap::new();
    let mut created_count = 0;
    for task in tasks {
        let (key, job_id, created) = task.await.unwrap();
        created_count += usize::from(created);
        let first = job_by_key.entry(key.clone()).or_insert(job_id.clone());
        assert_eq!(*first, job_id, "two jobs for {key}");
    }
    assert_eq!(job_by_key.len(), 20);
    assert_eq!(created_count, 20);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 20);
}

#[tokio::test]
async fn the_same_idempotency_key_in_two_projects_makes_two_jobs() {
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let project_id = project(&db.pool, name).await;
        let file = training_file(&db.pool, &project_id).await;
        let (job, created) = create_job(&db.pool, &project_id, &spec(&file, json!({})), Some("k")).await.unwrap();
        assert!(created);
        ids.push(job.id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_has_more() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create_job(&db.pool, &project_id, &spec(&file, json!({})), None).await.unwrap().0.id);
    }
    ids.reverse();

    let first = list_jobs(&db.pool, &project_id, None, 2, None).await.unwrap();
    assert!(first.has_more);
    assert_eq!(first.items.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), ids[..2]);
    let second = list_jobs(&db.pool, &project_id, Some(first.items[1].id.as_str()), 2, None).await.unwrap();
    assert!(!second.has_more);
    assert_eq!(second.items.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), ids[2..]);
}

#[tokio::test]
async fn project_b_cannot_get_list_cancel_pause_or_resume_project_a_job() {
    let db = TestDb::new().await;
    let (project_a, job_id) = queued_job(&db.pool, "a").await;
    let project_b = project(&db.pool, "b").await;

    assert!(matches!(get_job(&db.pool, &project_b, &as_job_id(&job_id)).await, Err(StoreError::NotFound)));
    assert!(list_jobs(&db.pool, &project_b, None, 10, None).await.unwrap().items.is_empty());
    assert!(matches!(cancel_job(&db.pool, &project_b, &as_job_id(&job_id)).await, Err(StoreError::NotFound)));
    assert!(matches!(pause_job(&db.pool, &project_b, &as_job_id(&job_id)).await, Err(StoreError::NotFound)));
    assert!(matches!(resume_job(&db.pool, &project_b, &as_job_id(&job_id)).await, Err(StoreError::NotFound)));
    assert_eq!(get_job(&db.pool, &project_a, &as_job_id(&job_id)).await.unwrap().status, JobStatus::Queued);
}

#[tokio::test]
async fn a_cancelled_job_is_final_and_cannot_be_cancelled_or_resumed_again() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;

    let cancelled = cancel_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    let again = cancel_job(&db.pool, &project_id, &as_job_id(&job_id)).await;
    assert!(matches!(
        again,
        Err(StoreError::IllegalTransition(IllegalTransition { from: JobStatus::Cancelled, to: JobStatus::Cancelled }))
    ));
    assert!(matches!(resume_job(&db.pool, &project_id, &as_job_id(&job_id)).await, Err(StoreError::IllegalTransition(_))));
}

#[tokio::test]
async fn a_paused_queued_job_is_not_claimed_until_resumed() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "w1").await;
    let request = ClaimRequest {
        worker_id: &worker_id,
        job_id: None,
        lease: std::time::Duration::from_secs(60),
        half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
    };

    assert_eq!(pause_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().status, JobStatus::Paused);
    assert!(claim_job(&db.pool, request.clone()).await.unwrap().is_none());

    assert_eq!(resume_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap().status, JobStatus::Queued);
    let claim = claim_job(&db.pool, request).await.unwrap().expect("claimed after resume");
    assert_eq!(claim.job_id.as_str(), job_id);
}

#[tokio::test]
async fn cancelling_a_running_job_ends_its_attempt_and_frees_the_lease() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let worker_id = worker(&db.pool, "w1").await;
    let request = ClaimRequest {
        worker_id: &worker_id,
        job_id: Some(&job_id),
        lease: std::time::Duration::from_secs(60),
        half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
    };
    claim_job(&db.pool, request).await.unwrap().expect("claimed");

    let cancelled = cancel_job(&db.pool, &project_id, &as_job_id(&job_id)).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let (owner, outcome): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT j.lease_owner, a.outcome FROM jobs j JOIN attempts a ON a.job_id = j.id WHERE j.id = $1")
            .bind(&job_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((owner, outcome.as_deref()), (None, Some("cancelled")));
}

#[tokio::test]
async fn failing_a_job_records_the_error_object() {
    let db = TestDb::new().await;
    let (project_id, job_id) = queued_job(&db.pool, "acme").await;
    let error = JobError { code: "invalid_training_file".into(), message: "line 3: bad".into(), param: Some("training_file".into()) };
    // A queued job never "fails" in core's rules: only validation or a run can fail it.
    assert!(matches!(fail_job(&db.pool, &project_id, &as_job_id(&job_id), &error).await, Err(StoreError::IllegalTransition(_))));
    sqlx::query("UPDATE jobs SET status = 'validating_files' WHERE id = $1").bind(&job_id).execute(&db.pool).await.unwrap();
    let failed = fail_job(&db.pool, &project_id, &as_job_id(&job_id), &error).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error, Some(error));
}

#[tokio::test]
async fn a_repeated_key_returns_the_job_even_after_its_file_was_deleted() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let spec = spec(&file, json!({}));
    let (job, _) = create_job(&db.pool, &project_id, &spec, Some("retry-me")).await.unwrap();
    lathe_store::files::delete_file(&db.pool, &project_id, &file).await.unwrap();

    let (again, created) = create_job(&db.pool, &project_id, &spec, Some("retry-me")).await.unwrap();
    assert_eq!((again.id, created), (job.id, false));
    assert!(matches!(create_job(&db.pool, &project_id, &spec, Some("new-key")).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn demand_per_pool_counts_queued_and_running_jobs_and_live_workers() {
    use lathe_store::demand::{pool_demand, PoolDemand};
    use std::time::Duration;
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let a100 = spec(&file, serde_json::json!({"pool": "a100", "gpu_memory_gb": 40}));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(lathe_store::jobs::create_job(&db.pool, &project_id, &a100, None).await.unwrap().0.id.to_string());
    }
    lathe_store::jobs::create_job(&db.pool, &project_id, &spec(&file, serde_json::json!({})), None).await.unwrap();
    let worker = worker_with(&db.pool, "gpu-1", &["a100".to_string()], Some(80 << 30)).await;
    let claimed = lathe_store::dispatch::claim_job(
        &db.pool,
        lathe_store::dispatch::ClaimRequest {
            worker_id: &worker,
            job_id: Some(&ids[0]),
            lease: Duration::from_secs(60),
            half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
        },
    )
    .await
    .unwrap();
    assert!(claimed.is_some());
    lathe_store::jobs::cancel_job(&db.pool, &project_id, &as_job_id(&ids[2])).await.unwrap();

    let demand = pool_demand(&db.pool, Duration::from_secs(60)).await.unwrap();
    let mut a100 = demand.iter().find(|d| d.pool == "a100").unwrap().clone();
    assert!((0..10).contains(&a100.oldest_queued_seconds), "{a100:?}");
    a100.oldest_queued_seconds = 0;
    assert_eq!(
        &a100,
        &PoolDemand {
            pool: "a100".into(),
            queued_jobs: 1,
            running_jobs: 1,
            gpu_memory_gb_asked: 80,
            gpus_asked: 2,
            nodes_asked: 2,
            workers: 1,
            shapes: vec![lathe_store::demand::Shape { gpus: 1, nodes: 1, queued: 1, running: 1 }],
            ..PoolDemand::empty("a100")
        }
    );
    assert_eq!(a100.demand(), 2);
    assert_eq!(demand.iter().find(|d| d.pool == "default").unwrap().demand(), 1);
    // A worker whose heartbeat is older than the window is not live.
    assert_eq!(pool_demand(&db.pool, Duration::ZERO).await.unwrap().iter().find(|d| d.pool == "a100").unwrap().workers, 0);
    // Nor one that said it is leaving.
    lathe_store::workers::leave(&db.pool, &worker).await.unwrap();
    let after = pool_demand(&db.pool, Duration::from_secs(60)).await.unwrap();
    assert_eq!(after.iter().find(|d| d.pool == "a100").unwrap().workers, 0);
}
