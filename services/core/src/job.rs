//! A job's status and the moves between statuses that the controller may make.
//!
//! ```text
//!  validating_files ──▶ queued ◀──────────────┐ lease lost, preempted, retry after crash
//!        │  │             │  ▲ │              │
//!        │  │             │  │ └──claim──▶ running ──▶ succeeded | failed | cancelled
//!        │  │             ▼  │ resume         │
//!        │  │           paused ◀──────────────┘ pause
//!        │  └──▶ failed  (bad file)
//!        └─────▶ cancelled ◀── queued, paused
//! ```
//!
//! `succeeded`, `failed` and `cancelled` are final. The store applies a transition as a
//! compare-and-set on the current status, so two controllers racing on one job cannot both
//! win; this module only says which moves exist.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// OpenAI's job status strings, stored as the same text in Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Files are being checked; the job is not yet eligible for dispatch.
    ValidatingFiles,
    /// Waiting for a worker (a new job, a retry after backoff, or a resumed one).
    Queued,
    /// Claimed by a worker holding a live lease.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Held by the user; keeps its checkpoints and resumes from the last one.
    Paused,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Paused => "paused",
        }
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(text: &str) -> Result<Self, UnknownStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text).ok_or_else(|| UnknownStatus(text.to_string()))
    }
}

/// Whether a job in `from` may move to `to`. Staying in the same status is not a transition.
pub fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    match (from, to) {
        (ValidatingFiles, Queued | Failed | Cancelled) => true,
        // A worker claimed it; or the user paused or cancelled it before any worker did.
        (Queued, Running | Paused | Cancelled) => true,
        // Back to the queue when the lease is lost, the worker is preempted (SIGTERM) or a
        // crash is retried; the next attempt resumes from the last committed checkpoint.
        (Running, Queued | Succeeded | Failed | Cancelled | Paused) => true,
        (Paused, Queued | Cancelled) => true,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} job cannot become {to}")]
pub struct IllegalTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

/// `to` if the move is legal; the error names both statuses (for a 409/400 message).
pub fn transition(from: JobStatus, to: JobStatus) -> Result<JobStatus, IllegalTransition> {
    if can_transition(from, to) {
        Ok(to)
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    #[test]
    fn statuses_serialize_as_the_openai_strings() {
        let json = serde_json::to_string(&JobStatus::ALL).unwrap();
        assert_eq!(json, r#"["validating_files","queued","running","succeeded","failed","cancelled","paused"]"#);
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
            assert_eq!(serde_json::from_str::<JobStatus>(&format!("\"{status}\"")).unwrap(), status);
        }
        assert!("canceled".parse::<JobStatus>().is_err());
    }

    #[test]
    fn exactly_the_documented_edges_are_legal() {
        let legal = [
            (ValidatingFiles, Queued),
            (ValidatingFiles, Failed),
            (ValidatingFiles, Cancelled),
            (Queued, Running),
            (Queued, Paused),
            (Queued, Cancelled),
            (Running, Queued),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Running, Paused),
            (Paused, Queued),
            (Paused, Cancelled),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let expected = legal.contains(&(from, to));
                assert_eq!(can_transition(from, to), expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_terminal_job_never_moves_again() {
        for from in [Succeeded, Failed, Cancelled] {
            assert!(from.is_terminal());
            for to in JobStatus::ALL {
                assert_eq!(transition(from, to), Err(IllegalTransition { from, to }));
            }
        }
        assert!(!Running.is_terminal() && !Paused.is_terminal());
    }

    #[test]
    fn a_queued_job_cannot_succeed_without_running() {
        let error = transition(Queued, Succeeded).unwrap_err();
        assert_eq!(error.to_string(), "a queued job cannot become succeeded");
    }

    #[test]
    fn a_paused_job_resumes_through_the_queue_not_straight_to_running() {
        assert_eq!(transition(Paused, Queued), Ok(Queued));
        assert!(!can_transition(Paused, Running));
    }

    #[test]
    fn a_lost_lease_requeues_and_a_running_job_is_never_revalidated() {
        assert_eq!(transition(Running, Queued), Ok(Queued));
        assert!(!can_transition(Running, ValidatingFiles));
        assert!(!can_transition(Queued, ValidatingFiles));
    }

    #[test]
    fn only_validation_fails_a_job_that_never_ran() {
        assert!(can_transition(ValidatingFiles, Failed));
        assert!(!can_transition(Queued, Failed));
        assert!(!can_transition(Paused, Failed));
    }
}
