//! Which rank this process is, read from the launcher's environment (docs/architecture.md §7):
//!
//! | launcher | rank | ranks | store |
//! |---|---|---|---|
//! | `torchrun --no-python lathe train …` | `RANK`, `LOCAL_RANK` | `WORLD_SIZE` | `MASTER_ADDR:MASTER_PORT`; hosted by the torchrun agent when `TORCHELASTIC_USE_AGENT_STORE=True` |
//! | `srun lathe train …` (in an allocation) | `SLURM_PROCID`, `SLURM_LOCALID` | `SLURM_STEP_NUM_TASKS` | `MASTER_ADDR` or the step's first node; `MASTER_PORT` or a port from the job id |
//! | `lathe train --nproc N` | sets the torchrun variables for its children | | rank 0 |
//!
//! Pure functions of the environment, so every case is tested without launching anything.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use lathe_torch_ext::dist::{Backend, DistError, ProcessGroup, Rendezvous, NCCL_BUILT};

use crate::{Result, TrainerError};

/// How long ranks wait for each other: to form the gang, and in each collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub join: Duration,
    pub op: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { join: Duration::from_secs(300), op: Duration::from_secs(1800) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub launcher: &'static str,
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store; every rank is a client of it.
    pub agent_store: bool,
    /// torchrun's restart count: each restart rendezvouses under a fresh key prefix.
    pub restart_count: u64,
    /// GLOO_SOCKET_IFNAME.
    pub interface: Option<String>,
}

impl RankEnv {
    pub fn rendezvous(&self, timeouts: Timeouts, backend: Backend) -> Rendezvous {
        Rendezvous {
            host: self.master_addr.clone(),
            port: self.master_port,
            rank: self.rank,
            world: self.world,
            host_store: !self.agent_store && self.rank == 0,
            // torchrun's workers use this prefix in the agent's store (torch.distributed.elastic).
            prefix: if self.agent_store { format!("/worker/attempt_{}", self.restart_count) } else { "lathe".into() },
            join_timeout: timeouts.join,
            op_timeout: timeouts.op,
            interface: self.interface.clone(),
            backend,
        }
    }
}

/// The device of local rank `local_rank` when the config says `device`: GPU ranks take
/// consecutive GPUs from the configured one (`cuda` and `auto` on a CUDA machine start at 0),
/// wrapping around the `cuda_count` GPUs this process sees (one, when srun binds a GPU per task).
/// Other devices are left alone.
pub fn rank_device(device: &str, local_rank: usize, cuda_count: usize) -> String {
    let base = match device {
        "cuda" => Some(0),
        "auto" if cuda_count > 0 => Some(0),
        d => d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
    };
    match base {
        Some(base) if cuda_count > 0 => format!("cuda:{}", (base + local_rank) % cuda_count),
        _ => device.to_string(),
    }
}

/// libtorch threads per rank when `ranks` share this machine's cores and nobody chose
/// (OMP_NUM_THREADS or `train.threads`): an even share, at least one.
pub fn threads_per_rank(ranks: usize) -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / ranks.max(1)).max(1)
}

/// The collectives' backend for a rank training on `device` (already placed: `cuda:N`): NCCL
/// on a GPU when this build has it, else Gloo (CPU ranks; GPU ranks through host staging).
/// `LATHE_DIST_BACKEND=gloo` forces Gloo; `=nccl` refuses to fall back.
pub fn backend_for(device: &str, forced: Option<&str>) -> Result<Backend> {
    let gpu = device.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).or((device == "cuda").then_some(0));
    match (forced, gpu) {
        (Some("gloo"), _) => Ok(Backend::Gloo),
        (Some("nccl"), Some(device)) if NCCL_BUILT => Ok(Backend::Nccl { device }),
        (Some("nccl"), None) => Err(TrainerError::invalid("LATHE_DIST_BACKEND", format!("nccl needs a CUDA device, not {device:?}"))),
        (Some("nccl"), Some(_)) => Err(TrainerError::invalid(
            "LATHE_DIST_BACKEND",
            "this lathe was built without NCCL (see services/torch-ext/build.rs); use gloo",
        )),
        (Some(other), _) => Err(TrainerError::invalid("LATHE_DIST_BACKEND", format!("expected gloo or nccl, got {other:?}"))),
        (None, Some(device)) if NCCL_BUILT => Ok(Backend::Nccl { device }),
        (None, _) => Ok(Backend::Gloo),
    }
}

