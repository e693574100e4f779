//! The controller ⇄ worker protocol (`proto/lathe/v1/worker.proto`), generated with tonic and
//! prost at build time. The controller serves `WorkerService`; worker daemons are its clients:
//! they register, claim a job, and hold one bidirectional `Attempt` stream per attempt that
//! carries metrics, events and checkpoint commits up and cancel / lease-lost down.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("lathe.v1");
}
