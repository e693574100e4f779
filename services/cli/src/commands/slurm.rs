//! `lathe slurm autoscale`: submits pilot jobs (each a `lathe worker` that exits when idle) as
//! demand per pool rises. The logic is in `lathe-fleet`; this is the loop and its flags.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum SlurmCommand {
    /// Keep enough pilot jobs in Slurm for the work queued in each pool (reads demand from the
    /// controller, pilots from squeue; submits with sbatch; never cancels a job)
    Autoscale(AutoscaleArgs),
}

#[derive(Args)]
pub struct AutoscaleArgs {
    /// The autoscaler's settings (see deploy/slurm/autoscale.toml).
    #[arg(long, env = "LATHE_AUTOSCALE_CONFIG")]
    config: PathBuf,
    /// The controller's admin token (its --admin-token).
    #[arg(long, env = "LATHE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// One pass, print what it did, exit (for cron, or to try a config).
    #[arg(long)]
    once: bool,
}

pub fn run(command: SlurmCommand) -> anyhow::Result<()> {
    match command {
        SlurmCommand::Autoscale(args) => autoscale(args),
    }
}

fn autoscale(args: AutoscaleArgs) -> anyhow::Result<()> {
    let config = lathe_fleet::AutoscaleConfig::load(&args.config)?;
    let controller = lathe_fleet::controller::Controller::new(&config.controller, &args.admin_token)?;
    if args.once {
        let reports = lathe_fleet::pass(&config, &controller)?;
        let failed = reports.iter().filter(|r| r.error.is_some()).count();
        for r in reports {
            println!(
                "{}\tdemand {}\tpilots {}\tother workers {}\tsubmitted {}{}{}\tslurm calls {}{}",
                r.pool,
                r.demand,
                r.pilots,
                r.other_workers,
                r.submitted,
                r.job_id.map(|id| format!(" (job {id})")).unwrap_or_default(),
                if r.unservable > 0 { format!("\t{} job(s) too big for this pool's pilots", r.unservable) } else { String::new() },
                r.slurm_calls,
                r.error.map(|e| format!("\terror: {e}")).unwrap_or_default()
            );
        }
        // Non-zero when a pool's pass failed, so that cron (or a person) notices.
        anyhow::ensure!(failed == 0, "{failed} pool(s) failed this pass (the lines above say why)");
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    tracing::info!(pools = ?config.pools.keys().collect::<Vec<_>>(), interval_s = config.interval_seconds, "autoscaler started");
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        // A failed pass (controller restarting, slurmctld busy) is retried on the next tick:
        // there is no state to lose, squeue is re-read every time.
        if let Err(error) = lathe_fleet::pass(&config, &controller) {
            tracing::warn!(%error, "autoscale pass failed; retrying next tick");
        }
        while !stop.load(Ordering::Relaxed) && started.elapsed() < config.interval() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    tracing::info!("autoscaler stopped");
    Ok(())
}
