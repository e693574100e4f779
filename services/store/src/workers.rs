//! GPU worker daemons: registered with their capabilities, authenticated by their own bearer
//! token (stored hashed, like API keys), kept alive by heartbeats. A claim reads the worker's
//! pools and GPU memory from here, not from the request, so a worker cannot take a job its
//! registration says it cannot fit.
//!
//! A worker gets its token one of two ways: an operator mints one for a named worker
//! ([`register_worker`], `lathe admin create-worker`), or an instance enrols with a fleet's
//! shared secret ([`enroll_worker`]) and is given a token of its own. Either way the identity
//! carries a [`Grant`]: the pools and roles it may take, which registration cannot widen.

use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::dispatch::lease::release_held_by;
use crate::dispatch::Requeued;
use crate::{random, StoreError};

pub const WORKER_TOKEN_PREFIX: &str = "lathe-wk-";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Worker {
    pub id: String,
    pub name: String,
    /// `cuda`, `rocm` or `cpu`.
    pub device_kind: String,
    pub gpu_name: Option<String>,
    pub gpu_memory_bytes: Option<i64>,
    /// Devices it runs one job on, per node (a job's `gpus` must fit).
    pub gpus: i32,
    /// Nodes it can spread a job over (a multi-node Slurm allocation).
    pub nodes: i32,
    pub pools: Vec<String>,
    pub version: String,
    pub registered_at: OffsetDateTime,
    pub last_heartbeat_at: OffsetDateTime,
    /// Finishes its attempt and claims no more.
    pub draining: bool,
    pub revoked_at: Option<OffsetDateTime>,
    /// The fleet it enrolled with, if it did.
    pub fleet_id: Option<String>,
    /// Where a scheduler placed it: the Slurm job (`SLURM_JOB_ID`) or Kubernetes pod.
    pub slurm_job_id: Option<String>,
    pub pod_name: Option<String>,
    /// When it said it was exiting ([`leave`]); cleared by its next registration.
    pub left_at: Option<OffsetDateTime>,
    /// An inference server (`lathe worker --serve`): it takes completions, not jobs.
    pub serving: bool,
    /// What its token (or its fleet, at enrolment) allows.
    #[sqlx(flatten)]
    pub grant: Grant,
    /// When it last asked for work (a claim); `None`: never.
    pub last_claim_at: Option<OffsetDateTime>,
}

const WORKER_COLUMNS: &str =
    "id, name, device_kind, gpu_name, gpu_memory_bytes, gpus, nodes, pools, version, registered_at, last_heartbeat_at, \
                              draining, revoked_at, fleet_id, slurm_job_id, pod_name, left_at, serving, grant_pools, grant_roles, \
                              last_claim_at";

/// Claims jobs and evaluations.
pub const ROLE_TRAINING: &str = "training";
/// Opens a Serve stream and answers completions.
pub const ROLE_SERVING: &str = "serving";
pub const ROLES: [&str; 2] = [ROLE_TRAINING, ROLE_SERVING];

/// What an identity may do: the pools it may serve (`None`: any) and its roles. A fleet holds
/// one for the instances that enrol with it; a worker row holds its own. Registration may
/// offer less, never more (docs/architecture.md §3, "Worker trust").
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Grant {
    #[sqlx(rename = "grant_pools")]
    pub pools: Option<Vec<String>>,
    #[sqlx(rename = "grant_roles")]
    pub roles: Vec<String>,
}

impl Default for Grant {
    /// Training, in any pool: what an operator's `create-worker` and a fleet give unless told.
    fn default() -> Self {
        Grant { pools: None, roles: vec![ROLE_TRAINING.to_string()] }
    }
}

