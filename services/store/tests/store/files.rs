use lathe_core::DataFormat;
use lathe_store::files::{delete_file, get_file, insert_file, list_files, new_file_id, NewFile, PURPOSE_FINE_TUNE_RESULTS};
use lathe_store::StoreError;

use crate::support::{project, training_file, TestDb};

#[tokio::test]
async fn a_stored_file_comes_back_with_its_validation_summary() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let id = training_file(&db.pool, &project_id).await;

    let file = get_file(&db.pool, &project_id, &id).await.unwrap();
    assert_eq!(file.filename, "cve-cwe.jsonl");
    assert_eq!(file.bytes, 3456);
    let summary = file.summary.unwrap();
    assert_eq!((summary.format, summary.examples, summary.lines), (DataFormat::Chat, 12, 12));
}

#[tokio::test]
async fn files_are_listed_newest_first_in_pages() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(training_file(&db.pool, &project_id).await);
    }
    ids.reverse();

    let first = list_files(&db.pool, &project_id, None, None, 2, false).await.unwrap();
    assert!(first.has_more);
    assert_eq!(first.items.iter().map(|f| f.id.clone()).collect::<Vec<_>>(), ids[..2]);
    let last_of_first = first.items[1].id.to_string();
    let second = list_files(&db.pool, &project_id, None, Some(&last_of_first), 10, false).await.unwrap();
    assert!(!second.has_more);
    assert_eq!(second.items.iter().map(|f| f.id.clone()).collect::<Vec<_>>(), ids[2..]);

    let results = list_files(&db.pool, &project_id, Some(PURPOSE_FINE_TUNE_RESULTS), None, 10, false).await.unwrap();
    assert!(results.items.is_empty());
}

#[tokio::test]
async fn a_deleted_file_is_gone_from_get_list_and_a_second_delete() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let id = training_file(&db.pool, &project_id).await;

    delete_file(&db.pool, &project_id, &id).await.unwrap();
    assert!(matches!(get_file(&db.pool, &project_id, &id).await, Err(StoreError::NotFound)));
    assert!(list_files(&db.pool, &project_id, None, None, 10, false).await.unwrap().items.is_empty());
    assert!(matches!(delete_file(&db.pool, &project_id, &id).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn project_b_cannot_get_list_or_delete_project_a_file() {
    let db = TestDb::new().await;
    let project_a = project(&db.pool, "a").await;
    let project_b = project(&db.pool, "b").await;
    let id = training_file(&db.pool, &project_a).await;

    assert!(matches!(get_file(&db.pool, &project_b, &id).await, Err(StoreError::NotFound)));
    assert!(list_files(&db.pool, &project_b, None, None, 10, false).await.unwrap().items.is_empty());
    assert!(matches!(delete_file(&db.pool, &project_b, &id).await, Err(StoreError::NotFound)));
    assert!(get_file(&db.pool, &project_a, &id).await.is_ok());
}

#[tokio::test]
async fn a_results_file_has_no_summary() {
    let db = TestDb::new().await;
    let project_id = project(&db.pool, "acme").await;
    let new = NewFile {
        id: new_file_id(),
        project_id: &project_id,
        purpose: PURPOSE_FINE_TUNE_RESULTS,
        filename: "step_metrics.csv",
        sha256: [1; 32],
        bytes: 10,
        summary: None,
    };
    let file = insert_file(&db.pool, new).await.unwrap();
    assert_eq!(file.summary, None);
    assert_eq!(file.purpose, PURPOSE_FINE_TUNE_RESULTS);
}
