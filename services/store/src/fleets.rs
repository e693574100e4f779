//! Fleets: one shared secret that any number of worker instances enrol with (the pilots a Slurm
//! autoscaler submits, the pods of a Kubernetes ScaledJob). Enrolment creates a worker row and
//! an instance token of its own ([`crate::workers::enroll_worker`]), so replicas never share or
//! overwrite an identity; the secret itself authorises nothing but enrolment. Revoking a fleet
//! revokes every instance enrolled with it.

use sqlx::types::time::OffsetDateTime;
use sqlx::PgPool;

use crate::dispatch::lease::release_held_by;
use crate::workers::Grant;
use crate::{random, StoreError};

pub const FLEET_TOKEN_PREFIX: &str = "lathe-fleet-";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Fleet {
    pub id: String,
    pub name: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// What its instances may do (copied onto each at enrolment).
    #[sqlx(flatten)]
    pub grant: Grant,
    /// Live instances at most; `None`: no cap.
    pub max_workers: Option<i32>,
}

const FLEET_COLUMNS: &str = "id, name, created_at, revoked_at, grant_pools, grant_roles, max_workers";

/// How a fleet's instances are bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetTerms {
    pub grant: Grant,
    pub max_workers: Option<i32>,
}

/// A new fleet and its secret, returned once (only its SHA-256 is stored).
pub async fn create_fleet(pool: &PgPool, name: &str, terms: &FleetTerms) -> Result<(Fleet, String), StoreError> {
    let secret = random::token(FLEET_TOKEN_PREFIX);
    let fleet = sqlx::query_as::<_, Fleet>(&format!(
        "INSERT INTO fleets (id, name, token_hash, grant_pools, grant_roles, max_workers) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO NOTHING RETURNING {FLEET_COLUMNS}"
    ))
    .bind(random::alphanumeric("flt_", 16))
    .bind(name)
    .bind(random::sha256(&secret))
    .bind(&terms.grant.pools)
    .bind(&terms.grant.roles)
    .bind(terms.max_workers)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| StoreError::Conflict(format!("a fleet named {name:?} already exists")))?;
    Ok((fleet, secret))
}

/// The fleet whose secret an operator configured on the controller (`--fleet-secret`), created
/// under `name` on first start. A changed secret replaces the old one for new enrolments
/// (instances already enrolled keep their own tokens). A revoked fleet stays revoked while its
/// secret is unchanged; a new secret is the way back (the old instances stay revoked). The
/// terms are the configuration's on every start (they bind new enrolments).
pub async fn ensure_fleet_secret(pool: &PgPool, name: &str, secret: &str, terms: &FleetTerms) -> Result<Fleet, StoreError> {
    let fleet = sqlx::query_as::<_, Fleet>(&format!(
        "INSERT INTO fleets (id, name, token_hash, grant_pools, grant_roles, max_workers) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET token_hash = EXCLUDED.token_hash,
             revoked_at = CASE WHEN fleets.token_hash = EXCLUDED.token_hash THEN fleets.revoked_at END,
             grant_pools = EXCLUDED.grant_pools, grant_roles = EXCLUDED.grant_roles, max_workers = EXCLUDED.max_workers
         RETURNING {FLEET_COLUMNS}"
    ))
    .bind(random::alphanumeric("flt_", 16))
    .bind(name)
    .bind(random::sha256(secret))
    .bind(&terms.grant.pools)
    .bind(&terms.grant.roles)
    .bind(terms.max_workers)
    .fetch_one(pool)
    .await?;
    Ok(fleet)
}

/// Revokes a fleet (by id or name) and every worker enrolled with it: their next call is
/// refused, the controller closes their streams, and what they hold is queued again for free.
/// Returns the worker ids.
pub async fn revoke_fleet(pool: &PgPool, id_or_name: &str) -> Result<(Fleet, Vec<String>), StoreError> {
    let mut tx = pool.begin().await?;
    let fleet = sqlx::query_as::<_, Fleet>(&format!(
        "UPDATE fleets SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 OR name = $1 RETURNING {FLEET_COLUMNS}"
    ))
    .bind(id_or_name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::NotFound)?;
    let workers: Vec<String> =
        sqlx::query_scalar("UPDATE workers SET revoked_at = coalesce(revoked_at, now()), draining = true WHERE fleet_id = $1 RETURNING id")
            .bind(&fleet.id)
            .fetch_all(&mut *tx)
            .await?;
    release_held_by(&mut tx, &workers, "the worker's fleet was revoked").await?;
    tx.commit().await?;
    Ok((fleet, workers))
}

pub async fn list_fleets(pool: &PgPool) -> Result<Vec<Fleet>, StoreError> {
    Ok(sqlx::query_as::<_, Fleet>(&format!("SELECT {FLEET_COLUMNS} FROM fleets ORDER BY created_at, id")).fetch_all(pool).await?)
}