impl Grant {
    pub fn allows(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Why a registration offering `pools`, as a server (`serving`) or a trainer, asks for more
    /// than this grant: the request field at fault and a message; `None` when it fits.
    pub fn refusal(&self, pools: &[String], serving: bool) -> Option<(&'static str, String)> {
        let role = if serving { ROLE_SERVING } else { ROLE_TRAINING };
        if !self.allows(role) {
            let allowed = self.roles.join(", ");
            return Some(("serving", format!("this identity may not be a {role} worker (its grant allows: {allowed})")));
        }
        if let Some(allowed) = &self.pools {
            if let Some(pool) = pools.iter().find(|p| !allowed.contains(p)) {
                return Some(("pools", format!("pool {pool:?} is outside this identity's grant ({})", allowed.join(", "))));
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct NewWorker<'a> {
    pub name: &'a str,
    pub device_kind: &'a str,
    pub gpu_name: Option<&'a str>,
    pub gpu_memory_bytes: Option<i64>,
    pub gpus: i32,
    pub nodes: i32,
    pub pools: &'a [String],
    pub version: &'a str,
    pub slurm_job_id: Option<&'a str>,
    pub pod_name: Option<&'a str>,
    pub serving: bool,
}

/// The worker behind a token, as the gRPC service checks each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedWorker {
    pub id: String,
    /// Registered as an inference server.
    pub serving: bool,
    pub grant: Grant,
}

/// A registered worker and its plaintext token, returned once.
#[derive(Debug, Clone)]
pub struct RegisteredWorker {
    pub worker: Worker,
    pub token: String,
}

const INSERT_WORKER: &str = "INSERT INTO workers (id, name, device_kind, gpu_name, gpu_memory_bytes, pools, token_hash, version, \
    slurm_job_id, pod_name, gpus, nodes, serving, fleet_id, grant_pools, grant_roles)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// Inserts a worker row with a new token (`fleet_id` when it enrolled).
async fn insert_worker(
    conn: &mut sqlx::PgConnection,
    worker: NewWorker<'_>,
    fleet_id: Option<&str>,
    grant: &Grant,
) -> Result<RegisteredWorker, StoreError> {
    let token = random::token(WORKER_TOKEN_PREFIX);
    let row = sqlx::query_as::<_, Worker>(&format!("{INSERT_WORKER} RETURNING {WORKER_COLUMNS}"))
        .bind(random::alphanumeric("wrk_", 16))
        .bind(worker.name)
        .bind(worker.device_kind)
        .bind(worker.gpu_name)
        .bind(worker.gpu_memory_bytes)
        .bind(worker.pools)
        .bind(random::sha256(&token))
        .bind(worker.version)
        .bind(worker.slurm_job_id)
        .bind(worker.pod_name)
        .bind(worker.gpus.max(1))
        .bind(worker.nodes.max(1))
        .bind(worker.serving)
        .bind(fleet_id)
        .bind(&grant.pools)
        .bind(&grant.roles)
        .fetch_one(conn)
        .await?;
    Ok(RegisteredWorker { worker: row, token })
}

/// A worker row and a token for it, minted by an operator (`lathe admin create-worker`) with
/// what it may do.
pub async fn register_worker(pool: &PgPool, worker: NewWorker<'_>, grant: &Grant) -> Result<RegisteredWorker, StoreError> {
    let mut conn = pool.acquire().await?;
    insert_worker(&mut conn, worker, None, grant).await
}

/// What came of an enrolment with a fleet secret.
#[derive(Debug, Clone)]
pub enum Enrolment {
    Enrolled(Box<RegisteredWorker>),
    /// No live fleet has that secret.
    UnknownSecret,
    /// The registration asks for more than the fleet's grant: (field, why).
    Refused(&'static str, String),
    /// The fleet has its `max_workers` live instances already.
    FleetFull {
        fleet: String,
        max_workers: i32,
    },
}

/// Enrols a new instance with a fleet's secret: a worker row of its own, the fleet's grant, and
/// a token for it. The fleet row is share-locked until the insert commits, so a revocation
/// (which updates it) waits for the enrolment and then revokes the new instance too. Instances
/// count toward `max_workers` while live: not revoked, not left, heard from within `live_within`.
pub async fn enroll_worker(
    pool: &PgPool,
    fleet_secret: &str,
    worker: NewWorker<'_>,
    live_within: std::time::Duration,
) -> Result<Enrolment, StoreError> {
    #[derive(sqlx::FromRow)]
    struct FleetRow {
        id: String,
        name: String,
        max_workers: Option<i32>,
        #[sqlx(flatten)]
        grant: Grant,
    }
    let mut tx = pool.begin().await?;
    let fleet = sqlx::query_as::<_, FleetRow>(
        "SELECT id, name, max_workers, grant_pools, grant_roles FROM fleets WHERE token_hash = $1 AND revoked_at IS NULL FOR SHARE",
    )
    .bind(random::sha256(fleet_secret))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(fleet) = fleet else { return Ok(Enrolment::UnknownSecret) };
    if let Some((field, why)) = fleet.grant.refusal(worker.pools, worker.serving) {
        return Ok(Enrolment::Refused(field, why));
    }
    if let Some(max_workers) = fleet.max_workers {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workers WHERE fleet_id = $1 AND revoked_at IS NULL AND left_at IS NULL
               AND last_heartbeat_at > now() - make_interval(secs => $2)",
        )
        .bind(&fleet.id)
        .bind(live_within.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?;
        if live >= i64::from(max_workers) {
            return Ok(Enrolment::FleetFull { fleet: fleet.name, max_workers });
        }
    }
    let enrolled = insert_worker(&mut tx, worker, Some(&fleet.id), &fleet.grant).await?;
    tx.commit().await?;
    Ok(Enrolment::Enrolled(Box::new(enrolled)))
}

/// The worker a token belongs to, with what it may do, or `None` for an unknown or revoked
/// token (the gRPC service answers UNAUTHENTICATED).
pub async fn authenticate_worker(pool: &PgPool, token: &str) -> Result<Option<AuthenticatedWorker>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        serving: bool,
        grant_pools: Option<Vec<String>>,
        grant_roles: Vec<String>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT w.id, w.serving, w.grant_pools, w.grant_roles FROM workers w LEFT JOIN fleets f ON f.id = w.fleet_id
         WHERE w.token_hash = $1 AND w.revoked_at IS NULL AND f.revoked_at IS NULL",
    )
    .bind(random::sha256(token))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| AuthenticatedWorker { id: r.id, serving: r.serving, grant: Grant { pools: r.grant_pools, roles: r.grant_roles } }))
}

