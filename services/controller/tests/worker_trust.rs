//! The worker trust model, attacked over real gRPC (docs/architecture.md §3, "Worker trust"):
//! roles and pools bounded by the grant, revocation that closes open streams, enrolment bounds,
//! values a worker makes up, and the port's own limits.

mod support;

use std::time::Duration;

use lathe_proto::v1::controller_message::Body as Down;
use lathe_proto::v1::worker_message::Body as Up;
use lathe_proto::v1::{
    serve_command, serve_message, ClaimJobRequest, CompletionRequest, Fail, FailureClass, LogEvent, MetricPoint, MetricsBatch,
    RegisterRequest, ServeHello, ServeMessage, WorkerMessage,
};
use lathe_store::fleets::{create_fleet, revoke_fleet, FleetTerms};
use lathe_store::workers::{revoke_worker, Grant, ROLE_SERVING, ROLE_TRAINING};
use support::{client, next, open, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;

fn serving_grant() -> Grant {
    Grant { pools: None, roles: vec![ROLE_SERVING.to_string()] }
}

fn registration(name: &str, serving: bool) -> RegisterRequest {
    RegisterRequest { name: name.into(), device_kind: 3, pools: vec!["default".into()], serving, ..Default::default() }
}

/// The job's status, retries and its attempts' outcomes, from Postgres.
async fn job_state(harness: &Harness, job_id: &str) -> (String, i32, Vec<String>) {
    let (status, retries): (String, i32) =
        sqlx::query_as("SELECT status, retries FROM jobs WHERE id = $1").bind(job_id).fetch_one(&harness.state.pool).await.unwrap();
    let outcomes: Vec<Option<String>> = sqlx::query_scalar("SELECT outcome FROM attempts WHERE job_id = $1 ORDER BY number")
        .bind(job_id)
        .fetch_all(&harness.state.pool)
        .await
        .unwrap();
    (status, retries, outcomes.into_iter().map(|o| o.unwrap_or_else(|| "live".into())).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_identity_can_neither_register_as_a_server_nor_open_serve() {
    let harness = Harness::start().await;
    let mut trainer = harness.worker("trainer").await;
    let refused = trainer.register(registration("trainer", true)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().starts_with("serving:"), "{}", refused.message());

    trainer.register(registration("trainer", false)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(ServeMessage { body: Some(serve_message::Body::Hello(ServeHello { max_batch: 4, capacity: 4, max_models: 1 })) }).unwrap();
    let refused = trainer.serve(UnboundedReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(harness.state.inference.load().0, 0, "no server was connected");

    // And a serving identity takes no training work.
    let mut server = client(&harness.grpc, &harness.token("server", true, &serving_grant()).await).await;
    let job_id = harness.job().await;
    let refused = server.claim_job(ClaimJobRequest { job_id }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_server_closes_its_serve_stream_and_ends_its_requests_within_two_seconds() {
    let harness = Harness::start().await;
    let token = harness.token("server", true, &serving_grant()).await;
    let mut server = client(&harness.grpc, &token).await;
    server.register(registration("server", true)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(ServeMessage { body: Some(serve_message::Body::Hello(ServeHello { max_batch: 4, capacity: 4, max_models: 1 })) }).unwrap();
    let mut commands = server.serve(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let router = harness.state.inference.clone();
    for _ in 0..100 {
        if router.load().0 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = CompletionRequest { request_id: "chatcmpl-1".into(), model: "tiny".into(), n: 1, ..Default::default() };
    let mut placed = router.place(request).expect("the server takes the request");
    let command = tokio::time::timeout(Duration::from_secs(5), commands.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(command.body, Some(serve_command::Body::Request(ref r)) if r.request_id == "chatcmpl-1"));

    let revoked_at = std::time::Instant::now();
    revoke_worker(&harness.state.pool, "server").await.unwrap();
    // The request in flight ends (its client gets 503 "went away")…
    let ended = tokio::time::timeout(Duration::from_secs(2), placed.pieces.recv()).await.expect("the request ends within 2 s");
    assert!(ended.is_none(), "the revoked server's piece must not be delivered");
    // …and the stream closes: the worker sees its end.
    let closed = tokio::time::timeout(Duration::from_secs(2), commands.message()).await.expect("the stream closes within 2 s");
    assert!(!matches!(closed, Ok(Some(_))), "{closed:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(3));
    assert_eq!(router.load().0, 0, "the revoked server is out of routing");
    // A late piece from it changes nothing, and its next call is refused.
    let _ = tx.send(ServeMessage { body: Some(serve_message::Body::Completion(Default::default())) });
    assert_eq!(server.register(registration("server", true)).await.unwrap_err().code(), Code::Unauthenticated);
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_worker_or_its_fleet_stops_its_attempt_at_once_and_gives_the_job_back_free() {
    let harness = Harness::start().await;
    // A worker with its own token.
    let job_id = harness.job().await;
    let mut worker = harness.worker("node-1").await;
    worker.register(registration("node-1", false)).await.unwrap();
    let claim = worker.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    let (tx, mut inbound) = open(&mut worker, &job_id, claim.attempt).await;
    assert!(matches!(next(&mut inbound).await, Down::Ack(_)));
    revoke_worker(&harness.state.pool, "node-1").await.unwrap();
    let told = tokio::time::timeout(Duration::from_secs(2), inbound.message()).await.expect("told within 2 s").unwrap().unwrap();
    assert!(matches!(told.body, Some(Down::LeaseLost(_))), "{told:?}");
    assert_eq!(job_state(&harness, &job_id).await, ("queued".into(), 0, vec!["revoked".into()]), "given back, no retry spent");
    // Its late report is not stored.
    tx.send(support::metrics(1, 1)).ok();
    drop(tx);

    // A fleet's instance: revoking the fleet does the same.
    let terms = FleetTerms { grant: Grant { pools: None, roles: vec![ROLE_TRAINING.into()] }, max_workers: None };
    let (_, secret) = create_fleet(&harness.state.pool, "pilots", &terms).await.unwrap();
    let mut enrolling = client(&harness.grpc, &secret).await;
    let enrolled = enrolling.register(registration("pilot", false)).await.unwrap().into_inner();
    let mut pilot = client(&harness.grpc, &enrolled.worker_token).await;
    let claim = pilot.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(claim.attempt, 2);
    let (_tx, mut inbound) = open(&mut pilot, &job_id, claim.attempt).await;
    assert!(matches!(next(&mut inbound).await, Down::Ack(_)));
    revoke_fleet(&harness.state.pool, "pilots").await.unwrap();
    let told = tokio::time::timeout(Duration::from_secs(2), inbound.message()).await.expect("told within 2 s").unwrap().unwrap();
    assert!(matches!(told.body, Some(Down::LeaseLost(_))), "{told:?}");
    assert_eq!(job_state(&harness, &job_id).await, ("queued".into(), 0, vec!["revoked".into(), "revoked".into()]));
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_refused_by_field_when_malformed_or_wider_than_its_grant() {
    let harness = Harness::start().await;
    let grant = Grant { pools: Some(vec!["a100".into()]), roles: vec![ROLE_TRAINING.into()] };
    let mut worker = client(&harness.grpc, &harness.token("bounded", false, &grant).await).await;
    let cases = [
        (RegisterRequest { name: "x\0y".into(), ..registration("", false) }, Code::InvalidArgument, "name:"),
        (RegisterRequest { gpu_name: "H100\0".into(), ..registration("n", false) }, Code::InvalidArgument, "gpu_name:"),
        (RegisterRequest { name: "n".repeat(500), ..registration("", false) }, Code::InvalidArgument, "name:"),
        (RegisterRequest { pools: vec!["default".into()], ..registration("n", false) }, Code::PermissionDenied, "pools:"),
    ];
    for (request, code, field) in cases {
        let refused = worker.register(request).await.unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().starts_with(field), "{}", refused.message());
    }
    worker.register(RegisterRequest { pools: vec!["a100".into()], ..registration("n", false) }).await.unwrap();
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_enrols_at_most_its_cap_and_a_flood_of_enrolments_is_slowed() {
    let harness = Harness::start_with(|c| c.enrolments_per_minute = 4).await;
    let terms = FleetTerms { grant: Grant::default(), max_workers: Some(2) };
    let (_, secret) = create_fleet(&harness.state.pool, "capped", &terms).await.unwrap();
    let mut enrolling = client(&harness.grpc, &secret).await;
    for i in 0..2 {
        enrolling.register(registration(&format!("pilot-{i}"), false)).await.unwrap();
    }
    let full = enrolling.register(registration("pilot-2", false)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("max_workers"), "{}", full.message());
    // Two more tries use the fleet's rate (4 a minute); the next is refused before Postgres.
    let _ = enrolling.register(registration("pilot-3", false)).await;
    let flood = enrolling.register(registration("pilot-4", false)).await.unwrap_err();
    assert_eq!(flood.code(), Code::ResourceExhausted);
    assert!(flood.message().contains("a minute"), "{}", flood.message());
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_postgres_cannot_hold_are_refused_by_field_and_the_tenant_sees_only_marked_worker_text() {
    let harness = Harness::start().await;
    let job_id = harness.job().await;
    let mut worker = harness.worker("w").await;
    worker.register(registration("w", false)).await.unwrap();
    let claim = worker.claim_job(ClaimJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    let (tx, mut inbound) = open(&mut worker, &job_id, claim.attempt).await;
    assert!(matches!(next(&mut inbound).await, Down::Ack(_)));

    let huge = MetricPoint { step: (1u64 << 63) + 5, total_steps: 10, ..Default::default() };
    tx.send(WorkerMessage { seq: 1, body: Some(Up::Metrics(MetricsBatch { points: vec![huge] })) }).unwrap();
    assert!(matches!(next(&mut inbound).await, Down::Ack(a) if a.seq == 1), "acked and dropped, the stream goes on");
    let log = LogEvent { level: 1, message: "loaded\0".into(), data_json: r#"{"note": "a\u0000b"}"#.into(), time_unix_ms: 0 };
    tx.send(WorkerMessage { seq: 2, body: Some(Up::Log(log)) }).unwrap();
    assert!(matches!(next(&mut inbound).await, Down::Ack(a) if a.seq == 2));
    let fail = Fail { class: FailureClass::BadInput as i32, code: "<b>owned</b>".into(), message: "click http://evil\0".into() };
    tx.send(WorkerMessage { seq: 3, body: Some(Up::Fail(fail)) }).unwrap();
    assert!(matches!(next(&mut inbound).await, Down::Ack(a) if a.seq == 3));

    let pool = &harness.state.pool;
    let messages: Vec<String> =
        sqlx::query_scalar("SELECT message FROM events WHERE job_id = $1 ORDER BY job_seq").bind(&job_id).fetch_all(pool).await.unwrap();
    assert!(
        messages.iter().any(|m| m == "A report from the worker was refused and dropped (metrics.points[0].step: out of range)"),
        "{messages:?}"
    );
    assert!(messages.iter().any(|m| m.starts_with("loaded")), "the event with NUL in its data was kept: {messages:?}");
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM metrics WHERE job_id = $1").bind(&job_id).fetch_one(pool).await.unwrap();
    assert_eq!(steps, 0);
    let error: serde_json::Value = sqlx::query_scalar("SELECT error FROM jobs WHERE id = $1").bind(&job_id).fetch_one(pool).await.unwrap();
    assert_eq!(error["code"], "worker_error", "{error}");
    assert_eq!(error["message"], "Reported by the worker: click http://evil", "{error}");
    harness.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_to_the_worker_port_are_capped_and_closed_while_rest_keeps_answering() {
    let harness = Harness::start_with(|c| {
        c.grpc_max_connections = 20;
        c.grpc_handshake_timeout = Duration::from_millis(800);
    })
    .await;
    let grpc = harness.grpc.trim_start_matches("http://").to_string();
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(tokio::net::TcpStream::connect(&grpc).await.unwrap());
    }
    // REST answers throughout.
    for _ in 0..5 {
        let mut rest = tokio::net::TcpStream::connect(harness.http).await.unwrap();
        rest.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), rest.read_to_string(&mut answer)).await.expect("/healthz answers").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Past the handshake timeout every silent connection has been closed by the controller.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for connection in &mut silent {
        // Whatever the server said first (its HTTP/2 settings), the connection ends.
        let mut sink = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), connection.read_to_end(&mut sink)).await;
        assert!(ended.is_ok(), "a silent connection was still open {:?} after the handshake timeout", Duration::from_secs(5));
    }
    drop(silent);
    // And a real worker still gets in.
    let mut worker = harness.worker("after-the-flood").await;
    worker.register(registration("after-the-flood", false)).await.unwrap();
    harness.drop_database().await;
}
