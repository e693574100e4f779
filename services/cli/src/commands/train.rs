//! `lathe train CONFIG.toml`: a training run on this machine, or one rank of a data-parallel
//! run (`--nproc N`, `torchrun --no-python lathe train …`, `srun lathe train …`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lathe_trainer::launch::{self, LocalRanks, RankEnv, Timeouts};
use lathe_trainer::train::{self, Gang, Hooks, Outcome, TrainConfig};

use crate::progress::ProgressPrinter;

#[derive(Args)]
pub struct TrainArgs {
    /// TOML file: model, train_file, output_dir, and [data] [lora] [optim] [train] sections.
    config: PathBuf,
    /// Override `output_dir`.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Override `train.max_steps`.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override `train.device` (cpu, cuda, cuda:N, auto).
    #[arg(long)]
    device: Option<String>,
    /// Override `train.dtype` (fp32, bf16, auto).
    #[arg(long)]
    dtype: Option<String>,
    /// Continue from a checkpoint directory (output_dir/checkpoints/step-NNNNNN).
    #[arg(long, conflicts_with = "resume")]
    resume_from: Option<PathBuf>,
    /// Continue from the newest checkpoint in output_dir.
    #[arg(long)]
    resume: bool,
    /// Print one JSON event per line instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Data parallel on this machine: N ranks (this process and N-1 children), each training
    /// batch_size rows of every step, so a step trains N × batch_size rows. With CUDA each rank
    /// takes its own GPU (cuda:RANK). Under torchrun or srun, leave it out: they set the ranks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    nproc: u16,
    /// Data parallel: how long a rank waits for the store's host (rank 0, or torchrun's agent).
    #[arg(long, default_value_t = 300, env = "LATHE_DIST_JOIN_TIMEOUT_SECONDS")]
    dist_join_timeout_seconds: u64,
    /// Data parallel: how long a rank waits in a collective (another rank may be writing a
    /// checkpoint or validating meanwhile) before the run fails.
    #[arg(long, default_value_t = 1800, env = "LATHE_DIST_TIMEOUT_SECONDS")]
    dist_timeout_seconds: u64,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = TrainConfig::from_toml_file(&args.config)?;
    if let Some(dir) = args.output_dir {
        config.output_dir = dir;
    }
    if let Some(steps) = args.max_steps {
        config.train.max_steps = Some(steps);
    }
    if let Some(device) = args.device {
        config.train.device = device;
    }
    if let Some(dtype) = args.dtype {
        config.train.dtype = dtype;
    }
    let resume_from = match (args.resume_from, args.resume) {
        (Some(dir), _) => Some(dir),
        (None, true) => Some(
            lathe_trainer::checkpoint::latest_checkpoint(&config.output_dir)
                .with_context(|| format!("no checkpoint under {}/checkpoints", config.output_dir.display()))?,
        ),
        (None, false) => None,
    };

    let timeouts =
        Timeouts { join: Duration::from_secs(args.dist_join_timeout_seconds), op: Duration::from_secs(args.dist_timeout_seconds) };
    let launched = launch::from_env(|k| std::env::var(k).ok())?;
    if launched.is_some() && args.nproc > 1 {
        anyhow::bail!("--nproc starts its own ranks; under torchrun or srun leave it out (they set RANK/SLURM_PROCID)");
    }
    let mut local = None;
    let forced_backend = std::env::var("LATHE_DIST_BACKEND").ok();
    let gang = match launched {
        Some(env) => {
            place_rank(&mut config, &env);
            let backend = launch::backend_for(&config.train.device, forced_backend.as_deref())?;
            Gang::of(lathe_torch_ext::dist::ProcessGroup::join(&env.rendezvous(timeouts, backend))?, backend)
        }
        None if args.nproc > 1 => {
            // /proc/self/exe: the very binary running, even if the file was replaced since.
            let exe = PathBuf::from("/proc/self/exe");
            let mut ranks = LocalRanks::spawn(&exe, &rank_args(), args.nproc as usize)?;
            place_rank(&mut config, &ranks.env);
            if config.train.threads == 0 && std::env::var_os("OMP_NUM_THREADS").is_none() {
                // This process is rank 0 and shares the cores like its children.
                config.train.threads = launch::threads_per_rank(args.nproc as usize);
            }
            let backend = launch::backend_for(&config.train.device, forced_backend.as_deref())?;
            let group = ranks.join(timeouts, backend)?;
            local = Some(ranks);
            Gang::of(group, backend)
        }
        None => Gang::single(),
    };
    let leader = gang.is_leader();

    let stop = crate::progress::install_stop_flag();
    let mut printer = ProgressPrinter::new(args.json);
    let mut on_event = |e: &train::Event| {
        if leader {
            printer.handle(e)
        }
    };
    let should_stop = || stop.load(std::sync::atomic::Ordering::SeqCst);
    let outcome = train::run_in(
        &config,
        resume_from.as_deref(),
        Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &|| false },
        &gang,
    )?;
    printer.finish();
    if let Some(ranks) = local {
        match (ranks.wait(), &outcome) {
            // Rank 0 finished every collective, so the others trained every step with it.
            (Err(e), Outcome::Finished { .. }) => eprintln!("warning: after the run finished: {e}"),
            (result, _) => result?,
        }
    }
    if !leader {
        return match outcome {
            Outcome::Finished { .. } => Ok(()),
            Outcome::Stopped { .. } => std::process::exit(launch::STOPPED_EXIT_CODE),
        };
    }
    match outcome {
        Outcome::Finished { adapter_dir, model_dir, results_csv, final_loss, step } => {
            if !args.json {
                println!("finished {step} steps, final loss {final_loss:.4}");
                if let Some(a) = adapter_dir {
                    println!("adapter: {}", a.display());
                }
                if let Some(m) = model_dir {
                    println!("model:   {}", m.display());
                }
                println!("results: {}", results_csv.display());
            }
            Ok(())
        }
        Outcome::Stopped { step, checkpoint } => {
            match checkpoint {
                Some(c) => eprintln!("stopped after step {step}; resume with --resume-from {}", c.display()),
                None => eprintln!("stopped before the first step"),
            }
            std::process::exit(launch::STOPPED_EXIT_CODE);
        }
    }
}

/// With several ranks on a node, each takes its own GPU (`launch::rank_device`).
fn place_rank(config: &mut TrainConfig, env: &RankEnv) {
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
    config.train.device = launch::rank_device(&config.train.device, env.local_rank, gpus);
}

/// This command line without `--nproc`: what the child ranks run.
fn rank_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--nproc" {
            args.next();
        } else if !a.starts_with("--nproc=") {
            out.push(a);
        }
    }
    out
}
