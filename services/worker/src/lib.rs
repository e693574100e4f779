//! The worker daemon: one per GPU (or CPU box). It waits for a job id in Redis, asks the
//! controller to claim it over gRPC, runs the trainer on a blocking thread, and streams what
//! the trainer reports back on the attempt's bidirectional stream.
//!
//! ```text
//! Redis BZPOPMIN ──job id──▶ daemon ──ClaimJob──▶ controller ──▶ spec, attempt, resume point
//!                              │
//!                              ▼ attempt::run
//!       trainer (spawn_blocking) ──events──▶ outbox (seq, unacked) ══Attempt stream══▶ controller
//!                 ▲ should_stop                                  ◀══ Ack / Cancel / Pause / LeaseLost
//!                 └──────── signals (cancel, pause, lease lost, SIGTERM) ◀── heartbeat loop
//! ```
//!
//! The worker holds no database credentials. Everything it writes is fenced by the attempt
//! number it was given at claim: when the controller answers `LeaseLost` the worker stops at
//! once and drops what it had not sent. Messages are kept until acked and resent after a
//! reconnect, so a controller restart or a Postgres blip loses nothing.
//!
//! Between waits for jobs the daemon asks for a queued evaluation ([`evaluation`]): a model
//! scored on a benchmark, claimed and fenced the same way, reported in one call at the end.
//!
//! Started with `--serve`, the worker is an inference server instead ([`serve`]): it answers
//! the chat and text completions the controller routes to it, batching them on the device.

pub mod attempt;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod evaluation;
mod redact;
pub mod serve;
pub mod spec;
pub mod telemetry;

pub use config::{ClientTls, Lifecycle, Placement, WorkerConfig};
pub use daemon::run;
pub use error::WorkerError;
pub use serve::ServeConfig;
