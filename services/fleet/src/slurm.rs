//! Slurm through its own commands: `squeue` to find the pilots again, `sbatch` to submit more.
//! One squeue and at most one sbatch per pool and pass, whatever the demand: pilots are
//! submitted as one job array (`--array=0-(n-1)`), and `squeue --array` lists its tasks one per
//! line, `%A` being each started task's own job id, the `SLURM_JOB_ID` its worker reports.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{AutoscaleConfig, FleetError, PoolConfig};

/// A pilot as squeue shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pilot {
    /// The id its worker reports (`SLURM_JOB_ID`): a plain job id, also for array tasks.
    pub job_id: String,
    pub state: String,
    /// Its job name: which pool, and which size ([`AutoscaleConfig::pilot_name`]).
    pub name: String,
}

impl Pilot {
    /// Whether the pilot is, or will be, a worker: pending or running. COMPLETING and later
    /// states have a worker that already left.
    pub fn is_supply(&self) -> bool {
        matches!(self.state.as_str(), "PENDING" | "CONFIGURING" | "RUNNING" | "REQUEUED" | "RESIZING" | "SUSPENDED")
    }
}

/// How long squeue or sbatch may take. Both answer within seconds unless slurmctld is down or
/// overloaded, when they retry for minutes; a pass that waited would stop the autoscaler for
/// every pool. Killing a slow sbatch loses nothing: if it did submit, the next pass's squeue
/// finds the pilots by name.
const SLURM_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn run(command: &mut Command) -> Result<String, FleetError> {
    run_within(command, SLURM_COMMAND_TIMEOUT)
}

/// `command`'s standard output, or an error naming the command: it could not start, it failed
/// (with its standard error), or it did not finish within `timeout` and was killed.
fn run_within(command: &mut Command, timeout: Duration) -> Result<String, FleetError> {
    let shown = format!("{command:?}").replace('"', "");
    let fail = |message: String| FleetError::Slurm { command: shown.clone(), message };
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| fail(e.to_string()))?;
    // Read both pipes while waiting: a command that fills a pipe blocks until it is read.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| fail(e.to_string()))? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {} s (is slurmctld reachable?); killed it", timeout.as_secs_f64())));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(fail(format!("{status}: {}", stderr.trim())));
    }
    Ok(stdout)
}

/// Reads `pipe` to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Every job in the queue named one of `job_names` (a pool's pilots of every size): one squeue.
pub fn pilots(job_names: &[String]) -> Result<Vec<Pilot>, FleetError> {
    // --me: another user's job that happens to carry the name is not a pilot of ours.
    let names = job_names.join(",");
    let out = run(Command::new("squeue").args(["--me", "--noheader", "--array", "--name", &names, "--format", "%A|%T|%j"]))?;
    Ok(parse_squeue(&out))
}

/// `%A|%T|%j` lines: with `--array`, `%A` is each task's own job id.
pub fn parse_squeue(out: &str) -> Vec<Pilot> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(3, '|');
            let (id, state) = (fields.next()?, fields.next()?);
            let name = fields.next().unwrap_or_default();
            Some(Pilot { job_id: id.trim().to_string(), state: state.trim().to_string(), name: name.trim().to_string() })
        })
        .collect()
}

/// The sbatch arguments for `count` pilots of `pool` with `gpus` GPUs each (options on the
/// command line override the template's `#SBATCH` lines).
pub fn sbatch_args(config: &AutoscaleConfig, pool: &str, settings: &PoolConfig, count: u32, gpus: u32) -> Vec<String> {
    let mut args = vec!["--parsable".to_string(), format!("--job-name={}", config.pilot_name(pool, settings, gpus))];
    if count > 1 {
        args.push(format!("--array=0-{}", count - 1));
    }
    let gres = settings.gres_for(gpus);
    for (flag, value) in
        [("--partition", &settings.partition), ("--gres", &gres), ("--constraint", &settings.constraint), ("--time", &settings.time_limit)]
    {
        if let Some(value) = value {
            args.push(format!("{flag}={value}"));
        }
    }
    if let Some(nodes) = settings.nodes.filter(|&n| n > 1) {
        // One task per node: the worker on the first, srun places the ranks (the template's
        // --ntasks=1 would not fit on several nodes).
        args.extend([format!("--nodes={nodes}"), format!("--ntasks={nodes}"), "--ntasks-per-node=1".to_string()]);
    }
    if let Some(dir) = &config.output_dir {
        args.push(format!("--output={}/%x-%A_%a.out", dir.display()));
    }
    // Whatever the template says, the worker must hear of a time limit in time to checkpoint.
    args.push("--signal=B:TERM@120".into());
    let mut export = format!("--export=ALL,LATHE_POOLS={pool},LATHE_EXIT_WHEN_IDLE={}", settings.idle_exit_seconds);
    if gpus != settings.pilot_gpus() {
        // A pilot sized for a job: its worker offers every GPU it was given.
        export.push_str(&format!(",LATHE_GPUS={gpus}"));
    }
    args.push(export);
    args.extend(settings.extra_sbatch_args.iter().cloned());
    args
}

