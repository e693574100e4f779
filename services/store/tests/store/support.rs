//! A fresh database per test, and the fixtures most tests need.

use std::time::Duration;

use lathe_core::{CreateJobRequest, FileId, FileSummary, JobSpec};
use lathe_store::files::{insert_file, new_file_id, NewFile, PURPOSE_FINE_TUNE};
use lathe_store::workers::{register_worker, Grant, NewWorker};
use lathe_store::{PgPool, PgPoolOptions};
use rand::distr::{Alphanumeric, SampleString};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A migrated database that exists for one test; dropped (connections and all) on drop.
pub struct TestDb {
    pub pool: PgPool,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("lathe_test_{}", Alphanumeric.sample_string(&mut rand::rng(), 12).to_lowercase());
        let admin = PgPoolOptions::new().max_connections(1).connect(ADMIN_URL).await.expect("connect to postgres");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&url)
            .await
            .expect("connect to the test database");
        lathe_store::migrate(&pool).await.expect("migrations apply");
        TestDb { pool, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on async work: use a thread
        // with a runtime of its own. FORCE ends the pool's connections.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let admin = PgPoolOptions::new().max_connections(1).connect(ADMIN_URL).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
                admin.close().await;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

pub async fn project(pool: &PgPool, name: &str) -> String {
    lathe_store::projects::create_project(pool, name).await.expect("project created").id
}

/// A validated chat training file of `project`.
pub async fn training_file(pool: &PgPool, project_id: &str) -> FileId {
    let summary = FileSummary { format: lathe_core::DataFormat::Chat, examples: 12, lines: 12, bytes: 3456 };
    let file = NewFile {
        id: new_file_id(),
        project_id,
        purpose: PURPOSE_FINE_TUNE,
        filename: "cve-cwe.jsonl",
        sha256: [7; 32],
        bytes: 3456,
        summary: Some(summary),
    };
    insert_file(pool, file).await.expect("file inserted").id
}

/// A resolved spec, as the controller makes it from a create request.
pub fn spec(training_file: &FileId, extra: serde_json::Value) -> JobSpec {
    let mut body = serde_json::json!({ "model": "tiny-qwen3", "training_file": training_file });
    for (key, value) in extra.as_object().expect("object") {
        body[key] = value.clone();
    }
    JobSpec::try_from(CreateJobRequest::from_value(body).expect("request parses")).expect("spec resolves")
}

/// A queued job of a fresh project, and that project's id.
pub async fn queued_job(pool: &PgPool, project_name: &str) -> (String, String) {
    let project_id = project(pool, project_name).await;
    let file = training_file(pool, &project_id).await;
    let (job, _) = lathe_store::jobs::create_job(pool, &project_id, &spec(&file, serde_json::json!({})), None).await.expect("job created");
    (project_id, job.id.to_string())
}

/// A CPU worker in the default pool.
pub async fn worker(pool: &PgPool, name: &str) -> String {
    worker_with(pool, name, &["default".to_string()], None).await
}

pub async fn worker_with(pool: &PgPool, name: &str, pools: &[String], gpu_memory_bytes: Option<i64>) -> String {
    let new = NewWorker {
        name,
        device_kind: if gpu_memory_bytes.is_some() { "cuda" } else { "cpu" },
        gpu_name: None,
        gpu_memory_bytes,
        pools,
        gpus: 1,
        nodes: 1,
        version: "test",
        slurm_job_id: None,
        pod_name: None,
        serving: false,
    };
    register_worker(pool, new, &Grant::default()).await.expect("worker registered").worker.id
}

/// A job id the store handed out as text, typed again for the calls that take a `JobId`.
pub fn as_job_id(text: &str) -> lathe_core::JobId {
    lathe_core::JobId::parse(text).expect("a job id from the store")
}
