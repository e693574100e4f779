//! One autoscaler pass: read demand, count supply, submit the difference (bounded).

use std::collections::BTreeSet;

use crate::controller::{Controller, WorkerSeen};
use crate::{slurm, AutoscaleConfig, FleetError};

/// How many pilots to submit: enough to cover demand not met by supply, never past the pool's
/// cap on pilots in the queue.
pub fn pilots_to_submit(demand: u64, supply: u64, pilots_in_queue: u64, max_pilots: u64) -> u64 {
    demand.saturating_sub(supply).min(max_pilots.saturating_sub(pilots_in_queue))
}

/// Live workers of `pool` that no pilot in `pilots` accounts for (started by hand, another
/// scheduler's, or a pilot squeue no longer shows but whose worker still runs).
pub fn workers_outside(workers: &[WorkerSeen], pool: &str, pilots: &BTreeSet<String>) -> u64 {
    workers
        .iter()
        .filter(|w| w.state == "live" && w.pools.iter().any(|p| p == pool))
        .filter(|w| w.slurm_job_id.as_ref().is_none_or(|id| !pilots.contains(id)))
        .count() as u64
}

/// What one pass saw and did for one pool (logged, and printed by `--once`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub pool: String,
    pub demand: u64,
    pub pilots: u64,
    pub other_workers: u64,
    pub submitted: u64,
    /// The job (array) id of what was submitted.
    pub job_id: Option<String>,
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
        let pool_demand = demand.iter().find(|d| &d.pool == pool).map_or(0, |d| d.demand);
        let mut report = PassReport {
            pool: pool.clone(),
            demand: pool_demand,
            pilots: 0,
            other_workers: 0,
            submitted: 0,
            job_id: None,
            slurm_calls: 0,
            error: None,
        };
        if let Err(error) = pool_pass(config, pool, settings, &workers, &mut report) {
            tracing::warn!(pool, %error, "autoscale pass failed for this pool");
            report.error = Some(error.to_string());
        } else {
            tracing::info!(
                pool,
                demand = report.demand,
                pilots = report.pilots,
                other_workers = report.other_workers,
                submitted = report.submitted,
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
    workers: &[WorkerSeen],
    report: &mut PassReport,
) -> Result<(), FleetError> {
    report.slurm_calls += 1;
    let pilots: Vec<slurm::Pilot> = slurm::pilots(&config.job_name(pool))?.into_iter().filter(|p| p.is_supply()).collect();
    let ids: BTreeSet<String> = pilots.iter().map(|p| p.job_id.clone()).collect();
    report.pilots = pilots.len() as u64;
    report.other_workers = workers_outside(workers, pool, &ids);
    let count = pilots_to_submit(report.demand, report.pilots + report.other_workers, report.pilots, settings.max_pilots as u64);
    if count > 0 {
        report.slurm_calls += 1;
        report.job_id = Some(slurm::submit(config, pool, settings, count as u32, &config.template)?);
        report.submitted = count;
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
        }
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
