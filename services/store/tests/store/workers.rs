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
        gpus: 1,
        nodes: 1,
        version: "0.1.0",
        slurm_job_id: None,
        pod_name: None,
        serving: false,
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
    let new = NewWorker {
        name: "node-9",
        device_kind: "cpu",
        gpu_name: None,
        gpu_memory_bytes: None,
        pools: &pools,
        gpus: 1,
        nodes: 1,
        version: "",
        slurm_job_id: None,
        pod_name: None,
        serving: false,
    };
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

fn instance<'a>(name: &'a str, pools: &'a [String], slurm_job_id: Option<&'a str>) -> NewWorker<'a> {
    NewWorker {
        name,
        device_kind: "cuda",
        gpu_name: None,
        gpu_memory_bytes: None,
        pools,
        gpus: 1,
        nodes: 1,
        version: "",
        slurm_job_id,
        pod_name: None,
        serving: false,
    }
}

#[tokio::test]
async fn instances_enrolled_with_one_fleet_secret_are_separate_workers_revoked_one_by_one_or_all_at_once() {
    use lathe_store::fleets::{create_fleet, revoke_fleet, FLEET_TOKEN_PREFIX};
    use lathe_store::workers::enroll_worker;
    let db = TestDb::new().await;
    let pools = vec!["a100".to_string()];
    let (fleet, secret) = create_fleet(&db.pool, "slurm-a100").await.unwrap();
    assert!(secret.starts_with(FLEET_TOKEN_PREFIX));
    assert!(matches!(create_fleet(&db.pool, "slurm-a100").await, Err(StoreError::Conflict(_))));
    // The secret itself is not a worker token.
    assert_eq!(authenticate_worker(&db.pool, &secret).await.unwrap(), None);

    let first = enroll_worker(&db.pool, &secret, instance("pilot", &pools, Some("101"))).await.unwrap().unwrap();
    let second = enroll_worker(&db.pool, &secret, instance("pilot", &pools, Some("102"))).await.unwrap().unwrap();
    assert_ne!(first.worker.id, second.worker.id);
    assert_ne!(first.token, second.token);
    assert_eq!(first.worker.fleet_id.as_deref(), Some(fleet.id.as_str()));
    assert_eq!(second.worker.slurm_job_id.as_deref(), Some("102"));
    assert!(enroll_worker(&db.pool, "lathe-fleet-wrong", instance("x", &pools, None)).await.unwrap().is_none());

    // One instance revoked: the other still authenticates.
    lathe_store::workers::revoke_worker(&db.pool, &first.worker.id).await.unwrap();
    assert_eq!(authenticate_worker(&db.pool, &first.token).await.unwrap(), None);
    assert_eq!(authenticate_worker(&db.pool, &second.token).await.unwrap(), Some(second.worker.id.clone()));

    // The fleet revoked: every instance, and no new enrolment.
    let (_, revoked) = revoke_fleet(&db.pool, "slurm-a100").await.unwrap();
    assert_eq!(revoked.len(), 2);
    assert_eq!(authenticate_worker(&db.pool, &second.token).await.unwrap(), None);
    assert!(enroll_worker(&db.pool, &secret, instance("late", &pools, None)).await.unwrap().is_none());
    assert!(matches!(revoke_fleet(&db.pool, "nope").await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn a_configured_fleet_secret_is_created_once_and_can_be_rotated() {
    use lathe_store::fleets::{ensure_fleet_secret, list_fleets};
    use lathe_store::workers::enroll_worker;
    let db = TestDb::new().await;
    let pools = vec!["default".to_string()];
    let fleet = ensure_fleet_secret(&db.pool, "default", "secret-one").await.unwrap();
    assert_eq!(ensure_fleet_secret(&db.pool, "default", "secret-one").await.unwrap().id, fleet.id);
    let enrolled = enroll_worker(&db.pool, "secret-one", instance("a", &pools, None)).await.unwrap().unwrap();
    ensure_fleet_secret(&db.pool, "default", "secret-two").await.unwrap();
    assert!(enroll_worker(&db.pool, "secret-one", instance("b", &pools, None)).await.unwrap().is_none(), "the old secret still enrols");
    assert!(enroll_worker(&db.pool, "secret-two", instance("b", &pools, None)).await.unwrap().is_some());
    // Rotation does not cut off instances already enrolled.
    assert_eq!(authenticate_worker(&db.pool, &enrolled.token).await.unwrap(), Some(enrolled.worker.id.clone()));
    assert_eq!(list_fleets(&db.pool).await.unwrap().len(), 1);

    // Revoked, it stays revoked across restarts with the same secret; a new secret is the way back.
    lathe_store::fleets::revoke_fleet(&db.pool, "default").await.unwrap();
    assert!(ensure_fleet_secret(&db.pool, "default", "secret-two").await.unwrap().revoked_at.is_some());
    assert!(enroll_worker(&db.pool, "secret-two", instance("c", &pools, None)).await.unwrap().is_none());
    assert!(ensure_fleet_secret(&db.pool, "default", "secret-three").await.unwrap().revoked_at.is_none());
    assert!(enroll_worker(&db.pool, "secret-three", instance("c", &pools, None)).await.unwrap().is_some());
    assert_eq!(authenticate_worker(&db.pool, &enrolled.token).await.unwrap(), None, "the revoked instances came back");
}
