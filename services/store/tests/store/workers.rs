use lathe_store::workers::{authenticate_worker, heartbeat, list_workers, register_worker, NewWorker, WORKER_TOKEN_PREFIX};
use lathe_store::StoreError;

use crate::support::TestDb;

#[tokio::test]
async fn a_registered_worker_authenticates_with_its_token_and_heartbeats() {
    let db = TestDb::new().await;
    let pools = vec!["default".to_string(), "a100".to_string()];
    let new = NewWorker {
        name: "node-7",
        device_kind: "cuda",
        gpu_name: Some("A100"),
        gpu_memory_bytes: Some(80 << 30),
        pools: &pools,
        version: "0.1.0",
    };
    let registered = register_worker(&db.pool, new).await.unwrap();
    assert!(registered.token.starts_with(WORKER_TOKEN_PREFIX));
    assert_eq!(authenticate_worker(&db.pool, &registered.token).await.unwrap(), Some(registered.worker.id.clone()));
    assert_eq!(authenticate_worker(&db.pool, "lathe-wk-wrong").await.unwrap(), None);

    let before = registered.worker.last_heartbeat_at;
    heartbeat(&db.pool, &registered.worker.id).await.unwrap();
    let listed = list_workers(&db.pool).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pools, pools);
    assert!(listed[0].last_heartbeat_at >= before);
    assert!(matches!(heartbeat(&db.pool, "wrk_missing").await, Err(StoreError::NotFound)));
}