/// How `lathe train` exits when asked to stop (SIGINT/SIGTERM) after writing a checkpoint.
pub const STOPPED_EXIT_CODE: i32 = 130;

/// Ranks 1..N of a gang on this machine, as child processes; this process is rank 0
/// (`lathe train --nproc N`, and a worker running a multi-device job). Children get the
/// torchrun variables, die with this process (PR_SET_PDEATHSIG), and are killed when this value
/// is dropped, so no rank outlives a failed attempt.
pub struct LocalRanks {
    children: Vec<(usize, Child)>,
    pub env: RankEnv,
}

impl LocalRanks {
    /// Starts `exe args…` as ranks 1..world with a store on a free local port.
    pub fn spawn(exe: &Path, args: &[String], world: usize) -> Result<LocalRanks> {
        let master_port = free_port()?;
        let env = RankEnv {
            launcher: "local",
            rank: 0,
            local_rank: 0,
            world,
            master_addr: "127.0.0.1".into(),
            master_port,
            agent_store: false,
            restart_count: 0,
            interface: Some("lo".into()),
        };
        // Each rank takes its share of the cores unless the caller chose (torchrun sets 1).
        let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| threads_per_rank(world).to_string());
        let mut ranks = LocalRanks { children: Vec::new(), env };
        for rank in 1..world {
            let mut cmd = Command::new(exe);
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", master_port.to_string())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .env("OMP_NUM_THREADS", &threads)
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            die_with_parent(&mut cmd);
            let child = cmd.spawn().map_err(|e| TrainerError::io(exe, e))?;
            ranks.children.push((rank, child));
        }
        Ok(ranks)
    }

    /// Starts ranks 1.. of a gang of `per_node × nodes` spread over the first `nodes` nodes of
    /// this Slurm allocation, as one srun step (`--distribution=arbitrary`, the host of each
    /// task listed in `hostfile`); this process, on the allocation's node it runs on, is rank 0
    /// and local rank 0 there. The step's tasks learn their rank from SLURM_PROCID plus
    /// LATHE_RANK_OFFSET (see [`from_env`]). Dropping the value kills srun, which ends the step.
    pub fn spawn_srun(exe: &Path, args: &[String], per_node: usize, nodes: usize, hostfile: &Path) -> Result<LocalRanks> {
        let here = std::env::var("SLURMD_NODENAME").map_err(|_| {
            TrainerError::invalid("nodes", "a multi-node job needs a worker inside a Slurm allocation (SLURMD_NODENAME is not set)")
        })?;
        let list = std::env::var("SLURM_JOB_NODELIST").unwrap_or_default();
        let out = Command::new("scontrol").args(["show", "hostnames", &list]).output().map_err(|e| TrainerError::io("scontrol", e))?;
        let mut hosts: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        hosts.retain(|h| *h != here);
        hosts.insert(0, here.clone());
        if hosts.len() < nodes {
            return Err(TrainerError::invalid("nodes", format!("the job asks for {nodes} nodes; this allocation has {}", hosts.len())));
        }
        hosts.truncate(nodes);
        // Rank 0 is this process: its node runs per_node - 1 more, the others per_node each.
        let tasks: Vec<&str> = hosts
            .iter()
            .enumerate()
            .flat_map(|(i, h)| std::iter::repeat_n(h.as_str(), if i == 0 { per_node - 1 } else { per_node }))
            .collect();
        std::fs::write(hostfile, tasks.join("\n") + "\n").map_err(|e| TrainerError::io(hostfile, e))?;
        let mut step_hosts: Vec<&str> = tasks.clone();
        step_hosts.dedup();
        let master_addr = match std::env::var("MASTER_ADDR") {
            Ok(a) => a,
            Err(_) => hostname()?,
        };
        let master_port = free_port()?;
        let world = per_node * nodes;
        let env = RankEnv {
            launcher: "srun",
            rank: 0,
            local_rank: 0,
            world,
            master_addr: master_addr.clone(),
            master_port,
            agent_store: false,
            restart_count: 0,
            interface: std::env::var("GLOO_SOCKET_IFNAME").ok().filter(|s| !s.is_empty()),
        };
        let mut cmd = Command::new("srun");
        cmd.arg(format!("--nodes={}", step_hosts.len()))
            .arg(format!("--ntasks={}", world - 1))
            .arg(format!("--nodelist={}", step_hosts.join(",")))
            .args(["--distribution=arbitrary", "--kill-on-bad-exit=1", "--overlap", "--job-name=lathe-ranks"])
            .arg(exe)
            .args(args)
            .env("SLURM_HOSTFILE", hostfile)
            .env("LATHE_RANK_OFFSET", "1")
            .env("LATHE_RANK_OFFSET_NODE", &here)
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| TrainerError::io("srun", e))?;
        Ok(LocalRanks { children: vec![(1, child)], env })
    }

    /// Joins the gang as rank 0, giving up as soon as a child rank exits instead of waiting
    /// out the rendezvous timeout.
    pub fn join(&mut self, timeouts: Timeouts, backend: Backend) -> Result<ProcessGroup> {
        let rendezvous = self.env.rendezvous(timeouts, backend);
        let joining = std::thread::spawn(move || ProcessGroup::join(&rendezvous));
        loop {
            if joining.is_finished() {
                return Ok(joining.join().expect("the join thread does not panic")?);
            }
            if let Some((rank, status)) = self.exited() {
                return Err(rank_failed(rank, self.env.world, format!("exited ({status}) before the gang formed")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first child rank that has exited, with its status.
    pub fn exited(&mut self) -> Option<(usize, ExitStatus)> {
        self.children.iter_mut().find_map(|(rank, c)| c.try_wait().ok().flatten().map(|s| (*rank, s)))
    }

    /// Waits for every child; the first failure, if any. Exit code 130 is a rank that stopped
    /// with the others on request (SIGTERM): rank 0's outcome says so, it is no failure.
    pub fn wait(mut self) -> Result<()> {
        let mut failed = None;
        for (rank, child) in &mut self.children {
            let status = child.wait().map_err(|e| TrainerError::io(format!("rank {rank}"), e))?;
            if !status.success() && status.code() != Some(STOPPED_EXIT_CODE) && failed.is_none() {
                failed = Some((*rank, format!("exited ({status})")));
            }
        }
        self.children.clear();
        let world = self.env.world;
        failed.map_or(Ok(()), |(rank, m)| Err(rank_failed(rank, world, m)))
    }

    /// Process ids of the child ranks.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }
}

impl Drop for LocalRanks {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| TrainerError::io("0.0.0.0:0", e))
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        return Err(TrainerError::io("gethostname", std::io::Error::last_os_error()));
    }
    Ok(String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]).into_owned())
}

