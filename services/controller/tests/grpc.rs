//! The worker protocol against a real controller (in this process, on real sockets) with real
//! Postgres and Redis: fencing by attempt number, seen from the wire.

mod support;

use std::time::Duration;

use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::{AttemptRef, ClaimJobRequest, HeartbeatRequest, RegisterRequest};
use support::{client, metrics, next, open, Harness};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_stale_attempt_is_refused_and_the_worker_told_to_stop() {
    let harness = Harness::start().await;
    let job_id = harness.job().await;
    let mut a = harness.worker("a").await;
    let mut b = harness.worker("b").await;

    let register = RegisterRequest { name: "a".into(), device_kind: 3, pools: vec!["default".into()], ..Default::default() };
    a.register(register).await.unwrap();
    let first = a.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(first.attempt, 1);
    let (a_tx, mut a_in) = open(&mut a, &job_id, 1).await;
    assert!(matches!(next(&mut a_in).await, Down::Ack(ack) if ack.seq == 0), "Hello acked");
    a_tx.send(metrics(1, 1)).unwrap();
    assert!(matches!(next(&mut a_in).await, Down::Ack(ack) if ack.seq == 1), "step 1 acked");

    // Worker a goes silent past its lease (and the reconciler's grace of two heartbeats); the
    // reconciler requeues, worker b claims attempt 2.
    tokio::time::sleep(Duration::from_millis(1500 + 2 * 500 + 300)).await;
    lathe_controller::reconciler::pass(&harness.state).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = b.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(second.attempt, 2);

    // a's late write on its open stream: refused, and a is told it lost the lease.
    a_tx.send(metrics(2, 2)).unwrap();
    assert!(matches!(next(&mut a_in).await, Down::LeaseLost(_)), "stale write must answer LeaseLost");
    // Reconnecting with the old attempt number gets nowhere either.
    let (_tx, mut again) = open(&mut a, &job_id, 1).await;
    assert!(matches!(next(&mut again).await, Down::LeaseLost(_)));
    // Its heartbeat lists the attempt as lost.
    let beat = a
        .heartbeat(HeartbeatRequest { running: vec![AttemptRef { job_id: job_id.clone(), attempt: 1 }], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.lost.len(), 1);
    assert!(beat.renewed.is_empty());

    // b holds the job: its write of step 2 is stored, and the curve has a's step 1 and b's step 2 only.
    let (b_tx, mut b_in) = open(&mut b, &job_id, 2).await;
    assert!(matches!(next(&mut b_in).await, Down::Ack(_)));
    b_tx.send(metrics(1, 2)).unwrap();
    assert!(matches!(next(&mut b_in).await, Down::Ack(ack) if ack.seq == 1));
    let project = lathe_store::projects::get_project_by_name(&harness.state.pool, "acme").await.unwrap();
    let curve =
        lathe_store::progress::list_metrics(&harness.state.pool, &project.id, &lathe_core::JobId::parse(&job_id).unwrap()).await.unwrap();
    assert_eq!(curve.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(curve[1].train_loss, Some(2.8));
    drop((a_tx, b_tx));
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_worker_token_is_unauthenticated() {
    let harness = Harness::start().await;
    let mut stranger = client(&harness.grpc, "lathe-wk-not-a-real-token").await;
    let refused = stranger.claim_job(ClaimJobRequest { job_id: String::new() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = stranger.register(RegisterRequest { name: "stranger".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    harness.drop_database().await;
}
