//! One autoscaler pass: read demand, count supply, submit the difference (bounded).

use std::collections::{BTreeMap, BTreeSet};

use crate::controller::{Controller, PoolDemand, WorkerSeen};
use crate::{slurm, AutoscaleConfig, FleetError};

/// How many pilots to submit: enough to cover demand not met by supply, never past the pool's
/// cap on pilots in the queue.
pub fn pilots_to_submit(demand: u64, supply: u64, pilots_in_queue: u64, max_pilots: u64) -> u64 {
    demand.saturating_sub(supply).min(max_pilots.saturating_sub(pilots_in_queue))
}

/// Live workers of `pool` that no pilot in `pilots` accounts for (started by hand, another
/// scheduler's, or a pilot squeue no longer shows but whose worker still runs).
pub fn workers_outside(workers: &[WorkerSeen], pool: &str, pilots: &BTreeSet<String>) -> u64 {
    outside(workers, pool, pilots).count() as u64
}

fn outside<'a>(workers: &'a [WorkerSeen], pool: &'a str, pilots: &'a BTreeSet<String>) -> impl Iterator<Item = &'a WorkerSeen> {
    workers
        .iter()
        .filter(move |w| w.state == "live" && w.pools.iter().any(|p| p == pool))
        .filter(move |w| w.slurm_job_id.as_ref().is_none_or(|id| !pilots.contains(id)))
}

/// The pool's demand by pilot size in GPUs, and the jobs no pilot the pool may submit can
/// serve. Work smaller than the pool's ordinary pilot counts as one of those; a job asking for
/// more GPUs than `max_gpus_per_pilot`, or more nodes than the pool's pilots have, counts as
/// unservable (it waits, with a `pending_reason` from the controller).
pub fn demand_by_size(demand: &PoolDemand, base_gpus: u32, max_gpus: u32, max_nodes: u32) -> (BTreeMap<u32, u64>, u64) {
    let mut sizes = BTreeMap::new();
    if demand.shapes.is_empty() {
        // A controller that does not report shapes: everything is one ordinary pilot each.
        if demand.demand > 0 {
            sizes.insert(base_gpus, demand.demand);
        }
        return (sizes, 0);
    }
    let mut unservable = 0;
    for shape in &demand.shapes {
        let size = shape.gpus.max(base_gpus);
        if size > max_gpus || shape.nodes > max_nodes {
            unservable += shape.queued;
        } else {
            *sizes.entry(size).or_insert(0) += shape.queued + shape.running;
        }
    }
    (sizes, unservable)
}

/// What one pass saw and did for one pool (logged, and printed by `--once`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub pool: String,
    pub demand: u64,
    pub pilots: u64,
    pub other_workers: u64,
    pub submitted: u64,
    /// The job (array) ids of what was submitted (one per pilot size), comma-separated.
    pub job_id: Option<String>,
    /// Queued jobs no pilot of this pool can serve (more GPUs or nodes than it may ask for).
    pub unservable: u64,
    /// Slurm commands run for this pool (squeue + sbatch): constant in the demand.
    pub slurm_calls: u32,
    /// squeue or sbatch failed for this pool (the other pools still got their pass).
    pub error: Option<String>,
}

/// One pass over every configured pool. The controller unreachable fails the pass; a Slurm
/// command failing for one pool (a typo in its partition) is that pool's report, not the others'.
pub fn pass(config: &AutoscaleConfig, controller: &Controller) -> Result<Vec<PassReport>, FleetError> {
    let demand = controller.demand()?;
    let workers = controller.workers()?;
    let mut reports = Vec::new();
    for (pool, settings) in &config.pools {
        let pool_demand = demand.iter().find(|d| &d.pool == pool).cloned().unwrap_or_else(|| PoolDemand {
            pool: pool.clone(),
            demand: 0,
            shapes: Vec::new(),
        });
        let mut report = PassReport {
            pool: pool.clone(),
            demand: pool_demand.demand,
            pilots: 0,
            other_workers: 0,
            submitted: 0,
            job_id: None,
            unservable: 0,
            slurm_calls: 0,
            error: None,
        };
        if let Err(error) = pool_pass(config, pool, settings, &pool_demand, &workers, &mut report) {
            tracing::warn!(pool, %error, "autoscale pass failed for this pool");
            report.error = Some(error.to_string());
        } else {
            tracing::info!(
                pool,
                demand = report.demand,
                pilots = report.pilots,
                other_workers = report.other_workers,
                submitted = report.submitted,
                unservable = report.unservable,
                job_id = report.job_id.as_deref().unwrap_or("-"),
                "autoscale pass"
            );
        }
        reports.push(report);
    }
    Ok(reports)
}