/// A child rank's failure: a crash of the attempt (retried from its checkpoint), never a stop.
fn rank_failed(rank: usize, world: usize, message: String) -> TrainerError {
    TrainerError::Distributed(DistError { op: "rank", rank, world, message })
}

fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The rank this process is, or None when it runs alone (no launcher, or a world of one).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
    let number = |name: &str| -> Result<Option<u64>> {
        match get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| TrainerError::invalid(name, format!("{v:?} is not a number"))),
        }
    };
    let required = |name: &str, launcher: &str| -> Result<u64> {
        number(name)?.ok_or_else(|| TrainerError::invalid(name, format!("is not set, but {launcher} variables are")))
    };
    let interface = get("GLOO_SOCKET_IFNAME").filter(|s| !s.is_empty());
    let env = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
        let launcher = "torchrun";
        let master_addr = get("MASTER_ADDR").ok_or_else(|| TrainerError::invalid("MASTER_ADDR", "is not set, but RANK is"))?;
        RankEnv {
            launcher,
            rank: required("RANK", launcher)? as usize,
            local_rank: number("LOCAL_RANK")?.unwrap_or(0) as usize,
            world: required("WORLD_SIZE", launcher)? as usize,
            master_addr,
            master_port: port(required("MASTER_PORT", launcher)?)?,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            restart_count: number("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0),
            interface,
        }
    } else if let Some(world) = number("SLURM_STEP_NUM_TASKS")? {
        // Only inside an srun step: a batch script also has SLURM_NTASKS, and must not count
        // itself as rank 0 of a gang that never starts.
        let launcher = "srun";
        if world + number("LATHE_RANK_OFFSET")?.unwrap_or(0) <= 1 {
            return Ok(None);
        }
        let nodes = get("SLURM_STEP_NODELIST").or_else(|| get("SLURM_JOB_NODELIST")).unwrap_or_default();
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None => first_host(&nodes)
                .ok_or_else(|| TrainerError::invalid("SLURM_STEP_NODELIST", format!("no host in {nodes:?}; set MASTER_ADDR")))?,
        };
        let master_port = match number("MASTER_PORT")? {
            Some(p) => port(p)?,
            // Different jobs sharing a node get different ports.
            None => 20_000 + (required("SLURM_JOB_ID", launcher)? % 20_000) as u16,
        };
        // A worker spreading a job over its allocation is rank 0 itself and starts the rest
        // with srun: their ranks and its node's local ranks are shifted by the offset.
        let offset = number("LATHE_RANK_OFFSET")?.unwrap_or(0) as usize;
        let on_offset_node = offset > 0 && get("SLURMD_NODENAME").is_some() && get("SLURMD_NODENAME") == get("LATHE_RANK_OFFSET_NODE");
        RankEnv {
            launcher,
            rank: required("SLURM_PROCID", launcher)? as usize + offset,
            local_rank: number("SLURM_LOCALID")?.unwrap_or(0) as usize + if on_offset_node { offset } else { 0 },
            world: world as usize + offset,
            master_addr,
            master_port,
            agent_store: false,
            restart_count: 0,
            interface,
        }
    } else {
        return Ok(None);
    };
    if env.world == 0 || env.rank >= env.world {
        return Err(TrainerError::invalid("RANK", format!("rank {} is not below the world size {}", env.rank, env.world)));
    }
    Ok((env.world > 1).then_some(env))
}

