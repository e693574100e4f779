use std::time::Duration;

use lathe_core::{EvaluationRequest, EvaluationSpec};
use lathe_store::dispatch::{claim_job, finish_attempt, AttemptOutcome, ClaimRequest, RetryPolicy};
use lathe_store::evaluations::{
    cancel_evaluation, claim_evaluation, create_evaluation, fail_evaluation, finish_evaluation, get_evaluation, list_evaluations,
    list_items, renew_evaluation_lease, requeue_expired_evaluations, EvaluationFailure, EvaluationFilter, EvaluationItem, EvaluationStatus,
    NewEvaluation, EVALUATION_POISON_CODE,
};
use lathe_store::jobs::{create_job, JobError};
use lathe_store::time::OffsetDateTime;
use lathe_store::StoreError;
use serde_json::json;

use crate::support::{project, spec, training_file, worker, TestDb};

const LEASE: Duration = Duration::from_secs(60);

fn eval_spec(body: serde_json::Value) -> EvaluationSpec {
    EvaluationSpec::resolve(&EvaluationRequest::from_value(body, "").unwrap(), "").unwrap()
}

fn item(index: i32, correct: bool) -> EvaluationItem {
    EvaluationItem {
        index,
        expected: "CWE-79".into(),
        extracted: correct.then(|| "CWE-79".to_string()),
        correct,
        output: if correct { "It is CWE-79".into() } else { "no idea\0".into() },
    }
}

#[tokio::test]
async fn an_evaluation_is_claimed_once_and_its_items_and_score_land_together() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let other = project(&db.pool, "other").await;
    let worker_a = worker(&db.pool, "a").await;
    let worker_b = worker(&db.pool, "b").await;
    let rcm = eval_spec(json!({"benchmark": "cti-rcm", "limit": 3}));
    let created = create_evaluation(&db.pool, NewEvaluation { project_id: &project_id, model: "tiny-qwen3", job_id: None, spec: &rcm })
        .await
        .unwrap();
    assert_eq!((created.status, created.attempt), (EvaluationStatus::Queued, 0));
    assert!(matches!(get_evaluation(&db.pool, &other, &created.id).await, Err(StoreError::NotFound)), "another project's id");

    let id = created.id.as_str();
    let claim = claim_evaluation(&db.pool, &worker_a, None, LEASE).await.unwrap().expect("claimed");
    assert_eq!((claim.evaluation.id.as_str(), claim.evaluation.attempt), (id, 1));
    assert!(claim_evaluation(&db.pool, &worker_b, Some(id), LEASE).await.unwrap().is_none(), "claimed twice");

    renew_evaluation_lease(&db.pool, id, 1, &worker_a, LEASE, Some((2, 3))).await.unwrap();
    let running = get_evaluation(&db.pool, &project_id, &created.id).await.unwrap();
    assert_eq!((running.status, running.items_done, running.items_total), (EvaluationStatus::Running, 2, Some(3)));
    let refused = renew_evaluation_lease(&db.pool, id, 1, &worker_b, LEASE, None).await;
    assert!(matches!(refused, Err(StoreError::StaleAttempt { .. })), "another worker renewed: {refused:?}");

    let items = [item(4, true), item(9, false), item(17, true)];
    let result = json!({"accuracy": 2.0 / 3.0, "correct": 2, "items": 3});
    let done = finish_evaluation(&db.pool, id, 1, &worker_a, &result, &items).await.unwrap();
    assert_eq!((done.status, done.items_done, done.result), (EvaluationStatus::Succeeded, 3, Some(result)));
    assert!(done.finished_at.is_some());
    let page = list_items(&db.pool, &project_id, &created.id, None, 2).await.unwrap();
    assert_eq!(page.items.iter().map(|i| i.index).collect::<Vec<_>>(), vec![4, 9]);
    assert!(page.has_more);
    let rest = list_items(&db.pool, &project_id, &created.id, Some(9), 2).await.unwrap();
    assert_eq!((rest.items.len(), rest.items[0].index, rest.has_more), (1, 17, false));
    assert_eq!(page.items[1].output, "no idea\u{FFFD}", "a NUL from the model is stored, replaced");
    assert!(matches!(list_items(&db.pool, &other, &created.id, None, 10).await, Err(StoreError::NotFound)));
    let late = finish_evaluation(&db.pool, id, 1, &worker_a, &json!({}), &[]).await;
    assert!(matches!(late, Err(StoreError::StaleAttempt { .. })), "a finished evaluation took a second result");
    assert!(matches!(cancel_evaluation(&db.pool, &project_id, &created.id).await, Err(StoreError::InvalidState(_))));
}

