//! Revocation that reaches open streams. A worker's unary calls are refused as soon as its
//! token (or fleet) is revoked, since each call authenticates; its streams authenticated once,
//! when they opened. So every Attempt and Serve stream holds a [`Watch`] on its worker, and a
//! task asks Postgres once a second which of the watched workers are revoked — one query for
//! all of this replica's streams, whichever replica or `lathe admin` command revoked them — and
//! the streams of those workers close: an attempt is told its lease is lost (the revocation
//! already gave its job back), a server's requests in flight end with 503.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::AppState;

/// How often the watched workers are checked: a revoked worker's streams close within this
/// (plus a round trip).
pub const POLL: Duration = Duration::from_secs(1);

/// The workers whose streams this replica holds.
#[derive(Default)]
pub struct Revocations {
    watched: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    streams: usize,
    revoked: watch::Sender<bool>,
}

/// One stream's view of its worker; dropping it stops watching.
pub struct Watch {
    registry: Arc<Revocations>,
    worker_id: String,
    revoked: watch::Receiver<bool>,
}

impl Watch {
    /// Resolves once the worker is revoked (never, while it is not).
    pub async fn revoked(&mut self) {
        if self.revoked.wait_for(|revoked| *revoked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.registry.lock();
        if let Some(entry) = watched.get_mut(&self.worker_id) {
            entry.streams -= 1;
            if entry.streams == 0 {
                watched.remove(&self.worker_id);
            }
        }
    }
}

impl Revocations {
    pub fn watch(self: &Arc<Self>, worker_id: &str) -> Watch {
        let mut watched = self.lock();
        let entry = watched.entry(worker_id.to_string()).or_insert_with(|| Entry { streams: 0, revoked: watch::channel(false).0 });
        entry.streams += 1;
        Watch { registry: self.clone(), worker_id: worker_id.to_string(), revoked: entry.revoked.subscribe() }
    }

    /// The workers with at least one open stream here.
    pub fn watched(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Closes the streams of these workers.
    pub fn revoke(&self, worker_ids: &[String]) {
        let watched = self.lock();
        for id in worker_ids {
            if let Some(entry) = watched.get(id) {
                tracing::warn!(worker_id = id, streams = entry.streams, "worker revoked: closing its streams");
                entry.revoked.send_replace(true);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.watched.lock().expect("revocations lock")
    }
}

/// Checks the watched workers every [`POLL`] until `stop`.
pub async fn run(state: AppState, stop: watch::Receiver<bool>) {
    let state = &state;
    super::every(POLL, stop, || async move {
        let watched = state.revocations.watched();
        if watched.is_empty() {
            return;
        }
        match lathe_store::workers::revoked_among(&state.pool, &watched).await {
            Ok(revoked) => state.revocations.revoke(&revoked),
            // Postgres down: nobody can revoke meanwhile either.
            Err(error) => tracing::debug!(%error, "cannot check for revoked workers"),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_revoked_worker_s_every_stream_learns_it_and_others_do_not() {
        let registry = Arc::new(Revocations::default());
        let mut first = registry.watch("a");
        let mut second = registry.watch("a");
        let mut other = registry.watch("b");
        assert_eq!(registry.watched().len(), 2);
        registry.revoke(&["a".to_string()]);
        tokio::time::timeout(Duration::from_secs(1), first.revoked()).await.expect("first stream told");
        tokio::time::timeout(Duration::from_secs(1), second.revoked()).await.expect("second stream told");
        assert!(tokio::time::timeout(Duration::from_millis(50), other.revoked()).await.is_err(), "b was not revoked");
        drop((first, second));
        assert_eq!(registry.watched(), vec!["b".to_string()], "closed streams stop being watched");
    }
}