fn port(p: u64) -> Result<u16> {
    u16::try_from(p).ok().filter(|&p| p > 0).ok_or_else(|| TrainerError::invalid("MASTER_PORT", format!("{p} is not a TCP port")))
}

/// The first host of a Slurm host list: `gpu[03-05,9],login1` → `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first = inner.split([',', '-', ']']).next()?;
        return Some(format!("{prefix}{first}"));
    }
    (!prefix.is_empty()).then(|| prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<RankEnv>> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_with_its_agent_store_makes_every_rank_a_client_under_the_attempt_prefix() {
        let e = env(&[
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.5"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.launcher, e.rank, e.local_rank, e.world), ("torchrun", 1, 1, 2));
        let r = e.rendezvous(Timeouts::default(), Backend::Gloo);
        assert!(!r.host_store);
        assert_eq!(r.prefix, "/worker/attempt_2");
        assert_eq!((r.host.as_str(), r.port), ("10.0.0.5", 29500));
        let own = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap().unwrap();
        assert!(own.rendezvous(Timeouts::default(), Backend::Gloo).host_store, "without an agent store rank 0 hosts it");
    }

    #[test]
    fn srun_uses_the_step_and_its_first_node_and_a_batch_script_alone_is_no_gang() {
        let e = env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "20123"),
            ("SLURM_NTASKS", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.launcher, e.rank, e.local_rank, e.world), ("srun", 3, 1, 4));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("gpu07", 20_123));
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_ID", "5")]).unwrap(), None);
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1"), ("SLURM_JOB_ID", "5")]).unwrap(), None);
    }

    #[test]
    fn ranks_started_by_a_worker_through_srun_follow_its_rank_0() {
        let base = [
            ("SLURM_STEP_NUM_TASKS", "3"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "4000"),
            ("LATHE_RANK_OFFSET", "1"),
            ("LATHE_RANK_OFFSET_NODE", "n1"),
        ];
        let on = |node: &'static str, procid: &'static str, localid: &'static str| {
            let mut v = base.to_vec();
            v.extend([("SLURMD_NODENAME", node), ("SLURM_PROCID", procid), ("SLURM_LOCALID", localid)]);
            let e = env(&v).unwrap().unwrap();
            (e.rank, e.local_rank, e.world)
        };
        assert_eq!(on("n1", "0", "0"), (1, 1, 4), "the worker's node: after its rank 0");
        assert_eq!(on("n2", "1", "0"), (2, 0, 4));
        assert_eq!(on("n2", "2", "1"), (3, 1, 4));
        let one = [
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_PROCID", "0"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "4000"),
            ("LATHE_RANK_OFFSET", "1"),
        ];
        assert_eq!(env(&one).unwrap().unwrap().world, 2, "a single srun task plus the worker is a gang of two");
    }

    #[test]
    fn a_half_set_environment_names_the_missing_variable() {
        let err = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
        let err = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "5")]).unwrap_err().to_string();
        assert!(err.contains("not below the world size 2"), "{err}");
        let err = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(err.contains("RANK"), "{err}");
    }

    #[test]
    fn gpu_ranks_get_nccl_when_built_with_it_and_cpu_ranks_gloo() {
        assert_eq!(backend_for("cpu", None).unwrap(), Backend::Gloo);
        let gpu = if NCCL_BUILT { Backend::Nccl { device: 1 } } else { Backend::Gloo };
        assert_eq!(backend_for("cuda:1", None).unwrap(), gpu);
        assert_eq!(backend_for("cuda:1", Some("gloo")).unwrap(), Backend::Gloo);
        assert!(backend_for("cpu", Some("nccl")).unwrap_err().to_string().contains("LATHE_DIST_BACKEND"));
        assert!(backend_for("cpu", Some("mpi")).is_err());
    }

    #[test]
    fn gpu_ranks_take_consecutive_gpus_from_the_configured_one() {
        assert_eq!(rank_device("cuda", 3, 4), "cuda:3");
        assert_eq!(rank_device("cuda:2", 1, 4), "cuda:3");
        assert_eq!(rank_device("cuda:2", 3, 4), "cuda:1");
        assert_eq!(rank_device("auto", 1, 2), "cuda:1");
        // srun with one GPU bound per task: every rank sees cuda:0.
        assert_eq!(rank_device("cuda", 5, 1), "cuda:0");
        assert_eq!(rank_device("auto", 1, 0), "auto");
        assert_eq!(rank_device("cpu", 1, 4), "cpu");
    }

    #[test]
    fn first_host_of_slurm_host_lists() {
        assert_eq!(first_host("gpu[03-05,9],login1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("node1,node2").as_deref(), Some("node1"));
        assert_eq!(first_host("c[7]").as_deref(), Some("c7"));
        assert_eq!(first_host("").as_deref(), None);
    }
}
