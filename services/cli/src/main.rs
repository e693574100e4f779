//! `lathe`: the one binary of Lathe. Today it trains locally (`lathe train`) and manages
//! models (`lathe model init|forward|merge`); it composes the library crates and holds no
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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Model(cmd) => commands::model::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