/// Submits `count` pilots of `gpus` GPUs in one call; returns the job (array) id.
pub fn submit(
    config: &AutoscaleConfig,
    pool: &str,
    settings: &PoolConfig,
    count: u32,
    gpus: u32,
    template: &Path,
) -> Result<String, FleetError> {
    // --export=ALL hands pilots the autoscaler's environment; the admin token is not theirs to
    // have (Slurm keeps a job's environment, and accounting may store it).
    let args = sbatch_args(config, pool, settings, count, gpus);
    let out = run(Command::new("sbatch").args(args).arg(template).env_remove("LATHE_ADMIN_TOKEN"))?;
    // --parsable: "<id>" or "<id>;<cluster>".
    Ok(out.trim().split(';').next().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_node_pool_asks_for_its_nodes_with_one_task_each() {
        let config: AutoscaleConfig = toml::from_str(
            "controller = \"http://c:8080\"\ntemplate = \"p.sbatch\"\n[pools.big]\nmax_pilots = 1\nnodes = 2\ngres = \"gpu:4\"\n",
        )
        .unwrap();
        let args = sbatch_args(&config, "big", &config.pools["big"], 1, 4);
        for wanted in ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--gres=gpu:4"] {
            assert!(args.iter().any(|a| a == wanted), "{wanted} missing from {args:?}");
        }
        let single: AutoscaleConfig =
            toml::from_str("controller = \"http://c:8080\"\ntemplate = \"p.sbatch\"\n[pools.a]\nmax_pilots = 1\n").unwrap();
        assert!(!sbatch_args(&single, "a", &single.pools["a"], 1, 1).iter().any(|a| a.starts_with("--nodes")));
    }

    #[test]
    fn a_pilot_sized_for_a_job_asks_for_its_gpus_under_a_name_of_its_own() {
        let config: AutoscaleConfig = toml::from_str(
            "controller = \"http://c:8080\"\ntemplate = \"p.sbatch\"\n[pools.a100]\nmax_pilots = 4\ngres = \"gpu:a100:1\"\nmax_gpus_per_pilot = 8\n",
        )
        .unwrap();
        let pool = &config.pools["a100"];
        assert_eq!((pool.pilot_gpus(), pool.max_pilot_gpus()), (1, 8));
        let ordinary = sbatch_args(&config, "a100", pool, 2, 1);
        for wanted in ["--job-name=lathe-pilot-a100", "--gres=gpu:a100:1", "--array=0-1"] {
            assert!(ordinary.iter().any(|a| a == wanted), "{wanted} missing from {ordinary:?}");
        }
        assert!(!ordinary.iter().any(|a| a.contains("LATHE_GPUS")), "{ordinary:?}");
        let sized = sbatch_args(&config, "a100", pool, 1, 4);
        for wanted in ["--job-name=lathe-pilot-a100+g4", "--gres=gpu:a100:4"] {
            assert!(sized.iter().any(|a| a == wanted), "{wanted} missing from {sized:?}");
        }
        assert!(sized.iter().any(|a| a.starts_with("--export=") && a.ends_with(",LATHE_GPUS=4")), "{sized:?}");
        // No gres at all: a sized pilot still asks for its GPUs.
        let bare: AutoscaleConfig =
            toml::from_str("controller = \"http://c:8080\"\ntemplate = \"p.sbatch\"\n[pools.a]\nmax_pilots = 1\nmax_gpus_per_pilot = 2\n")
                .unwrap();
        assert_eq!(bare.pools["a"].gres_for(2).as_deref(), Some("gpu:2"));
        assert_eq!(bare.pools["a"].gres_for(1), None);
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_the_timeout_and_named() {
        let started = Instant::now();
        let err = run_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
        let text = err.to_string();
        assert!(text.contains("sleep 30") && text.contains("no answer within 0.3 s"), "{text}");
    }

    #[test]
    fn a_failing_command_reports_its_status_and_stderr_and_a_good_one_its_stdout() {
        let err = run_within(
            Command::new("sh").args(["-c", "echo out; echo 'slurm_load_jobs error: Unable to contact' >&2; exit 1"]),
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exit status: 1") && err.contains("Unable to contact"), "{err}");
        let out = run_within(Command::new("sh").args(["-c", "echo '101|RUNNING'"]), Duration::from_secs(10)).unwrap();
        assert_eq!(parse_squeue(&out), vec![Pilot { job_id: "101".into(), state: "RUNNING".into(), name: String::new() }]);
    }

    #[test]
    fn squeue_lines_become_pilots_and_only_live_ones_are_supply() {
        let pilots = parse_squeue("101|RUNNING|lathe-pilot-a\n102|PENDING|lathe-pilot-a+g4\n103|COMPLETING|lathe-pilot-a\n\n");
        assert_eq!(pilots.len(), 3);
        assert_eq!(pilots[0], Pilot { job_id: "101".into(), state: "RUNNING".into(), name: "lathe-pilot-a".into() });
        assert_eq!(pilots[1].name, "lathe-pilot-a+g4");
        assert_eq!(pilots.iter().filter(|p| p.is_supply()).count(), 2);
    }
}
