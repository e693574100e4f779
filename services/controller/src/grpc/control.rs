//! What each open Attempt stream must tell its worker — the user cancelled or paused the job,
//! the reconciler asked for a preemption, the job moved on without this attempt — read from the
//! job rows, whichever replica or command changed them. One task reads the rows of every
//! attempt this replica streams, in one query every [`POLL`], and each stream wakes when its
//! own row changed: a thousand running jobs cost two queries a second, not two thousand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lathe_store::jobs::AttemptControl;
use tokio::sync::watch;

use crate::AppState;

/// How often the rows are read: a cancel, pause or preemption reaches the worker within this
/// (plus a round trip).
pub const POLL: Duration = Duration::from_millis(500);

/// What the last read found for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Not read yet.
    Unknown,
    /// The job row while it still has this attempt number; `None` once it moved on (requeued
    /// and re-claimed, deleted).
    Control(Option<AttemptControl>),
}

/// The attempts whose streams this replica holds.
#[derive(Default)]
pub struct AttemptControls {
    watched: Mutex<HashMap<(String, i32), Entry>>,
}

struct Entry {
    streams: usize,
    observed: watch::Sender<Observed>,
}

/// One stream's view of its attempt's row; dropping it stops watching.
pub struct Watch {
    registry: Arc<AttemptControls>,
    key: (String, i32),
    observed: watch::Receiver<Observed>,
}

impl Watch {
    /// The next change of the row (waits forever once the registry is gone).
    pub async fn changed(&mut self) -> Observed {
        if self.observed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.observed.borrow_and_update().clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.registry.lock();
        if let Some(entry) = watched.get_mut(&self.key) {
            entry.streams -= 1;
            if entry.streams == 0 {
                watched.remove(&self.key);
            }
        }
    }
}

impl AttemptControls {
    pub fn watch(self: &Arc<Self>, job_id: &str, attempt: i32) -> Watch {
        let key = (job_id.to_string(), attempt);
        let mut watched = self.lock();
        let entry = watched.entry(key.clone()).or_insert_with(|| Entry { streams: 0, observed: watch::channel(Observed::Unknown).0 });
        entry.streams += 1;
        Watch { registry: self.clone(), key, observed: entry.observed.subscribe() }
    }

    /// The (job, attempt) pairs with at least one open stream here.
    pub fn watched(&self) -> Vec<(String, i32)> {
        self.lock().keys().cloned().collect()
    }

    /// Hands each attempt that was `asked` about what was read; streams wake only where it
    /// changed. A stream that opened after the question was sent is left for the next read (to
    /// it, a row missing from this one would look like a job that moved on).
    pub fn observe(&self, asked: &[(String, i32)], read: &HashMap<(String, i32), AttemptControl>) {
        let watched = self.lock();
        for key in asked {
            let Some(entry) = watched.get(key) else { continue };
            let now = Observed::Control(read.get(key).cloned());
            entry.observed.send_if_modified(|seen| {
                let changed = *seen != now;
                *seen = now.clone();
                changed
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Entry>> {
        self.watched.lock().expect("attempt controls lock")
    }
}

/// Reads the watched attempts' rows every [`POLL`] until `stop`.
pub async fn run(state: AppState, stop: watch::Receiver<bool>) {
    let state = &state;
    super::every(POLL, stop, || async move {
        let watched = state.attempt_controls.watched();
        if watched.is_empty() {
            return;
        }
        match lathe_store::jobs::attempt_controls(&state.pool, &watched).await {
            Ok(read) => state.attempt_controls.observe(&watched, &read),
            // Postgres blinked: the streams keep what they last saw and look again next tick.
            Err(error) => tracing::debug!(%error, "cannot read the running attempts' rows"),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_core::JobStatus;

    fn running() -> AttemptControl {
        AttemptControl { status: JobStatus::Running, pause: false, preempt_for: None }
    }

    #[tokio::test]
    async fn a_stream_wakes_when_its_own_row_changes_and_not_for_others() {
        let registry = Arc::new(AttemptControls::default());
        let mut mine = registry.watch("ftjob-a", 2);
        let mut other = registry.watch("ftjob-b", 1);
        assert_eq!(registry.watched().len(), 2);

        let asked = registry.watched();
        let mut read = HashMap::from([(("ftjob-a".to_string(), 2), running()), (("ftjob-b".to_string(), 1), running())]);
        registry.observe(&asked, &read);
        assert_eq!(mine.changed().await, Observed::Control(Some(running())));
        assert_eq!(other.changed().await, Observed::Control(Some(running())));

        // Only a's row changes: a preemption for it.
        let preempted = AttemptControl { preempt_for: Some("ftjob-c".into()), ..running() };
        read.insert(("ftjob-a".to_string(), 2), preempted.clone());
        registry.observe(&asked, &read);
        assert_eq!(mine.changed().await, Observed::Control(Some(preempted)));
        assert!(tokio::time::timeout(Duration::from_millis(50), other.changed()).await.is_err(), "b's row did not change");

        // a's job moved on to another attempt: its row no longer answers for attempt 2.
        // A stream that opened after the question went out is not told its row is missing.
        let mut late = registry.watch("ftjob-late", 1);
        read.remove(&("ftjob-a".to_string(), 2));
        registry.observe(&asked, &read);
        assert_eq!(mine.changed().await, Observed::Control(None));
        assert!(tokio::time::timeout(Duration::from_millis(50), late.changed()).await.is_err(), "the late stream was not asked about");
        drop((mine, late));
        assert_eq!(registry.watched(), vec![("ftjob-b".to_string(), 1)], "closed streams stop being watched");
    }
}
