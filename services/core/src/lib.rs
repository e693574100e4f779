//! Lathe's domain types and rules, with no IO: what a job is, which states it may move
//! between, what a valid job spec and a valid training file look like, and the id formats.
//!
//! Where it sits in the flow:
//!
//! ```text
//! REST body ──CreateJobRequest──▶ core: JobSpec::try_from (validate, resolve "auto")
//!                                   │ SpecError { param, message } → OpenAI error envelope
//!                                   ▼
//!                        store: jobs.spec jsonb, status per job::transition
//!                                   ▼
//!          worker: ClaimJob → JobSpec (from the jsonb) → trainer config → trainer
//! ```
//!
//! Uploaded files go through [`training_file::validate_training_file`] at upload and again at
//! job create; the trainer reads the same lines with the same [`training_file::parse_line`], so
//! a file the API accepted is a file the trainer accepts.
//!
//! Everything here is a pure function of its inputs: the controller, the reconciler, the
//! worker and the tests call it the same way.

pub mod benchmark;
pub mod error_code;
pub mod evaluation;
pub mod fair_share;
pub mod ids;
pub mod job;
pub mod model_name;
pub mod preemption;
pub mod spec;
pub mod training_file;

pub use benchmark::{Benchmark, Rule};
pub use error_code::ErrorCode;
pub use evaluation::{EvaluationRequest, EvaluationSpec};
pub use ids::{
    checkpoint_model_name, fine_tuned_model_name, split_checkpoint_model_name, CheckpointId, EvaluationId, EventId, FileId, IdError, JobId,
};
pub use job::{can_transition, transition, IllegalTransition, JobStatus};
pub use model_name::ModelName;
pub use spec::{CreateJobRequest, JobSpec, Method, SpecCode, SpecError};
pub use training_file::{validate_training_file, DataFormat, Example, FileError, FileSummary};