/// Of `ids`, the workers no longer allowed in: revoked, or of a revoked fleet. The controller
/// asks about the workers whose streams it holds, to close them.
pub async fn revoked_among(pool: &PgPool, ids: &[String]) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT w.id FROM workers w LEFT JOIN fleets f ON f.id = w.fleet_id
         WHERE w.id = ANY($1) AND (w.revoked_at IS NOT NULL OR f.revoked_at IS NOT NULL)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Revokes a worker's token, by worker id or name (every worker of that name), and gives back
/// what those workers hold (queued again for free, to resume from the last checkpoint; see
/// [`crate::dispatch::lease`]). Returns the ids revoked and the work released; no worker is
/// `NotFound`. Revoking twice is harmless.
pub async fn revoke_worker(pool: &PgPool, id_or_name: &str) -> Result<(Vec<String>, Vec<Requeued>), StoreError> {
    let mut tx = pool.begin().await?;
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE workers SET revoked_at = coalesce(revoked_at, now()), draining = true WHERE id = $1 OR name = $1 RETURNING id",
    )
    .bind(id_or_name)
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Err(StoreError::NotFound);
    }
    let released = release_held_by(&mut tx, &ids, "the worker was revoked").await?;
    tx.commit().await?;
    Ok((ids, released))
}

/// Drains workers by id or name: each finishes what it runs and claims nothing more (with
/// `--exit-when-idle` it then exits). Returns the ids; none is `NotFound`.
pub async fn drain_workers(pool: &PgPool, id_or_name: &str) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar("UPDATE workers SET draining = true WHERE id = $1 OR name = $1 RETURNING id")
        .bind(id_or_name)
        .fetch_all(pool)
        .await?;
    if ids.is_empty() {
        return Err(StoreError::NotFound);
    }
    Ok(ids)
}

pub async fn heartbeat(pool: &PgPool, worker_id: &str) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET last_heartbeat_at = now() WHERE id = $1").bind(worker_id).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn set_draining(pool: &PgPool, worker_id: &str, draining: bool) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET draining = $2 WHERE id = $1").bind(worker_id).bind(draining).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn list_workers(pool: &PgPool) -> Result<Vec<Worker>, StoreError> {
    let workers =
        sqlx::query_as::<_, Worker>(&format!("SELECT {WORKER_COLUMNS} FROM workers ORDER BY registered_at, id")).fetch_all(pool).await?;
    Ok(workers)
}

/// A worker's state as the admin list shows it: `revoked`, `left` (exited on its own), `stale`
/// (no heartbeat within a lease), `draining` or `live`.
pub const WORKER_STATES: [&str; 5] = ["live", "draining", "stale", "left", "revoked"];

