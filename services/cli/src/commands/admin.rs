//! `lathe admin`: API keys and worker tokens, straight in Postgres (run it where the database
//! is reachable). Secrets are printed alone on stdout so scripts can capture them.

use clap::Subcommand;

use super::service::Database;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create an API key for a project (created if missing); prints the key once.
    CreateKey {
        #[arg(long, default_value = "default")]
        project: String,
        /// A label to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        database: Database,
    },
    /// Revoke one of a project's keys by its id (`key_…`, from list-keys).
    RevokeKey {
        #[arg(long, default_value = "default")]
        project: String,
        key_id: String,
        #[command(flatten)]
        database: Database,
    },
    /// List a project's keys (ids and labels, never the secrets).
    ListKeys {
        #[arg(long, default_value = "default")]
        project: String,
        #[command(flatten)]
        database: Database,
    },
    /// Set a project's fair share in a pool: its weight against the other projects (default 1)
    /// and the GPUs its running jobs may hold there at most (default: no quota). Below its
    /// quota a project may borrow any idle capacity; weights order claims, they do not cap
    /// (docs/scheduling.md).
    SetProject {
        /// The project's name (as given to create-key).
        project: String,
        /// Relative share, a number above 0 (3 against another project's 1: three times the GPUs
        /// when both have work queued).
        #[arg(long)]
        weight: Option<f64>,
        /// Running GPUs at most; `none` removes the quota.
        #[arg(long)]
        max_gpus: Option<String>,
        /// Only in this pool [default: every pool without a setting of its own].
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        database: Database,
    },
    /// Create a worker token; prints it once (give it to `lathe worker` as LATHE_WORKER_TOKEN).
    CreateWorker {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        grant: GrantArgs,
        #[command(flatten)]
        database: Database,
    },
    /// Create a fleet: one secret any number of worker instances enrol with (Slurm pilots,
    /// Kubernetes pods), each getting its own identity; prints the secret once.
    CreateFleet {
        /// A name to revoke it by.
        name: String,
        #[command(flatten)]
        grant: GrantArgs,
        /// Live workers of this fleet at most (enrolments beyond are refused) [default: no cap].
        #[arg(long)]
        max_workers: Option<u32>,
        #[command(flatten)]
        database: Database,
    },
    /// Revoke a fleet (by name or id) and every worker enrolled with it.
    RevokeFleet {
        fleet: String,
        #[command(flatten)]
        database: Database,
    },
    /// List workers: id, state, pools, fleet, Slurm job or pod, last heartbeat.
    ListWorkers {
        #[command(flatten)]
        database: Database,
    },
    /// Drain a worker, by id or name: it finishes its current job and claims nothing more
    /// (with --exit-when-idle it then exits).
    DrainWorker {
        /// The worker id (`wrk_…`) or its name.
        worker: String,
        #[command(flatten)]
        database: Database,
    },
    /// Revoke a worker's token, by worker id or name: its next call is refused, its open
    /// streams close within seconds, and what it holds is queued again at once (no retry spent).
    RevokeWorker {
        /// The worker id (`wrk_…`, from the worker's log) or its name.
        worker: String,
        #[command(flatten)]
        database: Database,
    },
}

/// What a worker token or a fleet's instances may do.
#[derive(clap::Args)]
pub struct GrantArgs {
    /// Pools it may serve, comma-separated [default: any].
    #[arg(long, value_delimiter = ',')]
    pools: Option<Vec<String>>,
    /// What it may do: training (claim jobs and evaluations), serving (answer completions with
    /// `lathe worker --serve`), or both, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "training")]
    roles: Vec<String>,
}

