//! `lathe doctor`: what a person debugging a GPU node needs, in one screen. Exits non-zero when
//! the OS shows GPUs that libtorch cannot use, so scripts and health checks can gate on it.

use clap::Args;

use lathe_trainer::device::report::DeviceReport;

#[derive(Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let report = DeviceReport::gather();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    match report.problem() {
        Some(problem) => anyhow::bail!("{problem}"),
        None => Ok(()),
    }
}