/// The SQL of [`WORKER_STATES`], given `$stale_before` as the parameter named.
fn state_sql(stale_before: &str) -> String {
    format!(
        "CASE WHEN revoked_at IS NOT NULL THEN 'revoked' WHEN left_at IS NOT NULL THEN 'left'
              WHEN last_heartbeat_at < {stale_before} THEN 'stale' WHEN draining THEN 'draining' ELSE 'live' END"
    )
}

/// One page of workers in registration order, after the worker `after`, in the given states
/// (all when empty).
pub async fn list_workers_page(
    pool: &PgPool,
    states: &[String],
    stale_before: OffsetDateTime,
    after: Option<&str>,
    limit: i64,
) -> Result<crate::Page<Worker>, StoreError> {
    let workers = sqlx::query_as::<_, Worker>(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers
         WHERE (cardinality($1::text[]) = 0 OR {state} = ANY($1))
           AND ($3::text IS NULL OR (registered_at, id) > (SELECT registered_at, id FROM workers WHERE id = $3))
         ORDER BY registered_at, id LIMIT $4",
        state = state_sql("$2")
    ))
    .bind(states)
    .bind(stale_before)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    Ok(crate::Page::from_overfetch(workers, limit))
}

/// The workers that have not left and are not revoked (live, draining or stale): what the
/// gauges count, without reading the history of every pilot that ever ran.
pub async fn current_workers(pool: &PgPool) -> Result<Vec<Worker>, StoreError> {
    let workers = sqlx::query_as::<_, Worker>(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE left_at IS NULL AND revoked_at IS NULL ORDER BY registered_at, id"
    ))
    .fetch_all(pool)
    .await?;
    Ok(workers)
}

/// Forgets workers gone for longer than `retention` — left, revoked, or silent since — that no
/// attempt, lease or evaluation names: pilots that came and went without work. A worker that ran
/// an attempt stays (archived: it is `left`, `revoked` or `stale`), so every attempt's history
/// still says where it ran. Returns how many were deleted.
pub async fn prune_workers(pool: &PgPool, retention: std::time::Duration) -> Result<u64, StoreError> {
    let before = OffsetDateTime::now_utc() - retention;
    let deleted = sqlx::query(
        "DELETE FROM workers w
         WHERE greatest(w.last_heartbeat_at, coalesce(w.left_at, w.revoked_at, w.last_heartbeat_at)) < $1
           AND (w.left_at IS NOT NULL OR w.revoked_at IS NOT NULL OR w.last_heartbeat_at < $1)
           AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = w.id)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_owner = w.id)
           AND NOT EXISTS (SELECT 1 FROM evaluations e WHERE e.lease_owner = w.id)",
    )
    .bind(before)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

/// A worker's capabilities as it reports them when it (re)starts; the token stays the same.
pub async fn update_registration(pool: &PgPool, worker_id: &str, worker: NewWorker<'_>) -> Result<Worker, StoreError> {
    sqlx::query_as::<_, Worker>(&format!(
        "UPDATE workers SET name = $2, device_kind = $3, gpu_name = $4, gpu_memory_bytes = $5, pools = $6,
                version = $7, slurm_job_id = $8, pod_name = $9, gpus = $10, nodes = $11, serving = $12,
                last_heartbeat_at = now(), left_at = NULL
         WHERE id = $1
         RETURNING {WORKER_COLUMNS}"
    ))
    .bind(worker_id)
    .bind(worker.name)
    .bind(worker.device_kind)
    .bind(worker.gpu_name)
    .bind(worker.gpu_memory_bytes)
    .bind(worker.pools)
    .bind(worker.version)
    .bind(worker.slurm_job_id)
    .bind(worker.pod_name)
    .bind(worker.gpus.max(1))
    .bind(worker.nodes.max(1))
    .bind(worker.serving)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)
}

/// The worker is exiting: no longer live (demand's worker counts, the admin list).
pub async fn leave(pool: &PgPool, worker_id: &str) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE workers SET left_at = now() WHERE id = $1").bind(worker_id).execute(pool).await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Whether the worker has been told to drain.
pub async fn is_draining(pool: &PgPool, worker_id: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT draining FROM workers WHERE id = $1").bind(worker_id).fetch_optional(pool).await?.ok_or(StoreError::NotFound)
}
