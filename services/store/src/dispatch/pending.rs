//! Why a queued job is not starting, when the reconciler can tell: no live worker of its pool
//! offers its shape (GPUs, nodes, memory). Kept on the row (`pending_reason`, on the job
//! object), said once as a `warn` event, cleared when a worker that fits appears or the job is
//! claimed. The job stays queued: a worker may still come (an autoscaler, an operator).

use std::time::Duration;

use lathe_core::preemption::{Offer, Shape};
use sqlx::PgPool;

use crate::StoreError;

/// Queued jobs looked at per pass.
const LOOKED_AT: i64 = 1000;

/// The reason for a shape no offer fits, `None` when one does.
pub fn unserved_reason(shape: &Shape, offers: &[Offer]) -> Option<String> {
    if offers.iter().any(|o| o.fits(shape)) {
        return None;
    }
    let in_pool: Vec<&Offer> = offers.iter().filter(|o| o.pools.contains(&shape.pool)).collect();
    let memory = shape.gpu_memory_gb.map(|gb| format!(" with {gb} GB each")).unwrap_or_default();
    let asked = format!("{} GPU(s) on {} node(s){memory}", shape.gpus, shape.nodes);
    Some(match in_pool.iter().max_by_key(|o| (o.gpus * o.nodes, o.gpu_memory_bytes)) {
        None => format!("no live worker serves pool {:?}; this job asks for {asked}", shape.pool),
        Some(largest) => format!(
            "no live worker of pool {:?} offers {asked}; the largest offers {} GPU(s) on {} node(s){}",
            shape.pool,
            largest.gpus,
            largest.nodes,
            largest.gpu_memory_bytes.map(|b| format!(" with {} GB", b >> 30)).unwrap_or_default()
        ),
    })
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    pool: String,
    gpus: i32,
    nodes: i32,
    gpu_memory_gb: Option<i32>,
    pending_reason: Option<String>,
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// Sets or clears the reason of every queued job older than `settled` (a job just created
/// gets a moment for a worker to claim it); returns the jobs whose reason is new, with it.
pub async fn refresh_pending_reasons(pool: &PgPool, live_within: Duration, settled: Duration) -> Result<Vec<(String, String)>, StoreError> {
    let offers: Vec<(Vec<String>, i32, i32, Option<i64>)> = sqlx::query_as(
        "SELECT w.pools, w.gpus, w.nodes, w.gpu_memory_bytes FROM workers w
         LEFT JOIN fleets f ON f.id = w.fleet_id
         WHERE w.revoked_at IS NULL AND f.revoked_at IS NULL AND w.left_at IS NULL AND NOT w.serving
           AND 'training' = ANY(w.grant_roles) AND w.last_heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(live_within.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let offers: Vec<Offer> = offers
        .into_iter()
        .map(|(pools, gpus, nodes, memory)| Offer {
            pools,
            gpus: count(gpus),
            nodes: count(nodes),
            gpu_memory_bytes: memory.and_then(|b| u64::try_from(b).ok()),
        })
        .collect();
    let queued: Vec<Row> = sqlx::query_as(
        "SELECT id, pool, gpus, nodes, gpu_memory_gb, pending_reason FROM jobs
         WHERE status = 'queued' AND created_at < now() - make_interval(secs => $1)
         ORDER BY priority DESC, created_at LIMIT $2",
    )
    .bind(settled.as_secs_f64())
    .bind(LOOKED_AT)
    .fetch_all(pool)
    .await?;

    let mut new = Vec::new();
    for job in queued {
        let shape = Shape { pool: job.pool, gpus: count(job.gpus), nodes: count(job.nodes), gpu_memory_gb: job.gpu_memory_gb.map(count) };
        let reason = unserved_reason(&shape, &offers);
        if reason == job.pending_reason {
            continue;
        }
        let updated = sqlx::query("UPDATE jobs SET pending_reason = $2 WHERE id = $1 AND status = 'queued'")
            .bind(&job.id)
            .bind(&reason)
            .execute(pool)
            .await?;
        if let (Some(reason), 1) = (reason, updated.rows_affected()) {
            new.push((job.id, reason));
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(pool: &str, gpus: u32) -> Offer {
        Offer { pools: vec![pool.into()], gpus, nodes: 1, gpu_memory_bytes: None }
    }

    #[test]
    fn the_reason_names_the_shape_the_pool_and_the_largest_offer() {
        let shape = Shape { pool: "default".into(), gpus: 8, nodes: 1, gpu_memory_gb: None };
        let reason = unserved_reason(&shape, &[offer("default", 1), offer("default", 2), offer("a100", 8)]).unwrap();
        assert_eq!(reason, "no live worker of pool \"default\" offers 8 GPU(s) on 1 node(s); the largest offers 2 GPU(s) on 1 node(s)");
        assert!(unserved_reason(&shape, &[offer("default", 8)]).is_none());
        let nobody = unserved_reason(&shape, &[offer("a100", 8)]).unwrap();
        assert_eq!(nobody, "no live worker serves pool \"default\"; this job asks for 8 GPU(s) on 1 node(s)");
    }
}
