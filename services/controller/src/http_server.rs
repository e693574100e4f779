//! The REST listener, served with hyper directly (not `axum::serve`) so that connections are
//! bounded: a flood of silent or slow connections once exhausted the file descriptors and
//! `/healthz` stopped answering.
//!
//! - A client must send a whole request head within `header_read_timeout` of connecting, and
//!   of its previous response on a kept-alive connection (hyper's timer covers both), or the
//!   connection is closed: silent and idle connections do not pile up.
//! - At most `max_connections` are open. At the cap, a new connection evicts the oldest one
//!   with no request in flight (silent, or idle between requests); if every connection is busy,
//!   the new one is closed at once. A fresh client (a health probe) therefore always gets in.
//! - Shutdown stops accepting and lets requests in flight finish, for at most 20 s.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tower_service::Service;

/// How long shutdown waits for open requests and streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// For the request head, from connect or from the previous response (keep-alive).
    pub header_read_timeout: Duration,
}

/// One open connection, as the accept loop sees it.
struct Connection {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    evict: Notify,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Arc<Connection>>,
}

impl Registry {
    /// Registers a new connection, evicting the oldest idle one at the cap; None when every
    /// open connection is busy.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Connection>)> {
        if self.open.len() >= max {
            let idle = self.open.iter().find(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0).map(|(id, _)| *id)?;
            if let Some(evicted) = self.open.remove(&idle) {
                evicted.evict.notify_one();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let connection = Arc::new(Connection { in_flight: AtomicUsize::new(0), evict: Notify::new() });
        self.open.insert(id, connection.clone());
        Some((id, connection))
    }
}

/// Decrements a connection's in-flight count when the response body is done (or dropped).
struct InFlight(Arc<Connection>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its connection's [`InFlight`] guard; everything else is the
/// inner body's (the size hint keeps `Content-Length`).
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // HTTP/1.1 only: hyper's auto (h1 + h2c) builder first waits for bytes to sniff the
    // version, with no timeout, so a silent connection would sit there forever. The SDKs speak
    // HTTP/1.1; a TLS-terminating proxy in front may speak HTTP/2 to clients.
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let builder = Arc::new(builder);
    let registry = Arc::new(Mutex::new(Registry::default()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning; connections close over time.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admitted = registry.lock().expect("registry lock").admit(limits.max_connections);
        let Some((id, connection)) = admitted else {
            tracing::warn!(max = limits.max_connections, "every connection is busy: refusing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let counted = connection.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            counted.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(counted.clone());
            let mut router = router.clone();
            async move {
                let response = router.call(request.map(Body::new)).await?;
                // The guard lives as long as the body: a streaming response (SSE, a download)
                // keeps its connection busy until it ends.
                Ok::<_, std::convert::Infallible>(response.map(|body| Body::new(Guarded { inner: body, _guard: guard })))
            }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let registry = registry.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = connection.evict.notified() => tracing::debug!("connection evicted: idle at the connection cap"),
            }
            registry.lock().expect("registry lock").open.remove(&id);
        });
    }
    drop(listener);
    // Requests in flight finish; a stream that would outlive a deployment's stop timeout (an SSE
    // follower of a long job) is cut after this grace period.
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(seconds = SHUTDOWN_GRACE.as_secs(), "connections still open after the grace period: closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_is_evicted_and_busy_ones_never_are() {
        let mut registry = Registry::default();
        let (first, busy) = registry.admit(2).unwrap();
        busy.in_flight.store(1, Ordering::Release);
        let (second, _) = registry.admit(2).unwrap();
        let (third, _) = registry.admit(2).unwrap();
        assert!(registry.open.contains_key(&first), "a busy connection was evicted");
        assert!(!registry.open.contains_key(&second), "the oldest idle connection stays");
        assert!(registry.open.contains_key(&third));
        registry.open.get(&third).unwrap().in_flight.store(1, Ordering::Release);
        assert!(registry.admit(2).is_none(), "every connection busy: the new one is refused");
    }
}