impl GrantArgs {
    fn terms(self, max_workers: Option<u32>) -> anyhow::Result<lathe_store::fleets::FleetTerms> {
        lathe_controller::cli::fleet_terms(self.pools, &self.roles, max_workers).map_err(|e| anyhow::anyhow!("--{e}"))
    }
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match command {
            AdminCommand::CreateKey { project, name, database } => {
                let pool = database.connect_for_admin().await?;
                let project = lathe_store::projects::ensure_project(&pool, &project).await?;
                let key = lathe_store::keys::create_api_key(&pool, &project.id, &name).await?;
                eprintln!("created {} for project {} ({})", key.key.id, project.name, project.id);
                println!("{}", key.token);
            }
            AdminCommand::RevokeKey { project, key_id, database } => {
                let pool = database.connect_for_admin().await?;
                let project = lathe_store::projects::get_project_by_name(&pool, &project)
                    .await
                    .map_err(|_| anyhow::anyhow!("no project named {project:?}"))?;
                let key = lathe_store::keys::revoke_api_key(&pool, &project.id, &key_id)
                    .await
                    .map_err(|_| anyhow::anyhow!("no key {key_id} in project {}", project.name))?;
                eprintln!("revoked {}", key.id);
            }
            AdminCommand::ListKeys { project, database } => {
                let pool = database.connect_for_admin().await?;
                let project = lathe_store::projects::get_project_by_name(&pool, &project)
                    .await
                    .map_err(|_| anyhow::anyhow!("no project named {project:?}"))?;
                for key in lathe_store::keys::list_api_keys(&pool, &project.id).await? {
                    let state = if key.revoked_at.is_some() { "revoked" } else { "active" };
                    println!("{}\t{}\t{}", key.id, state, key.name);
                }
            }
            AdminCommand::SetProject { project, weight, max_gpus, pool: in_pool, database } => {
                let weight =
                    weight.map(lathe_core::fair_share::Share::check_weight).transpose().map_err(|e| anyhow::anyhow!("--weight {e}"))?;
                let max_gpus = max_gpus.map(|v| parse_max_gpus(&v)).transpose()?;
                if weight.is_none() && max_gpus.is_none() {
                    anyhow::bail!("nothing to set: give --weight, --max-gpus or both");
                }
                let in_pool = match in_pool {
                    Some(p) => {
                        lathe_queue::Pool::parse(&p).map_err(|e| anyhow::anyhow!("--pool {e}"))?;
                        p
                    }
                    None => lathe_store::dispatch::fair_share::ALL_POOLS.to_string(),
                };
                let pool = database.connect_for_admin().await?;
                let found = lathe_store::projects::get_project_by_name(&pool, &project).await.map_err(|_| {
                    anyhow::anyhow!(
                        "no project named {project:?} (a project is made by its first key: lathe admin create-key --project {project})"
                    )
                })?;
                lathe_store::dispatch::fair_share::set_project_share(&pool, &found.id, &in_pool, weight, max_gpus).await?;
                for (p, weight, max_gpus) in lathe_store::dispatch::fair_share::project_shares(&pool, &found.id).await? {
                    let pool_label =
                        if p == lathe_store::dispatch::fair_share::ALL_POOLS { "every pool".to_string() } else { format!("pool {p}") };
                    let weight = weight.map_or("inherited".to_string(), |w| w.to_string());
                    let quota = max_gpus.map_or("none".to_string(), |n| format!("{n} GPUs"));
                    println!("{}\t{pool_label}\tweight {weight}\tquota {quota}", found.name);
                }
            }
            AdminCommand::CreateWorker { name, grant, database } => {
                let grant = grant.terms(None)?.grant;
                let pool = database.connect_for_admin().await?;
                let pools = grant.pools.clone().unwrap_or_else(|| vec!["default".to_string()]);
                let serving = !grant.allows(lathe_store::workers::ROLE_TRAINING);
                let worker = lathe_store::workers::register_worker(
                    &pool,
                    lathe_store::workers::NewWorker {
                        name: &name,
                        device_kind: "cpu",
                        gpu_name: None,
                        gpu_memory_bytes: None,
                        pools: &pools,
                        gpus: 1,
                        nodes: 1,
                        version: "",
                        slurm_job_id: None,
                        pod_name: None,
                        serving,
                    },
                    &grant,
                )
                .await?;
                eprintln!(
                    "created worker {} ({name}, roles: {}); it reports its device and pools when it starts",
                    worker.worker.id,
                    grant.roles.join(",")
                );
                println!("{}", worker.token);
            }
            AdminCommand::CreateFleet { name, grant, max_workers, database } => {
                let terms = grant.terms(max_workers)?;
                let pool = database.connect_for_admin().await?;
                let (fleet, secret) = lathe_store::fleets::create_fleet(&pool, &name, &terms).await?;
                eprintln!("created fleet {} ({}); give the secret to workers as LATHE_WORKER_TOKEN", fleet.name, fleet.id);
                println!("{secret}");
            }
            AdminCommand::RevokeFleet { fleet, database } => {
                let pool = database.connect_for_admin().await?;
                let (revoked, workers) = lathe_store::fleets::revoke_fleet(&pool, &fleet).await.map_err(|e| match e {
                    lathe_store::StoreError::NotFound => anyhow::anyhow!("cannot revoke {fleet:?}: no fleet has that name or id"),
                    other => anyhow::anyhow!("cannot revoke {fleet:?}: {other}"),
                })?;
                eprintln!("revoked fleet {} and its {} worker(s)", revoked.name, workers.len());
            }
            AdminCommand::ListWorkers { database } => {
                let pool = database.connect_for_admin().await?;
                let now = lathe_store::time::OffsetDateTime::now_utc();
                println!("ID\tNAME\tSTATE\tPOOLS\tFLEET\tPLACEMENT\tLAST HEARTBEAT");
                for w in lathe_store::workers::list_workers(&pool).await? {
                    // The controller's default lease: a worker silent for longer has lost its jobs.
                    let state = lathe_controller::api::admin::worker_state(&w, now - std::time::Duration::from_secs(60));
                    let placement = match (&w.slurm_job_id, &w.pod_name) {
                        (Some(job), _) => format!("slurm:{job}"),
                        (None, Some(pod)) => format!("pod:{pod}"),
                        (None, None) => "-".into(),
                    };
                    let ago = (now - w.last_heartbeat_at).whole_seconds();
                    println!(
                        "{}\t{}\t{state}\t{}\t{}\t{placement}\t{ago} s ago",
                        w.id,
                        w.name,
                        w.pools.join(","),
                        w.fleet_id.as_deref().unwrap_or("-")
                    );
                }
            }
            AdminCommand::DrainWorker { worker, database } => {
                let pool = database.connect_for_admin().await?;
                let drained = lathe_store::workers::drain_workers(&pool, &worker).await.map_err(|e| match e {
                    lathe_store::StoreError::NotFound => anyhow::anyhow!("cannot drain {worker:?}: no worker has that id or name"),
                    other => anyhow::anyhow!("cannot drain {worker:?}: {other}"),
                })?;
                for id in drained {
                    eprintln!("draining {id}");
                }
            }
            AdminCommand::RevokeWorker { worker, database } => {
                let pool = database.connect_for_admin().await?;
                let revoked = lathe_store::workers::revoke_worker(&pool, &worker).await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot revoke {worker:?}: {}",
                        if matches!(e, lathe_store::StoreError::NotFound) {
                            "no worker has that id or name".to_string()
                        } else {
                            e.to_string()
                        }
                    )
                })?;
                let (ids, released) = revoked;
                for id in ids {
                    eprintln!("revoked {id}");
                }
                for work in released {
                    eprintln!("{} {} given back (attempt {} ended; now {})", work.work.noun(), work.id, work.attempt, work.status);
                }
            }
        }
        Ok(())
    })
}

/// `--max-gpus`: a count, or `none` to remove the quota.
fn parse_max_gpus(value: &str) -> anyhow::Result<Option<u32>> {
    match value.trim() {
        "none" => Ok(None),
        n => n
            .parse::<u32>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--max-gpus must be a whole number of GPUs (0 or more) or none, got {value:?}")),
    }
}
