//! `lathe-controller`: the controller alone (REST API, worker gRPC, reconciler, /metrics),
//! without libtorch. Same flags and `LATHE_*` variables as `lathe controller`; deploy this one
//! (about 30 MB resident instead of the ~390 MB that libtorch and CUDA cost the `lathe` binary).

use clap::Parser;
use lathe_controller::cli::ControllerArgs;

#[derive(Parser)]
#[command(name = "lathe-controller", version, about = "The Lathe controller: REST API, worker gRPC, reconciler, /metrics")]
struct Cli {
    #[command(flatten)]
    controller: ControllerArgs,
    /// Print the REST API's OpenAPI 3.1 document (also served at /v1/openapi.json) and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.print_openapi {
        println!("{}", serde_json::to_string_pretty(&lathe_controller::api::openapi::document()).expect("JSON"));
        return std::process::ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match lathe_controller::cli::run(&cli.controller) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
