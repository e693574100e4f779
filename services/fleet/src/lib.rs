//! Lathe's fleet on Slurm: the autoscaler that turns demand per pool into pilot jobs.
//!
//! Where it sits (docs/architecture.md §3, "Fleet"):
//!
//! ```text
//! controller /v1/admin/demand, /v1/admin/workers ──▶ autoscale pass ◀── squeue (pilots by name)
//!                                                        │
//!                                                        ▼ sbatch --parsable --array (one call)
//!                          pilot job: exec lathe worker --exit-when-idle … (enrols with the fleet secret)
//! ```
//!
//! Slurm does all the scheduling; this crate only decides how many pilots to ask for. Supply is
//! what squeue shows (pending and running pilots, found by job name) plus live workers that no
//! pilot accounts for; the pass submits `min(max_pilots − pilots, demand − supply)` more. It
//! keeps no state of its own, so a restarted autoscaler picks up where squeue says things are.
//! Pilots leave by themselves (`--exit-when-idle`): scale-in never cancels a busy worker.

pub mod config;
pub mod controller;
pub mod error;
pub mod plan;
pub mod slurm;

pub use config::{AutoscaleConfig, PoolConfig};
pub use error::FleetError;
pub use plan::{pass, PassReport};
