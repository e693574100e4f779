use lathe_store::workers::{
    authenticate_worker, heartbeat, list_workers, register_worker, Enrolment, Grant, NewWorker, RegisteredWorker, WORKER_TOKEN_PREFIX,
};
use lathe_store::StoreError;
use std::time::Duration;

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
    let registered = register_worker(&db.pool, new, &Grant::default()).await.unwrap();
    assert!(registered.token.starts_with(WORKER_TOKEN_PREFIX));
    assert_eq!(authenticate_worker(&db.pool, &registered.token).await.unwrap().map(|w| w.id), Some(registered.worker.id.clone()));
    assert_eq!(authenticate_worker(&db.pool, "lathe-wk-wrong").await.unwrap().map(|w| w.id), None);

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
    let registered = register_worker(&db.pool, new, &Grant::default()).await.unwrap();
    let (revoked, _) = lathe_store::workers::revoke_worker(&db.pool, "node-9").await.unwrap();
    assert_eq!(revoked, vec![registered.worker.id.clone()]);
    assert_eq!(authenticate_worker(&db.pool, &registered.token).await.unwrap().map(|w| w.id), None);
    assert!(lathe_store::workers::is_draining(&db.pool, &registered.worker.id).await.unwrap());
    // By id as well, twice is harmless; an unknown worker is NotFound.
    assert_eq!(lathe_store::workers::revoke_worker(&db.pool, &registered.worker.id).await.unwrap().0.len(), 1);
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

const LIVE: Duration = Duration::from_secs(60);

