//! `lathe train CONFIG.toml`: a training run on this machine.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lathe_trainer::train::{self, Hooks, Outcome, TrainConfig};

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

    let stop = crate::progress::install_stop_flag();
    let mut printer = ProgressPrinter::new(args.json);
    let mut on_event = |e: &train::Event| printer.handle(e);
    let should_stop = || stop.load(std::sync::atomic::Ordering::SeqCst);
    let outcome =
        train::run(&config, resume_from.as_deref(), Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &|| false })?;
    printer.finish();
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
            std::process::exit(130);
        }
    }
}
