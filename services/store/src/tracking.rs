//! Runs logged to an experiment tracker (MLflow): one row per job that asked for it, holding
//! how far the controller's exporter has got, so an exporter that stops (a crash, a tracker
//! that is down) picks up where it was and logs every step once it can.

use sqlx::types::time::OffsetDateTime;
use sqlx::types::Json;
use sqlx::PgPool;

use crate::StoreError;

/// A job's export to MLflow and its progress.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Export {
    pub job_id: String,
    pub experiment: String,
    pub run_name: Option<String>,
    pub tags: Json<std::collections::BTreeMap<String, String>>,
    pub experiment_id: Option<String>,
    pub run_id: Option<String>,
    pub artifact_uri: Option<String>,
    /// Metric points up to this step are in the run.
    pub logged_step: i64,
    pub params_logged: bool,
    /// Artifacts and the run's end status are in: nothing more to do.
    pub finished: bool,
    pub failures: i32,
}

const COLUMNS: &str =
    "job_id, experiment, run_name, tags, experiment_id, run_id, artifact_uri, logged_step, params_logged, finished, failures";

/// Notes that `job_id`'s run goes to MLflow `experiment` (idempotent).
pub async fn add_export(
    pool: &PgPool,
    job_id: &str,
    experiment: &str,
    run_name: Option<&str>,
    tags: &std::collections::BTreeMap<String, String>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO mlflow_exports (job_id, experiment, run_name, tags) VALUES ($1, $2, $3, $4) ON CONFLICT (job_id) DO NOTHING")
        .bind(job_id)
        .bind(experiment)
        .bind(run_name)
        .bind(Json(tags))
        .execute(pool)
        .await?;
    Ok(())
}

/// Up to `limit` unfinished exports due for a try, leased for `lease` so that another
/// controller replica leaves them alone meanwhile.
pub async fn claim_exports(pool: &PgPool, limit: i64, lease: std::time::Duration) -> Result<Vec<Export>, StoreError> {
    let rows = sqlx::query_as::<_, Export>(&format!(
        "UPDATE mlflow_exports SET lease_until = now() + make_interval(secs => $2)
         WHERE job_id IN (SELECT job_id FROM mlflow_exports
                          WHERE NOT finished AND next_try_at <= now() AND (lease_until IS NULL OR lease_until < now())
                          ORDER BY next_try_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING {COLUMNS}"
    ))
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Saves an export's progress and releases its lease; after a failure, `retry_at` is when to
/// try again and `error` why it failed.
pub async fn save_export(pool: &PgPool, export: &Export, retry_at: Option<(OffsetDateTime, &str)>) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE mlflow_exports SET experiment_id = $2, run_id = $3, artifact_uri = $4, logged_step = $5, params_logged = $6,
             finished = $7, failures = $8, next_try_at = COALESCE($9, now()), last_error = $10, lease_until = NULL
         WHERE job_id = $1",
    )
    .bind(&export.job_id)
    .bind(&export.experiment_id)
    .bind(&export.run_id)
    .bind(&export.artifact_uri)
    .bind(export.logged_step)
    .bind(export.params_logged)
    .bind(export.finished)
    .bind(export.failures)
    .bind(retry_at.map(|(at, _)| at))
    .bind(retry_at.map(|(_, error)| error))
    .execute(pool)
    .await?;
    Ok(())
}

/// The exports of jobs whose spec asks for MLflow but that have no row (a controller that died
/// between the job's insert and the export's): added.
pub async fn add_missing_exports(pool: &PgPool) -> Result<u64, StoreError> {
    let added = sqlx::query(
        "INSERT INTO mlflow_exports (job_id, experiment, run_name, tags)
         SELECT j.id, i->'mlflow'->>'experiment', i->'mlflow'->>'run_name', COALESCE(i->'mlflow'->'tags', '{}')
         FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(COALESCE(j.spec->'integrations', '[]')) i
         WHERE i->>'type' = 'mlflow' AND NOT EXISTS (SELECT 1 FROM mlflow_exports e WHERE e.job_id = j.id)
         ON CONFLICT (job_id) DO NOTHING",
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(added)
}