fn pool_pass(
    config: &AutoscaleConfig,
    pool: &str,
    settings: &crate::PoolConfig,
    demand: &PoolDemand,
    workers: &[WorkerSeen],
    report: &mut PassReport,
) -> Result<(), FleetError> {
    let (base, max) = (settings.pilot_gpus(), settings.max_pilot_gpus());
    let names: BTreeMap<u32, String> = (base..=max).map(|gpus| (gpus, config.pilot_name(pool, settings, gpus))).collect();
    report.slurm_calls += 1;
    let all_names: Vec<String> = names.values().cloned().collect();
    let pilots: Vec<slurm::Pilot> = slurm::pilots(&all_names)?.into_iter().filter(|p| p.is_supply()).collect();
    let ids: BTreeSet<String> = pilots.iter().map(|p| p.job_id.clone()).collect();
    report.pilots = pilots.len() as u64;
    report.other_workers = workers_outside(workers, pool, &ids);
    let (sizes, unservable) = demand_by_size(demand, base, max, settings.nodes.unwrap_or(1));
    report.unservable = unservable;
    let mut room = (settings.max_pilots as u64).saturating_sub(report.pilots);
    let mut submitted = Vec::new();
    for (gpus, wanted) in sizes {
        let name = &names[&gpus];
        let of_size = pilots.iter().filter(|p| &p.name == name).count() as u64;
        let others = outside(workers, pool, &ids).filter(|w| w.gpus.max(base) == gpus).count() as u64;
        let count = pilots_to_submit(wanted, of_size + others, 0, room);
        if count > 0 {
            report.slurm_calls += 1;
            submitted.push(slurm::submit(config, pool, settings, count as u32, gpus, &config.template)?);
            report.submitted += count;
            room -= count;
        }
    }
    if !submitted.is_empty() {
        report.job_id = Some(submitted.join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(state: &str, pools: &[&str], slurm: Option<&str>) -> WorkerSeen {
        WorkerSeen {
            id: "w".into(),
            state: state.into(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            slurm_job_id: slurm.map(String::from),
            gpus: 1,
        }
    }

    #[test]
    fn demand_by_shape_becomes_pilots_by_size_and_too_big_jobs_are_named_not_submitted() {
        use crate::controller::Shape;
        let shape = |gpus, nodes, queued, running| Shape { gpus, nodes, queued, running };
        let demand = PoolDemand {
            pool: "a100".into(),
            demand: 9,
            shapes: vec![shape(1, 1, 3, 2), shape(2, 1, 1, 0), shape(4, 1, 1, 1), shape(8, 1, 1, 0), shape(1, 2, 1, 0)],
        };
        let (sizes, unservable) = demand_by_size(&demand, 1, 4, 1);
        assert_eq!(sizes, BTreeMap::from([(1, 5), (2, 1), (4, 2)]));
        assert_eq!(unservable, 2, "the 8-GPU job and the 2-node job");
        // Pilots of two GPUs: 1-GPU work fits them.
        let (sizes, _) = demand_by_size(&demand, 2, 4, 2);
        assert_eq!(sizes, BTreeMap::from([(2, 7), (4, 2)]));
        // A controller without shapes: all of the demand in ordinary pilots.
        let old = PoolDemand { shapes: Vec::new(), ..demand };
        assert_eq!(demand_by_size(&old, 1, 4, 1), (BTreeMap::from([(1, 9)]), 0));
    }

    #[test]
    fn submits_the_unmet_demand_up_to_the_cap_and_never_scales_in() {
        assert_eq!(pilots_to_submit(4, 0, 0, 2), 2, "capped at max_pilots");
        assert_eq!(pilots_to_submit(4, 2, 2, 2), 0, "the cap counts pilots already queued");
        assert_eq!(pilots_to_submit(4, 1, 1, 8), 3);
        assert_eq!(pilots_to_submit(1, 3, 3, 8), 0, "surplus is left to the idle exit");
        assert_eq!(pilots_to_submit(0, 0, 0, 8), 0);
    }

    #[test]
    fn a_pilots_own_worker_is_not_counted_twice() {
        let pilots: BTreeSet<String> = ["101".to_string()].into();
        let workers = [
            worker("live", &["a100"], Some("101")), // the pilot's worker: counted as the pilot
            worker("live", &["a100"], None),        // started by hand
            worker("live", &["a100"], Some("99")),  // a pilot squeue no longer lists
            worker("draining", &["a100"], None),    // leaving
            worker("live", &["h100"], None),        // another pool
        ];
        assert_eq!(workers_outside(&workers, "a100", &pilots), 2);
    }
}
