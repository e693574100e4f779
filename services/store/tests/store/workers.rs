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

#[tokio::test]
async fn a_revoked_worker_token_no_longer_authenticates_and_the_worker_drains() {
    let db = TestDb::new().await;
    let pools = vec!["default".to_string()];
    let new = NewWorker { name: "node-9", device_kind: "cpu", gpu_name: None, gpu_memory_bytes: None, pools: &pools, version: "" };
    let registered = register_worker(&db.pool, new).await.unwrap();
    let revoked = lathe_store::workers::revoke_worker(&db.pool, "node-9").await.unwrap();
    assert_eq!(revoked, vec![registered.worker.id.clone()]);
    assert_eq!(authenticate_worker(&db.pool, &registered.token).await.unwrap(), None);
    assert!(lathe_store::workers::is_draining(&db.pool, &registered.worker.id).await.unwrap());
    // By id as well, twice is harmless; an unknown worker is NotFound.
    assert_eq!(lathe_store::workers::revoke_worker(&db.pool, &registered.worker.id).await.unwrap().len(), 1);
    assert!(matches!(lathe_store::workers::revoke_worker(&db.pool, "nobody").await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn one_replica_leads_until_its_session_ends() {
    use lathe_store::leadership::Leadership;
    let db = TestDb::new().await;
    let (mut first, mut second) = (Leadership::default(), Leadership::default());
    assert!(first.lead(&db.pool).await.unwrap());
    assert!(!second.lead(&db.pool).await.unwrap(), "two leaders at once");
    assert!(first.lead(&db.pool).await.unwrap(), "the leader keeps leading");
    drop(first); // its connection closes, as when the process dies
    let taken = async {
        for _ in 0..50 {
            if second.lead(&db.pool).await.unwrap() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    assert!(taken.await, "the lock was not released when its session ended");
}
