//! `lathe`: the one binary of Lathe. It runs the service (`lathe up` all in one, or `lathe
//! controller` and `lathe worker` apart), administers it (`lathe admin`), talks to it as a
//! client (`lathe files`, `lathe jobs`), trains locally without it (`lathe train`) and manages
//! models (`lathe model init|forward|merge`). It composes the library crates and holds no
//! logic of its own beyond argument parsing and progress display.

mod commands;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lathe", version, about = "Fine-tune open LLMs (Qwen3, Qwen2.5, Llama 3) on your own hardware")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a training job locally from a TOML config, with a progress bar and no service.
    Train(commands::train::TrainArgs),
    /// Create, run and merge models.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Evaluate on this machine, no server: CTIBench runs, scoring, comparisons, contamination
    ///
    /// `lathe evaluations` runs evaluations through a Lathe server instead.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Controller and workers in one process (a laptop, a single GPU box).
    Up(commands::service::UpArgs),
    /// The controller: REST API, worker gRPC, reconciler, /metrics.
    Controller(commands::service::ControllerArgs),
    /// A worker daemon: claims jobs from the controller and trains them.
    Worker(commands::service::WorkerArgs),
    /// API keys and worker tokens (talks to Postgres directly).
    #[command(subcommand)]
    Admin(commands::admin::AdminCommand),
    /// Upload training files to a Lathe server.
    #[command(subcommand)]
    Files(commands::client::FilesCommand),
    /// Create, follow, list and cancel fine-tuning jobs on a Lathe server.
    #[command(subcommand)]
    Jobs(commands::client::JobsCommand),
    /// Evaluations on a Lathe server (CTIBench or your own file): create, follow, read, compare
    ///
    /// `lathe eval` evaluates on this machine instead, without a server. (Alias: `evals`.)
    #[command(subcommand, alias = "evals")]
    Evaluations(commands::evaluations::EvalsCommand),
    /// Run workers as Slurm jobs: the autoscaler that submits pilots for queued work.
    #[command(subcommand)]
    Slurm(commands::slurm::SlurmCommand),
    /// Check this machine's GPU stack: libtorch, its CUDA/ROCm backend, driver, devices, NCCL.
    Doctor(commands::doctor::DoctorArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The service logs what it does; one-shot commands only warn.
    let default_level = match cli.command {
        Command::Up(_) | Command::Controller(_) | Command::Worker(_) | Command::Slurm(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG").unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Model(cmd) => commands::model::run(cmd),
        Command::Eval(cmd) => commands::eval::run(cmd),
        Command::Up(args) => commands::service::up(args),
        Command::Controller(args) => commands::service::controller(args),
        Command::Worker(args) => commands::service::worker(args),
        Command::Admin(cmd) => commands::admin::run(cmd),
        Command::Files(cmd) => commands::client::files(cmd),
        Command::Jobs(cmd) => commands::client::jobs(cmd),
        Command::Evaluations(cmd) => commands::evaluations::run(cmd),
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Slurm(command) => commands::slurm::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