#[tokio::test]
async fn expired_leases_are_retried_then_failed_and_cancel_stops_the_worker() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let worker_a = worker(&db.pool, "a").await;
    let policy = RetryPolicy { max_retries: 1, base_backoff: Duration::ZERO, max_backoff: Duration::ZERO };
    let mcq = eval_spec(json!({"benchmark": "cti-mcq"}));
    let new = || NewEvaluation { project_id: &project_id, model: "tiny-qwen3", job_id: None, spec: &mcq };
    let evaluation = create_evaluation(&db.pool, new()).await.unwrap();
    let id = evaluation.id.as_str();

    claim_evaluation(&db.pool, &worker_a, Some(id), Duration::from_millis(1)).await.unwrap().expect("claimed");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let requeued = requeue_expired_evaluations(&db.pool, OffsetDateTime::now_utc(), &policy).await.unwrap();
    assert_eq!(requeued, vec![(id.to_string(), EvaluationStatus::Queued)]);
    let stale = finish_evaluation(&db.pool, id, 1, &worker_a, &json!({}), &[item(0, true)]).await;
    assert!(matches!(stale, Err(StoreError::StaleAttempt { attempt: 1, current: 1, .. })), "{stale:?}");

    let second = claim_evaluation(&db.pool, &worker_a, Some(id), LEASE).await.unwrap().expect("claimed again");
    assert_eq!(second.evaluation.attempt, 2);
    let failed = fail_evaluation(&db.pool, id, 2, &worker_a, EvaluationFailure::Crashed { reason: "OOM".into() }, &policy).await.unwrap();
    assert_eq!(failed.status, EvaluationStatus::Failed);
    assert_eq!(failed.error.unwrap().code, EVALUATION_POISON_CODE);

    let bad = create_evaluation(&db.pool, new()).await.unwrap();
    claim_evaluation(&db.pool, &worker_a, Some(bad.id.as_str()), LEASE).await.unwrap().expect("claimed");
    let error = JobError { code: "invalid_benchmark_data".into(), message: "cti-mcq.tsv:5: 7 columns".into(), param: None };
    let failed =
        fail_evaluation(&db.pool, bad.id.as_str(), 1, &worker_a, EvaluationFailure::BadInput(error.clone()), &policy).await.unwrap();
    assert_eq!((failed.status, failed.error), (EvaluationStatus::Failed, Some(error)));

    let cancelled = create_evaluation(&db.pool, new()).await.unwrap();
    let cid = cancelled.id.as_str();
    claim_evaluation(&db.pool, &worker_a, Some(cid), LEASE).await.unwrap().expect("claimed");
    assert_eq!(cancel_evaluation(&db.pool, &project_id, &cancelled.id).await.unwrap().status, EvaluationStatus::Cancelled);
    let renewal = renew_evaluation_lease(&db.pool, cid, 1, &worker_a, LEASE, None).await;
    assert!(matches!(renewal, Err(StoreError::StaleAttempt { .. })), "the worker must learn of the cancel: {renewal:?}");

    let all = list_evaluations(&db.pool, &project_id, EvaluationFilter::default(), None, 2).await.unwrap();
    assert_eq!((all.items.len(), all.has_more, all.items[0].id.as_str()), (2, true, cid));
    let next = list_evaluations(&db.pool, &project_id, EvaluationFilter::default(), Some(all.items[1].id.as_str()), 2).await.unwrap();
    assert_eq!((next.items.len(), next.has_more), (1, false));
}

#[tokio::test]
async fn a_succeeding_job_queues_the_evaluations_it_asked_for() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let file = training_file(&db.pool, &project_id).await;
    let job_spec = spec(&file, json!({"evaluations": [{"benchmark": "cti-mcq", "limit": 5}, {"benchmark": "cti-rcm", "shots": 2}]}));
    let (job, _) = create_job(&db.pool, &project_id, &job_spec, None).await.unwrap();
    let worker_a = worker(&db.pool, "a").await;
    let claim = claim_job(
        &db.pool,
        ClaimRequest {
            worker_id: &worker_a,
            job_id: Some(job.id.as_str()),
            lease: LEASE,
            half_life: lathe_store::dispatch::DEFAULT_HALF_LIFE,
        },
    )
    .await
    .unwrap()
    .unwrap();
    let model = format!("ft:tiny-qwen3:{}", job.id);
    let outcome = AttemptOutcome::Succeeded { fine_tuned_model: model.clone(), result_files: vec![], trained_tokens: Some(10) };
    finish_attempt(&db.pool, job.id.as_str(), claim.attempt, outcome, &RetryPolicy::default()).await.unwrap();

    let by_job = EvaluationFilter { job_id: Some(job.id.as_str()), model: None };
    let queued = list_evaluations(&db.pool, &project_id, by_job, None, 10).await.unwrap().items;
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|e| e.model == model && e.status == EvaluationStatus::Queued));
    let mut benchmarks: Vec<_> = queued.iter().map(|e| (e.spec.benchmark.name(), e.spec.limit, e.spec.shots)).collect();
    benchmarks.sort();
    assert_eq!(benchmarks, vec![("cti-mcq", Some(5), 0), ("cti-rcm", None, 2)]);
    let by_model = EvaluationFilter { model: Some(&model), job_id: None };
    assert_eq!(list_evaluations(&db.pool, &project_id, by_model, None, 10).await.unwrap().items.len(), 2);
}
