use lathe_store::keys::{authenticate_api_key, create_api_key, list_api_keys, revoke_api_key, API_KEY_PREFIX};
use lathe_store::projects::{create_project, get_project_by_name};
use lathe_store::StoreError;

use crate::support::{project, TestDb};

#[tokio::test]
async fn a_new_api_key_authenticates_as_its_project_and_only_its_hash_is_stored() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let created = create_api_key(&db.pool, &project_id, "ci").await.unwrap();
    assert!(created.token.starts_with(API_KEY_PREFIX));

    assert_eq!(authenticate_api_key(&db.pool, &created.token).await.unwrap(), Some(project_id.clone()));
    assert_eq!(authenticate_api_key(&db.pool, "lathe-sk-not-a-key").await.unwrap(), None);

    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_one(&db.pool).await.unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&created.token));
}

#[tokio::test]
async fn a_revoked_key_no_longer_authenticates_and_another_project_cannot_revoke_it() {
    let db = TestDb::new().await;
    let project_a = project(&db.pool, "a").await;
    let project_b = project(&db.pool, "b").await;
    let created = create_api_key(&db.pool, &project_a, "laptop").await.unwrap();

    let foreign = revoke_api_key(&db.pool, &project_b, &created.key.id).await;
    assert!(matches!(foreign, Err(StoreError::NotFound)));
    assert!(authenticate_api_key(&db.pool, &created.token).await.unwrap().is_some());

    let revoked = revoke_api_key(&db.pool, &project_a, &created.key.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(authenticate_api_key(&db.pool, &created.token).await.unwrap(), None);
    let listed = list_api_keys(&db.pool, &project_a).await.unwrap();
    assert_eq!(listed.len(), 1, "revoked keys are kept for the audit trail");
}

#[tokio::test]
async fn a_project_name_is_unique_and_found_by_name() {
    let db = TestDb::new().await;
    let created = create_project(&db.pool, "acme").await.unwrap();
    assert!(created.id.starts_with("org-"));
    assert!(matches!(create_project(&db.pool, "acme").await, Err(StoreError::Conflict(_))));
    assert_eq!(get_project_by_name(&db.pool, "acme").await.unwrap(), created);
    assert!(matches!(create_api_key(&db.pool, "org-missing", "x").await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_reported_as_unavailable() {
    // Nothing listens on port 1: the API maps this to 503, not to a 500 or a 401.
    let pool = lathe_store::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap();
    let result = authenticate_api_key(&pool, "lathe-sk-anything").await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
}
