//! The autoscaler's settings: a TOML file (deploy/slurm/autoscale.toml is the example) with one
//! table per pool. Secrets are not in it: the admin token and the fleet secret come from the
//! environment (`LATHE_ADMIN_TOKEN`; pilots inherit `LATHE_WORKER_TOKEN` or read
//! `LATHE_WORKER_TOKEN_FILE`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::FleetError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleConfig {
    /// The controller's REST address, e.g. `http://lathe-controller:8080`.
    pub controller: String,
    /// Seconds between passes.
    #[serde(default = "default_interval")]
    pub interval_seconds: f64,
    /// The sbatch script pilots run (relative to this file's folder).
    pub template: PathBuf,
    /// Pilots are named `<prefix><pool>`: that name is how squeue finds them again.
    #[serde(default = "default_prefix")]
    pub job_name_prefix: String,
    /// Where pilots write their output (`--output`); Slurm's default (the submit directory)
    /// when unset.
    pub output_dir: Option<PathBuf>,
    pub pools: BTreeMap<String, PoolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pilots of this pool in squeue at most (pending and running together).
    pub max_pilots: u32,
    pub partition: Option<String>,
    /// e.g. `gpu:a100:1` (one worker per GPU).
    pub gres: Option<String>,
    /// Node features the pool needs, e.g. `a100`.
    pub constraint: Option<String>,
    /// The most GPUs one pilot of this pool may ask for: a job asking for `gpus: 4` gets a pilot
    /// with four (`--gres` with the count replaced) when this allows it, else it waits with a
    /// `pending_reason`. Default: the count in `gres` (every pilot the same size).
    pub max_gpus_per_pilot: Option<u32>,
    /// Nodes per pilot: more than 1 makes each pilot a worker that spreads jobs asking for
    /// `nodes` over its allocation (rank 0 on the first node, srun for the rest).
    pub nodes: Option<u32>,
    /// Slurm time limit of a pilot, e.g. `08:00:00`.
    pub time_limit: Option<String>,
    /// Seconds a pilot's worker waits without work before it exits and frees its node.
    #[serde(default = "default_idle_exit")]
    pub idle_exit_seconds: u64,
    /// Anything else sbatch should get, e.g. `["--account=ml", "--qos=normal"]`.
    #[serde(default)]
    pub extra_sbatch_args: Vec<String>,
}

fn default_interval() -> f64 {
    10.0
}
fn default_prefix() -> String {
    "lathe-pilot-".into()
}
fn default_idle_exit() -> u64 {
    300
}

impl AutoscaleConfig {
    pub fn load(path: &Path) -> Result<AutoscaleConfig, FleetError> {
        let bad = |message: String| FleetError::Config { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut config: AutoscaleConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if config.template.is_relative() {
            config.template = path.parent().unwrap_or(Path::new(".")).join(&config.template);
        }
        config.check().map_err(bad)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if !(self.interval_seconds > 0.0 && self.interval_seconds.is_finite()) {
            return Err(format!("interval_seconds must be a positive number, got {}", self.interval_seconds));
        }
        if self.pools.is_empty() {
            return Err("no [pools.<name>] table: name at least one pool to scale".into());
        }
        for name in self.pools.keys() {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !valid {
                return Err(format!("pools.{name}: a pool name is 1 to 64 lowercase letters, digits, '-' or '_'"));
            }
        }
        if !self.template.is_file() {
            return Err(format!("template: {} is not a file", self.template.display()));
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_seconds)
    }

    /// The job name of a pool's pilots.
    pub fn job_name(&self, pool: &str) -> String {
        format!("{}{pool}", self.job_name_prefix)
    }

    /// The job name of a pool's pilots with `gpus` GPUs: the pool's own name for pilots of the
    /// pool's size, `<name>+g<gpus>` for larger ones ('+' is in no pool name).
    pub fn pilot_name(&self, pool: &str, settings: &PoolConfig, gpus: u32) -> String {
        if gpus == settings.pilot_gpus() {
            self.job_name(pool)
        } else {
            format!("{}+g{gpus}", self.job_name(pool))
        }
    }
}

impl PoolConfig {
    /// GPUs of the pool's ordinary pilot: the count at the end of `gres` (`gpu:a100:2` → 2), 1
    /// without one.
    pub fn pilot_gpus(&self) -> u32 {
        self.gres.as_deref().and_then(|g| g.rsplit(':').next()).and_then(|n| n.parse().ok()).filter(|&n| n > 0).unwrap_or(1)
    }

    /// The largest pilot the pool may submit, in GPUs.
    pub fn max_pilot_gpus(&self) -> u32 {
        self.max_gpus_per_pilot.unwrap_or(1).max(self.pilot_gpus())
    }

    /// `--gres` for a pilot with `gpus` GPUs: the pool's own with the count replaced.
    pub fn gres_for(&self, gpus: u32) -> Option<String> {
        if gpus == self.pilot_gpus() {
            return self.gres.clone();
        }
        match self.gres.as_deref() {
            Some(gres) => match gres.rsplit_once(':') {
                Some((kind, count)) if count.parse::<u32>().is_ok() => Some(format!("{kind}:{gpus}")),
                _ => Some(format!("{gres}:{gpus}")),
            },
            None => Some(format!("gpu:{gpus}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::write(dir.join("pilot.sbatch"), "#!/bin/bash\n").unwrap();
        let path = dir.join("autoscale.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_config_names_its_pools_and_a_mistake_names_the_field() {
        let dir = std::env::temp_dir().join(format!("lathe-fleet-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = write(
            &dir,
            "controller = \"http://c:8080\"\ntemplate = \"pilot.sbatch\"\n[pools.a100]\nmax_pilots = 4\nconstraint = \"a100\"\n",
        );
        let config = AutoscaleConfig::load(&ok).unwrap();
        assert_eq!(config.pools["a100"].max_pilots, 4);
        assert_eq!(config.pools["a100"].idle_exit_seconds, 300);
        assert_eq!(config.job_name("a100"), "lathe-pilot-a100");
        assert_eq!(config.template, dir.join("pilot.sbatch"));

        let typo = write(&dir, "controller = \"x\"\ntemplate = \"pilot.sbatch\"\n[pools.a100]\nmax_pilot = 4\n");
        let error = AutoscaleConfig::load(&typo).unwrap_err().to_string();
        assert!(error.contains("max_pilot"), "{error}");
        let bad_pool = write(&dir, "controller = \"x\"\ntemplate = \"pilot.sbatch\"\n[pools.A100]\nmax_pilots = 1\n");
        assert!(AutoscaleConfig::load(&bad_pool).unwrap_err().to_string().contains("pools.A100"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