fn enrolled(enrolment: Enrolment) -> RegisteredWorker {
    match enrolment {
        Enrolment::Enrolled(worker) => *worker,
        other => panic!("not enrolled: {other:?}"),
    }
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
    let (fleet, secret) = create_fleet(&db.pool, "slurm-a100", &Default::default()).await.unwrap();
    assert!(secret.starts_with(FLEET_TOKEN_PREFIX));
    assert!(matches!(create_fleet(&db.pool, "slurm-a100", &Default::default()).await, Err(StoreError::Conflict(_))));
    // The secret itself is not a worker token.
    assert_eq!(authenticate_worker(&db.pool, &secret).await.unwrap().map(|w| w.id), None);

    let first = enrolled(enroll_worker(&db.pool, &secret, instance("pilot", &pools, Some("101")), LIVE).await.unwrap());
    let second = enrolled(enroll_worker(&db.pool, &secret, instance("pilot", &pools, Some("102")), LIVE).await.unwrap());
    assert_ne!(first.worker.id, second.worker.id);
    assert_ne!(first.token, second.token);
    assert_eq!(first.worker.fleet_id.as_deref(), Some(fleet.id.as_str()));
    assert_eq!(second.worker.slurm_job_id.as_deref(), Some("102"));
    assert!(matches!(
        enroll_worker(&db.pool, "lathe-fleet-wrong", instance("x", &pools, None), LIVE).await.unwrap(),
        Enrolment::UnknownSecret
    ));

    // One instance revoked: the other still authenticates.
    lathe_store::workers::revoke_worker(&db.pool, &first.worker.id).await.unwrap();
    assert_eq!(authenticate_worker(&db.pool, &first.token).await.unwrap().map(|w| w.id), None);
    assert_eq!(authenticate_worker(&db.pool, &second.token).await.unwrap().map(|w| w.id), Some(second.worker.id.clone()));

    // The fleet revoked: every instance, and no new enrolment.
    let (_, revoked) = revoke_fleet(&db.pool, "slurm-a100").await.unwrap();
    assert_eq!(revoked.len(), 2);
    assert_eq!(authenticate_worker(&db.pool, &second.token).await.unwrap().map(|w| w.id), None);
    assert!(matches!(enroll_worker(&db.pool, &secret, instance("late", &pools, None), LIVE).await.unwrap(), Enrolment::UnknownSecret));
    assert!(matches!(revoke_fleet(&db.pool, "nope").await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn a_configured_fleet_secret_is_created_once_and_can_be_rotated() {
    use lathe_store::fleets::{ensure_fleet_secret, list_fleets};
    use lathe_store::workers::enroll_worker;
    let db = TestDb::new().await;
    let pools = vec!["default".to_string()];
    let fleet = ensure_fleet_secret(&db.pool, "default", "secret-one", &Default::default()).await.unwrap();
    assert_eq!(ensure_fleet_secret(&db.pool, "default", "secret-one", &Default::default()).await.unwrap().id, fleet.id);
    let enrolled = enrolled(enroll_worker(&db.pool, "secret-one", instance("a", &pools, None), LIVE).await.unwrap());
    ensure_fleet_secret(&db.pool, "default", "secret-two", &Default::default()).await.unwrap();
    assert!(
        matches!(enroll_worker(&db.pool, "secret-one", instance("b", &pools, None), LIVE).await.unwrap(), Enrolment::UnknownSecret),
        "the old secret still enrols"
    );
    assert!(matches!(enroll_worker(&db.pool, "secret-two", instance("b", &pools, None), LIVE).await.unwrap(), Enrolment::Enrolled(_)));
    // Rotation does not cut off instances already enrolled.
    assert_eq!(authenticate_worker(&db.pool, &enrolled.token).await.unwrap().map(|w| w.id), Some(enrolled.worker.id.clone()));
    assert_eq!(list_fleets(&db.pool).await.unwrap().len(), 1);

    // Revoked, it stays revoked across restarts with the same secret; a new secret is the way back.
    lathe_store::fleets::revoke_fleet(&db.pool, "default").await.unwrap();
    assert!(ensure_fleet_secret(&db.pool, "default", "secret-two", &Default::default()).await.unwrap().revoked_at.is_some());
    assert!(matches!(enroll_worker(&db.pool, "secret-two", instance("c", &pools, None), LIVE).await.unwrap(), Enrolment::UnknownSecret));
    assert!(ensure_fleet_secret(&db.pool, "default", "secret-three", &Default::default()).await.unwrap().revoked_at.is_none());
    assert!(matches!(enroll_worker(&db.pool, "secret-three", instance("c", &pools, None), LIVE).await.unwrap(), Enrolment::Enrolled(_)));
    assert_eq!(authenticate_worker(&db.pool, &enrolled.token).await.unwrap().map(|w| w.id), None, "the revoked instances came back");
}

#[tokio::test]
async fn a_fleet_s_grant_binds_its_instances_and_its_cap_counts_live_ones() {
    use lathe_store::fleets::{create_fleet, FleetTerms};
    use lathe_store::workers::{enroll_worker, leave, ROLE_SERVING, ROLE_TRAINING};
    let db = TestDb::new().await;
    let grant = Grant { pools: Some(vec!["a100".into()]), roles: vec![ROLE_TRAINING.into()] };
    let (_, secret) = create_fleet(&db.pool, "a100s", &FleetTerms { grant: grant.clone(), max_workers: Some(1) }).await.unwrap();
    let default_pool = vec!["default".to_string()];
    let a100 = vec!["a100".to_string()];
    match enroll_worker(&db.pool, &secret, instance("x", &default_pool, None), LIVE).await.unwrap() {
        Enrolment::Refused(field, why) => assert_eq!((field, why.contains("a100")), ("pools", true)),
        other => panic!("{other:?}"),
    }
    let serving = NewWorker { serving: true, ..instance("s", &a100, None) };
    assert!(matches!(enroll_worker(&db.pool, &secret, serving, LIVE).await.unwrap(), Enrolment::Refused("serving", _)));
    let first = enrolled(enroll_worker(&db.pool, &secret, instance("a", &a100, None), LIVE).await.unwrap());
    assert_eq!(first.worker.grant, grant, "the instance carries its fleet's grant");
    let authenticated = authenticate_worker(&db.pool, &first.token).await.unwrap().unwrap();
    assert!(authenticated.grant.allows(ROLE_TRAINING) && !authenticated.grant.allows(ROLE_SERVING));
    assert!(matches!(
        enroll_worker(&db.pool, &secret, instance("b", &a100, None), LIVE).await.unwrap(),
        Enrolment::FleetFull { max_workers: 1, .. }
    ));
    // An instance that left no longer counts.
    leave(&db.pool, &first.worker.id).await.unwrap();
    assert!(matches!(enroll_worker(&db.pool, &secret, instance("b", &a100, None), LIVE).await.unwrap(), Enrolment::Enrolled(_)));
}
